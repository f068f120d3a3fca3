"""Masking ops: random, gene-programme and isolated (GP→GP, GP→TF) masks for masked autoencoders.

Each public function returns (masked input, MaskSpec). The masked input is x · keep · scale, scale being
1 / (1 − fraction masked) per row, as in the paper. One Triton kernel serves every mask kind (the kind is a
compile-time constant) and the loss kernel reuses its `keep_tile` to regenerate the mask; the torch
reference materialises the mask from the spec. Gradients flow through `x` (the op is linear: its backward
applies the same mask to the gradient). Never imports engine or loaders.
"""
from __future__ import annotations

import torch

from .dispatch import check_matrix, use_triton
from .mask_kernel import mask_triton
from .mask_spec import RANDOM, MaskSpec, isolated_spec, no_mask, programme_spec, random_spec, threshold16
from .sparse_rows import check_input


def mask_reference(x: torch.Tensor, spec: MaskSpec, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference: x · keep · scale, with `keep` materialised from the spec unless given."""
    keep = spec.keep() if keep is None else keep
    return torch.where(keep, x, 0.0).mul_(spec.scale[:, None])


def _mask_cpu_random(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The random mask applied in one numba pass that regenerates the bits (kernels/cpu.py)."""
    from .cpu import random_apply

    x = x.detach().contiguous()
    out = torch.empty_like(x)
    random_apply(x.numpy(), spec.key, threshold16(spec.rate), spec.scale.numpy(), out.numpy())
    return out


def _apply(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    if spec.triton:
        return mask_triton(x, spec)
    if spec.mode == RANDOM and x.device.type == "cpu":
        return _mask_cpu_random(x, spec)
    return mask_reference(x, spec)


class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        ctx.spec = spec
        return _apply(x, spec)

    @staticmethod
    def backward(ctx, grad):
        return _apply(grad, ctx.spec), None


def apply_mask(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """Apply an existing spec to x (e.g. the same mask to a second tensor)."""
    check_matrix(x, "x")
    if tuple(x.shape) != spec.shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, the mask spec {spec.shape}")
    if x.device != spec.scale.device:
        raise ValueError(f"x is on {x.device}, the mask spec on {spec.scale.device}")
    return _ApplyMask.apply(x, spec)


def mask_spec(x, mask: str, rate: float = 0.5, seed: int = 0, step: int = 0,
              programmes: torch.Tensor | None = None, tf_genes: torch.Tensor | None = None,
              per: str = "batch", rate_of: str = "programmes") -> MaskSpec:
    """The spec of a mask ("random", "gene_program", "isolated") without applying it: for `masked_linear`, which
    applies it inside the first layer, and `masked_recon_loss`. `rate_of` (gene_program): the rate is a fraction of
    the programmes (the paper) or of the genes. x: the batch, dense or SparseRows (only its shape and device count)."""
    check_input(x, "x")
    if mask == "random":
        return random_spec(x, rate, seed, step, use_triton(x))
    if mask == "gene_program":
        return programme_spec(x, programmes, rate, seed, step, per, use_triton(x), rate_of)
    if mask == "isolated":
        return isolated_spec(x, programmes, seed, step, tf_genes, per, use_triton(x))
    raise ValueError(f"unknown mask {mask!r}: random, gene_program or isolated")


def random_mask(x: torch.Tensor, rate: float = 0.5, seed: int = 0, step: int = 0) -> tuple[torch.Tensor, MaskSpec]:
    """Mask each element with probability `rate` (paper: 0.5); the rest is upscaled by 1 / (1 − rate)."""
    spec = mask_spec(x, "random", rate, seed, step)
    return apply_mask(x, spec), spec


def gene_program_mask(x: torch.Tensor, programmes: torch.Tensor, rate: float = 0.5, seed: int = 0, step: int = 0,
                      per: str = "batch") -> tuple[torch.Tensor, MaskSpec]:
    """Mask the genes of ⌊rate · P⌋ programmes, chosen per batch (the paper) or per cell; `programmes` are int32
    bitsets [P, ceil(G / 32)]. The rest is upscaled by 1 / (1 − fraction of genes masked in that row)."""
    spec = mask_spec(x, "gene_program", rate, seed, step, programmes, per=per)
    return apply_mask(x, spec), spec


def isolated_mask(x: torch.Tensor, programmes: torch.Tensor, seed: int = 0, step: int = 0,
                  tf_genes: torch.Tensor | None = None, per: str = "cell") -> tuple[torch.Tensor, MaskSpec]:
    """Keep only one programme's genes. Without `tf_genes`: GP→GP, the loss reads every other (masked) gene. With
    `tf_genes` (the gene column of each programme's TF, programmes being TF target sets): GP→TF, the input is
    the TF's targets (the TF itself removed) and the loss reads the TF's own expression."""
    spec = mask_spec(x, "isolated", 0.0, seed, step, programmes, tf_genes, per)
    return apply_mask(x, spec), spec


__all__ = ["MaskSpec", "apply_mask", "gene_program_mask", "isolated_mask", "mask_reference",
           "mask_spec", "no_mask", "random_mask"]
