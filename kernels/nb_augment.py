"""Negative-binomial noise augmentation (the paper's BYOL / Barlow Twins view): per element noise
K ~ NB(total_count = 10, probs ~ U(0, 1)); each row of noise normalised to sum `target_sum` (the data's own
normalisation total, 10,000) and log1p'd, scaled by `intensity`, added to x, clamped at 0. x may be dense or, on
CPU, SparseRows: its stored values are then added to the dense noise, no dense x is made.

Sampling. With probs drawn per element, each noise element is an independent draw from the NB–uniform
mixture, whose pmf is ∫₀¹ C(k+9, k) pᵏ (1−p)¹⁰ dp = 10 / ((k+10)(k+11)) and whose CDF is 1 − 10 / (k+11).
So K = max(0, ⌈10 / (1 − u) − 11⌉) for one uniform u is an exact draw: the same distribution as
torch.distributions' Gamma–Poisson sampling of NegativeBinomial(10, probs=U(0,1)), large rates included
(the tail falls as 1/k², so single elements reach 10⁷–10⁸), with no rejection loop and no lgamma.

Every uniform is keyed by (key, the cell's global store row, gene), never by the row's place in the batch: a cell
gets the same noise on any rank. The Triton kernel makes two passes over each row, regenerating the same Philox
uniforms: one for the row sum, one to finish; no full-size temporary. On CPU (numba) the uniform of (cell, gene) is
the upper or lower 32 bits of splitmix64(key ⊕ (cell · ⌈G/2⌉ + gene // 2) · φ), as 24-bit floats like torch.rand.
Never imports engine or loaders.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from ._triton import jit, log1p, tile, tl, triton
from .dispatch import random_key, use_triton
from .masking import cell_ids, word
from .sparse_rows import SparseRows, add_to, check_input, dense

TOTAL_COUNT = 10


def counts_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of the NB(10, U(0,1)) mixture, in place on `u`: float32 counts."""
    return u.neg_().add_(1.0).reciprocal_().mul_(TOTAL_COUNT).sub_(TOTAL_COUNT + 1).ceil_().clamp_(min=0.0)


@numba.njit(parallel=True, cache=True)
def _counts_cpu(key, cells, g, out):
    """out[r, c] = the NB–uniform mixture's count for cell cells[r], gene c (float32)."""
    words = (g + 1) // 2
    for r in prange(len(cells)):
        row = out[r]
        for w in range(words):
            bits = word(key, cells[r], words, w)
            for k in range(2):
                c = 2 * w + k
                if c < g:
                    u = np.float32((bits >> np.uint64(32 * k + 8)) & np.uint64(0xFFFFFF)) * np.float32(2.0 ** -24)
                    row[c] = max(np.float32(0.0), np.ceil(np.float32(10.0) / (np.float32(1.0) - u) - np.float32(11.0)))


@jit
def _counts(key, cells, cols, n_genes):
    u = tl.rand(key, cells[:, None] * n_genes + cols[None, :])
    return tl.maximum(tl.ceil(10.0 / (1.0 - u) - 11.0), 0.0)


@jit
def _nb_kernel(x_ptr, out_ptr, cells_ptr, n_cells, n_genes, key, intensity, target_sum, RAW: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_cells
    cells = tl.load(cells_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, n_genes, BLOCK_G):
        cols = start + tl.arange(0, BLOCK_G)
        inside = row_ok[:, None] & (cols[None, :] < n_genes)
        total += tl.sum(tl.where(inside, _counts(key, cells, cols, n_genes), 0.0), axis=1)
    factor = tl.where(total > 0, target_sum / tl.maximum(total, 1.0), 0.0)
    for start in range(0, n_genes, BLOCK_G):
        cols = start + tl.arange(0, BLOCK_G)
        inside = row_ok[:, None] & (cols[None, :] < n_genes)
        offsets = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
        counts = _counts(key, cells, cols, n_genes)
        if RAW:
            tl.store(out_ptr + offsets, counts, mask=inside)
        else:
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
            noise = log1p(counts * factor[:, None])
            tl.store(out_ptr + offsets, tl.maximum(x + intensity * noise, 0.0), mask=inside)


def _nb_triton(x: torch.Tensor, key: int, cells: torch.Tensor, intensity: float, target_sum: float,
               raw: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    block_r, block_g = tile(*x.shape, x.is_cuda)
    block_r = 1 if x.is_cuda else block_r  # one row per GPU program: both passes stay in L2
    _nb_kernel[(triton.cdiv(x.shape[0], block_r),)](x, out, cells, x.shape[0], x.shape[1], key, intensity,
                                                    target_sum, RAW=raw, BLOCK_R=block_r, BLOCK_G=block_g)
    return out


def nb_noise(x, seed: int, step: int, cells: torch.Tensor | None = None) -> torch.Tensor:
    """The raw noise counts K [B, G] that nb_augment(x, ·, seed, step, ·, cells) uses, from the same backend.
    `cells`: the batch's global store rows (None: the rows' places in the batch)."""
    check_input(x, "x")
    key, cells = random_key(seed, step, 3), cell_ids(x, cells)
    if use_triton(x.data if isinstance(x, SparseRows) else x):
        return _nb_triton(dense(x), key, cells, 0.0, 1.0, raw=True)
    # the counter-based CPU stream on any device (a forced reference on CUDA computes it on the host)
    out = np.empty(x.shape, np.float32)
    _counts_cpu(np.uint64(key), cells.cpu().numpy(), x.shape[1], out)
    return torch.from_numpy(out).to(x.device)


def nb_augment_reference(x, intensity: float, noise: torch.Tensor, target_sum: float, inplace: bool = False):
    """The torch reference given the raw counts: row-normalise to `target_sum`, log1p, scale, add x, clamp at 0
    (`inplace` reuses the noise buffer for the output: the CPU path's only full-size allocation). A SparseRows x
    on CPU adds its stored values only: the same sums, element by element."""
    total = noise.sum(dim=1, keepdim=True)
    factor = torch.where(total > 0, target_sum / total.clamp(min=1.0), 0.0)
    noise = noise if inplace else noise.clone()
    noise.mul_(factor).log1p_().mul_(intensity)
    if isinstance(x, SparseRows) and not x.counts and noise.device.type == "cpu":
        add_to(noise, x)
    else:
        noise.add_(dense(x))
    return noise.clamp_(min=0.0)


def nb_augment(x, intensity: float, seed: int, step: int, target_sum: float,
               cells: torch.Tensor | None = None) -> torch.Tensor:
    """x plus `intensity` · log1p(NB noise normalised to `target_sum` per row), clamped at 0 (the paper: intensity
    0.1, the data's total 10,000). x: a dense float32 batch, or SparseRows. `cells`: the batch's global store rows,
    which key the noise (None: the rows' places in the batch)."""
    check_input(x, "x")
    intensity = float(intensity)
    if use_triton(x.data if isinstance(x, SparseRows) else x):
        return _nb_triton(dense(x), random_key(seed, step, 3), cell_ids(x, cells), intensity, float(target_sum),
                          raw=False)
    return nb_augment_reference(x, intensity, nb_noise(x, seed, step, cells), target_sum, inplace=True)


__all__ = ["counts_from_uniform", "nb_augment", "nb_augment_reference", "nb_noise"]
