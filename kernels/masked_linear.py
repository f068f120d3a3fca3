"""The masked autoencoder's first layer, `linear(x · keep · scale, W, b)`, without materialising the masked input.

On CPU the input is the sparse part of the step: ~9 % of a log1p expression batch is nonzero and the mask
drops half of that, so the kept nonzeros (one numba pass, below) enter a sparse × dense product and the
backward's ∂W is the transposed sparse product; neither touches the 19,350-wide dense batch again. Elsewhere
(CUDA, where dense GEMMs are what the hardware is for, a batch over MAX_DENSITY nonzero, or when x needs a
gradient) it is the reference:
`F.linear(apply_mask(x, spec), W, b)`. A batch that arrives as CSR (`SparseRows`) gives its kept nonzeros without a
dense row ever being scanned. `CELLSSL_SPARSE_INPUT=0` forces the reference (A/B runs, FLOP counts).
Never imports engine or loaders.
"""
from __future__ import annotations

import os
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

from .dispatch import backend
from .masking import MaskSpec, apply_mask, keeps, threshold16
from .sparse_rows import SparseRows, check_input, dense

MAX_DENSITY = 0.2  # above this fraction of nonzeros (e.g. an NB-noised view, ~90 %) the dense GEMM is faster


# --- the CPU path: the masked input's kept nonzeros as CSR, and the CSR transpose for ∂W (numba) -------------------
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
def _fill_kept(x, mode, key, threshold, row_bits, row_index, scale, cells, slots, cols, vals, counts):
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
                keep = keeps(mode, key, cells[r], words, c, thr, row_bits, which)
                cols[j] = c
                vals[j] = xr[c] * s
                j += keep
            counts[r] = j - slots[r]


@numba.njit(parallel=True, cache=True)
def _fill_kept_csr(indptr, indices, data, n_genes, mode, key, threshold, row_bits, row_index, scale, cells, slots,
                   cols, vals, counts):
    """_fill_kept for CSR input: the keep test on each row's stored values only (one spare slot per row as there)."""
    words = (n_genes + 3) // 4
    thr = np.uint64(threshold)
    n = len(indptr) - 1
    for r in prange(n):
        which, s = row_index[r], scale[r]
        j = slots[r]
        for k in range(indptr[r], indptr[r + 1]):
            c = np.int64(indices[k])
            keep = keeps(mode, key, cells[r], words, c, thr, row_bits, which)
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


def kept_entries(x: np.ndarray, nonzeros: np.ndarray, spec_args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masked input x · keep · scale as CSR (indptr int64, cols int32, vals float32), zeros left out;
    `nonzeros`: the nonzeros of each row of x, which the caller has already counted to choose this path."""
    n = x.shape[0]
    slots = np.zeros(n + 1, np.int64)
    np.cumsum(nonzeros + 1, out=slots[1:])
    cols, vals, counts = np.empty(slots[-1], np.int32), np.empty(slots[-1], np.float32), np.empty(n, np.int64)
    _fill_kept(x, *spec_args, slots, cols, vals, counts)
    return _compacted(slots, counts, cols, vals)


def kept_entries_csr(x: SparseRows, spec_args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kept_entries of a batch given as CSR: the same entries, found without a dense row to scan."""
    indptr, indices, data = x.numpy()
    n = len(indptr) - 1
    slots = indptr[:-1] + np.arange(n)
    size = int(indptr[-1]) + n
    cols, vals, counts = np.empty(size, np.int32), np.empty(size, np.float32), np.empty(n, np.int64)
    _fill_kept_csr(indptr, indices, data, x.n_genes, *spec_args, slots, cols, vals, counts)
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


# --- the op ------------------------------------------------------------------------------------------------------


def _sparse(indptr, cols, vals, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta": the product we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols).to(torch.int64),
                                   torch.from_numpy(vals), size=shape)


class _SparseLinear(torch.autograd.Function):
    """linear(entries, weight, bias) for a constant CSR input `entries` (the masked batch's kept nonzeros)."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # a float32 sparse product whatever the caller's autocast
    def forward(ctx, entries, shape, weight, bias):
        ctx.entries, ctx.shape = entries, shape
        ctx.save_for_backward(weight)
        out = _sparse(*entries, shape) @ weight.detach().t().contiguous()
        return out if bias is None else out.add_(bias.detach())

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            t_indptr, t_rows, t_vals = csr_transpose(*ctx.entries, ctx.shape[1])
            grad_w = (_sparse(t_indptr, t_rows, t_vals, ctx.shape[::-1]) @ grad_out.contiguous()).t().contiguous()
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.sum(0)
        return None, None, grad_w, grad_b


def _kept(x, spec: MaskSpec):
    """The masked input's nonzeros as CSR (indptr, cols, vals), or None where the dense product is the faster one
    (more than MAX_DENSITY of the batch nonzero)."""
    args = (spec.mode, spec.key, np.uint64(threshold16(spec.rate)), spec.row_bits.numpy(), spec.row_index.numpy(),
            spec.scale.numpy(), spec.cells.numpy())
    if isinstance(x, SparseRows):
        return None if x.nnz > MAX_DENSITY * x.numel() else kept_entries_csr(x, args)
    values = x.detach().contiguous().numpy()
    nonzeros = np.empty(values.shape[0], np.int64)
    _nonzeros_per_row(values, nonzeros)
    return None if nonzeros.sum() > MAX_DENSITY * x.numel() else kept_entries(values, nonzeros, args)


def masked_linear(x, spec: MaskSpec, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(apply_mask(x, spec), weight, bias) for a dense x or SparseRows; gradients reach weight and bias
    (and a dense x on the reference path)."""
    check_input(x, "x")
    if tuple(x.shape) != spec.shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, the mask spec {spec.shape}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} inputs, x {x.shape[1]} genes")
    sparse = (not spec.triton and backend(weight) == "numba" and x.device.type == "cpu" and not x.requires_grad
              and not (isinstance(x, SparseRows) and x.counts) and weight.dtype == torch.float32
              and os.environ.get("CELLSSL_SPARSE_INPUT", "1") != "0")
    entries = _kept(x, spec) if sparse else None
    if entries is None:
        x = dense(x)
        return F.linear(x if spec.is_identity else apply_mask(x, spec), weight, bias)
    return _SparseLinear.apply(entries, tuple(x.shape), weight, bias)
