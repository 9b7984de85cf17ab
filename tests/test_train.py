"""The training CLI end to end on digits_lt: outputs, resume equivalence, clear failures."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from rdr_fast import train

FAST = ["--epochs", "2", "--batch-size", "64", "--quiet"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    return train.main(["--out", out, *FAST, *extra]), out


def test_end_to_end_writes_every_output(tmp_path, capsys):
    result, out = run(tmp_path, "e2e", "--reweight", "rdr", "--loss", "la")
    assert result["finished"]
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "summary.json", "weights.png", "accuracy.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"acc_all", "acc_many", "acc_medium", "acc_few", "weight_many", "weight_few", "lr"} <= set(rows[0])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(summary["per_class"]) == 10 and summary["method"] == "rdr+la"
    assert summary["class_counts"] == sorted(summary["class_counts"], reverse=True)
    printed = capsys.readouterr().out
    assert "Many" in printed and "Few" in printed and "All" in printed


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path):
    straight, out_a = run(tmp_path, "straight", "--warmup-epochs", "0.5")
    first, out_b = run(tmp_path, "resumed", "--warmup-epochs", "0.5", "--stop-after", "1")
    assert not first["finished"] and len(first["history"]) == 1
    resumed = train.main(["--resume", out_b, "--quiet"])
    assert resumed["finished"]
    drop = {"epoch_seconds"}
    strip = [{k: v for k, v in row.items() if k not in drop} for row in straight["history"]]
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed["history"]] == strip
    a = torch.load(os.path.join(out_a, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(out_b, "checkpoint.pt"), weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["criterion"]:
        assert torch.equal(a["criterion"][key], b["criterion"][key]), key


def test_mismatched_checkpoint_is_refused(tmp_path, capsys):
    _, out = run(tmp_path, "base", "--stop-after", "1")
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", out, "--reweight", "none", "--quiet"])
    assert "belongs to another experiment" in str(exc.value) and "reweight" in str(exc.value)


def test_corrupt_checkpoint_is_refused(tmp_path):
    _, out = run(tmp_path, "corrupt", "--stop-after", "1")
    with open(os.path.join(out, "checkpoint.pt"), "wb") as handle:
        handle.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", out, "--quiet"])
    assert "is corrupt" in str(exc.value)


def test_missing_data_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "cifar10_lt", "--data-root", str(tmp_path / "nowhere"), "--out",
                    str(tmp_path / "x"), "--quiet"])
    message = str(exc.value)
    assert message.startswith("error:") and "--data-root" in message


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path, monkeypatch):
    original = train.build

    def poisoned(cfg, ds, ctx):
        model, forward, criterion, optimizer, scheduler = original(cfg, ds, ctx)
        with torch.no_grad():
            model.fc.bias.fill_(float("nan"))
        return model, forward, criterion, optimizer, scheduler
    monkeypatch.setattr(train, "build", poisoned)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "nan")
    assert "non-finite loss at epoch 1, step 1" in str(exc.value)


def test_bad_flag_values_are_rejected():
    with pytest.raises(SystemExit):
        train.parse_args(["--reweight", "bogus"])
    assert train.parse_args(["--no-quiet"]).quiet is False
    assert train.parse_args(["--amp"]).amp is True
