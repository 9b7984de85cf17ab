"""How the two ops scale: time and peak extra memory of the weights + update op
(rdr_weights_and_update, reweight "rdr") and of the fused loss forward + backward
(weighted_loss, CE), per backend, over the number of classes C, the feature width K and
the batch B, each point set beside what the machine can attain at that size.

Grid: C ∈ {10, 100, 1000, 8142, 100000}, K ∈ {64, 512, 2048}, B ∈ {128, 256, 1024}. The
loss does not read features, so its points are the (B, C) pairs. The cuda rows sweep the
whole grid. The cpu rows sweep CPU_POINTS, the subset a 2-core machine runs in a few
minutes: K ∈ {64, 512}, B ∈ {128, 256}, every C; ``BENCH_SCALING=full`` gives them the
whole grid too (the torch path at B = 1024, K = 2048 takes seconds per call there).
``BENCH_SMOKE=1``: one tiny point.

Backends: weights + update: cpp and torch on the CPU, triton and torch on CUDA (the
launchers called directly, as in bench_weights.py); the loss: the same, as in
bench_loss.py. Inputs: long-tailed labels (exponential profile, imbalance factor 100),
every class seen, float32.

Each row's extra_info holds, besides the time pytest-benchmark measures:

- ``peak_extra_bytes``: the most memory allocated during one call above what was
  allocated before it (the inputs and the state are not counted; the call's results
  are), by bench/peak_memory.py: on CUDA torch's allocator peak, on the CPU the
  allocations torch.profiler records. On the CPU it sees every tensor, including those
  the C++ kernels allocate, but not the C++ kernel's std::vector scratch (O(B + C) int64
  for the grouping, O(b_c²) doubles per thread for a system).
- ``flops`` and ``bytes``: the cost model (``weights_cost``, ``loss_cost``; bench/README.md
  derives it), from the batch's class counts b_c.
- ``matmul_flops_per_s`` and ``copy_bytes_per_s``: a float64 [B, K] @ [K, B] matmul (the
  systems are float64) and a float32 copy of the data the op must move (the features
  [B, K], or the logits [B, C]), timed at the same point in the same run: what the machine
  attains at that size. ``attainable_fraction`` = max(flops / matmul rate, bytes / copy
  rate) / median time: 1 means the op runs as fast as that matmul or that copy would.

Run: pytest bench/bench_scaling.py --benchmark-only --benchmark-json=scaling.json, then
python bench/plot_scaling.py scaling.json (the table, and bench/scaling.png).
"""
from __future__ import annotations

import functools
import itertools
import os
import statistics
import time

import pytest
import torch

import bench_loss
import bench_weights
from rdr_fast import functional as Fn
from rdr_fast.constants import DEFAULT_RIDGE, weight_mode
from conftest import SMOKE, long_tail_batch, on_cuda, seconds_per_call, timed
from peak_memory import peak_extra_bytes

CLASSES, WIDTHS, BATCHES = (10, 100, 1000, 8142, 100000), (64, 512, 2048), (128, 256, 1024)
GRID = [(b, c, k) for b, c, k in itertools.product(BATCHES, CLASSES, WIDTHS)]
CPU_POINTS = [(b, c, k) for b, c, k in GRID if k <= 512 and b <= 256]
SMOKE_POINTS = [(16, 1000, 8)]
# Seconds of timed calls per row (at least MIN_ROUNDS, at most MAX_ROUNDS calls).
TIME_PER_ROW_S, MIN_ROUNDS, MAX_ROUNDS = 0.3, 3, 200


def cpu_points():
    if SMOKE:
        return SMOKE_POINTS
    return GRID if os.environ.get("BENCH_SCALING") == "full" else CPU_POINTS


def point_params(points_of_cpu, points_of_cuda):
    """(device, point) parameters: the cpu points, then the cuda points (marked gpu)."""
    ident = "{}-B{}-C{}-K{}".format
    return ([pytest.param("cpu", p, id=ident("cpu", *p)) for p in points_of_cpu]
            + [on_cuda("cuda", p, id=ident("cuda", *p)) for p in points_of_cuda])


def loss_points(points):
    """The (B, C) pairs of ``points``, as (B, C, 0): the loss has no K."""
    return sorted({(b, c, 0) for b, c, _ in points})


WEIGHT_PARAMS = point_params(cpu_points(), SMOKE_POINTS if SMOKE else GRID)
LOSS_PARAMS = point_params(loss_points(cpu_points()), loss_points(SMOKE_POINTS if SMOKE else GRID))


# ----------------------------------------------------------------------------- cost model

def weights_cost(class_sizes, dim: int, batch: int) -> tuple[int, int]:
    """(flops, bytes) of the weights + update op on a batch whose classes have the sizes
    ``class_sizes`` (b_c of each class present, all seen), features float32 [B, K].

    flops, per class (m = min(b_c, K), n = max(b_c, K)), a multiply-add counted as 2:
    the Gram matrix's lower triangle m(m+1)/2 · n; the right-hand side X_c P_c (or, in
    the K×K form, the ratios X_c u) b_c·K; Cholesky m³/6; two triangular solves m²; the
    class mean b_c·K additions and the blend 3K. Then O(B) for the weights.
    bytes, the least the op must move to and from memory: the features once (4·B·K),
    labels (8·B), the weights (4·B), and per class present its prototype row read and
    written (2·4·K), its seen flag and class factor (1 + 8).
    """
    flops = 6 * batch
    for b in class_sizes:
        m, n = min(b, dim), max(b, dim)
        flops += 2 * (m * (m + 1) // 2 * n + b * dim + m ** 3 // 6 + m * m) + b * dim + 3 * dim
    moved = 4 * batch * dim + 12 * batch + len(class_sizes) * (8 * dim + 9)
    return flops, moved


def loss_cost(batch: int, num_classes: int) -> tuple[int, int]:
    """(flops, bytes) of the CE loss forward + backward on float32 logits [B, C].

    flops: per logit, the max, the shifted exp, the sum, the softmax and the gradient
    (about 5, an exp counted as 1). bytes: the least traffic, the logits read once and
    their gradient written once (8·B·C), plus labels and weights (12·B). The op moves
    more: its forward writes the gradient, which backward reads and scales into a new
    tensor, 16·B·C in all.
    """
    return 5 * batch * num_classes, 8 * batch * num_classes + 12 * batch


# ----------------------------------------------------------------------------- measurement

def median_seconds(fn, calls: int = 5) -> float:
    """Median seconds of one call of ``fn`` (a ``timed`` function) over ``calls`` calls,
    after one warm-up call."""
    fn()
    return statistics.median(seconds_per_call(fn, 1) for _ in range(calls))


_RATES: dict = {}


def machine_rates(device: str, batch: int, dim: int, copy_elements: int) -> dict:
    """The float64 [B, K] @ [K, B] matmul's flop rate and the float32 copy's byte rate
    (read + write) of ``copy_elements`` elements, on ``device``, measured once per size."""
    key = (device, batch, dim, copy_elements)
    if key not in _RATES:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(device)
        src = torch.randn(copy_elements, generator=g).to(device)
        dst = torch.empty_like(src)
        matmul_s = median_seconds(timed(lambda: a @ a.T, device))
        copy_s = median_seconds(timed(lambda: dst.copy_(src), device))
        _RATES[key] = {"matmul_flops_per_s": 2 * batch * batch * dim / matmul_s,
                       "copy_bytes_per_s": 8 * copy_elements / copy_s}
    return _RATES[key]


def measure(benchmark, fn, flops: int, moved: int, rates: dict, **info) -> None:
    """Time ``fn`` (about TIME_PER_ROW_S of calls), then record its peak extra memory, the
    cost model and the fraction of the attainable rate in extra_info."""
    device = info["device"]
    run = timed(fn, device)
    run()  # warm-up: kernels compiled, caches filled
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    rounds = 1 if SMOKE else int(min(MAX_ROUNDS, max(MIN_ROUNDS, TIME_PER_ROW_S / max(once, 1e-9))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    median_s = benchmark.stats.stats.median
    attainable_s = max(flops / rates["matmul_flops_per_s"], moved / rates["copy_bytes_per_s"])
    benchmark.extra_info.update(info, peak_extra_bytes=peak_extra_bytes(fn, device), flops=flops, bytes=moved,
                                attainable_fraction=attainable_s / median_s, **rates)


# ----------------------------------------------------------------------------- benchmarks

@functools.lru_cache(maxsize=1)
def batch_at(point, device: str):
    """long_tail_batch at ``point`` on ``device``, kept for the backends that follow (the
    rows of one point are adjacent): at C = 100 000, K = 2048 the prototypes alone take
    seconds to draw. Each row's updates move the shared prototypes a little; the timing
    does not depend on their values."""
    return long_tail_batch(*point, device=device)


@pytest.mark.parametrize("impl", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("device,point", WEIGHT_PARAMS)
def test_scaling_weights_and_update(benchmark, device, point, impl):
    batch, num_classes, dim = point
    fn = bench_weights.kernel(impl, device)
    features, labels, protos, seen, counts = batch_at(point, device)
    factors = Fn.class_factors(counts).to(device)
    args = (factors, DEFAULT_RIDGE, 1.0, 0.9, weight_mode("rdr"), True)
    sizes = torch.bincount(labels.cpu()).tolist()
    flops, moved = weights_cost([b for b in sizes if b], dim, batch)
    benchmark.group = f"scaling/weights+update/{device}/B{batch}-C{num_classes}-K{dim}"
    measure(benchmark, lambda: fn(features, labels, protos, seen, *args), flops, moved,
            machine_rates(device, batch, dim, batch * dim), backend=impl, device=device, op="weights+update",
            shape=list(point), classes_in_batch=sum(1 for b in sizes if b), largest_class=max(sizes))


@pytest.mark.parametrize("impl", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("device,point", LOSS_PARAMS)
def test_scaling_loss_forward_backward(benchmark, device, point, impl):
    batch, num_classes, _ = point
    bench_loss.skip_unless_available(impl, device)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, num_classes, generator=g).mul_(3).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    weights = (torch.rand(batch, generator=g) + 0.5).to(device)
    loss_fn = bench_loss.IMPLS[impl]

    def step():
        logits.grad = None
        loss = loss_fn(logits, labels, weights)
        loss.backward()
        return loss

    flops, moved = loss_cost(batch, num_classes)
    benchmark.group = f"scaling/loss/{device}/B{batch}-C{num_classes}"
    measure(benchmark, step, flops, moved, machine_rates(device, batch, 64, batch * num_classes),
            backend=impl, device=device, op="loss", shape=[batch, num_classes])
