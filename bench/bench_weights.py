"""Density-ratio weights + prototype update: the per-class reference loop vs the PyTorch
path vs the C++ kernel, side by side per (B, C, K).

Run: pytest bench/ --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import reference as ref
from rdr_fast import torch_impl
from conftest import SHAPES, long_tail_batch, shape_id

HAS_CPP = rdr_fast.backends()["rdr_weights_and_update"]["cpu"] == "cpp"


def setup_reference(features, labels, protos, seen, counts):
    def run():
        ratios = ref.density_ratios_ref(features, labels, protos, seen)
        weights = ref.sample_weights_ref(ratios, labels, counts, "rdr")
        ref.update_prototypes_ref(protos, seen, features, labels)
        return weights
    return run


def setup_torch(features, labels, protos, seen, counts):
    factors = Fn.class_factors(counts)
    return lambda: torch_impl.rdr_weights_and_update_torch(features, labels, protos, seen, factors, 1e-5, 1.0, 0.9,
                                                           True, False, True)


def setup_cpp(features, labels, protos, seen, counts):
    if not HAS_CPP:
        pytest.skip("rdr_fast._C is not built")
    factors = Fn.class_factors(counts)
    op = torch.ops.rdr_fast.rdr_weights_and_update.default  # the CPU kernel registered by rdr_fast._C
    return lambda: op(features, labels, protos, seen, factors, 1e-5, 1.0, 0.9, True, False, True)


IMPLS = {"reference": setup_reference, "torch": setup_torch, "cpp": setup_cpp}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_weights_and_update(benchmark, shape, impl):
    features, labels, protos, seen, counts = long_tail_batch(*shape)
    benchmark.group = f"weights+update/cpu/float32/{shape_id(shape)}"
    benchmark.extra_info["backend"] = impl
    expected = setup_reference(features, labels, protos.clone(), seen.clone(), counts)()
    got = IMPLS[impl](features, labels, protos.clone(), seen.clone(), counts)()
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-6)
    # The prototypes drift a little each call; the timing does not depend on their values.
    benchmark(IMPLS[impl](features, labels, protos, seen, counts))
