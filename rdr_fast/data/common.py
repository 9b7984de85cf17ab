"""Shared pieces of rdr_fast.data: the dataset record, the LT profile, label noise,
class splits and the tensor-backed image dataset used by digits/fmnist/cifar."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import augment
from .image_format import ImageFormat


class DataNotFoundError(RuntimeError):
    """Data files are missing, unreadable or corrupt. The message says what was looked
    for, where, and how to fix it; no low-level traceback is chained."""


@dataclass(frozen=True)
class LTDataset:
    """A long-tailed benchmark, ready to train on.

    train / test yield (x: float32 [C, H, W], y: int). class_counts are the training
    counts per class index (after label noise, if any); class 0 is the head.
    splits maps "many"/"medium"/"few" to [lo, hi) class-index ranges.
    label_map maps an original label (an int id, or a str class name for folders and
    list files with names) to its re-indexed label.
    val: the validation split (the test items' transform), None where the source has none.
    skipped_images: the unreadable files left out (load_dataset(skip_bad_images=True)).
    The builders give train and test an ImageFormat (`ds.train.image_format`, `ds.test.image_format`):
    how the images are stored and transformed, which is all the loaders read.
    """
    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    class_counts: list[int]
    splits: dict[str, tuple[int, int]]
    in_channels: int
    image_size: int
    label_map: dict
    val: torch.utils.data.Dataset | None = None
    skipped_images: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


# The paper's Many/Medium/Few class-index ranges, keyed by (dataset, number of classes).
PAPER_SPLITS = {
    ("cifar10_lt", 10): ((0, 3), (3, 7), (7, 10)),
    ("cifar100_lt", 100): ((0, 35), (35, 69), (69, 100)),
    ("imagenet_lt", 1000): ((0, 390), (390, 835), (835, 1000)),
    ("places_lt", 365): ((0, 131), (131, 288), (288, 365)),
}


def class_counts(labels_or_dataset, num_classes: int | None = None) -> list[int]:
    """Samples per class: from a sequence of integer labels (list, NumPy array, tensor), or a
    dataset with a ``targets`` attribute (torchvision's ImageFolder, CIFAR, rdr_fast's) or
    else yielding (x, label) items. ``num_classes``: the length of the result (default:
    the largest label + 1). What RDRLoss's ``class_counts`` takes."""
    source = getattr(labels_or_dataset, "targets", labels_or_dataset)
    if isinstance(source, torch.utils.data.Dataset):
        source = [item[1] for item in source]
    try:
        labels = torch.as_tensor(np.asarray(source))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"labels_or_dataset must be integer labels or a dataset of (x, label) items ({exc})") from None
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels_or_dataset must hold a 1-D sequence of integer labels, got {labels.dtype} "
                        f"of shape {tuple(labels.shape)}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"labels_or_dataset: labels must be >= 0, found {int(labels.min())}")
    largest = int(labels.max()) if len(labels) else -1
    if num_classes is None:
        num_classes = largest + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= largest:
        raise ValueError(f"num_classes must be an integer above the largest label ({largest}), got {num_classes!r}")
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


def class_splits(name: str, num_classes: int) -> dict:
    """The paper's ranges when (name, C) is a paper setting, else thirds by index:
    many [0, C//3), medium [C//3, C - C//3), few [C - C//3, C). For C = 10 that is
    the CIFAR-10 split 3/4/3. Index order is count order (class 0 = most frequent)."""
    ranges = PAPER_SPLITS.get((name, num_classes))
    if ranges is None:
        third = num_classes // 3
        ranges = ((0, third), (third, num_classes - third), (num_classes - third, num_classes))
    return dict(zip(("many", "medium", "few"), ranges))


IMB_TYPES = ("exp", "step")   # the long-tail profiles of LDAM-DRW's get_img_num_per_cls


def long_tail_counts(n_max, num_classes: int, imb_factor: float, imb_type: str = "exp") -> list:
    """LDAM-DRW's long-tail profiles, with imb_factor the ratio n_0 / n_{C-1} (>= 1; 100
    means "IF 100"; LDAM's own imb_factor is its inverse, 0.01):

    - "exp": n_i = max(1, int(n_max * (1/imb_factor) ** (i / (C-1)))).
    - "step": the first C//2 classes int(n_max), the others max(1, int(n_max * (1/imb_factor))).
      For an even C (every dataset here) that is LDAM's list; for an odd C LDAM's is one
      class short, and the middle class joins the tail here.

    1/IF is the same float LDAM writes as 0.01, so the counts match LDAM bit for bit. The
    floor of 1 never binds in the paper's settings (CIFAR-100 IF 500 ends at exactly 1); it
    keeps small pools (digits, 124 per class, at IF > 124) from producing an empty class.
    """
    if imb_factor < 1:
        raise ValueError(f"imb_factor must be >= 1 (n_max / n_min), got {imb_factor}")
    if imb_type not in IMB_TYPES:
        raise ValueError(f"imb_type must be one of {', '.join(IMB_TYPES)}, got {imb_type!r}")
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / imb_factor
    if imb_type == "step":
        head = num_classes // 2
        return [int(n_max)] * head + [max(1, int(n_max * ratio))] * (num_classes - head)
    return [max(1, int(n_max * ratio ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def ldam_subset(targets: np.ndarray, counts: list, seed: int) -> np.ndarray:
    """Indices kept by LDAM-DRW's gen_imbalanced_data: seed the legacy NumPy RNG once,
    then for each class in ascending order shuffle its indices (original order) and
    keep the first n_c. A local RandomState(seed) draws the same stream as
    np.random.seed(seed) without touching global state. Result is grouped by class."""
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep).astype(np.int64)


def add_symmetric_noise(labels, noise_ratio: float, num_classes: int, seed: int):
    """Flip exactly int(noise_ratio * N) labels, each to a uniformly drawn *other* class.

    RoLT convention (Wei et al.), reproduced draw for draw: random.seed(seed), shuffle
    the indices, the first int(rN) are noisy; then, in ascending index order, the new
    label is (y + randint(1, C-1)) % C. A local random.Random keeps global state alone.
    Returns (noisy_labels int64 [N], flipped_idx int64 sorted [int(rN)]).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= noise_ratio < 1.0:
        raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio}")
    noisy = labels.copy()
    n_noise = int(noise_ratio * len(labels))
    if n_noise == 0:
        return noisy, np.zeros(0, dtype=np.int64)
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    rng = random.Random(seed)
    idx = list(range(len(labels)))
    rng.shuffle(idx)
    flipped = np.sort(np.asarray(idx[:n_noise], dtype=np.int64))
    for i in flipped:
        noisy[i] = (labels[i] + rng.randint(1, num_classes - 1)) % num_classes
    return noisy, flipped


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images as an integer tensor, normalised per item (no PIL).

    images: uint8 [N, C, H, W] holding raw pixel values in [0, scale].
    targets / clean_targets: int64 [N] (they differ only where label noise flipped).
    Item i: ((images[i] / scale - mean) / std as float32 [C, H, W], int label).
    pad > 0 enables RandomCrop(H, padding=pad) with zero fill, as torchvision does
    before normalising; flip enables RandomHorizontalFlip(0.5); then autoaugment (a
    policy name) and cutout (a hole side) as rdr_fast.data.augment applies them.
    `image_format` records all of this for the loaders (augment "crop_flip" when pad or flip).
    Item i draws its augmentation from torch's global RNG (per-worker seeded by the
    DataLoader when num_workers > 0); item (i, draws), what the torch loader asks for
    when the format has AutoAugment or Cutout, takes them from one position of a
    sampling plan (rdr_fast.data.sampling.Plan.draws_at).
    """

    def __init__(self, images, targets, mean, std, *, scale=255.0, pad=0, flip=False,
                 autoaugment="none", cutout=0, clean_targets=None):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        self.clean_targets = (self.targets.clone() if clean_targets is None else
                              torch.as_tensor(np.asarray(clean_targets), dtype=torch.int64))
        self.image_format = ImageFormat(kind="tensor", size=tuple(images.shape[-2:]),
                              channels=images.shape[1], mean=tuple(mean), std=tuple(std),
                              scale=float(scale), augment="crop_flip" if pad or flip else "none",
                              pad=int(pad), flip=bool(flip), autoaugment=autoaugment,
                              cutout=int(cutout))
        self._a, self._b = self.image_format.affine()

    def with_augment(self, augment: str) -> "TensorImageDataset":
        """The same images and labels with load_dataset's `augment` (ImageFormat.with_augment)."""
        fmt = self.image_format.with_augment(augment)
        return TensorImageDataset(self.images, self.targets, self.mean, self.std, scale=self.scale,
                                  pad=self.pad, flip=self.flip, autoaugment=fmt.autoaugment,
                                  cutout=fmt.cutout, clean_targets=self.clean_targets)

    def without_augmentation(self) -> "TensorImageDataset":
        """The same images and labels, items only normalised (what analysis reads)."""
        return TensorImageDataset(self.images, self.targets, self.mean, self.std, scale=self.scale,
                                  clean_targets=self.clean_targets)

    # The constructor's arguments, read back from the image format (their one home).
    mean = property(lambda self: self.image_format.mean)
    std = property(lambda self: self.image_format.std)
    scale = property(lambda self: self.image_format.scale)
    pad = property(lambda self: self.image_format.pad)
    flip = property(lambda self: self.image_format.flip)

    def __len__(self) -> int:
        return self.images.shape[0]

    def _draw(self) -> dict:
        """One item's draws from torch's global RNG, in the order the crop-and-flip items
        always drew them (crop offsets, flip), then AutoAugment's and Cutout's."""
        draws = {}
        if self.pad:
            draws["top"], draws["left"] = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        if self.flip:
            draws["flip"] = bool(torch.rand(()) < 0.5)
        if augment.needs_draws(self.image_format):
            draws.update(augment.draw(self.image_format, 1))
        return draws

    def __getitem__(self, key):
        i, draws = key if isinstance(key, tuple) else (key, self._draw())
        img = self.images[i]
        if self.pad:
            h, w = img.shape[-2:]
            img = F.pad(img, (self.pad,) * 4)          # zero fill, like torchvision's default
            top, left = draws["top"], draws["left"]
            img = img[:, top:top + h, left:left + w]
        if self.flip and draws["flip"]:
            img = img.flip(-1)
        if augment.needs_draws(self.image_format):
            img = augment.apply(img[None], self.image_format, draws)[0]
        return img.float() * self._a + self._b, int(self.targets[i])


def noisy_counts(targets, noise_ratio: float, num_classes: int, seed: int):
    """Apply symmetric noise (if any) after the LT subset and recount per class.

    The class order is NOT re-sorted after noise: class indices stay in clean-count
    order, and the returned counts (what re-weighting sees) follow the noisy labels.
    Returns (noisy_targets int64 [N], clean_targets int64 [N], counts list[int]).
    """
    clean = np.asarray(targets, dtype=np.int64)
    noisy, _ = add_symmetric_noise(clean, noise_ratio, num_classes, seed)
    counts = np.bincount(noisy, minlength=num_classes).tolist()
    return noisy, clean, counts


def fix_hint(name: str) -> str:
    """How to get the data for `name`, for DataNotFoundError messages."""
    hints = {
        "fmnist_lt": "install the Debian package (apt-get install -y dataset-fashion-mnist), "
                     "or pass --data-root DIR holding the IDX files, or --download",
        "cifar10_lt": "pass --data-root DIR containing cifar-10-batches-py/, "
                      "or add --download to fetch it there",
        "cifar100_lt": "pass --data-root DIR containing cifar-100-python/, "
                       "or add --download to fetch it there",
        "imagenet_lt": "pass --data-root DIR holding the OLTR list files and the images "
                       "(--download is not available for this dataset)",
        "places_lt": "pass --data-root DIR holding the OLTR list files and the images "
                     "(--download is not available for this dataset)",
        "inat2018": "pass --data-root DIR holding iNaturalist18_train.txt, iNaturalist18_val.txt "
                    "and the images (--download is not available for this dataset)",
    }
    return "Fix: " + hints.get(name, "pass --data-root DIR")


def tensor_lt_dataset(name, train, test, *, n_max, num_classes, imb_factor, noise_ratio,
                      seed, norm, imb_type="exp", scale=255.0, pad=0, flip=False) -> LTDataset:
    """LT-subsample an in-memory train set (LDAM recipe), add noise, wrap as LTDataset.

    train / test: (images uint8 [N, C, H, W], labels int [N]) with labels 0..C-1 already
    in head-to-tail order. norm: (mean, std) per channel. imb_type: the profile
    (long_tail_counts). pad/flip: train augmentation.
    """
    (xtr, ytr), (xte, yte) = train, test
    counts = long_tail_counts(n_max, num_classes, imb_factor, imb_type)
    keep = ldam_subset(np.asarray(ytr, dtype=np.int64), counts, seed)
    noisy, clean, counts = noisy_counts(np.asarray(ytr)[keep], noise_ratio, num_classes, seed)
    keep_t = torch.from_numpy(keep)
    train_ds = TensorImageDataset(xtr[keep_t], noisy, *norm, scale=scale, pad=pad, flip=flip,
                                  clean_targets=clean)
    test_ds = TensorImageDataset(xte, yte, *norm, scale=scale)
    return LTDataset(name=name, train=train_ds, test=test_ds, class_counts=counts,
                     splits=class_splits(name, num_classes), in_channels=xtr.shape[1],
                     image_size=xtr.shape[-1], label_map={c: c for c in range(num_classes)})
