"""The Triton mask kernel: `keep_tile` decides which elements of a tile the input keeps (Philox for random masks,
bitsets for programme masks; the loss kernel reuses it to regenerate the mask) and `_mask_kernel` applies it.
Imports only the Triton shim and the mask vocabulary. Never imports engine or loaders.
"""
from __future__ import annotations

import torch

from ._triton import grid, jit, tile, tl


@jit
def keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, n_words, row_ok, MODE: tl.constexpr):
    """bool [BLOCK_R, BLOCK_G]: which elements the input keeps. Random: Philox keyed by `key`, counter
    row · n_genes + gene. Bits: bit `gene` of the row's bitset, dropped (MODE 1) or kept alone (MODE 2)."""
    if MODE == 0:
        counters = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
        keep = tl.rand(key, counters) >= rate
    else:
        which = tl.load(row_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        words = tl.load(row_bits_ptr + which[:, None] * n_words + (cols[None, :] // 32),
                        mask=row_ok[:, None] & (cols[None, :] < n_genes), other=0)
        bit = (words >> (cols[None, :] % 32)) & 1
        keep = (bit == 0) if MODE == 1 else (bit == 1)
    return keep


@jit
def _mask_kernel(x_ptr, out_ptr, scale_ptr, row_bits_ptr, row_index_ptr, n_cells, n_genes, n_words, key, rate,
                 MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < n_cells
    inside = row_ok[:, None] & (cols[None, :] < n_genes)
    offsets = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    keep = keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, n_words, row_ok, MODE)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + offsets, tl.where(keep, x * scale[:, None], 0.0), mask=inside)


def mask_triton(x: torch.Tensor, spec) -> torch.Tensor:
    """x · keep · scale by the Triton kernel (`spec`: a MaskSpec; CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    blocks = tile(*x.shape, x.is_cuda)
    _mask_kernel[grid(*x.shape, blocks)](x, out, spec.scale, spec.row_bits, spec.row_index, x.shape[0], x.shape[1],
                                         spec.row_bits.shape[1], spec.key, spec.rate, MODE=spec.mode,
                                         BLOCK_R=blocks[0], BLOCK_G=blocks[1])
    return out
