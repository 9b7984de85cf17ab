"""Print a pytest-benchmark JSON file as the markdown tables of bench/README.md.

    pytest bench/ --benchmark-only --benchmark-json=bench.json && python bench/summarize.py bench.json

Each group gets one row per backend: median µs and how many times faster than every
slower baseline in the group (reference, torch, unfused, ce).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("reference", "unfused", "torch", "ce")  # a row is compared with each one present


def tables(data: dict) -> str:
    groups, extras = defaultdict(dict), defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["extra_info"]["backend"]] = bench["stats"]
        extras[bench["group"]][bench["extra_info"]["backend"]] = bench["extra_info"]
    lines = []
    for group, stats in groups.items():
        baselines = [b for b in BASELINES if b in stats]
        lines += [f"\n**{group}**\n", "| backend | median µs | min µs | rounds | "
                  + " | ".join(f"vs {b}" for b in baselines) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(baselines)]
        for backend, s in stats.items():
            ratios = [f"{stats[b]['median'] / s['median']:.2f}×" if "+" not in backend else "—" for b in baselines]
            lines.append(f"| {backend} | {s['median'] * 1e6:,.1f} | {s['min'] * 1e6:,.1f} | {s['rounds']} | "
                         + " | ".join(ratios) + " |")
        for backend, extra in extras[group].items():
            if "rdr_over_ce" in extra:
                lines.append(f"\n{backend}: median per-pair time ratio RDR / CE = {extra['rdr_over_ce']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    info = data["machine_info"]
    print(f"{info['cpu']['brand_raw']}, {info['cpu']['count']} cores; {data['datetime']}")
    print(tables(data))
