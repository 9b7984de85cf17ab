"""The training CLI on a shared machine: `python -m rdr_fast.train` (no flags: digits_lt,
200 epochs) alone, and beside one busy neighbour process (a pure-Python spin loop, one
core's worth of other work), with the CLI's default OpenMP wait policy (PASSIVE: threads
waiting for work sleep) and with the policy left to the OpenMP runtime (threads spin for
a while first: the behaviour before the CLI set it).

Each row is one whole run (pedantic, one round: a run lasts tens of seconds); the
neighbour starts before and stops after it. Compare rows of one run of this file on one machine.

Run:  pytest bench/bench_shared.py --benchmark-only
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import pytest

from conftest import SMOKE

EPOCHS = ["--epochs", "2"] if SMOKE else []
SPIN = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"


@contextmanager
def neighbour(busy: bool):
    process = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        yield
    finally:
        if process is not None:
            process.kill()
            process.wait()


def train_once(policy: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy  # "" leaves the policy to the OpenMP runtime
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "rdr_fast.train", "--quiet", "--out", os.path.join(out, "run"), *EPOCHS],
                       check=True, env=env, stdout=subprocess.DEVNULL)


@pytest.mark.benchmark(group="shared machine: python -m rdr_fast.train")
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "one busy neighbour"])
@pytest.mark.parametrize("policy", [None, ""], ids=["CLI default (PASSIVE)", "runtime default"])
def test_train_cli_beside_a_neighbour(benchmark, busy, policy):
    with neighbour(busy):
        benchmark.pedantic(train_once, args=(policy,), rounds=1, iterations=1, warmup_rounds=0)
