"""Gene-expression reconstruction on held-out cells: explained variance of the reconstructed log1p expression,
variance-weighted (the paper's number) and uniform, over every position or, with `mask_rate`, over masked
positions only (the input has those genes zeroed by the same random mask the masked autoencoder trains with).
`per_batch_mean` beside them: the variance-weighted score of each batch of `batch_size` cells, averaged over the
batches, the form the reference logs (its test step's torchmetrics value, averaged over steps by Lightning)."""
from __future__ import annotations

import numpy as np
import torch

from cellssl import kernels
from cellssl.loaders import CellStore

from ..embed import map_split
from .metrics import ExplainedVariance


def reconstruction_scores(reconstruct, store: CellStore, split: str = "test", mask_rate: float | None = None,
                          seed: int = 0, batch_size: int = 1024) -> dict:
    score, per_batch = ExplainedVariance(store.n_genes), []
    start = store.split(split)[0]

    def one(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        batch = ExplainedVariance(store.n_genes)
        if mask_rate is None:
            batch.update(x.cpu().numpy(), reconstruct(x).float().cpu().numpy())
        else:  # key the mask by the batch's first row: the same cells get the same mask whatever the model
            x_in, spec = kernels.random_mask(x, mask_rate, seed, int(rows[0]) - start)
            masked = ~kernels.apply_mask(torch.ones_like(x), spec).bool()
            batch.update(x.cpu().numpy(), reconstruct(x_in).float().cpu().numpy(), masked.cpu().numpy())
        score.add(batch)
        if batch.n.any():
            per_batch.append(batch.result()["variance_weighted"])
        return torch.zeros(len(x), 0)

    map_split(store, split, one, batch_size)
    return {**score.result(), "per_batch_mean": float(np.mean(per_batch)), "batches": len(per_batch)}
