"""A whole ResNet-32 training step (B = 128, C = 100, 32×32 inputs, SGD): plain
cross-entropy vs RDRLoss through the fused ops. RDR is meant to cost a few % of a step at
most; summarize.py checks the paired ratio against 1.03.

Runs: CPU eager fp32; on CUDA eager and CUDA-graph replay, each in fp32 and under bf16
autocast (autocast's weight cache off, as graphs require). Every step is one
``rdr_fast.training.train_step``.

A step takes much longer than what RDR adds, so on a busy machine the difference is far
below the noise of separately timed rows. Besides timing the two steps separately, a
third benchmark alternates them and reports the median of the per-pair ratio
(extra_info["rdr_over_ce"]), which drift affects far less.

Run: pytest bench/bench_step.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import rdr_fast
from rdr_fast.models import resnet32
from rdr_fast.training import train_step
from conftest import CPU_AND_CUDA, SMOKE, long_tail_labels, on_cuda, rounds, timed

BATCH, NUM_CLASSES = (4 if SMOKE else 128), 100
RUNS = [("cpu", "eager", "fp32")] + [on_cuda("cuda", mode, precision)
                                     for precision in ("fp32", "bf16") for mode in ("eager", "graph")]
RUN_IDS = ["cpu-eager-fp32"] + [f"cuda-{mode}-{precision}" for precision in ("fp32", "bf16")
                                for mode in ("eager", "graph")]


def cross_entropy(features, logits, labels):
    return F.cross_entropy(logits, labels)


def make_step(loss_name, device, mode, precision):
    """A function running one SGD step on a fixed long-tailed batch, as the benchmark times
    it (see conftest.timed), after two steps that give every RDR class in the batch a
    prototype (the steady state)."""
    torch.manual_seed(0)
    model = resnet32(NUM_CLASSES).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    labels, images = labels.to(device), torch.randn(BATCH, 3, 32, 32, device=device)
    crit = cross_entropy if loss_name == "ce" else rdr_fast.RDRLoss(counts, model.feat_dim, validate=False).to(device)

    def forward(x):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
            features, logits = model(x)
        return features.float(), logits.float()

    def step():
        train_step(optimizer, forward, crit, images, labels)
    for _ in range(2):
        step()
    return timed(step, device, mode)


def describe(benchmark, backend, device, mode, precision):
    benchmark.group = f"step/resnet32/{device}/{mode}/{precision}/B{BATCH}-C{NUM_CLASSES}"
    benchmark.extra_info.update(backend=backend, device=device, mode=mode, precision=precision,
                                rdr_backends={name: d[device] for name, d in rdr_fast.backends().items()})


@pytest.mark.parametrize("loss_name", ["ce", "rdr"])
@pytest.mark.parametrize("device,mode,precision", RUNS, ids=RUN_IDS)
def test_resnet32_step(benchmark, device, mode, precision, loss_name):
    describe(benchmark, loss_name, device, mode, precision)
    benchmark.pedantic(make_step(loss_name, device, mode, precision), rounds=rounds(10, 50, device),
                       iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device,mode,precision", RUNS, ids=RUN_IDS)
def test_resnet32_step_pair(benchmark, device, mode, precision):
    describe(benchmark, "ce+rdr (alternated)", device, mode, precision)
    steps = {name: make_step(name, device, mode, precision) for name in ("ce", "rdr")}
    times = {"ce": [], "rdr": []}

    def pair():  # the order flips every round, so neither loss always runs first
        for name in (("ce", "rdr") if len(times["ce"]) % 2 == 0 else ("rdr", "ce")):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=2 * rounds(10, 50, device), iterations=1, warmup_rounds=1)
    ratios = [r / c for c, r in zip(times["ce"][1:], times["rdr"][1:])]  # the warm-up pair left out
    benchmark.extra_info["rdr_over_ce"] = statistics.median(ratios)


def make_criterion_step(loss_name, device):
    """Only what differs between the two steps: the loss on given features and logits."""
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    labels = labels.to(device)
    features = torch.randn(BATCH, 64, device=device).relu().requires_grad_(True)
    logits = torch.randn(BATCH, NUM_CLASSES, device=device, requires_grad=True)
    crit = cross_entropy if loss_name == "ce" else rdr_fast.RDRLoss(counts, 64, validate=False).to(device)

    def step():
        logits.grad = features.grad = None
        crit(features, logits, labels).backward()
    return timed(step, device)


@pytest.mark.parametrize("loss_name", ["ce", "rdr"])
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_criterion_step(benchmark, device, loss_name):
    """The loss alone (forward + backward into the logits): RDR's whole cost per step."""
    describe(benchmark, loss_name, device, "eager", "fp32")
    benchmark.group = f"criterion/{device}/float32/B{BATCH}-C{NUM_CLASSES}-K64"
    benchmark(make_criterion_step(loss_name, device))
