"""CIFAR-10-LT / CIFAR-100-LT from the official python-pickle files (LDAM-DRW recipe)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from .common import DataNotFoundError, fix_hint, tensor_lt_dataset

# LDAM-DRW's constants, used for both CIFAR-10 and CIFAR-100 (comparability with LDAM).
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR_LAYOUT = {   # name -> (folder, train files, test files, label key, classes)
    "cifar10_lt": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                   ["test_batch"], "labels", 10),
    "cifar100_lt": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _read_batch(path: str, label_key: str):
    """One pickle file -> (uint8 [n, 3, 32, 32], int64 [n]); corrupt -> DataNotFoundError.
    Pickles are read with encoding='bytes' (Python-2 pickles), so keys are bytes."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = entry.get(b"data", entry.get("data"))
        labels = entry.get(label_key.encode(), entry.get(label_key))
        data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as e:   # UnpicklingError, EOFError, missing key, bad shape, ...
        raise DataNotFoundError(f"corrupt CIFAR file {path} ({type(e).__name__}: {e}); "
                                "re-extract the official archive, or re-run with --download "
                                "(it re-fetches files whose checksum is wrong)") from None
    if data.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"corrupt CIFAR file {path}: {data.shape[0]} images but "
                                f"{labels.shape[0]} labels under key {label_key!r}")
    return data, labels


def _read_split(folder: str, files: list, label_key: str):
    parts = [_read_batch(os.path.join(folder, f), label_key) for f in files]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
            np.concatenate([p[1] for p in parts]))


def _download(name: str, root: str) -> None:
    """torchvision's CIFAR download + md5 check + extraction into root."""
    try:
        from torchvision.datasets import CIFAR10, CIFAR100
        (CIFAR10 if name == "cifar10_lt" else CIFAR100)(root, train=True, download=True)
    except Exception as e:   # no network, disk full, bad checksum: one clear message
        raise DataNotFoundError(f"{name} download into {root} failed: {e}. "
                                + fix_hint(name)) from None


def load_cifar_lt(name, data_root, *, imb_factor, noise_ratio, seed, download, train_transform, imb_type="exp"):
    """CIFAR-LT exactly as LDAM-DRW builds it: n_i = int(img_max * (1/IF)^(i/(C-1))) with
    img_max = len(train) / C (or LDAM's step profile, imb_type "step"), a seeded per-class random subset (ldam_subset), the
    untouched balanced test set; train augmentation RandomCrop(32, pad 4) + flip.
    data_root defaults to ./data (LDAM's default root)."""
    folder_name, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
    root = os.path.abspath(data_root or "data")   # absolute: error messages say where
    if download:
        _download(name, root)
    folder = os.path.join(root, folder_name)
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataNotFoundError(f"{name}: missing {', '.join(missing)} in {folder} (looked for "
                                f"{', '.join(train_files + test_files)}). " + fix_hint(name))
    train = _read_split(folder, train_files, label_key)
    test = _read_split(folder, test_files, label_key)
    for split, (_, y) in (("train", train), ("test", test)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataNotFoundError(f"{name}: {split} labels in {folder} fall outside "
                                    f"0..{num_classes - 1}; wrong folder or corrupt files")
    return tensor_lt_dataset(name, train, test, n_max=len(train[1]) / num_classes,
                             num_classes=num_classes, imb_factor=imb_factor, imb_type=imb_type,
                             noise_ratio=noise_ratio, seed=seed, norm=CIFAR_NORM,
                             pad=4 if train_transform else 0, flip=train_transform)
