"""Peak extra memory of one call: the most memory allocated while it runs, above what was
allocated before it (the inputs and the state are not counted; what the call returns is).

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before.
- CPU: the allocation and free events that torch.profiler records with
  ``profile_memory=True`` (every block of torch's CPU allocator, with its time), summed in
  time order; the peak of that running sum. It sees every tensor, including those C++
  kernels allocate through ATen, and nothing else: memory a kernel takes with
  ``std::vector`` or ``malloc`` is not in it. The profiler's first use in a process
  takes a few seconds (its setup), later ones well under a millisecond of overhead.
"""
from __future__ import annotations

import torch


def peak_extra_bytes(fn, device: str) -> int:
    """Bytes: the peak extra memory of one call of ``fn`` on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak
