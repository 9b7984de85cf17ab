"""Long-tailed benchmarks for rdr_fast (SPEC §5).

    ds = load_dataset("cifar10_lt", data_root="data", imb_factor=100)
    train_loader, test_loader = make_loaders(ds, 128, seed=0, loader="auto", device="cuda")

Every dataset yields (x float32 [C, H, W], y int); classes are indexed head to tail
(class 0 = most training samples). Conventions:
- CIFAR-LT: LDAM-DRW recipe bit for bit (profile, legacy-NumPy seeded subset, balanced
  original test set, LDAM's CIFAR-10 normalisation for both CIFAR sets).
- fmnist_lt / digits_lt: the same exponential profile (from len(train)/10 = 6000 for
  Fashion-MNIST, from the smallest per-class pool, 124, for digits).
- imagenet_lt / places_lt: OLTR list files; labels re-indexed by descending train
  count (stable); imb_factor is ignored there.
- Label noise: RoLT symmetric noise on the LT training set, exactly int(r*N) flips to
  another class; class_counts follow the noisy labels but class indices keep the clean
  count order. Clean labels stay in ds.train.clean_targets.
Missing or corrupt files raise DataNotFoundError with one message saying what was
looked for, where, and how to fix it.
"""
from __future__ import annotations

import torch

from ._common import (DataNotFoundError, LTDataset, TensorImageDataset, add_symmetric_noise,
                      class_splits, long_tail_counts)
from ._loaders import LOADERS, resolve_loader

__all__ = ["DATASETS", "DataNotFoundError", "LTDataset", "SeededShuffleSampler",
           "TensorImageDataset", "add_symmetric_noise", "class_splits", "load_dataset",
           "long_tail_counts", "make_loaders", "LOADERS", "resolve_loader", "set_epoch"]

DATASETS = ("digits_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt")


def load_dataset(name, *, data_root=None, imb_factor=100, noise_ratio=0.0, seed=0,
                 download=False, train_transform=True, image_root=None,
                 image_size=224) -> LTDataset:
    """Build the LT benchmark `name` (one of DATASETS).

    data_root: folder with the files (cifar: defaults to ./data; fmnist: defaults to the
      Debian package's /usr/share/datasets/fashion-mnist; imagenet/places: required).
    imb_factor: n_max / n_min (>= 1), ignored by imagenet_lt / places_lt.
    noise_ratio, seed: symmetric label noise after the LT subset; seed also picks the
      LT subset (digits' train/test split is fixed and does not depend on it).
    download: fetch CIFAR / Fashion-MNIST with torchvision into data_root.
    train_transform: train-time augmentation (False: train items look like test items).
    image_root, image_size: imagenet_lt / places_lt only (images under image_root,
      default data_root; crops of image_size, default 224).
    """
    kw = dict(noise_ratio=noise_ratio, seed=seed)
    if name == "digits_lt":
        from ._small import load_digits_lt
        return load_digits_lt(imb_factor=imb_factor, **kw)
    if name == "fmnist_lt":
        from ._small import load_fmnist_lt
        return load_fmnist_lt(data_root, imb_factor=imb_factor, download=download,
                              train_transform=train_transform, **kw)
    if name in ("cifar10_lt", "cifar100_lt"):
        from ._cifar import load_cifar_lt
        return load_cifar_lt(name, data_root, imb_factor=imb_factor, download=download,
                             train_transform=train_transform, **kw)
    if name in ("imagenet_lt", "places_lt"):
        if download:
            raise DataNotFoundError(f"{name} cannot be downloaded automatically; get the "
                                    "images and OLTR list files, then pass --data-root DIR")
        from ._oltr import load_oltr_lt
        return load_oltr_lt(name, data_root, train_transform=train_transform,
                            image_root=image_root, image_size=image_size, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class SeededShuffleSampler(torch.utils.data.Sampler):
    """Shuffles 0..n-1 with a torch.Generator seeded by (seed, epoch).

    Each pass uses epoch `self.epoch` and then increments it, so successive epochs differ
    while epoch e's order depends only on (seed, e), not on how many loaders or
    iterators were created before. To resume at epoch e call set_epoch(e) first.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        # Large odd multiplier: distinct (seed, epoch) pairs map to distinct generator seeds.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loaders(ds: LTDataset, batch_size: int, *, seed: int = 0, num_workers: int = 0,
                 loader: str = "auto", device=None, shard_id: int = 0, num_shards: int = 1):
    """(train_loader, test_loader) for `ds`: iterables of (x float32 [B, C, H, W] on
    `device`, y int64 [B]) with len() and set_epoch(e); epoch e's order is a pure
    function of (seed, e) and each pass advances the epoch by one.

    loader: "torch" (DataLoader, num_workers processes), "gpu" (whole uint8 set on
      `device`, batched torch augmentation; in-memory datasets; CPU works too), "dali"
      (NVIDIA DALI, optional extra: pip install "rdr_fast[dali]"; CPU pipelines with
      num_workers threads, default up to 4, GPU/mixed decoding on a CUDA device), or
      "auto": gpu for in-memory datasets on a CUDA device, dali for JPEG list datasets
      when DALI is installed, torch otherwise (see resolve_loader).
    device: where batches land (None: CPU; the torch loader pins and copies).
    shard_id / num_shards: this process's share for multi-process training; batch_size
      is then the global batch (see rdr_fast.data._loaders for the convention).
    All loaders share the augmentation of the torch path (zero-padded random crop,
    flip p=0.5 for the in-memory sets, random-resized crop + flip + colour jitter for
    the JPEG sets; the dataset's mean/std; deterministic test transforms) and the epoch
    order; train batches are not dropped (the last one is partial). The torch loader
    draws its augmentation from torch's global RNG (call torch.manual_seed) or, with
    workers, from a Generator seeded by `seed`; gpu and dali draw it from (seed, epoch).
    """
    from ._loaders import build_loaders
    return build_loaders(ds, batch_size, seed=seed, num_workers=num_workers, loader=loader,
                         device=device, shard_id=shard_id, num_shards=num_shards)


def set_epoch(loader, epoch: int) -> None:
    """Set the next pass's epoch on any loader (its own set_epoch, else its batch
    sampler's or sampler's): what train.py calls before each epoch."""
    from ._loaders import set_epoch as _set_epoch
    _set_epoch(loader, epoch)
