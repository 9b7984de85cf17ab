"""Print a pytest-benchmark JSON file as the markdown tables of bench/README.md.

    pytest bench/ --benchmark-only --benchmark-json=bench.json && python bench/summarize.py bench.json

Each group gets one row per backend / method / loader: median µs and the speed-up over
every baseline present in the group (reference, unfused, torch, ce, sgd, torchvision:
baseline median / row median), then any ratio a benchmark timed itself in pairs.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("reference", "unfused", "torch", "ce", "sgd", "torchvision")  # each one present is a column
LABEL_KEYS = ("backend", "method", "loader")  # extra_info keys that name a row


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
        if not group.endswith("acceptance"):  # acceptance checks time their own pairs
            baselines = [b for b in BASELINES if b in stats]
            lines += ["| row | median µs | min µs | rounds | " + " | ".join(f"vs {b}" for b in baselines) + " |",
                      "|---|---:|---:|---:|" + "---:|" * len(baselines)]
            for label, s in stats.items():
                ratios = [f"{stats[b]['median'] / s['median']:.2f}×" if "+" not in label else "—" for b in baselines]
                lines.append(f"| {label} | {s['median'] * 1e6:,.1f} | {s['min'] * 1e6:,.1f} | {s['rounds']} | "
                             + " | ".join(ratios) + " |")
        for label, extra in extras[group].items():
            lines += reported_ratios(label, extra)
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    info = data["machine_info"]
    print(f"{info['cpu']['brand_raw']}, {info['cpu']['count']} cores; {data['datetime']}")
    print(tables(data))
