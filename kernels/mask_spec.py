"""Mask specifications: everything needed to regenerate a mask, without storing it.

A `MaskSpec` says, for every (cell, gene), whether the gene is kept in the input and whether the loss reads it.
Random masks are regenerated from a counter-based key; programme masks from per-row bitsets (one bit per
gene, 32 genes per int32 word, as `loaders.genesets.ProgrammeIndex.bits` packs them). The choices (which
programmes, which TF) are drawn here from a torch.Generator keyed by (seed, step). The materialising methods
are the torch references of the masks. Never imports engine or loaders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .cpu import random_keep as fill
from .dispatch import check_rate, generator, random_key
from .mask_kernel import mask_triton
from .mask_modes import DROP_BITS, KEEP_BITS, RANDOM, TARGET_GENE, TARGET_MASKED, threshold16

__all__ = ["DROP_BITS", "KEEP_BITS", "RANDOM", "TARGET_GENE", "TARGET_MASKED", "MaskSpec", "isolated_spec",
           "no_mask", "pack_bits", "programme_spec", "random_keep", "random_spec", "threshold16", "unpack_bits"]

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool [R, G] → int32 [R, ceil(G / 32)], bit g % 32 of word g // 32."""
    rows, genes = flags.shape
    words = -(-genes // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64, device=flags.device)
    padded[:, :genes] = flags.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=flags.device),
                                       torch.arange(32, device=flags.device))
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_bits(words: torch.Tensor, n_genes: int) -> torch.Tensor:
    """int32 [R, W] → bool [R, n_genes]."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(-1), shifts), 1)
    return bits.reshape(words.shape[0], words.shape[1] * 32)[:, :n_genes].bool()


def random_keep(key: int, shape: tuple[int, int], rate: float, device) -> torch.Tensor:
    """bool [B, G], each element kept with probability 1 − rate: the CPU random stream of kernels/cpu.py (one
    splitmix64 hash per four genes, ~10x cheaper than torch.bernoulli), materialised."""
    out = np.empty(shape, np.bool_)
    fill(key, shape[0], shape[1], threshold16(rate), out)
    return torch.from_numpy(out).to(device)


def or_reduce(words: torch.Tensor) -> torch.Tensor:
    """Bitwise OR over rows: int32 [K, W] → [1, W] (torch has no OR reduction; numpy does, on CPU)."""
    if words.shape[0] == 0:
        return torch.zeros(1, words.shape[1], dtype=torch.int32, device=words.device)
    if words.is_cuda:
        return pack_bits(unpack_bits(words, words.shape[1] * 32).any(0, keepdim=True))
    return torch.from_numpy(np.bitwise_or.reduce(words.numpy(), axis=0, keepdims=True))


def _check_programmes(programmes: torch.Tensor, n_genes: int, device) -> torch.Tensor:
    if not isinstance(programmes, torch.Tensor) or programmes.dtype != torch.int32 or programmes.dim() != 2:
        raise TypeError("programmes must be an int32 tensor [P, ceil(n_genes / 32)] of bitsets "
                        "(loaders.genesets.ProgrammeIndex.bits)")
    if programmes.shape[1] != -(-n_genes // 32):
        raise ValueError(f"programmes have {programmes.shape[1]} words per row; {n_genes} genes need "
                         f"{-(-n_genes // 32)}: build them against the same gene space")
    if programmes.device != torch.device(device):
        raise ValueError(f"programmes are on {programmes.device}, the data on {device}")
    return programmes


@dataclass(frozen=True)
class MaskSpec:
    mode: int
    target: int
    key: int
    rate: float
    n_cells: int
    n_genes: int
    row_bits: torch.Tensor      # int32 [R, W]
    row_index: torch.Tensor     # int32 [B]: which row of row_bits each cell uses
    scale: torch.Tensor         # float32 [B]: input upscaling, 1 / (1 - fraction masked)
    target_gene: torch.Tensor   # int32 [B] (TARGET_GENE only)
    triton: bool                # whose random stream (Philox in Triton, kernels/cpu.py's hash otherwise)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_cells, self.n_genes

    def keep(self) -> torch.Tensor:
        """bool [B, G]: the input positions kept (the mask's torch reference; Triton's via its kernel). A mask
        shared by every row comes back as a broadcast view of one row."""
        if self.mode == RANDOM:
            if self.triton:
                return mask_triton(torch.ones(self.shape, device=self.scale.device), self) != 0
            # the CPU path keeps the bool mask it drew (1 byte per element) for the loss: drawing it again
            # costs more than holding it; the Triton path stores nothing and regenerates
            if "keep" not in self._cache:
                self._cache["keep"] = random_keep(self.key, self.shape, self.rate, self.scale.device)
            return self._cache["keep"]
        keep = unpack_bits(self.row_bits, self.n_genes)
        keep = ~keep if self.mode == DROP_BITS else keep
        return keep.expand(self.n_cells, -1) if len(keep) == 1 else keep[self.row_index.long()]

    def selected(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """bool [B, G]: the positions the reconstruction loss reads: never one the input shows."""
        if self.target == TARGET_GENE:
            cols = torch.arange(self.n_genes, device=self.target_gene.device)
            return cols[None, :] == self.target_gene.long()[:, None]
        return ~(self.keep() if keep is None else keep)

    @property
    def is_identity(self) -> bool:
        """Keeps every position unscaled (`no_mask`): first layers may skip applying it."""
        return self.mode == RANDOM and self.rate == 0.0

    def masked_fraction(self) -> float:
        """The realised fraction of (cell, gene) positions the input hides: counted from the bitsets for programme
        masks, from the drawn mask where the CPU path holds it, else the random mask's rate (at 8,192 × 19,350
        positions its realised value is within 1e-4 of the rate)."""
        if self.mode == RANDOM:
            keep = self._cache.get("keep")
            return self.rate if keep is None else 1.0 - float(keep.float().mean())
        per_row = torch.from_numpy(_POPCOUNT[self.row_bits.cpu().numpy().view(np.uint8)].sum(1))
        kept = per_row if self.mode == KEEP_BITS else self.n_genes - per_row
        return 1.0 - float(kept[self.row_index.cpu().long()].float().mean()) / self.n_genes


def _spec(x, mode, target, key, rate, row_bits, row_index, scale, target_gene=None, triton=False) -> MaskSpec:
    n, g = x.shape
    dev = x.device
    return MaskSpec(mode, target, key, rate, n, g, row_bits.to(dev, torch.int32), row_index.to(dev, torch.int32),
                    scale.to(dev, torch.float32),
                    torch.zeros(n, dtype=torch.int32, device=dev) if target_gene is None else target_gene.to(
                        dev, torch.int32), triton)


def random_spec(x: torch.Tensor, rate: float, seed: int, step: int, triton: bool) -> MaskSpec:
    """Each element masked with probability `rate`; the input upscaled by 1 / (1 - rate) (the paper)."""
    rate = check_rate(rate)
    n = x.shape[0]
    empty = torch.zeros(1, 1, dtype=torch.int32)
    return _spec(x, RANDOM, TARGET_MASKED, random_key(seed, step), rate, empty, torch.zeros(n, dtype=torch.int32),
                 torch.full((n,), 1.0 / (1.0 - rate)), triton=triton)


def no_mask(x: torch.Tensor) -> MaskSpec:
    """Keeps every position, unscaled: what an unmasked pass (reconstruction, supervised, a clean view) applies."""
    return random_spec(x, 0.0, 0, 0, False)


def _count_for_coverage(programmes: torch.Tensor, target: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """(a random order of the programmes, how many of them in that order first cover `target` genes)."""
    order = torch.randperm(programmes.shape[0], generator=gen)
    words = np.bitwise_or.accumulate(programmes.cpu().numpy()[order.numpy()], axis=0)
    covered = _POPCOUNT[words.view(np.uint8)].sum(1)
    return order, min(int(np.searchsorted(covered, target)) + 1, len(order))


def programme_spec(x: torch.Tensor, programmes: torch.Tensor, rate: float, seed: int, step: int,
                   per: str, triton: bool, rate_of: str = "programmes") -> MaskSpec:
    """Programmes masked, chosen once per batch ("batch", the paper) or afresh per cell ("cell"): ⌊rate · P⌋ of them
    (rate_of="programmes", the paper), or as many as it takes, in a random order, to mask `rate` of the genes
    (rate_of="genes"; per cell, that count is calibrated on the batch's own random order)."""
    rate = check_rate(rate)
    n, g = x.shape
    programmes = _check_programmes(programmes, g, x.device)
    p = programmes.shape[0]
    gen = generator(random_key(seed, step, 1), "cpu")
    if rate_of == "programmes":
        order, k = torch.randperm(p, generator=gen), math.floor(rate * p)
    elif rate_of == "genes":
        order, k = _count_for_coverage(programmes, math.ceil(rate * g), gen) if rate > 0 else (torch.arange(p), 0)
    else:
        raise ValueError(f"rate_of must be 'programmes' or 'genes', not {rate_of!r}")
    if per == "batch":
        bits = or_reduce(programmes[order[:k].to(x.device)])
        row_index = torch.zeros(n, dtype=torch.int32)
    elif per == "cell":
        picks = torch.zeros(n, p, dtype=torch.bool)
        if k:  # a uniform k-subset per cell: the k smallest of p random keys
            keys = torch.rand(n, p, generator=gen)
            picks = keys <= keys.kthvalue(k, dim=1, keepdim=True).values
        bits = pack_bits(_union_per_cell(programmes, picks.to(x.device), g))
        row_index = torch.arange(n, dtype=torch.int32)
    else:
        raise ValueError(f"per must be 'batch' or 'cell', not {per!r}")
    n_masked = unpack_bits(bits, g).sum(1).to(torch.float32)
    scale = (g / (g - n_masked).clamp(min=1))[row_index.long().to(x.device)]
    return _spec(x, DROP_BITS, TARGET_MASKED, random_key(seed, step), rate, bits, row_index, scale, triton=triton)


def _union_per_cell(programmes: torch.Tensor, picks: torch.Tensor, n_genes: int) -> torch.Tensor:
    """bool [B, G]: the genes of each cell's picked programmes, as a (cells × programmes) · (programmes × genes)
    product; sparse on CPU, where a membership matrix such as GO's is ~0.4 % full."""
    member = unpack_bits(programmes, n_genes).to(torch.float32)
    if picks.is_cuda:
        return (picks.to(torch.float32) @ member) > 0
    return torch.sparse.mm(member.t().to_sparse(), picks.t().to(torch.float32)).t() > 0


def isolated_spec(x: torch.Tensor, programmes: torch.Tensor, seed: int, step: int, tf_genes: torch.Tensor | None,
                  per: str, triton: bool) -> MaskSpec:
    """Keep one programme's genes and mask every other gene. GP→GP: the loss reads the masked genes (the rest of
    the transcriptome from one programme, as the reference code computes it). GP→TF (`tf_genes`, programmes being TF
    target sets): the TF is removed from its own programme and the loss reads the TF alone."""
    n, g = x.shape
    programmes = _check_programmes(programmes, g, x.device)
    if tf_genes is not None:
        if tf_genes.shape != (programmes.shape[0],):
            raise ValueError(f"tf_genes has shape {tuple(tf_genes.shape)}; expected one TF gene per programme "
                             f"({programmes.shape[0]})")
        if len(tf_genes) and (tf_genes.min() < 0 or tf_genes.max() >= g):
            raise ValueError(f"tf_genes must be gene columns in [0, {g})")
        own = torch.zeros(programmes.shape[0], g, dtype=torch.bool, device=x.device)
        own[torch.arange(len(tf_genes), device=x.device), tf_genes.long().to(x.device)] = True
        programmes = torch.bitwise_and(programmes, torch.bitwise_not(pack_bits(own)))  # never show the answer
    sizes = unpack_bits(programmes, g).sum(1)
    usable = torch.nonzero(sizes > 0).flatten()
    if len(usable) == 0:
        raise ValueError("no programme has a gene in this gene space: nothing to isolate")
    gen = generator(random_key(seed, step, 2), "cpu")
    count = n if per == "cell" else 1 if per == "batch" else None
    if count is None:
        raise ValueError(f"per must be 'batch' or 'cell', not {per!r}")
    chosen = usable[torch.randint(len(usable), (count,), generator=gen).to(usable.device)].expand(n)
    scale = g / sizes[chosen].to(torch.float32)
    target, target_gene = (TARGET_GENE, tf_genes.to(x.device)[chosen]) if tf_genes is not None else (TARGET_MASKED,
                                                                                                       None)
    return _spec(x, KEEP_BITS, target, random_key(seed, step), 0.0, programmes, chosen, scale, target_gene, triton)
