"""load_dataset: one entry point for every long-tailed benchmark in rdr_fast.data."""
from __future__ import annotations

import dataclasses

from .cifar import load_cifar_lt
from .common import DataNotFoundError, LTDataset
from .image_format import AUGMENTS
from .oltr import load_oltr_lt
from .small import load_digits_lt, load_fmnist_lt

DATASETS = ("digits_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt")
# Facts callers may check before loading anything (the CLI validates flags with them).
GRAYSCALE = ("digits_lt", "fmnist_lt")        # 1-channel images
BASIC_AUGMENT_ONLY = ("digits_lt",)           # 8x8 images of values 0..16: no AutoAugment
FILE_LISTS = ("imagenet_lt", "places_lt")     # JPEG files named by OLTR list files; no download


def load_dataset(name, *, data_root=None, imb_factor=100, imb_type="exp", noise_ratio=0.0, seed=0,
                 download=False, train_transform=True, augment="basic", image_root=None,
                 image_size=224) -> LTDataset:
    """Build the LT benchmark `name` (one of DATASETS).

    data_root: folder with the files (cifar: defaults to ./data; fmnist: defaults to the
      Debian package's /usr/share/datasets/fashion-mnist; imagenet/places: required).
    imb_factor: n_max / n_min (>= 1), ignored by imagenet_lt / places_lt.
    imb_type: the long-tail profile, "exp" or LDAM's "step" (rdr_fast.data.long_tail_counts);
      imagenet_lt / places_lt take their profile from their list files and refuse "step".
    noise_ratio, seed: symmetric label noise after the LT subset; seed also picks the
      LT subset (digits' train/test split is fixed and does not depend on it).
    download: fetch CIFAR / Fashion-MNIST with torchvision into data_root.
    train_transform: train-time augmentation (False: train items look like test items).
    augment: the train split's augmentation (AUGMENTS): "basic" (the dataset's own: crop
      + flip for in-memory sets, resized crop + flip + jitter for the JPEG sets),
      "autoaug" (basic, then AutoAugment: torchvision's CIFAR-10 policy for in-memory
      sets, its ImageNet policy for the JPEG sets), "autoaug_cutout" (then one Cutout
      hole of half the image side: 16 px on CIFAR). digits_lt (no basic augmentation,
      values 0..16) takes "basic" only. See docs/datasets.md, "Augmentations".
    image_root, image_size: imagenet_lt / places_lt only (images under image_root,
      default data_root; crops of image_size, default 224).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment != "basic" and not train_transform:
        raise ValueError(f"augment={augment!r} needs train_transform=True (it adds to the "
                         "train augmentation)")
    ds = _build(name, data_root=data_root, imb_factor=imb_factor, imb_type=imb_type, noise_ratio=noise_ratio,
                seed=seed, download=download, train_transform=train_transform,
                image_root=image_root, image_size=image_size)
    if augment == "basic":
        return ds
    try:
        return dataclasses.replace(ds, train=ds.train.with_augment(augment))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _build(name, *, data_root, imb_factor, imb_type, noise_ratio, seed, download, train_transform,
           image_root, image_size) -> LTDataset:
    kw = dict(noise_ratio=noise_ratio, seed=seed)
    profile = dict(imb_factor=imb_factor, imb_type=imb_type)
    if name == "digits_lt":
        return load_digits_lt(**profile, **kw)
    if name == "fmnist_lt":
        return load_fmnist_lt(data_root, download=download, train_transform=train_transform, **profile, **kw)
    if name in ("cifar10_lt", "cifar100_lt"):
        return load_cifar_lt(name, data_root, download=download, train_transform=train_transform, **profile, **kw)
    if name in FILE_LISTS:
        if imb_type != "exp":
            raise ValueError(f"imb_type {imb_type!r}: {name}'s long tail is the one its list files give; "
                             "only the default 'exp' applies to it")
        if download:
            raise DataNotFoundError(f"{name} cannot be downloaded automatically; get the "
                                    "images and OLTR list files, then pass --data-root DIR")
        return load_oltr_lt(name, data_root, train_transform=train_transform,
                            image_root=image_root, image_size=image_size, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
