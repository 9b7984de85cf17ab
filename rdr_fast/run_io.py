"""What a training run writes: atomic checkpoints, metrics.csv, summary, plots.

A run folder holds:
    config.json      the full configuration (and the git commit, when known)
    checkpoint.pt    the latest completed epoch: model, optimizer, scheduler, RDRLoss
                     state, RNG states, metric history; replaced atomically each epoch
    metrics.csv      one row per evaluated epoch
    summary.json     final metrics, per-class accuracy, class counts, label map
    weights.png      mean RDR weight per Many/Medium/Few split over training (paper Fig. 7)
    accuracy.png     per-split test accuracy over training
"""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import tempfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
SPLITS = ("many", "medium", "few")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another experiment."""


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash mid-write
    leaves the previous file intact, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str, state: dict) -> None:
    atomic_write(os.path.join(folder, CHECKPOINT), lambda f: torch.save(state, f))


def load_checkpoint(folder: str, identity: dict) -> dict:
    """Load folder/checkpoint.pt and check it belongs to the experiment `identity`
    describes (dataset, model, class counts, ...); CheckpointError otherwise."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint {path} is corrupt and cannot be read ({type(exc).__name__}: "
                              f"{exc}); delete it or resume from another run") from None
    saved = state.get("identity") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"{path} is not an rdr_fast training checkpoint")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} belongs to another experiment; " + "; ".join(diffs))
    return state


def write_metrics(folder: str, history: list[dict]) -> None:
    """Rewrite metrics.csv from the whole history (so a resumed run has one clean file)."""
    if not history:
        return
    fields = list(history[0])

    def write(handle):
        text = _csv_text(fields, history)
        handle.write(text.encode())
    atomic_write(os.path.join(folder, "metrics.csv"), write)


def _csv_text(fields, rows) -> str:
    import io
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_history(folder: str, history: list[dict], title: str) -> None:
    """weights.png (mean RDR weight per split, paper Fig. 7) and accuracy.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    for prefix, name, ylabel in (("weight", "weights.png", "mean sample weight"),
                                 ("acc", "accuracy.png", "test top-1 accuracy (%)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in SPLITS:
            ax.plot(epochs, [row[f"{prefix}_{split}"] for row in history], marker=".", label=split.title())
        if prefix == "acc":
            ax.plot(epochs, [row["acc_all"] for row in history], "k--", label="All")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=120)
        plt.close(fig)


def summary_table(metrics: dict) -> str:
    """A fixed-width table of the final accuracies."""
    head = f"{'split':<8}{'top-1 %':>9}"
    rows = [f"{'All':<8}{metrics['acc_all']:>9.2f}"]
    rows += [f"{s.title():<8}{metrics[f'acc_{s}']:>9.2f}" for s in SPLITS]
    return "\n".join([head, "-" * len(head), *rows])
