"""The GPU suite: one command that a GPU machine runs from a fresh copy of the repository.

    python3 bench/gpu_suite.py --out DIR        # < 9 minutes on one H100/H200
    python3 bench/gpu_suite.py --dry-run        # CPU: the same pipeline, tiny shapes

It only orchestrates; every section is a subprocess with its log in DIR:

1. install: ``pip install --no-build-isolation --no-deps -e .`` (builds rdr_fast._C against
   the torch already there; never reinstalls torch);
2. tests_gpu: ``pytest -m gpu`` over TEST_FILES (the Triton kernels compiled, the ops and
   RDRLoss on CUDA against the reference, the CUDA-graph capture, the reduce-overhead
   compile);
3. bench_*: each file of BENCH_FILES with ``-m gpu`` (its cuda rows) and
   ``--benchmark-json DIR/<file>.json``; the files the checks read come first;
4. summarize: ``bench/summarize.py`` over those JSON files (tables and checks);
5. tests_cpu: ``pytest -m "not gpu"`` over TEST_FILES (the interpreter variants and the CPU
   tests, which CI runs too; a separate run, so that their failures cannot use up
   ``--maxfail`` before the CUDA tests ran).

Writes DIR/gpu_suite.json (meta, every section's command, exit status, seconds and log
tail, the benchmarks' machine info, the checks and the tables) and prints a summary. A
failing section is recorded and the rest still runs; a section that would start past the
time budget is recorded as skipped.

``--dry-run`` runs the same sections on the CPU: no install (it would change the
environment), the tests only collected, and the benchmarks' cpu rows in smoke mode
(BENCH_SMOKE=1: tiny shapes, one round, the Triton kernels interpreted).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = ["tests/test_backends.py", "tests/test_triton.py", "tests/test_ops.py", "tests/test_rdrloss.py",
              "tests/test_fallback.py", "tests/test_double_backward.py"]
BENCH_FILES = ["bench_weights", "bench_step", "bench_sam", "bench_loss", "bench_loaders", "bench_analysis",
               "bench_scaling"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
# Time plan within --budget-s: the install; the CUDA tests, leaving BENCH_S + CPU_TESTS_S;
# the benchmarks and their summary until CPU_TESTS_S before the end; last the CPU tests.
BENCH_S, CPU_TESTS_S = 300, 70
BENCH_ROUNDS = {"gpu": ["--benchmark-min-rounds=10", "--benchmark-max-time=0.5", "--benchmark-warmup=on"],
                "dry": ["--benchmark-min-rounds=1", "--benchmark-max-time=0.001", "--benchmark-warmup=off"]}


class Sections:
    """Runs the sections in order, each logged to DIR/<name>.log, and records them."""

    def __init__(self, out: str, deadline: float, env: dict):
        self.out, self.deadline, self.env, self.records = out, deadline, env, []

    def run(self, name: str, cmd: list[str], until: float, env: dict | None = None) -> dict:
        """Run cmd in ROOT, stopped at time ``until`` (at least 30 s from now); skipped when
        the budget is spent."""
        record = {"name": name, "cmd": " ".join(cmd)}
        self.records.append(record)
        if time.time() > self.deadline:
            record["skipped"] = "time budget"
            return record
        start, log_path = time.time(), os.path.join(self.out, f"{name}.log")
        try:
            with open(log_path, "w") as log:
                record["rc"] = subprocess.run(cmd, cwd=ROOT, env=env or self.env, stdout=log,
                                              stderr=subprocess.STDOUT, timeout=max(30, until - start)).returncode
        except subprocess.TimeoutExpired:
            record["rc"] = "timeout"
        record["seconds"] = round(time.time() - start, 1)
        with open(log_path) as log:
            record["tail"] = log.read()[-1500:]
        return record

    def skip(self, name: str, reason: str) -> None:
        self.records.append({"name": name, "skipped": reason})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_suite"))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: no install, tests collected only, benchmarks in smoke mode")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget-s", type=float, default=510.0, help="wall-clock budget of the whole suite")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    sections = Sections(args.out, deadline, env)

    if args.dry_run or args.skip_install:
        sections.skip("install", "dry run" if args.dry_run else "--skip-install")
    else:
        sections.run("install", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                 "-e", ROOT], start + 240)
    tests = PYTEST + ["--maxfail=20"] + TEST_FILES + (["--collect-only"] if args.dry_run else [])
    if args.skip_tests:
        sections.skip("tests_gpu", "--skip-tests")
    else:
        sections.run("tests_gpu", tests + ["-m", "gpu"], deadline - BENCH_S - CPU_TESTS_S)

    bench_end = deadline - (0 if args.skip_tests else CPU_TESTS_S)
    bench_env = dict(env, BENCH_SMOKE="1") if args.dry_run else env
    marker = "not gpu" if args.dry_run else "gpu"
    jsons = []
    for name in BENCH_FILES:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):  # from an earlier run into the same folder
            os.remove(path)
        run = sections.run(name, PYTEST + [f"bench/{name}.py", "-m", marker, "--benchmark-only",
                                           f"--benchmark-json={path}"] + BENCH_ROUNDS["dry" if args.dry_run else "gpu"],
                           bench_end - 30, bench_env)
        if os.path.exists(path) and "rc" in run:
            jsons.append(path)
    summary_path = os.path.join(args.out, "summary.json")
    if os.path.exists(summary_path):
        os.remove(summary_path)
    if jsons:
        sections.run("summarize", [sys.executable, os.path.join(ROOT, "bench", "summarize.py"), *jsons,
                                   "--json", summary_path], bench_end)
    else:
        sections.skip("summarize", "no benchmark JSON was written")

    if args.skip_tests:
        sections.skip("tests_cpu", "--skip-tests")
    else:
        sections.run("tests_cpu", tests + ["-m", "not gpu"], deadline)

    result = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "dry_run": args.dry_run, "python": platform.python_version(), "budget_s": args.budget_s,
                       "seconds": round(time.time() - start, 1)},
              "sections": sections.records}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            result.update(json.load(f))  # machine_info, checks, tables
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    print_summary(result, args.out)
    return result


def print_summary(result: dict, out: str) -> None:
    rdr = result.get("machine_info", {}).get("rdr_fast", {})
    print(f"== rdr_fast GPU suite: {rdr.get('gpu') or 'no GPU'} | {result['meta']['date']} | "
          f"torch {rdr.get('torch')} | triton {rdr.get('triton')} | dry_run={result['meta']['dry_run']}")
    for s in result["sections"]:
        if "skipped" in s:
            print(f"{s['name']:14s} skipped: {s['skipped']}")
        else:
            last = s["tail"].strip().splitlines()[-1] if s["tail"].strip() else ""
            print(f"{s['name']:14s} rc={s['rc']} {s['seconds']}s -> {last}")
    summary_log = os.path.join(out, "summarize.log")
    if os.path.exists(summary_log):
        with open(summary_log) as f:
            print(f.read())


if __name__ == "__main__":
    main()
