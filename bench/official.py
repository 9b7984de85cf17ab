"""The baseline of the benchmarks: RDR's per-step work as the authors' released code does
it (GoodMorningPeter/RDR, main.py: ``rdr_weights`` and ``update_Phi_nu``), re-expressed
in plain PyTorch with the same structure, operation for operation.

What it mirrors:

- ``official_weights``: a Python loop over *every* class index 0..C−1, present in the
  batch or not. Each iteration builds a boolean mask of the batch, takes the class's rows
  X_c (b_c × K), and when b_c > 0 forms the b_c×b_c Gram matrix X_c X_cᵀ, inverts it with
  ``torch.inverse`` (``torch.pinverse`` when that raises), multiplies the inverse by X_c
  and the result by the prototype column P_c, scales by b_c, clamps at 1e-9 and writes
  the ratios through the mask. A second loop over every class index multiplies the
  masked weights by N/n_c. Last, the weights are scaled to batch mean 1.
- ``official_update``: the batch one sample at a time, each label read to the host with
  ``.item()``; feature sums and counts kept in Python dicts keyed by label; then, per
  label met, the mean, and the prototype column written as μ·P + (1−μ)·mean, or as the
  mean for a label not met in any earlier batch (a Python set of labels).
- The prototypes are stored as the authors store them: [K, C] (one column per class),
  initialised to zeros. rdr_fast keeps them as [C, K]; ``OfficialRDR.prototypes_ck``
  gives the transposed view to compare.

Where it deviates from that code: the wandb logging lines (only active with
``--log_results``) are left out; the state (prototypes, the set of labels met, the
class counts, μ) lives in an object instead of ``args`` and globals; tensors are created
on the features' device instead of ``args.gpu``. The authors' running sum of a label
starts as a view of the label's first feature row, so their ``+=`` overwrites that row
of the features; here it starts as a copy (one K-vector copy per label in the batch), so
the features stay as they were: a benchmark can call it on the same batch again, and a
step can update before backward (which still needs the features).

What it computes, next to rdr_fast (docs/algorithm.md):

- Where X_c X_cᵀ is invertible (b_c ≤ K, linearly independent rows) its ratios are
  rdr_fast's up to the ridge, which rdr_fast adds (relative 1e-5) and this code does
  not. Where it is singular (b_c > K, duplicate or all-zero rows) the two differ:
  rdr_fast solves a ridge system (the K×K one when b_c > K).
- A class not met before has a zero prototype column here, so its ratios are the floor
  1e-9; rdr_fast gives them ratio 1. Once every class in the batch has been met (the
  steady state, which the benchmarks use) both agree.
- The weights, r·N/n_c scaled to batch mean 1, are rdr_fast's ``reweight="rdr"`` at
  temperature 1. (The paper's Eq. 8 drops N/n_c as roughly constant; the released code
  keeps it, as rdr_fast does.)
- The prototype update is rdr_fast's, in the transposed layout.

The authors' loop updates the prototypes after ``optimizer.step()``, from the features
of the forward pass; ``OfficialRDR.__call__`` updates them before returning the loss. The
features are detached in both cases, so the state and the step's work are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RATIO_FLOOR = 1e-9  # the authors' clamp; rdr_fast uses the same floor


def official_weights(features, labels, prototypes_kc, class_counts) -> torch.Tensor:
    """Per-sample weights [B] (float32), batch mean 1, from prototypes stored [K, C]."""
    num_classes = len(class_counts)
    weights = torch.zeros(labels.shape[0], dtype=torch.float, device=features.device)
    with torch.no_grad():
        for c in range(num_classes):
            mask = labels == c
            rows = features[mask]                    # [b_c, K]
            if rows.size(0) > 0:
                gram = rows @ rows.T                 # [b_c, b_c]
                try:
                    gram_inv = torch.inverse(gram)
                except RuntimeError:
                    gram_inv = torch.pinverse(gram)
                coefficients = gram_inv @ rows       # [b_c, K]
                ratios = coefficients @ prototypes_kc[:, c].unsqueeze(1) * rows.size(0)
                weights[mask] = torch.clamp(ratios, min=RATIO_FLOOR).squeeze()
        total = sum(class_counts)
        for c in range(num_classes):
            weights[labels == c] *= total / class_counts[c]
        weights = weights / weights.sum() * weights.size(0)
    return weights


def official_update(features, labels, prototypes_kc, labels_met: set, momentum: float) -> None:
    """The momentum update of the prototype columns [K, C] in place, one sample at a time;
    ``labels_met`` (the labels of all earlier batches) gains this batch's."""
    with torch.no_grad():
        sums, counts = {}, {}
        for j in range(features.size(0)):
            label = labels[j].item()
            if label in sums:
                sums[label] += features[j].detach()
                counts[label] += 1
            else:
                sums[label] = features[j].detach().clone()  # see the module docstring
                counts[label] = 1
        for label, total in sums.items():
            mean = total / counts[label]
            if label in labels_met:
                prototypes_kc[:, label] = momentum * prototypes_kc[:, label] + (1 - momentum) * mean
            else:
                prototypes_kc[:, label] = mean
                labels_met.add(label)


class OfficialRDR:
    """The authors' RDR state and step as a criterion (features, logits, targets) → loss:
    weights, ``(F.cross_entropy(reduction="none") · w).mean()``, then the prototype update.

    Arguments:
        class_counts: training count per class (a list, like the authors' cls_num_list).
        feat_dim: K. momentum: μ (the authors' default 0.9). device: where the
            prototypes live.
    """

    def __init__(self, class_counts, feat_dim: int, momentum: float = 0.9, device="cpu"):
        self.class_counts = [int(n) for n in class_counts]
        self.momentum = momentum
        self.prototypes = torch.zeros(feat_dim, len(self.class_counts), device=device)  # [K, C]
        self.labels_met: set = set()

    @property
    def prototypes_ck(self) -> torch.Tensor:
        """The prototypes in rdr_fast's layout, [C, K] (a view)."""
        return self.prototypes.T

    def weights_and_update(self, features, labels) -> torch.Tensor:
        weights = official_weights(features, labels, self.prototypes, self.class_counts)
        official_update(features, labels, self.prototypes, self.labels_met, self.momentum)
        return weights

    def __call__(self, features, logits, targets) -> torch.Tensor:
        weights = official_weights(features, targets, self.prototypes, self.class_counts)
        loss = (F.cross_entropy(logits, targets, reduction="none") * weights).mean()
        official_update(features, targets, self.prototypes, self.labels_met, self.momentum)
        return loss
