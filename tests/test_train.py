"""The training CLI end to end on digits_lt: outputs, resume equivalence, export, clear
failures during a run (bad flags: test_cli.py)."""
from __future__ import annotations

import csv
import errno
import json
import os

import pytest
import torch

from rdr_fast import run_io, train
from rdr_fast.cli_checks import UsageError

FAST = ["--epochs", "2", "--batch-size", "64", "--quiet"]


def run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    return train.main(["--out", out, *FAST, *extra]), out


def test_end_to_end_writes_every_output(tmp_path, capsys):
    result, out = run(tmp_path, "e2e", "--reweight", "rdr", "--loss", "la")
    assert result["finished"]
    for name in ("config.json", "checkpoint.pt", "best.pt", "metrics.csv", "summary.json", "weights.png", "accuracy.png",
                 "confusion.csv", "confusion.png", "reliability.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"acc_all", "acc_top5", "acc_index_many", "acc_index_medium", "acc_index_few", "acc_count_few", "acc_balanced",
            "acc_worst_class", "ece", "nll", "weight_many", "weight_few", "lr"} <= set(rows[0])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(summary["final"]["per_class"]) == 10 and summary["method"] == "rdr+la"
    assert summary["final"]["epoch"] == 2 and summary["best"]["selected_on"] == "test"
    assert summary["best"]["acc_all"] == max(float(r["acc_all"]) for r in rows)
    # It learned: 10 balanced test classes put chance at 10 %; these two epochs reach about
    # 38 %, and about 9 % with a learning rate of 1e-9.
    assert summary["final"]["acc_all"] > 25.0 and float(rows[-1]["acc_all"]) == pytest.approx(summary["final"]["acc_all"])
    assert summary["class_counts"] == sorted(summary["class_counts"], reverse=True)
    printed = capsys.readouterr().out
    assert "Many % (class index)" in printed and "Few % (train count)" in printed and "ECE %" in printed


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path):
    straight, out_a = run(tmp_path, "straight", "--warmup-epochs", "0.5")
    first, out_b = run(tmp_path, "resumed", "--warmup-epochs", "0.5", "--stop-after", "1")
    assert not first["finished"] and len(first["history"]) == 1
    resumed = train.main(["--resume", out_b, "--quiet"])
    assert resumed["finished"]
    drop = {"epoch_seconds"}
    strip = [{k: v for k, v in row.items() if k not in drop} for row in straight["history"]]
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed["history"]] == strip
    a = torch.load(os.path.join(out_a, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(out_b, "checkpoint.pt"), weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["criterion"]:
        assert torch.equal(a["criterion"][key], b["criterion"][key]), key


def test_mismatched_checkpoint_is_refused(tmp_path, capsys):
    _, out = run(tmp_path, "base", "--stop-after", "1")
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", out, "--reweight", "none", "--quiet"])
    assert "belongs to another experiment" in str(exc.value) and "reweight" in str(exc.value)


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would write the marker file
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_corrupt_or_code_carrying_checkpoint_is_refused(tmp_path):
    _, out = run(tmp_path, "corrupt", "--stop-after", "1")
    path = os.path.join(out, "checkpoint.pt")
    with open(path, "wb") as handle:
        handle.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", out, "--quiet"])
    assert str(exc.value).startswith("error: ") and "is corrupt" in str(exc.value)
    marker = tmp_path / "marker"
    torch.save({"identity": {}, "epoch": 1, "model": WritesMarker(str(marker))}, path)
    for extra in ([], ["--export", str(tmp_path / "model.pt")]):   # training and export-only
        with pytest.raises(SystemExit) as exc:
            train.main(["--resume", out, "--quiet", *extra])
        assert "pickled Python object" in str(exc.value) and path in str(exc.value)
        assert not marker.exists()


def test_export_after_training_and_from_a_stopped_run(tmp_path):
    first, second = str(tmp_path / "first.weights"), str(tmp_path / "second.weights")
    result, out = run(tmp_path, "export", "--stop-after", "1", "--export", first)
    assert not result["finished"]
    assert train.main(["--resume", out, "--export", second, "--quiet"]) == {**result, "finished": False}
    checkpoint = run_io.load_checkpoint(out)
    assert checkpoint["epoch"] == 1, "exporting trains nothing"
    for path in (first, second):
        weights = run_io.load_weights(path)
        assert weights.keys() == checkpoint["model"].keys()
        assert all(torch.equal(weights[k], v) for k, v in checkpoint["model"].items())


def test_full_disk_is_one_clear_message(tmp_path, monkeypatch):
    def full(folder, state, name="checkpoint.pt"):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, name))
    monkeypatch.setattr(run_io, "save_checkpoint", full)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "full", "--epochs", "1")
    # best.pt is the first file written after the first evaluation
    assert str(exc.value) == f"error: No space left on device: {tmp_path / 'full' / 'best.pt'}"


def test_missing_data_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "cifar10_lt", "--data-root", str(tmp_path), "--out",   # a folder without CIFAR
                    str(tmp_path / "x"), "--quiet"])
    message = str(exc.value)
    assert message.startswith("error:") and "--data-root" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "x"), "no run folder for a run that could not start"


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
    assert str(exc.value).startswith("error: non-finite loss at epoch 1, step 1")
    monkeypatch.setenv("RDR_FAST_DEBUG", "1")   # the exception itself, for its traceback
    with pytest.raises(FloatingPointError):
        run(tmp_path, "nan_debug")


def test_bad_flag_values_are_rejected():
    with pytest.raises(UsageError, match="--reweight"):
        train.parse_args(["--reweight", "bogus"])
    assert train.parse_args(["--no-quiet"]).quiet is False
    assert train.parse_args(["--amp"]).amp is True


def test_compile_failure_is_one_clear_message(tmp_path, monkeypatch):
    """torch.compile failing on this machine (here: a backend that raises, as Inductor
    does without a working compiler) ends the run at its first step with one line."""
    compile_for_real = torch.compile

    def broken_backend(graph, example_inputs):
        raise RuntimeError("the C++ compiler crashed")
    monkeypatch.setattr(torch, "compile", lambda model: compile_for_real(model, backend=broken_backend))
    try:
        with pytest.raises(SystemExit) as exc:
            run(tmp_path, "compiled", "--compile", "--epochs", "1")
    finally:
        torch._dynamo.reset()
    message = str(exc.value)
    assert message.startswith("error: --compile: torch.compile failed at the first step (") and "\n" not in message
    assert "the C++ compiler crashed" in message and message.endswith("run without --compile")
