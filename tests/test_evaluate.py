"""python -m rdr_fast.evaluate: a run's saved model evaluated again gives its own summary."""
from __future__ import annotations

import json

import pytest

from rdr_fast import evaluate

EPOCH_ONLY = {"epoch", "train_loss", "lr", "epoch_seconds", "weight_many", "weight_medium", "weight_few"}


def test_the_last_checkpoint_reproduces_the_summary_exactly(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    result = evaluate.main([str(finished_run), "--which", "last", "--quiet"])
    final = {k: v for k, v in summary["final"].items() if k not in EPOCH_ONLY}
    assert {k: result[k] for k in final} == final  # every metric and per_class, to the last bit
    assert json.loads((finished_run / "eval.json").read_text())["acc_all"] == summary["final"]["acc_all"]


def test_the_best_checkpoint_gives_the_best_epochs_metrics(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    result = evaluate.main([str(finished_run), "--quiet"])  # --which best is the default
    assert result["epoch"] == summary["best"]["epoch"] and result["acc_all"] == summary["best"]["acc_all"]


def test_posthoc_adjustment_changes_the_predictions_by_the_prior(finished_run):
    plain = evaluate.main([str(finished_run), "--which", "last", "--quiet"])
    adjusted = evaluate.main([str(finished_run), "--which", "last", "--posthoc-tau", "2", "--quiet"])
    assert adjusted["posthoc_tau"] == 2.0 and adjusted["per_class"] != plain["per_class"]
    # Subtracting τ·log π favours rare classes: the Few split cannot lose accuracy to the head.
    assert adjusted["acc_index_few"] >= plain["acc_index_few"]


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "is not a run folder: it has no config.json"),
    (["{run}", "--split", "val"], "has no validation split"),
    (["{run}", "--posthoc-tau", "nan"], "--posthoc-tau must be a finite number"),
    (["{run}", "--which", "first"], "argument --which: invalid choice"),
])
def test_bad_input_is_one_error_line_with_exit_status_2(finished_run, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    places = {"missing": tmp_path / "nothing", "empty": tmp_path / "empty", "run": finished_run}
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([a.format(**places) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
