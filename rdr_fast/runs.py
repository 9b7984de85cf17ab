"""A training run's folder, reopened: its configuration, dataset, model and criterion with the
weights of a saved checkpoint; and what the commands that read a run folder share
(``python -m rdr_fast.evaluate``, ``python -m rdr_fast.analyze``): their common arguments
and how they refuse bad input."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from . import RDRLoss, run_io
from .cli_checks import UsageError, UsageParser
from .data import DataNotFoundError, LTDataset
from .models import build_model
from .config_file import read_config_json
from .train import Config, identity, load_run_dataset

CHECKPOINTS = {"best": run_io.BEST, "last": run_io.CHECKPOINT}  # --which: the file each choice reads


@dataclass
class OpenRun:
    folder: str
    cfg: Config
    ds: LTDataset
    model: torch.nn.Module
    criterion: RDRLoss
    epoch: int  # the epoch the checkpoint was written after


def saved_config(folder: str) -> Config:
    """The Config a run was started with (its config.json); UsageError when the folder is
    not a run or the file is unreadable."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} is not a run folder: it has no config.json")
    saved = read_config_json(path)
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in fields})


def open_run(folder: str, which: str = "last", device: str = "cpu") -> OpenRun:
    """The run in ``folder`` with the weights of its ``which`` checkpoint, on ``device``,
    model and criterion in eval mode. UsageError for a folder that is not a run or a
    checkpoint that is missing; DataNotFoundError when its data are not where the run
    found them; CheckpointError for an unreadable checkpoint."""
    if which not in CHECKPOINTS:
        raise UsageError(f"--which must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    cfg = saved_config(folder)
    path = os.path.join(folder, CHECKPOINTS[which])
    if not os.path.isfile(path):
        raise UsageError(f"{folder} has no {which} checkpoint: {path} does not exist")
    ds = load_run_dataset(cfg)
    # The classes must be the run's: a folder whose classes changed since would mislabel them.
    state = run_io.load_checkpoint(folder, {"classes": identity(cfg, ds)["classes"]}, name=CHECKPOINTS[which])
    model = build_model(cfg.model, ds.num_classes, ds.in_channels).to(device)
    model.load_state_dict(state["model"])
    criterion = RDRLoss(ds.class_counts, model.feat_dim, base=cfg.loss, reweight=cfg.reweight,
                        momentum=cfg.rdr_momentum, temperature=cfg.temperature, tau=cfg.tau,
                        focal_gamma=cfg.focal_gamma, beta=cfg.cb_beta).to(device)
    criterion.load_state_dict(state["criterion"])
    return OpenRun(folder, cfg, ds, model.eval(), criterion.eval(), int(state["epoch"]))


# What a command reading a run folder reports as one `error:` line with exit status 2.
COMMAND_ERRORS = (UsageError, DataNotFoundError, run_io.CheckpointError)


def command_parser(module: str, doc: str, which: str) -> argparse.ArgumentParser:
    """The arguments every such command takes: the run folder, --which (default
    ``which``), --device and --quiet."""
    parser = UsageParser(prog=f"python -m {module}", description=doc.split("\n")[0],
                         epilog="Exit status 2: a bad argument or an unusable run folder.")
    parser.add_argument("run_dir", help="a run folder written by python -m rdr_fast.train")
    parser.add_argument("--which", default=which, choices=tuple(CHECKPOINTS), help="the checkpoint to read")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bars")
    return parser


def checked_command_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device")
    return args


def run_command(work, argv=None):
    """``work(argv)``'s result, or one `error:` line on stderr and exit status 2."""
    try:
        return work(argv)
    except COMMAND_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
