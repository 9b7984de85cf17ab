"""Density-ratio weights + prototype update: the per-class reference loop, the authors'
structure (bench/official.py), the PyTorch path, the C++ kernel (CPU) and the Triton
kernel (CUDA), side by side per (B, C, K) and device. Every implementation is called with
the op's signature (reweight "rdr": mode "density_ratio") and first checked against the
reference on the same inputs. On CUDA the Triton kernel is also timed with other block
sizes (its launcher's ``block_sizes``).

A second group times a whole RDR loss, weights + update + weighted CE forward and
backward into the logits: the authors' structure (``OfficialRDR``) against
``RDRLoss(counts, K)`` with its default arguments, checked equal first.

Run: pytest bench/bench_weights.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import kernels
from rdr_fast import reference as ref
from rdr_fast import torch_impl
from rdr_fast.constants import DEFAULT_RIDGE, weight_mode
from conftest import CPU_AND_CUDA, SMOKE, WEIGHT_SHAPES, long_tail_batch, shape_id, timed
from official import OfficialRDR

HAS_CPP = rdr_fast.backends()["rdr_weights_and_update"]["cpu"] == "cpp"
MODE = weight_mode("rdr")
# (BS, BK, num_warps) tried besides the launcher's default (16, 32, 4 on a GPU).
BLOCK_SIZES = [(16, 64, 4), (32, 32, 4), (16, 32, 2)]


def reference_on(device):
    """The reference loop, its own tensors (torch.ones, torch.eye...) created on ``device``."""
    def run(*args):
        with torch.device(device):
            return ref.rdr_weights_and_update_ref(*args)
    return run


def official_kernel(counts, protos):
    """The authors' structure with the op's signature. Its state is its own: prototypes
    [K, C] made from ``protos`` once here, outside the timing, and every class met (the
    steady state, as ``long_tail_batch`` sets ``seen``); the state arguments are ignored."""
    state = OfficialRDR(counts, protos.shape[1], device=protos.device)
    state.prototypes.copy_(protos.T)
    state.labels_met.update(range(len(counts)))

    def run(features, labels, prototypes, seen, class_factors, ridge, temperature, momentum, mode, update):
        return state.weights_and_update(features, labels)
    return run


def comparable_to_official(labels, dim: int) -> bool:
    """Whether the authors' b_c×b_c Gram matrices can all be invertible (every b_c ≤ K):
    only then do their weights equal rdr_fast's (bench/official.py)."""
    return int(torch.bincount(labels).max()) <= dim


# The authors' code has no ridge: rdr_fast's (relative 1e-5) moves the weights by up to
# ~1e-3 relative on these long-tailed batches (tests/test_official_baseline.py).
OFFICIAL_TOLERANCE = dict(rtol=2e-3, atol=1e-4)


def kernel(impl: str, device: str, block_sizes=None):
    """The implementation ``impl`` with the op's signature, or a skip saying why not here."""
    if impl == "reference":
        return reference_on(device)
    if impl == "torch":
        return torch_impl.rdr_weights_and_update_torch
    if impl == "cpp":
        if device != "cpu" or not HAS_CPP:
            pytest.skip("the C++ kernel is a CPU kernel" if HAS_CPP else "rdr_fast._C is not built")
        return torch.ops.rdr_fast.rdr_weights_and_update.default  # the CPU kernel of rdr_fast._C
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    if device == "cpu" and not SMOKE:
        pytest.skip("on CPU tensors the Triton launcher runs Triton's interpreter (BENCH_SMOKE=1 runs it)")
    return lambda *args: kernels.rdr_weights_and_update_triton(*args, block_sizes=block_sizes)


def bench_against_reference(benchmark, device, shape, impl, block_sizes=None, label=None):
    """Check ``impl`` against the reference on fresh state, then time it on the same batch."""
    features, labels, protos, seen, counts = long_tail_batch(*shape, device=device)
    factors = Fn.class_factors(counts).to(device)
    fn = official_kernel(counts, protos) if impl == "official" else kernel(impl, device, block_sizes)
    benchmark.group = f"weights+update/{device}/float32/{shape_id(shape)}"
    benchmark.extra_info.update(backend=label or impl, device=device, shape=list(shape))
    args = (factors, DEFAULT_RIDGE, 1.0, 0.9, MODE, True)
    expected = reference_on(device)(features, labels, protos.clone(), seen.clone(), *args)
    got = fn(features, labels, protos.clone(), seen.clone(), *args)
    if impl != "official":
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-6)
    elif comparable_to_official(labels, shape[2]):
        torch.testing.assert_close(got.double(), expected.double(), **OFFICIAL_TOLERANCE)
    # The prototypes drift a little each call; the timing does not depend on their values.
    benchmark(timed(lambda: fn(features, labels, protos, seen, *args), device))


@pytest.mark.parametrize("impl", ["reference", "official", "torch", "cpp", "triton"])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_weights_and_update(benchmark, device, shape, impl):
    bench_against_reference(benchmark, device, shape, impl)


@pytest.mark.parametrize("block_sizes", BLOCK_SIZES, ids=lambda b: "BS{}-BK{}-w{}".format(*b))
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_triton_block_sizes(benchmark, device, block_sizes):
    """Triton with other block sizes, in the group of the first shape's rows."""
    bench_against_reference(benchmark, device, WEIGHT_SHAPES[0], "triton", block_sizes,
                            label="triton BS{}/BK{}/w{}".format(*block_sizes))


def loss_step(criterion, features, logits, labels):
    """One RDR loss forward and backward into the logits (a fresh gradient each time)."""
    logits.grad = None
    loss = criterion(features, logits, labels)
    loss.backward()
    return loss


# RDRLoss with its defaults, and without its data checks (validate=False: no NaN/Inf scan
# of the features and logits, no label range check), to show what those cost.
LOSS_ROWS = {"official": None, "rdr_fast": {}, "rdr_fast, validate=False": {"validate": False}}


@pytest.mark.parametrize("impl", list(LOSS_ROWS))
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_weights_update_and_loss(benchmark, device, shape, impl):
    """Weights + update + weighted CE forward and backward: OfficialRDR against
    RDRLoss(counts, K) with its defaults (on this device's kernels), and with
    validate=False, all from the same steady state; losses and gradients are checked
    equal first."""
    features, labels, protos, seen, counts = long_tail_batch(*shape, device=device)
    logits = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(1)).to(device)
    logits.requires_grad_(True)
    rdr = rdr_fast.RDRLoss(counts, shape[2], **(LOSS_ROWS[impl] or {})).to(device)
    rdr.prototypes.copy_(protos)
    rdr.seen.copy_(seen)
    official = OfficialRDR(counts, shape[2], device=device)
    official.prototypes.copy_(protos.T)
    official.labels_met.update(range(shape[1]))
    criterion = official if impl == "official" else rdr
    benchmark.group = f"weights+update+loss/{device}/float32/{shape_id(shape)}"
    benchmark.extra_info.update(backend=impl, device=device, shape=list(shape))
    if comparable_to_official(labels, shape[2]):
        losses, grads = [], []
        for crit in (official, rdr):
            losses.append(loss_step(crit, features, logits, labels).detach())
            grads.append(logits.grad.clone())
        torch.testing.assert_close(losses[1], losses[0], **OFFICIAL_TOLERANCE)
        torch.testing.assert_close(grads[1], grads[0], rtol=OFFICIAL_TOLERANCE["rtol"], atol=1e-6)
    benchmark(timed(lambda: loss_step(criterion, features, logits, labels), device))
