"""Masking ops: random, gene-programme and isolated (GP→GP, GP→TF) masks for masked autoencoders.

Each public function returns (masked input, MaskSpec). The masked input is x · keep · scale, scale being
1 / (1 − fraction masked) per row, as in the paper. One Triton kernel serves every mask kind (the kind is a
compile-time constant) and the loss kernel reuses its `keep_tile` to regenerate the mask; the torch
reference materialises the mask from the spec. Gradients flow through `x` (the op is linear: its backward
applies the same mask to the gradient). Never imports engine or loaders.
"""
from __future__ import annotations

import torch

from ._triton import grid, jit, tile, tl
from .dispatch import check_matrix, use_triton
from .mask_spec import RANDOM, MaskSpec, isolated_spec, no_mask, programme_spec, random_spec, threshold16


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


def _mask_triton(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    blocks = tile(*x.shape, x.is_cuda)
    _mask_kernel[grid(*x.shape, blocks)](x, out, spec.scale, spec.row_bits, spec.row_index, x.shape[0], x.shape[1],
                                         spec.row_bits.shape[1], spec.key, spec.rate, MODE=spec.mode,
                                         BLOCK_R=blocks[0], BLOCK_G=blocks[1])
    return out


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
        return _mask_triton(x, spec)
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


def mask_spec(x: torch.Tensor, mask: str, rate: float = 0.5, seed: int = 0, step: int = 0,
              programmes: torch.Tensor | None = None, tf_genes: torch.Tensor | None = None,
              per: str = "batch", rate_of: str = "programmes") -> MaskSpec:
    """The spec of a mask ("random", "gene_program", "isolated") without applying it: for `masked_linear`, which
    applies it inside the first layer, and `masked_recon_loss`. `rate_of` (gene_program): the rate is a fraction of
    the programmes (the paper) or of the genes."""
    check_matrix(x, "x")
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


__all__ = ["MaskSpec", "apply_mask", "gene_program_mask", "isolated_mask", "keep_tile", "mask_reference",
           "mask_spec", "no_mask", "random_mask"]
