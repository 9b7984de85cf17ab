"""Backbones for rdr_fast: ResNet-32 (CIFAR-LT), ResNet-50 (ImageNet-LT), ResNet-152
(Places-LT), as in the RDR paper, and a small CNN for the built-in small datasets.
Every model's forward returns (features, logits) and every model has an int attribute
feat_dim (K, the feature size RDR works in).

    model = build_model(default_model("cifar10_lt"), num_classes=10)
    feats, logits = model(x)        # [N, 64], [N, 10]

The classifier is always the attribute `fc` (a plain nn.Linear(feat_dim, C)).
Pretrained weights come only from a local state_dict file (load_pretrained).
"""
from __future__ import annotations

from ._resnet_cifar import ResNetCifar, SmallCNN, resnet32, small_cnn
from ._resnet_imagenet import FeatResNet, load_pretrained, resnet50, resnet152
from .wrap import WithFeatures, find_head, with_features

__all__ = ["MODELS", "FeatResNet", "ResNetCifar", "SmallCNN", "WithFeatures", "build_model", "default_model",
           "find_head", "load_pretrained", "resnet32", "resnet50", "resnet152", "small_cnn", "with_features"]

MODELS = {"resnet32": resnet32, "resnet50": resnet50, "resnet152": resnet152,
          "small_cnn": small_cnn}

_DEFAULTS = {"digits_lt": "small_cnn", "fmnist_lt": "small_cnn", "cifar10_lt": "resnet32",
             "cifar100_lt": "resnet32", "imagenet_lt": "resnet50", "places_lt": "resnet152",
             "inat2018": "resnet50"}
# The user's own images (--dataset folder / list): CIFAR's ResNet-32 for small crops, whose
# 3x3 stem keeps their resolution, else ImageNet's ResNet-50.
OWN_DATA = ("folder", "list")
SMALL_IMAGES = 64

def build_model(name: str, num_classes: int, in_channels: int = 3, pretrained=None):
    """Build MODELS[name]. in_channels applies to resnet32 / small_cnn (the ImageNet
    ResNets take 3). pretrained: path of a local state_dict file or None; a classifier
    of another shape in the file is skipped (see load_pretrained)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name in ("resnet50", "resnet152"):
        if in_channels != 3:
            raise ValueError(f"{name} takes 3 input channels, got in_channels={in_channels}")
        return MODELS[name](num_classes, pretrained=pretrained)
    model = MODELS[name](num_classes, in_channels=in_channels)
    if pretrained is not None:
        model.pretrained_report = load_pretrained(model, str(pretrained))
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
