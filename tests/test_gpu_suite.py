"""bench/gpu_suite.py and bench/summarize.py. The suite runs on a GPU machine from a fresh
copy of the repository; its dry run takes every section on the CPU (the tests collected,
the benchmarks' cpu rows in smoke mode, the Triton kernels interpreted), so no section
fails there on a code path nobody ran. The checks are computed from rows, so they are
tested on rows made up for the purpose."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_bench_module

SUITE = os.path.join(ROOT, "bench", "gpu_suite.py")
SECTIONS = ["install", "tests_gpu", "bench_weights", "bench_step", "bench_sam", "bench_loss", "bench_loaders",
            "bench_analysis", "bench_scaling", "summarize", "tests_cpu"]


def labels(path) -> set:
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    assert {b["extra_info"]["device"] for b in benchmarks} == {"cpu"}
    return {next(b["extra_info"][k] for k in ("backend", "method", "loader") if k in b["extra_info"])
            for b in benchmarks if "paired" not in b["group"]}


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "gpu_suite.json") as f:
        result = json.load(f)
    assert result["meta"]["dry_run"] is True and result["machine_info"]["rdr_fast"]["smoke"] is True
    sections = {s["name"]: s for s in result["sections"]}
    assert list(sections) == SECTIONS
    assert sections.pop("install") == {"name": "install", "skipped": "dry run"}
    assert [(name, s.get("rc"), s.get("skipped")) for name, s in sections.items() if s.get("rc") != 0] == []
    for name in ("tests_gpu", "tests_cpu"):
        assert "tests collected" in sections[name]["tail"]
    # every row of every bench file ran on the CPU, the Triton rows in the interpreter
    assert {"reference", "official", "torch", "triton", "triton BS16/BK64/w4", "rdr_fast"} <= labels(
        tmp_path / "bench_weights.json")
    assert {"unfused", "torch", "triton", "kernel", "op", "op create_graph"} <= labels(tmp_path / "bench_loss.json")
    assert labels(tmp_path / "bench_step.json") == {"ce", "official", "rdr", "ce+official+rdr (alternated)"}
    assert {"torch", "triton"} <= labels(tmp_path / "bench_scaling.json")
    assert labels(tmp_path / "bench_sam.json") == {"sgd", "sam_naive", "sam", "sam_k", "looksam"}
    assert {"torchvision", "torch", "gpu"} <= labels(tmp_path / "bench_loaders.json")
    assert labels(tmp_path / "bench_analysis.json") == {f"{e} {loss}" for e in ("hvp", "extremes", "trace")
                                                        for loss in ("rdr", "ce")} | {"density rdr"}
    # every CPU check computed from those rows (smoke figures: pass or FAIL; missing only
    # for the C++ kernel's speed-up where rdr_fast._C is not built)
    checks = result["checks"]
    has_cpp = result["machine_info"]["rdr_fast"]["backends"]["rdr_weights_and_update"]["cpu"] == "cpp"
    assert len(checks) == 10 and checks[0]["check"].startswith("weights+update cpu"), checks
    assert {c["status"] for c in checks[int(not has_cpp):]} <= {"pass", "FAIL"}, checks
    assert "rdr_fast GPU suite" in run.stdout and "**checks**" in run.stdout and "**scaling**" in run.stdout


def bench(test, median, group="g", **extra):
    return {"name": f"{test}[x]", "group": group, "extra_info": extra,
            "stats": {"median": median, "min": median, "rounds": 1}}


def test_checks_are_computed_from_the_rows():
    summarize = load_bench_module("summarize")
    shape = [128, 100, 64]
    benchmarks = [
        bench("test_weights_and_update", 50e-3, device="cuda", shape=shape, backend="reference"),
        bench("test_weights_and_update", 0.4e-3, device="cuda", shape=shape, backend="triton"),
        bench("test_weights_and_update", 1.0, device="cuda", shape=[256, 1000, 512], backend="reference"),
        bench("test_weights_and_update", 7.5e-3, device="cpu", shape=shape, backend="reference"),  # no cpp row
        bench("test_weights_and_update", 80e-3, device="cuda", shape=shape, backend="official"),
        # against the authors' structure the CPU counts single-thread rows only: 125×, not 500×
        bench("test_weights_and_update", 50e-3, device="cpu", shape=[256, 1000, 512], backend="official",
              torch_threads=1),
        bench("test_weights_and_update", 0.4e-3, device="cpu", shape=[256, 1000, 512], backend="cpp",
              torch_threads=1),
        bench("test_weights_and_update", 0.1e-3, device="cpu", shape=[256, 1000, 512], backend="cpp",
              torch_threads=2),
        bench("test_weights_update_and_loss", 10e-3, device="cuda", shape=shape, backend="official"),  # no rdr_fast
        bench("test_resnet32_step", 0.4, device="cpu", mode="eager", precision="fp32", backend="rdr"),  # no pair
        bench("test_resnet32_step", 0.01, device="cuda", mode="graph", precision="fp32", backend="ce"),
        bench("test_resnet32_step_pair", 0.02, device="cuda", mode="graph", precision="fp32", rdr_over_ce=1.05),
        bench("test_resnet32_step", 0.01, device="cuda", mode="graph", precision="bf16", backend="rdr"),
        bench("test_resnet32_step_pair", 0.02, device="cuda", mode="graph", precision="bf16", rdr_over_ce=1.01),
        bench("test_paired_ratios_vs_sgd", 0.0, group="sam/cuda/paired", device="cuda",
              **{"ce/sam_vs_sgd": 1.9, "ce/sam_k_vs_sgd": 1.4, "ce/looksam_vs_sgd": 1.25,
                 "rdr/sam_vs_sgd": 2.1, "rdr/sam_k_vs_sgd": 1.35, "rdr/looksam_vs_sgd": 1.35,
                 "sam_rdr_vs_sam_ce": 1.02}),
        bench("test_sam_step", 10.0, device="cuda", mode="graph", method="sam", loss="ce"),
        bench("test_sam_step", 10.2, device="cuda", mode="graph", method="sam", loss="rdr"),
        bench("test_sam_step", 1.0, device="cuda", mode="eager", method="sam", loss="rdr"),  # no ce row
        bench("test_module_paired", 0.0, group="module/cpu/paired", device="cpu", shape=shape, rdr_vs_ce=1.4),
        bench("test_module_paired", 0.0, group="module/cpu/paired", device="cpu", shape=[256, 1000, 512],
              rdr_vs_ce=1.6),  # only the first shape is checked
        bench("test_op_vs_kernel_paired", 0.0, device="cpu", shape=[128, 100], op_vs_kernel=2.7),
        bench("test_op_vs_kernel_paired", 0.0, device="cpu", shape=[256, 1000], op_vs_kernel=1.6),  # the checked one
        bench("test_op_vs_kernel_paired", 0.0, device="cuda", shape=[256, 1000], op_vs_kernel=3.0),  # CPU only
    ]
    data = {"machine_info": {"rdr_fast": {"weights_check_shape": shape}}, "benchmarks": benchmarks}
    got = [(c["check"], c["status"], c["value"] and round(c["value"], 4)) for c in summarize.checks(data)]
    assert got == [
        ("weights+update cpu: cpp vs the reference loop at (128, 100, 64)", "missing", None),
        ("weights+update cuda: triton vs the reference loop at (128, 100, 64)", "pass", 125.0),
        ("weights+update cuda: triton vs the authors' structure at (128, 100, 64)", "pass", 200.0),
        ("weights+update cpu, 1 thread: cpp vs the authors' structure at (256, 1000, 512)", "FAIL", 125.0),
        ("weights+update+loss cuda: rdr_fast vs the authors' structure at (128, 100, 64)", "missing", None),
        ("ResNet-32 step cpu eager fp32: RDR / CE (paired)", "missing", None),
        ("ResNet-32 step cuda graph bf16: RDR / CE (paired)", "pass", 1.01),
        ("ResNet-32 step cuda graph fp32: RDR / CE (paired)", "FAIL", 1.05),
        ("RDRLoss cpu (128, 100, 64): default args / CE (paired)", "pass", 1.4),
        ("loss cpu B256-C1000: weighted_loss op fwd+bwd / bare kernel (paired)", "pass", 1.6),
        ("SAM cuda ce: fused SAM / SGD step (paired)", "pass", 1.9),
        ("SAM cuda ce: min(sam_k, looksam) / SGD step (paired)", "pass", 1.25),
        ("SAM cuda rdr: fused SAM / SGD step (paired)", "FAIL", 2.1),
        ("SAM cuda rdr: min(sam_k, looksam) / SGD step (paired)", "FAIL", 1.35),
        ("SAM cuda: with RDR / without (paired)", "pass", 1.02),
        ("SAM step cuda eager: with RDR / without", "missing", None),
        ("SAM step cuda graph: with RDR / without", "pass", 1.02),
    ]
    table = summarize.checks_table(summarize.checks(data))
    assert "| SAM cuda rdr: fused SAM / SGD step (paired) | 2.100 | ≤ 2.05 | FAIL |" in table
    assert summarize.checks({"machine_info": {}, "benchmarks": []}) == []


def test_tables_rate_each_row_against_the_baselines_of_its_group():
    summarize = load_bench_module("summarize")
    data = {"benchmarks": [bench("test_loss", 2e-3, group="loss", backend="unfused"),
                           bench("test_loss", 1e-3, group="loss", backend="cpp"),
                           bench("test_paired_ratios_vs_sgd", 0.0, group="sam/cpu/paired", method="paired",
                                 **{"ce/sam_vs_sgd": 1.95})]}
    lines = summarize.tables(data).splitlines()
    assert "| cpp | 1,000.0 | 1,000.0 | 1 | 2.00× |" in lines
    assert "paired: ce/sam_vs_sgd = 1.9500" in lines
    assert not any(line.startswith("| paired") for line in lines)  # a paired group has no timed row


def test_scaling_rows_get_one_table_of_their_own():
    summarize = load_bench_module("summarize")
    info = dict(op="weights+update", device="cpu", backend="cpp", shape=[128, 1000, 64], peak_extra_bytes=2048,
                flops=2e6, bytes=4e6, attainable_fraction=0.25)
    data = {"benchmarks": [bench("test_scaling_weights_and_update", 1e-3, group="scaling/weights+update/x", **info),
                           bench("test_loss", 2e-3, group="loss", backend="unfused")]}
    assert "scaling/" not in summarize.tables(data) and "**loss**" in summarize.tables(data)
    table = summarize.scaling_table(data).splitlines()
    assert table[2] == "| weights+update | cpu | cpp | 128 | 1000 | 64 | 1,000.0 | 2.0 | 2.00 | 4.00 | 25.0% |"
    assert summarize.scaling_table({"benchmarks": data["benchmarks"][1:]}) == ""
