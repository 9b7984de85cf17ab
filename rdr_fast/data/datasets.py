"""load_dataset: one entry point for every long-tailed benchmark in rdr_fast.data."""
from __future__ import annotations

import dataclasses

from .cifar import load_cifar_lt
from .common import DataNotFoundError, LTDataset
from .image_format import AUGMENTS
from .oltr import LISTS, load_oltr_lt
from .own import load_folder, load_list
from .small import load_digits_lt, load_fmnist_lt

DATASETS = ("digits_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt", "inat2018",
            "folder", "list")
# Facts callers may check before loading anything (the CLI validates flags with them).
GRAYSCALE = ("digits_lt", "fmnist_lt")        # 1-channel images
BASIC_AUGMENT_ONLY = ("digits_lt",)           # 8x8 images of values 0..16: no AutoAugment
# Image files named by list files or folders: a data root is required, nothing downloads,
# crops of image_size, a validation split where the source has one.
FILE_LISTS = ("imagenet_lt", "places_lt", "inat2018", "folder", "list")
# The side of the square images each in-memory dataset gives a model (the image-file
# datasets: their --image-size).
IMAGE_SIZES = {"digits_lt": 8, "fmnist_lt": 28, "cifar10_lt": 32, "cifar100_lt": 32}


def load_dataset(name, *, data_root=None, imb_factor=100, imb_type="exp", noise_ratio=0.0, seed=0,
                 download=False, train_transform=True, augment="basic", image_root=None,
                 image_size=224, train_list=None, test_list=None, val_list=None,
                 skip_bad_images=False) -> LTDataset:
    """Build the LT benchmark `name` (one of DATASETS).

    data_root: folder with the files (cifar: defaults to ./data; fmnist: defaults to the
      Debian package's /usr/share/datasets/fashion-mnist; image-file datasets: required;
      folder: the tree with train/, test/ and optional val/; list: the folder the list
      files' paths are relative to).
    imb_factor: n_max / n_min (>= 1), ignored by the image-file datasets (already LT).
    imb_type: the long-tail profile, "exp" or LDAM's "step" (rdr_fast.data.long_tail_counts);
      the image-file datasets take their profile from their files and refuse "step".
    noise_ratio, seed: symmetric label noise after the LT subset; seed also picks the
      LT subset (digits' train/test split is fixed and does not depend on it).
    download: fetch CIFAR / Fashion-MNIST with torchvision into data_root.
    train_transform: train-time augmentation (False: train items look like test items).
    augment: the train split's augmentation (AUGMENTS): "basic" (the dataset's own: crop
      + flip for in-memory sets, resized crop + flip + jitter for the image-file sets),
      "autoaug" (basic, then AutoAugment: torchvision's CIFAR-10 policy for in-memory
      sets, its ImageNet policy for the image-file sets), "autoaug_cutout" (then one Cutout
      hole of half the image side: 16 px on CIFAR). digits_lt (no basic augmentation,
      values 0..16) takes "basic" only. See docs/datasets.md, "Augmentations".
    image_root: imagenet_lt / places_lt / inat2018: the images' folder (default data_root).
    image_size: image-file datasets: crops of image_size (default 224).
    train_list, test_list, val_list: list only: the list files (val optional).
    skip_bad_images: image-file datasets: leave out the files Pillow cannot read (counted
      in ds.skipped_images) instead of refusing them.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment != "basic" and not train_transform:
        raise ValueError(f"augment={augment!r} needs train_transform=True (it adds to the "
                         "train augmentation)")
    ds = _build(name, data_root=data_root, imb_factor=imb_factor, imb_type=imb_type, noise_ratio=noise_ratio,
                seed=seed, download=download, train_transform=train_transform, image_root=image_root,
                image_size=image_size, train_list=train_list, test_list=test_list, val_list=val_list,
                skip_bad_images=skip_bad_images)
    if augment == "basic":
        return ds
    try:
        return dataclasses.replace(ds, train=ds.train.with_augment(augment))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _build(name, *, data_root, imb_factor, imb_type, noise_ratio, seed, download, train_transform,
           image_root, image_size, train_list, test_list, val_list, skip_bad_images) -> LTDataset:
    kw = dict(noise_ratio=noise_ratio, seed=seed)
    profile = dict(imb_factor=imb_factor, imb_type=imb_type)
    if name == "digits_lt":
        return load_digits_lt(**profile, **kw)
    if name == "fmnist_lt":
        return load_fmnist_lt(data_root, download=download, train_transform=train_transform, **profile, **kw)
    if name in ("cifar10_lt", "cifar100_lt"):
        return load_cifar_lt(name, data_root, download=download, train_transform=train_transform, **profile, **kw)
    if name not in FILE_LISTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if imb_type != "exp":
        raise ValueError(f"imb_type {imb_type!r}: {name}'s long tail is the one its files give; "
                         "only the default 'exp' applies to it")
    if download:
        raise DataNotFoundError(f"{name} cannot be downloaded automatically; get the "
                                "images (and list files), then pass --data-root DIR")
    kw.update(train_transform=train_transform, image_size=image_size, skip_bad_images=skip_bad_images)
    if name in LISTS:
        return load_oltr_lt(name, data_root, image_root=image_root, **kw)
    if name == "folder":
        return load_folder(data_root, **kw)
    return load_list(data_root, train_list, test_list, val_list, **kw)
