"""Work made of many tiny steps (a small MLP's training, L-BFGS on a probe) runs on one CPU thread: torch's OpenMP
threads spin between parallel regions, and when another process keeps the cores busy they wait on each other's time
slices — a frozen head's fit took 45 s on two threads of a loaded 2-core machine, a few on one (bench/README.md,
"Threads"). Large matrix products (training, embedding, a probe's full-batch steps over tens of thousands of cells:
1.65× faster on two threads at 32,000 cells) keep every thread."""
from __future__ import annotations

import contextlib

import torch

TINY = 16_384  # rows a step from which every thread pays


@contextlib.contextmanager
def one_thread(device: torch.device | None = None, rows: int = 0):
    """One CPU thread inside the block; nothing changes when the work runs on another device, or when its steps are
    `rows` ≥ TINY rows large."""
    if (device is not None and device.type != "cpu") or rows >= TINY:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
