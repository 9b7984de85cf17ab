"""Evaluation metrics of a long-tailed classifier, as the field reports them.

``Evaluation`` accumulates, batch by batch and on the logits' device, everything the
metrics need as integer sums: the confusion matrix, top-5 hits, and per confidence bin
the sample count, summed confidence and hits; the summed negative log-likelihood too.
Confidences and log-likelihoods are summed in fixed point (multiples of 2⁻⁴⁰ and 2⁻²⁴),
so the sums, and every metric, are the same whatever the order of the batches and however
the test set is split over processes (torch.distributed: ``all_reduce`` sums them).

``compute(class_counts, index_splits)`` gives:

- ``acc_all`` (top-1), ``acc_top5`` (top-5; top-C when there are fewer than 5 classes);
- ``acc_index_{many,medium,few}``: accuracy over the test samples of the classes in the
  paper's class-index ranges (``LTDataset.splits``; classes are sorted by training count);
- ``acc_count_{many,medium,few}``: the rest of the field's split by training count
  (Decoupling, OLTR, BALMS: many > 100 training images, few < 20, medium 20-100), each
  the mean of its classes' accuracies, over the classes present in the test set;
- ``acc_balanced``: the mean per-class accuracy (macro), ``acc_worst_class``: the lowest;
- ``ece``: expected calibration error with 15 equal-width confidence bins (b-1)/15 < p ≤ b/15,
  Σ_b n_b/N · |acc_b − conf_b| (as MiSLAS computes it), confidence being the top softmax
  probability; ``nll``: mean negative log-likelihood of the true class;
- ``per_class``: each class's accuracy (None for a class absent from the test set).

All accuracies and ECE are percentages.
"""
from __future__ import annotations

import math

import torch

from .distributed import all_reduce_

COUNT_THRESHOLDS = (100, 20)  # many: > 100 training images, few: < 20
ECE_BINS = 15
SPLITS = ("many", "medium", "few")
_CONF_SCALE = 2.0 ** 40  # fixed point of the summed confidences (≤ 1 each: 2⁴⁰·N fits int64 to N ≈ 8·10⁶)
_NLL_SCALE = 2.0 ** 24   # fixed point of the summed −log p (≤ ~10⁴ each in float32 logits)


def count_splits(class_counts, many_above: int = COUNT_THRESHOLDS[0], few_below: int = COUNT_THRESHOLDS[1]) -> dict:
    """Class indices by training count: many > ``many_above``, few < ``few_below``, medium the rest."""
    counts = [int(n) for n in class_counts]
    return {"many": [c for c, n in enumerate(counts) if n > many_above],
            "medium": [c for c, n in enumerate(counts) if few_below <= n <= many_above],
            "few": [c for c, n in enumerate(counts) if n < few_below]}


class Evaluation:
    """Integer sums behind the metrics, for ``num_classes`` classes on ``device``."""

    def __init__(self, num_classes: int, device="cpu", bins: int = ECE_BINS):
        self.num_classes, self.bins = num_classes, bins
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        self.confusion = zeros(num_classes, num_classes)  # [true, predicted]
        self.top5_hits = zeros(())
        self.bin_count, self.bin_hits, self.bin_confidence = zeros(bins), zeros(bins), zeros(bins)
        self.nll = zeros(())

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits [B, C] (any float dtype), labels [B]."""
        log_probs = torch.log_softmax(logits.double(), dim=1)
        confidence, predicted = log_probs.max(dim=1)
        confidence = confidence.exp()
        labels = labels.long()
        self.confusion += torch.bincount(labels * self.num_classes + predicted,
                                         minlength=self.num_classes ** 2).view_as(self.confusion)
        k = min(5, self.num_classes)
        self.top5_hits += (log_probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        # Bin b (0-based) holds b/bins < p <= (b+1)/bins.
        index = (torch.ceil(confidence * self.bins).long() - 1).clamp(0, self.bins - 1)
        hits = (predicted == labels).long()
        self.bin_count += torch.bincount(index, minlength=self.bins)
        self.bin_hits += torch.bincount(index, weights=hits.double(), minlength=self.bins).round().long()
        self.bin_confidence += torch.zeros_like(self.bin_confidence).index_add_(
            0, index, torch.round(confidence * _CONF_SCALE).long())
        self.nll += torch.round(-log_probs.gather(1, labels[:, None]).squeeze(1) * _NLL_SCALE).long().sum()

    def all_reduce(self) -> "Evaluation":
        """Sum over the processes of torch.distributed (each evaluated its own shard)."""
        for total in (self.confusion, self.top5_hits, self.bin_count, self.bin_hits, self.bin_confidence, self.nll):
            all_reduce_(total)
        return self

    def compute(self, class_counts, index_splits: dict) -> dict:
        """The metrics (see the module docstring) as plain Python numbers."""
        if len(class_counts) != self.num_classes:
            raise ValueError(f"class_counts has {len(class_counts)} classes, the evaluation {self.num_classes}")
        confusion = self.confusion.cpu()
        per_class_total = confusion.sum(dim=1)
        total = int(per_class_total.sum())
        if total == 0:
            raise ValueError("nothing was evaluated: no batch was added")
        hits = confusion.diagonal()
        present = per_class_total > 0
        accuracy = hits.double() / per_class_total.clamp_min(1)
        metrics = {"acc_all": 100.0 * int(hits.sum()) / total, "acc_top5": 100.0 * int(self.top5_hits) / total}
        for split, (lo, hi) in index_splits.items():
            n = int(per_class_total[lo:hi].sum())
            metrics[f"acc_index_{split}"] = 100.0 * int(hits[lo:hi].sum()) / n if n else math.nan
        for split, classes in count_splits(class_counts).items():
            kept = [c for c in classes if present[c]]
            metrics[f"acc_count_{split}"] = 100.0 * float(accuracy[kept].mean()) if kept else math.nan
        metrics["acc_balanced"] = 100.0 * float(accuracy[present].mean())
        metrics["acc_worst_class"] = 100.0 * float(accuracy[present].min())
        metrics["ece"] = 100.0 * self.calibration()["ece"]
        metrics["nll"] = int(self.nll) / _NLL_SCALE / total
        metrics["per_class"] = [100.0 * float(a) if p else None for a, p in zip(accuracy, present)]
        return metrics

    def calibration(self) -> dict:
        """Per bin: count, accuracy and mean confidence (NaN in empty bins), and the ECE (a fraction)."""
        count = self.bin_count.cpu().double()
        accuracy = self.bin_hits.cpu().double() / count
        confidence = self.bin_confidence.cpu().double() / _CONF_SCALE / count
        filled = count > 0
        ece = float(((accuracy - confidence).abs()[filled] * count[filled]).sum() / count.sum())
        edges = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)
        return {"edges": edges, "count": count, "accuracy": accuracy, "confidence": confidence, "ece": ece}
