"""Tables and performance checks from the pytest-benchmark JSON files of bench/.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/summarize.py bench.json [more.json ...] [--json summary.json]

Tables (the format of bench/README.md): each group gets one row per backend / method /
loader: median and min µs, rounds, and the speed-up over every baseline present in the
group (reference, unfused, torch, kernel, ce, sgd, torchvision: baseline median / row
median),
then any ratio a benchmark timed itself in pairs.

Checks: the targets the benchmarks are written for, each computed from the rows on every
device (and mode, precision) the files hold rows for, and reported with its value as
pass, FAIL, or missing (a row it needs is absent):

- weights: the op's own kernel (C++ on CPU, Triton on CUDA) ≥ 100× the reference loop on
  the same device, at the first shape of bench_weights.py;
- step: RDR step ≤ 1.03× CE step (bench_step.py's paired ratio);
- loss autograd (CPU): the op's forward + backward ≤ 2× its bare kernel at the largest
  shape of bench_loss.py (paired ratio): autograd's fixed per-call cost, not a recomputed
  gradient (the no-graph backward replays the saved one; recomputing it by the
  double-backward path would cost several kernels more);
- SAM: fused SAM ≤ 2.05× an SGD step, the cheaper of sam_k / looksam ≤ 1.3× (paired
  ratios of bench_sam.py), and the SAM step with RDR ≤ 1.03× the one without (from two
  separately timed rows, so on a busy machine it moves with the load).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

BASELINES = ("reference", "unfused", "torch", "kernel", "ce", "sgd", "torchvision")  # each one present is a column
LABEL_KEYS = ("backend", "method", "loader")  # extra_info keys that name a row
FAST_WEIGHTS_KERNEL = {"cpu": "cpp", "cuda": "triton"}


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
            if isinstance(value, float) and ("_vs_" in key or key == "rdr_over_ce")]


def tables(data: dict) -> str:
    groups, extras = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
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


def step_checks(data: dict) -> list[dict]:
    runs = {(b["extra_info"]["device"], b["extra_info"]["mode"], b["extra_info"]["precision"])
            for b in rows(data, "test_resnet32_step")}
    out = []
    for device, mode, precision in sorted(runs):
        pair = rows(data, "test_resnet32_step_pair", device=device, mode=mode, precision=precision)
        value = pair[0]["extra_info"]["rdr_over_ce"] if pair else None
        out.append(verdict(f"ResNet-32 step {device} {mode} {precision}: RDR / CE (paired)", value, at_most=1.03))
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
    runs = {(b["extra_info"]["device"], b["extra_info"]["mode"]) for b in rows(data, "test_sam_step", method="sam")}
    for device, mode in sorted(runs):
        value = ratio(median(data, "test_sam_step", device=device, mode=mode, method="sam", loss="rdr"),
                      median(data, "test_sam_step", device=device, mode=mode, method="sam", loss="ce"))
        out.append(verdict(f"SAM step {device} {mode}: with RDR / without", value, at_most=1.03))
    return out


def checks(data: dict) -> list[dict]:
    return weights_checks(data) + step_checks(data) + loss_autograd_checks(data) + sam_checks(data)


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
    summary = {"machine_info": data["machine_info"], "checks": checks(data), "tables": tables(data)}
    print(header(data))
    print(summary["tables"])
    print("\n**checks**\n\n" + checks_table(summary["checks"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
