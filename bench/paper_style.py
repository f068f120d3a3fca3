"""The reference implementation's eager per-element formulations (Bernoulli mask tensors, numpy programme masks
built per batch, torch.distributions NB noise, unfused loss with autograd): the baselines the kernel and
training benchmarks measure ours against. Written from the reference code's description, not copied."""
from __future__ import annotations

import math

import numpy as np
import torch


def eager_random_mask_loss(x, pred, rate=0.5):
    mask = torch.bernoulli(torch.full_like(x, rate))
    x_in = x * (1 - mask) / (1 - rate)
    p = pred.detach().requires_grad_()
    loss = ((p - x) ** 2 * mask).sum() / x.numel()
    loss.backward()
    return x_in, loss, p.grad


def eager_programme_mask(x, members: list[np.ndarray], rate=0.5, rng=np.random.default_rng(0)):
    chosen = rng.choice(len(members), math.floor(rate * len(members)), replace=False)
    mask = np.zeros(x.shape, dtype=np.float32)
    for p in chosen:
        mask[:, members[p]] = 1.0
    mask = torch.from_numpy(mask).to(x.device)
    frac = mask[0].mean()
    return x * (1 - mask) / (1 - frac)


def eager_nb_augment(x, intensity=0.1):
    noise = torch.distributions.NegativeBinomial(total_count=10, probs=torch.rand_like(x)).sample()
    noise = torch.log1p(noise / noise.sum(1, keepdim=True) * 1e4)
    return torch.clamp(x + intensity * noise, min=0)


def eager_csr_to_dense(indptr, indices, data, n_genes):
    dense = torch.sparse_csr_tensor(indptr, indices.long(), data.float(), (len(indptr) - 1, n_genes)).to_dense()
    return torch.log1p(dense / dense.sum(1, keepdim=True) * 1e4)
