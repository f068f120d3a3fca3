"""CPU fast paths (numba, parallel over rows): the random mask's bits, the masked input's kept nonzeros as CSR,
and the fused masked loss. They replace full-size temporaries (a float mask, a masked copy of the batch) with one
pass each; the torch references in masking.py / recon_loss.py define what they compute.

The CPU random stream: uniform u ∈ [0, 65,536) for (row, gene) is 16 bits of splitmix64(key ⊕ (row · W + gene // 4)
· φ), lane gene % 4, with W = ⌈genes / 4⌉: one hash per four genes, computed only where needed (the kept-nonzero
pass hashes only the words holding a nonzero). A gene is kept when u ≥ round(rate · 65,536). Rows are independent
and every reduction is per row, then summed in row order, so results do not depend on the thread count.
Never imports engine or loaders.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
RANDOM, DROP_BITS, KEEP_BITS = 0, 1, 2   # MaskSpec modes


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _word(key, r, words, w):
    return _mix(np.uint64(key) ^ (np.uint64(r * words + w) * GOLDEN))


@numba.njit(inline="always")
def _lane(bits, c):
    return (bits >> np.uint64(16 * (c & 3))) & np.uint64(0xFFFF)


@numba.njit(parallel=True, cache=True)
def random_keep(key, n, g, threshold, out):
    """out[r, c] = the random mask keeps (r, c)."""
    words = (g + 3) // 4
    for r in prange(n):
        for w in range(words):
            bits = _word(key, r, words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                out[r, c] = _lane(bits, c) >= threshold


@numba.njit(inline="always")
def _kept(mode, key, r, words, c, threshold, row_bits, which, bits_cache):
    if mode == RANDOM:
        return _lane(bits_cache, c) >= threshold
    bit = (row_bits[which, c >> 5] >> (c & 31)) & 1
    return bit == 0 if mode == DROP_BITS else bit == 1


@numba.njit(parallel=True, cache=True)
def _count_kept(x, mode, key, threshold, row_bits, row_index, counts):
    n, g = x.shape
    words = (g + 3) // 4
    for r in prange(n):
        which, cnt, last_w, bits = row_index[r], 0, -1, np.uint64(0)
        for c in range(g):
            if x[r, c] != 0.0:
                if mode == RANDOM and (c >> 2) != last_w:
                    last_w = c >> 2
                    bits = _word(key, r, words, last_w)
                if _kept(mode, key, r, words, c, threshold, row_bits, which, bits):
                    cnt += 1
        counts[r] = cnt


@numba.njit(parallel=True, cache=True)
def _fill_kept(x, mode, key, threshold, row_bits, row_index, scale, indptr, cols, vals):
    n, g = x.shape
    words = (g + 3) // 4
    for r in prange(n):
        which, j, last_w, bits, s = row_index[r], indptr[r], -1, np.uint64(0), scale[r]
        for c in range(g):
            v = x[r, c]
            if v != 0.0:
                if mode == RANDOM and (c >> 2) != last_w:
                    last_w = c >> 2
                    bits = _word(key, r, words, last_w)
                if _kept(mode, key, r, words, c, threshold, row_bits, which, bits):
                    cols[j] = c
                    vals[j] = v * s
                    j += 1


def kept_entries(x: np.ndarray, mode: int, key: int, threshold: int, row_bits: np.ndarray, row_index: np.ndarray,
                 scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masked input x · keep · scale as CSR (indptr int64, cols int32, vals float32), zeros left out."""
    counts = np.empty(x.shape[0], np.int64)
    _count_kept(x, mode, key, threshold, row_bits, row_index, counts)
    indptr = np.zeros(x.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    cols, vals = np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.float32)
    _fill_kept(x, mode, key, threshold, row_bits, row_index, scale, indptr, cols, vals)
    return indptr, cols, vals


@numba.njit(cache=True)
def csr_transpose(indptr, cols, vals, n_cols):
    """CSR [n, n_cols] → CSR of the transpose [n_cols, n] (a counting sort by column; rows stay in order)."""
    counts = np.zeros(n_cols + 1, np.int64)
    for j in range(len(cols)):
        counts[cols[j] + 1] += 1
    t_indptr = np.cumsum(counts)
    fill = t_indptr[:-1].copy()
    t_rows, t_vals = np.empty(len(cols), np.int32), np.empty(len(cols), np.float32)
    for r in range(len(indptr) - 1):
        for j in range(indptr[r], indptr[r + 1]):
            k = fill[cols[j]]
            t_rows[k], t_vals[k] = r, vals[j]
            fill[cols[j]] = k + 1
    return t_indptr, t_rows, t_vals


@numba.njit(parallel=True, fastmath=False, cache=True)
def random_masked_loss(pred, x, key, threshold, inv_n, grad, partial):
    """Squared error on the positions the random mask dropped; grad = 2 · (pred − x) · inv_n there, else 0."""
    n, g = x.shape
    words = (g + 3) // 4
    for r in prange(n):
        acc = 0.0
        for w in range(words):
            bits = _word(key, r, words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                if _lane(bits, c) >= threshold:
                    grad[r, c] = 0.0
                else:
                    d = pred[r, c] - x[r, c]
                    grad[r, c] = 2.0 * d * inv_n
                    acc += d * d
        partial[r] = acc
