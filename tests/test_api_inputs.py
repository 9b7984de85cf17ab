"""Bad input to the Python API: a table of calls, each refused on every CPU backend with the
same exception type and message, a message that names the argument.

The backends are swapped in this process: ``on_backend`` registers one backend's kernels
as the ops' CPU kernels for the duration of a call (the C++ kernels of rdr_fast._C are
the default when built; the Triton launchers run CPU tensors in Triton's interpreter).
Also here: what the validation layer accepts and converts (integer label dtypes), inputs
sharing memory with the state the op updates in place, extreme temperatures and feature
magnitudes.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections import Counter
from decimal import Decimal, getcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`, as in test_triton.py

import rdr_fast  # noqa: E402
from rdr_fast import _checks, reference, torch_impl  # noqa: E402
from rdr_fast import functional as Fn  # noqa: E402

OPS = ("rdr_weights_and_update", "weighted_loss")
HAS_CPP = all(rdr_fast.backends()[name]["cpu"] == "cpp" for name in OPS)
BACKENDS = (["cpp"] if HAS_CPP else []) + ["torch", "reference"] + (
    ["triton"] if importlib.util.find_spec("triton") else [])
CALLS: dict[str, int] = {}  # kernel calls per backend, to show the swap is real


def backend_kernels(backend: str) -> dict:
    if backend == "torch":
        return {name: getattr(torch_impl, f"{name}_torch") for name in OPS}
    if backend == "reference":
        return {name: getattr(reference, f"{name}_ref") for name in OPS}
    from rdr_fast import kernels
    return {name: getattr(kernels, f"{name}_triton") for name in OPS}


def counted(backend, kernel):
    def run(*args):
        CALLS[backend] = CALLS.get(backend, 0) + 1
        return kernel(*args)
    return run


@contextlib.contextmanager
def on_backend(backend: str):
    """The ops' CPU kernels are ``backend``'s inside the block (a registration that is
    removed again at the end, restoring the default)."""
    if backend == "cpp":
        yield  # the default registration
        return
    lib = torch.library.Library("rdr_fast", "IMPL")
    try:
        for name, kernel in backend_kernels(backend).items():
            lib.impl(name, counted(backend, kernel), "CPU")
        yield
    finally:
        lib._destroy()


# ---- good arguments ---------------------------------------------------------------------
COUNTS = [40, 20, 6, 2]
B, C, K = 8, 4, 5


def good(kind: str) -> dict:
    """Fresh good arguments of one kind of call (fresh state: the calls update it)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 0])
    if kind == "RDRLoss":
        return dict(class_counts=COUNTS, feat_dim=K)
    if kind == "forward":
        return dict(features=torch.randn(B, K, generator=g), logits=torch.randn(B, C, generator=g), targets=labels)
    if kind == "rdr_weights_and_update":
        return dict(features=torch.randn(B, K, generator=g, dtype=torch.float64), labels=labels,
                    prototypes=torch.randn(C, K, generator=g, dtype=torch.float64),
                    seen=torch.tensor([True, True, False, True]), class_counts=COUNTS)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    weights = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    if kind == "weighted_loss":
        return dict(logits=logits, labels=labels, weights=weights)
    return dict(logits=logits, labels=labels, weights=weights, logit_adjust=Fn.log_prior(COUNTS))


def call(kind: str, args: dict):
    """Runs one call; returns what it computed and the state it may have changed."""
    if kind == "RDRLoss":
        crit = rdr_fast.RDRLoss(**args)
        return crit.class_factors, ()
    if kind == "forward":
        crit = rdr_fast.RDRLoss(COUNTS, K, temperature=0.5)
        return crit(**args), (crit.prototypes, crit.seen, crit.step)
    if kind == "rdr_weights_and_update":
        return Fn.rdr_weights_and_update(**args), (args["prototypes"], args["seen"])
    if kind == "weighted_loss":
        return Fn.weighted_loss(**args), ()
    return Fn.loss_from_weights(**args), ()


KINDS = ("RDRLoss", "forward", "rdr_weights_and_update", "weighted_loss", "loss_from_weights")
CALL_NAMES = {"RDRLoss": "`RDRLoss(...)`", "forward": "`RDRLoss.forward`",
              "rdr_weights_and_update": "`functional.rdr_weights_and_update`",
              "weighted_loss": "`functional.weighted_loss`", "loss_from_weights": "`functional.loss_from_weights`"}


@pytest.mark.parametrize("kind", KINDS)
def test_good_calls_agree_on_every_backend(kind):
    """The baseline of the table: each kind of call with good arguments runs on every
    backend (whose kernel really runs) and gives the same result."""
    results = []
    for backend in BACKENDS:
        before = CALLS.get(backend, 0)
        with on_backend(backend):
            value, state = call(kind, good(kind))
        if backend != "cpp" and kind != "RDRLoss":
            assert CALLS.get(backend, 0) > before, f"{backend}'s kernel did not run"
        results.append((value, state))
    for value, state in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-5, atol=1e-7)
        for got, expected in zip(state, results[0][1]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# ---- the table --------------------------------------------------------------------------
class Row(NamedTuple):
    kind: str       # one of KINDS
    group: str      # the kind of bad input (docs/reliability.md counts them)
    error: type
    change: dict    # replaces good(kind)'s arguments
    names: str      # what the message must name (the argument)


def rows_for(kind: str, group: str, error: type, name: str, values) -> list[Row]:
    return [Row(kind, group, error, {name: v}, name) for v in values]


NAN, INF = float("nan"), float("inf")
NOT_REAL = ["1", None, True, torch.tensor(1.0), 1j]
COUNTS_GROUP = "class_counts not a 1-D sequence of positive finite integers"
META = "meta"


def bad_counts(kind: str) -> list[Row]:
    wrong_type = [None, {0: 5}, "abc", ["a", "b"], 7, [True, 3], [2 + 1j, 3], {4, 5}, np.array(["4", "5"])]
    wrong_value = [[], [[4, 2], [3]], [[4, 2], [3, 1]], torch.tensor([[4, 2]]), [5, 0], [5, -2], [5.5, 2],
                   [NAN, 2], [INF, 2], [2 ** 70, 1], np.array([3, 0])]
    return (rows_for(kind, COUNTS_GROUP, TypeError, "class_counts", wrong_type)
            + rows_for(kind, COUNTS_GROUP, ValueError, "class_counts", wrong_value))


def bad_hyperparameters(kind: str, names) -> list[Row]:
    limits = {"temperature": [-1.0, INF, NAN], "ridge": [0.0, -1e-5, INF, NAN], "momentum": [1.0, -0.1, NAN],
              "beta": [1.0, -0.5, NAN], "focal_gamma": [-1.0, INF, NAN], "tau": [INF, -INF, NAN]}
    rows = []
    for name in names:
        rows += rows_for(kind, "hyperparameter out of range or not finite", ValueError, name, limits[name])
        rows += rows_for(kind, "hyperparameter not a real number", TypeError, name, NOT_REAL)
    return rows


def bad_tensor(kind: str, name: str, *, wrong_rank, wrong_dtype, wrong_length, non_finite=(), extra=()) -> list[Row]:
    """A tensor argument: not a tensor, wrong rank, dtype, length or device, non-finite."""
    base = good(kind)[name]
    return (rows_for(kind, "tensor argument not a tensor", TypeError, name, [base.tolist(), base.numpy()])
            + rows_for(kind, "tensor of the wrong rank", ValueError, name, [wrong_rank])
            + rows_for(kind, "tensor of the wrong dtype", TypeError, name, wrong_dtype)
            + rows_for(kind, "wrong length or width", ValueError, name, wrong_length)
            + rows_for(kind, "tensor on another device", ValueError, name, [base.to(META)])
            + rows_for(kind, "NaN or Inf in a tensor", ValueError, name, non_finite)
            + list(extra))


def nan_at(t: torch.Tensor, value=NAN) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


def bad_labels(kind: str, name: str) -> list[Row]:
    labels = good(kind)[name]
    return bad_tensor(kind, name, wrong_rank=labels[:, None], wrong_dtype=[labels.bool(), labels.double()],
                      wrong_length=[labels[:-1]],
                      extra=rows_for(kind, "label out of range", ValueError, name,
                                     [nan_at(labels, -1), nan_at(labels, C), nan_at(labels.to(torch.uint8), 200)]))


def bad_features(kind: str) -> list[Row]:
    f = good(kind)["features"]
    huge = nan_at(f.double(), 1e200)
    return bad_tensor(kind, "features", wrong_rank=f[0], wrong_dtype=[f.long(), f.bool()],
                      wrong_length=[f[:, :-1], f[:-1]], non_finite=[nan_at(f), nan_at(f, INF)],
                      extra=[Row(kind, "features too large for the arithmetic", ValueError, {"features": huge},
                                 "features")])


def bad_logits(kind: str) -> list[Row]:
    x = good(kind)["logits"]
    return bad_tensor(kind, "logits", wrong_rank=x[0], wrong_dtype=[x.long()], wrong_length=[x[:, :-1], x[:-1]],
                      non_finite=[nan_at(x), nan_at(x, -INF)])


def bad_weights(kind: str) -> list[Row]:
    w = good(kind)["weights"]
    return bad_tensor(kind, "weights", wrong_rank=w[:, None], wrong_dtype=[w.long()], wrong_length=[w[:-1]],
                      non_finite=[nan_at(w), nan_at(w, INF)])


def bad_choice(kind: str, name: str, values) -> list[Row]:
    return rows_for(kind, "unknown choice", ValueError, name, values)


def bad_flag(kind: str, name: str) -> list[Row]:
    return rows_for(kind, "flag not a bool", TypeError, name, [1, "yes", None] if name != "validate" else [1, "yes"])


def construction_rows() -> list[Row]:
    kind = "RDRLoss"
    return (bad_counts(kind)
            + bad_choice(kind, "base", ["bce", None, 3]) + bad_choice(kind, "reweight", ["ldam", None])
            + rows_for(kind, "count argument not an int", TypeError, "feat_dim", [16.0, "16", True, None])
            + rows_for(kind, "count argument out of range", ValueError, "feat_dim", [0, -3])
            + rows_for(kind, "count argument not an int", TypeError, "warmup_steps", [1.5, True, None])
            + rows_for(kind, "count argument out of range", ValueError, "warmup_steps", [-1])
            + bad_hyperparameters(kind, ["temperature", "ridge", "momentum", "beta", "focal_gamma", "tau"])
            + bad_flag(kind, "validate") + bad_flag(kind, "sync_prototypes"))


def forward_rows() -> list[Row]:
    kind = "forward"
    f32_too_large = nan_at(good(kind)["features"].double(), 1e39)  # beyond the float32 prototypes
    return (bad_features(kind) + bad_logits(kind) + bad_labels(kind, "targets")
            + [Row(kind, "features too large for the arithmetic", ValueError, {"features": f32_too_large},
                   "features"),
               Row(kind, "empty batch", ValueError, {"features": torch.zeros(0, K), "logits": torch.zeros(0, C),
                                                     "targets": torch.zeros(0, dtype=torch.long)}, "targets")])


def weights_op_rows() -> list[Row]:
    kind = "rdr_weights_and_update"
    g = good(kind)
    protos, seen = g["prototypes"], g["seen"]
    return (bad_features(kind) + bad_labels(kind, "labels") + bad_counts(kind)
            + [Row(kind, "wrong length or width", ValueError, {"class_counts": COUNTS[:-1]},
                   "class_counts")]
            + bad_tensor(kind, "prototypes", wrong_rank=protos[0], wrong_dtype=[protos.long()],
                         wrong_length=[protos[:, :-1]], non_finite=[nan_at(protos)])
            + bad_tensor(kind, "seen", wrong_rank=seen[:, None], wrong_dtype=[seen.long()], wrong_length=[seen[:-1]])
            + bad_hyperparameters(kind, ["temperature", "ridge", "momentum", "beta"])
            + bad_choice(kind, "reweight", ["ldam", None])
            + bad_flag(kind, "warmup") + bad_flag(kind, "update") + bad_flag(kind, "validate"))


def loss_rows() -> list[Row]:
    kind = "weighted_loss"
    la = {"base": "la", "class_counts": COUNTS}
    return (bad_logits(kind) + bad_labels(kind, "labels") + bad_weights(kind)
            + bad_choice(kind, "base", ["bce", None])
            + [Row(kind, COUNTS_GROUP, ValueError, {"base": "la"}, "class_counts"),
               Row(kind, "wrong length or width", ValueError, {**la, "class_counts": COUNTS[:-1]},
                   "class_counts")]
            + [Row(kind, r.group, r.error, {**la, **r.change}, r.names) for r in bad_counts(kind)
               if r.change["class_counts"] is not None]  # None is "not given": the row above
            + [Row(kind, r.group, r.error, {**la, **r.change}, r.names) for r in bad_hyperparameters(kind, ["tau"])]
            + [Row(kind, r.group, r.error, {"base": "focal", **r.change}, r.names)
               for r in bad_hyperparameters(kind, ["focal_gamma"])]
            + bad_flag(kind, "validate"))


def loss_from_weights_rows() -> list[Row]:
    kind = "loss_from_weights"
    adjust = good(kind)["logit_adjust"]
    return (bad_logits(kind) + bad_labels(kind, "labels") + bad_weights(kind)
            + bad_tensor(kind, "logit_adjust", wrong_rank=adjust[:, None], wrong_dtype=[adjust.long()],
                         wrong_length=[adjust[:-1]], non_finite=[nan_at(adjust, INF)])
            + bad_hyperparameters(kind, ["focal_gamma"]) + bad_flag(kind, "validate"))


ROWS = construction_rows() + forward_rows() + weights_op_rows() + loss_rows() + loss_from_weights_rows()


def row_id(row: Row) -> str:
    name, value = list(row.change.items())[-1]
    if isinstance(value, torch.Tensor):
        shown = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}-{value.device.type}"
    else:
        shown = type(value).__name__ if isinstance(value, np.ndarray) else repr(value)[:24]
    return f"{row.kind}-{name}={shown}"


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_bad_input_is_refused_identically_on_every_backend(row):
    refusals = set()
    for backend in BACKENDS:
        args = {**good(row.kind), **row.change}
        state = {key: args[key].clone() for key in ("prototypes", "seen") if key in args and key not in row.change}
        with on_backend(backend), pytest.raises(row.error) as caught:
            call(row.kind, args)
        message = str(caught.value)
        assert row.names in message, f"{backend}: {message!r} does not name {row.names}"
        refusals.add((type(caught.value), message))
        for key, before in state.items():
            assert torch.equal(args[key], before), f"{backend}: {key} changed by a refused call"
    assert len(refusals) == 1, f"the backends differ: {refusals}"


def test_docs_quote_the_table():
    """docs/reliability.md ("Python API") gives the table's size by kind of bad input."""
    docs = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert f"{len(ROWS)} bad inputs" in docs
    for group, count in Counter(row.group for row in ROWS).items():
        assert f"| {group} | {count} |" in docs, (group, count)
    for kind, count in Counter(row.kind for row in ROWS).items():
        assert f"| {CALL_NAMES[kind]} | {count} |" in docs, (kind, count)


# ---- what the validation layer accepts --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_integer_label_dtype_gives_the_int64_result_on_every_backend(dtype):
    for backend in BACKENDS:
        with on_backend(backend):
            for kind in ("forward", "rdr_weights_and_update", "weighted_loss", "loss_from_weights"):
                name = "targets" if kind == "forward" else "labels"
                expected, expected_state = call(kind, good(kind))
                args = good(kind)
                args[name] = args[name].to(dtype)
                got, state = call(kind, args)
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{backend} {kind}")
                for a, b in zip(state, expected_state):
                    assert torch.equal(a, b), f"{backend} {kind}"


def test_class_counts_of_any_sequence_kind_are_the_same():
    expected = _checks.as_class_counts(COUNTS)
    assert expected.dtype == torch.int64 and expected.tolist() == COUNTS
    for counts in (tuple(COUNTS), np.array(COUNTS), np.array(COUNTS, dtype=np.int32), torch.tensor(COUNTS),
                   torch.tensor(COUNTS, dtype=torch.float64), [float(c) for c in COUNTS],
                   [np.int64(c) for c in COUNTS]):
        assert torch.equal(_checks.as_class_counts(counts), expected), type(counts)


# ---- inputs that share memory with the state updated in place ---------------------------
def aliased_functional_call(use_views: bool):
    """rdr_weights_and_update with features a view of the prototypes and labels an int64
    view of the seen flags (or copies of them): 16 classes, so seen views as 2 int64."""
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(16, 3, generator=g, dtype=torch.float64)
    seen = torch.zeros(16, dtype=torch.bool)
    seen[0] = True
    features, labels = protos[4:6], seen.view(torch.int64)  # labels [1, 0]
    if not use_views:
        features, labels = features.clone(), labels.clone()
    weights = Fn.rdr_weights_and_update(features, labels, protos, seen, [50] * 8 + [3] * 8, temperature=2.0)
    return weights, protos, seen


def aliased_module_call(use_views: bool):
    """RDRLoss in training with features and logits views of its prototypes (K = C)."""
    g = torch.Generator().manual_seed(6)
    crit = rdr_fast.RDRLoss([30, 20, 10, 5, 3, 1], 6, base="focal", temperature=0.5).double()
    crit.prototypes.copy_(torch.randn(6, 6, generator=g, dtype=torch.float64))
    crit.seen[:4] = True
    features, logits = crit.prototypes[1:5], crit.prototypes[2:6]
    if not use_views:
        features, logits = features.clone(), logits.clone()
    loss = crit(features, logits, torch.tensor([0, 1, 2, 3]))
    return loss, crit.last_weights, crit.prototypes, crit.seen


@pytest.mark.parametrize("run", [aliased_functional_call, aliased_module_call], ids=["functional", "RDRLoss"])
def test_inputs_aliasing_the_state_give_the_unaliased_answer_on_every_backend(run):
    for backend in BACKENDS:
        with on_backend(backend):
            got, expected = run(use_views=True), run(use_views=False)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=backend)


# ---- extreme but valid values -----------------------------------------------------------
TEMPERATURES = [0.0, 1e-3, 0.5, 1.0, 7.0, 50.0, 700.0, 1e4]


def exact_weights(values: list[float], temperature: float) -> torch.Tensor:
    """B · v_j^γ / Σ v^γ in 60-digit decimal arithmetic (no overflow at any γ)."""
    getcontext().prec = 60
    powers = [Decimal(v) ** Decimal(temperature) for v in values]
    total = sum(powers)
    return torch.tensor([float(len(values) * p / total) for p in powers], dtype=torch.float64)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_temperatures_give_the_exact_weights_on_every_backend(temperature):
    """The power is taken in log space and normalised there on every backend: at γ = 50
    (r·N/n)^γ overflows float64, yet the weights are finite and equal the exact ones."""
    args = good("rdr_weights_and_update")
    ratios = reference.density_ratios_ref(args["features"], args["labels"], args["prototypes"], args["seen"])
    factors = Fn.class_factors(COUNTS)
    expected = exact_weights([float(r) * float(factors[y]) for r, y in zip(ratios, args["labels"])], temperature)
    for backend in BACKENDS:
        with on_backend(backend):
            weights = Fn.rdr_weights_and_update(**good("rdr_weights_and_update"), temperature=temperature)
        assert bool(torch.isfinite(weights).all()), backend
        torch.testing.assert_close(weights, expected, rtol=1e-9 * max(1.0, temperature), atol=1e-300, msg=backend)


def test_float32_features_near_overflow_give_the_weights_of_the_same_features_scaled_down():
    """Float32 features of magnitude 1e30 have Gram entries (1e60) beyond float32; the
    systems are formed in float64 on every backend, so the (scale-free) ratios, and the
    weights, are those of the features at scale 1."""
    args = good("rdr_weights_and_update")
    features, protos = args["features"].float(), args["prototypes"].float()
    for backend in BACKENDS:
        with on_backend(backend):
            small = Fn.rdr_weights_and_update(features, args["labels"], protos.clone(), args["seen"].clone(), COUNTS)
            large = Fn.rdr_weights_and_update(features * 1e30, args["labels"], protos * 1e30, args["seen"].clone(),
                                              COUNTS)
        torch.testing.assert_close(large, small, rtol=1e-5, atol=1e-6, msg=backend)


def test_refused_rows_leave_the_module_state_alone():
    crit = rdr_fast.RDRLoss(COUNTS, K)
    crit(**good("forward"))
    before = copy.deepcopy(crit.state_dict())
    bad = {**good("forward"), "features": nan_at(good("forward")["features"])}
    with pytest.raises(ValueError, match="features"):
        crit(**bad)
    for key, value in crit.state_dict().items():
        assert torch.equal(value, before[key]), key
