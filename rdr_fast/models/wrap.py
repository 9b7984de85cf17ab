"""with_features: any classifier whose head is a final nn.Linear, as a model whose forward
returns (features, logits) — what RDRLoss takes — from one forward pass."""
from __future__ import annotations

from torch import nn

# Where the common model libraries keep the classifier: torchvision's ResNet/ResNeXt/
# RegNet (`fc`), MobileNet/EfficientNet/ConvNeXt/VGG/DenseNet (`classifier`), ViT
# (`heads`), and timm models without get_classifier (`head`).
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")


def find_head(model: nn.Module) -> nn.Linear:
    """The final nn.Linear of ``model``: timm's ``get_classifier()``, else the attribute
    (or the last nn.Linear inside the attribute) named in HEAD_ATTRIBUTES."""
    candidates = []
    if callable(getattr(model, "get_classifier", None)):
        candidates.append(model.get_classifier())
    candidates += [getattr(model, name) for name in HEAD_ATTRIBUTES if isinstance(getattr(model, name, None), nn.Module)]
    for candidate in candidates:
        linears = [m for m in candidate.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1]
    raise ValueError(f"model: found no classifier head (an nn.Linear) in {type(model).__name__}'s "
                     f"get_classifier() or attributes {', '.join(HEAD_ATTRIBUTES)}; pass head=the final nn.Linear")


class WithFeatures(nn.Module):
    """``model`` returning (features, logits): features are the input of its final
    nn.Linear ``head`` (flattened to [B, feat_dim]), caught by a forward pre-hook during
    the model's own forward, so no layer runs twice. ``feat_dim`` and ``num_classes``
    come from the head; ``fc`` is the head, as for rdr_fast's own models (so the head's
    weights are in the state dict twice, under ``fc.`` and under ``model.`` + head_name)."""

    def __init__(self, model: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.model = model
        self.fc = head if head is not None else find_head(model)
        if not isinstance(self.fc, nn.Linear):
            raise TypeError(f"head must be an nn.Linear, got {type(self.fc).__name__}")
        if not any(m is self.fc for m in model.modules()):
            raise ValueError("head must be a module of model (the layer that computes the logits)")
        self.feat_dim, self.num_classes = self.fc.in_features, self.fc.out_features

    @property
    def head_name(self) -> str:
        """The head's name inside ``model`` (``fc``, ``classifier.3``, ``heads.head``): the
        prefix of its keys in the wrapped model's state dict."""
        return next(name for name, module in self.model.named_modules() if module is self.fc)

    def forward(self, x):
        caught = []
        handle = self.fc.register_forward_pre_hook(lambda _module, inputs: caught.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(caught) != 1:
            raise RuntimeError(f"the head ran {len(caught)} times in one forward pass; with_features needs it to "
                               "run once, on the features that give the logits")
        return caught[0].reshape(-1, self.feat_dim), logits


def with_features(model: nn.Module, head: nn.Linear | None = None) -> WithFeatures:
    """Wrap a classifier so that ``with_features(model)(x)`` returns ``(features, logits)``,
    the logits being exactly ``model(x)``'s. ``head``: the final nn.Linear, found by
    ``find_head`` when not given."""
    return WithFeatures(model, head)
