"""Masking for masked autoencoders, the whole op in one place: the mask modes, the `MaskSpec` that regenerates a
mask without storing it, the Triton kernel, the CPU path (numba) and the torch reference, and the public functions
`mask_spec`, `apply_mask`, `random_mask`, `gene_program_mask`, `isolated_mask`.

A spec says, for every (cell, gene), whether the input keeps the gene and whether the loss reads it. Random masks
are regenerated from a counter-based key: Philox in Triton, and on CPU a hash of (key, row, gene) (below). Programme
masks come from per-row bitsets (one bit per gene, 32 genes per int32 word, as
`loaders.genesets.ProgrammeIndex.bits` packs them); which programmes, and which TF, is drawn here from a
torch.Generator keyed by (seed, step). The masked input is x · keep · scale, scale being 1 / (1 − fraction masked)
per row, as in the paper; the op is linear, so its backward applies the same mask to the gradient.

Every random draw is keyed by the cell, not by its place in the batch: `row` below is the cell's global store row
(`MaskSpec.cells`), so a cell gets the same mask whichever rank, micro-batch or batch position it lands in, and
2 ranks × B cells draw exactly what 1 rank × 2B draws. The CPU random stream: uniform u ∈ [0, 65,536) for
(row, gene) is 16 bits of splitmix64(key ⊕ (row · W + gene // 4) · φ), lane gene % 4, with W = ⌈genes / 4⌉: one hash
per four genes, computed only where needed. A gene is kept when u ≥ round(rate · 65,536). Rows are independent, so
results do not depend on the thread count. The masked first
layer (masked_linear.py) and the fused loss (recon_loss.py) regenerate masks with `keep_tile` (Triton) and
`keeps` (CPU) from here. Never imports engine or loaders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import prange

from ._triton import constexpr, grid, jit, tile, tl
from .dispatch import backend, cell_uniforms, check_matrix, check_rate, generator, random_key
from .sparse_rows import check_input

# --- the vocabulary ----------------------------------------------------------------------------------------------
RANDOM, DROP_BITS, KEEP_BITS = 0, 1, 2      # how keep(row, gene) is decided
TARGET_MASKED, TARGET_GENE = 0, 2           # the loss reads the masked positions, or one gene per row
# the Triton kernels read the same values as compile-time constants (the compiler accepts no other globals)
RANDOM_, DROP_BITS_, TARGET_GENE_ = constexpr(RANDOM), constexpr(DROP_BITS), constexpr(TARGET_GENE)

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


def threshold16(rate: float) -> int:
    """A gene is kept when its 16-bit uniform is at least this: the rate is honoured to 1/65,536."""
    return round(rate * 65536)


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


# --- the CPU random stream and keep test (numba) -------------------------------------------------------------------
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def word(key, r, words, w):
    """The 64 random bits of word w (genes 4w … 4w + 3) of row r."""
    return _mix(np.uint64(key) ^ (np.uint64(r * words + w) * GOLDEN))


@numba.njit(inline="always")
def lane(bits, c):
    """Gene c's 16-bit uniform out of its word's bits."""
    return (bits >> np.uint64(16 * (c & 3))) & np.uint64(0xFFFF)


@numba.njit(inline="always")
def keeps(mode, key, r, words, c, thr, row_bits, which):
    """Whether the mask keeps gene c of a row: the random stream of cell r (its store row), or bit c of the row's
    programme bitset."""
    if mode == RANDOM:
        return lane(word(key, r, words, c >> 2), c) >= thr
    bit = (row_bits[which, c >> 5] >> (c & 31)) & 1
    return bit == 0 if mode == DROP_BITS else bit == 1


@numba.njit(parallel=True, cache=True)
def _random_keep(key, cells, g, threshold, out):
    """out[r, c] = the random mask keeps (r, c); row r draws as cell cells[r]."""
    words = (g + 3) // 4
    for r in prange(len(cells)):
        for w in range(words):
            bits = word(key, cells[r], words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                out[r, c] = lane(bits, c) >= threshold


@numba.njit(parallel=True, cache=True)
def _random_kept_count(key, cells, g, threshold):
    words = (g + 3) // 4
    total = 0
    for r in prange(len(cells)):
        kept = 0
        for w in range(words):
            bits = word(key, cells[r], words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                kept += lane(bits, c) >= threshold
        total += kept
    return total


@numba.njit(parallel=True, fastmath=True, cache=True)
def _random_apply(x, key, cells, threshold, scale, out):
    """out = x · keep · scale[row] for the random mask, branch-free."""
    n, g = x.shape
    words = (g + 3) // 4
    thr = np.uint64(threshold)
    for r in prange(n):
        xr, orow, s = x[r], out[r], scale[r]
        for w in range(words):
            bits = word(key, cells[r], words, w)
            for c in range(4 * w, min(4 * w + 4, g)):
                orow[c] = xr[c] * s * np.float32(lane(bits, c) >= thr)


# --- the Triton kernels ------------------------------------------------------------------------------------------
@jit
def keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, cells_ptr, n_words, row_ok,
              MODE: tl.constexpr):
    """bool [BLOCK_R, BLOCK_G]: which elements the input keeps. Random: Philox keyed by `key`, counter
    cell · n_genes + gene (the row's global store row, `cells`). Bits: bit `gene` of the row's bitset, dropped
    (DROP_BITS) or kept alone (KEEP_BITS)."""
    if MODE == RANDOM_:
        cell = tl.load(cells_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        counters = cell[:, None] * n_genes + cols[None, :]
        keep = tl.rand(key, counters) >= rate
    else:
        which = tl.load(row_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        words = tl.load(row_bits_ptr + which[:, None] * n_words + (cols[None, :] // 32),
                        mask=row_ok[:, None] & (cols[None, :] < n_genes), other=0)
        bit = (words >> (cols[None, :] % 32)) & 1
        keep = (bit == 0) if MODE == DROP_BITS_ else (bit == 1)
    return keep


@jit
def _mask_kernel(x_ptr, out_ptr, scale_ptr, row_bits_ptr, row_index_ptr, cells_ptr, n_cells, n_genes, n_words, key,
                 rate,
                 MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < n_cells
    inside = row_ok[:, None] & (cols[None, :] < n_genes)
    offsets = rows[:, None].to(tl.int64) * n_genes + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    keep = keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, cells_ptr, n_words, row_ok, MODE)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + offsets, tl.where(keep, x * scale[:, None], 0.0), mask=inside)


@jit
def _kept_kernel(partial_ptr, row_bits_ptr, row_index_ptr, cells_ptr, n_cells, n_genes, n_words, key, rate,
                 MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """How many positions of its tile the mask keeps, per program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < n_cells
    inside = row_ok[:, None] & (cols[None, :] < n_genes)
    keep = keep_tile(rows, cols, n_genes, key, rate, row_bits_ptr, row_index_ptr, cells_ptr, n_words, row_ok, MODE)
    kept = tl.sum(tl.sum(tl.where(keep & inside, 1, 0), axis=1), axis=0)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), kept)


def mask_triton(x: torch.Tensor, spec: "MaskSpec") -> torch.Tensor:
    """x · keep · scale by the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    blocks = tile(*x.shape, x.is_cuda)
    _mask_kernel[grid(*x.shape, blocks)](x, out, spec.scale, spec.row_bits, spec.row_index, spec.cells, x.shape[0],
                                         x.shape[1],
                                         spec.row_bits.shape[1], spec.key, spec.rate, MODE=spec.mode,
                                         BLOCK_R=blocks[0], BLOCK_G=blocks[1])
    return out


def _kept_triton(spec: "MaskSpec") -> int:
    blocks = tile(*spec.shape, spec.scale.is_cuda)
    g = grid(*spec.shape, blocks)
    partial = torch.empty(g[0] * g[1], dtype=torch.int32, device=spec.scale.device)
    _kept_kernel[g](partial, spec.row_bits, spec.row_index, spec.cells, spec.n_cells, spec.n_genes,
                    spec.row_bits.shape[1],
                    spec.key, spec.rate, MODE=spec.mode, BLOCK_R=blocks[0], BLOCK_G=blocks[1])
    return int(partial.sum())


# --- the spec ----------------------------------------------------------------------------------------------------
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
    cells: torch.Tensor         # int64 [B]: each row's global store row, the counter of its random draws
    triton: bool                # whose random stream: Philox (Triton) or the CPU hash above

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_cells, self.n_genes

    def keep(self) -> torch.Tensor:
        """bool [B, G]: the input positions kept (the mask materialised; a mask shared by every row comes back as a
        broadcast view of one row)."""
        if self.mode == RANDOM:
            if self.triton:
                return mask_triton(torch.ones(self.shape, device=self.scale.device), self) != 0
            out = np.empty(self.shape, np.bool_)
            _random_keep(self.key, self.cells.cpu().numpy(), self.n_genes, threshold16(self.rate), out)
            return torch.from_numpy(out).to(self.scale.device)
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

    def kept(self) -> int:
        """How many (cell, gene) positions the input keeps, counted: from the bitsets for programme masks,
        regenerating the random stream (a hash per four genes, or a Triton reduction) for random ones."""
        if self.mode == RANDOM:
            if self.rate == 0.0:
                return self.n_cells * self.n_genes
            if self.triton:
                return _kept_triton(self)
            return int(_random_kept_count(self.key, self.cells.cpu().numpy(), self.n_genes, threshold16(self.rate)))
        per_row = torch.from_numpy(_POPCOUNT[self.row_bits.cpu().numpy().view(np.uint8)].sum(1))
        kept = per_row if self.mode == KEEP_BITS else self.n_genes - per_row
        return int(kept[self.row_index.cpu().long()].sum())

    def masked_fraction(self) -> float:
        """The realised fraction of (cell, gene) positions the input hides."""
        return 1.0 - self.kept() / max(1, self.n_cells * self.n_genes)


def cell_ids(x, cells: torch.Tensor | None) -> torch.Tensor:
    """The cells' global store rows as int64 on x's device, checked; None: the rows' places in the batch (a caller
    with one batch and no store)."""
    n = x.shape[0]
    if cells is None:
        return torch.arange(n, dtype=torch.int64, device=x.device)
    if not isinstance(cells, torch.Tensor) or cells.shape != (n,) or cells.dtype.is_floating_point:
        raise ValueError(f"cells must be an integer tensor of the batch's {n} store rows, got "
                         f"{getattr(cells, 'dtype', type(cells).__name__)} {tuple(getattr(cells, 'shape', ()))}")
    return cells.to(x.device, torch.int64)


def _spec(x, mode, target, key, rate, row_bits, row_index, scale, target_gene=None, triton=False,
          cells=None) -> MaskSpec:
    n, g = x.shape
    dev = x.device
    return MaskSpec(mode, target, key, rate, n, g, row_bits.to(dev, torch.int32), row_index.to(dev, torch.int32),
                    scale.to(dev, torch.float32),
                    torch.zeros(n, dtype=torch.int32, device=dev) if target_gene is None else target_gene.to(
                        dev, torch.int32), cell_ids(x, cells), triton)


def random_spec(x, rate: float, seed: int, step: int, triton: bool, cells=None, stream: int = 0) -> MaskSpec:
    """Each element masked with probability `rate`; the input upscaled by 1 / (1 - rate) (the paper). `stream`
    tells apart independent masks of one step (a view's dropout, each dropout layer)."""
    rate = check_rate(rate)
    n = x.shape[0]
    empty = torch.zeros(1, 1, dtype=torch.int32)
    return _spec(x, RANDOM, TARGET_MASKED, random_key(seed, step, stream), rate, empty,
                 torch.zeros(n, dtype=torch.int32), torch.full((n,), 1.0 / (1.0 - rate)), triton=triton, cells=cells)


def no_mask(x) -> MaskSpec:
    """Keeps every position, unscaled: what an unmasked pass (reconstruction, supervised, a clean view) applies."""
    return random_spec(x, 0.0, 0, 0, False)


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


def _count_for_coverage(programmes: torch.Tensor, target: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """(a random order of the programmes, how many of them in that order first cover `target` genes)."""
    order = torch.randperm(programmes.shape[0], generator=gen)
    words = np.bitwise_or.accumulate(programmes.cpu().numpy()[order.numpy()], axis=0)
    covered = _POPCOUNT[words.view(np.uint8)].sum(1)
    return order, min(int(np.searchsorted(covered, target)) + 1, len(order))


def _union_per_cell(programmes: torch.Tensor, picks: torch.Tensor, n_genes: int) -> torch.Tensor:
    """bool [B, G]: the genes of each cell's picked programmes, as a (cells × programmes) · (programmes × genes)
    product; sparse on CPU, where a membership matrix such as GO's is ~0.4 % full."""
    member = unpack_bits(programmes, n_genes).to(torch.float32)
    if picks.is_cuda:
        return (picks.to(torch.float32) @ member) > 0
    return torch.sparse.mm(member.t().to_sparse(), picks.t().to(torch.float32)).t() > 0


def programme_spec(x, programmes: torch.Tensor, rate: float, seed: int, step: int, per: str, triton: bool,
                   rate_of: str = "programmes", cells=None) -> MaskSpec:
    """Programmes masked, chosen once per step ("batch", the paper: the global batch shares them, whichever rank
    holds a cell) or afresh per cell ("cell", keyed by the cell's store row): ⌊rate · P⌋ of them
    (rate_of="programmes", the paper), or as many as it takes, in a random order, to mask `rate` of the genes
    (rate_of="genes"; per cell, that count is calibrated on the step's own random order)."""
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
            keys = cell_uniforms(random_key(seed, step, 4), cell_ids(x, cells), p)
            picks = keys <= keys.kthvalue(k, dim=1, keepdim=True).values
        bits = pack_bits(_union_per_cell(programmes, picks.to(x.device), g))
        row_index = torch.arange(n, dtype=torch.int32)
    else:
        raise ValueError(f"per must be 'batch' or 'cell', not {per!r}")
    n_masked = unpack_bits(bits, g).sum(1).to(torch.float32)
    scale = (g / (g - n_masked).clamp(min=1))[row_index.long().to(x.device)]
    return _spec(x, DROP_BITS, TARGET_MASKED, random_key(seed, step), rate, bits, row_index, scale, triton=triton,
                 cells=cells)


def _without_own_tf(programmes: torch.Tensor, tf_genes: torch.Tensor, n_genes: int, device) -> torch.Tensor:
    """Each TF removed from its own target set: the input must never show the answer."""
    if tf_genes.shape != (programmes.shape[0],):
        raise ValueError(f"tf_genes has shape {tuple(tf_genes.shape)}; expected one TF gene per programme "
                         f"({programmes.shape[0]})")
    if len(tf_genes) and (tf_genes.min() < 0 or tf_genes.max() >= n_genes):
        raise ValueError(f"tf_genes must be gene columns in [0, {n_genes})")
    own = torch.zeros(programmes.shape[0], n_genes, dtype=torch.bool, device=device)
    own[torch.arange(len(tf_genes), device=device), tf_genes.long().to(device)] = True
    return torch.bitwise_and(programmes, torch.bitwise_not(pack_bits(own)))


def isolated_spec(x, programmes: torch.Tensor, seed: int, step: int, tf_genes: torch.Tensor | None, per: str,
                  triton: bool, cells=None) -> MaskSpec:
    """Keep one programme's genes and mask every other gene. GP→GP: the loss reads the masked genes (the rest of
    the transcriptome from one programme, as the reference code computes it). GP→TF (`tf_genes`, programmes being TF
    target sets): the TF is removed from its own programme and the loss reads the TF alone."""
    n, g = x.shape
    programmes = _check_programmes(programmes, g, x.device)
    if tf_genes is not None:
        programmes = _without_own_tf(programmes, tf_genes, g, x.device)
    sizes = unpack_bits(programmes, g).sum(1)
    usable = torch.nonzero(sizes > 0).flatten()
    if len(usable) == 0:
        raise ValueError("no programme has a gene in this gene space: nothing to isolate")
    if per == "cell":  # each cell's own draw, keyed by its store row
        u = cell_uniforms(random_key(seed, step, 2), cell_ids(x, cells), 1)[:, 0]
        pick = (u * len(usable)).long().clamp_(max=len(usable) - 1)
    elif per == "batch":
        pick = torch.randint(len(usable), (1,), generator=generator(random_key(seed, step, 2), "cpu"))
    else:
        raise ValueError(f"per must be 'batch' or 'cell', not {per!r}")
    chosen = usable[pick.to(usable.device)].expand(n)
    scale = g / sizes[chosen].to(torch.float32)
    target, target_gene = (TARGET_GENE, tf_genes.to(x.device)[chosen]) if tf_genes is not None else (TARGET_MASKED,
                                                                                                       None)
    return _spec(x, KEEP_BITS, target, random_key(seed, step), 0.0, programmes, chosen, scale, target_gene, triton,
                 cells)


# --- applying a spec ---------------------------------------------------------------------------------------------
def mask_reference(x: torch.Tensor, spec: MaskSpec, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference: x · keep · scale, with `keep` materialised from the spec unless given."""
    keep = spec.keep() if keep is None else keep
    return torch.where(keep, x, 0.0).mul_(spec.scale[:, None])


def _mask_cpu_random(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """The random mask applied in one numba pass that regenerates the bits."""
    x = x.detach().contiguous()
    out = torch.empty_like(x)
    _random_apply(x.numpy(), spec.key, spec.cells.numpy(), threshold16(spec.rate), spec.scale.numpy(), out.numpy())
    return out


def _apply(x: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    if spec.triton:
        return mask_triton(x, spec)
    if spec.mode == RANDOM and backend(x) == "numba":
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
              per: str = "batch", rate_of: str = "programmes", cells: torch.Tensor | None = None,
              stream: int = 0) -> MaskSpec:
    """The spec of a mask ("random", "gene_program", "isolated") without applying it: for `masked_linear`, which
    applies it inside the first layer, and `masked_recon_loss`. `rate_of` (gene_program): the rate is a fraction of
    the programmes (the paper) or of the genes. x: the batch, dense or SparseRows (only its shape and device count).
    `cells`: the batch's global store rows (Batch.index), which key every per-cell draw (None: the rows' places in
    this batch); `stream` (random masks) tells apart independent masks of one step."""
    check_input(x, "x")
    triton = backend(x) == "triton"
    if mask == "random":
        return random_spec(x, rate, seed, step, triton, cells, stream)
    if mask == "gene_program":
        return programme_spec(x, programmes, rate, seed, step, per, triton, rate_of, cells)
    if mask == "isolated":
        return isolated_spec(x, programmes, seed, step, tf_genes, per, triton, cells)
    raise ValueError(f"unknown mask {mask!r}: random, gene_program or isolated")


def random_mask(x: torch.Tensor, rate: float = 0.5, seed: int = 0, step: int = 0,
                cells: torch.Tensor | None = None) -> tuple[torch.Tensor, MaskSpec]:
    """Mask each element with probability `rate` (paper: 0.5); the rest is upscaled by 1 / (1 − rate)."""
    spec = mask_spec(x, "random", rate, seed, step, cells=cells)
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


__all__ = ["DROP_BITS", "KEEP_BITS", "RANDOM", "TARGET_GENE", "TARGET_MASKED", "MaskSpec", "apply_mask", "cell_ids",
           "gene_program_mask", "isolated_mask", "keep_tile", "keeps", "lane", "mask_reference", "mask_spec",
           "no_mask", "pack_bits", "random_mask", "threshold16", "unpack_bits", "word"]
