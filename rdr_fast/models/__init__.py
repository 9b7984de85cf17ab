"""Backbones for rdr_fast: ResNet-32 (CIFAR-LT), ResNet-10 / ResNet-50 / ResNeXt-50
(ImageNet-LT, iNaturalist), ResNet-152 (Places-LT), a small CNN for the built-in small
datasets, and any torchvision or timm classifier by name (``torchvision:NAME``,
``timm:NAME``, rdr_fast.models.external). Every model's forward returns (features, logits)
and every model has an int attribute feat_dim (K, the feature size RDR works in).

    model = build_model(default_model("cifar10_lt"), num_classes=10)
    feats, logits = model(x)        # [N, 64], [N, 10]
    model = build_model("torchvision:resnet18", num_classes=10)   # with_features inside

The classifier is always the attribute `fc` (a plain nn.Linear(feat_dim, C)).
Pretrained weights come only from a local state_dict file (load_pretrained).
"""
from __future__ import annotations

import os

from ._resnet_cifar import ResNetCifar, SmallCNN, resnet32, small_cnn
from ._resnet_imagenet import FeatResNet, load_pretrained, resnet10, resnet50, resnet152, resnext50
from .external import build_external, is_external
from .external import input_channels as _external_channels
from .external import name_problem as _external_problem
from .wrap import WithFeatures, find_head, with_features

__all__ = ["MODELS", "FeatResNet", "ResNetCifar", "SmallCNN", "WithFeatures", "build_model", "default_model",
           "find_head", "input_channels", "load_pretrained", "model_problem", "resnet10", "resnet32", "resnet50",
           "resnext50", "resnet152", "small_cnn", "with_features"]

MODELS = {"resnet10": resnet10, "resnet32": resnet32, "resnet50": resnet50, "resnext50": resnext50,
          "resnet152": resnet152, "small_cnn": small_cnn}
RGB_ONLY = ("resnet10", "resnet50", "resnext50", "resnet152")   # torchvision's ResNet: 3 channels

_DEFAULTS = {"digits_lt": "small_cnn", "fmnist_lt": "small_cnn", "cifar10_lt": "resnet32",
             "cifar100_lt": "resnet32", "imagenet_lt": "resnet50", "places_lt": "resnet152",
             "inat2018": "resnet50"}
# The user's own images (--dataset folder / list): CIFAR's ResNet-32 for small crops, whose
# 3x3 stem keeps their resolution, else ImageNet's ResNet-50.
OWN_DATA = ("folder", "list")
SMALL_IMAGES = 64

def model_problem(name) -> str | None:
    """Why ``name`` names no model build_model can build, or None: one of MODELS,
    ``torchvision:NAME`` (a torchvision classification model) or ``timm:NAME`` (timm installed)."""
    if name in MODELS:
        return None
    if is_external(name):
        return _external_problem(name)
    hint = (f" (torchvision has it: torchvision:{name})"
            if _external_problem(f"torchvision:{name}") is None else "")
    return f"unknown model {name!r}{hint}; choose one of {', '.join(MODELS)}, torchvision:NAME or timm:NAME"


def input_channels(name: str) -> int | None:
    """The channel count the model takes, or None when it is built for any (in_channels)."""
    return 3 if name in RGB_ONLY else _external_channels(name) if is_external(name) else None


def build_model(name: str, num_classes: int, in_channels: int = 3, pretrained=None):
    """Build the model ``name`` names (see model_problem). in_channels applies to resnet32,
    small_cnn and timm models (the others take 3). pretrained: path of a local state_dict
    file or None; a classifier of another shape in the file is skipped (see load_pretrained)."""
    if is_external(name):
        model = build_external(name, num_classes, in_channels)
    else:
        problem = model_problem(name)
        if problem:
            raise ValueError(problem)
        if input_channels(name) not in (None, in_channels):
            raise ValueError(f"{name} takes 3 input channels, got in_channels={in_channels}")
        model = MODELS[name](num_classes) if name in RGB_ONLY else MODELS[name](num_classes, in_channels=in_channels)
    if pretrained is not None:
        model.pretrained_report = load_pretrained(model, os.fspath(pretrained))
    return model


def default_model(dataset_name: str, image_size: int | None = None) -> str:
    """The paper's backbone for a dataset: cifar* -> resnet32, imagenet_lt -> resnet50,
    places_lt -> resnet152, digits_lt / fmnist_lt -> small_cnn; inat2018 -> resnet50 (as
    the field trains it); folder / list -> resnet32 for image_size <= 64, else resnet50."""
    if dataset_name in OWN_DATA:
        return "resnet32" if image_size is not None and image_size <= SMALL_IMAGES else "resnet50"
    if dataset_name not in _DEFAULTS:
        raise ValueError(f"no default model for {dataset_name!r}; known datasets: "
                         f"{', '.join((*_DEFAULTS, *OWN_DATA))}")
    return _DEFAULTS[dataset_name]
