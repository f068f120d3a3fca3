"""The masked autoencoder's first layer, `linear(x · keep · scale, W, b)`, without materialising the masked input.

On CPU the input is the sparse part of the step: ~9 % of a log1p expression batch is nonzero and the mask
drops half of that, so the kept nonzeros (kernels/cpu.py, one pass) enter a sparse × dense product and the
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

import torch
import torch.nn.functional as F

from .mask_modes import threshold16
from .mask_spec import MaskSpec
from .masking import apply_mask
from .sparse_rows import SparseRows, check_input, dense

MAX_DENSITY = 0.2  # above this fraction of nonzeros (e.g. an NB-noised view, ~90 %) the dense GEMM is faster


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
        from .cpu import csr_transpose

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
    from .cpu import kept_entries, kept_entries_csr, nonzeros_per_row

    args = (spec.mode, spec.key, threshold16(spec.rate), spec.row_bits.numpy(), spec.row_index.numpy(),
            spec.scale.numpy())
    if isinstance(x, SparseRows):
        if x.nnz > MAX_DENSITY * x.numel():
            return None
        return kept_entries_csr(*x.numpy(), x.n_genes, *args)
    values = x.detach().contiguous().numpy()
    nonzeros = nonzeros_per_row(values)
    if nonzeros.sum() > MAX_DENSITY * x.numel():
        return None
    return kept_entries(values, nonzeros, *args)


def masked_linear(x, spec: MaskSpec, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(apply_mask(x, spec), weight, bias) for a dense x or SparseRows; gradients reach weight and bias
    (and a dense x on the reference path)."""
    check_input(x, "x")
    if tuple(x.shape) != spec.shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, the mask spec {spec.shape}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} inputs, x {x.shape[1]} genes")
    sparse = (not spec.triton and x.device.type == "cpu" and not x.requires_grad
              and not getattr(x, "counts", False) and weight.dtype == torch.float32
              and os.environ.get("CELLSSL_SPARSE_INPUT", "1") != "0")
    entries = _kept(x, spec) if sparse else None
    if entries is None:
        x = dense(x)
        return F.linear(x if spec.is_identity else apply_mask(x, spec), weight, bias)
    return _SparseLinear.apply(entries, tuple(x.shape), weight, bias)
