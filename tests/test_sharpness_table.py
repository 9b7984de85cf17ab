"""examples/sharpness_table.py: runs grouped into methods, mean ± std over their seeds."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sharpness_table.py"
spec = importlib.util.spec_from_file_location("sharpness_table", SCRIPT)
sharpness_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sharpness_table)


def fake_run(folder: Path, reweight: str, seed: int, per_class: dict) -> str:
    """A run folder with the two files the table reads; per_class maps class -> λ_max."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"loss": "ce", "reweight": reweight, "sam": "none", "seed": seed}))
    numbers = {c: {loss: {"lambda_max": v, "lambda_min": -v / 10, "trace": 2 * v} for loss in ("trained", "ce")}
               for c, v in per_class.items()}
    (folder / "sharpness.json").write_text(json.dumps({"per_class": numbers}))
    return str(folder)


def test_methods_are_averaged_over_their_runs(tmp_path):
    runs = [fake_run(tmp_path / "ce0", "none", 0, {"7": 10.0, "9": 30.0}),
            fake_run(tmp_path / "ce1", "none", 1, {"7": 20.0, "9": 50.0}),
            fake_run(tmp_path / "rdr0", "rdr", 0, {"7": 4.0, "9": 6.0})]
    lines = sharpness_table.table(runs).splitlines()
    assert lines[0] == "| method | runs | quantity | class 7 | class 9 | average |"
    ce_max = next(line for line in lines if line.startswith("| `--reweight none` | 2 | λ_max"))
    # per class over seeds: 15 ± 7.07 and 40 ± 14.14; the average of the classes per seed: 20, 35
    assert ce_max.split(" | ")[3:] == ["15.00 ± 7.07", "40.00 ± 14.14", f"27.50 ± {statistics.stdev([20, 35]):.2f} |"]
    rdr_trace = next(line for line in lines if line.startswith("| `--reweight rdr` | 1 | trace"))
    assert rdr_trace.endswith("| 8.00 | 12.00 | 10.00 |")


def test_a_run_missing_a_class_is_an_error(tmp_path):
    runs = [fake_run(tmp_path / "a", "none", 0, {"7": 1.0, "9": 2.0}), fake_run(tmp_path / "b", "none", 1, {"7": 1.0})]
    with pytest.raises(ValueError, match="class 9"):
        sharpness_table.table(runs)
