"""Experiment trackers for `python -m rdr_fast.train --logger none|tensorboard|wandb`:
each evaluated epoch's metrics row as scalars (step = the epoch), the run's configuration
as hyperparameters. metrics.csv and the plots are written whichever is chosen; only the
main process logs.

- tensorboard: event files in RUN/tensorboard (`tensorboard --logdir RUN`); the
  configuration as hparams against the final metrics when the run ends. A resumed run
  writes on where the checkpoint left off (epochs logged after it are dropped).
- wandb: a run named after the run folder, files in RUN/wandb, project $WANDB_PROJECT
  (default rdr_fast). Mode: $WANDB_MODE when set, else online with $WANDB_API_KEY set
  and offline otherwise (upload later with `wandb sync RUN/wandb/offline-run-*`). A
  resumed run is logged as a new wandb run of the same name, from the epoch it goes on at.

The packages are optional extras: `pip install "rdr_fast[tensorboard]"` / `"rdr_fast[wandb]"`.
"""
from __future__ import annotations

import importlib
import json
import math
import os

LOGGERS = ("none", "tensorboard", "wandb")
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}   # what each one imports
INSTALL = {"tensorboard": 'pip install "rdr_fast[tensorboard]"', "wandb": 'pip install "rdr_fast[wandb]"'}


def missing_package(kind: str) -> str | None:
    """Why the logger ``kind`` cannot be used here (its package is not installed), or None."""
    if kind == "none":
        return None
    try:
        importlib.import_module(MODULES[kind])
    except ImportError:
        return f"needs the {kind} package, which is not installed: {INSTALL[kind]}"
    return None


def scalars(row: dict) -> dict:
    """The finite numbers of a metrics row (a split without test samples has none)."""
    return {key: value for key, value in row.items() if isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


class Logger:
    """--logger none, and the interface of the others."""

    def log(self, row: dict) -> None:
        """One evaluated epoch's metrics row (its "epoch" is the step)."""

    def finish(self, final: dict) -> None:
        """The finished run's last row."""

    def close(self) -> None:
        """Write out what is pending; called once, when the invocation ends."""


class TensorBoardLogger(Logger):
    def __init__(self, folder: str, config: dict, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events a killed run wrote after its last checkpoint are replaced, not doubled.
        self.writer = SummaryWriter(log_dir=os.path.join(folder, "tensorboard"), purge_step=first_step)
        self.config = config
        self.writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), first_step)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.writer.flush()   # on disk each epoch, whatever happens to the run later

    def finish(self, final: dict) -> None:
        # hparams take bool, str, int and float; the unset ones (None) are shown as "None".
        hparams = {k: v if isinstance(v, (bool, str, int, float)) else str(v) for k, v in self.config.items()}
        # Their own tag names: add_hparams shows a metric logged by add_scalar under the same tag instead.
        metrics = {f"hparam/{key}": value for key, value in scalars(final).items() if key != "epoch"}
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=final["epoch"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    def __init__(self, folder: str, config: dict, first_step: int):
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rdr_fast"), dir=folder, config=config,
                              name=os.path.basename(os.path.abspath(folder)), mode=mode)

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["epoch"])

    def finish(self, final: dict) -> None:
        self.run.summary.update(scalars(final))

    def close(self) -> None:
        self.run.finish()


def open_logger(kind: str, folder: str, config: dict, first_step: int = 1) -> Logger:
    """The logger ``kind`` (one of LOGGERS) of the run in ``folder`` with settings ``config``;
    first_step: the first epoch this invocation will log."""
    if kind not in LOGGERS:
        raise ValueError(f"logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
    if kind == "none":
        return Logger()
    return {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}[kind](folder, config, first_step)
