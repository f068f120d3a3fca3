"""Fused masked reconstruction loss: MSE over the positions a MaskSpec selects, normalised as the paper does
(sum over selected positions ÷ number of all elements), with ∂loss/∂pred produced in the same pass.

The Triton kernel regenerates the selection from the spec (`keep_tile`), so no mask is stored; each program
writes its partial sum and its gradient tile, and the partials are added in a fixed order (deterministic). On CPU
the random mask's loss is one numba pass that regenerates the bits the same way (masking.py's stream); given the
batch as CSR it reads the target's stored values only. Never imports engine or loaders.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import prange

from ._triton import grid, jit, tile, tl
from .dispatch import backend, check_matrix, check_same
from .masking import RANDOM, TARGET_GENE, TARGET_GENE_, TARGET_MASKED, MaskSpec, keep_tile, lane, threshold16, word
from .sparse_rows import SparseRows, check_input, dense, difference


# --- the CPU path (numba) ----------------------------------------------------------------------------------------
@numba.njit(inline="always", fastmath=True)
def _masked_row(gr, r, key, words, full, g, thr, scale2):
    """A row of grad (cell r's random stream) holds pred − x: keep it (× scale2) where the random mask dropped the gene, 0 elsewhere, and
    return the squared error summed there. Branch-free (~10x the branchy loop), float32 in any order (fastmath lets
    it vectorise)."""
    acc = np.float32(0.0)
    for w in range(words):
        bits = word(key, r, words, w)
        if w < full:
            for k in range(4):
                c = 4 * w + k
                d = gr[c]
                m = np.float32(((bits >> np.uint64(16 * k)) & np.uint64(0xFFFF)) < thr)
                gr[c] = m * d * scale2
                acc += m * d * d
        else:
            for c in range(4 * w, g):
                d = gr[c]
                m = np.float32(lane(bits, c) < thr)
                gr[c] = m * d * scale2
                acc += m * d * d
    return acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def _random_masked_loss(pred, x, key, cells, threshold, scale2, grad, partial):
    """Squared error on the positions the random mask dropped, summed per row; grad = scale2 · (pred − x) there,
    0 elsewhere. Each row's difference is formed in grad and masked there while the row is in cache."""
    n, g = x.shape
    words, full = (g + 3) // 4, g // 4
    thr = np.uint64(threshold)
    for r in prange(n):
        pr, xr, gr = pred[r], x[r], grad[r]
        for c in range(g):
            gr[c] = pr[c] - xr[c]
        partial[r] = _masked_row(gr, cells[r], key, words, full, g, thr, scale2)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _random_masked_loss_csr(pred, indptr, indices, data, key, cells, threshold, scale2, grad, partial):
    """_random_masked_loss with the target x as CSR: each row of grad first holds pred − x (pred, then the stored
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
        partial[r] = _masked_row(gr, cells[r], key, words, full, g, thr, scale2)


# --- the Triton kernel -------------------------------------------------------------------------------------------


@jit
def _loss_kernel(pred_ptr, x_ptr, grad_ptr, partial_ptr, row_bits_ptr, row_index_ptr, cells_ptr, target_gene_ptr,
                 n_cells, n_genes, n_words, key, rate, inv_n, MODE: tl.constexpr, TARGET: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < n_cells
    inside = row_ok[:, None] & (cols[None, :] < n_genes)
    offsets = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
    diff = tl.load(pred_ptr + offsets, mask=inside, other=0.0) - tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if TARGET == TARGET_GENE_:
        gene = tl.load(target_gene_ptr + rows, mask=row_ok, other=-1)
        selected = cols[None, :] == gene[:, None]
    else:
        keep = keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, cells_ptr, n_words, row_ok,
                         MODE)
        selected = keep == 0
    selected = selected & inside
    tl.store(grad_ptr + offsets, tl.where(selected, 2.0 * diff * inv_n, 0.0), mask=inside)
    partial = tl.sum(tl.sum(tl.where(selected, diff * diff, 0.0), axis=1), axis=0)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), partial)


def _loss_triton(pred: torch.Tensor, x: torch.Tensor, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    pred, x = pred.contiguous(), x.contiguous()
    grad = torch.empty_like(pred)
    blocks = tile(*x.shape, x.is_cuda)
    g = grid(*x.shape, blocks)
    partial = torch.empty(g[0] * g[1], dtype=torch.float32, device=x.device)
    inv_n = 1.0 / x.numel()
    _loss_kernel[g](pred, x, grad, partial, spec.row_bits, spec.row_index, spec.cells, spec.target_gene, x.shape[0],
                    x.shape[1],
                    spec.row_bits.shape[1], spec.key, spec.rate, inv_n, MODE=spec.mode, TARGET=spec.target,
                    BLOCK_R=blocks[0], BLOCK_G=blocks[1])
    return partial.sum() * inv_n, grad


def recon_loss_reference(pred: torch.Tensor, x, spec: MaskSpec,
                         selected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂pred) in torch, the selection materialised from the spec unless given; x dense or SparseRows."""
    inv_n = 1.0 / x.numel()
    diff = difference(pred.detach(), x)
    if selected is None and spec.target == TARGET_GENE:
        rows = torch.arange(x.shape[0], device=x.device)
        cols = spec.target_gene.long()
        picked = diff[rows, cols]
        grad = torch.zeros_like(diff)
        grad[rows, cols] = 2.0 * picked * inv_n
        return picked.square().sum() * inv_n, grad
    if selected is None and spec.target == TARGET_MASKED:
        diff.masked_fill_(spec.keep(), 0.0)  # in place: no second full-size temporary
    else:
        diff = torch.where(spec.selected() if selected is None else selected, diff, 0.0)
    flat = diff.view(-1)
    return torch.dot(flat, flat) * inv_n, diff.mul_(2.0 * inv_n)


def _loss_cpu_random(pred: torch.Tensor, x, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The random mask's loss in one numba pass that regenerates the mask bits; with SparseRows the pass reads the
    target's nonzeros, every other target being 0."""
    pred = pred.detach().contiguous()
    grad, partial = torch.empty_like(pred), np.empty(len(pred), np.float64)
    inv_n = 1.0 / x.numel()
    args = (spec.key, spec.cells.numpy(), threshold16(spec.rate), np.float32(2.0 * inv_n), grad.numpy(), partial)
    if isinstance(x, SparseRows):
        _random_masked_loss_csr(pred.numpy(), *x.numpy(), *args)
    else:
        _random_masked_loss(pred.numpy(), x.detach().contiguous().numpy(), *args)
    return torch.tensor(partial.sum() * inv_n, dtype=torch.float32), grad


class _MaskedReconLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x, spec):
        if spec.triton:
            loss, grad = _loss_triton(pred, dense(x), spec)
        elif (spec.mode == RANDOM and spec.target == TARGET_MASKED and backend(pred) == "numba"
              and not (isinstance(x, SparseRows) and x.counts)):
            loss, grad = _loss_cpu_random(pred, x, spec)
        else:
            loss, grad = recon_loss_reference(pred, x, spec)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def masked_recon_loss(pred: torch.Tensor, target, spec: MaskSpec) -> torch.Tensor:
    """Scalar loss; its gradient w.r.t. `pred` was computed in the forward pass and is replayed by backward.
    `target`: the batch, dense or SparseRows (a masked position that is not a stored value has target 0)."""
    check_matrix(pred, "pred")
    check_input(target, "target")
    check_same(pred, target, "pred and target")
    if tuple(pred.shape) != spec.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, the mask spec {spec.shape}")
    if pred.device != spec.scale.device:
        raise ValueError(f"pred is on {pred.device}, the mask spec on {spec.scale.device}")
    return _MaskedReconLoss.apply(pred, target.detach(), spec)


__all__ = ["masked_recon_loss", "recon_loss_reference"]
