"""Shared inputs for the benchmarks: long-tailed batches at the SPEC §7 shapes."""
from __future__ import annotations

import pytest
import torch

# (B, C, K) of the performance contract.
SHAPES = [(128, 10, 64), (128, 100, 64), (256, 1000, 512), (256, 1000, 2048)]


def shape_id(shape) -> str:
    return "B{}-C{}-K{}".format(*shape)


def long_tail_labels(batch, num_classes, generator=None, imb_factor=100.0):
    """(labels, counts): counts n_c = 500·IF^(−c/(C−1)) (at least 1) and a batch of labels
    drawn ∝ them, from ``generator`` (torch's global RNG when None)."""
    counts = [max(1, int(500 * imb_factor ** (-c / max(1, num_classes - 1)))) for c in range(num_classes)]
    probs = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator), counts


def long_tail_batch(batch, num_classes, dim, dtype=torch.float32, imb_factor=100.0, seed=0):
    """(features, labels, prototypes, seen, counts): labels drawn ∝ an exponential LT profile,
    every class already seen (the steady state of training)."""
    g = torch.Generator().manual_seed(seed)
    labels, counts = long_tail_labels(batch, num_classes, g, imb_factor)
    features = torch.randn(batch, dim, generator=g).relu().to(dtype)
    protos = torch.randn(num_classes, dim, generator=g).relu()
    seen = torch.ones(num_classes, dtype=torch.bool)
    return features, labels, protos, seen, counts


@pytest.fixture(autouse=True)
def _single_thread_pool_info(benchmark):
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
