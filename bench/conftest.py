"""Shared pieces of the benchmarks: the device parameter, long-tailed inputs, timing on a
device, paired ratios, and the smoke mode.

Every benchmark takes a ``device`` parameter: "cpu" always runs, "cuda" is marked ``gpu``
and skipped without a CUDA device, so ``pytest bench/ -m gpu`` selects the GPU rows and
``-m "not gpu"`` the CPU rows of the same files.

``BENCH_SMOKE=1`` shrinks every benchmark to tiny shapes and single rounds on one torch
thread (two threads on a busy machine can run 10× slower), and also runs the Triton
launchers on CPU tensors (Triton's interpreter). It proves that every row runs
(``bench/gpu_suite.py --dry-run`` uses it); its figures mean nothing.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

SMOKE = os.environ.get("BENCH_SMOKE", "") == "1"
if SMOKE:
    torch.set_num_threads(1)

_CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_cuda(*values, id=None):
    """A parameter set for CUDA only: marked gpu, skipped without a CUDA device."""
    return pytest.param(*values, marks=_CUDA_MARKS, id=id)


# A "device" parameter: "cpu" always runs; "cuda" (marked gpu) only where a GPU is.
CPU_AND_CUDA = ["cpu", on_cuda("cuda")]

# (B, C, K) of the weights op; summarize.py checks the speed-up at the first one.
WEIGHT_SHAPES = ([(16, 5, 8), (24, 100, 16)] if SMOKE else
                 [(128, 100, 64), (128, 10, 64), (256, 1000, 512), (256, 1000, 2048)])


def rounds(cpu: int, cuda: int, device: str) -> int:
    """Timed rounds of a pedantic benchmark: one in smoke mode; a CUDA step is ~50× faster."""
    return 1 if SMOKE else (cpu if device == "cpu" else cuda)


def shape_id(shape) -> str:
    return "B{}-C{}-K{}".format(*shape)


def long_tail_labels(batch, num_classes, generator=None, imb_factor=100.0):
    """(labels, counts): counts n_c = 500·IF^(−c/(C−1)) (at least 1) and a batch of labels
    drawn ∝ them, from ``generator`` (torch's global RNG when None)."""
    counts = [max(1, int(500 * imb_factor ** (-c / max(1, num_classes - 1)))) for c in range(num_classes)]
    probs = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator), counts


def long_tail_batch(batch, num_classes, dim, device="cpu", dtype=torch.float32, imb_factor=100.0, seed=0):
    """(features, labels, prototypes, seen, counts) on ``device``: labels drawn ∝ an
    exponential LT profile, every class already seen (the steady state of training)."""
    g = torch.Generator().manual_seed(seed)
    labels, counts = long_tail_labels(batch, num_classes, g, imb_factor)
    features = torch.randn(batch, dim, generator=g).relu().to(dtype)
    protos = torch.randn(num_classes, dim, generator=g).relu()
    seen = torch.ones(num_classes, dtype=torch.bool)
    return features.to(device), labels.to(device), protos.to(device), seen.to(device), counts


def captured(fn, mode: str):
    """``fn`` itself (mode "eager"), or the replay of a CUDA graph of one call of ``fn``
    (mode "graph"), captured after three warm-up calls on a side stream as capture requires."""
    if mode == "eager":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def synced(fn, device: str):
    """``fn`` made to return only once the device has finished its work. pytest-benchmark
    reads the host clock, and CUDA calls return as soon as they are queued."""
    if device == "cpu":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    torch.cuda.synchronize()  # nothing queued before the first timed call
    return run


def timed(fn, device: str, mode: str = "eager"):
    """What a benchmark times: ``fn`` (or its CUDA graph), complete on the device at return."""
    return synced(captured(fn, mode), device)


def seconds_per_call(fn, calls: int) -> float:
    """Host seconds per call of ``fn`` (a ``timed`` function) over ``calls`` calls in a row."""
    tic = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - tic) / calls


def median_paired_ratio(unit_a, unit_b, pairs: int) -> float:
    """Median over ``pairs`` back-to-back runs of unit_a() / unit_b() (each returns seconds),
    the order alternating, after one warm-up pair. Neighbouring units see the same machine
    load, so the ratio stays stable where separately timed rows drift."""
    ratios = []
    for i in range(pairs + 1):
        if i % 2:
            b, a = unit_b(), unit_a()
        else:
            a, b = unit_a(), unit_b()
        if i:
            ratios.append(a / b)
    return statistics.median(ratios)


@pytest.fixture(autouse=True)
def _thread_count(benchmark):
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()


def pytest_benchmark_update_machine_info(config, machine_info):
    """What summarize.py needs besides the rows: versions, the GPU, the backends, the mode."""
    import rdr_fast

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["rdr_fast"] = {
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": rdr_fast.backends(), "torch_threads": torch.get_num_threads(), "smoke": SMOKE,
        "weights_check_shape": list(WEIGHT_SHAPES[0]),
    }
