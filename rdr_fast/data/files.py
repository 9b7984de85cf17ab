"""Datasets of image files: one reader for every source that names images by path.

Each source (OLTR / iNaturalist list files in oltr.py, the user's folders and list files
in own.py) describes its splits as `Listing`s: paths and original labels. This module
turns them into an LTDataset the same way for all of them:

- classes are the training split's labels, re-indexed by descending training count
  (stable: ties keep the order of the original labels, integer ids ascending, names
  sorted); a test or val label that the training split lacks is refused;
- every listed image must exist and its header must be one Pillow reads (`check_images`,
  Image.verify on every file, in threads); the few bad ones are refused with their names,
  or left out and counted with ``skip_bad_images``;
- the items are RGB images opened with Pillow (torch loader) or DALI (the DALI loader
  reads `paths` too), transformed as the split's ImageFormat says.
Problems raise DataNotFoundError with one message naming the file, line or class.
"""
from __future__ import annotations

import dataclasses
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import augment
from .common import DataNotFoundError, LTDataset, class_splits, noisy_counts
from .image_format import COLOR_JITTER, RESIZED_CROP_AREA, RESIZED_CROP_ASPECT, ImageFormat

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SHOWN = 5          # bad files or lines a message names before "and N more"
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass
class Listing:
    """One split as its source names it: image paths, original labels (int ids or str
    names) and, for list files, each item's line number. ``source`` (a file or folder)
    is what messages name."""
    source: str
    paths: list[str]
    labels: list
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        return f"{self.source}, line {self.lines[i]}" if self.lines else self.source


class ListImageDataset(torch.utils.data.Dataset):
    """Images listed by path, opened with PIL on access.

    paths: file paths; targets / clean_targets: int64 [N] re-indexed labels.
    fmt: an ImageFormat of kind "files"; its augment picks the torchvision transform
      (torchvision_transform). Item i: (transformed RGB image float32 [3, H, W], int
      label). An unreadable image raises DataNotFoundError naming the file (not a bare
      PIL/OS error from a worker).
    formats: the image formats (Pillow's names) of the dataset's files where they are
      known (file_lt_dataset: of all its splits), which resolve_loader checks DALI decodes.
    """

    def __init__(self, paths, targets, fmt: ImageFormat, clean_targets=None, formats=()):
        if fmt.kind != "files":
            raise ValueError(f"fmt.kind must be 'files' for a list of image paths, "
                             f"got {fmt.kind!r}")
        self.paths = list(paths)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        self.clean_targets = (self.targets.clone() if clean_targets is None else
                              torch.as_tensor(np.asarray(clean_targets), dtype=torch.int64))
        self.image_format = fmt
        self.formats = frozenset(formats)
        self.transform = torchvision_transform(fmt)

    def without_augmentation(self) -> "ListImageDataset":
        """The same files and labels with the test transform (resize, centre crop)."""
        fmt = dataclasses.replace(self.image_format, augment="none", autoaugment="none", cutout=0)
        return ListImageDataset(self.paths, self.targets, fmt, self.clean_targets, self.formats)

    def with_augment(self, augment: str) -> "ListImageDataset":
        """The same files and labels with load_dataset's `augment` (ImageFormat.with_augment)."""
        return ListImageDataset(self.paths, self.targets, self.image_format.with_augment(augment),
                                self.clean_targets, self.formats)

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


def read_list(path: str, ids_only: bool = False) -> Listing:
    """A list file -> Listing with paths relative to the list's image root (joined later).

    One `relative/path label` per line (UTF-8): the label is the last whitespace-separated
    field, so paths may hold spaces; a line with a tab splits at its last tab instead, so
    that a label may hold spaces too. Blank lines are skipped. Labels stay strings here
    (`label_style` decides ids or names); ``ids_only`` (the published benchmark lists)
    refuses a label that is not an integer. DataNotFoundError names the file and line."""
    rels, labels, lines = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                parts = [p.strip() for p in text.rsplit("\t" if "\t" in text else None, 1)]
                if len(parts) != 2 or not all(parts) or (ids_only and not _INTEGER.fullmatch(parts[1])):
                    raise DataNotFoundError(f"corrupt list file {path}, line {lineno}: {text!r} is not "
                                            f"'relative/path {'integer_label' if ids_only else 'label'}'")
                rels.append(parts[0])
                labels.append(parts[1])
                lines.append(lineno)
    except (OSError, UnicodeDecodeError) as e:
        raise DataNotFoundError(f"cannot read list file {path}: {e}") from None
    if not rels:
        raise DataNotFoundError(f"list file {path} holds no 'relative/path label' line")
    return Listing(path, rels, labels, lines)


def label_style(*listings: Listing) -> None:
    """Integer ids when every label of every listing is an integer, else names: turn the
    labels into ints in place for ids (names stay str, "3" included). A negative id is
    refused."""
    if not all(isinstance(y, str) and _INTEGER.fullmatch(y) for lst in listings for y in lst.labels):
        return
    for lst in listings:
        lst.labels = [int(y) for y in lst.labels]
        for i, y in enumerate(lst.labels):
            if y < 0:
                raise DataNotFoundError(f"{lst.where(i)}: label {y} is not a class id (ids are integers >= 0)")


def class_order(labels) -> list:
    """The classes of a training split, head to tail: by descending count, ties in the
    order of the original labels (ids ascending, names sorted)."""
    names, counts = np.unique(np.asarray(labels, dtype=object if isinstance(labels[0], str) else np.int64),
                              return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [names[i].item() if hasattr(names[i], "item") else names[i] for i in order]


def check_classes(listing: Listing, classes, train_source: str) -> None:
    """Every label of a test or val split is a training class (``classes``: a set or dict)."""
    for i, y in enumerate(listing.labels):
        if y not in classes:
            raise DataNotFoundError(f"{listing.where(i)}: class {y!r} does not occur in the training set "
                                    f"({train_source}); every class must have training images")


def targets_of(listing: Listing, label_map: dict, train_source: str) -> np.ndarray:
    """The re-indexed labels of a split; a label outside the training classes is refused."""
    check_classes(listing, label_map, train_source)
    return np.fromiter((label_map[y] for y in listing.labels), dtype=np.int64, count=len(listing.labels))


def _header_problem(path: str) -> tuple[str | None, str | None]:
    """(why Pillow cannot read this file's header or None, its format as Pillow names it)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()     # the header and the format's own checks; no full decode
            return None, im.format
    except FileNotFoundError:
        return "missing", None
    except Exception as e:   # Pillow raises many kinds (SyntaxError, struct.error, ...)
        return f"{type(e).__name__}: {' '.join(str(e).split())}", None


def check_images(listing: Listing, skip_bad: bool, threads: int = 8) -> tuple[list[str], set[str]]:
    """Every file of ``listing`` exists and has a header Pillow reads. Missing files are
    always refused (a wrong root, most likely); unreadable ones are refused too, or with
    ``skip_bad`` removed from the listing in place. Returns (the removed paths, the image
    formats of the rest)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(_header_problem, listing.paths, chunksize=64))
    problems = [problem for problem, _ in found]
    formats = {fmt for problem, fmt in found if problem is None}
    missing = [i for i, p in enumerate(problems) if p == "missing"]
    bad = [i for i, p in enumerate(problems) if p not in (None, "missing")]
    if missing:
        raise DataNotFoundError(f"{len(missing)} of the {len(problems)} images of {listing.source} do not exist: "
                                + _names(listing, missing, problems) + "; check --data-root")
    if bad and not skip_bad:
        raise DataNotFoundError(f"{len(bad)} of the {len(problems)} images of {listing.source} cannot be read: "
                                + _names(listing, bad, problems)
                                + "; replace or remove them, or pass --skip-bad-images to leave them out")
    drop = set(bad)
    removed = [listing.paths[i] for i in bad]
    for field in ("paths", "labels", "lines"):
        values = getattr(listing, field)
        if values is not None:
            setattr(listing, field, [v for i, v in enumerate(values) if i not in drop])
    return removed, formats


def _names(listing: Listing, items: list[int], problems: list) -> str:
    shown = [f"{listing.paths[i]}" + ("" if problems[i] == "missing" else f" ({problems[i]})") for i in items[:SHOWN]]
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(shown) + more


def image_format(image_size: int, train: bool, norm=IMAGENET_NORM) -> ImageFormat:
    """The OLTR recipe: square crops of image_size; train: random-resized crop + flip +
    colour jitter, test: resize + centre crop; norm: (mean, std), ImageNet's by default."""
    return ImageFormat(kind="files", size=(image_size, image_size), channels=3, mean=norm[0], std=norm[1],
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


def file_lt_dataset(name: str, train: Listing, test: Listing, val: Listing | None = None, *,
                    image_root: str | None = None, norm=IMAGENET_NORM, image_size: int = 224,
                    train_transform: bool = True, noise_ratio: float = 0.0, seed: int = 0,
                    skip_bad_images: bool = False) -> LTDataset:
    """An LTDataset from listings whose paths are relative to ``image_root`` (None: as
    they are). Labels must already be in their final style (ints or names). Noise, if
    any, is applied to the re-indexed training labels and the class order is not
    re-sorted afterwards."""
    splits = [s for s in (train, test, val) if s is not None]
    if image_root is not None:
        for s in splits:
            s.paths = [os.path.join(image_root, p) for p in s.paths]
    for s in splits[1:]:   # labels first: a wrong list is told before its images are opened
        check_classes(s, set(train.labels), train.source)
    checked = [check_images(s, skip_bad_images) for s in splits]
    skipped = [p for removed, _ in checked for p in removed]
    formats = frozenset().union(*(found for _, found in checked))
    for s in splits:
        if not s.paths:
            raise DataNotFoundError(f"{s.source}: no readable image is left")
    classes = class_order(train.labels)
    label_map = {c: i for i, c in enumerate(classes)}
    noisy, clean, counts = noisy_counts(targets_of(train, label_map, train.source), noise_ratio,
                                        len(classes), seed)
    test_y = targets_of(test, label_map, train.source)
    val_y = None if val is None else targets_of(val, label_map, train.source)
    fmt = lambda augment: image_format(image_size, augment, norm)  # noqa: E731
    train_ds = ListImageDataset(train.paths, noisy, fmt(train_transform), clean_targets=clean, formats=formats)
    return LTDataset(name=name, train=train_ds, test=ListImageDataset(test.paths, test_y, fmt(False)),
                     class_counts=counts, splits=class_splits(name, len(classes)), in_channels=3,
                     image_size=image_size, label_map=label_map,
                     val=None if val is None else ListImageDataset(val.paths, val_y, fmt(False)),
                     skipped_images=tuple(skipped))
