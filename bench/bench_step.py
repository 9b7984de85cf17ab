"""A whole ResNet-32 training step (B = 128, C = 100, 32×32 inputs, SGD): plain
cross-entropy vs RDRLoss through the fused ops (SPEC §7: RDR within a few % of CE).

A step takes seconds on a CPU while RDR adds well under a millisecond, so the
difference is far below the machine's noise when other jobs run. Besides timing the two
steps separately, a third benchmark alternates them and reports the median of the
per-pair ratio (extra_info["rdr_over_ce"]), which drift affects far less.

Run: pytest bench/ --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import rdr_fast
from rdr_fast.models import resnet32
from conftest import long_tail_labels

BATCH, NUM_CLASSES, ROUNDS = 128, 100, 10
GROUP = f"step/resnet32/cpu/float32/B{BATCH}-C{NUM_CLASSES}"


def make_step(loss_name):
    """A closure running one SGD step on a fixed long-tailed batch."""
    torch.manual_seed(0)
    model = resnet32(NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    images = torch.randn(BATCH, 3, 32, 32)
    crit = rdr_fast.RDRLoss(counts, model.feat_dim, validate=False)

    def step():
        features, logits = model(images)
        loss = F.cross_entropy(logits, labels) if loss_name == "ce" else crit(features, logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def describe(benchmark, backend):
    benchmark.group = GROUP
    benchmark.extra_info["backend"] = backend
    benchmark.extra_info["rdr_backends"] = {name: d["cpu"] for name, d in rdr_fast.backends().items()}


@pytest.mark.parametrize("loss_name", ["ce", "rdr"])
def test_resnet32_step(benchmark, loss_name):
    describe(benchmark, loss_name)
    # After two warm-up steps every RDR class in the batch has a prototype (the steady state).
    benchmark.pedantic(make_step(loss_name), rounds=ROUNDS, iterations=1, warmup_rounds=2)


def test_resnet32_step_pair(benchmark):
    describe(benchmark, "ce+rdr (alternated)")
    steps = {"ce": make_step("ce"), "rdr": make_step("rdr")}
    times = {"ce": [], "rdr": []}

    def pair():  # the order flips every round, so neither loss always runs first
        for name in (("ce", "rdr") if len(times["ce"]) % 2 == 0 else ("rdr", "ce")):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=2 * ROUNDS, iterations=1, warmup_rounds=2)
    ratios = [r / c for c, r in zip(times["ce"][2:], times["rdr"][2:])]
    benchmark.extra_info["rdr_over_ce"] = statistics.median(ratios)


def make_criterion_step(loss_name):
    """Only what differs between the two steps: the loss on given features and logits."""
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    features = torch.randn(BATCH, 64).relu().requires_grad_(True)
    logits = torch.randn(BATCH, NUM_CLASSES, requires_grad=True)
    crit = rdr_fast.RDRLoss(counts, 64, validate=False)

    def step():
        logits.grad = features.grad = None
        loss = F.cross_entropy(logits, labels) if loss_name == "ce" else crit(features, logits, labels)
        loss.backward()
    return step


@pytest.mark.parametrize("loss_name", ["ce", "rdr"])
def test_criterion_step(benchmark, loss_name):
    """The loss alone (forward + backward into the logits): RDR's whole cost per step."""
    describe(benchmark, loss_name)
    benchmark.group = f"criterion/cpu/float32/B{BATCH}-C{NUM_CLASSES}-K64"
    benchmark(make_criterion_step(loss_name))
