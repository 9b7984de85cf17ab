"""Shared fixtures: deterministic seeds and long-tailed random batches."""
from __future__ import annotations

import random

import pytest
import torch

import rdr_fast.ops as ops  # noqa: F401  (registers the custom ops)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def long_tail_counts(num_classes: int, n_max: int = 500, imb_factor: float = 100.0) -> list[int]:
    """The exponential LT profile n_c = n_max · imb^(−c/(C−1)), at least 1."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imb_factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail_labels(batch: int, counts, generator=None) -> torch.Tensor:
    """Labels drawn with probability ∝ count, as a long-tailed training batch sees them."""
    probs = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator)


def random_state(num_classes: int, dim: int, dtype=torch.float64, seen_fraction: float = 0.8):
    """Random prototypes [C, K] and a seen mask with some classes not yet seen."""
    protos = torch.randn(num_classes, dim, dtype=dtype)
    seen = torch.rand(num_classes) < seen_fraction
    return protos, seen


@pytest.fixture
def make_batch():
    """make_batch(B, C, K, dtype) -> (features, labels, prototypes, seen, counts)."""
    def _make(batch, num_classes, dim, dtype=torch.float64, relu=False, seen_fraction=0.8):
        counts = long_tail_counts(num_classes)
        labels = long_tail_labels(batch, counts)
        features = torch.randn(batch, dim, dtype=torch.float64)
        if relu:
            features = features.relu()
        protos, seen = random_state(num_classes, dim, torch.float64, seen_fraction)
        return features.to(dtype), labels, protos, seen, counts
    return _make
