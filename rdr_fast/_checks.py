"""The one validation layer of the Python API: every check RDRLoss and rdr_fast.functional
make, with messages that name the argument and say what was expected. The custom ops and
their backends (C++, Triton, PyTorch, reference) keep only cheap guards of their own, so
a bad input is refused here, with the same exception and message on every backend.

Two tiers:
- metadata checks (type, rank, shape, dtype, device, hyperparameter values) always run:
  they cost nothing and never synchronise with the GPU;
- data checks (label range, NaN/Inf, feature magnitude) read the values. They run when
  ``validate`` is True, or when it is None (the default) and the tensors are on the CPU.
  On a GPU they would force a host sync each step, so there the default skips them; pass
  ``validate=True`` to pay for them anyway.

Labels of any integer dtype (int8 to int64, uint8) are accepted and converted to int64
here, the dtype every backend indexes with; bool and floating labels are refused.
"""
from __future__ import annotations

import math
import numbers

import torch

# Float64 features beyond this magnitude are refused: a class's Gram entries and trace sum
# b_c·K squares, which would overflow float64 (1.8e308) for b_c·K up to 1e8.
MAX_FEATURE_MAGNITUDE = 1e150
# Class counts are summed and divided in float64, exact for integers up to 2**53.
MAX_TOTAL_COUNT = 2 ** 53
COUNTS_EXPECTED = "class_counts must be a 1-D sequence of positive finite integers"


def check_validate(validate) -> None:
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate must be None, True or False, got {validate!r}")


def wants_data_checks(validate: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether to run the data checks; call after the tensors are known to be tensors."""
    check_validate(validate)
    if validate is None:
        for t in tensors:  # a loop, not all(...): this runs every training step
            if t.device.type != "cpu":
                return False
        return True
    return validate


def check_tensor(name: str, value, ndim: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def check_floating(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_count(name: str, value, low: int) -> int:
    """An int ≥ low (bool refused, NumPy integers accepted), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def as_labels(labels, batch: int, *, name: str = "labels", batch_of: str = "features") -> torch.Tensor:
    """``labels`` checked against the batch (the rows of ``batch_of``), as int64 (a copy
    unless it was). Their range is a data check: check_label_range, or data_ok's pass."""
    check_tensor(name, labels, 1)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {batch_of} has {batch} rows")
    if batch == 0:
        raise ValueError(f"the batch is empty: {batch_of} and {name} have 0 samples")
    return labels.to(torch.int64)


def check_label_range(labels: torch.Tensor, num_classes: int, *, name: str = "labels",
                      classes_of: str = "the prototypes") -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}) (the classes of {classes_of}), "
                         f"got values in [{low}, {high}]")


def data_ok(labels: torch.Tensor, num_classes: int, values, limits, labelled_rows=None) -> bool:
    """Whether one call's data passes every data check, in one pass over each tensor and
    one op call (rdr_fast::data_ok): each label in [0, num_classes), each |x| of values[i]
    within limits[i] (NaN and ±Inf never are), and the rows of ``labelled_rows`` that the
    labels name finite. A caller runs its precise checks (check_label_range, check_finite,
    check_feature_scale...), which raise with the message, only when this is False; the
    tensors must be on one device. Under torch.compile it answers False, so the precise
    checks, plain torch ops, are what gets traced."""
    if torch.compiler.is_compiling():
        return False
    return torch.ops.rdr_fast.data_ok(labels, num_classes, values, limits, labelled_rows)


def check_finite(name: str, value: torch.Tensor, where: str = "") -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise ValueError(f"{name} contains {int((~finite).sum())} NaN or Inf value(s){where}")


def check_finite_rows(name: str, value: torch.Tensor, labels: torch.Tensor) -> None:
    """The rows of ``value`` [C, K] that the (in-range) labels name are finite: the state
    rows a step reads, O(B·K) whatever C is."""
    check_finite(name, value[labels.unique()], where=" in the rows of the batch's classes")


def feature_limit(features: torch.Tensor, prototypes: torch.Tensor) -> float:
    """The largest feature magnitude check_feature_scale accepts (inf: finite is enough)."""
    proto_max = torch.finfo(prototypes.dtype).max
    if features.dtype == torch.float64:
        return min(MAX_FEATURE_MAGNITUDE, proto_max)
    return proto_max if torch.finfo(features.dtype).max > proto_max else math.inf


def check_feature_scale(features: torch.Tensor, prototypes: torch.Tensor) -> None:
    """Finite features whose systems (float64) and prototype update (in the prototypes'
    dtype) cannot overflow. Float32 features always pass: their Gram matrices are formed in
    float64, where the square of float32's largest value is far from overflowing."""
    check_finite("features", features)
    proto_max = torch.finfo(prototypes.dtype).max
    if feature_limit(features, prototypes) == math.inf:
        return  # nothing to read: no value of this dtype can fail
    peak = float(features.detach().abs().max())
    if features.dtype == torch.float64 and peak > MAX_FEATURE_MAGNITUDE:
        raise ValueError(f"features reach {peak:.3g} in magnitude; above {MAX_FEATURE_MAGNITUDE:g} their "
                         "Gram matrices overflow float64")
    if peak > proto_max:
        raise ValueError(f"features reach {peak:.3g} in magnitude, beyond what the {prototypes.dtype} prototypes "
                         f"can hold ({proto_max:.3g}); use float64 prototypes")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_features(features, feat_dim: int, batch: int | None = None, width_name: str = "feat_dim") -> None:
    check_tensor("features", features, 2)
    check_floating("features", features)
    if features.shape[1] != feat_dim:
        raise ValueError(f"features have width {features.shape[1]} but {width_name} is {feat_dim}")
    if batch is not None and features.shape[0] != batch:
        raise ValueError(f"features have {features.shape[0]} rows but logits have {batch}")


def check_logits(logits, num_classes: int | None = None) -> None:
    check_tensor("logits", logits, 2)
    check_floating("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class column, got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} columns but there are {num_classes} classes")


def check_weights(weights, batch: int) -> None:
    check_tensor("weights", weights, 1)
    check_floating("weights", weights)
    if weights.shape[0] != batch:
        raise ValueError(f"weights has {weights.shape[0]} entries but logits has {batch} rows")


def as_class_counts(class_counts) -> torch.Tensor:
    """Class counts as a 1-D int64 CPU tensor. Any sequence (list, tuple, range, NumPy
    array, tensor) of positive whole numbers; every way it can be wrong gives a TypeError
    (not a sequence of real numbers) or a ValueError (wrong shape or values) whose message
    starts with COUNTS_EXPECTED. The values are checked as one float64 tensor (exact for
    the integers allowed), so 10 000 classes cost well under a millisecond."""
    counts = _counts_as_float64(class_counts)
    if counts.numel() == 0:
        raise ValueError(f"{COUNTS_EXPECTED}, got an empty sequence")
    bad = ~torch.isfinite(counts) | (counts != counts.floor()) | (counts <= 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"{COUNTS_EXPECTED}, got {_count_at(class_counts, index)!r} at position {index}")
    total = float(counts.sum())
    if total > MAX_TOTAL_COUNT:
        raise ValueError(f"{COUNTS_EXPECTED}, got counts summing to {total:.4g}, more than 2**53")
    return counts.to(torch.int64)


def _counts_as_float64(class_counts) -> torch.Tensor:
    """A 1-D float64 CPU tensor of the counts; TypeError/ValueError for what cannot be one."""
    if isinstance(class_counts, torch.Tensor) or type(class_counts).__module__ == "numpy":  # array or scalar
        if class_counts.ndim != 1:
            raise ValueError(f"{COUNTS_EXPECTED}, got shape {tuple(class_counts.shape)}")
        numeric = class_counts.dtype.kind in "iuf" if type(class_counts).__module__ == "numpy" else (
            class_counts.dtype != torch.bool and not class_counts.is_complex())
        if numeric:
            return torch.as_tensor(class_counts).detach().to("cpu", torch.float64)
        class_counts = class_counts.tolist()  # bool, complex, strings...: refused below, by element
    if not isinstance(class_counts, (list, tuple, range)):
        raise TypeError(f"{COUNTS_EXPECTED}, got {type(class_counts).__name__}")
    for kind in set(map(type, class_counts)):  # a few types, whatever the length
        if issubclass(kind, bool) or not issubclass(kind, numbers.Real):
            index, value = next((i, v) for i, v in enumerate(class_counts) if type(v) is kind)
            nested = isinstance(value, (list, tuple))
            what = "a nested sequence" if nested else f"{type(value).__name__} {value!r}"
            raise (ValueError if nested else TypeError)(f"{COUNTS_EXPECTED}, got {what} at position {index}")
    try:
        return torch.tensor([float(v) for v in class_counts], dtype=torch.float64)
    except OverflowError:
        raise ValueError(f"{COUNTS_EXPECTED}, got a count beyond float64's range") from None


def _count_at(class_counts, index: int):
    value = class_counts[index]
    return value.item() if hasattr(value, "item") else value


def check_choice(name: str, value: str, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """A finite real number in the interval; an infinite bound means "unbounded", never
    "infinity allowed"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lb = "(" if low_open or math.isinf(low) else "["
        hb = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be a finite number in {lb}{low}, {high}{hb}, got {value}")


def unaliased(state: tuple[torch.Tensor, ...], **inputs: torch.Tensor) -> list[torch.Tensor]:
    """The inputs, each cloned when it shares memory with a state tensor that the op updates
    in place (prototypes, seen), so the op reads the values as they were at the call.
    Under torch.compile the traced graph handles aliased inputs itself."""
    if torch.compiler.is_compiling():
        return list(inputs.values())
    out = []
    for value in inputs.values():  # plain loops: this runs every training step
        for s in state:
            if torch._C._is_alias_of(value, s) and _overlap(value, s):
                value = value.clone()
                break
        out.append(value)
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors that share a storage have intersecting memory ranges
    (conservative for strided views: the byte span from the first to the last element)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    first = t.storage_offset() * t.element_size()
    last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()
