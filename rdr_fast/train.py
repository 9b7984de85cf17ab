"""Train a long-tailed classifier with RDR: `python -m rdr_fast.train [--flags]`.

With no flags: digits_lt (scikit-learn's bundled digits, long-tailed, IF 100), a small
CNN, CE + RDR, the protocol of the paper's text otherwise (`--recipe paper`: SGD 0.9, wd
2e-4, lr 0.1 cosine, batch 128, 200 epochs, RDR warm-up over the first 5/200 of training)
— about 40 s on 2 CPU cores. `--recipe official` is the protocol of the authors' released
code instead (step schedule with lr warm-up, wd 1e-4, RDR deferred to epoch 160 of 200);
flags given override the recipe's settings (rdr_fast.recipes, docs/recipes.md).
Each epoch: train, evaluate every `--eval-every` epochs and at the end (overall / Many /
Medium / Few / per class, a metrics.csv row), replace the checkpoint atomically; the
plots are drawn when the run ends. `--resume DIR` continues a
run exactly where its last completed epoch left it (however it stopped, kill -9
included; from the start if no epoch was completed); `--export FILE` writes the model's
weights alone for sharing (with `--resume DIR`: only that, no training). `--config FILE`
gives any flag's value from a JSON or YAML file (the flags given override it); `--logger
tensorboard|wandb` sends each evaluated epoch's metrics to a tracker as well.

Every flag is checked before any work starts (rdr_fast.cli_checks), and the dataset is
loaded (every listed image checked) before anything is written: a bad flag or unusable
data is refused with one `error:` line and exit status 2. A run that fails on its way (an
image damaged past its header, an unreadable checkpoint, a full disk, a non-finite loss)
stops with one `error:` line and exit status 1; set RDR_FAST_DEBUG=1 to get the
traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import RDRLoss, cli_checks, distributed, loggers, recipes, run_io
from .cli_checks import UsageError, UsageParser
from .config_file import read_config_file, read_config_json
from .data import BASIC_AUGMENT_ONLY, DATASETS, IMB_TYPES, LOADERS, DataNotFoundError, load_dataset, make_loaders, set_epoch
from .data.datasets import FILE_LISTS
from .metrics import Evaluation, count_splits
from .models import build_model, default_model, model_problem
from .sam import VARIANTS, make_optimizer
from .training import train_step


@dataclass(frozen=True)
class Config:
    dataset: str = "digits_lt"        # one of rdr_fast.data.DATASETS
    data_root: str | None = None      # folder with the dataset files
    download: bool = False            # fetch CIFAR / Fashion-MNIST through torchvision
    train_list: str | None = None     # --dataset list: the list files ("relative/path label" lines)
    test_list: str | None = None
    val_list: str | None = None       # optional: the validation split best.pt is selected on
    image_size: int | None = None     # image-file datasets: crop size, default 224
    skip_bad_images: bool = False     # image-file datasets: leave out unreadable images instead of refusing
    imb_factor: float = 100.0         # n_max / n_min (CIFAR-LT: 10/100/200/500)
    imb_type: str = "exp"             # exp | step: LDAM-DRW's long-tail profiles (not the image-file datasets)
    noise_ratio: float = 0.0          # symmetric label noise after the LT subset (paper: 0.05)
    model: str | None = None          # default: the paper's backbone for the dataset
    pretrained: str | None = None     # local state_dict file for the backbone
    loss: str = "ce"                  # ce | focal | la
    reweight: str = "rdr"             # none | inv_freq | cb | rdr
    rdr_momentum: float = 0.9         # μ of the prototype update
    temperature: float = 1.0          # γ of the weights
    recipe: str = "paper"             # paper | official: fills the settings left None (rdr_fast.recipes.RECIPES)
    warmup_epochs: float | None = None  # RDR: w ≡ 1 for these epochs; default the recipe's (epochs·5/200, official ·160/200)
    tau: float = 1.0                  # LA's τ
    focal_gamma: float = 1.0          # focal's γ
    cb_beta: float = 0.9999           # CB's β
    epochs: int = 200
    batch_size: int | None = None     # default 128, 256 for imagenet_lt / places_lt / inat2018
    lr: float = 0.1                   # peak learning rate
    lr_schedule: str | None = None    # cosine | step, per epoch; default the recipe's
    lr_warmup_epochs: float | None = None  # linear lr warm-up; default the recipe's (0, official epochs·5/200)
    lr_milestones: tuple[int, int] | None = None  # step: lr x0.01 from the first, x0.0001 from the second; default epochs·160/200, ·180/200
    momentum: float = 0.9             # SGD momentum
    weight_decay: float | None = None  # default the recipe's (2e-4, official 1e-4)
    augment: str | None = None        # basic | autoaug | autoaug_cutout; default: the recipe's
    sam: str = "none"                 # none | sam | asam | imbsam | ccsam | sam_k | looksam (rdr_fast.sam)
    rho: float | None = None          # SAM radius; default per variant (rdr_fast.sam.DEFAULT_RHO)
    sam_k: int = 5                    # sam_k / looksam: a full SAM step every k steps
    sam_alpha: float = 0.7            # looksam's α
    tail_threshold: float = 20        # imbsam: classes with fewer training samples are the tail
    flat_ratio: float = 0.5           # ccsam: weight of the perturbed-classifier loss
    sam_freeze_bn: bool = True        # freeze BatchNorm running statistics in SAM's second pass
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: bool | None = None           # bf16 autocast; default on for CUDA
    compile: bool = False             # torch.compile the model
    eval_every: int = 1               # evaluate every N epochs (and always at the end)
    num_workers: int = 0
    loader: str = "auto"              # auto | torch | dali | gpu (rdr_fast.data.make_loaders)
    out: str | None = None            # default runs/<dataset>-<method>-<timestamp>
    resume: str | None = None         # run folder to continue
    stop_after: int | None = None     # stop after this many epochs of this invocation (resume later)
    export: str | None = None         # write the model's weights here when this invocation ends
    logger: str = "none"              # none | tensorboard | wandb (rdr_fast.loggers), beside metrics.csv
    quiet: bool = False


# A field's allowed values, or a function of the value returning what is wrong with it (or None).
CHOICES = {"dataset": DATASETS, "imb_type": IMB_TYPES, "model": model_problem, "loss": ("ce", "focal", "la"),
           "reweight": ("none", "inv_freq", "cb", "rdr"), "recipe": tuple(recipes.RECIPES),
           "lr_schedule": recipes.LR_SCHEDULES, "augment": ("basic", "autoaug", "autoaug_cutout"),
           "loader": LOADERS, "sam": VARIANTS, "logger": loggers.LOGGERS}
# What a checkpoint must agree on to be resumed by this configuration (the lr schedule's
# fields too: its scheduler's saved state fits no other schedule).
IDENTITY_FIELDS = ("dataset", "imb_factor", "imb_type", "noise_ratio", "model", "loss", "reweight", "epochs", "seed",
                   "sam", "recipe", "lr_schedule", "lr_warmup_epochs", "lr_milestones", "image_size")


def _parser() -> argparse.ArgumentParser:
    """One flag per Config field; a flag not given is absent from the namespace."""
    parser = UsageParser(prog="python -m rdr_fast.train", description=__doc__.split("\n")[0],
                     epilog="Exit status 2: a bad flag; 1: the run failed (RDR_FAST_DEBUG=1 shows why "
                            "with a traceback). See docs/reliability.md.",
                     argument_default=argparse.SUPPRESS)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind, count = cli_checks.field_type(field.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
            continue
        choices = CHOICES.get(field.name)
        parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str),
                            choices=None if callable(choices) else choices, **({"nargs": count} if count > 1 else {}))
    parser.add_argument("--config", metavar="FILE", help="settings for any of these flags, JSON or YAML "
                        "(rdr_fast.config_file); flags override them")
    return parser


def parse_args(argv=None) -> Config:
    """The settings in layers, each over the ones before it: Config's defaults, DIR/config.json
    with --resume DIR (so that `--resume DIR` alone continues the run as it was configured),
    the values of --config FILE, the flags given. What is still None after them resolve()
    fills: the recipe's settings, then the dataset's and the machine's defaults. UsageError
    for a flag argparse refuses, an unreadable or bad --config file or an unreadable
    config.json; the other values are checked by configure()."""
    explicit = vars(_parser().parse_args(argv))
    config_file = explicit.pop("config", None)
    if config_file is not None:   # the file's values count as given, under the flags
        explicit = {**_config_file_values(config_file), **explicit}
    saved = {}
    if explicit.get("resume"):
        fields = {f.name for f in dataclasses.fields(Config)}
        saved = {k: v for k, v in _saved_config(explicit["resume"]).items() if k in fields}
        # Where to stop and what to export belong to each invocation; the run lives where it is now.
        saved.update(stop_after=None, export=None, out=None)
    return Config(**{**saved, **explicit})


def _config_file_values(path: str) -> dict:
    """The --config file's settings, each checked as its flag would be (UsageError naming the file)."""
    values = read_config_file(path, [f.name for f in dataclasses.fields(Config)])
    try:
        cli_checks.check_values(Config(**values), CHOICES)
    except UsageError as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    return values


def _saved_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {folder}: {path} does not exist (is it a run folder?)")
    return read_config_json(path, context=f"--resume {folder}: ")


def configure(argv=None) -> Config:
    """The run's resolved configuration, every flag checked against its range, the
    dataset, the files it names and this machine before any work starts; UsageError
    names the first bad flag."""
    cfg = parse_args(argv)
    cli_checks.check_values(cfg, CHOICES)
    cfg = resolve(cfg)
    cli_checks.check_setup(cfg)
    return cfg


def method_name(cfg: Config) -> str:
    name = cfg.loss if cfg.reweight == "none" else f"{cfg.reweight}+{cfg.loss}"
    return name if cfg.sam == "none" else f"{name}+{cfg.sam}"


def resolve(cfg: Config) -> Config:
    """Fill the settings left None: the recipe's (rdr_fast.recipes; a resumed run's saved
    config left none), the step schedule's milestones, then the dataset-dependent and
    machine-dependent defaults."""
    preset = {name: value for name, value in recipes.recipe_settings(cfg.recipe, cfg.epochs).items()
              if getattr(cfg, name) is None}
    if "augment" in preset and cfg.dataset in BASIC_AUGMENT_ONLY:
        preset["augment"] = "basic"   # the recipe's AutoAugment needs 8-bit images to work on
    cfg = dataclasses.replace(cfg, **preset)
    milestones = cfg.lr_milestones
    if cfg.lr_schedule == "step":  # a list when read back from config.json
        milestones = recipes.step_milestones(cfg.epochs) if milestones is None else tuple(milestones)
    batch = cfg.batch_size if cfg.batch_size is not None else (
        256 if cfg.dataset in ("imagenet_lt", "places_lt", "inat2018") else 128)
    out = cfg.resume or cfg.out or os.path.join(
        "runs", f"{cfg.dataset}-{method_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}")
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    image_size = cfg.image_size or (224 if cfg.dataset in FILE_LISTS else None)
    return dataclasses.replace(
        cfg, model=cfg.model or default_model(cfg.dataset, image_size), batch_size=batch, out=out, device=device,
        image_size=image_size, amp=device.startswith("cuda") if cfg.amp is None else cfg.amp,
        lr_milestones=milestones)


def build(cfg: Config, ds, ctx=distributed.DistContext()):
    """(model, forward, criterion, optimizer, scheduler); `forward` is what the loop calls
    (the model, or its DDP / compiled wrapper), `model` what checkpoints save."""
    model = build_model(cfg.model, ds.num_classes, ds.in_channels, cfg.pretrained).to(cfg.device)
    forward = distributed.wrap_model(model, ctx, cfg.device) if ctx.enabled else model
    forward = torch.compile(forward) if cfg.compile else forward
    criterion = RDRLoss(ds.class_counts, model.feat_dim, base=cfg.loss, reweight=cfg.reweight,
                        momentum=cfg.rdr_momentum, temperature=cfg.temperature, tau=cfg.tau,
                        focal_gamma=cfg.focal_gamma, beta=cfg.cb_beta, validate=False).to(cfg.device)
    optimizer = make_optimizer(cfg.sam, model, ds.class_counts, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, rho=cfg.rho, k=cfg.sam_k, alpha=cfg.sam_alpha,
                               tail_threshold=cfg.tail_threshold, flat_ratio=cfg.flat_ratio,
                               freeze_bn=cfg.sam_freeze_bn)
    scheduler = recipes.lr_scheduler(optimizer, epochs=cfg.epochs, schedule=cfg.lr_schedule,
                                     warmup_epochs=cfg.lr_warmup_epochs, milestones=cfg.lr_milestones)
    return model, forward, criterion, optimizer, scheduler


def rdr_warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The RDR warm-up (w ≡ 1) in training steps: --warmup-epochs, rounded up."""
    return math.ceil(cfg.warmup_epochs * steps_per_epoch)


def train_epoch(cfg, epoch, model, forward, criterion, optimizer, loader, splits):
    """One pass over the training set. Returns (mean loss, mean weight per split)."""
    model.train()
    criterion.train()
    num_classes = criterion.num_classes
    weight_sum = torch.zeros(num_classes, device=cfg.device)
    seen_count = torch.zeros(num_classes, device=cfg.device)
    loss_sum, first_bad = torch.zeros((), device=cfg.device), torch.full((), -1, device=cfg.device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=cfg.quiet, leave=False, unit="batch")
    start, images = time.perf_counter(), 0
    for step, (x, y) in enumerate(bar):
        x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
        loss = train_step(optimizer, forward, criterion, x, y, amp=cfg.amp)  # SAM: both passes, one call
        # Bookkeeping stays on the device; it is read every 20 steps, not every step.
        loss_sum += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        weight_sum.index_add_(0, y, criterion.last_weights.float())
        seen_count.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
        images += len(y)
        if step % 20 == 0 or step == len(loader) - 1:
            if int(distributed.all_reduce_(first_bad.clone(), "max")) >= 0:  # every rank stops together
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {int(first_bad) + 1}; "
                                         f"the last good checkpoint in {cfg.out} is kept")
            bar.set_postfix(loss=f"{float(loss_sum) / (step + 1):.4f}",
                            img_s=f"{images / (time.perf_counter() - start):.0f}")
    for total in (weight_sum, seen_count, loss_sum):
        distributed.all_reduce_(total)
    means = {s: float(weight_sum[lo:hi].sum() / seen_count[lo:hi].sum().clamp_min(1)) for s, (lo, hi) in splits.items()}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return float(loss_sum) / max(1, len(loader) * world), means


@torch.no_grad()
def evaluate(cfg, model, loader, num_classes: int) -> Evaluation:
    """The sums behind every test metric (rdr_fast.metrics), over all ranks' slices."""
    model.eval()
    evaluation = Evaluation(num_classes, device=cfg.device)
    for x, y in loader:
        x, y = x.to(cfg.device), y.to(cfg.device)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            _, logits = model(x)
        evaluation.update(logits, y)
    return evaluation.all_reduce()  # each rank saw a disjoint slice of the test set


# Model selection: the epoch with the best top-1 on the validation split where the
# dataset has one (its metrics are the row's val_* columns), else on the test set (the
# field's protocol for CIFAR-LT, which has no validation split).
VAL_PREFIX = "val_"


def selected_on(ds) -> str:
    return "test" if ds.val is None else "val"


def best_row(history: list[dict]) -> dict:
    """The evaluated epoch with the highest top-1 on the selection split (the first of equals)."""
    key = VAL_PREFIX + "acc_all" if VAL_PREFIX + "acc_all" in history[0] else "acc_all"
    return max(history, key=lambda row: row[key])


def identity(cfg: Config, ds) -> dict:
    """What a checkpoint must agree on to be resumed: the settings of IDENTITY_FIELDS, the
    class counts, the classes (the original label of each index, the label map) and the
    split best.pt is selected on (a history with val columns cannot go on without them)."""
    classes = sorted(ds.label_map, key=ds.label_map.get)
    return {**{f: getattr(cfg, f) for f in IDENTITY_FIELDS}, "class_counts": [int(n) for n in ds.class_counts],
            "classes": classes, "selected_on": selected_on(ds)}


# What checkpoints written before these identity keys existed were: one recipe, torch's
# cosine schedule, the exponential profile, selection on the test set.
IMPLIED_IDENTITY = {"imb_type": "exp", "recipe": "paper", "lr_schedule": "cosine", "lr_warmup_epochs": 0,
                    "lr_milestones": None, "selected_on": "test"}


def load_run_dataset(cfg: Config):
    """The dataset `cfg` names, as the run (and every command reopening it) reads it."""
    return load_dataset(cfg.dataset, data_root=cfg.data_root, imb_factor=cfg.imb_factor, imb_type=cfg.imb_type,
                        noise_ratio=cfg.noise_ratio, seed=cfg.seed, download=cfg.download,
                        augment=cfg.augment or "basic", image_size=cfg.image_size or 224,
                        train_list=cfg.train_list, test_list=cfg.test_list, val_list=cfg.val_list,
                        skip_bad_images=cfg.skip_bad_images)


def restore(cfg, ds, ctx, model, criterion, optimizer, scheduler):
    """Load the run's checkpoint into the objects; returns (next epoch, metric history).
    Each rank takes its own saved RNG state; with another world size than the saved
    run's, RNGs are re-seeded from (seed, epoch, rank) instead."""
    state = run_io.load_checkpoint(cfg.out, identity(cfg, ds), implied=IMPLIED_IDENTITY)
    for obj, key in ((model, "model"), (criterion, "criterion"), (optimizer, "optimizer"),
                     (scheduler, "scheduler")):
        obj.load_state_dict(state[key])
    if len(state["rng"]) == ctx.world_size:
        run_io.set_rng_state(state["rng"][ctx.rank])
    else:
        torch.manual_seed(cfg.seed + 7919 * state["epoch"] + ctx.rank)
    return state["epoch"], state["history"]


def log_epoch(cfg, history, logger=loggers.Logger()) -> None:
    """metrics.csv with the new row, the row to --logger's tracker, and a line on the console."""
    row = history[-1]
    run_io.write_metrics(cfg.out, history)
    logger.log(row)
    if not cfg.quiet:
        val = f"  val top-1 {row[VAL_PREFIX + 'acc_all']:6.2f}" if VAL_PREFIX + "acc_all" in row else ""
        print(f"epoch {row['epoch']:>4}  loss {row['train_loss']:.4f}{val}  top-1 {row['acc_all']:6.2f}  "
              f"many {row['acc_index_many']:6.2f}  med {row['acc_index_medium']:6.2f}  "
              f"few {row['acc_index_few']:6.2f}  ECE {row['ece']:5.2f}")


def finish(cfg, ds, ctx, evaluation: Evaluation, history, logger=loggers.Logger()) -> None:
    """summary.json, confusion.csv/.png, reliability.png, the tracker's final metrics and the
    closing table, once the last epoch is done; ``evaluation`` is the last epoch's."""
    if not ctx.is_main:
        return
    logger.finish(history[-1])
    final = evaluation.compute(ds.class_counts, ds.splits)
    summary = {"final": {**history[-1], "per_class": final["per_class"]},
               "best": {**best_row(history), "selected_on": selected_on(ds)}, "class_counts": ds.class_counts,
               "splits": ds.splits, "count_splits": count_splits(ds.class_counts),
               "label_map": {str(k): v for k, v in ds.label_map.items()}, "method": method_name(cfg),
               "skipped_images": list(ds.skipped_images)}
    run_io.write_json(os.path.join(cfg.out, "summary.json"), summary)
    run_io.write_confusion(cfg.out, evaluation.confusion, ds.splits)
    run_io.plot_reliability(cfg.out, evaluation.calibration())
    best, on = best_row(history), selected_on(ds)
    prefix = VAL_PREFIX if on == "val" else ""
    print(f"\n{cfg.dataset} {method_name(cfg)} after {cfg.epochs} epochs ({cfg.out}); best {on} top-1 "
          f"{best[prefix + 'acc_all']:.2f} at epoch {best['epoch']} (best.pt, selected on the {on} set):\n"
          + run_io.summary_table(history[-1]))


class RunFailure(RuntimeError):
    """The run's inputs cannot be used (an unfit loader, a pretrained file for another model)."""


# A run stopped by its inputs or its machine, not by a bug: one `error:` line, exit status 1
# (and, with --compile, torch.compile failing on this machine: main() tells them apart).
RUN_FAILURES = (RunFailure, DataNotFoundError, run_io.CheckpointError, FloatingPointError, OSError,
                torch.cuda.OutOfMemoryError)


class Refused(SystemExit):
    """Exit status 2, as for argparse's refusals; str() is the message (already printed),
    so that callers of main() in-process can read it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def main(argv=None) -> dict:
    """The CLI: {"finished", "history", "out"} of the run. A bad flag prints one `error:`
    line on stderr and exits with status 2, a failure during the run one `error:` line
    with status 1 (RDR_FAST_DEBUG=1: the traceback instead)."""
    try:
        cfg = configure(argv)
    except UsageError as exc:
        raise _refused(exc) from None
    try:
        if cfg.resume and cfg.export:
            return export_run(cfg)
        try:  # data that cannot be used is refused like a bad flag: before anything is written
            ds = load_run_dataset(cfg)
        except DataNotFoundError as exc:
            raise _refused(exc) from None
        return run(cfg, ds)
    except Exception as exc:
        compile_failed = cfg.compile and _compile_failure(exc)
        if not (compile_failed or isinstance(exc, RUN_FAILURES)) or os.environ.get("RDR_FAST_DEBUG"):
            raise
        if compile_failed:
            raise SystemExit(f"error: --compile: torch.compile failed at the first step "
                             f"({_first_paragraph(exc)}); run without --compile") from None
        raise SystemExit(f"error: {_one_line(exc)}") from None


def _refused(exc: BaseException) -> Refused:
    """The refusal of a bad flag or unusable data: its `error:` line printed on stderr."""
    message = f"error: {_one_line(exc)}"
    print(message, file=sys.stderr)
    return Refused(message)


def _compile_failure(exc: BaseException) -> bool:
    """An error of torch.compile's (Dynamo's tracing, Inductor's code generation, its C++
    or Triton build). Their module is loaded once anything was compiled; importing it
    here would cost every run seconds."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(exc, dynamo.TorchDynamoException)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # not "[Errno 28] ..."
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(str(exc).split())


def _first_paragraph(exc: BaseException, limit: int = 300) -> str:
    """The cause at the head of a long message (compile errors go on with the command
    line, the generated code and hints)."""
    head = str(exc).strip().split("\n\n")[0]
    text = " ".join(head.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def export_run(cfg: Config) -> dict:
    """--resume RUN --export FILE: the model of the run's last completed epoch, finished
    or not, written to FILE; nothing is trained or written into the run."""
    state = run_io.load_checkpoint(cfg.out)
    kind = run_io.export_weights(state["model"], cfg.export)
    if not cfg.quiet:
        print(f"{cfg.out} after epoch {state['epoch']}/{cfg.epochs}: weights written to {cfg.export} ({kind})")
    return {"finished": state["epoch"] == cfg.epochs, "history": state["history"], "out": cfg.out}


def run(cfg: Config, ds=None) -> dict:
    """Train (or continue) the run `cfg` describes on `ds` (default: load_run_dataset);
    configure() has checked it."""
    ctx = distributed.init_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, device=distributed.device_for(ctx, cfg.device),
                              quiet=cfg.quiet or not ctx.is_main)
    torch.manual_seed(cfg.seed + ctx.rank)
    ds = load_run_dataset(cfg) if ds is None else ds
    try:
        train_loader, test_loader, val_loader = make_loaders(
            ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, loader=cfg.loader, device=cfg.device,
            shard_id=ctx.rank, num_shards=ctx.world_size, val=True)
        model, forward, criterion, optimizer, scheduler = build(cfg, ds, ctx)
    except (ImportError, ValueError) as exc:  # DALI not installed, a pretrained file for another model
        raise RunFailure(exc) from exc
    criterion.warmup_steps = rdr_warmup_steps(cfg, len(train_loader))
    os.makedirs(cfg.out, exist_ok=True)
    start_epoch, history = 0, []
    if cfg.resume and ctx.is_main:
        run_io.remove_temporaries(cfg.out)       # a killed run's unfinished writes
    # A run resumed without a checkpoint stopped before its first epoch ended: it starts
    # over, from epoch 0 with the config.json it has.
    if cfg.resume and os.path.isfile(os.path.join(cfg.out, run_io.CHECKPOINT)):
        start_epoch, history = restore(cfg, ds, ctx, model, criterion, optimizer, scheduler)
    elif ctx.is_main and not cfg.resume:
        run_io.write_json(os.path.join(cfg.out, "config.json"),
                          {**dataclasses.asdict(cfg), "git_commit": run_io.git_commit()})
    if not cfg.quiet:
        val = f" / {len(ds.val)} val" if ds.val is not None else ""
        skipped = f" ({len(ds.skipped_images)} unreadable images left out)" if ds.skipped_images else ""
        print(f"{cfg.dataset}: {len(ds.train)} train / {len(ds.test)} test{val}{skipped}, {ds.num_classes} classes, "
              f"{method_name(cfg)} on {cfg.model} ({cfg.device} x{ctx.world_size}), writing {cfg.out}")
    end_epoch = min(cfg.epochs, start_epoch + (cfg.stop_after or cfg.epochs))
    logger = (loggers.open_logger(cfg.logger, cfg.out, dataclasses.asdict(cfg), first_step=start_epoch + 1)
              if ctx.is_main else loggers.Logger())
    evaluation = None  # the latest epoch's test evaluation
    for epoch in range(start_epoch, end_epoch):
        set_epoch(train_loader, epoch)
        tic = time.perf_counter()
        loss, weights = train_epoch(cfg, epoch, model, forward, criterion, optimizer, train_loader, ds.splits)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            evaluation = evaluate(cfg, model, test_loader, ds.num_classes)
            metrics = evaluation.compute(ds.class_counts, ds.splits)
            metrics.pop("per_class")
            if val_loader is not None:  # the selection split, under names no test metric has
                val_metrics = evaluate(cfg, model, val_loader, ds.num_classes).compute(ds.class_counts, ds.splits)
                val_metrics.pop("per_class")
                metrics.update({VAL_PREFIX + k: v for k, v in val_metrics.items()})
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": lr, **metrics,
                   **{f"weight_{s}": w for s, w in weights.items()}, "epoch_seconds": time.perf_counter() - tic}
            history.append(row)
            if ctx.is_main:
                log_epoch(cfg, history, logger)
                if best_row(history) is row:  # before the checkpoint: a resume rewrites it alike
                    run_io.save_checkpoint(cfg.out, {"identity": identity(cfg, ds), "epoch": epoch + 1,
                                                     "model": model.state_dict(), "criterion": criterion.state_dict(),
                                                     "metrics": row}, name=run_io.BEST)
        rng = distributed.gather_objects(run_io.rng_state())  # collective: every rank takes part
        if ctx.is_main:
            run_io.save_checkpoint(cfg.out, {
                "identity": identity(cfg, ds), "epoch": epoch + 1, "history": history,
                "model": model.state_dict(), "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng})
    if history and ctx.is_main:
        run_io.plot_history(cfg.out, history, f"{cfg.dataset} {method_name(cfg)}")
    finished = end_epoch == cfg.epochs and bool(history)
    if finished:
        if evaluation is None:  # resumed after its last epoch: nothing was evaluated in this invocation
            evaluation = evaluate(cfg, model, test_loader, ds.num_classes)
        finish(cfg, ds, ctx, evaluation, history, logger)
    logger.close()
    if cfg.export and ctx.is_main:
        run_io.export_weights(model, cfg.export)
    distributed.shutdown(ctx)
    return {"finished": finished, "history": history, "out": cfg.out}


if __name__ == "__main__":
    main()
