"""The custom ops: opcheck (schema, fake, autograd registration), gradcheck, torch.compile."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference, torch_impl
from rdr_fast.constants import RATIO_FLOOR, WEIGHT_MODES, weight_mode
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


def weights_kernel(backend: str):
    """The CPU kernel of ``rdr_weights_and_update`` of one backend, with the op's signature.
    "op" is what the op dispatches to on the CPU (C++ when rdr_fast._C is built); "triton"
    runs in Triton's interpreter."""
    if backend == "op":
        return torch.ops.rdr_fast.rdr_weights_and_update.default
    if backend == "torch":
        return torch_impl.rdr_weights_and_update_torch
    if backend == "reference":
        return reference.rdr_weights_and_update_ref
    pytest.importorskip("triton")
    from rdr_fast.kernels import rdr_weights_and_update_triton
    return rdr_weights_and_update_triton


WEIGHT_BACKENDS = ["op", "torch", "reference", "triton"]


def backend_id(backend: str) -> str:
    return f"op-{rdr_fast.backends()['rdr_weights_and_update']['cpu']}" if backend == "op" else backend


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS, ids=backend_id)
def test_every_backend_clamps_ratios_at_the_shared_floor(backend):
    """C++ and Triton repeat rdr_fast.constants.RATIO_FLOOR as a literal: an all-zero class
    (ratio 0, clamped) next to a class never seen (ratio 1) gives weights in the ratio
    RATIO_FLOOR : 1 on every backend."""
    features = torch.zeros(4, 3, dtype=torch.float64)
    features[2:] = torch.randn(2, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    protos, seen = torch.randn(2, 3, dtype=torch.float64), torch.tensor([True, False])
    weights = weights_kernel(backend)(features, labels, protos, seen, torch.ones(2, dtype=torch.float64), 1e-5,
                                      1.0, 0.9, "density_ratio", False)
    torch.testing.assert_close(weights[:2] / weights[2:], torch.full((2,), RATIO_FLOOR, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS, ids=backend_id)
def test_every_backend_refuses_an_unknown_mode_with_one_message(backend):
    protos, seen = torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError) as err:
        weights_kernel(backend)(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), protos, seen, torch.ones(2), 1e-5,
                                1.0, 0.9, "rdr", True)
    assert str(err.value) == f"rdr_weights_and_update: mode must be one of {WEIGHT_MODES}, got 'rdr'"
    assert not seen.any() and not protos.any(), "refused before any state change"


def test_triton_launchers_take_block_sizes():
    """Other block sizes (run in Triton's interpreter) give the same results as the
    defaults; malformed ones are refused by name."""
    pytest.importorskip("triton")
    from rdr_fast.kernels import rdr_weights_and_update_triton, weighted_loss_triton

    features, labels, protos, seen, *rest = weights_args()
    states = [(protos.clone(), seen.clone()) for _ in range(2)]
    default, blocked = (rdr_weights_and_update_triton(features, labels, *state, *rest, block_sizes=sizes)
                        for state, sizes in zip(states, (None, (32, 32, 1))))
    torch.testing.assert_close(blocked, default, rtol=1e-12, atol=0)
    torch.testing.assert_close(states[1][0], states[0][0], rtol=1e-12, atol=0)
    logits, labels = torch.randn(3, 600, dtype=torch.float64), torch.tensor([5, 300, 599])
    weights = torch.rand(3, dtype=torch.float64)
    default, chunked = (weighted_loss_triton(logits, labels, weights, None, 1.5, True, block_sizes=sizes)
                        for sizes in (None, (64, 1)))
    torch.testing.assert_close(chunked, default, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="block_sizes must be 2 positive powers of two"):
        weighted_loss_triton(logits, labels, weights, None, 0.0, True, block_sizes=(48, 1))
    with pytest.raises(ValueError, match="block_sizes must be 3 positive powers of two"):
        rdr_weights_and_update_triton(features, labels, protos, seen, *rest, block_sizes=(16, 16))


@pytest.mark.parametrize("reweight,warmup,mode", [
    ("rdr", False, "density_ratio"), ("inv_freq", False, "class_factor"), ("cb", False, "class_factor"),
    ("none", False, "uniform"), ("rdr", True, "uniform"), ("cb", True, "uniform")])
def test_weight_mode_of_each_reweighting(reweight, warmup, mode):
    assert weight_mode(reweight, warmup) == mode
    with pytest.raises(ValueError, match="reweight must be one of"):
        weight_mode("ldam")


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
