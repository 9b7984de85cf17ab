"""Checks of the training CLI's configuration, all run before any work starts.

`check_values` takes each flag on its own (type, choice, range; NaN and ±inf are refused
everywhere) and runs before the dataset-dependent defaults are filled in; `check_setup`
takes the resolved run against its dataset, the files it names and this machine. Both
raise UsageError with a message that names the flag; `python -m rdr_fast.train` prints
it as one `error:` line and exits with status 2, as argparse does for its own errors.

Adding a check: a flag's range is one entry in RANGES; a check across flags or against
the machine is a function returning the problem (or None), listed in SETUP_CHECKS.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import shutil
import tempfile
import warnings

import torch

from .data.datasets import BASIC_AUGMENT_ONLY, FILE_LISTS, GRAYSCALE, IMAGE_SIZES
from .run_io import CHECKPOINT, RUN_FILES, safetensors_available


class UsageError(ValueError):
    """A flag value, or a combination of flags, that no run can use."""


class UsageParser(argparse.ArgumentParser):
    """argparse whose own refusals (unknown flag, value of the wrong type) are UsageErrors,
    so that every bad flag of every command is reported the same way."""

    def error(self, message):
        raise UsageError(message)


def at_least(low):
    return (lambda v: v >= low), f">= {low}"


def within(low, high, *, low_open=False, high_open=False):
    def fits(v):
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    return fits, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


# Every numeric flag's valid values (None, where a flag allows it, means "the default").
# Upper bounds sit far above any published setting: beyond them a run cannot be expected
# to train (float32 overflow, a degenerate loss) and would show it only as a NaN, or a
# model that learns nothing, after hours of work.
RANGES = {
    "imb_factor": at_least(1),
    "noise_ratio": within(0, 1, high_open=True),
    "rdr_momentum": within(0, 1, high_open=True),
    # w = (r·N/n_y)^γ: at γ = 10 a class factor of 500 (CIFAR-LT, IF 500) alone is 1e27,
    # near float32's 3.4e38, and each batch's weight sits on its single largest sample.
    "temperature": within(0, 10),
    "warmup_epochs": at_least(0),
    "lr_warmup_epochs": at_least(0),
    "lr_milestones": at_least(0),               # each of the two; their order and --epochs: _lr_schedule_fits
    "tau": within(-10, 10),                     # τ·log prior beyond ±10 drowns the logits (LA uses τ = 1)
    "focal_gamma": within(0, 10),               # (1 - p)^γ: beyond 10 every fairly learned sample's loss is ~0
    "cb_beta": within(0, 1, high_open=True),
    "epochs": at_least(1),
    "batch_size": at_least(1),
    # The recipes' peak lr is 0.05-0.2; SGD steps 50x larger overshoot into a non-finite loss.
    "lr": within(0, 10, low_open=True),
    "momentum": within(0, 1, high_open=True),
    # A decay of lr·wd per step: wd > 1 shrinks the weights to 0 within tens of steps at any useful lr.
    "weight_decay": within(0, 1),
    "rho": within(0, 10),                       # SAM's radius; published ones reach 2 (ASAM)
    "sam_k": at_least(1),
    "sam_alpha": within(0, 10),                 # LookSAM's gradient mix; the paper's is 0.7
    "tail_threshold": at_least(0),
    "flat_ratio": within(0, 1),
    "seed": within(0, 2**32 - 1),                 # NumPy's legacy seeding takes 32 bits
    "eval_every": at_least(1),
    "num_workers": at_least(0),
    "stop_after": at_least(1),
    "image_size": within(8, 1024),              # crops; ImageNet recipes use 224, CIFAR-like sets 32
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(annotation: str) -> tuple[str, int]:
    """(type of each value, number of values) of a Config field's annotation: ("float", 1)
    for "float | None", ("int", 2) for "tuple[int, int] | None"."""
    base = annotation.split(" | ")[0]
    if base.startswith("tuple["):
        items = base[len("tuple["):-1].split(", ")
        return items[0], len(items)
    return base, 1


TYPE_TESTS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}


def _type_problem(name: str, value, kind: str) -> str | None:
    """Values from config.json bypass argparse, so their types are checked here too."""
    (base, count), optional = field_type(kind), kind.endswith("| None")
    if value is None:
        return None if optional else f"{flag(name)} needs a value"
    if count == 1:
        return None if TYPE_TESTS[base](value) else f"{flag(name)} must be {base}, got {value!r}"
    fits = isinstance(value, (list, tuple)) and len(value) == count and all(map(TYPE_TESTS[base], value))
    return None if fits else f"{flag(name)} must be {count} values of type {base}, got {value!r}"


def _value_problem(name: str, value, choices) -> str | None:
    if value is None:
        return None
    if callable(choices.get(name)):      # a function naming what is wrong with the value, or None
        problem = choices[name](value)
        return f"{flag(name)} {value}: {problem}" if problem else None
    if name in choices and value not in choices[name]:
        return f"{flag(name)} must be one of {', '.join(choices[name])}, got {value!r}"
    if name not in RANGES:
        return None
    fits, wanted = RANGES[name]
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if not math.isfinite(v):
            return f"{flag(name)} must be a finite number, got {v}"
        if not fits(v):
            return f"{flag(name)} must be {wanted}, got {v}"
    return None


def check_values(cfg, choices: dict) -> None:
    """Each flag on its own: type, choice (choices: field -> the allowed values, or a function
    of the value returning its problem or None), range."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        problem = _type_problem(field.name, value, field.type) or _value_problem(field.name, value, choices)
        if problem:
            raise UsageError(problem)
    if cfg.resume and cfg.out and os.path.abspath(cfg.out) != os.path.abspath(cfg.resume):
        raise UsageError(f"--out {cfg.out} conflicts with --resume {cfg.resume}: a resumed run "
                         "writes into its own folder")


# ----------------------------------------------------------------------------- setup checks

def _meta_model(cfg):
    """The run's model with 2 classes on the meta device: its shapes, no memory, no init."""
    from .models import build_model
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")     # a library's notes on its defaults, seen again at the real build
        return build_model(cfg.model, 2, 1 if cfg.dataset in GRAYSCALE else 3)


def _model_fits_dataset(cfg) -> str | None:
    """The model takes the dataset's channels, has a head with_features finds, and runs on
    two of the dataset's images (on the meta device, so shapes alone are computed)."""
    from .models import input_channels
    if input_channels(cfg.model) == 3 and cfg.dataset in GRAYSCALE:
        return (f"--model {cfg.model} takes 3-channel images but {cfg.dataset} is grayscale; use "
                "small_cnn, resnet32 or a timm: model, or a dataset of colour images")
    try:
        model = _meta_model(cfg)
    except NotImplementedError:   # built with data-dependent steps (torchvision's RegNets): checked at the build
        return None
    except ValueError as exc:     # no final nn.Linear to take the features from
        return f"--model {exc}"
    size = cfg.image_size if cfg.dataset in FILE_LISTS else IMAGE_SIZES.get(cfg.dataset)
    if size is None:
        return None
    try:
        model.train()(torch.empty(2, 1 if cfg.dataset in GRAYSCALE else 3, size, size, device="meta"))
    except NotImplementedError:   # an operator without shape rules: the first batch will tell
        return None
    except Exception as exc:  # noqa: BLE001  (each library words its shape errors its own way)
        return (f"--model {cfg.model} cannot take {cfg.dataset}'s {size}x{size} images "
                f"({' '.join(str(exc).split())[:200]})")
    return None


def _warmup_ends(cfg) -> str | None:
    if cfg.reweight != "none" and cfg.warmup_epochs >= cfg.epochs:
        return (f"--warmup-epochs {cfg.warmup_epochs:g} is not below --epochs {cfg.epochs}: "
                f"--reweight {cfg.reweight} would never weight a sample (the recipes' warm-up: "
                "5/200 of the epochs, official 160/200)")
    return None


def _lr_schedule_fits(cfg) -> str | None:
    """Milestones in order within the run, and an lr warm-up that ends before the first
    decay (step) or the run's end (cosine)."""
    if cfg.lr_schedule == "cosine":
        if cfg.lr_milestones is not None:
            return "--lr-milestones applies to --lr-schedule step only; the cosine schedule has none"
        end, what = cfg.epochs, f"--epochs {cfg.epochs}: the run would end within the warm-up"
    else:
        first, second = cfg.lr_milestones
        if not first <= second <= cfg.epochs:
            return (f"--lr-milestones {first} {second} must be in order (the first at most the second) "
                    f"and at most --epochs {cfg.epochs}")
        end, what = first, (f"the first of --lr-milestones ({first}): the learning rate would drop "
                            "before its warm-up reached the peak")
    if cfg.lr_warmup_epochs > 0 and cfg.lr_warmup_epochs >= end:
        return f"--lr-warmup-epochs {cfg.lr_warmup_epochs:g} is not below {what}"
    return None


def _profile_applies(cfg) -> str | None:
    if cfg.imb_type != "exp" and cfg.dataset in FILE_LISTS:
        return (f"--imb-type {cfg.imb_type} does not apply to {cfg.dataset}: its long tail is the one its "
                "list files give")
    return None


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Loader workers (torch processes, DALI threads) past a few per core add memory and
# start-up time, not speed; a count far beyond that is a typo, refused rather than capped
# so that the run does what its config.json says.
WORKERS_PER_CPU = 4


def _workers_fit(cfg) -> str | None:
    cpus = usable_cpus()
    if cfg.num_workers > WORKERS_PER_CPU * cpus:
        return (f"--num-workers {cfg.num_workers} is more than {WORKERS_PER_CPU} per CPU core "
                f"({WORKERS_PER_CPU * cpus} for the {cpus} this process may use)")
    return None


def _data_source(cfg) -> str | None:
    if cfg.dataset == "digits_lt" and (cfg.data_root or cfg.download):
        given = "--data-root" if cfg.data_root else "--download"
        return f"{given} does not apply to digits_lt (scikit-learn bundles it)"
    if cfg.dataset in FILE_LISTS and cfg.download:
        return (f"--download: {cfg.dataset} cannot be downloaded automatically; get the images "
                "(and list files), then pass --data-root DIR")
    if cfg.dataset in FILE_LISTS and not cfg.data_root:
        return f"--data-root is required for {cfg.dataset}: {DATA_ROOT_HOLDS.get(cfg.dataset, 'the folder with its list files')}"
    if cfg.data_root and not cfg.download and not os.path.isdir(cfg.data_root):
        return f"--data-root {cfg.data_root} is not an existing folder"
    if cfg.download:
        root = cfg.data_root or "data"     # where the CIFAR and Fashion-MNIST loaders download to
        problem = _unwritable(root)
        return f"--download into {root}: {problem}" if problem else None
    return None


DATA_ROOT_HOLDS = {"folder": "the folder with train/ and test/ (and optionally val/), one sub-folder per class",
                   "list": "the folder the paths in the list files are relative to"}
LIST_FLAGS = ("train_list", "test_list", "val_list")


def _own_data_flags(cfg) -> str | None:
    """The list files for --dataset list (and only there); image-file options only for image files."""
    given = [name for name in LIST_FLAGS if getattr(cfg, name)]
    if cfg.dataset != "list" and given:
        return f"{flag(given[0])} applies to --dataset list only (got --dataset {cfg.dataset})"
    if cfg.dataset == "list":
        for name in LIST_FLAGS[:2]:
            if not getattr(cfg, name):
                return f"{flag(name)} FILE is required for --dataset list (lines 'relative/path label')"
        for name in given:
            if not os.path.isfile(getattr(cfg, name)):
                return f"{flag(name)} {getattr(cfg, name)} is not an existing file"
    if cfg.dataset not in FILE_LISTS:
        for name, value in (("image_size", cfg.image_size), ("skip_bad_images", cfg.skip_bad_images)):
            if value:
                return f"{flag(name)} applies to image-file datasets ({', '.join(FILE_LISTS)}), not {cfg.dataset}"
    return None


def _loader_fits(cfg) -> str | None:
    """gpu serves in-memory datasets on any device, dali any dataset on cpu or cuda."""
    if cfg.loader == "gpu" and cfg.dataset in FILE_LISTS:
        return f"--loader gpu needs an in-memory dataset; {cfg.dataset} reads image files: use dali or torch"
    if cfg.loader == "gpu" and cfg.num_workers:
        return (f"--num-workers {cfg.num_workers} with --loader gpu: the gpu loader has no workers "
                "(it augments on the device); drop --num-workers or use --loader torch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.loader == "dali" and cfg.dataset in FILE_LISTS and cfg.batch_size % world:
        return (f"--batch-size {cfg.batch_size} with --loader dali on {world} processes: DALI's file "
                f"reader needs a global batch divisible by the number of processes")
    if cfg.loader == "dali":
        from .data.dali_loader import dali_available
        if not dali_available():
            return '--loader dali needs NVIDIA DALI: pip install "rdr_fast[dali]", or use --loader torch'
    return None


def _augment_fits(cfg) -> str | None:
    """AutoAugment needs 8-bit images with a basic augmentation, and DALI's takes RGB only."""
    if cfg.augment in (None, "basic"):
        return None
    if cfg.dataset in BASIC_AUGMENT_ONLY:
        return (f"--augment {cfg.augment}: {cfg.dataset}'s 8x8 images (values 0..16) have no train "
                "augmentation to build on; use --augment basic")
    if cfg.loader == "dali" and cfg.dataset in GRAYSCALE:
        return (f"--augment {cfg.augment} with --loader dali: DALI's AutoAugment takes RGB images "
                f"and {cfg.dataset} is grayscale; use --loader gpu or torch")
    return None


def _device_exists(cfg) -> str | None:
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {cfg.device}: this machine has no usable CUDA device; use --device cpu"
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        return f"--device {cfg.device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def _precision_supported(cfg) -> str | None:
    if cfg.amp and cfg.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return f"--amp: --device {cfg.device} has no bfloat16 support (autocast runs in bf16); use --no-amp"
    return None


def _compile_possible(cfg) -> str | None:
    """What inductor needs before its first compile: Triton on CUDA, a C++ compiler on CPU.
    A compile that fails anyway is a run failure at the first step (train.RUN_FAILURES)."""
    if not cfg.compile:
        return None
    if cfg.device.startswith("cuda") and importlib.util.find_spec("triton") is None:
        return "--compile on CUDA needs Triton (pip install triton), or drop --compile"
    if cfg.device == "cpu":
        from torch._inductor import config as inductor_config
        compiler = inductor_config.cpp.cxx[-1]           # $CXX, else g++
        if shutil.which(compiler) is None:
            return f"--compile on the CPU needs a C++ compiler; {compiler} is not on PATH (set CXX), or drop --compile"
    return None


def _pretrained_fits(cfg) -> str | None:
    """The file loads without running code, holds a state dict, and fits the backbone:
    load_pretrained itself, into a copy of the model on the meta device (no memory, no
    init). The classifier may be of another shape (it is skipped), so any class count does."""
    if not cfg.pretrained:
        return None
    if not os.path.isfile(cfg.pretrained):
        return f"--pretrained {cfg.pretrained} is not an existing file"
    if os.path.getsize(cfg.pretrained) == 0:
        return f"--pretrained {cfg.pretrained} is an empty file"
    from .models import load_pretrained
    try:
        model = _meta_model(cfg)
    except NotImplementedError:   # see _model_fits_dataset: the file is checked when the model is built
        return None
    try:
        with warnings.catch_warnings():   # copying into meta tensors is the no-op we want
            warnings.simplefilter("ignore", UserWarning)
            load_pretrained(model, cfg.pretrained)
    except ValueError as exc:
        unreadable = exc.__context__       # torch.load's own error, many lines long
        if unreadable is not None:
            return (f"--pretrained {cfg.pretrained} cannot be read by torch.load(weights_only=True) "
                    f"({type(unreadable).__name__}): give a state dict saved with torch.save")
        return f"--pretrained {exc}"
    return None


def _logger_available(cfg) -> str | None:
    from .loggers import missing_package
    problem = missing_package(cfg.logger)
    return f"--logger {cfg.logger} {problem}" if problem else None


def _files_exist(cfg) -> str | None:
    # Without a checkpoint (stopped before its first epoch ended) --resume starts the run
    # over from its config.json; only exporting needs one.
    if cfg.resume and cfg.export and not os.path.isfile(os.path.join(cfg.resume, CHECKPOINT)):
        return (f"--resume {cfg.resume} --export: no {CHECKPOINT} there (the run stopped before its "
                "first epoch ended), so there is no model to export")
    return None


def _unwritable(path: str) -> str | None:
    """Why files cannot be created in `path` or in the folders it would be made under."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    try:  # os.access trusts permission bits, which root ignores and a read-only mount overrides
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror})"
    return None


def _out_usable(cfg) -> str | None:
    if cfg.resume and cfg.export:
        return None  # exporting writes nothing into the run folder
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        return f"--out {cfg.out} is an existing file; give a folder"
    taken = not cfg.resume and any(os.path.exists(os.path.join(cfg.out, name))
                                   for name in ("config.json", CHECKPOINT))
    if taken:
        return f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out} or choose another folder"
    problem = _unwritable(cfg.out)
    return f"--out {cfg.out}: {problem}" if problem else None


def _export_usable(cfg) -> str | None:
    if not cfg.export:
        return None
    if os.path.isdir(cfg.export):
        return f"--export {cfg.export} is a folder; give a file name"
    if (os.path.dirname(os.path.abspath(cfg.export)) == os.path.abspath(cfg.out)
            and os.path.basename(cfg.export) in RUN_FILES):
        return f"--export {cfg.export} would overwrite the run's own {os.path.basename(cfg.export)}"
    folder = os.path.dirname(os.path.abspath(cfg.export))
    if not os.path.isdir(folder):
        return f"--export {cfg.export}: the folder {folder} does not exist"
    if cfg.export.endswith(".safetensors") and not safetensors_available():
        return f"--export {cfg.export}: writing safetensors needs the safetensors package (pip install safetensors)"
    problem = _unwritable(folder)
    return f"--export {cfg.export}: {problem}" if problem else None


SETUP_CHECKS = (_model_fits_dataset, _warmup_ends, _lr_schedule_fits, _profile_applies, _workers_fit, _own_data_flags,
                _data_source, _loader_fits, _device_exists, _precision_supported, _compile_possible,
                _pretrained_fits, _logger_available, _files_exist, _out_usable, _export_usable, _augment_fits)


def check_setup(cfg) -> None:
    """The resolved run against its dataset, the files it names and this machine."""
    for check in SETUP_CHECKS:
        problem = check(cfg)
        if problem:
            raise UsageError(problem)
