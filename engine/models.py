"""The paper's fully connected networks: MLP blocks, the autoencoder, projection and classifier heads.

Linear → (optional norm) → SELU → Dropout blocks; the encoder maps n_genes → 512 → 512 → 256 → 256 → 64 and the
decoder mirrors it back to the genes. The reference's classifier is the same encoder with ReLU and a block after the
64-unit layer too (`activation="relu"`, `head_block=True`); its Linear layers sit at the same module indices, so a
SELU-pretrained encoder loads into it as the reference's `update_weights` does. Plain torch modules: they know
nothing of DeepSpeed, objectives or data.

Two layers differ from torch's so that a run is the same experiment on any number of ranks: `CellDropout` draws its
mask from the cell (its global store row, set for a forward pass by `cell_draws`) instead of the process's RNG, and
`GlobalBatchNorm` normalises with the statistics of the global batch (torch's SyncBatchNorm on GPUs; on gloo, where
it refuses to run, the moments are summed across ranks by engine/collective.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cellssl import kernels

from .collective import batch_moments, world_size
from .fields import at_least, dropout, opt, widths

# (seed, step, cells) of the forward pass under way: what CellDropout keys its masks by
_DRAWS: contextvars.ContextVar = contextvars.ContextVar("cellssl_cell_draws", default=None)


@contextlib.contextmanager
def cell_draws(seed: int, step: int, cells: torch.Tensor):
    """Within this block, dropout in training draws from (seed, step, layer, cell, unit): `cells` are the global
    store rows of the rows that pass (a tensor of the batch's length)."""
    token = _DRAWS.set((seed, step, cells))
    try:
        yield
    finally:
        _DRAWS.reset(token)


class CellDropout(nn.Dropout):
    """Dropout whose mask is a function of (seed, step, this layer, the cell, the unit): the same on any rank and
    in any batch position, regenerated in the backward pass rather than stored (kernels.apply_mask). Outside
    `cell_draws` (a network used on its own) it is torch's dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draws = _DRAWS.get()
        if not self.training or self.p == 0 or draws is None:
            return super().forward(x)
        seed, step, cells = draws
        if len(cells) != x.shape[0]:
            raise ValueError(f"dropout keyed by {len(cells)} cells met a batch of {x.shape[0]} rows")
        stream = getattr(self, "stream", 0)
        spec = kernels.mask_spec(x, "random", self.p, seed, step, cells=cells, stream=stream)
        return kernels.apply_mask(x.float().contiguous(), spec).to(x.dtype)


def number_dropouts(module: nn.Module) -> None:
    """Give each CellDropout of `module` its own random stream, from its name in the module (so an online and a
    target network, or an encoder and its decoder, draw independent masks)."""
    for name, m in module.named_modules():
        if isinstance(m, CellDropout):
            m.stream = 16 + zlib.crc32(name.encode())


class GlobalBatchNorm(nn.SyncBatchNorm):
    """BatchNorm1d over the global batch: in training the mean and variance are all ranks' (differentiable), and the
    running statistics move identically on every rank; in evaluation the running statistics, as torch's. One process:
    torch's fused BatchNorm; several on GPUs: torch's SyncBatchNorm (NCCL); several on CPUs (gloo, where
    SyncBatchNorm refuses to run): the moments summed across ranks here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:  # (SyncBatchNorm's own fallback refuses CPU tensors first)
            return nn.modules.batchnorm._BatchNorm.forward(self, x)
        if x.is_cuda:
            return super().forward(x)
        mean, var, n = batch_moments(x)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=m)
        out = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column to zero mean and unit variance over the global batch (BatchNorm without affine or running
    statistics: Barlow Twins' standardisation)."""
    if world_size() == 1:
        return F.batch_norm(z.float(), None, None, training=True, eps=eps)
    mean, var, _ = batch_moments(z)
    return (z.float() - mean) * torch.rsqrt(var + eps)


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = opt((512, 512, 256, 256), "hidden widths of the encoder (the decoder mirrors them)",
                                  check=widths)
    latent: int = opt(64, "width of the embedding", check=at_least(1))
    dropout: float = opt(0.1, "dropout after each hidden layer of the encoder and decoder", check=dropout)
    norm: str | None = opt(None, "normalisation after each hidden Linear", choices=("batch", "layer"))
    activation: str = opt("selu", "activation of the blocks (the reference's SSL networks: SELU; its classifier: ReLU)",
                          choices=("selu", "relu"))
    head_block: bool = opt(False, "a norm → activation → dropout block after the embedding layer too (the "
                           "reference's classifier: its embedding is that block's output)")


def _norm(kind: str | None, width: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return GlobalBatchNorm(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"norm must be None, 'batch' or 'layer', not {kind!r}")


ACTIVATIONS = {"selu": nn.SELU, "relu": nn.ReLU}


class MLP(nn.Sequential):
    """Blocks of Linear → norm → activation → Dropout; the last layer is a bare Linear unless `last_block`."""

    def __init__(self, widths: list[int], dropout: float = 0.1, norm: str | None = None, last_block: bool = False,
                 activation: str = "selu"):
        if len(widths) < 2:
            raise ValueError(f"an MLP needs at least an input and an output width, got {widths}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2 or last_block:
                layers += [_norm(norm, b), ACTIVATIONS[activation](), CellDropout(dropout)]
        super().__init__(*layers)


class AutoEncoder(nn.Module):
    """encoder: genes → latent; decoder: latent → genes (mirror of the encoder)."""

    def __init__(self, n_genes: int, config: ModelConfig = ModelConfig()):
        super().__init__()
        widths = [n_genes, *config.hidden, config.latent]
        self.config, self.n_genes = config, n_genes
        self.encoder = MLP(widths, config.dropout, config.norm, config.head_block, config.activation)
        self.decoder = MLP(widths[::-1], config.dropout, config.norm, activation=config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def projection_head(widths: list[int], bias: bool = True) -> nn.Sequential:
    """Projector / predictor of the contrastive objectives, as in BYOL and Barlow Twins: Linear → BatchNorm → ReLU
    blocks and a last bare Linear (no dropout: it would perturb the views twice). `bias`: of the last Linear. The
    Linears before a BatchNorm have none: the BatchNorm removes any constant shift, so such a bias gets no gradient
    and Adam would move it by rounding noise alone (a random walk that differs with the batch's split among ranks)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(a, b, bias=bias and last))
        if not last:
            layers += [GlobalBatchNorm(b), nn.ReLU()]
    return nn.Sequential(*layers)


def classifier_head(latent: int, n_classes: int) -> nn.Linear:
    return nn.Linear(latent, n_classes)
