"""Every bad input to `python -m rdr_fast.train` is refused before any work starts: exit
status 2, exactly one stderr line, starting `error:` and naming the flag, no traceback,
and no run folder left behind.

How the table runs: every row goes through train.main in this process (a refusal costs
milliseconds there; an uncaught exception would fail the test, so "no traceback" holds
too), and four representative rows also run as their own `python -m rdr_fast.train`
processes, two at a time with concurrent.futures, to check what a user sees: the exit
status and the bare stderr. Each process spends 3-8 s importing torch on a shared
2-core machine, so every row as a process takes minutes; RDR_FAST_CLI_ALL_PROCESSES=1
makes the process test run every row.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import rdr_fast
from rdr_fast import cli_checks, run_io, train

NO_CUDA = not torch.cuda.is_available()
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"   # one past the last device: never exists

# (kind, arguments, what the message must name). {tmp} is a scene folder (see `scene`),
# {ro} a folder nobody may write in, {missing_cuda} a CUDA device this machine lacks.
ROWS = [
    # integer flags where 0 or a negative number makes no sense
    ("range", "--epochs 0", "--epochs"),
    ("range", "--epochs -3", "--epochs"),
    ("range", "--batch-size 0", "--batch-size"),
    ("range", "--eval-every 0", "--eval-every"),
    ("range", "--sam-k 0", "--sam-k"),
    ("range", "--stop-after 0", "--stop-after"),
    ("range", "--num-workers -1", "--num-workers"),
    ("range", "--seed -1", "--seed"),
    ("range", f"--seed {2**32}", "--seed"),
    # real-valued flags out of range
    ("range", "--lr -0.1", "--lr"),
    ("range", "--lr 0", "--lr"),
    ("range", "--momentum 1.0", "--momentum"),
    ("range", "--weight-decay -1e-4", "--weight-decay"),
    ("range", "--imb-factor 0.5", "--imb-factor"),
    ("range", "--noise-ratio 1.5", "--noise-ratio"),
    ("range", "--noise-ratio -0.1", "--noise-ratio"),
    ("range", "--rdr-momentum 1.5", "--rdr-momentum"),
    ("range", "--temperature -1", "--temperature"),
    ("range", "--warmup-epochs -1", "--warmup-epochs"),
    ("range", "--focal-gamma -1", "--focal-gamma"),
    ("range", "--cb-beta 1.0", "--cb-beta"),
    ("range", "--rho -0.05", "--rho"),
    ("range", "--sam-alpha -1", "--sam-alpha"),
    ("range", "--tail-threshold -1", "--tail-threshold"),
    ("range", "--flat-ratio 1.5", "--flat-ratio"),
    # NaN and ±inf, refused on every real-valued flag
    ("non-finite", "--imb-factor nan", "--imb-factor"),
    ("non-finite", "--noise-ratio nan", "--noise-ratio"),
    ("non-finite", "--rdr-momentum nan", "--rdr-momentum"),
    ("non-finite", "--temperature inf", "--temperature"),
    ("non-finite", "--warmup-epochs nan", "--warmup-epochs"),
    ("non-finite", "--tau nan", "--tau"),
    ("non-finite", "--tau -inf", "--tau"),
    ("non-finite", "--focal-gamma inf", "--focal-gamma"),
    ("non-finite", "--cb-beta nan", "--cb-beta"),
    ("non-finite", "--lr inf", "--lr"),
    ("non-finite", "--lr nan", "--lr"),
    ("non-finite", "--momentum nan", "--momentum"),
    ("non-finite", "--weight-decay inf", "--weight-decay"),
    ("non-finite", "--rho nan", "--rho"),
    ("non-finite", "--sam-alpha inf", "--sam-alpha"),
    ("non-finite", "--tail-threshold nan", "--tail-threshold"),
    ("non-finite", "--flat-ratio nan", "--flat-ratio"),
    # argparse's own refusals: wrong type, unknown choice or flag, missing value
    ("argparse", "--epochs x", "--epochs"),
    ("argparse", "--batch-size 1.5", "--batch-size"),
    ("argparse", "--dataset mnist", "--dataset"),
    ("argparse", "--model vgg16", "--model"),
    ("argparse", "--loss hinge", "--loss"),
    ("argparse", "--reweight bogus", "--reweight"),
    ("argparse", "--sam adam", "--sam"),
    ("argparse", "--loader fast", "--loader"),
    ("argparse", "--bogus-flag", "--bogus-flag"),
    ("argparse", "--epochs", "--epochs"),
    # flags that contradict the dataset or each other
    ("combination", "--model resnet50", "--model"),
    ("combination", "--dataset fmnist_lt --model resnet152", "--model"),
    ("combination", "--dataset imagenet_lt", "--data-root"),
    ("combination", "--dataset places_lt --data-root {tmp}/data --download", "--download"),
    ("combination", "--data-root {tmp}/data", "--data-root"),
    ("combination", "--dataset imagenet_lt --data-root {tmp}/data --loader gpu", "--loader"),
    ("combination", "--resume {tmp}/run --out {tmp}/elsewhere", "--out"),
    # files and folders that must exist and be readable
    ("files", "--dataset cifar10_lt --data-root {tmp}/nowhere", "--data-root"),
    ("files", "--pretrained {tmp}/nowhere.pt", "--pretrained"),
    ("files", "--resume {tmp}/nowhere", "--resume"),
    ("files", "--resume {tmp}/corrupt_config", "--resume"),
    ("files", "--resume {tmp}/list_config", "--resume"),
    ("files", "--resume {tmp}/bad_value_config", "--lr"),
    ("files", "--resume {tmp}/wrong_type_config", "--epochs"),
    ("files", "--resume {tmp}/no_checkpoint", "--resume"),
    # devices this machine does not have (plain `cuda` only where there is none)
    ("device", "--device gpu", "--device"),
    ("device", "--device {missing_cuda}", "--device"),
    *([("device", "--device cuda", "--device")] if NO_CUDA else []),
    # where the run would be written
    ("output", "--out {tmp}/a_file", "--out"),
    ("output", "--out {tmp}/a_file/run", "--out"),
    ("output", "--out {ro}/run", "--out"),
    ("output", "--out {tmp}/run", "--out"),
    ("output", "--export {tmp}/data", "--export"),
    ("output", "--export {tmp}/nowhere/model.pt", "--export"),
    ("output", "--export {ro}/model.pt", "--export"),
    *([] if run_io.safetensors_available() else [("output", "--export {tmp}/model.safetensors", "--export")]),
]


def readonly_folder(tmp) -> str:
    """A folder this process cannot write in: chmod 555, or /proc where permission bits
    do not stop us (root)."""
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder) if cli_checks._unwritable(str(folder)) else "/proc"


@pytest.fixture
def scene(tmp_path, monkeypatch):
    """A folder with the files the rows point at; the default --out lands inside it."""
    tmp = tmp_path / "scene"
    (tmp / "data").mkdir(parents=True)
    (tmp / "a_file").write_text("not a folder")
    good = {"dataset": "digits_lt", "epochs": 2}
    for name, text in {"run": json.dumps(good), "no_checkpoint": json.dumps(good),
                       "corrupt_config": '{"dataset": "digits_lt", "epo', "list_config": "[1, 2]",
                       "bad_value_config": json.dumps({**good, "lr": -1.0}),
                       "wrong_type_config": json.dumps({**good, "epochs": "2"})}.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(text)
    for name in ("run", "bad_value_config", "wrong_type_config"):
        (tmp / name / run_io.CHECKPOINT).write_bytes(b"only looked at after the checks")
    monkeypatch.chdir(tmp)
    return {"tmp": str(tmp), "ro": readonly_folder(tmp_path), "missing_cuda": MISSING_CUDA}


def tree(folder) -> set:
    return {os.path.join(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files}


def arguments(row_args: str, scene: dict) -> list:
    return row_args.format(**scene).split()


def assert_one_error_line(stderr: str, must_name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and must_name in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind, args, must_name", ROWS)
def test_bad_input_is_refused_before_any_work(kind, args, must_name, scene, capsys):
    before = tree(scene["tmp"])
    with pytest.raises(SystemExit) as exc:
        train.main(arguments(args, scene))
    assert exc.value.code == 2 and str(exc.value).startswith("error: ")
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, must_name)
    assert captured.out == ""
    assert tree(scene["tmp"]) == before, "a refused run must not create files or folders"


# The process rows: our own check, argparse's, a corrupt config.json, an unusable --out.
PROCESS_ARGS = ("--imb-factor nan", "--epochs x", "--resume {tmp}/corrupt_config", "--out {tmp}/a_file")


def test_bad_inputs_are_refused_by_the_process(scene):
    """What a user sees: exit status 2, one stderr line, no traceback, no folder."""
    every = os.environ.get("RDR_FAST_CLI_ALL_PROCESSES")
    rows = [row for row in ROWS if every or row[1] in PROCESS_ARGS]
    before = tree(scene["tmp"])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(rdr_fast.__file__)),
           "OMP_NUM_THREADS": "1"}
    env.pop("RDR_FAST_DEBUG", None)

    def refuse(row):
        cmd = [sys.executable, "-m", "rdr_fast.train", *arguments(row[1], scene)]
        return row, subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=scene["tmp"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for (kind, args, must_name), done in pool.map(refuse, rows):
            assert done.returncode == 2, (args, done.stderr)
            assert_one_error_line(done.stderr, must_name)
    assert tree(scene["tmp"]) == before


def test_every_numeric_flag_has_a_range():
    numeric = {f.name for f in dataclasses.fields(train.Config) if f.type.split(" ")[0] in ("int", "float")}
    assert numeric == set(cli_checks.RANGES)


def test_good_flags_pass_the_checks(scene):
    cfg = train.configure(["--epochs", "3", "--batch-size", "7", "--tau", "-1", "--noise-ratio", "0",
                           "--export", os.path.join(scene["tmp"], "model.pt"), "--device", "cpu"])
    assert (cfg.epochs, cfg.batch_size, cfg.tau, cfg.device) == (3, 7, -1.0, "cpu")
    assert cfg.out.startswith("runs" + os.sep)   # the default folder, not created yet
    assert not os.path.exists("runs")
