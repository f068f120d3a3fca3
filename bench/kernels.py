"""Kernel benchmark: each op at batch 8,192 × 19,350, ours beside the paper's eager formulation.

CPU: our torch reference (the CPU production path) vs the eager code the reference implementation ran
(Bernoulli mask tensors, numpy programme masks built per batch, torch.distributions NB, unfused loss with
autograd), as a ratio. GPU (when CUDA is present): the Triton kernel vs eager vs torch.compile(eager).
Every row also gives the bytes the fused op reads and writes per cell and the full-size temporaries the
eager version allocates. Usage: python bench/kernels.py [--cells 8192] [--genes 19350] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from paper_style import eager_csr_to_dense, eager_nb_augment, eager_programme_mask, eager_random_mask_loss

from cellssl import kernels
from cellssl.loaders import TARGET_SUM


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


# --- ours ------------------------------------------------------------------------------------------------
def ours_random_mask_loss(x, pred, rate=0.5):
    x_in, spec = kernels.random_mask(x, rate, seed=0, step=1)
    p = pred.detach().requires_grad_()
    loss = kernels.masked_recon_loss(p, x, spec)
    loss.backward()
    return x_in, loss, p.grad


def programme_bits(n_genes: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    from cellssl.loaders.genes import GeneSpace
    from cellssl.loaders.genesets import index_programmes, read_gmt

    space = GeneSpace.default()
    index = index_programmes(read_gmt(), space, min_genes=15, max_genes=500)
    if n_genes != len(space):
        members = [m[m < n_genes] for m in index.members]
        from cellssl.kernels.masking import pack_bits

        flags = torch.zeros(len(members), n_genes, dtype=torch.bool)
        for p, m in enumerate(members):
            flags[p, torch.from_numpy(m)] = True
        return pack_bits(flags), members
    return torch.from_numpy(index.bits), index.members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8192)
    parser.add_argument("--genes", type=int, default=19350)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    B, G = args.cells, args.genes
    gen = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(B, G, generator=gen) ** 8 * 3, generator=gen)
    x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp(min=1) * TARGET_SUM).to(device)
    pred = (x + 0.1 * torch.randn(B, G, generator=gen).to(device)).contiguous()
    bits, members = programme_bits(G)
    bits = bits.to(device)
    csr = counts.to_sparse_csr()
    indptr, indices, data = (csr.crow_indices().to(device), csr.col_indices().to(torch.int32).to(device),
                             csr.values().to(device))
    nnz_per_cell = len(data) / B
    # (name, eager, ours, fused bytes per cell, eager full-size temporaries, ours full-size temporaries)
    ops = [
        ("random mask + loss (fwd+bwd)", lambda: eager_random_mask_loss(x, pred),
         lambda: ours_random_mask_loss(x, pred), 4 * G * (2 + 3), "7", "2 (output, grad; mask bits hashed, not stored)"),
        ("gene-programme mask (batch)", lambda: eager_programme_mask(x, members),
         lambda: kernels.gene_program_mask(x, bits, 0.5, 0, 1, "batch"), 4 * G * 2, "4 (numpy mask, 3 products)",
         "1 (output)"),
        ("gene-programme mask (cell)", None,
         lambda: kernels.gene_program_mask(x, bits, 0.5, 0, 1, "cell"), 4 * G * 2, "-", "2 (union, output)"),
        ("NB augmentation", lambda: eager_nb_augment(x), lambda: kernels.nb_augment(x, 0.1, 0, 1, TARGET_SUM), 4 * G * 2,
         "6 (probs, gamma, poisson, norm, log1p, sum)", "2 (rand, output) on CPU; 0 in Triton"),
        ("CSR → dense + log1p", lambda: eager_csr_to_dense(indptr, indices, data, G),
         lambda: kernels.csr_to_dense(indptr, indices, data, G, TARGET_SUM),
         int(nnz_per_cell * 16 + 4 * G), "3 (dense, sums, quotient)", "1 (output)"),
    ]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {B} x {G}, "
          f"best of {args.repeats}; CELLSSL_KERNELS={os.environ.get('CELLSSL_KERNELS', 'auto')}")
    header = "| op | eager s | ours s | ours vs eager |"
    if device == "cuda":
        header += " torch.compile(eager) s |"
    print(header + " bytes/cell (fused) | full-size temporaries eager → ours |")
    print("|" + "---|" * (header.count("|") + 1))
    for name, eager, ours, nbytes, tmp_eager, tmp_ours in ops:
        t_ours = timed(ours, args.repeats, sync)
        t_eager = timed(eager, args.repeats, sync) if eager else float("nan")
        row = f"| {name} | {t_eager:.3f} | {t_ours:.3f} | {t_eager / t_ours:.1f}x |"
        if device == "cuda":
            t_comp = timed(torch.compile(eager), args.repeats, sync) if eager else float("nan")
            row += f" {t_comp:.3f} |"
        print(row + f" {nbytes:,} | {tmp_eager} → {tmp_ours} |", flush=True)


if __name__ == "__main__":
    main()
