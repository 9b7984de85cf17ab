"""SAM family training steps: ResNet-32, B = 128, C = 100, 32×32 inputs, per device.

Rows per group (one group without RDR, one with): plain SGD, the naive SAM of davda54/sam
(per-parameter Python loops, a copy of every parameter), the fused foreach SAM and the
cheap variants sam_k and looksam (k = 5); BENCH_SAM_ALL=1 adds ASAM, ImbSAM and CC-SAM.
Every timed round is one k-cycle: K = 5 consecutive steps of that method, so sam_k /
looksam are averaged over their cycle and the ratios compare like with like. On CUDA the
methods whose step is the same device work every time are also timed as CUDA-graph replays.

Before timing, the naive row checks that fused and naive SAM give bit-identical
parameters. ``test_paired_ratios_vs_sgd`` (last) times fused SAM, sam_k and looksam each
against SGD in alternating, adjacent pairs (SAM one step vs SGD two steps; the cheap
variants a whole k-cycle vs K SGD steps) and records the median ratios in its
extra_info; it also times SAM with RDR against SAM without. summarize.py checks them
against their targets (fused SAM ≤ 2.05× SGD, the cheapest variant ≤ 1.3× SGD, SAM with
RDR ≤ 1.03× SAM without). On a shared machine the rows of the tables drift with the load
by ±10 %; the paired ratios are the ones to quote.

Run: pytest bench/bench_sam.py --benchmark-only --benchmark-group-by=group
(BENCH_SAM_ROUNDS: rounds per row, default 3, after one warm-up round;
BENCH_SAM_PAIRS: pairs per cheap variant in the paired ratios, 4× that for SAM, default 5.)
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import rdr_fast
from rdr_fast import sam
from rdr_fast.models import resnet32
from rdr_fast.training import train_step
from conftest import (CPU_AND_CUDA, SMOKE, captured, long_tail_labels, median_paired_ratio, on_cuda, rounds,
                      seconds_per_call, timed)

BATCH, NUM_CLASSES, K = (4, 100, 2) if SMOKE else (128, 100, 5)
ROUNDS = int(os.environ.get("BENCH_SAM_ROUNDS", "3"))
PAIRS = 1 if SMOKE else int(os.environ.get("BENCH_SAM_PAIRS", "5"))
SGD = dict(lr=0.1, momentum=0.9, weight_decay=2e-4)
METHODS = ["sgd", "sam_naive", "sam", "sam_k", "looksam"]
if os.environ.get("BENCH_SAM_ALL"):
    METHODS += ["asam", "imbsam", "ccsam"]
# One CUDA graph per step replays the same device work: not for sam_k / looksam (SAM or
# SGD chosen on the host per step) nor the naive SAM (it swaps parameter storage).
CAPTURABLE = {"sgd", "sam", "asam", "imbsam", "ccsam"}
RUNS = [("cpu", "eager"), on_cuda("cuda", "eager"), on_cuda("cuda", "graph")]
RUN_IDS = ["cpu-eager", "cuda-eager", "cuda-graph"]


class NaiveSAM:
    """davda54/sam as published: per-parameter loops, ``old_p`` copies, BatchNorm bypassed
    by momentum = 0 in the second pass. RDR weights of the first pass are reused."""

    def __init__(self, model, rho=0.05):
        self.model, self.rho = model, rho
        self.params = list(model.parameters())
        self.base = torch.optim.SGD(self.params, **SGD)
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def step(self, criterion, x, y):
        self.base.zero_grad(set_to_none=True)
        features, logits = self.model(x)
        loss = criterion(features, logits, y)
        weights = sam.first_pass_weights(criterion)
        loss.backward()
        old = {}
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
            scale = self.rho / (grad_norm + 1e-12)
            for p in self.params:
                if p.grad is None:
                    continue
                old[p] = p.data.clone()
                p.add_(p.grad * scale)
        self.base.zero_grad(set_to_none=True)
        momenta = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0
        features, logits = self.model(x)
        sam.reused_loss(criterion, features, logits, y, weights).backward()
        for m, momentum in zip(self.bns, momenta):
            m.momentum = momentum
        for p in old:
            p.data = old[p]
        self.base.step()
        return loss.detach()


def make_setup(rdr: bool, device: str, seed: int = 0):
    """(model, criterion, images, labels, counts) on ``device``: a long-tailed batch;
    RDRLoss with reweight="rdr" or "none" (plain CE through the same fused loss op)."""
    torch.manual_seed(seed)
    model = resnet32(NUM_CLASSES).to(device)
    labels, counts = long_tail_labels(BATCH, NUM_CLASSES)
    images = torch.randn(BATCH, 3, 32, 32)
    crit = rdr_fast.RDRLoss(counts, model.feat_dim, reweight="rdr" if rdr else "none", validate=False)
    return model, crit.to(device), images.to(device), labels.to(device), counts


def make_step(method: str, rdr: bool, device: str):
    """A function running one step of ``method`` on a fixed batch."""
    model, crit, images, labels, counts = make_setup(rdr, device)
    if method == "sam_naive":
        naive = NaiveSAM(model)
        return lambda: naive.step(crit, images, labels)
    opt = sam.make_optimizer("none" if method == "sgd" else method, model, counts, k=K, **SGD)
    return lambda: train_step(opt, model, crit, images, labels)


def repeated(fn, times: int):
    def run():
        for _ in range(times):
            fn()
    return run


def assert_fused_equals_naive(rdr: bool, device: str, steps: int = 2) -> None:
    """Fused and naive SAM from the same state give bit-identical parameters."""
    model, crit, images, labels, counts = make_setup(rdr, device)
    model2, crit2 = copy.deepcopy(model), copy.deepcopy(crit)
    opt = sam.make_optimizer("sam", model, counts, **SGD)
    naive = NaiveSAM(model2)
    for _ in range(steps):
        train_step(opt, model, crit, images, labels)
        naive.step(crit2, images, labels)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b), "fused SAM differs from the naive reference"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rdr", [False, True], ids=["ce", "rdr"])
@pytest.mark.parametrize("device,mode", RUNS, ids=RUN_IDS)
def test_sam_step(benchmark, device, mode, rdr, method):
    if mode == "graph" and method not in CAPTURABLE:
        pytest.skip(f"one CUDA graph cannot replay {method}'s steps (see CAPTURABLE)")
    tag = "rdr" if rdr else "ce"
    benchmark.group = f"sam/resnet32/{device}/{mode}/B{BATCH}-C{NUM_CLASSES}/{tag}/per-{K}-steps"
    benchmark.extra_info.update(method=method, device=device, mode=mode, loss=tag, steps_per_round=K)
    if method == "sam_naive":
        assert_fused_equals_naive(rdr, device)
    # A CUDA graph holds one step; a round replays it K times, then synchronises once.
    cycle = timed(repeated(captured(make_step(method, rdr, device), mode), K), device)
    benchmark.pedantic(cycle, rounds=rounds(ROUNDS, 10 * ROUNDS, device), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_paired_ratios_vs_sgd(benchmark, device):
    """Fused SAM and the cheap variants against SGD, as median ratios of alternating,
    adjacent timings (see conftest.median_paired_ratio), recorded in extra_info. Units:
    SAM one step against SGD two steps (about two passes each); sam_k / looksam one whole
    k-cycle (their mean step) against K SGD steps. PAIRS pairs for the cheap variants,
    4·PAIRS for SAM. Last, fused SAM with RDR against fused SAM without (one step each,
    4·PAIRS pairs): what RDR adds to a SAM step."""
    report, sam_steps = {}, {}
    for tag in ("ce", "rdr"):
        steps = {m: timed(make_step(m, tag == "rdr", device), device) for m in ("sgd", "sam", "sam_k", "looksam")}
        sam_steps[tag] = steps["sam"]
        unit = {m: (lambda m=m, n=n: seconds_per_call(steps[m], n))
                for m, n in (("sgd", 2), ("sam", 1), ("sam_k", K), ("looksam", K))}
        sgd_cycle = lambda: seconds_per_call(steps["sgd"], K)  # noqa: E731
        report[f"{tag}/sam_vs_sgd"] = median_paired_ratio(unit["sam"], unit["sgd"], 4 * PAIRS)
        for m in ("sam_k", "looksam"):
            report[f"{tag}/{m}_vs_sgd"] = median_paired_ratio(unit[m], sgd_cycle, PAIRS)
        report[f"{tag}/sgd_s_per_step"] = unit["sgd"]()
    report["sam_rdr_vs_sam_ce"] = median_paired_ratio(lambda: seconds_per_call(sam_steps["rdr"], 1),
                                                      lambda: seconds_per_call(sam_steps["ce"], 1), 4 * PAIRS)
    benchmark.group = f"sam/{device}/paired"
    benchmark.extra_info.update(device=device, **report)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
