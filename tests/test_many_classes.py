"""With many classes (C = 100 000) a step changes only the prototype rows of the classes
in its batch: neither the op nor RDRLoss's training call may allocate anything of the
size of the prototype table [C, K] (a copy, a full masked update, a [C, K] scratch).
Measured with bench/peak_memory.py (torch.profiler's allocation events on the CPU).

The budget is a quarter of the table. What a step must allocate is far below it: the
[B, C] logits' gradient (twice: the fused loss keeps one for backward), O(B·K) scratch and
the [B] weights, with B = 4 here."""
from __future__ import annotations

import pytest
import torch

import rdr_fast
from rdr_fast import functional as Fn
from rdr_fast import torch_impl
from rdr_fast.constants import DEFAULT_RIDGE, weight_mode
from conftest import load_bench_module, long_tail_counts, long_tail_labels

peak_memory = load_bench_module("peak_memory")

NUM_CLASSES, DIM, BATCH = 100_000, 64, 4
TABLE_BYTES = NUM_CLASSES * DIM * 4  # the float32 prototypes


def many_class_state():
    counts = long_tail_counts(NUM_CLASSES, imb_factor=10.0)
    labels = torch.cat([torch.tensor([0, NUM_CLASSES - 1]), long_tail_labels(BATCH - 2, counts)])
    features = torch.randn(BATCH, DIM).relu()
    protos = torch.randn(NUM_CLASSES, DIM)
    seen = torch.rand(NUM_CLASSES) < 0.5
    return features, labels, protos, seen, counts


def op_kernels():
    """Each CPU kernel of the op: the PyTorch path, and the registered one (C++ when built)."""
    return {"torch": torch_impl.rdr_weights_and_update_torch, "registered": torch.ops.rdr_fast.rdr_weights_and_update}


@pytest.mark.parametrize("kernel", list(op_kernels()))
def test_weights_and_update_allocate_nothing_of_the_table_size(kernel):
    features, labels, protos, seen, counts = many_class_state()
    factors = Fn.class_factors(counts)
    before = protos.clone()
    args = (features, labels, protos, seen, factors, DEFAULT_RIDGE, 1.0, 0.9, weight_mode("rdr"), True)
    peak = peak_memory.peak_extra_bytes(lambda: op_kernels()[kernel](*args), "cpu")
    assert 0 < peak < TABLE_BYTES // 4, f"peak extra memory {peak} B for a {TABLE_BYTES} B prototype table"
    changed = (protos != before).any(1)
    assert set(changed.nonzero().flatten().tolist()) <= set(labels.tolist())  # only the batch's rows


def test_rdrloss_training_call_allocates_nothing_of_the_table_size():
    features, labels, protos, seen, counts = many_class_state()
    crit = rdr_fast.RDRLoss(counts, DIM)
    crit.prototypes.copy_(protos)
    crit.seen.copy_(seen)
    logits = torch.randn(BATCH, NUM_CLASSES, requires_grad=True)

    def step():
        logits.grad = None
        crit(features, logits, labels).backward()

    step()  # the first call may set up what later calls reuse
    peak = peak_memory.peak_extra_bytes(step, "cpu")
    assert peak < TABLE_BYTES // 4, f"peak extra memory {peak} B for a {TABLE_BYTES} B prototype table"
