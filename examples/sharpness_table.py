"""The sharpness of several runs as one markdown table, mean ± std over seeds.

Each RUN folder holds a run of ``python -m rdr_fast.train`` and the sharpness.json that
``python -m rdr_fast.analyze RUN`` wrote into it. Runs with the same ``--loss``,
``--reweight`` and ``--sam`` are one method (pass runs that differ otherwise only in
``--seed``); for each method the table gives λ_max, λ_min and the Hessian
trace of each analysed class and their average over those classes (the layout of the
RDR paper's Table 3), as mean ± sample std over the method's runs:

    python examples/sharpness_table.py RUN [RUN ...] [--loss trained|ce]

``--loss trained`` (default): the loss each run trained with; ``ce``: plain cross-entropy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

QUANTITIES = (("lambda_max", "λ_max"), ("lambda_min", "λ_min"), ("trace", "trace"))
# Training flags that name a method, with their value in a plain CE + SGD run.
METHOD_FLAGS = {"loss": "ce", "reweight": "none", "sam": "none"}


def read_run(folder: str) -> tuple[str, dict]:
    """(method label, sharpness.json) of one run folder."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "sharpness.json")) as f:
        sharpness = json.load(f)
    flags = [f"--{k} {config[k]}" for k, plain in METHOD_FLAGS.items() if config.get(k, plain) != plain]
    return " ".join(flags) or "--reweight none", sharpness


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(folders: list[str], loss: str = "trained") -> str:
    methods: dict[str, list[dict]] = {}
    for folder in folders:
        label, sharpness = read_run(folder)
        methods.setdefault(label, []).append(sharpness)
    classes = sorted({c for runs in methods.values() for run in runs for c in run["per_class"]}, key=int)
    lines = ["| method | runs | quantity | " + " | ".join(f"class {c}" for c in classes) + " | average |",
             "|---|---:|---|" + "---:|" * (len(classes) + 1)]
    for label, runs in methods.items():
        missing = [c for c in classes for run in runs if c not in run["per_class"]]
        if missing:
            raise ValueError(f"{label}: a run has no sharpness for class {missing[0]}")
        for key, name in QUANTITIES:
            cells = [mean_std([run["per_class"][c][loss][key] for run in runs]) for c in classes]
            average = mean_std([statistics.mean(run["per_class"][c][loss][key] for c in classes) for run in runs])
            lines.append(f"| `{label}` | {len(runs)} | {name} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, each with config.json and sharpness.json")
    parser.add_argument("--loss", choices=("trained", "ce"), default="trained")
    args = parser.parse_args(argv)
    text = table(args.runs, args.loss)
    print(text)
    return text


if __name__ == "__main__":
    main()
