"""Input validation with messages that name the problem.

Two tiers:
- metadata checks (rank, shape, dtype, device) always run: they cost nothing and never
  synchronise with the GPU;
- data checks (label range, NaN/Inf, non-negative counts of a tensor) read the values.
  They run when ``validate`` is True, or when it is None (the default) and the tensors
  are on the CPU. On a GPU they would force a host sync each step, so there the default
  skips them; pass ``validate=True`` to pay for them anyway.
"""
from __future__ import annotations

import torch


def wants_data_checks(validate: bool | None, *tensors: torch.Tensor) -> bool:
    if validate is None:
        return all(t.device.type == "cpu" for t in tensors)
    return bool(validate)


def check_tensor(name: str, value, ndim: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def check_floating(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_labels(labels, batch: int, num_classes: int, data_checks: bool) -> None:
    check_tensor("labels", labels, 1)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but the batch has {batch} samples")
    if batch == 0:
        raise ValueError("the batch is empty: features, logits and labels have 0 samples")
    if data_checks:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{low}, {high}]")


def check_finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_features(features, feat_dim: int, batch: int | None = None) -> None:
    check_tensor("features", features, 2)
    check_floating("features", features)
    if features.shape[1] != feat_dim:
        raise ValueError(f"features have width {features.shape[1]} but feat_dim is {feat_dim}")
    if batch is not None and features.shape[0] != batch:
        raise ValueError(f"features have {features.shape[0]} rows but logits have {batch}")


def check_logits(logits, num_classes: int) -> None:
    check_tensor("logits", logits, 2)
    check_floating("logits", logits)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} columns but there are {num_classes} classes")


def as_class_counts(class_counts) -> torch.Tensor:
    """Class counts as a 1-D int64 CPU tensor; every count must be a positive integer."""
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if counts.is_floating_point():
        if not bool(torch.isfinite(counts).all()) or not bool((counts == counts.round()).all()):
            raise ValueError("class_counts must be whole numbers, got non-integer or NaN values")
    elif counts.dtype == torch.bool:
        raise TypeError("class_counts must be integers, got a bool tensor")
    counts = counts.detach().cpu().to(torch.int64)
    if bool((counts <= 0).any()):
        bad = (counts <= 0).nonzero().flatten().tolist()
        raise ValueError(f"class_counts must all be positive; classes {bad[:10]} have count <= 0")
    return counts


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, low_open=False, high_open=False):
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if value != value or too_low or too_high:  # value != value: NaN
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {value}")
