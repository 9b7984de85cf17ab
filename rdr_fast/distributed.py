"""Multi-process training with torch.distributed (launched by torchrun).

What is synchronised, and how:
- gradients: DistributedDataParallel (all-reduce of the mean gradient), except a SAM
  first pass whose gradient only builds the perturbation (it stays per rank under
  no_sync; ImbSAM averages its head gradient with `average_`, see rdr_fast.sam);
- BatchNorm: statistics of the global batch — torch's SyncBatchNorm on CUDA, and
  `GlobalBatchNorm` (the same maths through a differentiable all-reduce) on the CPU,
  where torch's SyncBatchNorm refuses to run;
- RDR prototypes: `update_prototypes_global_` (called by `RDRLoss` each training step)
  all-reduces one [C, K+1] buffer of per-class feature sums and counts, so every rank
  applies the same update, equal to a single process's update on the concatenated
  global batch;
- RDR weights: computed per rank from its local batch against the (global)
  prototypes, normalised to mean 1 over the local batch. Solving each class's system
  on the global batch would need an all-gather of the features every step; the ratio
  is an estimate per batch either way, so rdr_fast keeps it local;
- data: `rdr_fast.data.make_loaders(..., shard_id=rank, num_shards=world)` cuts each
  global batch of the single-process order into contiguous per-rank slices, so N
  processes with batch B/N see exactly the samples a single process with batch B sees,
  step for step;
- metrics: each rank evaluates a disjoint slice of the test set; counts are summed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Only leaf modules of the package: rdr_fast/__init__ and losses import this one.
from .constants import compute_dtype
from .torch_impl import class_sums, update_prototypes_from_sums_


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1);
    NCCL for CUDA devices, gloo otherwise. A single process needs no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(ctx: DistContext) -> None:
    """Leave the process group once every rank is done."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(ctx: DistContext, device: str) -> str:
    """One process per GPU: cuda becomes cuda:<local rank>."""
    if ctx.enabled and device == "cuda":
        return f"cuda:{ctx.local_rank}"
    return device


def multi_rank() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks in place, op "sum" or "max" (a no-op without a process group)."""
    if multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def average_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, with one all-reduce of a flat copy
    (a no-op without a process group)."""
    if not tensors or not multi_rank():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    parts = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(parts, tensors)])


def update_prototypes_global_(prototypes, seen, features, labels, momentum: float) -> None:
    """The prototype update of the global batch, in place on ``prototypes`` [C, K] and
    ``seen`` [C]: per-class feature sums and counts of the local batch ([C, K+1], in the
    compute dtype), summed over ranks by one all-reduce, then the momentum update
    (docs/algorithm.md, "Distributed"). Every rank ends with the same state, equal to one
    process's update on the concatenated batch; without a process group it is the local
    update.

    It runs on the PyTorch path (rdr_fast.torch_impl's ``class_sums`` and
    ``update_prototypes_from_sums_``) on every device: a scatter-add and a collective,
    which no fused kernel would speed up.
    """
    z = features.detach().to(compute_dtype(features.dtype))
    sums = class_sums(z, labels, len(prototypes))
    update_prototypes_from_sums_(prototypes, seen, all_reduce_(sums), momentum)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not multi_rank():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x on every rank; the gradient of a sum over ranks is again a sum."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce_(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, on any device (torch's
    SyncBatchNorm is CUDA-only). Training normalises with the all-reduced mean and
    biased variance, and updates the running statistics with the unbiased variance,
    as nn.BatchNorm does; evaluation is plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.new_full((1,), x.numel() / x.shape[1])
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, as nn.BatchNorm
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Every BatchNorm becomes a global one: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere. Parameters and buffers carry over."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            # Share, not copy, the tensors: an optimizer built earlier keeps working.
            for key, value in list(child._parameters.items()) + list(child._buffers.items()):
                setattr(synced, key, value)
            setattr(model, name, synced)
        else:
            convert_batchnorm(child, device)
    return model


def wrap_model(model: nn.Module, ctx: DistContext, device: str) -> nn.Module:
    model = convert_batchnorm(model, device)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
