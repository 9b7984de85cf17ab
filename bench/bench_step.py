"""A whole ResNet-32 training step (B = 128, C = 100, 32×32 inputs, SGD): plain
cross-entropy, the authors' RDR structure (bench/official.py: a loop over every class,
the prototypes updated one sample at a time) and RDRLoss through the fused ops. RDR is
meant to cost at most 1 % of a step; summarize.py checks the paired ratio against 1.01.
(RDR + SAM against SAM: bench_sam.py.)

Runs: CPU eager fp32; on CUDA eager and CUDA-graph replay, each in fp32 and under bf16
autocast (autocast's weight cache off, as graphs require). Every step is one
``rdr_fast.training.train_step``. The authors' structure reads labels to the host, so a
CUDA graph cannot hold it: it has no graph rows.

A step takes much longer than what RDR adds, so on a busy machine the difference is far
below the noise of separately timed rows. Besides timing the steps separately, one
benchmark runs them in rounds of one step each, the order rotated every round, and
reports the median of the per-round ratios to CE (extra_info["rdr_over_ce"],
["official_over_ce"]), which drift affects far less.

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
from official import OfficialRDR

BATCH, NUM_CLASSES = (4 if SMOKE else 128), 100
RUNS = [("cpu", "eager", "fp32")] + [on_cuda("cuda", mode, precision)
                                     for precision in ("fp32", "bf16") for mode in ("eager", "graph")]
RUN_IDS = ["cpu-eager-fp32"] + [f"cuda-{mode}-{precision}" for precision in ("fp32", "bf16")
                                for mode in ("eager", "graph")]


def cross_entropy(features, logits, labels):
    return F.cross_entropy(logits, labels)


def criterion(loss_name, counts, feat_dim, device):
    """"ce", "official" (the authors' structure) or "rdr" (RDRLoss on the fused ops)."""
    if loss_name == "ce":
        return cross_entropy
    if loss_name == "official":
        return OfficialRDR(counts, feat_dim, device=device)
    return rdr_fast.RDRLoss(counts, feat_dim, validate=False).to(device)


def losses_for(mode: str) -> list[str]:
    """The losses a run times: the authors' structure cannot be replayed from a CUDA graph."""
    return ["ce", "rdr"] if mode == "graph" else ["ce", "official", "rdr"]


def make_step(loss_name, device, mode, precision):
    """A function running one SGD step on a fixed long-tailed batch, as the benchmark times
    it (see conftest.timed), after two steps that give every RDR class in the batch a
    prototype (the steady state)."""
    torch.manual_seed(0)
    model = resnet32(NUM_CLASSES).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    labels, images = labels.to(device), torch.randn(BATCH, 3, 32, 32, device=device)
    crit = criterion(loss_name, counts, model.feat_dim, device)

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


@pytest.mark.parametrize("loss_name", ["ce", "official", "rdr"])
@pytest.mark.parametrize("device,mode,precision", RUNS, ids=RUN_IDS)
def test_resnet32_step(benchmark, device, mode, precision, loss_name):
    if loss_name not in losses_for(mode):
        pytest.skip("the authors' structure reads labels to the host: no CUDA graph holds it")
    describe(benchmark, loss_name, device, mode, precision)
    benchmark.pedantic(make_step(loss_name, device, mode, precision), rounds=rounds(10, 50, device),
                       iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device,mode,precision", RUNS, ids=RUN_IDS)
def test_resnet32_step_pair(benchmark, device, mode, precision):
    names = losses_for(mode)
    describe(benchmark, "+".join(names) + " (alternated)", device, mode, precision)
    steps = {name: make_step(name, device, mode, precision) for name in names}
    times = {name: [] for name in names}

    def one_round():  # the order rotates every round, so no loss always runs first
        shift = len(times["ce"]) % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=2 * rounds(10, 50, device), iterations=1, warmup_rounds=1)
    for name in names[1:]:  # the warm-up round left out
        ratios = [t / c for c, t in zip(times["ce"][1:], times[name][1:])]
        benchmark.extra_info[f"{name}_over_ce"] = statistics.median(ratios)


def make_criterion_step(loss_name, device):
    """Only what differs between the two steps: the loss on given features and logits."""
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    labels = labels.to(device)
    features = torch.randn(BATCH, 64, device=device).relu().requires_grad_(True)
    logits = torch.randn(BATCH, NUM_CLASSES, device=device, requires_grad=True)
    crit = criterion(loss_name, counts, 64, device)

    def step():
        logits.grad = features.grad = None
        crit(features, logits, labels).backward()
    return timed(step, device)


@pytest.mark.parametrize("loss_name", ["ce", "official", "rdr"])
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_criterion_step(benchmark, device, loss_name):
    """The loss alone (forward + backward into the logits): RDR's whole cost per step."""
    describe(benchmark, loss_name, device, "eager", "fp32")
    benchmark.group = f"criterion/{device}/float32/B{BATCH}-C{NUM_CLASSES}-K64"
    benchmark(make_criterion_step(loss_name, device))
