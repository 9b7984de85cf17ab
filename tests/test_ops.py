"""The custom ops: opcheck (schema, fake, autograd registration), gradcheck, torch.compile,
the functional API's mapping onto them. Every backend against the reference: test_backends.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference, torch_impl
from backends import TOL
from conftest import CPU_AND_CUDA, long_tail_counts, long_tail_labels


def weights_args(dtype=torch.float64, batch=24, num_classes=6, dim=8):
    counts = long_tail_counts(num_classes)
    labels = long_tail_labels(batch, counts)
    return (torch.randn(batch, dim, dtype=dtype), labels, torch.randn(num_classes, dim, dtype=dtype),
            torch.rand(num_classes) < 0.7, Fn.class_factors(counts), 1e-5, 1.0, 0.9, "density_ratio", True)


def loss_args(dtype=torch.float64, requires_grad=True, adjust=False, gamma=0.0):
    logits = torch.randn(12, 5, dtype=dtype, requires_grad=requires_grad)
    log_prior = Fn.log_prior([50, 20, 9, 4, 1]) if adjust else None
    return (logits, torch.randint(0, 5, (12,)), torch.rand(12, dtype=dtype) + 0.5, log_prior, gamma,
            requires_grad)


def on(device, args):
    """The op arguments with every tensor moved to ``device`` (leaves keep requires_grad)."""
    return tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_weights_and_update(dtype, device):
    torch.library.opcheck(torch.ops.rdr_fast.rdr_weights_and_update.default, on(device, weights_args(dtype)))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("adjust,gamma", [(False, 0.0), (True, 0.0), (False, 2.0)])
def test_opcheck_weighted_loss(requires_grad, adjust, gamma, device):
    torch.library.opcheck(torch.ops.rdr_fast.weighted_loss.default,
                          on(device, loss_args(requires_grad=requires_grad, adjust=adjust, gamma=gamma)))


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
def test_gradcheck_weighted_loss(base):
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels, weights = torch.randint(0, 4, (6,)), torch.rand(6, dtype=torch.float64) + 0.5

    def fn(x):
        return Fn.weighted_loss(x, labels, weights, base=base, class_counts=[30, 10, 3, 1], focal_gamma=1.5)
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("reweight,warmup", [("rdr", False), ("inv_freq", False), ("cb", False), ("none", False),
                                            ("rdr", True)])
def test_functional_weights_follow_the_reference(make_batch, reweight, warmup):
    """rdr_fast.functional maps a reweighting (and warm-up) onto the op's class factors and
    mode: the weights and the updated state are the reference step's."""
    features, labels, protos, seen, counts = make_batch(48, 6, 8)
    p, s = protos.clone(), seen.clone()
    weights = Fn.rdr_weights_and_update(features, labels, p, s, counts, reweight=reweight, temperature=0.5,
                                        warmup=warmup)
    _, expected, expected_p, expected_s = reference.rdr_loss_ref(
        features, torch.zeros(48, 6, dtype=torch.float64), labels, protos, seen, counts, reweight=reweight,
        temperature=0.5, warmup=warmup)
    torch.testing.assert_close(weights, expected, **TOL[torch.float64])
    torch.testing.assert_close(p, expected_p, **TOL[torch.float64])
    assert torch.equal(s, expected_s)


def test_functional_density_ratios_follow_the_reference_and_change_no_state(make_batch):
    features, labels, protos, seen, _ = make_batch(48, 6, 8, seen_fraction=0.5)
    p, s = protos.clone(), seen.clone()
    torch.testing.assert_close(Fn.density_ratios(features, labels, p, s),
                               reference.density_ratios_ref(features, labels, protos, seen), **TOL[torch.float64])
    assert torch.equal(p, protos) and torch.equal(s, seen)


def test_an_unknown_reweighting_is_refused_by_name(make_batch):
    features, labels, protos, seen, counts = make_batch(8, 3, 4)
    with pytest.raises(ValueError, match="reweight must be one of"):
        Fn.rdr_weights_and_update(features, labels, protos, seen, counts, reweight="ldam")


@pytest.mark.parametrize("base", ["ce", "focal", "la"])
def test_functional_loss_and_its_gradient_follow_the_reference(base):
    """rdr_fast.functional maps a base loss onto the op's adjust and focal γ, and autograd
    replays the op's gradient."""
    counts = [100, 40, 10, 3, 1]
    logits = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    labels, weights = torch.randint(0, 5, (20,)), torch.rand(20, dtype=torch.float64) + 0.1
    loss = Fn.weighted_loss(logits, labels, weights, base=base, class_counts=counts, tau=0.8, focal_gamma=1.5)
    loss.backward()
    x = logits.detach().clone().requires_grad_(True)
    expected = (weights * reference.per_sample_loss_ref(x, labels, base, counts, tau=0.8, focal_gamma=1.5)).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOL[torch.float64])
    torch.testing.assert_close(logits.grad, x.grad, **TOL[torch.float64])


def test_no_gradient_is_computed_without_autograd():
    logits = torch.randn(8, 3)
    loss = Fn.weighted_loss(logits, torch.randint(0, 3, (8,)), torch.ones(8))
    assert not loss.requires_grad


def test_backends_are_reported():
    backends = rdr_fast.backends()
    assert set(backends) == {"rdr_weights_and_update", "weighted_loss"}
    for devices in backends.values():
        assert devices["cpu"] in {"cpp", "torch", "reference"}


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    counts = long_tail_counts(10)
    model = torch.nn.Linear(16, 10)
    features = torch.randn(32, 16)
    labels = long_tail_labels(32, counts)

    def forward(crit, linear):
        return crit(features, linear(features), labels)

    def step(crit, linear, fwd):
        loss = fwd(crit, linear)
        loss.backward()  # dynamo does not trace .backward(); the compiled graph has its own
        return loss.detach()

    eager_crit = rdr_fast.RDRLoss(counts, 16, warmup_steps=1, validate=False)
    compiled_crit = rdr_fast.RDRLoss(counts, 16, warmup_steps=1, validate=False)
    eager_model = model
    compiled_model = torch.nn.Linear(16, 10)
    compiled_model.load_state_dict(model.state_dict())
    compiled_forward = torch.compile(forward, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        expected = step(eager_crit, eager_model, forward)
        got = step(compiled_crit, compiled_model, compiled_forward)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_crit.prototypes, eager_crit.prototypes)
    torch.testing.assert_close(compiled_model.weight.grad, eager_model.weight.grad)
    assert int(compiled_crit.step) == 3


def test_missing_cpp_kernels_warn_once_and_fall_back_to_the_torch_path():
    """Without rdr_fast._C (blocked here via sys.modules): one warning at import, none per call."""
    code = (
        "import sys, warnings; sys.modules['rdr_fast._C'] = None; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import rdr_fast, torch\n"
        "    crit = rdr_fast.RDRLoss([5, 3, 1], 4)\n"
        "    for _ in range(3): crit(torch.randn(6, 4), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 0]))\n"
        "print(sorted({d['cpu'] for d in rdr_fast.backends().values()}), sum('C++' in str(w.message) for w in caught))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RDR_FAST_IMPL": "auto", "RDR_FAST_JIT": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['torch'] 1"


@pytest.mark.parametrize("shape", [(128, 100, 64), (96, 4, 8)], ids=["one-KxK-slot", "many-KxK-slots"])
def test_torch_path_traces_without_graph_breaks(shape):
    """The PyTorch path (the GPU fallback) has no host sync and no data-dependent shape:
    torch.compile(fullgraph=True) traces it whole, and the traced run equals eager,
    prototype update included."""
    batch, num_classes, dim = shape
    counts = long_tail_counts(num_classes)
    labels = long_tail_labels(batch, counts)
    features = torch.randn(batch, dim).relu()
    factors = Fn.class_factors(counts)

    def step(protos, seen):
        return torch_impl.rdr_weights_and_update_torch(features, labels, protos, seen, factors, 1e-5, 1.0, 0.9,
                                                       "density_ratio", True)
    state = [torch.randn(num_classes, dim), torch.rand(num_classes) < 0.8]
    compiled_state = [t.clone() for t in state]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(*compiled_state), step(*state), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_state[0], state[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled_state[1], state[1])
