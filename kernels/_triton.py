"""Triton, where it is installed (Linux). Elsewhere `jit` leaves the kernels as plain functions that nothing
calls, so the torch references still import and run. Never imports engine or loaders."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on platforms without Triton
    triton, tl = None, None


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def constexpr(value):
    """A module-level constant a kernel may read: the Triton compiler accepts only `tl.constexpr` globals (its
    interpreter accepts any, so only an ahead-of-time compile catches a plain float; kernels/variants.py)."""
    return tl.constexpr(value) if tl is not None else value


def tile(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_G): small tiles for many GPU programs; few large ones for the CPU interpreter, whose cost
    is per program instance."""
    if on_gpu:
        return 4, 1024
    return min(triton.next_power_of_2(max(n_rows, 1)), 64), min(triton.next_power_of_2(max(n_cols, 1)), 4096)


def grid(n_rows: int, n_cols: int, blocks: tuple[int, int]) -> tuple[int, int]:
    return triton.cdiv(n_rows, blocks[0]), triton.cdiv(n_cols, blocks[1])


@jit
def log1p(y):
    """log(1 + y) to float32 accuracy for small y (Triton has no log1p): log(u) · y / (u − 1), u = 1 + y."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
