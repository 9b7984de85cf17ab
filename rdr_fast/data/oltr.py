"""ImageNet-LT / Places-LT from the OLTR list files (Liu et al. 2019), JPEGs read lazily."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import augment
from .common import DataNotFoundError, LTDataset, class_splits, fix_hint, noisy_counts
from .image_format import COLOR_JITTER, RESIZED_CROP_AREA, RESIZED_CROP_ASPECT, ImageFormat

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # also used for Places-LT
LIST_PREFIX = {"imagenet_lt": "ImageNet_LT", "places_lt": "Places_LT"}


class ListImageDataset(torch.utils.data.Dataset):
    """Images listed by path, opened with PIL on access.

    paths: absolute file paths; targets / clean_targets: int64 [N] re-indexed labels.
    fmt: an ImageFormat of kind "files"; its augment picks the torchvision transform
      (torchvision_transform). Item i: (transformed RGB image float32 [3, H, W], int
      label). An unreadable image raises DataNotFoundError naming the file (not a bare
      PIL/OS error from a worker).
    """

    def __init__(self, paths, targets, fmt: ImageFormat, clean_targets=None):
        if fmt.kind != "files":
            raise ValueError(f"fmt.kind must be 'files' for a list of image paths, "
                             f"got {fmt.kind!r}")
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        self.clean_targets = (self.targets.clone() if clean_targets is None else
                              torch.as_tensor(np.asarray(clean_targets), dtype=torch.int64))
        self.image_format = fmt
        self.transform = torchvision_transform(fmt)

    def without_augmentation(self) -> "ListImageDataset":
        """The same files and labels with the test transform (resize, centre crop)."""
        fmt = dataclasses.replace(self.image_format, augment="none", autoaugment="none", cutout=0)
        return ListImageDataset(self.paths, self.targets, fmt, self.clean_targets)

    def with_augment(self, augment: str) -> "ListImageDataset":
        """The same files and labels with load_dataset's `augment` (ImageFormat.with_augment)."""
        return ListImageDataset(self.paths, self.targets, self.image_format.with_augment(augment),
                                self.clean_targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise DataNotFoundError(f"cannot read image {self.paths[i]} ({e}); check "
                                    "--data-root / image_root") from None
        return self.transform(img), int(self.targets[i])


def read_list(path: str):
    """OLTR list file -> (relative paths list[str], labels int64 [N]); one
    `relative/path.jpg label` per line. Malformed -> DataNotFoundError with the line."""
    rels, labels = [], []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rsplit(None, 1)   # rsplit: tolerate spaces inside the path
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                    raise DataNotFoundError(f"corrupt list file {path}, line {lineno}: "
                                            f"{line.strip()!r} is not 'relative/path label'")
                rels.append(parts[0])
                labels.append(int(parts[1]))
    except (OSError, UnicodeDecodeError) as e:
        raise DataNotFoundError(f"cannot read list file {path}: {e}") from None
    if not rels:
        raise DataNotFoundError(f"list file {path} is empty")
    return rels, np.asarray(labels, dtype=np.int64)


def image_format(image_size: int, train: bool) -> ImageFormat:
    """The OLTR recipe: ImageNet statistics (for Places-LT too), square crops of
    image_size; train: random-resized crop + flip + colour jitter, test: resize + centre crop."""
    return ImageFormat(kind="files", size=(image_size, image_size), channels=3,
                     mean=IMAGENET_NORM[0], std=IMAGENET_NORM[1],
                     augment="resized_crop_flip_jitter" if train else "none")


def torchvision_transform(fmt: ImageFormat):
    """The torch path's transform for a files format; Resize keeps the 256/224 ratio when
    the crop is not 224. AutoAugment runs on the PIL image after the jitter, Cutout on
    the [0, 1] tensor before Normalize (so the hole is black), as GoodMorningPeter/RDR
    orders them."""
    from torchvision import transforms as T
    norm = T.Normalize(fmt.mean, fmt.std)
    if fmt.augment == "resized_crop_flip_jitter":
        auto = ([T.AutoAugment(T.AutoAugmentPolicy(fmt.autoaugment), fill=augment.FILL)]
                if fmt.autoaugment != "none" else [])
        cut = [augment.Cutout(fmt.cutout)] if fmt.cutout else []
        return T.Compose([T.RandomResizedCrop(fmt.size, scale=RESIZED_CROP_AREA,
                                              ratio=RESIZED_CROP_ASPECT),
                          T.RandomHorizontalFlip(), T.ColorJitter(*(COLOR_JITTER,) * 3),
                          *auto, T.ToTensor(), *cut, norm])
    return T.Compose([T.Resize(fmt.resize_shorter), T.CenterCrop(fmt.size), T.ToTensor(), norm])


def _find_lists(name: str, data_root):
    """Paths of <Prefix>_train.txt and <Prefix>_test.txt in data_root or data_root/<Prefix>."""
    prefix = LIST_PREFIX[name]
    wanted = [f"{prefix}_train.txt", f"{prefix}_test.txt"]
    if not data_root:
        raise DataNotFoundError(f"{name} needs its list files {', '.join(wanted)}, but no data "
                                "root was given. " + fix_hint(name))
    dirs = [data_root, os.path.join(data_root, prefix)]
    for d in dirs:
        if all(os.path.isfile(os.path.join(d, w)) for w in wanted):
            return [os.path.join(d, w) for w in wanted]
    raise DataNotFoundError(f"{name}: looked for {', '.join(wanted)} in {', '.join(dirs)}; "
                            "not found. " + fix_hint(name))


def load_oltr_lt(name, data_root, *, noise_ratio, seed, train_transform, image_root=None,
                 image_size=224) -> LTDataset:
    """ImageNet-LT / Places-LT. Labels are re-indexed by descending training count
    (stable argsort: ties keep original label order), the same map applied to the test
    list; label_map[original] = new. Noise, if any, is applied to re-indexed labels and
    the order is not re-sorted afterwards. imb_factor does not apply (the lists are LT)."""
    train_list, test_list = _find_lists(name, data_root)
    (tr_rel, tr_y), (te_rel, te_y) = read_list(train_list), read_list(test_list)
    num_classes = int(max(tr_y.max(), te_y.max())) + 1
    order = np.argsort(-np.bincount(tr_y, minlength=num_classes), kind="stable")
    remap = np.empty(num_classes, dtype=np.int64)
    remap[order] = np.arange(num_classes)
    image_root = image_root or data_root
    tr_paths = [os.path.join(image_root, r) for r in tr_rel]
    te_paths = [os.path.join(image_root, r) for r in te_rel]
    for p, lst in ((tr_paths[0], train_list), (te_paths[0], test_list)):   # cheap sanity check
        if not os.path.isfile(p):
            raise DataNotFoundError(f"{name}: image {p} (first entry of {lst}) not found under "
                                    f"image root {image_root}. " + fix_hint(name))
    noisy, clean, counts = noisy_counts(remap[tr_y], noise_ratio, num_classes, seed)
    train = ListImageDataset(tr_paths, noisy, image_format(image_size, train=train_transform),
                             clean_targets=clean)
    test = ListImageDataset(te_paths, remap[te_y], image_format(image_size, train=False))
    label_map = {c: int(remap[c]) for c in range(num_classes)}
    return LTDataset(name=name, train=train, test=test, class_counts=counts,
                     splits=class_splits(name, num_classes), in_channels=3,
                     image_size=image_size, label_map=label_map)
