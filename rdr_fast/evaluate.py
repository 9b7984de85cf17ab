"""Evaluate a training run's saved model: `python -m rdr_fast.evaluate RUN_DIR [--flags]`.

Rebuilds the run's model from its config.json, loads the weights of its best (best.pt,
default) or last (checkpoint.pt) epoch, evaluates it on the test set (--split val: the
validation split, where the run's dataset has one) with the run's own
loader and batch size, and writes RUN_DIR/eval.json with every metric of
rdr_fast.metrics (top-1/5, Many/Medium/Few by class index and by training count,
balanced and worst-class accuracy, ECE, NLL, per class) and prints them. On the
checkpoint of the run's last epoch it reproduces the run's own summary exactly.

--posthoc-tau T evaluates the logits minus T·log π (post-hoc logit adjustment, Menon
et al., "Long-tail learning via logit adjustment", arXiv 2007.07314), π being the
training class frequencies.

A bad argument, a folder that is not a run, a missing checkpoint or missing data: one
`error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os

import torch

from . import run_io
from .cli_checks import UsageError
from .data import make_loaders
from .functional import log_prior
from .runs import checked_command_args, command_parser, open_run, run_command
from .train import evaluate as evaluate_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("rdr_fast.evaluate", __doc__, which="best")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--posthoc-tau", type=float, default=0.0, help="evaluate logits − τ·log π")
    args = checked_command_args(parser, argv)
    if not math.isfinite(args.posthoc_tau):
        raise UsageError(f"--posthoc-tau must be a finite number, got {args.posthoc_tau}")
    return args


class PosthocAdjusted(torch.nn.Module):
    """A (features, logits) model whose logits are shifted by −τ·log π."""

    def __init__(self, model, class_counts, tau: float):
        super().__init__()
        self.model, self.shift = model, tau * log_prior(class_counts)

    def forward(self, x):
        features, logits = self.model(x)
        return features, logits - self.shift.to(logits)


def evaluate_run(args) -> dict:
    run = open_run(args.run_dir, args.which, args.device)
    if args.split == "val" and run.ds.val is None:
        raise UsageError(f"--split val: {run.cfg.dataset} here has no validation split (folder: a val/ folder, "
                         "list: --val-list, ImageNet-LT / Places-LT: the val list file); the run selected on "
                         "the test set")
    cfg = dataclasses.replace(run.cfg, device=args.device, amp=run.cfg.amp and args.device.startswith("cuda"))
    _, test_loader, val_loader = make_loaders(run.ds, cfg.batch_size, seed=cfg.seed, loader=cfg.loader,
                                              device=args.device, val=True)
    loader = val_loader if args.split == "val" else test_loader
    model = PosthocAdjusted(run.model, run.ds.class_counts, args.posthoc_tau) if args.posthoc_tau else run.model
    metrics = evaluate_model(cfg, model, loader, run.ds.num_classes).compute(run.ds.class_counts, run.ds.splits)
    result = {"run": run.folder, "which": args.which, "epoch": run.epoch, "split": args.split,
              "posthoc_tau": args.posthoc_tau, **metrics}
    run_io.write_json(os.path.join(run.folder, "eval.json"), result)
    return result


def _main(argv) -> dict:
    args = parse_args(argv)
    result = evaluate_run(args)
    if not args.quiet:
        print(f"{result['run']}, {args.which} checkpoint (epoch {result['epoch']}), {args.split} set"
              + (f", post-hoc τ = {args.posthoc_tau:g}" if args.posthoc_tau else "") + ":\n"
              + run_io.summary_table(result))
    return result


def main(argv=None) -> dict:
    return run_command(_main, argv)


if __name__ == "__main__":
    main()
