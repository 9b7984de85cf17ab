"""``python -m rdr_fast.info``: the torch version, which implementation each op runs on
each device, and where the C++ CPU kernels came from (see docs/install.md)."""
from __future__ import annotations

import os

import torch

import rdr_fast


IMPL_NAMES = {"pending": "cpp (compiled at first use)"}


def describe() -> str:
    """The report ``python -m rdr_fast.info`` prints, one fact per line."""
    lines = [f"rdr_fast {rdr_fast.__version__}, torch {torch.__version__}"]
    for op, devices in rdr_fast.backends().items():
        lines.append(f"{op}: " + ", ".join(f"{device}={IMPL_NAMES.get(impl, impl)}" for device, impl in devices.items()))
    info = rdr_fast.extension_info()
    origin = {"install": "built at install", "jit": "compiled on this machine (cache)",
              "pending": "to be compiled at the first CPU use of an op, into",
              "none": "none, the CPU runs the PyTorch path"}[info["origin"]]
    lines.append(f"C++ kernels: {origin}" + (f", {info['path']}" if info["path"] else ""))
    if info["reason"]:
        lines.append(f"  because: {info['reason']}")
    lines.append(f"CPU threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
