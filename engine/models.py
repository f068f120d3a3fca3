"""The paper's fully connected networks: MLP blocks, the autoencoder, projection and classifier heads.

Linear → (optional norm) → SELU → Dropout blocks; the encoder maps n_genes → 512 → 512 → 256 → 256 → 64 and the
decoder mirrors it back to the genes. The reference's classifier is the same encoder with ReLU and a block after the
64-unit layer too (`activation="relu"`, `head_block=True`); its Linear layers sit at the same module indices, so a
SELU-pretrained encoder loads into it as the reference's `update_weights` does. Plain torch modules: they know
nothing of DeepSpeed, objectives or data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fields import at_least, dropout, opt, widths


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
        return nn.BatchNorm1d(width)
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
                layers += [_norm(norm, b), ACTIVATIONS[activation](), nn.Dropout(dropout)]
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
    blocks and a last bare Linear (no dropout: it would perturb the views twice); Barlow Twins' Linears are bias-free."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers)


def classifier_head(latent: int, n_classes: int) -> nn.Linear:
    return nn.Linear(latent, n_classes)
