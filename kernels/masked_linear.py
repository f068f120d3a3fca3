"""The masked autoencoder's first layer, `linear(x · keep · scale, W, b)`, without materialising the masked input.

On CPU the input is the sparse part of the step: ~9 % of a log1p expression batch is nonzero and the mask
drops half of that, so the kept nonzeros (kernels/cpu.py, one pass) enter a sparse × dense product and the
backward's ∂W is the transposed sparse product; neither touches the 19,350-wide dense batch again. Elsewhere
(CUDA, where dense GEMMs are what the hardware is for, a dense x, or when x needs a gradient) it is the reference:
`F.linear(apply_mask(x, spec), W, b)`. `CELLSSL_SPARSE_INPUT=0` forces the reference (A/B runs, FLOP counts).
Never imports engine or loaders.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from .dispatch import check_matrix
from .mask_modes import threshold16
from .mask_spec import MaskSpec
from .masking import apply_mask

MAX_DENSITY = 0.2  # above this fraction of nonzeros (e.g. an NB-noised view, ~90 %) the dense GEMM is faster


def _sparse(indptr, cols, vals, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta": the product we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols).to(torch.int64),
                                   torch.from_numpy(vals), size=shape)


class _SparseMaskedLinear(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # a float32 sparse product whatever the caller's autocast
    def forward(ctx, x, spec, weight, bias, nonzeros):
        from .cpu import kept_entries

        entries = kept_entries(x.detach().contiguous().numpy(), nonzeros, spec.mode, spec.key, threshold16(spec.rate),
                               spec.row_bits.numpy(), spec.row_index.numpy(), spec.scale.numpy())
        ctx.entries, ctx.shape = entries, tuple(x.shape)
        ctx.save_for_backward(weight)
        out = _sparse(*entries, ctx.shape) @ weight.detach().t().contiguous()
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
        return None, None, grad_w, grad_b, None


def masked_linear(x: torch.Tensor, spec: MaskSpec, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(apply_mask(x, spec), weight, bias); gradients reach weight and bias (and x on the reference path)."""
    check_matrix(x, "x")
    if tuple(x.shape) != spec.shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, the mask spec {spec.shape}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} inputs, x {x.shape[1]} genes")
    sparse = (not spec.triton and x.device.type == "cpu" and not x.requires_grad
              and weight.dtype == torch.float32 and os.environ.get("CELLSSL_SPARSE_INPUT", "1") != "0")
    if sparse:
        from .cpu import nonzeros_per_row

        nonzeros = nonzeros_per_row(x.detach().numpy())
        sparse = nonzeros.sum() <= MAX_DENSITY * x.numel()
    if not sparse:
        return F.linear(x if spec.is_identity else apply_mask(x, spec), weight, bias)
    return _SparseMaskedLinear.apply(x, spec, weight, bias, nonzeros)
