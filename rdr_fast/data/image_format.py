"""ImageFormat: how a split's images are stored and transformed.

Each dataset builder fills one in per split (`ds.train.image_format`, `ds.test.image_format`), and each
loader (torch, gpu-resident, DALI) picks its transforms from it, so no loader needs to
know a dataset's class or private fields. docs/datasets.md lists the formats of every
benchmark.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

KINDS = ("tensor", "files")
AUGMENTATIONS = ("none", "crop_flip", "resized_crop_flip_jitter")
AUTOAUGMENT_POLICIES = ("none", "cifar10", "imagenet", "svhn")   # torchvision's AutoAugmentPolicy
# load_dataset's `augment`: the basic augmentation alone, + AutoAugment, + Cutout.
AUGMENTS = ("basic", "autoaug", "autoaug_cutout")

# "resized_crop_flip_jitter", as in the OLTR recipe: torchvision's RandomResizedCrop
# defaults and ColorJitter(brightness, contrast, saturation) of this strength.
RESIZED_CROP_AREA = (0.08, 1.0)
RESIZED_CROP_ASPECT = (3 / 4, 4 / 3)
COLOR_JITTER = 0.4


@dataclass(frozen=True)
class ImageFormat:
    """What a loader needs to know about a split's images.

    kind: "tensor": uint8 [N, C, H, W] in memory (the dataset's `images`), raw values in
      [0, scale]; "files": image files (the dataset's `paths`) decoded to RGB on access.
    size: (H, W) of every item the split yields.
    channels: C of every item.
    mean, std: per-channel normalisation of pixels divided by `scale`.
    scale: the largest raw pixel value (255; 16 for digits).
    augment: what the split's items get at train time:
      "none": tensors are only normalised; files get the test transform, the shorter
        side resized to `resize_shorter`, then a centre crop of `size`.
      "crop_flip" (tensor): zero padding by `pad` and a random crop back to `size`, then
        a horizontal flip with p=0.5 if `flip`: torchvision's RandomCrop(size,
        padding=pad) + RandomHorizontalFlip().
      "resized_crop_flip_jitter" (files): RandomResizedCrop(size) (area
        RESIZED_CROP_AREA, aspect RESIZED_CROP_ASPECT), a horizontal flip with p=0.5,
        ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER).
    pad, flip: the parameters of "crop_flip" (0 and False for any other augment).
    autoaugment: "none", or an AutoAugment policy of torchvision ("cifar10", "imagenet",
      "svhn") applied after `augment` on the uint8 image (rdr_fast.data.augment).
    cutout: 0, or the side L of one Cutout hole applied after AutoAugment: the box
      [y - L//2, y + L//2) x [x - L//2, x + L//2) around a uniform centre, clipped at the
      borders, raw pixels set to 0.
    Both need an `augment` other than "none" and 8-bit pixels (scale 255).
    """
    kind: str
    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0
    augment: str = "none"
    pad: int = 0
    flip: bool = False
    autoaugment: str = "none"
    cutout: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, "
                             f"got {self.augment!r}")
        needs = {"crop_flip": "tensor", "resized_crop_flip_jitter": "files"}.get(self.augment)
        if needs not in (None, self.kind):
            raise ValueError(f"augment {self.augment!r} needs kind {needs!r}, got {self.kind!r}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if (self.pad or self.flip) and self.augment != "crop_flip":
            raise ValueError(f"pad and flip belong to augment 'crop_flip', got pad={self.pad}, "
                             f"flip={self.flip} with augment {self.augment!r}")
        if self.autoaugment not in AUTOAUGMENT_POLICIES:
            raise ValueError(f"autoaugment must be one of {', '.join(AUTOAUGMENT_POLICIES)}, "
                             f"got {self.autoaugment!r}")
        if not 0 <= self.cutout <= min(self.size):
            raise ValueError(f"cutout must be in [0, {min(self.size)}] (the image side), got {self.cutout}")
        if (self.autoaugment != "none" or self.cutout) and (self.augment == "none" or self.scale != 255):
            raise ValueError(f"autoaugment and cutout build on a train augmentation of 8-bit images; "
                             f"got augment {self.augment!r} with scale {self.scale:g}")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels}), got "
                             f"mean={self.mean}, std={self.std}")

    def with_augment(self, augment: str) -> "ImageFormat":
        """This train format with load_dataset's `augment` (AUGMENTS) on top of its basic
        augmentation: "basic" changes nothing; "autoaug" adds AutoAugment with the CIFAR-10
        policy for in-memory images, the ImageNet policy for image files; "autoaug_cutout"
        adds one Cutout hole of half the shorter side (16 for 32x32, 14 for 28x28)."""
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if augment == "basic":
            return self
        if self.augment == "none" or self.scale != 255:
            raise ValueError(f"augment={augment!r} needs a train augmentation of 8-bit images to "
                             f"build on; these images have augment {self.augment!r} and values "
                             f"0..{self.scale:g}: use augment='basic'")
        return dataclasses.replace(self, autoaugment="cifar10" if self.kind == "tensor" else "imagenet",
                                   cutout=min(self.size) // 2 if augment == "autoaug_cutout" else 0)

    @property
    def resize_shorter(self) -> int:
        """Files, test transform: the shorter side before the centre crop (256 for 224)."""
        return round(min(self.size) * 256 / 224)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), float32 [C, 1, 1]: normalised = raw * a + b, i.e. (raw / scale - mean) / std
        with 1/scale folded in (a = 1 / (scale * std), b = -mean / std)."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return 1.0 / (self.scale * std), -mean / std
