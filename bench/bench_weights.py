"""Density-ratio weights + prototype update: the per-class reference loop vs the PyTorch
path vs the C++ kernel (CPU) and the Triton kernel (CUDA), side by side per (B, C, K) and
device. Every implementation is called with the op's signature (reweight "rdr": mode
"density_ratio") and first checked against the reference on the same inputs. On CUDA the
Triton kernel is also timed with other block sizes (its launcher's ``block_sizes``).

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
    fn = kernel(impl, device, block_sizes)
    benchmark.group = f"weights+update/{device}/float32/{shape_id(shape)}"
    benchmark.extra_info.update(backend=label or impl, device=device, shape=list(shape))
    args = (factors, DEFAULT_RIDGE, 1.0, 0.9, MODE, True)
    expected = reference_on(device)(features, labels, protos.clone(), seen.clone(), *args)
    got = fn(features, labels, protos.clone(), seen.clone(), *args)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-6)
    # The prototypes drift a little each call; the timing does not depend on their values.
    benchmark(timed(lambda: fn(features, labels, protos, seen, *args), device))


@pytest.mark.parametrize("impl", ["reference", "torch", "cpp", "triton"])
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
