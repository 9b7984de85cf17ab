"""Train a long-tailed classifier with RDR: `python -m rdr_fast.train [--flags]`.

With no flags: digits_lt (scikit-learn's bundled digits, long-tailed, IF 100), a small
CNN, CE + RDR, the paper's protocol otherwise (SGD 0.9, wd 2e-4, lr 0.1 cosine, batch
128, 200 epochs, warm-up over the first 5/200 of training) — about 40 s on 2 CPU cores.
Each epoch: train, evaluate every `--eval-every` epochs and at the end (overall / Many /
Medium / Few / per class, a metrics.csv row), replace the checkpoint atomically; the
plots are drawn when the run ends. `--resume DIR` continues a
run exactly where its last completed epoch left it (however it stopped, kill -9
included; from the start if no epoch was completed); `--export FILE` writes the model's
weights alone for sharing (with `--resume DIR`: only that, no training). `--config FILE`
gives any flag's value from a JSON or YAML file (the flags given override it); `--logger
tensorboard|wandb` sends each evaluated epoch's metrics to a tracker as well.

Every flag is checked before any work starts (rdr_fast.cli_checks): a bad one is refused
with one `error:` line and exit status 2. A run that fails on its way (missing or corrupt
data, an unreadable checkpoint, a full disk, a non-finite loss) stops with one `error:`
line and exit status 1; set RDR_FAST_DEBUG=1 to get the traceback instead.
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

from . import RDRLoss, cli_checks, distributed, loggers, run_io
from .cli_checks import UsageError, UsageParser
from .config_file import read_config_file, read_config_json
from .data import DATASETS, LOADERS, DataNotFoundError, load_dataset, make_loaders, set_epoch
from .metrics import Evaluation, count_splits
from .models import build_model, default_model, model_problem
from .sam import VARIANTS, make_optimizer
from .training import train_step


@dataclass(frozen=True)
class Config:
    dataset: str = "digits_lt"        # one of rdr_fast.data.DATASETS
    data_root: str | None = None      # folder with the dataset files
    download: bool = False            # fetch CIFAR / Fashion-MNIST through torchvision
    imb_factor: float = 100.0         # n_max / n_min (CIFAR-LT: 10/100/200/500)
    noise_ratio: float = 0.0          # symmetric label noise after the LT subset (paper: 0.05)
    model: str | None = None          # default: the paper's backbone for the dataset
    pretrained: str | None = None     # local state_dict file for the backbone
    loss: str = "ce"                  # ce | focal | la
    reweight: str = "rdr"             # none | inv_freq | cb | rdr
    rdr_momentum: float = 0.9         # μ of the prototype update
    temperature: float = 1.0          # γ of the weights
    warmup_epochs: float | None = None  # w ≡ 1 for these epochs; default epochs·5/200
    tau: float = 1.0                  # LA's τ
    focal_gamma: float = 1.0          # focal's γ
    cb_beta: float = 0.9999           # CB's β
    epochs: int = 200
    batch_size: int | None = None     # default 128, 256 for imagenet_lt / places_lt
    lr: float = 0.1                   # peak learning rate, cosine-annealed per epoch to 0
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 2e-4
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
CHOICES = {"dataset": DATASETS, "model": model_problem, "loss": ("ce", "focal", "la"),
           "reweight": ("none", "inv_freq", "cb", "rdr"), "loader": LOADERS, "sam": VARIANTS,
           "logger": loggers.LOGGERS}
# What a checkpoint must agree on to be resumed by this configuration.
IDENTITY_FIELDS = ("dataset", "imb_factor", "noise_ratio", "model", "loss", "reweight", "epochs", "seed", "sam")


def _parser(suppress_defaults: bool) -> argparse.ArgumentParser:
    parser = UsageParser(prog="python -m rdr_fast.train", description=__doc__.split("\n")[0],
                     epilog="Exit status 2: a bad flag; 1: the run failed (RDR_FAST_DEBUG=1 shows why "
                            "with a traceback). See docs/reliability.md.",
                     argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = argparse.SUPPRESS if suppress_defaults else field.default
        if field.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        kind = {"int": int, "float": float}.get(field.type.split(" ")[0], str)
        choices = CHOICES.get(field.name)
        parser.add_argument(flag, type=kind, default=default, choices=None if callable(choices) else choices)
    parser.add_argument("--config", metavar="FILE", help="settings for any of these flags, JSON or YAML (rdr_fast.config_file); flags override them")
    return parser


def parse_args(argv=None) -> Config:
    """Flags over the values of --config FILE over the defaults; with --resume DIR, all of
    them over DIR/config.json, so that `--resume DIR` alone continues the run as it was
    configured. UsageError for a flag argparse refuses, an unreadable or bad --config file
    or an unreadable config.json; the other values are checked by configure()."""
    args = vars(_parser(False).parse_args(argv))
    explicit = vars(_parser(True).parse_args(argv))
    config_file = args.pop("config")
    explicit.pop("config", None)
    if config_file is not None:   # the file's values count as given, under the flags
        explicit = {**_config_file_values(config_file), **explicit}
    if explicit.get("resume"):
        fields = {f.name for f in dataclasses.fields(Config)}
        saved = {k: v for k, v in _saved_config(explicit["resume"]).items() if k in fields}
        # Where to stop and what to export belong to each invocation; the run lives where it is now.
        args = {**args, **saved, "stop_after": None, "export": None, "out": None}
    return Config(**{**args, **explicit})


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
    """Fill the dataset-dependent defaults."""
    batch = cfg.batch_size if cfg.batch_size is not None else (
        256 if cfg.dataset in ("imagenet_lt", "places_lt") else 128)
    out = cfg.resume or cfg.out or os.path.join(
        "runs", f"{cfg.dataset}-{method_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}")
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    return dataclasses.replace(
        cfg, model=cfg.model or default_model(cfg.dataset), batch_size=batch, out=out, device=device,
        amp=device.startswith("cuda") if cfg.amp is None else cfg.amp,
        warmup_epochs=cfg.epochs * 5 / 200 if cfg.warmup_epochs is None else cfg.warmup_epochs)


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
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return model, forward, criterion, optimizer, scheduler


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


# Model selection: the epoch with the best top-1, on the test set (the field's protocol
# for CIFAR-LT; no dataset here loads a separate validation split).
SELECTED_ON = "test"


def best_row(history: list[dict]) -> dict:
    """The evaluated epoch with the highest top-1 (the first of equals)."""
    return max(history, key=lambda row: row["acc_all"])


def identity(cfg: Config, ds) -> dict:
    return {**{f: getattr(cfg, f) for f in IDENTITY_FIELDS}, "class_counts": [int(n) for n in ds.class_counts]}


def restore(cfg, ds, ctx, model, criterion, optimizer, scheduler):
    """Load the run's checkpoint into the objects; returns (next epoch, metric history).
    Each rank takes its own saved RNG state; with another world size than the saved
    run's, RNGs are re-seeded from (seed, epoch, rank) instead."""
    state = run_io.load_checkpoint(cfg.out, identity(cfg, ds))
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
        print(f"epoch {row['epoch']:>4}  loss {row['train_loss']:.4f}  top-1 {row['acc_all']:6.2f}  "
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
               "best": {**best_row(history), "selected_on": SELECTED_ON}, "class_counts": ds.class_counts,
               "splits": ds.splits, "count_splits": count_splits(ds.class_counts),
               "label_map": {str(k): v for k, v in ds.label_map.items()}, "method": method_name(cfg)}
    run_io.write_json(os.path.join(cfg.out, "summary.json"), summary)
    run_io.write_confusion(cfg.out, evaluation.confusion, ds.splits)
    run_io.plot_reliability(cfg.out, evaluation.calibration())
    best = best_row(history)
    print(f"\n{cfg.dataset} {method_name(cfg)} after {cfg.epochs} epochs ({cfg.out}); best top-1 "
          f"{best['acc_all']:.2f} at epoch {best['epoch']} (best.pt, selected on the {SELECTED_ON} set):\n"
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
        message = f"error: {_one_line(exc)}"
        print(message, file=sys.stderr)
        raise Refused(message) from None
    try:
        return export_run(cfg) if cfg.resume and cfg.export else run(cfg)
    except Exception as exc:
        compile_failed = cfg.compile and _compile_failure(exc)
        if not (compile_failed or isinstance(exc, RUN_FAILURES)) or os.environ.get("RDR_FAST_DEBUG"):
            raise
        if compile_failed:
            raise SystemExit(f"error: --compile: torch.compile failed at the first step "
                             f"({_first_paragraph(exc)}); run without --compile") from None
        raise SystemExit(f"error: {_one_line(exc)}") from None


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


def run(cfg: Config) -> dict:
    """Train (or continue) the run `cfg` describes; configure() has checked it."""
    ctx = distributed.init_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, device=distributed.device_for(ctx, cfg.device),
                              quiet=cfg.quiet or not ctx.is_main)
    torch.manual_seed(cfg.seed + ctx.rank)
    ds = load_dataset(cfg.dataset, data_root=cfg.data_root, imb_factor=cfg.imb_factor,
                      noise_ratio=cfg.noise_ratio, seed=cfg.seed, download=cfg.download)
    try:
        train_loader, test_loader = make_loaders(ds, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers,
                                                 loader=cfg.loader, device=cfg.device, shard_id=ctx.rank,
                                                 num_shards=ctx.world_size)
        model, forward, criterion, optimizer, scheduler = build(cfg, ds, ctx)
    except (ImportError, ValueError) as exc:  # DALI not installed, a pretrained file for another model
        raise RunFailure(exc) from exc
    criterion.warmup_steps = math.ceil(cfg.warmup_epochs * len(train_loader))
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
        print(f"{cfg.dataset}: {len(ds.train)} train / {len(ds.test)} test, {ds.num_classes} classes, "
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
