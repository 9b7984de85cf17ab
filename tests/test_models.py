"""rdr_fast.models: shapes, sizes, init, and local-file pretrained loading."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn as nn
import torchvision

from rdr_fast.models import (MODELS, build_model, default_model, load_pretrained, resnet10,
                             resnet32, resnet50, resnet152, resnext50, small_cnn)
from rdr_fast.models._resnet_cifar import PadShortcut


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _count(m, kind):
    return sum(isinstance(x, kind) for x in m.modules())


def test_resnet32_matches_ldam_architecture():
    m = resnet32(10)
    assert _params(m) == 464_154 and _params(resnet32(100)) == 470_004   # LDAM's sizes
    assert _count(m, nn.Conv2d) == 31 and _count(m, nn.Linear) == 1       # 32 layers
    assert _count(m, nn.BatchNorm2d) == 31 and m.feat_dim == 64
    assert all(not c.bias for c in m.modules() if isinstance(c, nn.Conv2d))
    shortcuts = [x for x in m.modules() if isinstance(x, PadShortcut)]
    assert [s.pad for s in shortcuts] == [8, 16]                           # 16->32, 32->64
    feats, logits = m(torch.randn(4, 3, 32, 32))
    assert feats.shape == (4, 64) and logits.shape == (4, 10)
    assert (feats >= 0).all()                       # pooled after ReLU
    pickle.loads(pickle.dumps(m))                   # no lambdas inside


def test_resnet32_kaiming_init_and_channels():
    torch.manual_seed(0)
    m = resnet32(100, in_channels=1)
    w = m.layer3[4].conv2.weight                    # 64x64x3x3, fan_in 576
    assert abs(w.std().item() / math.sqrt(2 / 576) - 1) < 0.05
    assert abs(m.fc.weight.std().item() / math.sqrt(2 / 64) - 1) < 0.1
    feats, logits = m(torch.randn(2, 1, 32, 32))
    assert feats.shape == (2, 64) and logits.shape == (2, 100)


def test_pad_shortcut():
    x = torch.randn(2, 16, 32, 32)
    y = PadShortcut(8)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()


@pytest.mark.parametrize("size", [8, 28])
def test_small_cnn(size):
    m = small_cnn(10, in_channels=1)
    feats, logits = m(torch.randn(5, 1, size, size))
    assert feats.shape == (5, 64) and logits.shape == (5, 10) and m.feat_dim == 64
    logits.sum().backward()
    assert m.fc.weight.grad is not None
    assert _params(m) < 100_000


@pytest.mark.parametrize("builder,feat_dim", [(resnet10, 512), (resnet50, 2048), (resnet152, 2048)])
def test_imagenet_resnets_small_input(builder, feat_dim):
    m = builder(7).eval()
    with torch.no_grad():
        feats, logits = m(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, feat_dim) and logits.shape == (1, 7) and m.feat_dim == feat_dim
    torch.testing.assert_close(m.fc(feats), logits)        # the features are the head's input


@pytest.mark.parametrize("ours,theirs", [(resnet50, torchvision.models.resnet50),
                                         (resnext50, torchvision.models.resnext50_32x4d)])
def test_imagenet_resnet_keys_match_torchvision(ours, theirs):
    with torch.device("meta"):   # shapes only
        model, ref = ours(1000), theirs(weights=None).state_dict()
        feats, logits = model(torch.empty(2, 3, 64, 64))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    assert feats.shape == (2, 2048) == (2, model.feat_dim) and logits.shape == (2, 1000)


def test_resnet10_is_one_basic_block_per_stage():
    m = resnet10(1000)
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert all(isinstance(getattr(m, f"layer{i}")[0], torchvision.models.resnet.BasicBlock) for i in range(1, 5))
    assert _count(m, nn.Conv2d) == 1 + 4 * 2 + 3 and _count(m, nn.Linear) == 1   # stem, blocks, 3 downsamplings
    r18 = torchvision.models.resnet18(num_classes=1000)  # ResNet-18 is two BasicBlocks per stage
    assert _params(m) == _params(r18) - sum(_params(getattr(r18, f"layer{i}")[1]) for i in range(1, 5))
    assert m.layer2[0].conv1.groups == 1 and resnext50(3).layer2[0].conv2.groups == 32


def test_pretrained_from_local_file(tmp_path):
    ref = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pth"
    torch.save(ref.state_dict(), path)
    m = resnet50(5, pretrained=str(path))
    assert torch.equal(m.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.layer4[2].bn3.running_var, ref.layer4[2].bn3.running_var)
    assert m.fc.weight.shape == (5, 2048)
    assert sorted(m.pretrained_report["skipped"]) == ["fc.bias", "fc.weight"]
    same = build_model("resnet50", 1000, pretrained=path)   # same shape: fc loaded too
    assert torch.equal(same.fc.weight, ref.fc.weight) and not same.pretrained_report["skipped"]


def test_pretrained_wrapped_and_prefixed(tmp_path):
    src = small_cnn(3)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    m = build_model("small_cnn", 10, in_channels=1, pretrained=str(path))
    assert torch.equal(m.body[0].weight, src.body[0].weight)
    assert m.fc.weight.shape == (10, 64)


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        resnet152(365, pretrained=str(tmp_path / "no_such.pth"))
    path = tmp_path / "wrong.pt"
    torch.save(resnet32(10).state_dict(), path)
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(small_cnn(10, in_channels=3), str(path))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        load_pretrained(small_cnn(10), str(tmp_path / "junk.pt"))


def test_build_model_and_defaults():
    assert set(MODELS) == {"resnet10", "resnet32", "resnet50", "resnext50", "resnet152", "small_cnn"}
    m = build_model("resnet32", 10)
    assert m.feat_dim == 64 and m(torch.randn(1, 3, 32, 32))[1].shape == (1, 10)
    assert build_model("small_cnn", 4, in_channels=1).feat_dim == 64
    with pytest.raises(ValueError, match="resnet32"):
        build_model("vgg16", 10)
    for rgb in ("resnet10", "resnet50", "resnext50", "resnet152"):
        with pytest.raises(ValueError, match="in_channels"):
            build_model(rgb, 10, in_channels=1)
    expected = {"cifar10_lt": "resnet32", "cifar100_lt": "resnet32", "imagenet_lt": "resnet50",
                "places_lt": "resnet152", "digits_lt": "small_cnn", "fmnist_lt": "small_cnn"}
    assert {d: default_model(d) for d in expected} == expected
    with pytest.raises(ValueError):
        default_model("mnist")
