"""CPU fast paths (numba, parallel over rows): the random mask's bits, the masked input's kept nonzeros as CSR,
and the fused masked loss. They replace full-size temporaries (a float mask, a masked copy of the batch) with one
pass each; the torch references in masking.py / recon_loss.py define what they compute.

The CPU random stream: uniform u ∈ [0, 65,536) for (row, gene) is 16 bits of splitmix64(key ⊕ (row · W + gene // 4)
· φ), lane gene % 4, with W = ⌈genes / 4⌉: one hash per four genes, computed only where needed (the kept-nonzero
pass hashes only the nonzeros' words). A gene is kept when u ≥ round(rate · 65,536). Rows are independent
and every reduction is per row, then summed in row order, so results do not depend on the thread count.
Never imports engine or loaders.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .mask_modes import DROP_BITS, RANDOM

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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


@numba.njit(parallel=True, fastmath=True, cache=True)
def random_apply(x, key, threshold, scale, out):
    """out = x · keep · scale[row] for the random mask, branch-free (the dense masked copy, when one is needed)."""
    n, g = x.shape
    words = (g + 3) // 4
    thr = np.uint64(threshold)
    for r in prange(n):
        xr, orow, s = x[r], out[r], scale[r]
        for w in range(words):
            bits = _word(key, r, words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                orow[c] = xr[c] * s * np.float32(_lane(bits, c) >= thr)


@numba.njit(inline="always")
def _keeps(mode, key, r, words, c, thr, row_bits, which):
    """Whether the mask keeps gene c of row r: the random stream, or bit c of the row's programme bitset."""
    if mode == RANDOM:
        return _lane(_word(key, r, words, c >> 2), c) >= thr
    bit = (row_bits[which, c >> 5] >> (c & 31)) & 1
    return bit == 0 if mode == DROP_BITS else bit == 1


@numba.njit(parallel=True, fastmath=True, cache=True)
def _nonzeros_per_row(x, out):
    n, g = x.shape
    for r in prange(n):
        k = 0
        xr = x[r]
        for c in range(g):
            k += xr[c] != 0.0
        out[r] = k


@numba.njit(parallel=True, cache=True)
def _fill_kept(x, mode, key, threshold, row_bits, row_index, scale, slots, cols, vals, counts):
    """Each row's kept nonzeros into its own slots (one spare: the writes are unconditional, branch-free, and the
    spare absorbs the last one). First the row's nonzero columns (branch-free), then the keep test on those only."""
    n, g = x.shape
    words = (g + 3) // 4
    thr = np.uint64(threshold)
    chunks = min(n, 64)
    for ch in prange(chunks):
        nonzero = np.empty(g, np.int32)
        for r in range(ch * n // chunks, (ch + 1) * n // chunks):
            xr = x[r]
            k = 0
            for c in range(g):
                nonzero[k] = c
                k += xr[c] != 0.0
            which, j, s = row_index[r], slots[r], scale[r]
            for i in range(k):
                c = nonzero[i]
                keep = _keeps(mode, key, r, words, c, thr, row_bits, which)
                cols[j] = c
                vals[j] = xr[c] * s
                j += keep
            counts[r] = j - slots[r]


@numba.njit(parallel=True, cache=True)
def _fill_kept_csr(indptr, indices, data, n_genes, mode, key, threshold, row_bits, row_index, scale, slots, cols,
                   vals, counts):
    """_fill_kept for CSR input: the keep test on each row's stored values only (one spare slot per row as there)."""
    words = (n_genes + 3) // 4
    thr = np.uint64(threshold)
    n = len(indptr) - 1
    for r in prange(n):
        which, s = row_index[r], scale[r]
        j = slots[r]
        for k in range(indptr[r], indptr[r + 1]):
            c = np.int64(indices[k])
            keep = _keeps(mode, key, r, words, c, thr, row_bits, which)
            cols[j] = c
            vals[j] = data[k] * s
            j += keep and data[k] != 0.0
        counts[r] = j - slots[r]


@numba.njit(parallel=True, cache=True)
def _compact(slots, counts, indptr, cols, vals, out_cols, out_vals):
    for r in prange(len(counts)):
        a, b = slots[r], indptr[r]
        for k in range(counts[r]):
            out_cols[b + k] = cols[a + k]
            out_vals[b + k] = vals[a + k]


def _compacted(slots, counts, cols, vals) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows' kept entries (row r: counts[r] of them from slots[r]) packed into one CSR."""
    indptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    out_cols, out_vals = np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.float32)
    _compact(slots, counts, indptr, cols, vals, out_cols, out_vals)
    return indptr, out_cols, out_vals


def nonzeros_per_row(x: np.ndarray) -> np.ndarray:
    counts = np.empty(x.shape[0], np.int64)
    _nonzeros_per_row(x, counts)
    return counts


def kept_entries(x: np.ndarray, nonzeros: np.ndarray, mode: int, key: int, threshold: int, row_bits: np.ndarray,
                 row_index: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masked input x · keep · scale as CSR (indptr int64, cols int32, vals float32), zeros left out;
    `nonzeros`: nonzeros_per_row(x), which the caller has already counted to choose this path."""
    n = x.shape[0]
    slots = np.zeros(n + 1, np.int64)
    np.cumsum(nonzeros + 1, out=slots[1:])
    cols, vals, counts = np.empty(slots[-1], np.int32), np.empty(slots[-1], np.float32), np.empty(n, np.int64)
    _fill_kept(x, mode, key, np.uint64(threshold), row_bits, row_index, scale, slots, cols, vals, counts)
    return _compacted(slots, counts, cols, vals)


def kept_entries_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_genes: int, mode: int, key: int,
                     threshold: int, row_bits: np.ndarray, row_index: np.ndarray,
                     scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kept_entries of a batch given as CSR: the same entries, found without a dense row to scan."""
    n = len(indptr) - 1
    slots = indptr[:-1] + np.arange(n)
    size = int(indptr[-1]) + n
    cols, vals, counts = np.empty(size, np.int32), np.empty(size, np.float32), np.empty(n, np.int64)
    _fill_kept_csr(indptr, indices, data, n_genes, mode, key, np.uint64(threshold), row_bits, row_index, scale, slots,
                   cols, vals, counts)
    return _compacted(slots, counts, cols, vals)


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


@numba.njit(inline="always", fastmath=True)
def _masked_row(gr, r, key, words, full, g, thr, scale2):
    """Row r of grad holds pred − x: keep it (× scale2) where the random mask dropped the gene, 0 elsewhere, and
    return the squared error summed there. Branch-free (~10x the branchy loop), float32 in any order (fastmath lets
    it vectorise)."""
    acc = np.float32(0.0)
    for w in range(words):
        bits = _word(key, r, words, w)
        if w < full:
            for lane in range(4):
                c = 4 * w + lane
                d = gr[c]
                m = np.float32(((bits >> np.uint64(16 * lane)) & np.uint64(0xFFFF)) < thr)
                gr[c] = m * d * scale2
                acc += m * d * d
        else:
            for c in range(4 * w, g):
                d = gr[c]
                m = np.float32(_lane(bits, c) < thr)
                gr[c] = m * d * scale2
                acc += m * d * d
    return acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def random_masked_loss(pred, x, key, threshold, scale2, grad, partial):
    """Squared error on the positions the random mask dropped, summed per row; grad = scale2 · (pred − x) there,
    0 elsewhere. Each row's difference is formed in grad and masked there while the row is in cache."""
    n, g = x.shape
    words, full = (g + 3) // 4, g // 4
    thr = np.uint64(threshold)
    for r in prange(n):
        pr, xr, gr = pred[r], x[r], grad[r]
        for c in range(g):
            gr[c] = pr[c] - xr[c]
        partial[r] = _masked_row(gr, r, key, words, full, g, thr, scale2)


@numba.njit(parallel=True, fastmath=True, cache=True)
def random_masked_loss_csr(pred, indptr, indices, data, key, threshold, scale2, grad, partial):
    """random_masked_loss with the target x as CSR: each row of grad first holds pred − x (pred, then the stored
    values subtracted), then the same masked pass."""
    n, g = pred.shape
    words, full = (g + 3) // 4, g // 4
    thr = np.uint64(threshold)
    for r in prange(n):
        pr, gr = pred[r], grad[r]
        for c in range(g):
            gr[c] = pr[c]
        for k in range(indptr[r], indptr[r + 1]):
            gr[indices[k]] -= data[k]
        partial[r] = _masked_row(gr, r, key, words, full, g, thr, scale2)


@numba.njit(parallel=True, cache=True)
def csr_scatter(indptr, indices, data, out):
    """out = the dense rows of a CSR (each row zeroed and filled in one pass, while it is in cache)."""
    for r in prange(out.shape[0]):
        row = out[r]
        row[:] = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            row[indices[k]] = data[k]


@numba.njit(parallel=True, cache=True)
def minus_csr(base, indptr, indices, data, out):
    """out = base − the dense rows of a CSR, row by row, without the dense rows."""
    for r in prange(out.shape[0]):
        row = out[r]
        row[:] = base[r]
        for k in range(indptr[r], indptr[r + 1]):
            row[indices[k]] -= data[k]
