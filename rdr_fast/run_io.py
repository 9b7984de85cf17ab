"""What a training run writes: atomic checkpoints, metrics.csv, summary, plots.

A run folder holds:
    config.json      the full configuration (and the git commit, when known)
    checkpoint.pt    the latest completed epoch: model, optimizer, scheduler, RDRLoss
                     state, RNG states, metric history; replaced atomically each epoch.
                     Tensors and plain values only, so torch.load(weights_only=True)
                     reads it, and that is the only way it is read: opening a checkpoint
                     never runs code, even one from someone else
    metrics.csv      one row per evaluated epoch
    summary.json     final metrics, per-class accuracy, class counts, label map
    weights.png      mean RDR weight per Many/Medium/Few split over training (paper Fig. 7)
    accuracy.png     per-split test accuracy over training
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import pickle
import random
import re
import subprocess
import tempfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the model of the epoch with the best top-1 so far (summary.json says on which split)
RUN_FILES = ("config.json", CHECKPOINT, BEST, "metrics.csv", "summary.json", "weights.png", "accuracy.png", "confusion.csv",
             "confusion.png", "reliability.png", "sharpness.json", "spectrum.png", "landscape.png")
SPLITS = ("many", "medium", "few")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another experiment."""


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename it over
    `path`: os.replace is atomic on POSIX, so a crash or a kill -9 at any point leaves
    either the previous file or the new one whole, never a truncated one; the fsync
    before the rename keeps the new name from pointing at unwritten data after a power
    loss."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.basename(path))
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


TEMPORARY_PREFIX = ".tmp-"


def remove_temporaries(folder: str) -> list[str]:
    """Delete what atomic_write left in `folder` when its process was killed between
    creating the temporary file and renaming it (SIGKILL runs no cleanup). The files it
    replaces were never touched. Returns the names removed."""
    stale = sorted(name for name in os.listdir(folder) if name.startswith(TEMPORARY_PREFIX))
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return stale


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
    """This process's RNG states as tensors and plain numbers (weights_only-loadable)."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss_next"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str, state: dict, name: str = CHECKPOINT) -> None:
    """Replace folder/name (checkpoint.pt, or best.pt) atomically. `state` must hold only
    tensors and plain values (dict, list, tuple, str, int, float, bool, None), which
    load_checkpoint reads."""
    atomic_write(os.path.join(folder, name), lambda f: torch.save(state, f))


def load_checkpoint(folder: str, identity: dict | None = None, name: str = CHECKPOINT,
                    implied: dict | None = None) -> dict:
    """Load folder/name with torch.load(weights_only=True), so that a file holding
    pickled Python objects is refused instead of run; with `identity`, check the file
    belongs to the experiment it describes (dataset, model, class counts, ...).
    `implied`: the values of identity keys added after a checkpoint was written, as
    checkpoints from before held them implicitly (compared in their place).
    CheckpointError otherwise."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(f"refusing {path}: it holds a pickled Python object ({found[0]}) whose "
                                  "loading could run arbitrary code; rdr_fast checkpoints hold only "
                                  "tensors and plain values") from None
        raise CheckpointError(_corrupt(path, exc)) from None
    except Exception as exc:  # any other read failure means the file is unusable
        raise CheckpointError(_corrupt(path, exc)) from None
    saved = state.get("identity") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"{path} is not an rdr_fast training checkpoint")
    # A key the checkpoint lacks was added to the identity after it was written: compared
    # with the value it implied, when one is known, and otherwise not at all.
    saved = {**(implied or {}), **saved}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in (identity or {}).items()
             if k in saved and saved[k] != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} belongs to another experiment; " + "; ".join(diffs))
    return state


def _corrupt(path: str, exc: Exception) -> str:
    reason = " ".join(str(exc).split())[:200]   # torch's messages run over many lines
    return (f"checkpoint {path} is corrupt and cannot be read ({type(exc).__name__}: {reason}); "
            "delete it or resume from another run")


def safetensors_available() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def export_weights(model, path: str) -> str:
    """Write the weights alone, for sharing: `model` is an nn.Module or its state_dict.

    With the safetensors package installed the file is safetensors (read it with
    safetensors.torch.load_file); otherwise it is a plain state_dict of tensors written
    by torch.save (read it with torch.load(path, weights_only=True)). Either way it
    holds no code. Written atomically. Returns the format: "safetensors" or "torch".
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    # Own CPU copies: safetensors refuses tensors that share memory.
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    if safetensors_available():
        from safetensors.torch import save
        atomic_write(path, lambda f: f.write(save(tensors)))
        return "safetensors"
    atomic_write(path, lambda f: torch.save(tensors, f))
    return "torch"


def load_weights(path: str) -> dict:
    """The {name: tensor} dict export_weights wrote, in either format, without running code."""
    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if zipped:
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file
    return load_file(path)


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


@contextlib.contextmanager
def figure(path: str, size=(6, 4)):
    """(fig, ax) of a new matplotlib figure (Agg: no display needed), saved to `path`
    when the block ends without an error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_history(folder: str, history: list[dict], title: str) -> None:
    """weights.png (mean RDR weight per split, paper Fig. 7) and accuracy.png."""
    epochs = [row["epoch"] for row in history]
    for prefix, name, ylabel in (("weight_", "weights.png", "mean sample weight"),
                                 ("acc_index_", "accuracy.png", "test top-1 accuracy (%)")):
        with figure(os.path.join(folder, name)) as (_, ax):
            for split in SPLITS:
                ax.plot(epochs, [row[f"{prefix}{split}"] for row in history], marker=".", label=split.title())
            if prefix == "acc_index_":
                ax.plot(epochs, [row["acc_all"] for row in history], "k--", label="All")
            ax.set(xlabel="epoch", ylabel=ylabel, title=title)
            ax.grid(alpha=0.3)
            ax.legend()


# Up to this many classes confusion.csv is the matrix and confusion.png shows every class;
# beyond, the csv lists the non-zero cells and the picture sums the classes by split.
CONFUSION_DENSE_CLASSES = 200


def write_confusion(folder: str, confusion: torch.Tensor, splits: dict) -> None:
    """confusion.csv (counts, rows = true class, columns = predicted) and confusion.png
    (row-normalised: each true class's prediction distribution)."""
    counts = confusion.cpu().long()
    num_classes = counts.shape[0]
    if num_classes <= CONFUSION_DENSE_CLASSES:
        rows = [["true\\predicted", *range(num_classes)]] + [[c, *counts[c].tolist()] for c in range(num_classes)]
    else:
        cells = torch.nonzero(counts)
        rows = [["true", "predicted", "count"]] + [[t, q, int(counts[t, q])] for t, q in cells.tolist()]
    atomic_write(os.path.join(folder, "confusion.csv"),
                 lambda f: f.write("\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"))
    labels = None
    if num_classes > CONFUSION_DENSE_CLASSES:  # true split x predicted split
        bounds = [splits[s] for s in SPLITS]
        counts = torch.stack([torch.stack([counts[a:b, c:d].sum() for c, d in bounds]) for a, b in bounds])
        labels = [s.title() for s in SPLITS]
    share = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    with figure(os.path.join(folder, "confusion.png"), size=(7, 6)) as (fig, ax):
        image = ax.imshow(share.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="share of the true class's test samples")
        if labels:
            ax.set_xticks(range(3), labels)
            ax.set_yticks(range(3), labels)
            for i in range(3):
                for j in range(3):
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center",
                            color="white" if share[i, j] < 0.5 else "black")
        ax.set(xlabel="predicted class" + (" split" if labels else ""),
               ylabel="true class" + (" split" if labels else " (0 = most training samples)"),
               title="Confusion matrix" + (" by Many / Medium / Few" if labels else ""))


def plot_reliability(folder: str, calibration: dict) -> None:
    """reliability.png: accuracy against confidence per bin (rdr_fast.metrics), the gap to
    the diagonal shaded, the ECE in the title."""
    edges, accuracy, confidence = calibration["edges"], calibration["accuracy"], calibration["confidence"]
    width = float(edges[1] - edges[0])
    filled = calibration["count"] > 0
    with figure(os.path.join(folder, "reliability.png"), size=(5, 5)) as (_, ax):
        ax.bar(edges[:-1][filled].numpy(), accuracy[filled].numpy(), width=width, align="edge",
               edgecolor="black", label="accuracy")
        gap_low = torch.minimum(accuracy, confidence)[filled]
        ax.bar(edges[:-1][filled].numpy(), (accuracy - confidence).abs()[filled].numpy(), bottom=gap_low.numpy(),
               width=width, align="edge", fill=False, hatch="//", edgecolor="tab:red",
               label="gap to the mean confidence")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top softmax probability)", ylabel="accuracy",
               title=f"Reliability (ECE {100 * calibration['ece']:.2f}%)")
        ax.legend(loc="upper left")


def summary_table(metrics: dict) -> str:
    """A fixed-width table of the final metrics (rdr_fast.metrics names them)."""
    rows = [("top-1 %", "acc_all"), ("top-5 %", "acc_top5")]
    rows += [(f"{s.title()} % (class index)", f"acc_index_{s}") for s in SPLITS]
    rows += [(f"{s.title()} % (train count)", f"acc_count_{s}") for s in SPLITS]
    rows += [("balanced %", "acc_balanced"), ("worst class %", "acc_worst_class"), ("ECE %", "ece"), ("NLL", "nll")]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {metrics[key]:>7.2f}" if metrics[key] == metrics[key] else f"{label:<{width}}  {'-':>7}"
             for label, key in rows]
    return "\n".join([f"{'metric':<{width}}  {'value':>7}", "-" * (width + 9), *lines])
