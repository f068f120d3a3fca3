"""Which implementation runs, argument checks, and the counter-based random keys every op shares.

Each op has up to three implementations: the Triton kernel, a CPU path (numba, on CPU tensors) and the torch
reference. By default (`CELLSSL_KERNELS=auto`) Triton runs on CUDA tensors and the CPU path on CPU tensors (the
torch reference where an op has no CPU path). `CELLSSL_KERNELS=torch` runs the torch references everywhere,
`=numba` the CPU paths (on CPU tensors; references elsewhere), `=triton` the Triton kernels (with
`TRITON_INTERPRET=1` they run on CPU tensors: how the tests reach them). Never imports engine or loaders.
"""
from __future__ import annotations

import os

import torch

_MASK64 = (1 << 64) - 1


BACKENDS = ("auto", "torch", "numba", "triton")


def backend(*tensors) -> str:
    """"triton", "numba" or "torch": which implementation an op runs on these tensors (None entries ignored)."""
    mode = os.environ.get("CELLSSL_KERNELS", "auto").lower()
    if mode not in BACKENDS:
        raise ValueError(f"CELLSSL_KERNELS={mode!r}: use one of {', '.join(BACKENDS)}")
    present = [t for t in tensors if t is not None]
    on_cpu = all(t.device.type == "cpu" for t in present)
    if mode == "triton":
        return "triton"
    if mode == "torch":
        return "torch"
    if on_cpu:
        return "numba"
    if mode == "numba":
        return "torch"
    return "triton" if all(t.is_cuda for t in present) and _triton_available() else "torch"


def use_triton(*tensors) -> bool:
    return backend(*tensors) == "triton"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def random_key(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit key from (seed, step, stream) by splitmix64 rounds: nearby seeds and steps give unrelated keys.

    Triton's Philox takes it as its key and (row * n_genes + gene) as its counter; on CPU the random mask hashes it
    with the element's position (kernels/cpu.py) and the other references seed a torch.Generator with it."""
    z = 0
    for part in (seed, step, stream):
        z = (z ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        z ^= z >> 31
    return z >> 1


def cell_uniforms(key: int, cells: torch.Tensor, n: int) -> torch.Tensor:
    """float64 [len(cells), n] uniforms in [0, 1), entry (i, j) a function of (key, cells[i], j) alone: per-cell draws
    (a cell's programmes, its isolated programme) that do not depend on the cell's rank or place in the batch.
    splitmix64 of (key ⊕ (cell · n + j) · φ), its top 53 bits."""
    import numpy as np

    ids = cells.detach().cpu().numpy().astype(np.uint64)[:, None] * np.uint64(max(n, 1)) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) ^ (ids * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def generator(key: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(key)


def check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [cells, genes], got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype} (cast with .float())")


def check_same(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{names}: devices differ, {a.device} vs {b.device}")


def check_rate(rate: float, name: str = "rate") -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")
    return rate
