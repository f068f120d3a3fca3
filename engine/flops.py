"""The compute ceiling of a training step: the model's matmul FLOPs per cell and the matmul rate this device
reaches, measured. Their ratio is the most cells per second the step's matmuls allow; a step's cells/s times the
FLOPs per cell over the rate is its model FLOPs utilisation (MFU), as nanoGPT logs it.

FLOPs are those of the dense network (forward and backward, counted by torch's FlopCounterMode with the sparse
first layer switched off), so on CPU, where the masked first layer multiplies only the kept nonzeros, MFU can pass
100 %: it measures the model, not our implementation of it.
"""
from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def dense_first_layer():
    """kernels.masked_linear as the dense reference (CELLSSL_SPARSE_INPUT=0) while the block runs."""
    before = os.environ.get("CELLSSL_SPARSE_INPUT")
    os.environ["CELLSSL_SPARSE_INPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CELLSSL_SPARSE_INPUT")
        else:
            os.environ["CELLSSL_SPARSE_INPUT"] = before


def flops_per_cell(objective: torch.nn.Module, n_genes: int, cells: int = 8) -> float:
    """Matmul FLOPs of one training step per cell: forward and backward of a copy of `objective` on a small dense
    batch (every product of these MLPs is linear in the batch), so the objective itself, its batch-norm statistics
    and the random streams are left as they were."""
    model = copy.deepcopy(objective).cpu().float().train()
    model.compute_dtype = None
    x = torch.rand(cells, n_genes)
    labels = torch.zeros(cells, dtype=torch.int64)
    with torch.random.fork_rng(devices=[]), dense_first_layer(), FlopCounterMode(display=False) as counter:
        loss, _ = model(x, labels, 0)
        loss.backward()
    return counter.get_total_flops() / cells


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of this device's matmul in `dtype`, best of three: a square 8,192 product on a GPU, a first-layer
    shaped one (1,024 × 4,096 × 512) on CPU, where a larger one would cost a run seconds."""
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (1024, 4096, 512)
    gen = torch.Generator().manual_seed(0)  # its own: a run's random stream must not depend on this measurement
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best
