"""Classifiers of other libraries by name, for ``--model torchvision:NAME`` and
``--model timm:NAME``: randomly initialised with the run's class count and wrapped by
with_features, so that they return (features, logits) and have feat_dim like rdr_fast's
own models. Weights come only from a local file (``--pretrained``, load_pretrained).

torchvision's classification models take 3-channel images; timm's take any channel count
(its ``in_chans``). timm is an optional extra: ``pip install "rdr_fast[timm]"``.
"""
from __future__ import annotations

import difflib

import torchvision

from .wrap import WithFeatures, with_features

LIBRARIES = ("torchvision", "timm")
TIMM_INSTALL = 'pip install "rdr_fast[timm]"'

# googlenet and inception_v3 train auxiliary classifiers whose logits their training forward
# returns beside the main ones; RDR trains the main head alone. init_weights=True keeps
# their historical initialisation without the warning that its default will change.
TORCHVISION_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                       "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_external(name: str) -> bool:
    return name.partition(":")[0] in LIBRARIES and ":" in name


def _close_matches(name: str, names) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; close matches: {', '.join(close)}" if close else ""


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def name_problem(name: str) -> str | None:
    """Why ``name`` (``torchvision:NAME`` or ``timm:NAME``) names no classifier that can be
    built here, or None."""
    library, _, model_name = name.partition(":")
    if library == "torchvision":
        classifiers = torchvision.models.list_models(module=torchvision.models)
        if model_name in classifiers:
            return None
        if model_name in torchvision.models.list_models():
            return (f"torchvision's {model_name} is not a classification model (detection, segmentation, "
                    "video and optical flow models are not trained by class labels)")
        return f"torchvision has no classification model {model_name!r}{_close_matches(model_name, classifiers)}"
    timm = _timm()
    if timm is None:
        return f"timm is not installed: {TIMM_INSTALL}"
    if timm.is_model(model_name):
        return None
    return f"timm has no model {model_name!r}{_close_matches(model_name, timm.list_models())}"


def input_channels(name: str) -> int | None:
    """The channel count the model must be given, or None when it is built for any."""
    return 3 if name.startswith("torchvision:") else None


def build_external(name: str, num_classes: int, in_channels: int = 3) -> WithFeatures:
    """The classifier ``name`` names, randomly initialised with ``num_classes`` outputs,
    returning (features, logits). ValueError for an unknown name or a model whose head is
    not a final nn.Linear; ImportError when timm is needed and missing."""
    library, _, model_name = name.partition(":")
    if library == "timm" and _timm() is None:
        raise ImportError(name_problem(name))
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    if library == "torchvision":
        if in_channels != 3:
            raise ValueError(f"{name} takes 3 input channels, got in_channels={in_channels}")
        model = torchvision.models.get_model(model_name, num_classes=num_classes,
                                             **TORCHVISION_OPTIONS.get(model_name, {}))
    else:
        model = _timm().create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    try:
        return with_features(model)
    except ValueError:
        raise ValueError(f"{name} has no final nn.Linear classifier, whose input would be the features RDR "
                         f"weights ({type(model).__name__}'s head is another layer); choose another model") from None
