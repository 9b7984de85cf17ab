"""torchvision's ResNet as ResNet-10 / ResNet-50 / ResNeXt-50 / ResNet-152 returning
(features, logits), and local-file pretrained loading (never a hub download)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .wrap import WithFeatures


class FeatResNet(ResNet):
    """torchvision's ResNet with the same parameter names (so torchvision checkpoints
    load as they are) and a forward that also returns the pooled features.

    forward(x [N, 3, H, W]) -> (features [N, feat_dim], logits [N, num_classes]);
    feat_dim is 2048 with Bottleneck blocks, 512 with BasicBlocks. resnet_options: ResNet's
    own (groups, width_per_group for ResNeXt).
    """

    def __init__(self, layers, num_classes: int, block=Bottleneck, **resnet_options):
        super().__init__(block, layers, num_classes=num_classes, **resnet_options)
        self.feat_dim = self.fc.in_features

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feats = torch.flatten(self.avgpool(x), 1)
        return feats, self.fc(feats)


def _unwrap_state_dict(obj, path: str) -> dict:
    """Accept a bare state_dict or {'state_dict'|'model': ...}; strip DataParallel's
    'module.' prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_pretrained(model: nn.Module, path: str, classifier: str = "fc") -> dict:
    """Load a local state_dict file into `model`, skipping classifier weights whose shape
    differs (e.g. a 1000-class fc into a 365-class model).

    Missing backbone weights or any other shape mismatch is an error: it means the file
    is for another architecture. Returns {"loaded": [...], "skipped": [...],
    "unexpected": [...]} key lists for logging. A with_features model takes the state dict
    of the model it wraps (a torchvision or timm checkpoint as it is), its head skipped
    when of another shape.
    """
    if isinstance(model, WithFeatures):
        return load_pretrained(model.model, path, classifier=model.head_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}. Pass a local "
                                "state_dict saved with torch.save(model.state_dict(), PATH); "
                                "hub downloads are not used")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load pretrained weights from {path}: {e}") from None
    src, own = _unwrap_state_dict(obj, path), model.state_dict()
    prefix = classifier + "."
    skipped = [k for k in src if k in own and src[k].shape != own[k].shape]
    bad = [k for k in skipped if not k.startswith(prefix)]
    # num_batches_tracked is absent from pre-1.0 checkpoints and harmless to leave at 0.
    missing = [k for k in own if k not in src and not k.startswith(prefix)
               and not k.endswith("num_batches_tracked")]
    if bad or missing:
        raise ValueError(f"{path} does not match {type(model).__name__}: shape mismatch in "
                         f"{bad[:5]}, missing {missing[:5]} ({len(bad)} / {len(missing)} keys)")
    loaded = {k: v for k, v in src.items() if k in own and k not in skipped}
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "skipped": skipped,
            "unexpected": [k for k in src if k not in own]}


def _build(layers, num_classes, pretrained, **options):
    model = FeatResNet(layers, num_classes, **options)
    if pretrained is not None:
        model.pretrained_report = load_pretrained(model, os.fspath(pretrained))
    return model


def resnet50(num_classes: int, pretrained=None) -> FeatResNet:
    """torchvision ResNet-50 (random init unless `pretrained` is a local file); K = 2048."""
    return _build([3, 4, 6, 3], num_classes, pretrained)


def resnet10(num_classes: int, pretrained=None) -> FeatResNet:
    """ResNet-10: one BasicBlock per stage, the ImageNet-LT backbone of "Decoupling Representation
    and Classifier for Long-Tailed Recognition" (arXiv 1910.09217) and of "Large-Scale
    Long-Tailed Recognition in an Open World" (OLTR, arXiv 1904.05160); K = 512."""
    return _build([1, 1, 1, 1], num_classes, pretrained, block=BasicBlock)


def resnext50(num_classes: int, pretrained=None) -> FeatResNet:
    """ResNeXt-50 (32x4d), torchvision's resnext50_32x4d, the usual ImageNet-LT / iNaturalist
    backbone; its checkpoints load as they are. K = 2048."""
    return _build([3, 4, 6, 3], num_classes, pretrained, groups=32, width_per_group=4)


def resnet152(num_classes: int, pretrained=None) -> FeatResNet:
    """torchvision ResNet-152 (random init unless `pretrained` is a local file); K = 2048."""
    return _build([3, 8, 36, 3], num_classes, pretrained)
