"""kill -9 a training run at seeded pseudo-random points, `--resume RUN` after each kill
until it finishes: the result equals an uninterrupted run's bit for bit.

Why it holds: every file of a run is written by run_io.atomic_write (temporary file,
fsync, os.replace), so a kill leaves each file whole, old or new; the checkpoint is
replaced only after an epoch has finished, so resuming replays from the last completed
epoch, deterministically (RNG states are in the checkpoint); a run killed before its
first checkpoint starts over from its config.json. What is not guaranteed: the work
since the last checkpoint is lost, and metrics.csv may briefly hold one row more than
the checkpoint (it is written first), which the replay rewrites.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import rdr_fast
from rdr_fast import run_io

EPOCHS = 8
KILLS = 5
# The CPU: its kernels are deterministic, which bit-for-bit equality needs.
FLAGS = ["--epochs", str(EPOCHS), "--batch-size", "64", "--warmup-epochs", "0.5", "--seed", "0", "--device", "cpu"]
# One thread: the same arithmetic in every process, and the reference runs beside them.
ENV = {**{k: v for k, v in os.environ.items() if k != "RDR_FAST_DEBUG"},
       "PYTHONPATH": os.path.dirname(os.path.dirname(rdr_fast.__file__)), "OMP_NUM_THREADS": "1"}
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)\s+loss")

# A process that imports torch and rdr_fast once and forks one `python -m rdr_fast.train`
# per line of JSON [argv, stdout path] on its stdin, answering with the child's pid, then
# its exit status. It computes nothing itself, so its children start with a clean OpenMP
# runtime (libgomp's thread pool does not survive fork) and each is a whole process to
# kill, minus the seconds of importing torch.
LAUNCHER = r"""
import json, os, runpy, sys
import rdr_fast.train
sys.modules.pop("rdr_fast.train")        # `python -m` finds it unimported
for line in sys.stdin:
    argv, stdout = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(stdout, os.O_WRONLY), 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.argv = ["rdr_fast.train", *argv]
        try:
            runpy.run_module("rdr_fast.train", run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            status = 1
        sys.stdout.flush()
        os._exit(status)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Launcher:
    def __init__(self, folder):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=ENV)
        self.fifo = os.path.join(folder, "stdout.fifo")
        os.mkfifo(self.fifo)

    def start(self, argv):
        """(pid, the child's stdout as lines as they come)."""
        self.proc.stdin.write(json.dumps([argv, self.fifo]) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        return pid, open(self.fifo)

    def status(self) -> int:
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


def kill_after(pid, lines, epoch: int, delay: float) -> None:
    """SIGKILL `delay` s after the run printed epoch `epoch`'s line (0: the line it prints
    before the first epoch starts). The line comes right before that epoch's checkpoint
    is saved, so a delay of a few ms lands in or around the write."""
    with lines:
        for line in lines:
            if (epoch == 0 and "writing" in line) or ((m := EPOCH_LINE.match(line)) and int(m[1]) == epoch):
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                return
    raise AssertionError(f"the run ended before epoch {epoch}")


def completed_epoch(run: str) -> int:
    """The run's last completed epoch; load_checkpoint raises if the file is not whole."""
    if not os.path.exists(os.path.join(run, run_io.CHECKPOINT)):
        return 0
    return run_io.load_checkpoint(run)["epoch"]


def without_timing(rows):
    """The rows (metric rows, or summaries whose blocks are metric rows) less the epoch times."""
    return [{k: without_timing([v])[0] if isinstance(v, dict) else v for k, v in row.items() if k != "epoch_seconds"}
            for row in rows]


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, run = str(tmp_path / "straight"), str(tmp_path / "killed")
    reference = subprocess.Popen([sys.executable, "-m", "rdr_fast.train", "--out", straight, *FLAGS, "--quiet"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    launcher = Launcher(str(tmp_path))
    rng = random.Random(2024)
    kills, left_temporaries, done = [], 0, 0
    # Kill 1 before any checkpoint exists; then alternately a few ms after an epoch's line
    # (in its checkpoint write) and somewhere inside the next epoch's training.
    for i in range(KILLS):
        epoch = 0 if i == 0 else min(done + rng.randint(1, 2), EPOCHS - 1)
        delay = rng.uniform(0, 0.004) if i % 2 else rng.uniform(0, 0.15)
        argv = ["--resume", run] if os.path.exists(os.path.join(run, "config.json")) else ["--out", run, *FLAGS]
        kill_after(*launcher.start(argv), epoch, delay)
        assert launcher.status() == -signal.SIGKILL
        left_temporaries += any(name.startswith(run_io.TEMPORARY_PREFIX) for name in os.listdir(run))
        done = completed_epoch(run)
        # The epoch before (killed before the save), that epoch, or the next one.
        assert max(epoch - 1, 0) <= done <= epoch + 1, (epoch, delay, done)
        kills.append((epoch, round(delay, 4), done))
    _, lines = launcher.start(["--resume", run, "--quiet"])
    lines.read()
    lines.close()
    assert launcher.status() == 0 and reference.wait() == 0, kills
    launcher.close()

    assert not [n for n in os.listdir(run) if n.startswith(run_io.TEMPORARY_PREFIX)]
    a, b = (run_io.load_checkpoint(folder) for folder in (straight, run))
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert without_timing(a["history"]) == without_timing(b["history"])
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
               for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))

    def metrics(folder):
        with open(os.path.join(folder, "metrics.csv")) as handle:
            return without_timing(csv.DictReader(handle))
    assert metrics(straight) == metrics(run) and len(metrics(run)) == EPOCHS
    summaries = [json.load(open(os.path.join(f, "summary.json"))) for f in (straight, run)]
    assert without_timing(summaries[:1]) == without_timing(summaries[1:])
    print(f"kills (after epoch line, delay s, completed epoch): {kills}; "
          f"{left_temporaries} left a temporary file (killed inside a write)")
