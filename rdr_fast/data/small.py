"""digits_lt (scikit-learn's bundled digits) and fmnist_lt (Fashion-MNIST IDX files)."""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

from .common import DataNotFoundError, fix_hint, tensor_lt_dataset

# Where `apt-get install dataset-fashion-mnist` puts the four .gz IDX files (Debian).
FMNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 0x0803),
    "train_labels": ("train-labels-idx1-ubyte", 0x0801),
    "test_images": ("t10k-images-idx3-ubyte", 0x0803),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x0801),
}
FMNIST_NORM = ((0.2860,), (0.3530,))
DIGITS_NORM = ((0.3053,), (0.3760,))   # mean/std of load_digits() / 16, all 1797 images
DIGITS_TEST_PER_CLASS = 50             # balanced held-out test set, fixed split


def _corrupt(path: str, why: str) -> DataNotFoundError:
    return DataNotFoundError(f"corrupt IDX file {path}: {why}. Replace it; "
                             + fix_hint("fmnist_lt"))


def read_idx(path: str, magic: int) -> np.ndarray:
    """Parse one IDX file (plain or gzip) of unsigned bytes.

    Header: 4-byte big-endian magic (0x0801 labels, 0x0803 images), then one 4-byte
    big-endian size per dimension, then the data. Returns uint8 [d0, d1, ...].
    Raises DataNotFoundError naming the file on a bad magic, size or gzip stream.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:   # BadGzipFile is an OSError
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise _corrupt(path, f"magic number {found and hex(found)}, expected {hex(magic)}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise _corrupt(path, f"header says {dims} ({header + int(np.prod(dims))} bytes), "
                             f"file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_dir(dirs: list) -> dict:
    """First folder holding all four IDX files (plain or .gz) -> {key: path}."""
    for d in dirs:
        found = {}
        for key, (stem, _) in FMNIST_FILES.items():
            for cand in (stem, stem + ".gz"):
                if os.path.isfile(os.path.join(d, cand)):
                    found[key] = os.path.join(d, cand)
                    break
        if len(found) == len(FMNIST_FILES):
            return found
    names = ", ".join(stem + "[.gz]" for stem, _ in FMNIST_FILES.values())
    raise DataNotFoundError(f"Fashion-MNIST not found: looked for {names} in "
                            f"{', '.join(dirs)}. " + fix_hint("fmnist_lt"))


def load_fmnist_lt(data_root, *, imb_factor, noise_ratio, seed, download, train_transform, imb_type="exp"):
    """Fashion-MNIST-LT: LDAM profile from 6000 per class (len(train) / 10), balanced
    original test set, train augmentation RandomCrop(28, pad 2) + flip."""
    if download:
        root = data_root or "data"
        try:
            from torchvision.datasets import FashionMNIST
            FashionMNIST(root, train=True, download=True)
            FashionMNIST(root, train=False, download=True)
        except Exception as e:   # network / disk errors: one clear message instead
            raise DataNotFoundError(f"Fashion-MNIST download into {root} failed: {e}. "
                                    + fix_hint("fmnist_lt")) from None
        data_root = root
    dirs = ([data_root, os.path.join(data_root, "FashionMNIST", "raw")] if data_root
            else [FMNIST_DEBIAN_DIR])
    paths = _find_idx_dir(dirs)
    arr = {k: read_idx(p, FMNIST_FILES[k][1]) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arr[f"{split}_images"]) != len(arr[f"{split}_labels"]):
            raise DataNotFoundError(f"Fashion-MNIST {split} images and labels differ in length: "
                                    f"{paths[split + '_images']}, {paths[split + '_labels']}. "
                                    "Replace them; " + fix_hint("fmnist_lt"))
    xtr = torch.from_numpy(arr["train_images"].copy()).unsqueeze(1)   # [N, 1, 28, 28]
    xte = torch.from_numpy(arr["test_images"].copy()).unsqueeze(1)
    ytr, yte = arr["train_labels"].astype(np.int64), arr["test_labels"].astype(np.int64)
    return tensor_lt_dataset("fmnist_lt", (xtr, ytr), (xte, yte), n_max=len(ytr) // 10,
                             num_classes=10, imb_factor=imb_factor, imb_type=imb_type,
                             noise_ratio=noise_ratio, seed=seed, norm=FMNIST_NORM, pad=2 if train_transform else 0,
                             flip=train_transform)


def load_digits_lt(*, imb_factor, noise_ratio, seed, imb_type="exp"):
    """digits-LT from sklearn's bundled 8x8 digits (values 0..16, 10 classes).

    Fixed split (RandomState(0), independent of `seed`): 50 images per class form a
    balanced test set, the rest is the train pool; the LDAM profile starts from the
    smallest per-class pool size (124) so every class can supply it. No augmentation.
    """
    from sklearn.datasets import load_digits   # lazy: sklearn import is slow
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)   # [1797, 1, 8, 8]
    targets = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test_idx, train_idx = [], []
    for c in range(10):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        test_idx.append(idx[:DIGITS_TEST_PER_CLASS])
        train_idx.append(np.sort(idx[DIGITS_TEST_PER_CLASS:]))
    tr, te = torch.from_numpy(np.concatenate(train_idx)), torch.from_numpy(np.concatenate(test_idx))
    n_max = int(np.bincount(targets[tr.numpy()]).min())
    return tensor_lt_dataset("digits_lt", (images[tr], targets[tr.numpy()]),
                             (images[te], targets[te.numpy()]), n_max=n_max, num_classes=10,
                             imb_factor=imb_factor, imb_type=imb_type, noise_ratio=noise_ratio, seed=seed,
                             norm=DIGITS_NORM, scale=16.0)
