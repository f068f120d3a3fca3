"""Fused masked reconstruction loss: MSE over the positions a MaskSpec selects, normalised as the paper does
(sum over selected positions ÷ number of all elements), with ∂loss/∂pred produced in the same pass.

The Triton kernel regenerates the selection from the spec (`keep_tile`), so no mask is stored; each program
writes its partial sum and its gradient tile, and the partials are added in a fixed order (deterministic). On CPU
the random mask's loss is one numba pass that regenerates the bits the same way (kernels/cpu.py).
Never imports engine or loaders.
"""
from __future__ import annotations

import numpy as np
import torch

from ._triton import grid, jit, tile, tl
from .dispatch import check_matrix, check_same
from .mask_kernel import keep_tile
from .mask_modes import RANDOM, TARGET_GENE, TARGET_MASKED, threshold16
from .mask_spec import MaskSpec
from .sparse_rows import SparseRows, check_input, dense, difference


@jit
def _loss_kernel(pred_ptr, x_ptr, grad_ptr, partial_ptr, row_bits_ptr, row_index_ptr, target_gene_ptr, n_cells,
                 n_genes, n_words, key, rate, inv_n, MODE: tl.constexpr, TARGET: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < n_cells
    inside = row_ok[:, None] & (cols[None, :] < n_genes)
    offsets = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
    diff = tl.load(pred_ptr + offsets, mask=inside, other=0.0) - tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if TARGET == 2:
        gene = tl.load(target_gene_ptr + rows, mask=row_ok, other=-1)
        selected = cols[None, :] == gene[:, None]
    else:
        keep = keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, n_words, row_ok, MODE)
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
    _loss_kernel[g](pred, x, grad, partial, spec.row_bits, spec.row_index, spec.target_gene, x.shape[0], x.shape[1],
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
    """The random mask's loss in one numba pass that regenerates the mask bits (kernels/cpu.py); with SparseRows
    the pass reads the target's nonzeros, every other target being 0."""
    from .cpu import random_masked_loss, random_masked_loss_csr

    pred = pred.detach().contiguous()
    grad, partial = torch.empty_like(pred), np.empty(len(pred), np.float64)
    inv_n = 1.0 / x.numel()
    args = (spec.key, threshold16(spec.rate), np.float32(2.0 * inv_n), grad.numpy(), partial)
    if isinstance(x, SparseRows):
        random_masked_loss_csr(pred.numpy(), *x.numpy(), *args)
    else:
        random_masked_loss(pred.numpy(), x.detach().contiguous().numpy(), *args)
    return torch.tensor(partial.sum() * inv_n, dtype=torch.float32), grad


class _MaskedReconLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x, spec):
        if spec.triton:
            loss, grad = _loss_triton(pred, dense(x), spec)
        elif (spec.mode == RANDOM and spec.target == TARGET_MASKED and pred.device.type == "cpu"
              and not getattr(x, "counts", False)):
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
