"""The scaling sweep of bench_scaling.py as a table and a log-log plot.

    pytest bench/bench_scaling.py --benchmark-only --benchmark-json=scaling.json
    python bench/plot_scaling.py scaling.json [more.json ...] [--out bench/scaling.png]

Prints the sweep's table (summarize.scaling_table) and writes one figure of four panels,
time (top) and peak extra memory (bottom) against the number of classes C, both axes
logarithmic: the weights + update op on the left, one line per device/backend and
feature width K at one batch size (PLOT_BATCH, or the largest present below it), and the
loss forward + backward on the right, one line per device/backend and batch size B.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summarize import load, scaling_rows, scaling_table  # noqa: E402
from rdr_fast.run_io import figure  # noqa: E402

PLOT_BATCH = 256


def lines(rows: list[dict], key: str) -> dict:
    """{(device/backend, key value): [(C, row), ...] sorted by C}."""
    out: dict = {}
    for r in rows:
        out.setdefault((f"{r['device']}/{r['backend']}", r[key]), []).append((r["C"], r))
    return {label: sorted(points, key=lambda p: p[0]) for label, points in sorted(out.items())}


def plot(rows: list[dict], path: str) -> None:
    weights = [r for r in rows if r["op"] == "weights+update"]
    batches = sorted({r["B"] for r in weights})
    batch = max([b for b in batches if b <= PLOT_BATCH] or batches or [0])
    panels = [("weights + update", [r for r in weights if r["B"] == batch], "K", f"B = {batch}"),
              ("loss forward + backward", [r for r in rows if r["op"] == "loss"], "B", "")]
    with figure(path, size=(11, 8)) as (fig, _):
        fig.clear()
        axes = fig.subplots(2, 2, sharex=True)
        for column, (title, found, key, note) in enumerate(panels):
            for (label, value), points in lines(found, key).items():
                c = [p[0] for p in points]
                style = dict(marker="o", label=f"{label}, {key} = {value}")
                axes[0][column].plot(c, [p[1]["median_s"] * 1e6 for p in points], **style)
                axes[1][column].plot(c, [max(p[1]["peak_bytes"], 1) / 2 ** 20 for p in points], **style)
            axes[0][column].set(title=f"{title} {note}".strip(), ylabel="median µs per call")
            axes[1][column].set(xlabel="classes C", ylabel="peak extra memory (MiB)")
            for ax in (axes[0][column], axes[1][column]):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.grid(True, which="major", alpha=0.3)
            axes[0][column].legend(fontsize=7)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files holding bench_scaling.py rows")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png"))
    args = parser.parse_args(argv)
    data = load(args.files)
    rows = scaling_rows(data)
    if not rows:
        raise SystemExit("error: no bench_scaling.py rows in " + ", ".join(args.files))
    print(scaling_table(data))
    plot(rows, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
