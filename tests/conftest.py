"""Shared fixtures: deterministic seeds, long-tailed random batches, a finished run, and
CIFAR files in the official layout; bench/ modules loaded by path."""
from __future__ import annotations

import importlib.util
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rdr_fast.ops as ops  # noqa: F401  (registers the custom ops)


# A "device" parameter: "cpu" always runs; "cuda" (marked gpu) only where a GPU is.
CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench_module(name):
    """The module bench/<name>.py (bench/ is not a package, and its conftest is not ours)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def long_tail_counts(num_classes: int, n_max: int = 500, imb_factor: float = 100.0) -> list[int]:
    """The exponential LT profile n_c = n_max · imb^(−c/(C−1)), at least 1."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imb_factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail_labels(batch: int, counts, generator=None) -> torch.Tensor:
    """Labels drawn with probability ∝ count, as a long-tailed training batch sees them."""
    probs = torch.tensor(counts, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator)


def random_state(num_classes: int, dim: int, dtype=torch.float64, seen_fraction: float = 0.8):
    """Random prototypes [C, K] and a seen mask with some classes not yet seen."""
    protos = torch.randn(num_classes, dim, dtype=dtype)
    seen = torch.rand(num_classes) < seen_fraction
    return protos, seen


@pytest.fixture
def make_batch():
    """make_batch(B, C, K, dtype) -> (features, labels, prototypes, seen, counts)."""
    def _make(batch, num_classes, dim, dtype=torch.float64, relu=False, seen_fraction=0.8):
        counts = long_tail_counts(num_classes)
        labels = long_tail_labels(batch, counts)
        features = torch.randn(batch, dim, dtype=torch.float64)
        if relu:
            features = features.relu()
        protos, seen = random_state(num_classes, dim, torch.float64, seen_fraction)
        return features.to(dtype), labels, protos, seen, counts
    return _make


class HostReads(TorchDispatchMode):
    """Records every aten op that makes the host wait for a device value: a scalar read,
    an output whose size depends on the data, or a boolean mask index."""

    SYNCING = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero.",
               "aten.masked_select", "aten.unique", "aten._unique", "aten.repeat_interleave.Tensor")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(self.SYNCING) or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-epoch digits_lt run (python -m rdr_fast.train's defaults otherwise),
    shared by the tests of the commands that read a run folder."""
    from rdr_fast import train

    folder = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--epochs", "2", "--out", str(folder), "--quiet"])
    return folder


def _cifar_pickle(path, data, labels, label_key):
    """Official layout: dict with bytes keys (as Python-2 pickles read with
    encoding='bytes'), data uint8 [n, 3072], labels a list of ints."""
    entry = {b"data": data, label_key.encode(): [int(v) for v in labels],
             b"batch_label": b"fixture"}
    if label_key == "fine_labels":   # decoy: the loader must read fine, not coarse
        entry[b"coarse_labels"] = [int(v) // 5 for v in labels]
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _balanced(num_classes, per_class, rng):
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    data = rng.randint(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return data, labels


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """CIFAR-10 (20 train / 10 test per class, 5 train batches) and CIFAR-100
    (20 / 5 per class) in the official python-pickle layout."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.RandomState(123)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    data, labels = _balanced(10, 20, rng)
    for b in range(5):
        sl = slice(40 * b, 40 * (b + 1))
        _cifar_pickle(c10 / f"data_batch_{b + 1}", data[sl], labels[sl], "labels")
    _cifar_pickle(c10 / "test_batch", *_balanced(10, 10, rng), "labels")
    c100 = root / "cifar-100-python"
    c100.mkdir()
    _cifar_pickle(c100 / "train", *_balanced(100, 20, rng), "fine_labels")
    _cifar_pickle(c100 / "test", *_balanced(100, 5, rng), "fine_labels")
    return root, data, labels
