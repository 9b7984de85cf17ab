"""RDRLoss: the module API, its state and its errors."""
from __future__ import annotations

import io

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference as ref
from rdr_fast import torch_impl
from conftest import CPU_AND_CUDA, long_tail_counts, long_tail_labels

COUNTS = long_tail_counts(10)


def batches(steps, batch=64, dim=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        labels = long_tail_labels(batch, COUNTS, generator=g)
        yield (torch.randn(batch, dim, generator=g, dtype=dtype),
               torch.randn(batch, len(COUNTS), generator=g, dtype=dtype), labels)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("base", ["ce", "focal", "la"])
@pytest.mark.parametrize("reweight", ["rdr", "inv_freq", "cb", "none"])
def test_module_matches_reference_over_steps(base, reweight, device):
    """Loss, its gradient, weights and state over steps, on the device's registered
    kernels (C++ on the CPU when built, Triton on CUDA), against the CPU reference."""
    crit = rdr_fast.RDRLoss(COUNTS, 16, base=base, reweight=reweight, warmup_steps=2, tau=0.5,
                            focal_gamma=2.0, temperature=0.7).double().to(device)
    protos = torch.zeros(10, 16, dtype=torch.float64)
    seen = torch.zeros(10, dtype=torch.bool)
    tol = dict(rtol=1e-9, atol=1e-12)
    for step, (feats, logits, labels) in enumerate(batches(5)):
        x = logits.to(device, copy=True).requires_grad_(True)  # a leaf of its own, also on the CPU
        loss = crit(feats.to(device), x, labels.to(device))
        loss.backward()
        logits.requires_grad_(True)
        expected, w, protos, seen = ref.rdr_loss_ref(
            feats, logits, labels, protos, seen, COUNTS, base=base, reweight=reweight, tau=0.5,
            focal_gamma=2.0, temperature=0.7, warmup=step < 2)
        expected.backward()
        torch.testing.assert_close(loss.cpu(), expected.detach(), **tol)
        torch.testing.assert_close(x.grad.cpu(), logits.grad, **tol)
        torch.testing.assert_close(crit.last_weights.cpu(), w, **tol)
        torch.testing.assert_close(crit.prototypes.cpu(), protos, **tol)
        assert torch.equal(crit.seen.cpu(), seen)
    assert int(crit.step) == 5


def test_gradient_flows_to_logits_and_model_not_through_weights():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    feats = torch.randn(32, 16, requires_grad=True)
    logits = torch.randn(32, 10, requires_grad=True)
    crit(feats, logits, torch.randint(0, 10, (32,))).backward()
    assert logits.grad is not None and feats.grad is None
    assert crit.last_weights.requires_grad is False


def test_state_dict_round_trip_continues_identically():
    steps = list(batches(6, dtype=torch.float32))
    straight = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    losses = [straight(*b) for b in steps]
    first = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    for b in steps[:3]:
        first(*b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = rdr_fast.RDRLoss(COUNTS, 16, warmup_steps=1)
    resumed.load_state_dict(torch.load(buffer))
    assert set(resumed.state_dict()) == {"prototypes", "seen", "step", "class_counts"}
    for b, expected in zip(steps[3:], losses[3:]):
        assert torch.equal(resumed(*b), expected)
    assert torch.equal(resumed.prototypes, straight.prototypes)


def test_eval_mode_changes_no_state():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    feats, logits, labels = next(batches(1, dtype=torch.float32))
    crit(feats, logits, labels)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.eval()
    with torch.no_grad():
        crit(feats * 2, logits, labels)
    for key, value in crit.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert crit.last_weights is not None and crit.last_weights.shape == (64,)


def test_mismatched_checkpoint_is_refused():
    crit = rdr_fast.RDRLoss(COUNTS, 16)
    other = rdr_fast.RDRLoss(COUNTS[:-1] + [2], 16)
    with pytest.raises(ValueError, match="class_counts"):
        other.load_state_dict(crit.state_dict())


def test_to_device_moves_state():
    crit = rdr_fast.RDRLoss(COUNTS, 16).to("meta")
    assert crit.prototypes.device.type == "meta" and crit.class_factors.device.type == "meta"


GOOD = dict(feats=torch.randn(8, 16), logits=torch.randn(8, 10), labels=torch.randint(0, 10, (8,)))


def test_validate_false_skips_data_checks_only():
    crit = rdr_fast.RDRLoss(COUNTS, 16, validate=False)
    feats = GOOD["feats"].clone()
    feats[0, 0] = float("nan")
    crit(feats, GOOD["logits"], GOOD["labels"])  # no data check: no error
    with pytest.raises(ValueError, match="width"):
        crit(torch.randn(8, 3), GOOD["logits"], GOOD["labels"])


_TRAIN_SCRIPT = r"""
import json, torch, rdr_fast
from rdr_fast import ops, reference as ref
counts = [40, 20, 6, 2]
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU()).double()
head = torch.nn.Linear(5, 4).double()
twin_net, twin_head = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU()).double(),
                       torch.nn.Linear(5, 4).double()]
twin_net.load_state_dict(net.state_dict()); twin_head.load_state_dict(head.state_dict())
params = [*net.parameters(), *head.parameters()]
twin_params = [*twin_net.parameters(), *twin_head.parameters()]
crit = rdr_fast.RDRLoss(counts, 5, base="focal", focal_gamma=2.0, temperature=0.7).double()
protos, seen = torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.bool)
losses, grad_norms = [], []
for step in range(3):
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    features = net(x)
    loss = crit(features, head(features), y)
    loss.backward()
    twin_features = twin_net(x)
    expected, _, protos, seen = ref.rdr_loss_ref(twin_features, twin_head(twin_features), y, protos, seen, counts,
                                                 base="focal", focal_gamma=2.0, temperature=0.7)
    expected.backward()
    losses.append(abs(loss.item() - expected.item()))
    grad_norms.append(max((p.grad - q.grad).abs().max().item() for p, q in zip(params, twin_params)))
    for p, q in zip(params, twin_params):
        with torch.no_grad():
            p -= 0.1 * p.grad; q -= 0.1 * q.grad
        p.grad = q.grad = None
# Double backward: the Hessian-vector product of the loss in the logits, against plain torch.
logits = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
feats, y, v = torch.randn(4, 5, dtype=torch.float64), torch.arange(4), torch.randn(4, 4, dtype=torch.float64)
(grad,) = torch.autograd.grad(crit(feats, logits, y), logits, create_graph=True)
(hvp,) = torch.autograd.grad(grad, logits, grad_outputs=v)
w = crit.last_weights
def plain(z):
    log_pt = torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0]
    return (w * -(1 - log_pt.exp()) ** 2.0 * log_pt).sum() / 4
(plain_grad,) = torch.autograd.grad(plain(logits), logits, create_graph=True)
(plain_hvp,) = torch.autograd.grad(plain_grad, logits, grad_outputs=v)
double_error = (hvp - plain_hvp).abs().max().item()
print(json.dumps(dict(backends=rdr_fast.backends(), loss_error=max(losses), grad_error=max(grad_norms),
                      prototypes=bool(crit.seen.any()),
                      double_error=double_error)))
"""


IMPLS = ["auto", "torch", "reference"]


@pytest.fixture(scope="module")
def training_runs():
    """_TRAIN_SCRIPT under each RDR_FAST_IMPL, the three processes started at once."""
    import os
    import subprocess
    import sys

    runs = {impl: subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "RDR_FAST_IMPL": impl})
            for impl in IMPLS}
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.mark.parametrize("impl", IMPLS)
def test_every_backend_trains(impl, training_runs):
    """Forward and backward through RDRLoss under each RDR_FAST_IMPL (chosen at import, so
    in a fresh process): three SGD steps of a small network equal the same steps through
    the reference loss, and a Hessian-vector product in the logits equals plain torch's
    (the C++ autograd under auto when rdr_fast._C is built, the Python one else)."""
    import json

    stdout, stderr = training_runs[impl].communicate(timeout=300)
    assert training_runs[impl].returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    expected_cpu = {"torch": "torch", "reference": "reference"}.get(
        impl, rdr_fast.backends()["weighted_loss"]["cpu"] if rdr_fast.ops.IMPL == "auto" else None)
    for devices in report["backends"].values():
        assert devices["cpu"] == expected_cpu or (expected_cpu is None and devices["cpu"] in ("cpp", "torch"))
    assert report["loss_error"] < 1e-12 and report["grad_error"] < 1e-12
    assert report["prototypes"]
    assert report["double_error"] < 1e-12


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
def test_reductions_are_the_mean_its_sum_and_its_terms(base):
    counts = [40, 20, 10, 5]
    feats, logits, y = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64), \
        torch.randint(0, 4, (12,))
    crits = {r: rdr_fast.RDRLoss(counts, 6, base=base, reduction=r).double() for r in ("mean", "sum", "none")}
    for crit in crits.values():
        crit(feats, logits, y)  # one step each: the same prototypes, so the same weights
    z = logits.clone().requires_grad_(True)
    got = {r: crit(feats, z, y) for r, crit in crits.items()}
    assert got["none"].shape == (12,)
    torch.testing.assert_close(got["none"].sum() / 12, got["mean"], rtol=1e-12, atol=0)
    torch.testing.assert_close(got["sum"], 12 * got["mean"], rtol=1e-12, atol=0)
    (grad_none,) = torch.autograd.grad(got["none"].sum(), z)
    (grad_sum,) = torch.autograd.grad(got["sum"], z)
    torch.testing.assert_close(grad_none, grad_sum, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reweight", ["inv_freq", "cb", "none"])
def test_features_may_be_none_where_the_weights_do_not_use_them(reweight):
    counts = [40, 20, 10, 5]
    feats, logits, y = torch.randn(12, 6), torch.randn(12, 4), torch.randint(0, 4, (12,))
    with_feats, without = rdr_fast.RDRLoss(counts, 6, reweight=reweight), rdr_fast.RDRLoss(counts, 6, reweight=reweight)
    torch.testing.assert_close(without(None, logits, y), with_feats(feats, logits, y), rtol=0, atol=0)
    torch.testing.assert_close(without.last_weights, with_feats.last_weights, rtol=0, atol=0)
    assert not without.seen.any() and with_feats.seen.any()  # no features, nothing to update


def test_rdr_without_features_and_an_unknown_reduction_are_refused_by_name():
    with pytest.raises(ValueError, match="features: reweight='rdr' needs the features"):
        rdr_fast.RDRLoss([4, 2], 3)(None, torch.randn(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        rdr_fast.RDRLoss([4, 2], 3, reduction="avg")


def bytes_allocated(fn) -> int:
    """CPU bytes that the ops run by ``fn`` allocate (torch.profiler's memory accounting of
    the outermost ops, which includes what their inner ops allocate)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.cpu_memory_usage, 0) for event in prof.events() if event.cpu_parent is None)


def test_a_step_with_many_classes_allocates_nothing_of_the_prototypes_size():
    """C = 100 000 classes, K = 64: a training step (default arguments, so with the data
    checks) touches only the batch's prototype rows. Its allocations are the logits'
    gradient [B, C] and O(B·K) scratch, far below the C·K prototype matrix: no copy of
    the state, no full-state check. The functional op (also on bf16 prototypes) and the
    PyTorch path likewise."""
    num_classes, dim, batch = 100_000, 64, 8
    state_bytes = num_classes * dim * 4
    crit = rdr_fast.RDRLoss(torch.ones(num_classes, dtype=torch.long), dim)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, dim, generator=g)
    logits = torch.randn(batch, num_classes, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    crit(features, logits, labels).backward()  # the classes of the batch are seen from now on

    def step():
        logits.grad = None
        crit(features, logits, labels).backward()
    assert bytes_allocated(step) < logits.numel() * 4 + state_bytes // 8
    protos, seen = crit.prototypes.clone(), crit.seen.clone()
    factors = crit.class_factors
    assert bytes_allocated(lambda: Fn.rdr_weights_and_update(features, labels, protos, seen, crit.class_counts)) \
        < state_bytes // 4  # the class factors, O(C), are made per call
    half_state = protos.bfloat16()  # computed on through a float copy of the batch's rows only
    assert bytes_allocated(lambda: Fn.rdr_weights_and_update(features, labels, half_state, seen, crit.class_counts,
                                                             validate=False)) < state_bytes // 4
    assert bytes_allocated(lambda: torch_impl.rdr_weights_and_update_torch(
        features, labels, protos, seen, factors, 1e-5, 1.0, 0.9, "density_ratio", True)) < state_bytes // 8
