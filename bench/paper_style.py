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


def paper_style_loss(objective, name: str, members, x: torch.Tensor, step: int) -> torch.Tensor:
    """The reference implementation's per-element work around one of our objectives' networks (`name`: its
    experiment-registry name): Bernoulli masks, numpy programme masks, torch.distributions NB noise, unfused
    losses. The augmentation decisions are ours (`view_coins`), made the reference's way."""
    import torch.nn.functional as F

    from cellssl.engine.objectives import view_coins

    ae = objective.autoencoder
    if name == "mae_random":
        mask = torch.bernoulli(torch.full_like(x, 0.5))
        pred = ae(x * (1 - mask) / 0.5)
        return ((pred - x) ** 2 * mask).sum() / x.numel()
    if name == "mae_gene_program":
        x_in = eager_programme_mask(x, members)
        masked = (x_in == 0) & (x != 0)
        return ((ae(x_in) - x) ** 2 * masked).sum() / x.numel()
    views = []
    for view in range(2 if name == "byol" else 1):
        v = x
        noise, drop = view_coins(objective.seed, step, view, 0.5 if name == "byol" else 1.0)
        if noise:
            v = eager_nb_augment(v)
        if drop:
            v = v * torch.bernoulli(torch.full_like(v, 0.9)) / 0.9
        views.append(v)
    if name == "byol":
        def pair(a, b):
            p = F.normalize(objective.predictor(objective.projector(objective.encoder(a))), dim=1)
            with torch.no_grad():
                z = F.normalize(objective.target_projector(objective.target_encoder(b)), dim=1)
            return (2 - 2 * (p * z).sum(1)).mean()
        return pair(views[0], views[1]) + pair(views[1], views[0])
    z1, z2 = objective.projector(objective.encoder(views[0])), objective.projector(objective.encoder(x))
    z1, z2 = (z1 - z1.mean(0)) / z1.std(0), (z2 - z2.mean(0)) / z2.std(0)
    c = z1.T @ z2 / x.shape[0]
    return (torch.diagonal(c) - 1).pow(2).sum() + objective.lambd * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())


PAPER_STYLE = ("mae_random", "mae_gene_program", "byol", "barlow_twins")  # GP→TF cannot run as the reference wrote it


class PaperStyle(torch.nn.Module):
    """An objective with the reference's per-element work (`paper_style_loss`) around the networks of one of ours,
    handed to the Trainer like any objective, so the baseline is timed by the very step that trains ours (dense
    input, fp32 as the reference ran)."""

    def __init__(self, objective: torch.nn.Module, name: str, members=None):
        super().__init__()
        if name not in PAPER_STYLE:
            raise ValueError(f"no paper-style step for {name!r}: the reference's GP→TF branch cannot run as written")
        self.inner, self.name, self.members = objective, name, members
        self.compute_dtype = None

    @property
    def encoder(self):
        return self.inner.encoder

    def after_step(self) -> None:
        self.inner.after_step()

    def forward(self, x, labels=None, step: int = 0):
        loss = paper_style_loss(self.inner, self.name, self.members, x, step)
        return loss, {"loss": loss.detach()}
