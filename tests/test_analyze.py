"""python -m rdr_fast.analyze on a finished digits_lt run: the files it writes, its table, and
its refusals."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rdr_fast import analyze

FAST = ["--iters", "10", "--trace-samples", "2", "--density-steps", "6", "--density-runs", "1", "--quiet"]


@pytest.fixture
def run_dir(finished_run):
    return finished_run


@pytest.mark.slow
def test_analyze_writes_sharpness_spectrum_and_landscape(run_dir):
    result = analyze.main([str(run_dir), "--classes", "8,9", *FAST])
    for name in ("sharpness.json", "spectrum.png", "landscape.png"):
        assert (run_dir / name).stat().st_size > 0, name
    saved = json.loads((run_dir / "sharpness.json").read_text())
    assert set(saved["per_class"]) == {"8", "9"} and set(saved["per_split"]) == {"few"}
    for numbers in [*saved["per_class"].values(), *saved["per_split"].values()]:
        for loss in ("trained", "ce"):
            n = numbers[loss]
            assert all(math.isfinite(v) for v in n.values())
            assert n["lambda_max"] >= n["lambda_min"] and n["trace_stderr"] > 0
    assert saved["spectrum"]["class"] == 9  # the rarest chosen class
    assert saved == json.loads(json.dumps(result))
    assert "λ_max" in analyze.table(result) and "few" in analyze.table(result)


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "is not a run folder: it has no config.json"),
    (["{no_checkpoint}"], "has no last checkpoint"),
    (["{run}", "--classes", "3,99"], "--classes: [99] not in [0, 10)"),
    (["{run}", "--classes", "tail"], "--classes must be few, many, medium, all or class indices"),
    (["{run}", "--trace-samples", "1"], "--trace-samples must be >= 2"),
    (["{run}", "--which", "first"], "argument --which: invalid choice"),
])
def test_bad_input_is_one_error_line_with_exit_status_2(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_checkpoint").mkdir()
    (tmp_path / "no_checkpoint" / "config.json").write_text((run_dir / "config.json").read_text())
    places = {"missing": tmp_path / "nothing", "empty": tmp_path / "empty", "no_checkpoint": tmp_path / "no_checkpoint",
              "run": run_dir}
    with pytest.raises(SystemExit) as exit_:
        analyze.main([a.format(**places) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_command_runs_as_a_module_and_refuses_with_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rdr_fast.analyze", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
