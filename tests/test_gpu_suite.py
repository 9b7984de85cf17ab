"""bench/gpu_suite.py, the script a lent GPU runs once: checked here so that its one run
does not fail on a code path nobody ran. The dry run takes every section on the CPU
(the Triton kernels interpreted, tiny shapes); the acceptance checks are computed from
rows, so they are tested on rows made up for the purpose."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.py")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "gpu_suite.json") as f:
        result = json.load(f)
    rows = result["rows"]
    assert result["meta"]["dry_run"] is True
    assert [r for r in rows if "error" in r or "skipped" in r] == []
    assert {r["section"] for r in rows} == {"weights", "loss", "step"}
    assert {r["impl"] for r in rows if r["section"] == "step"} == {"CE", "RDR", "SAM", "RDR+SAM", "RDR+sam_k5"}
    # the Triton kernels agree with the PyTorch path on the suite's own inputs
    for row in (r for r in rows if r["mode"] == "check"):
        assert row.get("max_rel_diff", row.get("max_abs_diff")) < 1e-5, row
    assert rows[0]["impl"].startswith("reference-loop") and rows[4]["section"] == "step", "acceptance rows first"
    assert "rdr_fast GPU suite" in run.stdout


def test_checks_are_computed_from_the_rows():
    suite = load_suite()

    def row(section, impl, mode, ms, **extra):
        return {"section": section, "shape": [128, 100, 64], "impl": impl, "mode": mode, "ms": ms, **extra}

    rows = [row("weights", "reference-loop/cuda", "eager", 50.0), row("weights", "triton", "eager", 0.4),
            row("step", "CE", "graph", 10.0, precision="fp32"), row("step", "RDR", "graph", 10.5, precision="fp32"),
            row("step", "CE", "graph", 6.0, precision="bf16-autocast"),
            row("step", "RDR", "graph", 6.1, precision="bf16-autocast"),
            row("step", "RDR", "eager", 1.0, precision="fp32")]  # eager rows never enter the check
    checks = suite.checks(rows)
    assert len(checks) == 3
    weights = next(c for c in checks if "100x" in c["check"])
    assert weights["value"] == pytest.approx(125.0) and weights["pass"]
    steps = [c for c in checks if "within 3%" in c["check"]]
    assert [c["value"] for c in steps] == pytest.approx([1.05, 6.1 / 6.0])
    assert [c["pass"] for c in steps] == [False, True]
    assert suite.checks([r for r in rows if r["section"] != "step"])[0]["pass"]  # missing rows: no check
    assert len(suite.checks([])) == 0
