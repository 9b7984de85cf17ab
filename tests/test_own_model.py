"""Bringing one's own model and data: with_features on torchvision (and timm) classifiers,
and class_counts from labels or datasets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from rdr_fast.data import class_counts
from rdr_fast.models import find_head, with_features

# (builder, input shape): small inputs where the architecture allows them.
TORCHVISION = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=7), (2, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=7), (2, 3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=7), (2, 3, 32, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=7, image_size=32), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", TORCHVISION)
def test_with_features_returns_the_models_own_logits_and_the_heads_input(name):
    build, shape = TORCHVISION[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    wrapped = with_features(model)
    with torch.no_grad():
        features, logits = wrapped(x)
        expected = model(x)
    assert torch.equal(logits, expected)
    assert features.shape == (shape[0], wrapped.feat_dim) and wrapped.num_classes == 7
    torch.testing.assert_close(wrapped.fc(features), logits)  # the features are what the head reads


def test_timm_models_are_wrapped_through_get_classifier():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = with_features(model)(x)
        assert torch.equal(logits, model(x))
    assert features.shape[1] == model.get_classifier().in_features


def test_the_features_carry_gradient_to_the_backbone():
    model = torchvision.models.resnet18(num_classes=3)
    features, logits = with_features(model)(torch.randn(2, 3, 32, 32))
    features.sum().backward()
    assert model.conv1.weight.grad is not None and model.fc.weight.grad is None


def test_a_model_without_a_findable_head_is_refused_by_name():
    with pytest.raises(ValueError, match="found no classifier head .* in Sequential"):
        find_head(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="head must be a module of model"):
        with_features(torchvision.models.resnet18(num_classes=3), head=torch.nn.Linear(512, 3))


def test_the_package_offers_both_at_the_top_level():
    import rdr_fast

    assert rdr_fast.with_features is with_features and rdr_fast.class_counts is class_counts
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        rdr_fast.nothing


def test_class_counts_from_labels_of_any_kind_and_from_datasets():
    labels = [0, 2, 2, 1, 2, 0]
    for given in (labels, np.array(labels), torch.tensor(labels, dtype=torch.int32)):
        assert class_counts(given) == [2, 1, 3]
    assert class_counts(labels, num_classes=5) == [2, 1, 3, 0, 0]
    dataset = torch.utils.data.TensorDataset(torch.zeros(6, 2), torch.tensor(labels))
    assert class_counts(dataset) == [2, 1, 3]  # items (x, label)

    class WithTargets(torch.utils.data.Dataset):
        targets = labels

        def __len__(self):
            raise AssertionError("the targets attribute is read, the items are not")
    assert class_counts(WithTargets()) == [2, 1, 3]


@pytest.mark.parametrize("given,kwargs,error,message", [
    ([0.5, 1.0], {}, TypeError, "1-D sequence of integer labels"),
    ([[0, 1], [1, 0]], {}, TypeError, "1-D sequence of integer labels"),
    ([0, -1], {}, ValueError, "labels must be >= 0"),
    ([0, 3], {"num_classes": 3}, ValueError, "num_classes must be an integer above the largest label"),
    (["a", "b"], {}, TypeError, "integer labels"),
])
def test_class_counts_refuses_what_are_not_labels(given, kwargs, error, message):
    with pytest.raises(error, match=message):
        class_counts(given, **kwargs)


@pytest.mark.slow
def test_the_own_model_example_runs_and_learns():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    accuracies = [float(a) for a in last.split("(head to tail)")[1].split()]
    assert last.startswith("epoch 4:") and sum(accuracies) / len(accuracies) > 0.5, done.stdout  # chance is 0.2
