"""rdr_fast.sam against hand-written references on a small float64 model (docs/algorithm.md, "SAM family")."""
from __future__ import annotations

import ast
import copy
import io
import json
import os
import tokenize
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HostReads
from rdr_fast import RDRLoss, functional, sam
from rdr_fast.training import train_step

COUNTS = [60, 30, 15, 8, 4, 2]           # tail (< 20 samples): classes 2..5
LR, MOMENTUM, WD, RHO = 0.1, 0.9, 1e-2, 0.2


class Tiny(nn.Module):
    """Linear-BN-ReLU features [B, 8] and a linear classifier ``fc``, like the real models."""

    def __init__(self, num_classes=len(COUNTS)):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        z = self.body(x)
        return z, self.fc(z)


def setup(reweight="rdr", base="ce", batch=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Tiny().double()
    crit = RDRLoss(COUNTS, 8, base=base, reweight=reweight).double()
    # A few classes seen already, so the density ratios are not all 1.
    with torch.no_grad():
        feats = torch.randn(12, 8, dtype=torch.float64, generator=g)
        crit(feats, torch.zeros(12, len(COUNTS), dtype=torch.float64), torch.arange(12) % len(COUNTS))
    x = torch.randn(batch, 5, dtype=torch.float64, generator=g)
    y = torch.cat([torch.arange(len(COUNTS)), torch.randint(0, 3, (batch - len(COUNTS),), generator=g)])
    return model, crit, x, y


def make(name, model, **kw):
    return sam.make_optimizer(name, model, COUNTS, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                              **{"rho": RHO, **kw})


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, exact=False):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def first_backward(model, crit, x, y):
    features, logits = model(x)
    crit(features, logits, y).backward()


# ----------------------------------------------------------------------------- perturbation

def test_first_step_moves_params_by_rho_g_over_norm():
    model, crit, x, y = setup()
    opt = make("sam", model)
    first_backward(model, crit, x, y)
    w = params_of(model)
    g = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    opt.first_step()
    for p, w0, g0 in zip(model.parameters(), w, g):
        torch.testing.assert_close(p.detach() - w0, RHO * g0 / norm, rtol=1e-9, atol=1e-14)
    moved = torch.sqrt(sum(((p.detach() - w0) ** 2).sum() for p, w0 in zip(model.parameters(), w)))
    assert abs(float(moved) - RHO) < 1e-12
    assert all(p.grad is None for p in model.parameters())   # the second backward writes fresh grads


@pytest.mark.parametrize("named", [True, False])
def test_asam_first_step_formula(named):
    model, crit, x, y = setup()
    eta = 0.01
    opt = sam.SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, adaptive=True, eta=eta,
                  model=model if named else None)
    first_backward(model, crit, x, y)
    names = [n for n, _ in model.named_parameters()]
    w = params_of(model)
    g = [p.grad.clone() for p in model.parameters()]
    # Official ASAM: T = |w| + η for "weight" tensors, 1 for biases (without names: all tensors).
    t = [(w0.abs() + eta) if ("weight" in n or not named) else torch.ones_like(w0) for n, w0 in zip(names, w)]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    opt.first_step()
    for p, w0, ti, gi in zip(model.parameters(), w, t, g):
        torch.testing.assert_close(p.detach() - w0, RHO * ti * ti * gi / norm, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_restore_is_bit_exact(name):
    model, crit, x, y = setup()
    opt = make(name, model)
    first_backward(model, crit, x, y)
    w = params_of(model)
    opt.first_step()
    assert any(not torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))
    opt.restore()
    assert_same(params_of(model), w, exact=True)


# ----------------------------------------------------------------------------- references

def second_forward(model, x, freeze_bn=True):
    """A forward with BatchNorm statistics frozen the davda54 way (momentum 0)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0 if freeze_bn else m.momentum
    out = model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return out


def reference_sam_step(model, sgd, crit, x, y, rho, freeze_bn=True):
    """Hand-written two-pass SAM: per-parameter loops, copies of w, RDR weights from the
    first pass applied by F.cross_entropy in the second; SGD after the restore."""
    sgd.zero_grad()
    features, logits = model(x)
    crit(features, logits, y).backward()
    weights = crit.last_weights.clone()
    params = list(model.parameters())
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    old = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(rho * p.grad / (norm + 1e-12))
    sgd.zero_grad()
    _, logits2 = second_forward(model, x, freeze_bn)
    (F.cross_entropy(logits2, y, reduction="none") * weights).mean().backward()
    with torch.no_grad():
        for p, o in zip(params, old):
            p.copy_(o)
    sgd.step()


def reference_imbsam_step(model, sgd, crit, x, y, rho, threshold=20):
    """The official ImbSAM step (cool-xuan/Imbalanced_SAM): head gradient kept, SAM on the
    tail loss ×2/B, both summed after the restore."""
    tail = torch.tensor(COUNTS)[y] < threshold
    sgd.zero_grad()
    features, logits = model(x)
    crit(features, logits, y)
    w = crit.last_weights
    losses = F.cross_entropy(logits, y, reduction="none") * w
    (losses * ~tail).sum().div(len(y)).backward(retain_graph=True)
    g_head = [p.grad.clone() for p in model.parameters()]
    sgd.zero_grad()
    (2 * (losses * tail).sum() / len(y)).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())) + 1e-16
    old = params_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rho * p.grad / norm)
    sgd.zero_grad()
    _, logits2 = second_forward(model, x)
    (2 * (F.cross_entropy(logits2, y, reduction="none") * w * tail).sum() / len(y)).backward()
    with torch.no_grad():
        for p, o, gh in zip(model.parameters(), old, g_head):
            p.copy_(o)
            p.grad.add_(gh)
    sgd.step()


def reference_ccsam_step(model, sgd, crit, x, y, rho, flat_ratio=0.5):
    """CC-SAM stage 1 with the official per-class loop: per class, autograd the class loss
    w.r.t. the classifier, perturb each tensor by its radius, score the class's samples."""
    sgd.zero_grad()
    features, logits = model(x)
    loss = crit(features, logits, y)
    w = crit.last_weights
    ell = F.cross_entropy(logits, y, reduction="none") * w
    cls = list(model.fc.parameters())
    numel = sum(p.numel() for p in cls)
    flat = torch.zeros(len(y), dtype=logits.dtype)
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        grads = torch.autograd.grad(ell[idx].mean(), cls, retain_graph=True)
        noisy = []
        for p, gc in zip(cls, grads):
            r = rho * p.detach().norm().sqrt() / gc.norm().sqrt() / 2 ** 0.5 / max(COUNTS[c] - 1, 1) ** 0.25 \
                / numel ** 0.25
            noisy.append(p + (r * numel ** 0.5 * gc / gc.norm()).detach())
        out = F.linear(features[idx], noisy[0], noisy[1])
        flat[idx] = F.cross_entropy(out, y[idx], reduction="none") * w[idx]
    ((1 - flat_ratio) * loss + flat_ratio * flat.mean()).backward()
    sgd.step()


CASES = {"sam": ("sam", {}, reference_sam_step),
         "sam-bn-updated": ("sam", {"freeze_bn": False}, partial(reference_sam_step, freeze_bn=False)),
         "imbsam": ("imbsam", {}, reference_imbsam_step),
         "ccsam": ("ccsam", {}, reference_ccsam_step)}


@pytest.mark.parametrize("reweight", ["none", "rdr"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_equals_hand_written_reference(case, reweight):
    name, kwargs, reference = CASES[case]
    model, crit, x, y = setup(reweight)
    ref_model, ref_crit = copy.deepcopy(model), copy.deepcopy(crit)
    opt = make(name, model, **kwargs)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for _ in range(3):   # momentum and weight decay at the unperturbed point
        train_step(opt, model, crit, x, y)
        reference(ref_model, ref_sgd, ref_crit, x, y, RHO)
    assert_same(params_of(model), params_of(ref_model))
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model.body[1], buf), getattr(ref_model.body[1], buf))
    torch.testing.assert_close(crit.prototypes, ref_crit.prototypes)


def naive_sam_step(model, sgd, crit, x, y, rho):
    """davda54/sam's per-parameter loop (float32), for the bit-for-bit comparison."""
    sgd.zero_grad()
    features, logits = model(x)
    crit(features, logits, y).backward()
    weights = crit.last_weights
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    scale = rho / (grad_norm + 1e-12)
    old = {}
    with torch.no_grad():
        for p in params:
            old[p] = p.data.clone()
            p.add_(p.grad * scale)
    sgd.zero_grad()
    _, logits2 = second_forward(model, x)
    functional.weighted_loss(logits2, y, weights).backward()
    for p in params:
        p.data = old[p]
    sgd.step()


def test_fused_sam_is_bit_identical_to_naive_loop():
    model, crit, x, y = setup()
    model, crit, x = model.float(), crit.float(), x.float()
    ref_model, ref_crit = copy.deepcopy(model), copy.deepcopy(crit)
    opt = make("sam", model)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for _ in range(2):
        train_step(opt, model, crit, x, y)
        naive_sam_step(ref_model, ref_sgd, ref_crit, x, y, RHO)
    assert_same(params_of(model), params_of(ref_model), exact=True)


def test_rdr_sam_reuses_first_pass_weights_and_updates_prototypes_once(monkeypatch):
    model, crit, x, y = setup("rdr")
    before_model, before_crit = copy.deepcopy(model), copy.deepcopy(crit)
    seen_weights = []

    def spy(real_op):
        def loss(logits, labels, weights, *args, **kwargs):
            seen_weights.append(weights.clone())
            return real_op(logits, labels, weights, *args, **kwargs)
        return loss
    # Every weighted loss goes through this one: RDRLoss.forward's (the first pass, its
    # inputs checked up front) and loss_from_weights' (the second pass).
    monkeypatch.setattr(functional, "loss_from_weights_unchecked", spy(functional.loss_from_weights_unchecked))
    opt = make("sam", model)
    step0 = int(crit.step)
    train_step(opt, model, crit, x, y)
    assert len(seen_weights) == 2                            # one loss per pass
    assert torch.equal(seen_weights[0], seen_weights[1])
    assert torch.equal(seen_weights[1], crit.last_weights)
    assert not torch.allclose(seen_weights[0], torch.ones_like(seen_weights[0]))   # real RDR weights
    assert int(crit.step) == step0 + 1
    # The prototypes moved exactly as one update from the unperturbed features would.
    features, logits = before_model(x)
    before_crit(features, logits, y)
    assert torch.equal(crit.prototypes, before_crit.prototypes)
    assert torch.equal(crit.seen, before_crit.seen)


def test_bn_running_stats_only_change_in_first_pass():
    model, crit, x, y = setup()
    probe = copy.deepcopy(model)
    probe(x)                                                  # one train-mode forward at w
    bn, expect = model.body[1], probe.body[1]
    train_step(make("sam", model), model, crit, x, y)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(expect, name)), name
    assert bn.track_running_stats

    model, crit, x, y = setup()
    train_step(make("sam", model, freeze_bn=False), model, crit, x, y)
    assert int(model.body[1].num_batches_tracked) == 2
    assert not torch.equal(model.body[1].running_mean, expect.running_mean)


# ----------------------------------------------------------------------------- cheap variants

def counting(model):
    calls = []

    def forward(x):
        calls.append(1)
        return model(x)
    return forward, calls


def test_sam_k_runs_sam_every_k_steps_and_sgd_between():
    model, crit, x, y = setup()
    sam_model, sam_crit = copy.deepcopy(model), copy.deepcopy(crit)
    opt = make("sam_k", model, k=3)
    forward, calls = counting(model)
    sam_opt = make("sam", sam_model)
    sgd_model, sgd_crit = copy.deepcopy(model), copy.deepcopy(crit)
    sgd = make("none", sgd_model)
    passes = []
    for step in range(6):
        n = len(calls)
        train_step(opt, forward, crit, x, y)
        passes.append(len(calls) - n)
        if step == 0:
            train_step(sam_opt, sam_model, sam_crit, x, y)
            assert_same(params_of(model), params_of(sam_model))
            sgd_model.load_state_dict(model.state_dict())
            sgd.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))
            sgd_crit.load_state_dict(crit.state_dict())
        elif step in (1, 2):
            train_step(sgd, sgd_model, sgd_crit, x, y)
            assert_same(params_of(model), params_of(sgd_model))
    assert passes == [2, 1, 1, 2, 1, 1]


def test_looksam_update_rule():
    model, crit, x, y = setup()
    k, alpha = 2, 0.7
    ref_model, ref_crit = copy.deepcopy(model), copy.deepcopy(crit)
    opt = make("looksam", model, k=k, alpha=alpha)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    # Step 0: a full SAM step; ĝ_v from g (at w) and g_s (at w + e), by hand.
    first_backward(ref_model, copy.deepcopy(ref_crit), x, y)
    g = [p.grad.clone() for p in ref_model.parameters()]
    ref_sgd.zero_grad()
    reference_sam_step(ref_model, ref_sgd, ref_crit, x, y, RHO)
    g_s = [p.grad.clone() for p in ref_model.parameters()]
    dot = sum((a * b).sum() for a, b in zip(g_s, g))
    g_sq = sum((b * b).sum() for b in g)
    g_v = [a - dot / g_sq * b for a, b in zip(g_s, g)]
    g_v_norm = torch.sqrt(sum((t * t).sum() for t in g_v))
    train_step(opt, model, crit, x, y)
    assert_same(params_of(model), params_of(ref_model))
    direction = [opt._direction[p] for p in model.parameters()]
    assert_same(direction, [t / g_v_norm for t in g_v])
    # Step 1: one pass; the update uses g + α‖g‖ĝ_v.
    forward, calls = counting(model)
    train_step(opt, forward, crit, x, y)
    assert len(calls) == 1
    ref_sgd.zero_grad()
    first_backward(ref_model, ref_crit, x, y)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref_model.parameters()))
    with torch.no_grad():
        for p, d in zip(ref_model.parameters(), direction):
            p.grad.add_(alpha * norm * d)
    ref_sgd.step()
    assert_same(params_of(model), params_of(ref_model))


# ----------------------------------------------------------------------------- ImbSAM

def test_imbsam_tail_split_and_tail_less_batch_is_sgd():
    model, crit, x, y = setup("none")
    opt = make("imbsam", model)
    assert opt.is_tail.tolist() == [c < 20 for c in COUNTS]
    y = y % 2                                                 # head classes only
    sgd_model, sgd_crit = copy.deepcopy(model), copy.deepcopy(crit)
    train_step(opt, model, crit, x, y)
    train_step(make("none", sgd_model), sgd_model, sgd_crit, x, y)
    assert_same(params_of(model), params_of(sgd_model))


@pytest.mark.parametrize("name", ["none", "sam", "asam", "imbsam", "ccsam", "sam_k", "looksam"])
def test_steps_read_no_device_value_on_the_host(name):
    """What lets bench/gpu_suite.py capture a whole SAM step in a CUDA graph (and keeps an
    eager GPU step from stalling): no variant's step waits for a device value; RDRLoss as
    on a GPU (validate=False, the default there). Two steps each: k-step variants choose
    SAM or SGD by a host counter, which is not a device read."""
    model, crit, x, y = setup()
    crit.validate = False
    opt = make(name, model, k=2)
    for _ in range(2):
        with HostReads() as mode:
            train_step(opt, model, crit, x, y)
        assert mode.reads == []


# ----------------------------------------------------------------------------- state, API

@pytest.mark.parametrize("name", ["sam", "asam", "imbsam", "ccsam", "sam_k", "looksam"])
def test_state_dict_round_trip_resumes_exactly(name):
    model, crit, x, y = setup()
    opt = make(name, model, k=2)
    for _ in range(3):
        train_step(opt, model, crit, x, y)
    state = copy.deepcopy(opt.state_dict())
    assert state["base"]["state"], "momentum buffers must be saved"
    model2, crit2 = copy.deepcopy(model), copy.deepcopy(crit)
    opt2 = make(name, model2, k=2)
    opt2.load_state_dict(state)
    for _ in range(3):
        train_step(opt, model, crit, x, y)
        train_step(opt2, model2, crit2, x, y)
    assert_same(params_of(model), params_of(model2), exact=True)
    with pytest.raises(ValueError):
        opt2.load_state_dict(opt.base_optimizer.state_dict())


def test_scheduler_and_base_optimizer_share_groups(recwarn):
    model, crit, x, y = setup()
    opt = make("looksam", model)
    assert opt.param_groups is opt.base_optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(opt, model, crit, x, y)
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == LR / 2
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_wraps_an_optimizer_instance_and_validates():
    model, crit, x, y = setup()
    opt = sam.SAM(None, torch.optim.SGD(model.parameters(), lr=LR), rho=RHO, model=model)
    train_step(opt, model, crit, x, y)
    with pytest.raises(ValueError, match="rho"):
        sam.SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=-1)
    with pytest.raises(ValueError, match="variant"):
        make("bogus", model)
    with pytest.raises(ValueError, match="closure"):
        first_backward(model, crit, x, y)
        opt.step()


def code_lines(path):
    """Lines of ``path`` that hold code or docstrings: not blank, not only a comment."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    return {line for t in tokens if t.type not in skip for line in range(t.start[0], t.end[0] + 1)}


def test_core_is_small_and_ccsam_is_no_weight_perturbing_sam():
    assert len(code_lines(Path(sam.core.__file__))) <= 150
    model = Tiny().double()
    ccsam = make("ccsam", model)
    assert isinstance(ccsam, sam.OptimizerWrapper) and not isinstance(ccsam, sam.SAM)
    assert not hasattr(ccsam, "restore")                      # it never moves the weights


class DuckCE:
    """A reweighting criterion that is not an RDRLoss: plain CE with unit weights."""

    last_weights = None

    def __call__(self, features, logits, targets):
        self.last_weights = torch.ones(len(targets), dtype=logits.dtype)
        return self.loss_from_weights(logits, targets, self.last_weights)

    def loss_from_weights(self, logits, targets, weights):
        return (F.cross_entropy(logits, targets, reduction="none") * weights).mean()


def test_optimizers_need_the_criterion_interface_not_rdrloss():
    for path in Path(sam.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("losses" in n or n == "RDRLoss" for n in names), (path.name, names)
    model, crit, x, y = setup("none")
    duck_model = copy.deepcopy(model)
    assert isinstance(DuckCE(), sam.ReweightingCriterion)
    train_step(make("imbsam", model), model, crit, x, y)
    train_step(make("imbsam", duck_model), duck_model, DuckCE(), x, y)
    assert_same(params_of(model), params_of(duck_model))
    with pytest.raises(TypeError, match="reweighting criterion"):
        train_step(make("ccsam", model), model, lambda f, logits, t: F.cross_entropy(logits, t), x, y)


def test_train_cli_with_sam_end_to_end_and_exact_resume(tmp_path):
    from rdr_fast import train
    flags = ["--epochs", "2", "--batch-size", "64", "--quiet", "--sam", "looksam", "--sam-k", "3", "--rho", "0.1"]
    straight = str(tmp_path / "straight")
    assert train.main(["--out", straight, *flags])["finished"]
    summary = json.load(open(os.path.join(straight, "summary.json")))
    assert summary["method"] == "rdr+ce+looksam"
    saved = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    assert set(saved["optimizer"]) == {"base", "sam"} and saved["optimizer"]["sam"]["sam_steps"] > 0
    # Interrupted after epoch 1 and resumed: the same weights (LookSAM's ĝ_v and step
    # counter are in the checkpoint; an epoch is not a multiple of k steps).
    resumed = str(tmp_path / "resumed")
    train.main(["--out", resumed, *flags, "--stop-after", "1"])
    assert train.main(["--resume", resumed, "--quiet"])["finished"]
    other = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)
    for key, value in saved["model"].items():
        assert torch.equal(value, other["model"][key]), key
