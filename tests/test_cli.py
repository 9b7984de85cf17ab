"""Every bad input to `python -m rdr_fast.train` is refused before any work starts: exit
status 2, exactly one stderr line, starting `error:` and naming the flag, no traceback,
and no file or folder left behind.

How the table runs: every row is its own process. A `python -m` process spends 3-8 s
importing torch on a shared 2-core machine, so the test process imports torch and
rdr_fast once and forks a child per row (`refuse_in_child`): the child runs the module
as `python -m` does (runpy, sys.argv, a fresh warnings state, the default excepthook for
an uncaught exception, SystemExit turned into the exit status) with its fds 1 and 2 on
files and its cwd in a fresh empty folder, and the parent reads its exit status and
stderr. A fork costs milliseconds. A few rows also run as genuine `python -m
rdr_fast.train` processes, two at a time, to check that the fork tells the truth;
RDR_FAST_CLI_ALL_PROCESSES=1 runs every row that way (minutes).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

import rdr_fast
import rdr_fast.data
from rdr_fast import cli_checks, loggers, run_io, train
from rdr_fast.models import build_model

NO_CUDA = not torch.cuda.is_available()
TIMM = importlib.util.find_spec("timm") is not None
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"   # one past the last device: never exists
TOO_MANY_WORKERS = cli_checks.WORKERS_PER_CPU * cli_checks.usable_cpus() + 1

# (kind, arguments, the flags the message must name). {tmp} is a scene folder (see
# `scene`), {ro} a folder nobody may write in, {missing_cuda} a CUDA device this machine lacks.
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
    # real-valued flags out of range, below and above
    ("range", "--lr -0.1", "--lr"),
    ("range", "--lr 0", "--lr"),
    ("range", "--lr 1e300", "--lr"),
    ("range", "--lr 10.5", "--lr"),
    ("range", "--momentum 1.0", "--momentum"),
    ("range", "--weight-decay -1e-4", "--weight-decay"),
    ("range", "--weight-decay 2", "--weight-decay"),
    ("range", "--imb-factor 0.5", "--imb-factor"),
    ("range", "--noise-ratio 1.5", "--noise-ratio"),
    ("range", "--noise-ratio -0.1", "--noise-ratio"),
    ("range", "--rdr-momentum 1.5", "--rdr-momentum"),
    ("range", "--temperature -1", "--temperature"),
    ("range", "--temperature 1e300", "--temperature"),
    ("range", "--temperature 10.5", "--temperature"),
    ("range", "--warmup-epochs -1", "--warmup-epochs"),
    ("range", "--lr-warmup-epochs -1", "--lr-warmup-epochs"),
    ("range", "--lr-schedule step --lr-milestones -1 5", "--lr-milestones"),
    ("range", "--tau 1e300", "--tau"),
    ("range", "--tau -11", "--tau"),
    ("range", "--focal-gamma -1", "--focal-gamma"),
    ("range", "--focal-gamma 11", "--focal-gamma"),
    ("range", "--cb-beta 1.0", "--cb-beta"),
    ("range", "--rho -0.05", "--rho"),
    ("range", "--rho 1e300", "--rho"),
    ("range", "--sam-alpha -1", "--sam-alpha"),
    ("range", "--sam-alpha 100", "--sam-alpha"),
    ("range", "--tail-threshold -1", "--tail-threshold"),
    ("range", "--flat-ratio 1.5", "--flat-ratio"),
    # NaN and ±inf, refused on every real-valued flag
    ("non-finite", "--imb-factor nan", "--imb-factor"),
    ("non-finite", "--noise-ratio nan", "--noise-ratio"),
    ("non-finite", "--rdr-momentum nan", "--rdr-momentum"),
    ("non-finite", "--temperature inf", "--temperature"),
    ("non-finite", "--warmup-epochs nan", "--warmup-epochs"),
    ("non-finite", "--lr-warmup-epochs inf", "--lr-warmup-epochs"),
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
    ("argparse", "--logger mlflow", "--logger"),
    ("argparse", "--config", "--config"),
    ("argparse", "--loss hinge", "--loss"),
    ("argparse", "--reweight bogus", "--reweight"),
    ("argparse", "--sam adam", "--sam"),
    ("argparse", "--loader fast", "--loader"),
    ("argparse", "--recipe authors", "--recipe"),
    ("argparse", "--lr-schedule linear", "--lr-schedule"),
    ("argparse", "--augment mixup", "--augment"),
    ("argparse", "--augment randaug", "--augment"),
    ("argparse", "--imb-type linear", "--imb-type"),
    ("argparse", "--lr-milestones 160", "--lr-milestones"),
    ("argparse", "--lr-milestones 1.5 3", "--lr-milestones"),
    ("argparse", "--bogus-flag", "--bogus-flag"),
    ("argparse", "--epochs", "--epochs"),
    # models that are not there, or do not fit the dataset's images
    ("model", "--model vgg16", "--model"),
    ("model", "--model torchvision:resnet181", "--model"),
    ("model", "--model torchvision:fasterrcnn_resnet50_fpn", "--model"),
    ("model", "--model torchvision:resnet18", "--model"),
    ("model", "--dataset fmnist_lt --model resnext50", "--model"),
    ("model", "--model resnet10", "--model"),
    ("model", "--dataset cifar10_lt --data-root {tmp}/data --model torchvision:vit_b_16", "--model"),
    ("model", "--dataset cifar10_lt --data-root {tmp}/data --model torchvision:squeezenet1_0", "--model"),
    *([] if TIMM else [("model", "--model timm:resnet18", "--model")]),
    # settings files that cannot be read or hold a bad key or value
    ("config", "--config {tmp}/nowhere.json", "--config"),
    ("config", "--config {tmp}/settings.toml", "--config"),
    ("config", "--config {tmp}/corrupt_config/config.json", "--config"),
    ("config", "--config {tmp}/unknown_key.json", "--config"),
    ("config", "--config {tmp}/bad_value.yaml", "--config --lr"),
    ("config", "--config {tmp}/wrong_type.json", "--config --epochs"),
    # trackers whose package is not installed
    *[("logger", f"--logger {kind}", "--logger") for kind in ("tensorboard", "wandb") if loggers.missing_package(kind)],
    # flags that contradict the dataset or each other
    ("combination", "--model resnet50", "--model"),
    ("combination", "--dataset fmnist_lt --model resnet152", "--model"),
    ("combination", "--dataset imagenet_lt", "--data-root"),
    ("combination", "--dataset places_lt --data-root {tmp}/data --download", "--download"),
    ("combination", "--data-root {tmp}/data", "--data-root"),
    ("combination", "--dataset imagenet_lt --data-root {tmp}/data --loader gpu", "--loader"),
    ("combination", "--loader gpu --num-workers 2", "--loader --num-workers"),
    ("combination", "--augment autoaug", "--augment"),
    ("combination", "--dataset fmnist_lt --loader dali --augment autoaug_cutout", "--augment --loader"),
    ("combination", "--resume {tmp}/run --out {tmp}/elsewhere", "--out --resume"),
    ("combination", "--warmup-epochs 500 --epochs 2", "--warmup-epochs --epochs"),
    ("combination", "--warmup-epochs 3 --epochs 3 --reweight cb", "--warmup-epochs --epochs"),
    ("combination", "--lr-milestones 100 150", "--lr-milestones --lr-schedule"),   # the paper's cosine
    ("combination", "--recipe official --lr-milestones 150 100", "--lr-milestones"),
    ("combination", "--lr-schedule step --lr-milestones 160 180 --epochs 100", "--lr-milestones --epochs"),
    ("combination", "--lr-schedule step --lr-warmup-epochs 170", "--lr-warmup-epochs --lr-milestones"),
    ("combination", "--recipe official --epochs 10 --lr-warmup-epochs 8", "--lr-warmup-epochs --lr-milestones"),
    ("combination", "--lr-warmup-epochs 200", "--lr-warmup-epochs --epochs"),
    ("combination", "--dataset imagenet_lt --data-root {tmp}/data --imb-type step", "--imb-type"),
    # files and folders that must exist and be readable
    ("files", "--dataset cifar10_lt --data-root {tmp}/nowhere", "--data-root"),
    ("files", "--pretrained {tmp}/nowhere.pt", "--pretrained"),
    ("files", "--pretrained {tmp}/empty.pt", "--pretrained"),
    ("files", "--pretrained {tmp}/garbage.pt", "--pretrained"),
    ("files", "--pretrained {tmp}/code.pt", "--pretrained"),
    ("files", "--pretrained {tmp}/list.pt", "--pretrained"),
    ("files", "--pretrained {tmp}/rgb_small_cnn.pt", "--pretrained"),
    ("files", "--dataset cifar10_lt --data-root {tmp}/data --model torchvision:resnet18 --pretrained {tmp}/rgb_small_cnn.pt",
     "--pretrained"),
    ("files", "--resume {tmp}/nowhere", "--resume"),
    ("files", "--resume {tmp}/corrupt_config", "--resume"),
    ("files", "--resume {tmp}/list_config", "--resume"),
    ("files", "--resume {tmp}/bad_value_config", "--lr"),
    ("files", "--resume {tmp}/wrong_type_config", "--epochs"),
    ("files", "--resume {tmp}/one_milestone_config", "--lr-milestones"),
    ("files", "--resume {tmp}/no_checkpoint --export {tmp}/model.pt", "--resume --export"),
    # devices and limits this machine does not have (plain `cuda` only where there is none)
    ("machine", "--device gpu", "--device"),
    ("machine", "--device {missing_cuda}", "--device"),
    *([("machine", "--device cuda", "--device")] if NO_CUDA else []),
    ("machine", f"--num-workers {TOO_MANY_WORKERS}", "--num-workers"),
    # where the run would be written
    ("output", "--out {tmp}/a_file", "--out"),
    ("output", "--out {tmp}/a_file/run", "--out"),
    ("output", "--out {ro}/run", "--out"),
    ("output", "--out {tmp}/run", "--out"),
    ("output", "--dataset cifar10_lt --download --data-root {ro}/cifar", "--download"),
    ("output", "--export {tmp}/data", "--export"),
    ("output", "--export {tmp}/nowhere/model.pt", "--export"),
    ("output", "--export {ro}/model.pt", "--export"),
    ("output", "--out {tmp}/new_run --export {tmp}/new_run/checkpoint.pt", "--export"),
    *([] if run_io.safetensors_available() else [("output", "--export {tmp}/model.safetensors", "--export")]),
]


def readonly_folder(tmp) -> str:
    """A folder this process cannot write in: chmod 555, or /proc where permission bits
    do not stop us (root)."""
    folder = tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder) if cli_checks._unwritable(str(folder)) else "/proc"


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would write the marker file (into the scene)
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def zeros_like_model(name: str, in_channels: int) -> dict:
    """A state dict of the model's shapes, built without compute (see refuse_in_child)."""
    with torch.device("meta"):
        model = build_model(name, 10, in_channels)
    return {key: torch.zeros(value.shape, dtype=value.dtype) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with the files the rows point at, made once: each row checks it is unchanged."""
    tmp_path = tmp_path_factory.mktemp("cli")
    tmp = tmp_path / "scene"
    (tmp / "data").mkdir(parents=True)
    (tmp / "a_file").write_text("not a folder")
    good = {"dataset": "digits_lt", "epochs": 2}
    for name, text in {"run": json.dumps(good), "no_checkpoint": json.dumps(good),
                       "corrupt_config": '{"dataset": "digits_lt", "epo', "list_config": "[1, 2]",
                       "bad_value_config": json.dumps({**good, "lr": -1.0}),
                       "wrong_type_config": json.dumps({**good, "epochs": "2"}),
                       "one_milestone_config": json.dumps({**good, "lr_schedule": "step", "lr_milestones": [1]})}.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(text)
    for name in ("run", "bad_value_config", "wrong_type_config", "one_milestone_config"):
        (tmp / name / run_io.CHECKPOINT).write_bytes(b"only looked at after the checks")
    for name, text in {"settings.toml": "epochs = 2\n", "unknown_key.json": '{"epochs": 2, "learning-rate": 0.1}',
                       "bad_value.yaml": "epochs: 2\nlr: -1\n", "wrong_type.json": '{"epochs": "2"}'}.items():
        (tmp / name).write_text(text)
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "garbage.pt").write_bytes(b"\x80\x02not a torch file" * 8)
    torch.save({"fc.weight": WritesMarker(str(tmp / "marker"))}, tmp / "code.pt")
    torch.save([torch.zeros(2)], tmp / "list.pt")
    torch.save(zeros_like_model("small_cnn", 3), tmp / "rgb_small_cnn.pt")   # digits_lt is grayscale
    return {"tmp": str(tmp), "ro": readonly_folder(tmp_path), "missing_cuda": MISSING_CUDA}


@pytest.fixture
def scene(files, tmp_path):
    """The files, and a fresh empty folder to run in."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return {**files, "cwd": str(cwd)}


def tree(folder) -> set:
    return {os.path.join(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files}


def arguments(row_args: str, scene: dict) -> list:
    return row_args.format(**scene).split()


@dataclass
class Finished:
    status: int
    stdout: str
    stderr: str


def _python_m_child(argv: list, cwd: str, out_fd: int, err_fd: int) -> int:
    """In the forked child: run rdr_fast.train as `python -m` would; returns the status."""
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    os.chdir(cwd)
    # libgomp's thread pool does not survive fork: one thread, as in DataLoader workers.
    torch.set_num_threads(1)
    importlib.reload(warnings)            # the interpreter's filters, not pytest's recorder
    sys.excepthook = sys.__excepthook__
    sys.modules.pop("rdr_fast.train", None)   # `python -m` finds it unimported
    sys.argv = ["rdr_fast.train", *argv]
    try:
        runpy.run_module("rdr_fast.train", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:             # what the interpreter does with it
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def python_m(argv: list, cwd: str) -> Finished:
    """`python -m rdr_fast.train ARGV` as a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(rdr_fast.__file__)),
           "OMP_NUM_THREADS": "1"}
    env.pop("RDR_FAST_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "rdr_fast.train", *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    return Finished(done.returncode, done.stdout, done.stderr)


def run_in_child(argv: list, cwd: str, tmp_path, timeout: float = 60) -> Finished:
    """`python -m rdr_fast.train ARGV` in a forked child of this process (as its own
    process where this one has initialised CUDA, which a forked child cannot use)."""
    if torch.cuda.is_initialized():
        return python_m(argv, cwd)
    paths = [str(tmp_path / "child.stdout"), str(tmp_path / "child.stderr")]
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for path in paths]
    # Objects of earlier tests that are garbage but not yet collected (a DALI pipeline, whose
    # worker threads do not survive fork) are freed here, in the process that owns them;
    # the child never collects what it inherits (gc.freeze), so no such destructor runs there.
    gc.collect()
    pid = os.fork()
    if pid == 0:
        gc.freeze()
        status = 1
        try:
            status = _python_m_child(argv, cwd, *fds)
        finally:
            os._exit(status)              # no pytest teardown, no atexit in the child
    for fd in fds:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{argv} did not finish in {timeout} s")
        time.sleep(0.005)
    stdout, stderr = (open(path).read() for path in paths)
    os.unlink(paths[0]), os.unlink(paths[1])
    return Finished(os.waitstatus_to_exitcode(done[1]), stdout, stderr)


def assert_refused(done: Finished, must_name: str) -> None:
    assert done.status == 2, (done.status, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and all(name in lines[0] for name in must_name.split()), lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("kind, args, must_name", ROWS)
def test_bad_input_is_refused_by_its_own_process(kind, args, must_name, scene, tmp_path):
    before = tree(scene["tmp"])
    assert_refused(run_in_child(arguments(args, scene), scene["cwd"], tmp_path), must_name)
    assert tree(scene["tmp"]) == before, "a refused run must not create files or folders"
    assert tree(scene["cwd"]) == set(), "nor a default runs/ folder"


def test_the_child_reports_like_a_process(scene, tmp_path, monkeypatch):
    """The fork runner shows what a process would: a crash's traceback and status 1, a
    run failure's one line and status 1, --help's status 0 (so a green table means
    something). The child runs a fresh copy of rdr_fast.train, so the patches go into
    the modules it imports from."""
    monkeypatch.setattr(cli_checks, "SETUP_CHECKS", (lambda cfg: 1 / 0,))
    crashed = run_in_child([], scene["cwd"], tmp_path)
    assert crashed.status == 1 and "Traceback" in crashed.stderr and "ZeroDivisionError" in crashed.stderr
    monkeypatch.setattr(cli_checks, "SETUP_CHECKS", ())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(rdr_fast.data, "load_dataset", full_disk)
    failed = run_in_child(["--quiet"], scene["cwd"], tmp_path)
    assert (failed.status, failed.stderr) == (1, "error: No space left on device\n")
    helped = run_in_child(["--help"], scene["cwd"], tmp_path)
    assert helped.status == 0 and "--warmup-epochs" in helped.stdout and helped.stderr == ""


def test_compile_without_a_compiler_is_refused(scene, tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-c++-compiler"))
    assert_refused(run_in_child(["--compile", "--device", "cpu"], scene["cwd"], tmp_path), "--compile")


# Rows that also run as genuine processes (two at a time, 5-10 s each): our own range
# check, argparse's, a corrupt config.json, a pretrained file that is not a torch file.
PROCESS_ARGS = ("--imb-factor nan", "--epochs x", "--resume {tmp}/corrupt_config", "--pretrained {tmp}/garbage.pt")


def test_bad_inputs_are_refused_by_python_m(scene):
    """What a user sees: exit status 2, one stderr line, no traceback, no folder."""
    every = os.environ.get("RDR_FAST_CLI_ALL_PROCESSES")
    rows = [row for row in ROWS if every or row[1] in PROCESS_ARGS]
    assert every or len(rows) == len(PROCESS_ARGS)
    before = tree(scene["tmp"])

    def refuse(row):
        return row, python_m(arguments(row[1], scene), scene["cwd"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for (kind, args, must_name), done in pool.map(refuse, rows):
            assert_refused(done, must_name)
    assert tree(scene["tmp"]) == before
    assert tree(scene["cwd"]) == set()


def test_every_numeric_flag_has_a_range():
    numeric = {f.name for f in dataclasses.fields(train.Config) if cli_checks.field_type(f.type)[0] in ("int", "float")}
    assert numeric == set(cli_checks.RANGES)


def test_good_flags_pass_the_checks(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(scene["cwd"])
    weights = str(tmp_path / "small_cnn.pt")
    torch.save(zeros_like_model("small_cnn", 1), weights)
    cfg = train.configure(["--epochs", "3", "--batch-size", "7", "--tau", "-1", "--noise-ratio", "0",
                           "--export", str(tmp_path / "model.pt"), "--device", "cpu",
                           "--lr", "10", "--temperature", "10", "--warmup-epochs", "2.9",
                           "--pretrained", weights,
                           "--num-workers", str(TOO_MANY_WORKERS - 1)])
    assert (cfg.epochs, cfg.batch_size, cfg.tau, cfg.device, cfg.lr) == (3, 7, -1.0, "cpu", 10.0)
    assert cfg.out.startswith("runs" + os.sep)   # the default folder, not created yet
    assert not os.path.exists("runs")
    assert train.configure(["--warmup-epochs", "5", "--epochs", "2", "--reweight", "none"]).warmup_epochs == 5
    assert train.configure(["--resume", os.path.join(scene["tmp"], "no_checkpoint")]).epochs == 2
