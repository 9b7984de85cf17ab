"""Long-tailed benchmarks for rdr_fast (each one described in docs/datasets.md).

    ds = load_dataset("cifar10_lt", data_root="data", imb_factor=100)
    train_loader, test_loader = make_loaders(ds, 128, seed=0, loader="auto", device="cuda")

Every dataset yields (x float32 [C, H, W], y int); classes are indexed head to tail
(class 0 = most training samples). Conventions:
- CIFAR-LT: LDAM-DRW recipe bit for bit (profile, legacy-NumPy seeded subset, balanced
  original test set, LDAM's CIFAR-10 normalisation for both CIFAR sets).
- Profiles: LDAM's exponential one by default, or its step one (imb_type "step": half
  the classes at n_max, half at n_max / IF) for CIFAR-LT, fmnist_lt and digits_lt.
- fmnist_lt / digits_lt: the same profiles (from len(train)/10 = 6000 for
  Fashion-MNIST, from the smallest per-class pool, 124, for digits).
- imagenet_lt / places_lt / inat2018: the published list files; folder / list: your own
  ImageFolder tree or list files (rdr_fast.data.own). All of them go through
  rdr_fast.data.files: labels re-indexed by descending train count (stable), every image
  checked up front, a validation split (ds.val) where the source has one; imb_factor is
  ignored there.
- Label noise: RoLT symmetric noise on the LT training set, exactly int(r*N) flips to
  another class; class_counts follow the noisy labels but class indices keep the clean
  count order. Clean labels stay in ds.train.clean_targets.
Missing or corrupt files raise DataNotFoundError with one message saying what was
looked for, where, and how to fix it.
"""
from __future__ import annotations

from .common import (IMB_TYPES, DataNotFoundError, LTDataset, TensorImageDataset, add_symmetric_noise,
                     class_counts, class_splits, long_tail_counts)
from .datasets import BASIC_AUGMENT_ONLY, DATASETS, load_dataset
from .factory import LOADERS, make_loaders, resolve_loader, set_epoch
from .sampling import SeededShuffleSampler
from .image_format import ImageFormat

__all__ = ["BASIC_AUGMENT_ONLY", "DATASETS", "IMB_TYPES", "DataNotFoundError", "ImageFormat", "LTDataset", "SeededShuffleSampler",
           "TensorImageDataset", "add_symmetric_noise", "class_counts", "class_splits", "load_dataset",
           "long_tail_counts", "make_loaders", "LOADERS", "resolve_loader", "set_epoch"]
