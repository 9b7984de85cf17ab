"""Elementwise work over a parameter list, as ``torch._foreach_*`` calls."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def serial_on_cpu(tensors):
    """Run the enclosed foreach work on one thread when ``tensors`` live on the CPU.

    SAM's elementwise work is a few MB; with 2+ intra-op threads every tensor above the
    32768-element grain opens an OpenMP region, and on a busy machine each region waits
    for a descheduled worker (measured on 2 shared cores: 50–200 ms per ResNet-32 SAM step
    instead of ~1.5 ms). One thread does the same work in about a millisecond."""
    if not tensors or tensors[0].device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def global_norm(tensors) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-d tensor: one ``_foreach_norm`` and one reduction, no sync."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
