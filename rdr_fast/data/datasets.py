"""load_dataset: one entry point for every long-tailed benchmark in rdr_fast.data."""
from __future__ import annotations

from .cifar import load_cifar_lt
from .common import DataNotFoundError, LTDataset
from .oltr import load_oltr_lt
from .small import load_digits_lt, load_fmnist_lt

DATASETS = ("digits_lt", "fmnist_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt")
# Facts callers may check before loading anything (the CLI validates flags with them).
GRAYSCALE = ("digits_lt", "fmnist_lt")        # 1-channel images
FILE_LISTS = ("imagenet_lt", "places_lt")     # JPEG files named by OLTR list files; no download
# The side of the square images each dataset gives a model (imagenet / places: the default crop).
IMAGE_SIZES = {"digits_lt": 8, "fmnist_lt": 28, "cifar10_lt": 32, "cifar100_lt": 32, "imagenet_lt": 224,
               "places_lt": 224}


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
        return load_digits_lt(imb_factor=imb_factor, **kw)
    if name == "fmnist_lt":
        return load_fmnist_lt(data_root, imb_factor=imb_factor, download=download,
                              train_transform=train_transform, **kw)
    if name in ("cifar10_lt", "cifar100_lt"):
        return load_cifar_lt(name, data_root, imb_factor=imb_factor, download=download,
                             train_transform=train_transform, **kw)
    if name in FILE_LISTS:
        if download:
            raise DataNotFoundError(f"{name} cannot be downloaded automatically; get the "
                                    "images and OLTR list files, then pass --data-root DIR")
        return load_oltr_lt(name, data_root, train_transform=train_transform,
                            image_root=image_root, image_size=image_size, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
