"""Tables and performance checks from the pytest-benchmark JSON files of bench/.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/summarize.py bench.json [more.json ...] [--json summary.json]

Tables (the format of bench/README.md): each group gets one row per backend / method /
loader: median and min µs, rounds, and the speed-up over every baseline present in the
group (reference, official, unfused, torch, kernel, ce, sgd, torchvision: baseline median /
row median), then any ratio a benchmark timed itself in pairs. The rows of bench_scaling.py
make one table of their own (scaling_table: time, peak extra memory, flop and byte
rates, fraction of the attainable; bench/plot_scaling.py draws them).

Checks: the targets the benchmarks are written for, each computed from the rows on every
device (and mode, precision) the files hold rows for, and reported with its value as
pass, FAIL, or missing (a row it needs is absent):

- weights: the op's own kernel (C++ on CPU, Triton on CUDA) ≥ 100× the reference loop on
  the same device, at the first shape of bench_weights.py;
- official: against the authors' structure (bench/official.py), at OFFICIAL_TARGETS'
  shapes: the op's kernel (weights + update) and RDRLoss (weights + update + loss forward
  and backward) ≥ 100× at (128, 100, 64) and ≥ 200× at (256, 1000, 512); on the CPU from
  rows run on one torch thread only (OMP_NUM_THREADS=1);
- step: RDR step ≤ 1.01× CE step (bench_step.py's paired ratio);
- module: RDRLoss forward + backward with default arguments ≤ 1.5× F.cross_entropy's
  (bench_loss.py's paired ratio, first module shape);
- loss autograd (CPU): the op's forward + backward ≤ 2× its bare kernel at the largest
  shape of bench_loss.py (paired ratio): autograd's fixed per-call cost, not a recomputed
  gradient (the no-graph backward replays the saved one; recomputing it by the
  double-backward path would cost several kernels more);
- SAM: fused SAM ≤ 2.05× an SGD step, the cheaper of sam_k / looksam ≤ 1.3× (paired
  ratios of bench_sam.py), and the SAM step with RDR ≤ 1.03× the one without, paired and
  from two separately timed rows (which on a busy machine move with the load).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASELINES = ("reference", "official", "unfused", "torch", "kernel", "ce", "sgd", "torchvision")  # each one present is a column
LABEL_KEYS = ("backend", "method", "loader")  # extra_info keys that name a row
FAST_WEIGHTS_KERNEL = {"cpu": "cpp", "cuda": "triton"}
# (B, C, K) → the speed-up over the authors' structure to reach there.
OFFICIAL_TARGETS = {(128, 100, 64): 100, (256, 1000, 512): 200}


def load(paths) -> dict:
    """The benchmarks of several JSON files as one (machine_info of the first)."""
    merged = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    return merged


# ----------------------------------------------------------------------------- tables

def row_label(bench: dict) -> str:
    info = bench["extra_info"]
    return next((str(info[key]) for key in LABEL_KEYS if key in info), bench["name"])


def reported_ratios(label: str, extra: dict) -> list[str]:
    """Ratios a benchmark measured itself (paired timings), e.g. rdr_over_ce, sam_vs_sgd."""
    return [f"{label}: {key} = {value:.4f}" for key, value in extra.items()
            if isinstance(value, float) and ("_vs_" in key or key.endswith("_over_ce"))]


def tables(data: dict) -> str:
    groups, extras = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
        if bench["group"].startswith(SCALING):
            continue  # one table for the whole sweep: scaling_table
        groups[bench["group"]][row_label(bench)] = bench["stats"]
        extras[bench["group"]][row_label(bench)] = bench["extra_info"]
    lines = []
    for group, stats in groups.items():
        lines.append(f"\n**{group}**\n")
        if not group.endswith("/paired"):  # paired groups time their own pairs: no row of their own
            baselines = [b for b in BASELINES if b in stats]
            lines += ["| " + " | ".join(["row", "median µs", "min µs", "rounds"] + [f"vs {b}" for b in baselines]) + " |",
                      "|---|---:|---:|---:|" + "---:|" * len(baselines)]
            for label, s in stats.items():
                ratios = [f"{stats[b]['median'] / s['median']:.2f}×" if "+" not in label else "—" for b in baselines]
                cells = [label, f"{s['median'] * 1e6:,.1f}", f"{s['min'] * 1e6:,.1f}", str(s["rounds"])] + ratios
                lines.append("| " + " | ".join(cells) + " |")
        for label, extra in extras[group].items():
            lines += reported_ratios(label, extra)
    return "\n".join(lines)


SCALING = "scaling/"  # the groups of bench_scaling.py


def scaling_rows(data: dict) -> list[dict]:
    """One dict per row of bench_scaling.py: op, device, backend, B, C, K (0 for the loss),
    median seconds, peak extra bytes, flop and byte rates, fraction of the attainable."""
    out = []
    for bench in data["benchmarks"]:
        if not bench["group"].startswith(SCALING):
            continue
        info, median_s = bench["extra_info"], bench["stats"]["median"]
        batch, num_classes, dim = (info["shape"] + [0])[:3]
        out.append({"op": info["op"], "device": info["device"], "backend": info["backend"], "B": batch,
                    "C": num_classes, "K": dim, "median_s": median_s, "peak_bytes": info["peak_extra_bytes"],
                    "flops_per_s": info["flops"] / median_s, "bytes_per_s": info["bytes"] / median_s,
                    "fraction": info["attainable_fraction"]})
    return sorted(out, key=lambda r: (r["op"], r["device"], r["backend"], r["B"], r["K"], r["C"]))


def scaling_table(data: dict) -> str:
    """The sweep as one markdown table ("" without scaling rows)."""
    found = scaling_rows(data)
    if not found:
        return ""
    lines = ["| op | device | backend | B | C | K | median µs | peak extra KiB | GFLOP/s | GB/s | of attainable |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in found:
        lines.append(f"| {r['op']} | {r['device']} | {r['backend']} | {r['B']} | {r['C']} | {r['K'] or '—'} | "
                     f"{r['median_s'] * 1e6:,.1f} | {r['peak_bytes'] / 1024:,.1f} | {r['flops_per_s'] / 1e9:.2f} | "
                     f"{r['bytes_per_s'] / 1e9:.2f} | {r['fraction']:.1%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks

def rows(data: dict, test: str, **info) -> list[dict]:
    """The benchmarks of test function ``test`` whose extra_info has every ``info`` value."""
    return [b for b in data["benchmarks"] if b["name"].split("[")[0] == test
            and all(b["extra_info"].get(k) == v for k, v in info.items())]


def median(data: dict, test: str, **info):
    """Median seconds of the one benchmark matching, or None when there is none."""
    found = rows(data, test, **info)
    return found[0]["stats"]["median"] if found else None


def verdict(name: str, value, at_least=None, at_most=None) -> dict:
    """One check: pass / FAIL from its value, or missing when the value could not be computed."""
    target = f"≥ {at_least}" if at_least is not None else f"≤ {at_most}"
    if value is None:
        return {"check": name, "value": None, "target": target, "status": "missing"}
    ok = value >= at_least if at_least is not None else value <= at_most
    return {"check": name, "value": value, "target": target, "status": "pass" if ok else "FAIL"}


def ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator is not None else None


def weights_checks(data: dict) -> list[dict]:
    shape = data["machine_info"].get("rdr_fast", {}).get("weights_check_shape")
    out = []
    for device in sorted({b["extra_info"]["device"] for b in rows(data, "test_weights_and_update", shape=shape)}):
        fast = FAST_WEIGHTS_KERNEL[device]
        value = ratio(median(data, "test_weights_and_update", device=device, shape=shape, backend="reference"),
                      median(data, "test_weights_and_update", device=device, shape=shape, backend=fast))
        out.append(verdict(f"weights+update {device}: {fast} vs the reference loop at {tuple(shape)}", value,
                           at_least=100))
    return out


def official_checks(data: dict) -> list[dict]:
    """The op's kernel and RDRLoss against the authors' structure, at each target shape
    and device the rows hold; CPU figures only from single-thread rows."""
    out = []
    for test, fast_of in (("test_weights_and_update", FAST_WEIGHTS_KERNEL.get),
                          ("test_weights_update_and_loss", lambda device: "rdr_fast")):
        for shape, target in OFFICIAL_TARGETS.items():
            devices = {b["extra_info"]["device"] for b in rows(data, test, shape=list(shape), backend="official")}
            for device in sorted(devices):
                threads = {"torch_threads": 1} if device == "cpu" else {}
                value = ratio(median(data, test, device=device, shape=list(shape), backend="official", **threads),
                              median(data, test, device=device, shape=list(shape), backend=fast_of(device), **threads))
                what = "weights+update" if test == "test_weights_and_update" else "weights+update+loss"
                where = f"{device}, 1 thread" if device == "cpu" else device
                out.append(verdict(f"{what} {where}: {fast_of(device)} vs the authors' structure at {shape}", value,
                                   at_least=target))
    return out


def step_checks(data: dict) -> list[dict]:
    runs = {(b["extra_info"]["device"], b["extra_info"]["mode"], b["extra_info"]["precision"])
            for b in rows(data, "test_resnet32_step")}
    out = []
    for device, mode, precision in sorted(runs):
        pair = rows(data, "test_resnet32_step_pair", device=device, mode=mode, precision=precision)
        value = pair[0]["extra_info"]["rdr_over_ce"] if pair else None
        out.append(verdict(f"ResNet-32 step {device} {mode} {precision}: RDR / CE (paired)", value, at_most=1.01))
    return out


def loss_autograd_checks(data: dict) -> list[dict]:
    pairs = rows(data, "test_op_vs_kernel_paired", device="cpu")
    if not pairs:
        return []
    # The largest shape: where the kernel's own work weighs most against autograd's fixed cost.
    info = max(pairs, key=lambda b: b["extra_info"]["shape"][0] * b["extra_info"]["shape"][1])["extra_info"]
    return [verdict("loss cpu B{}-C{}: weighted_loss op fwd+bwd / bare kernel (paired)".format(*info["shape"]),
                    info.get("op_vs_kernel"), at_most=2.0)]


def sam_checks(data: dict) -> list[dict]:
    out = []
    for bench in rows(data, "test_paired_ratios_vs_sgd"):
        info = bench["extra_info"]
        for tag in ("ce", "rdr"):
            out.append(verdict(f"SAM {info['device']} {tag}: fused SAM / SGD step (paired)",
                               info.get(f"{tag}/sam_vs_sgd"), at_most=2.05))
            cheap = [info.get(f"{tag}/{m}_vs_sgd") for m in ("sam_k", "looksam")]
            out.append(verdict(f"SAM {info['device']} {tag}: min(sam_k, looksam) / SGD step (paired)",
                               min(cheap) if None not in cheap else None, at_most=1.3))
        out.append(verdict(f"SAM {info['device']}: with RDR / without (paired)", info.get("sam_rdr_vs_sam_ce"),
                           at_most=1.03))
    runs = {(b["extra_info"]["device"], b["extra_info"]["mode"]) for b in rows(data, "test_sam_step", method="sam")}
    for device, mode in sorted(runs):
        value = ratio(median(data, "test_sam_step", device=device, mode=mode, method="sam", loss="rdr"),
                      median(data, "test_sam_step", device=device, mode=mode, method="sam", loss="ce"))
        out.append(verdict(f"SAM step {device} {mode}: with RDR / without", value, at_most=1.03))
    return out


def module_checks(data: dict) -> list[dict]:
    """RDRLoss / F.cross_entropy, forward + backward, at the first module shape (paired)."""
    paired = rows(data, "test_module_paired")
    first = min((tuple(b["extra_info"]["shape"]) for b in paired), default=None)
    return [verdict(f"RDRLoss {b['extra_info']['device']} {first}: default args / CE (paired)",
                    b["extra_info"].get("rdr_vs_ce"), at_most=1.5)
            for b in paired if tuple(b["extra_info"]["shape"]) == first]


def checks(data: dict) -> list[dict]:
    return (weights_checks(data) + official_checks(data) + step_checks(data) + module_checks(data)
            + loss_autograd_checks(data) + sam_checks(data))


def checks_table(results: list[dict]) -> str:
    lines = ["| check | value | target | result |", "|---|---:|---:|---|"]
    for c in results:
        value = "—" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"| {c['check']} | {value} | {c['target']} | {c['status']} |")
    return "\n".join(lines)


def header(data: dict) -> str:
    info = data["machine_info"]
    extra = info.get("rdr_fast", {})
    line = (f"{info['cpu']['brand_raw']}, {info['cpu']['count']} cores; GPU {extra.get('gpu')}; "
            f"torch {extra.get('torch')}, triton {extra.get('triton')}; {data['datetime']}")
    if extra.get("smoke"):
        line += "\n\nSmoke run (BENCH_SMOKE=1): tiny shapes, single rounds; the figures mean nothing."
    return line


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--json", help="also write the checks and the tables to this file")
    args = parser.parse_args(argv)
    data = load(args.files)
    summary = {"machine_info": data["machine_info"], "checks": checks(data), "tables": tables(data),
               "scaling": scaling_table(data)}
    print(header(data))
    print(summary["tables"])
    if summary["scaling"]:
        print("\n**scaling** (bench_scaling.py; plot: bench/plot_scaling.py)\n\n" + summary["scaling"])
    print("\n**checks**\n\n" + checks_table(summary["checks"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
