"""Sharpness of a trained run, per class: `python -m rdr_fast.analyze RUN_DIR [--flags]`.

For each chosen class, and for each split of the chosen classes together, the Hessian of
the loss over that class's training samples (no augmentation; model in eval mode) with
respect to the model's parameters: λ_max and λ_min (one Lanczos run) and the trace
(Hutchinson, with its standard error), for the loss the run trained with (its RDRLoss,
weights from its saved prototypes) and for plain cross-entropy. As in the RDR paper's
Table 3 and Fig. 4 (rdr_fast.analysis has the estimators). Writes into RUN_DIR:

- sharpness.json: every number, with the settings that produced it;
- spectrum.png: the eigenvalue density (stochastic Lanczos quadrature, log scale) of the
  trained loss on the rarest chosen class, λ_max and λ_min marked;
- landscape.png: both losses along that class's top eigenvector, θ + ε·v.

A bad argument, a folder that is not a run, a missing checkpoint or missing data: one
`error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import analysis, run_io
from .cli_checks import UsageError
from .runs import checked_command_args, command_parser, open_run, run_command

SPLITS = ("many", "medium", "few")


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("rdr_fast.analyze", __doc__, which="last")
    parser.add_argument("--classes", default="few",
                        help="few | many | medium | all (the run's class-index splits) or class indices, e.g. 0,7,9")
    parser.add_argument("--num-batches", type=int, default=1, help="batches per class (each --batch-size samples)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=100, help="Lanczos steps for λ_max / λ_min")
    parser.add_argument("--trace-samples", type=int, default=50, help="Hutchinson vectors for the trace")
    parser.add_argument("--density-steps", type=int, default=60, help="Lanczos steps per spectral-density run")
    parser.add_argument("--density-runs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=0.5, help="landscape.png spans θ ± ε·v")
    parser.add_argument("--seed", type=int, default=0)
    args = checked_command_args(parser, argv)
    for name in ("num_batches", "batch_size", "iters", "density_steps", "density_runs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.trace_samples < 2:
        raise UsageError(f"--trace-samples must be >= 2 (a standard error needs two), got {args.trace_samples}")
    if not (0 < args.epsilon < float("inf")):
        raise UsageError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    args.progress = False if args.quiet else None  # None: bars on a terminal only
    return args


def chosen_classes(spec: str, splits: dict, num_classes: int) -> list[int]:
    """The classes --classes names: a split of the run, all, or comma-separated indices."""
    if spec == "all":
        return list(range(num_classes))
    if spec in SPLITS:
        lo, hi = splits[spec]
        return list(range(lo, hi))
    try:
        classes = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise UsageError(f"--classes must be few, many, medium, all or class indices like 0,7,9; got {spec!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes: {bad} not in [0, {num_classes}) (the run has {num_classes} classes)")
    return classes


def class_batches(dataset, classes, batch_size: int, num_batches: int) -> list:
    """Up to num_batches batches of the samples of ``classes``, in dataset order."""
    indices = torch.nonzero(torch.isin(dataset.targets, torch.tensor(classes))).flatten()[:batch_size * num_batches]
    batches = []
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size].tolist()]
        batches.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return batches


def loss_functions(criterion) -> dict:
    """The two losses of the study, for a model returning (features, logits)."""
    return {"trained": lambda out, y: criterion(out[0], out[1], y),
            "ce": lambda out, y: F.cross_entropy(out[1], y)}


def sharpness(model, loss_fn, batches, args) -> dict:
    top, bottom = analysis.hessian_extremes(model, loss_fn, batches, iters=args.iters, seed=args.seed,
                                            progress=args.progress)
    trace, error = analysis.hessian_trace(model, loss_fn, batches, samples=args.trace_samples, seed=args.seed,
                                          progress=args.progress)
    return {"lambda_max": top, "lambda_min": bottom, "trace": trace, "trace_stderr": error}


def analyze(args) -> dict:
    run = open_run(args.run_dir, args.which, args.device)
    classes = chosen_classes(args.classes, run.ds.splits, run.ds.num_classes)
    plain = run.ds.train.without_augmentation()
    device_batches = lambda cs: [(x.to(args.device), y.to(args.device))  # noqa: E731
                                 for x, y in class_batches(plain, cs, args.batch_size, args.num_batches)]
    losses = loss_functions(run.criterion)
    result = {"run": run.folder, "which": args.which, "epoch": run.epoch, "method": run.cfg.loss + "+" + run.cfg.reweight,
              "settings": {k: v for k, v in vars(args).items() if k not in ("run_dir", "quiet", "progress")},
              "class_counts": run.ds.class_counts, "per_class": {}, "per_split": {}}
    for c in classes:
        batches = device_batches([c])
        if not batches:
            continue  # a class without training samples (label noise can empty one)
        result["per_class"][str(c)] = {name: sharpness(run.model, fn, batches, args) for name, fn in losses.items()}
    for split in SPLITS:
        lo, hi = run.ds.splits[split]
        members = [c for c in classes if lo <= c < hi]
        if members:
            batches = device_batches(members)
            result["per_split"][split] = {name: sharpness(run.model, fn, batches, args) for name, fn in losses.items()}
    if not result["per_class"]:
        raise UsageError(f"--classes {args.classes}: none of these classes has a training sample")
    rarest = min((int(c) for c in result["per_class"]), key=lambda c: run.ds.class_counts[c])
    rarest_batches = device_batches([rarest])
    draw_spectrum(run, losses["trained"], rarest_batches, rarest, result, args)
    draw_landscape(run, losses, rarest_batches, rarest, args)
    run_io.write_json(os.path.join(run.folder, "sharpness.json"), result)
    return result


def draw_spectrum(run, loss_fn, batches, cls, result, args) -> None:
    density = analysis.hessian_density(run.model, loss_fn, batches, steps=args.density_steps, runs=args.density_runs,
                                       seed=args.seed, progress=args.progress)
    numbers = result["per_class"][str(cls)]["trained"]
    with run_io.figure(os.path.join(run.folder, "spectrum.png")) as (_, ax):
        ax.semilogy(density.grid.numpy(), density.density.clamp_min(1e-12).numpy(), color="tab:blue")
        for value, label, colour in ((numbers["lambda_max"], "λ_max", "tab:red"),
                                     (numbers["lambda_min"], "λ_min", "tab:green")):
            ax.axvline(value, color=colour, linestyle="--", label=f"{label} = {value:.3g}")
        ax.set(xlabel="eigenvalue", ylabel="density (log scale)", ylim=(1e-8, None),
               title=f"Hessian spectrum, class {cls} (training samples: {run.ds.class_counts[cls]})")
        ax.legend()
    result["spectrum"] = {"class": cls, "nodes": [n.tolist() for n in density.nodes],
                          "weights": [w.tolist() for w in density.weights]}


def draw_landscape(run, losses, batches, cls, args) -> None:
    _, vectors = analysis.hessian_eigenvalues(run.model, losses["trained"], batches, iters=args.iters, seed=args.seed,
                                              return_vectors=True, progress=args.progress)
    epsilons = torch.linspace(-args.epsilon, args.epsilon, 41)
    with run_io.figure(os.path.join(run.folder, "landscape.png")) as (_, ax):
        for name, fn in losses.items():
            curve = analysis.loss_along(run.model, fn, batches, vectors[0], epsilons)
            ax.plot(epsilons.numpy(), curve.numpy(), label={"trained": "loss trained with", "ce": "cross-entropy"}[name])
        ax.set(xlabel="ε (along the top eigenvector v)", ylabel="loss at θ + ε·v", title=f"Loss landscape, class {cls}")
        ax.legend()


def table(result) -> str:
    """The per-class rows and the per-split averages, as in the RDR paper's Table 3."""
    head = f"{'class':>8} {'n':>6} | " + " | ".join(f"{name:^32}" for name in ("trained loss", "cross-entropy"))
    sub = f"{'':>8} {'':>6} | " + " | ".join(f"{'λ_max':>10} {'λ_min':>10} {'trace':>10}" for _ in range(2))
    lines = [head, sub, "-" * len(sub)]

    def row(label, n, numbers):
        cells = [f"{numbers[k]['lambda_max']:>10.4g} {numbers[k]['lambda_min']:>10.4g} {numbers[k]['trace']:>10.4g}"
                 for k in ("trained", "ce")]
        return f"{label:>8} {n:>6} | " + " | ".join(cells)
    for c, numbers in result["per_class"].items():
        lines.append(row(c, result["class_counts"][int(c)], numbers))
    for split, numbers in result["per_split"].items():
        lines.append(row(split, "", numbers))
    return "\n".join(lines)


def _main(argv) -> dict:
    args = parse_args(argv)
    result = analyze(args)
    if not args.quiet:
        print(table(result))
        print(f"wrote sharpness.json, spectrum.png, landscape.png in {args.run_dir}")
    return result


def main(argv=None) -> dict:
    return run_command(_main, argv)


if __name__ == "__main__":
    main()
