"""The GPU suite: one command that a GPU machine runs from a fresh copy of the repo.

    python3 bench/gpu_suite.py --out DIR        # < 8 minutes on one H100/H200
    python3 bench/gpu_suite.py --dry-run        # CPU: every code path on tiny shapes

1. install: ``pip install --no-build-isolation --no-deps -e .`` (builds rdr_fast._C against
   the torch already there; never reinstalls torch);
2. tests: the CUDA tests (``-m gpu``: the Triton kernels compiled, the ops and RDRLoss on
   CUDA against the reference, the CUDA-graph capture and reduce-overhead compile);
3. bench, in a fresh process: weights+update (reference loop on the GPU and on the CPU,
   PyTorch path, Triton; eager and CUDA-graph replay), the weighted loss, and ResNet-32
   training steps (B=128, C=100, CIFAR-shaped random tensors: CE, RDR, SAM, RDR+SAM,
   RDR+sam_k; eager and CUDA graph; fp32 and bf16 autocast);
4. tests: the CPU tests of the same files (the kernels in Triton's interpreter).
Writes DIR/gpu_suite.json (plus the install and test logs) and prints a table. Timing:
CUDA events, warm-up first, median over repeats. Sections that fail are recorded with
their error and the suite goes on; sections past the time budget are skipped and say so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_SHAPES = [(128, 100, 64), (128, 10, 64), (256, 1000, 512), (256, 1000, 2048), (1024, 100000, 512)]
LOSS_SHAPES = [(128, 100), (256, 1000), (1024, 100000)]
BLOCK_CONFIGS = [(16, 32, 4), (16, 64, 4), (32, 32, 4), (16, 32, 2)]  # (BS, BK, num_warps), first = default
# Time plan within --budget-s: the install; the CUDA tests, leaving BENCH_S + CPU_TESTS_S;
# the bench until CPU_TESTS_S before the end (its acceptance rows first); last the CPU
# tests of the same files (separate from the CUDA ones, so that failures there, say the
# interpreter under another NumPy, cannot use up --maxfail before the CUDA tests ran).
BENCH_S, CPU_TESTS_S = 240, 70
TEST_FILES = ["tests/test_backends.py", "tests/test_triton.py", "tests/test_ops.py", "tests/test_rdrloss.py"]
DRY_WEIGHT_SHAPES, DRY_LOSS_SHAPES = [(16, 5, 8), (24, 100, 16)], [(8, 10), (4, 300)]


def run_logged(cmd, log_path, timeout, env=None) -> dict:
    """Run cmd in ROOT, output to log_path; {cmd, rc, seconds, tail}."""
    start = time.time()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    with open(log_path) as log:
        tail = log.read()[-1500:]
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - start, 1), "tail": tail}


# ------------------------------------------------------------------------ timing helpers
def timed(fn, device, reps: int, warmup: int = 3) -> dict:
    """Median and min milliseconds per call of fn(), eager."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "ms_min": min(times), "reps": reps}


def timed_graph(fn, reps: int, per_replay: int = 10) -> dict:
    """fn() captured in a CUDA graph (after a side-stream warm-up); ms per replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    result = timed(lambda: [graph.replay() for _ in range(per_replay)], torch.device("cuda"), reps, warmup=2)
    return {"ms": result["ms"] / per_replay, "ms_min": result["ms_min"] / per_replay, "reps": reps * per_replay}


def record(rows, section, shape, impl, mode, fn, **extra):
    """Append one timing row; a failure becomes a row with its error."""
    row = {"section": section, "shape": list(shape), "impl": impl, "mode": mode, **extra}
    try:
        row.update(fn())
    except Exception as err:  # noqa: BLE001 — the suite records and goes on
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    rows.append(row)
    print(f"  {section:8s} {str(tuple(shape)):22s} {impl:22s} {mode:6s} "
          f"{row.get('ms', float('nan')):10.4f} ms {row.get('error', '')}", flush=True)
    return row


# ------------------------------------------------------------------------ bench sections
def long_tail_labels(batch, num_classes, generator):
    """(labels, counts): the exponential LT profile n_c = 500·100^(−c/(C−1)) and labels
    drawn ∝ it (bench/conftest.py's, restated: this script runs on its own, not in pytest)."""
    import torch

    counts = [max(1, int(500 * 100.0 ** (-c / max(1, num_classes - 1)))) for c in range(num_classes)]
    probs = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator), counts


def long_tail_batch(batch, num_classes, dim, device, seed=0):
    """Features (ReLU), long-tailed labels, prototypes (all classes seen) and counts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels, counts = long_tail_labels(batch, num_classes, g)
    features = torch.randn(batch, dim, generator=g).relu()
    protos = torch.randn(num_classes, dim, generator=g).relu()
    seen = torch.ones(num_classes, dtype=torch.bool)
    return features.to(device), labels.to(device), protos.to(device), seen.to(device), counts


def bench_weights(rows, device, shapes, reps, deadline):
    import torch

    from rdr_fast import functional as Fn
    from rdr_fast import ops, torch_impl
    from rdr_fast.kernels import rdr_weights_and_update as triton_weights

    cpu = torch.device("cpu")
    for shape in shapes:
        if time.time() > deadline:
            rows.append({"section": "weights", "shape": list(shape), "skipped": "time budget"})
            continue
        features, labels, protos, seen, counts = long_tail_batch(*shape, device)
        factors = Fn.class_factors(counts).to(device)
        args = (1e-5, 1.0, 0.9, True, False, True)
        n_present = len(torch.unique(labels))

        def reference_on(dev):
            f, lab, p, s, fac = (t.to(dev) for t in (features, labels, protos.clone(), seen, factors))

            def run():
                with torch.device(dev):  # the loop's own tensors (torch.ones, torch.eye...) go there too
                    ops._weights_reference(f, lab, p, s, fac, *args)
            return run

        def call(kernel, p):
            return lambda: kernel(features, labels, p, seen, factors, *args)

        p_torch, p_triton = protos.clone(), protos.clone()
        ref_reps = max(2, reps // 10)
        base = record(rows, "weights", shape, f"reference-loop/{device.type}", "eager",
                      lambda: timed(reference_on(device), device, ref_reps, warmup=1), classes_present=n_present)
        if device.type == "cuda":
            record(rows, "weights", shape, "reference-loop/cpu", "eager",
                   lambda: timed(reference_on(cpu), cpu, ref_reps, warmup=1))
        kernels = {"torch": torch_impl.rdr_weights_and_update_torch,
                   "triton": triton_weights.rdr_weights_and_update_triton}
        for name, kernel in kernels.items():
            p = p_torch if name == "torch" else p_triton
            row = record(rows, "weights", shape, name, "eager", lambda: timed(call(kernel, p), device, reps))
            if "ms" in row and "ms" in base:
                row["speedup_vs_reference"] = base["ms"] / row["ms"]
            if device.type == "cuda":
                record(rows, "weights", shape, name, "graph", lambda: timed_graph(call(kernel, p), reps))
        # agreement of the two fast paths on fresh state
        w_t = torch_impl.rdr_weights_and_update_torch(features, labels, protos.clone(), seen.clone(), factors, *args)
        w_k = triton_weights.rdr_weights_and_update_triton(features, labels, protos.clone(), seen.clone(), factors,
                                                           *args)
        rows.append({"section": "weights", "shape": list(shape), "impl": "triton vs torch", "mode": "check",
                     "max_rel_diff": float(((w_k - w_t).abs() / w_t.abs()).max())})
        # block-size alternatives for the Triton kernel (the first is the launcher's default)
        default = triton_weights._block_sizes
        configs = BLOCK_CONFIGS[1:] if device.type == "cuda" else []
        try:
            for cfg in configs:
                triton_weights._block_sizes = lambda dev, cfg=cfg: cfg
                record(rows, "weights", shape, "triton BS{}/BK{}/w{}".format(*cfg), "eager",
                       lambda: timed(call(triton_weights.rdr_weights_and_update_triton, p_triton), device, reps))
        finally:
            triton_weights._block_sizes = default


def bench_loss(rows, device, shapes, reps, deadline):
    import torch
    import torch.nn.functional as F

    from rdr_fast import reference as ref
    from rdr_fast import torch_impl
    from rdr_fast.kernels import weighted_loss_triton

    for shape in shapes:
        if time.time() > deadline:
            rows.append({"section": "loss", "shape": list(shape), "skipped": "time budget"})
            continue
        batch, num_classes = shape
        logits = 3 * torch.randn(batch, num_classes, device=device)
        labels = torch.randint(0, num_classes, (batch,), device=device)
        weights = torch.rand(batch, device=device) + 0.5

        def reference():
            x = logits.detach().requires_grad_(True)
            (weights * ref.per_sample_loss_ref(x, labels)).sum().div(batch).backward()

        def native():  # torch's own fused CE, weighted afterwards: the everyday baseline
            x = logits.detach().requires_grad_(True)
            (F.cross_entropy(x, labels, reduction="none") * weights).mean().backward()

        fns = {"reference": reference, "F.cross_entropy": native,
               "torch": lambda: torch_impl.weighted_loss_torch(logits, labels, weights, None, 0.0, True),
               "triton": lambda: weighted_loss_triton(logits, labels, weights, None, 0.0, True)}
        for name, fn in fns.items():
            n = max(2, reps // 10) if name == "reference" else reps
            record(rows, "loss", shape, name, "eager", lambda: timed(fn, device, n))
            if device.type == "cuda" and name in ("torch", "triton"):
                record(rows, "loss", shape, name, "graph", lambda: timed_graph(fn, reps))
        got = weighted_loss_triton(logits, labels, weights, None, 0.0, True)
        want = torch_impl.weighted_loss_torch(logits, labels, weights, None, 0.0, True)
        rows.append({"section": "loss", "shape": list(shape), "impl": "triton vs torch", "mode": "check",
                     "max_abs_diff": max(float((got[0] - want[0]).abs()), float((got[1] - want[1]).abs().max()))})


def bench_steps(rows, device, batch, reps, deadline, warmup=3):
    import torch
    import torch.nn.functional as F

    import rdr_fast
    from rdr_fast import sam
    from rdr_fast.models import resnet32
    from rdr_fast.training import train_step

    num_classes = 100
    g = torch.Generator().manual_seed(0)
    labels, counts = long_tail_labels(batch, num_classes, g)
    labels = labels.to(device)
    images = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    combos = [("CE", "ce", "none"), ("RDR", "rdr", "none"), ("SAM", "ce", "sam"), ("RDR+SAM", "rdr", "sam"),
              ("RDR+sam_k5", "rdr", "sam_k")]
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    for amp in ([False, True] if device.type == "cuda" else [False]):
        for name, loss, opt_name in combos:
            for mode in modes:
                if mode == "graph" and opt_name == "sam_k":
                    continue  # its SAM-or-SGD choice is host-side per step: not one graph
                shape = (batch, num_classes, 64)
                if time.time() > deadline:
                    rows.append({"section": "step", "shape": list(shape), "impl": name, "mode": mode,
                                 "skipped": "time budget"})
                    continue
                torch.manual_seed(0)
                model = resnet32(num_classes).to(device)
                if loss == "rdr":
                    crit = rdr_fast.RDRLoss(counts, model.feat_dim, validate=False).to(device)
                else:
                    def crit(features, logits, targets):
                        return F.cross_entropy(logits, targets)
                opt = sam.make_optimizer(opt_name, model, counts, lr=0.1, momentum=0.9, weight_decay=2e-4)

                def forward(x, model=model, amp=amp):  # autocast's weight cache must be off in graphs
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
                        features, logits = model(x)
                    return features.float(), logits.float()

                def step(opt=opt, crit=crit, forward=forward):
                    return train_step(opt, forward, crit, images, labels)
                timer = (lambda: timed(step, device, reps, warmup)) if mode == "eager" else \
                    (lambda: timed_graph(step, reps))
                record(rows, "step", shape, name, mode, timer, precision="bf16-autocast" if amp else "fp32")


# ------------------------------------------------------------------------ report
def checks(rows) -> list:
    """The issue's acceptance numbers, computed from the rows (never typed in)."""
    def ms(section, shape, impl, mode, **kw):
        for row in rows:
            if (row.get("section"), tuple(row.get("shape", ())), row.get("impl"), row.get("mode")) == \
                    (section, tuple(shape), impl, mode) and all(row.get(k) == v for k, v in kw.items()):
                return row.get("ms")
        return None

    out = []
    ref, tri = ms("weights", (128, 100, 64), "reference-loop/cuda", "eager"), ms("weights", (128, 100, 64), "triton",
                                                                                 "eager")
    if ref and tri:
        out.append({"check": "triton weights+update >= 100x reference loop at (128,100,64), both on the GPU",
                    "value": ref / tri, "pass": ref / tri >= 100})
    for precision in ("fp32", "bf16-autocast"):
        ce, rdr = (ms("step", (128, 100, 64), name, "graph", precision=precision) for name in ("CE", "RDR"))
        if ce and rdr:
            out.append({"check": f"ResNet-32 RDR step within 3% of CE step, CUDA graph, {precision}",
                        "value": rdr / ce, "pass": rdr / ce <= 1.03})
        s, rs = (ms("step", (128, 100, 64), name, "graph", precision=precision) for name in ("SAM", "RDR+SAM"))
        if s and rs:
            out.append({"check": f"RDR+SAM step costs no more than SAM (ratio), CUDA graph, {precision}",
                        "value": rs / s, "pass": rs / s <= 1.03})
    return out


def print_table(result) -> None:
    meta = result["meta"]
    print(f"\n== rdr_fast GPU suite: {meta.get('device')} | {meta.get('date')} | torch {meta.get('torch')} | "
          f"triton {meta.get('triton')} | dry_run={meta.get('dry_run')}")
    def print_run(run):
        summary = run["tail"].strip().splitlines()[-1] if run["tail"].strip() else ""
        print(f"rc={run['rc']} {run['seconds']}s: {run['cmd'][-70:]} -> {summary}")

    for run in result.get("tests", []):
        print_run(run)
    for run in (result.get("install"), result.get("bench_run")):  # these only when they failed
        if run and run["rc"] != 0:
            print_run(run)
    print(f"{'section':8s} {'shape':22s} {'impl':24s} {'mode':6s} {'prec':14s} {'ms':>10s} {'x ref':>8s}")
    for row in result.get("rows", []):
        ms = f"{row['ms']:10.4f}" if "ms" in row else f"{'-':>10s}"
        speed = f"{row['speedup_vs_reference']:8.1f}" if "speedup_vs_reference" in row else f"{'':8s}"
        note = row.get("error") or row.get("skipped") or ""
        if row.get("mode") == "check":
            note = f"max diff {row.get('max_rel_diff', row.get('max_abs_diff')):.2e}"
        print(f"{row['section']:8s} {str(tuple(row.get('shape', ()))):22s} {row.get('impl', ''):24s} "
              f"{row.get('mode', ''):6s} {row.get('precision', ''):14s} {ms} {speed} {note}")
    for check in result.get("checks", []):
        print(f"CHECK {'PASS' if check['pass'] else 'FAIL'} {check['value']:.3f}  {check['check']}")


def bench_phase(args) -> dict:
    """Runs in its own process (after the install), so that rdr_fast imports from it."""
    sys.path.insert(0, ROOT)  # the source tree, should the install have failed (then without _C)
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    import triton

    import rdr_fast

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "backends": rdr_fast.backends(), "dry_run": args.dry_run,
            "torch_threads": torch.get_num_threads()}
    rows = []
    deadline = args.deadline or time.time() + args.budget_s
    reps = 3 if args.dry_run else 50
    weight_shapes = DRY_WEIGHT_SHAPES if args.dry_run else WEIGHT_SHAPES
    # The acceptance rows first (weights at the first shape, then the steps), so that a
    # tight budget cuts the extra shapes, never them.
    bench_weights(rows, device, weight_shapes[:1], reps, deadline)
    if args.dry_run:
        bench_steps(rows, device, 8, 1, deadline, warmup=1)
    else:
        bench_steps(rows, device, 128, 30, deadline)
    bench_weights(rows, device, weight_shapes[1:], reps, deadline)
    bench_loss(rows, device, DRY_LOSS_SHAPES if args.dry_run else LOSS_SHAPES, reps, deadline)
    return {"meta": meta, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_suite"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes; no install/tests")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole suite")
    parser.add_argument("--phase", choices=["all", "bench"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.phase == "bench":
        result = bench_phase(args)
        with open(os.path.join(args.out, "bench_part.json"), "w") as f:
            json.dump(result, f, indent=1)
        return result

    start = time.time()
    deadline = start + args.budget_s
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    result = {"install": None, "tests": []}
    if not (args.dry_run or args.skip_install):
        result["install"] = run_logged([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                        "-e", ROOT], os.path.join(args.out, "install.log"), 240, env)
    tests = not (args.dry_run or args.skip_tests)
    pytest = [sys.executable, "-m", "pytest", "-q", "--maxfail=20", "-p", "no:cacheprovider"] + TEST_FILES
    if tests:  # the CUDA tests, leaving the bench and the CPU tests their time
        result["tests"].append(run_logged(pytest + ["-m", "gpu"], os.path.join(args.out, "tests_gpu.log"),
                                          max(60, deadline - time.time() - BENCH_S - CPU_TESTS_S), env))
    bench_end = deadline - (CPU_TESTS_S if tests else 0)
    bench_cmd = [sys.executable, os.path.abspath(__file__), "--phase", "bench", "--out", args.out,
                 "--deadline", str(bench_end - 20)] + (["--dry-run"] if args.dry_run else [])
    result["bench_run"] = run_logged(bench_cmd, os.path.join(args.out, "bench.log"), max(30, bench_end - time.time()),
                                     env)
    if tests:  # the interpreter variants and CPU tests (CI runs them too): what time is left
        result["tests"].append(run_logged(pytest + ["-m", "not gpu"], os.path.join(args.out, "tests_cpu.log"),
                                          max(30, deadline - time.time()), env))
    part = os.path.join(args.out, "bench_part.json")
    if os.path.exists(part):
        with open(part) as f:
            result.update(json.load(f))
        os.remove(part)
    else:
        result["meta"] = {"dry_run": args.dry_run}
    result["checks"] = checks(result.get("rows", []))
    result["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
