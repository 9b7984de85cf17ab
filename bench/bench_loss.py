"""Weighted loss forward + backward: the unfused PyTorch expression
(F.cross_entropy(reduction="none") * w).mean() vs the fused op on the PyTorch path, in C++
(CPU) and in Triton (CUDA), per shape and device.

The `module` groups time the whole criterion, forward + backward into given features and
logits: F.cross_entropy (`ce`), RDRLoss with default arguments (`rdr`: weights, prototype
update, weighted CE, data checks on the CPU) and with validate=False (the authors'
structure against the same RDRLoss is bench_weights.py's `weights+update+loss` group).
test_module_paired times RDRLoss against
F.cross_entropy in alternating pairs and reports the median per-pair ratios, which
summarize.py checks (≤ 1.5 at the first shape).

Then what autograd costs around the op (the ``loss/autograd/...`` groups), on the device's
own backend: ``kernel`` runs the op's kernel below autograd and sets the gradient it
computed as ``logits.grad`` (no graph, no backward: the least training could do);
``op`` is training's ``torch.ops.rdr_fast.weighted_loss`` + ``loss.backward()``, which
replays that saved gradient; ``op create_graph`` takes the gradient with
``create_graph=True`` (the double-backward path of rdr_fast.analysis, recomputed by
differentiable torch ops), for reference. ``test_op_vs_kernel_paired`` times ``op`` against
``kernel`` in alternating pairs and records the median ratio (``op_vs_kernel``), which
summarize.py checks: the support for double backward must leave training's backward as
cheap as it was, i.e. within autograd's fixed per-call overhead of the bare kernel.

Run: pytest bench/bench_loss.py --benchmark-only --benchmark-group-by=group
(BENCH_LOSS_PAIRS: pairs of the op/kernel ratio, default 30; the module rows as measured
in bench/README.md: OMP_NUM_THREADS=1 and -k module)
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import rdr_fast
from rdr_fast import kernels
from rdr_fast import torch_impl
from conftest import CPU_AND_CUDA, SMOKE, long_tail_batch, median_paired_ratio, seconds_per_call, shape_id, timed

SHAPES = [(8, 10), (4, 300)] if SMOKE else [(256, 1000), (128, 100)]
HAS_CPP = rdr_fast.backends()["weighted_loss"]["cpu"] == "cpp"
PAIRS = 1 if SMOKE else int(os.environ.get("BENCH_LOSS_PAIRS", "30"))


class SavedGradLoss(torch.autograd.Function):
    """A fused loss+gradient kernel with the op's backward (rescale the saved gradient)."""

    @staticmethod
    def forward(ctx, fused, logits, labels, weights):
        loss, grad = fused(logits, labels, weights, None, 0.0, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return None, grad * grad_loss, None, None


def unfused(logits, labels, weights):
    return (F.cross_entropy(logits, labels, reduction="none") * weights).mean()


def fused_torch(logits, labels, weights):
    return SavedGradLoss.apply(torch_impl.weighted_loss_torch, logits, labels, weights)


def fused_cpp(logits, labels, weights):
    return torch.ops.rdr_fast.weighted_loss(logits, labels, weights, None, 0.0, True)[0]


def fused_triton(logits, labels, weights):
    return SavedGradLoss.apply(kernels.weighted_loss_triton, logits, labels, weights)


IMPLS = {"unfused": unfused, "torch": fused_torch, "cpp": fused_cpp, "triton": fused_triton}


def skip_unless_available(impl: str, device: str) -> None:
    if impl == "cpp" and (device != "cpu" or not HAS_CPP):
        pytest.skip("the C++ kernel is a CPU kernel" if HAS_CPP else "rdr_fast._C is not built")
    if impl == "triton" and not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    if impl == "triton" and device == "cpu" and not SMOKE:
        pytest.skip("on CPU tensors the Triton launcher runs Triton's interpreter (BENCH_SMOKE=1 runs it)")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}".format(*s))
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_loss_forward_backward(benchmark, device, shape, impl):
    skip_unless_available(impl, device)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g).mul_(3).to(device).requires_grad_(True)
    labels = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
    weights = (torch.rand(shape[0], generator=g) + 0.5).to(device)
    benchmark.group = "loss/fwd+bwd/{}/float32/B{}-C{}".format(device, *shape)
    benchmark.extra_info.update(backend=impl, device=device)

    def step():
        logits.grad = None  # no accumulation pass: every provider writes a fresh gradient
        loss = IMPLS[impl](logits, labels, weights)
        loss.backward()
        return loss

    loss = step().detach()
    grad = logits.grad.clone()
    logits.grad = None
    unfused(logits, labels, weights).backward()
    torch.testing.assert_close(loss, unfused(logits, labels, weights).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)
    benchmark(timed(step, device))


MODULE_SHAPES = [(8, 10, 4), (16, 100, 8)] if SMOKE else [(128, 100, 64), (256, 1000, 512)]
CRITERIA = {"ce": None, "rdr": {}, "rdr validate=False": {"validate": False}}


def module_step(name: str, shape, device: str):
    """One forward + backward of criterion ``name`` on a fixed long-tailed batch, every class
    already seen (the steady state), as the benchmark times it."""
    features, labels, protos, seen, counts = long_tail_batch(*shape, device=device)
    features.requires_grad_(True)
    logits = (3 * torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1))).to(device)
    logits.requires_grad_(True)
    if name == "ce":
        def criterion(f, x, y):
            return F.cross_entropy(x, y)
    else:
        module = rdr_fast.RDRLoss(counts, shape[2], **CRITERIA[name]).to(device)
        module.prototypes.copy_(protos)
        module.seen.fill_(True)
        criterion = module

    def step():
        logits.grad = features.grad = None
        criterion(features, logits, labels).backward()
    return timed(step, device)


@pytest.mark.parametrize("name", list(CRITERIA))
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_module_forward_backward(benchmark, device, shape, name):
    benchmark.group = f"module/fwd+bwd/{device}/float32/{shape_id(shape)}"
    benchmark.extra_info.update(backend=name, device=device, shape=list(shape))
    step = module_step(name, shape, device)
    step()
    benchmark(step)


@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_module_paired(benchmark, device, shape):
    """RDRLoss (default arguments, and validate=False) / F.cross_entropy, forward + backward:
    median of per-pair ratios, each unit 20 calls (one in smoke runs) of one criterion."""
    benchmark.group = f"module/fwd+bwd/{device}/float32/{shape_id(shape)}/paired"
    benchmark.extra_info.update(backend="rdr / ce (alternated)", device=device, shape=list(shape))
    steps = {name: module_step(name, shape, device) for name in ("ce", "rdr", "rdr validate=False")}
    calls, pairs = (1, 3) if SMOKE else (20, 200)

    def unit(name):
        return lambda: seconds_per_call(steps[name], calls)

    def measure():
        for name, key in (("rdr", "rdr_vs_ce"), ("rdr validate=False", "rdr_unchecked_vs_ce")):
            benchmark.extra_info[key] = median_paired_ratio(unit(name), unit("ce"), pairs)
    benchmark.pedantic(measure, rounds=1, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------- autograd's cost

def kernel_no_autograd(logits, labels, weights):
    """The op's device kernel called below the Autograd key, its gradient set as logits.grad."""
    with torch._C._AutoDispatchBelowAutograd():
        loss, grad = torch.ops.rdr_fast.weighted_loss(logits, labels, weights, None, 0.0, True)
    logits.grad = grad
    return loss


def op_backward(logits, labels, weights):
    loss = torch.ops.rdr_fast.weighted_loss(logits, labels, weights, None, 0.0, True)[0]
    loss.backward()
    return loss


def op_create_graph(logits, labels, weights):
    loss = torch.ops.rdr_fast.weighted_loss(logits, labels, weights, None, 0.0, True)[0]
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    logits.grad = grad.detach()  # a graph kept in logits.grad would hold logits itself: a cycle
    return loss


AUTOGRAD_PATHS = {"kernel": kernel_no_autograd, "op": op_backward, "op create_graph": op_create_graph}


def autograd_step(path, device, shape):
    """(step, logits, reference gradient): one call of ``path`` on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g).mul_(3).to(device).requires_grad_(True)
    labels = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
    weights = (torch.rand(shape[0], generator=g) + 0.5).to(device)
    (expected,) = torch.autograd.grad(unfused(logits, labels, weights), logits)

    def step():
        logits.grad = None
        return AUTOGRAD_PATHS[path](logits, labels, weights)
    return step, logits, expected


@pytest.mark.parametrize("path", list(AUTOGRAD_PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}".format(*s))
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_loss_autograd_cost(benchmark, device, shape, path):
    step, logits, expected = autograd_step(path, device, shape)
    step()
    torch.testing.assert_close(logits.grad.detach(), expected, rtol=1e-5, atol=1e-7)
    benchmark.group = "loss/autograd/{}/float32/B{}-C{}".format(device, *shape)
    benchmark.extra_info.update(backend=path, device=device, shape=list(shape))
    benchmark(timed(step, device))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}".format(*s))
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_op_vs_kernel_paired(benchmark, device, shape):
    """``op`` / ``kernel`` as the median of PAIRS alternating, adjacent timings of 50 calls
    each (conftest.median_paired_ratio), recorded in extra_info."""
    steps = {path: timed(autograd_step(path, device, shape)[0], device) for path in ("op", "kernel")}
    calls = 1 if SMOKE else 50
    ratio = median_paired_ratio(lambda: seconds_per_call(steps["op"], calls),
                                lambda: seconds_per_call(steps["kernel"], calls), PAIRS)
    benchmark.group = "loss/autograd/{}/float32/B{}-C{}/paired".format(device, *shape)
    benchmark.extra_info.update(device=device, shape=list(shape), op_vs_kernel=ratio,
                                kernel_s_per_call=seconds_per_call(steps["kernel"], calls))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
