"""The SSL objectives of the paper behind one interface: `objective(x, labels, step, cells) -> (loss, metrics)`.

Each objective is an nn.Module that owns the networks it trains (the trainer hands it to DeepSpeed whole) and
exposes `encoder` for embeddings and fine-tuning. `x` is the batch, a dense float32 tensor or `kernels.SparseRows`
(the CSR the loader ships): the first layer and the reconstruction losses read its nonzeros, and only the views
that must be dense (NB noise) are densified, where they are made. Every per-element operation (masks, NB noise, the masked
loss) goes through `kernels`, and every random draw (masks, programmes, noise, views, dropout) is keyed by (seed, step,
`cells`: the batch's global store rows), so a resumed run draws the same randomness and a cell draws the same on any
rank. `step` is the optimiser step: the micro-batches of one step share it, as the cells of one larger batch would.

Each rank's loss is its share of the global batch's: the mean over ranks of the local losses is the loss one rank
would compute on the whole batch. Where cells interact (BatchNorm in heads, Barlow Twins' statistics, the weighted
cross-entropy's normaliser) the statistics span the global batch (engine/collective.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from cellssl import kernels
from cellssl.kernels.dispatch import random_key
from cellssl.loaders import TARGET_SUM

from .collective import global_sum, reduce_sum, world_size
from .models import AutoEncoder, ModelConfig, cell_draws, classifier_head, number_dropouts, projection_head, standardise

VIEW_OFFSET = 1 << 40  # the second view's cells pass later layers as rows cell + offset: their own dropout draws


class Objective(nn.Module):
    """Base: holds an autoencoder's encoder (and decoder where the objective reconstructs)."""

    couples_cells = False  # whether the loss couples the cells of a batch (then accumulation is not a larger batch)

    def __init__(self, n_genes: int, model: ModelConfig, seed: int = 0):
        super().__init__()
        self.autoencoder = AutoEncoder(n_genes, model)
        self.seed = seed
        self.compute_dtype: torch.dtype | None = None  # torch.bfloat16: matmuls in bf16, weights and loss in fp32
        self._numbered = False

    @property
    def encoder(self) -> nn.Module:
        return self.autoencoder.encoder

    def draws(self, step: int, cells: torch.Tensor | None, rows: int):
        """The context of a forward pass: dropout keyed by (seed, step, cell). `cells` None: the rows' places."""
        if not self._numbered:
            number_dropouts(self)
            self._numbered = True
        cells = torch.arange(rows) if cells is None else cells
        return cell_draws(self.seed, step, cells)

    def net(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) under autocast when a compute dtype is set; the result back in float32 for the kernels."""
        if self.compute_dtype is None:
            return fn(x)
        with torch.autocast(x.device.type, dtype=self.compute_dtype):
            return fn(x).float()

    def first_layer(self, encoder: nn.Module, x: torch.Tensor, spec: kernels.MaskSpec) -> torch.Tensor:
        """encoder[0](apply_mask(x, spec)) with the mask applied inside the Linear (on CPU, a sparse product of
        the kept nonzeros whenever x is sparse)."""
        first = encoder[0]
        return self.net(lambda v: kernels.masked_linear(v, spec, first.weight, first.bias), x)

    def encode(self, encoder: nn.Module, x: torch.Tensor, spec: kernels.MaskSpec) -> torch.Tensor:
        """encoder(apply_mask(x, spec)), the layers after the first under the compute dtype."""
        return self.net(nn.Sequential(*list(encoder)[1:]), self.first_layer(encoder, x, spec))

    def after_step(self) -> None:
        """Called after each optimiser step (BYOL moves its target network here)."""


class Reconstruction(Objective):
    """Plain autoencoder: MSE over every gene."""

    def forward(self, x, labels=None, step: int = 0, cells=None):
        with self.draws(step, cells, x.shape[0]):
            z = self.encode(self.encoder, x, kernels.no_mask(x))
            loss = kernels.difference(self.net(self.autoencoder.decoder, z), x).square().mean()
        return loss, {"loss": loss.detach()}


class MaskedAutoencoder(Objective):
    """Reconstruct masked input. mask: "random" (rate 0.5 in the paper), "gene_program" (⌊rate·P⌋ programmes,
    per batch or per cell), "gp_to_gp" (keep one programme, predict it), "gp_to_tf" (keep a TF's targets,
    predict the TF). `programmes`: int32 bitsets [P, ceil(G/32)]; `tf_genes`: the TF column of each programme."""

    def __init__(self, n_genes: int, model: ModelConfig, mask: str = "random", rate: float = 0.5,
                 programmes: torch.Tensor | None = None, tf_genes: torch.Tensor | None = None, per: str = "batch",
                 seed: int = 0, rate_of: str = "programmes"):
        super().__init__(n_genes, model, seed)
        if mask not in ("random", "gene_program", "gp_to_gp", "gp_to_tf"):
            raise ValueError(f"unknown mask {mask!r}: random, gene_program, gp_to_gp or gp_to_tf")
        if mask != "random" and programmes is None:
            raise ValueError(f"mask {mask!r} needs gene programmes (a GMT file mapped to the store's genes)")
        if mask == "gp_to_tf" and tf_genes is None:
            raise ValueError("mask 'gp_to_tf' needs the gene column of each programme's transcription factor")
        self.mask, self.rate, self.per, self.rate_of = mask, rate, per, rate_of
        self.register_buffer("programmes", programmes if programmes is not None else torch.zeros(0, 1, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("tf_genes", tf_genes if tf_genes is not None else torch.zeros(0, dtype=torch.int32),
                             persistent=False)

    def spec(self, x: torch.Tensor, step: int, cells=None) -> kernels.MaskSpec:
        if self.mask == "random":
            return kernels.mask_spec(x, "random", self.rate, self.seed, step, cells=cells)
        if self.mask == "gene_program":
            return kernels.mask_spec(x, "gene_program", self.rate, self.seed, step, self.programmes, per=self.per,
                                     rate_of=self.rate_of, cells=cells)
        tf = self.tf_genes if self.mask == "gp_to_tf" else None
        return kernels.mask_spec(x, "isolated", 0.0, self.seed, step, self.programmes, tf, self.per, cells=cells)

    def forward(self, x, labels=None, step: int = 0, cells=None):
        with record_function("mask + first layer"):  # the masked batch is never made: the mask acts in the layer
            spec = self.spec(x, step, cells)
            h = self.first_layer(self.encoder, x, spec)
        with record_function("rest of forward"), self.draws(step, cells, x.shape[0]):
            pred = self.net(nn.Sequential(*list(self.encoder)[1:], self.autoencoder.decoder), h)
        with record_function("loss"):
            loss = kernels.masked_recon_loss(pred, x, spec)
        return loss, {"loss": loss.detach(), "masked_fraction": spec.masked_fraction()}


def view_coins(seed: int, step: int, view: int, p: float = 0.5) -> tuple[bool, bool]:
    """Whether a view gets NB noise and dropout at this step (seeded, so a resumed run draws the same)."""
    coin = torch.rand(2, generator=torch.Generator().manual_seed(random_key(seed, step, 10 + view)))
    return bool(coin[0] < p), bool(coin[1] < p)


def augmented_view(x, seed: int, step: int, view: int, intensity: float = 0.1, dropout: float = 0.1,
                   p: float = 0.5, cells=None) -> tuple[torch.Tensor, kernels.MaskSpec]:
    """The paper's contrastive view, NB noise (`intensity`) and dropout (`dropout` of the genes) each applied with
    probability `p`, as (base, spec) with view = apply_mask(base, spec). A noised view is dense (the noise touches
    every gene; a CSR batch's values are added to it, never densified on their own): its dropout is applied here,
    once (both encoders read it); a clean one keeps the batch as it came and the dropout as a spec, applied inside
    the first layer. Views are built from the data alone: no gradient flows into them. The coins are the step's
    (every cell of the global batch shares them, as in the reference); noise and dropout are the cell's."""
    noise, drop = view_coins(seed, step, view, p)
    spec = kernels.mask_spec(x, "random", dropout if drop else 0.0, seed + 1, step * 4 + view, cells=cells)
    if not noise:
        return x, spec
    noised = kernels.nb_augment(x.detach(), intensity, seed, step * 4 + view, TARGET_SUM, cells)
    return (kernels.apply_mask(noised, spec) if drop else noised), kernels.no_mask(x)


class BYOL(Objective):
    """Bootstrap-your-own-latent as the reference builds it: the projector reads the encoder's 256-unit block (its
    `hidden_layer=-2`: the 64-unit layer gets no gradient here), both views pass the networks as one batch (the heads'
    BatchNorm sees them together), online encoder → projector → predictor chases the target's encoder → projector
    (projector 256 → 4,096 → 256, predictor the same, Linear → BatchNorm → ReLU → Linear). `target`: "ema" (the
    paper's intent, decay `ema` after every step) or "frozen" (the reference's code, whose EMA update is never
    called: the target stays at its initialisation)."""

    def __init__(self, n_genes: int, model: ModelConfig, projection: int = 256, hidden: int = 4096,
                 ema: float = 0.99, seed: int = 0, p: float = 0.5, intensity: float = 0.1, dropout: float = 0.1,
                 target: str = "ema"):
        super().__init__(n_genes, model, seed)
        if target not in ("ema", "frozen"):
            raise ValueError(f"target must be 'ema' or 'frozen', not {target!r}")
        del self.autoencoder.decoder  # never trained: it must not be exported as if it reconstructed
        width = model.hidden[-1] if model.hidden else n_genes
        # the projector's output feeds the predictor's BatchNorm (through a Linear) in the online network: a bias
        # there would get no gradient either (see projection_head)
        self.projector = projection_head([width, hidden, projection], bias=False)
        self.predictor = projection_head([projection, hidden, projection])
        self.p, self.intensity, self.dropout, self.target = p, intensity, dropout, target
        self.target_encoder = copy.deepcopy(self.autoencoder.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_encoder.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)
        self.ema = ema

    def _block(self, encoder: nn.Module, views) -> torch.Tensor:
        """The views' outputs of the block before the embedding layer, as one batch (view 1's cells, then view 2's):
        each view's first layer on its own (a view is a batch and a mask), the rest together."""
        h = torch.cat([self.first_layer(encoder, *view) for view in views])
        last = max(i for i, m in enumerate(encoder) if isinstance(m, nn.Linear))  # the embedding layer
        return self.net(nn.Sequential(*list(encoder)[1:last]), h)

    couples_cells = True  # the heads' BatchNorm

    def forward(self, x, labels=None, step: int = 0, cells=None):
        views = [augmented_view(x, self.seed, step, v, self.intensity, self.dropout, self.p, cells) for v in (0, 1)]
        local = torch.arange(x.shape[0]) if cells is None else cells.cpu()
        with self.draws(step, torch.cat([local, local + VIEW_OFFSET]), 2 * x.shape[0]):
            online = self.net(lambda v: self.predictor(self.projector(v)), self._block(self.encoder, views))
            with torch.no_grad():
                target = self.net(self.target_projector, self._block(self.target_encoder, views))
        online, target = F.normalize(online, dim=1), F.normalize(target, dim=1)
        (p1, p2), (t1, t2) = online.chunk(2), target.chunk(2)
        loss = (2 - 2 * (p1 * t2).sum(1)).mean() + (2 - 2 * (p2 * t1).sum(1)).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.target == "frozen":
            return
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for p, t in zip(online.parameters(), target.parameters()):
                t.mul_(self.ema).add_(p.detach(), alpha=1 - self.ema)


class BarlowTwins(Objective):
    """Cross-correlation of two views' projections pushed to identity (bias-free projector 256-256-512-512 with
    BatchNorm and ReLU after the latent, λ = 0.0051); one view has NB noise and dropout, the other is the original.
    Each projection is standardised with its batch statistics (BatchNorm without affine, as the reference), and the
    cross-correlation divided by the batch size: both over the global batch, as the official implementation's
    all-reduce (every rank then holds the global loss)."""

    couples_cells = True

    def __init__(self, n_genes: int, model: ModelConfig, widths=(256, 256, 512, 512), lambd: float = 0.0051,
                 seed: int = 0, intensity: float = 0.1, dropout: float = 0.1):
        super().__init__(n_genes, model, seed)
        del self.autoencoder.decoder  # never trained: it must not be exported as if it reconstructed
        self.projector = projection_head([model.latent, *widths], bias=False)
        self.lambd, self.intensity, self.dropout = lambd, intensity, dropout

    def forward(self, x, labels=None, step: int = 0, cells=None):
        view = augmented_view(x, self.seed, step, 0, self.intensity, self.dropout, p=1.0, cells=cells)
        with self.draws(step, cells, x.shape[0]):
            z1 = self.net(self.projector, self.encode(self.encoder, *view))
            z2 = self.net(self.projector, self.encode(self.encoder, x, kernels.no_mask(x)))
        z1, z2 = standardise(z1), standardise(z2)
        n = reduce_sum(torch.tensor([float(x.shape[0])], device=z1.device))
        c = global_sum(z1.T @ z2) / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        loss = on_diag + self.lambd * off_diag
        return loss, {"loss": loss.detach()}


class Supervised(Objective):
    """Cell-type classification from the encoder (the no-SSL baseline, and fine-tuning after pretraining)."""

    def __init__(self, n_genes: int, model: ModelConfig, n_classes: int, seed: int = 0,
                 class_weights: torch.Tensor | None = None):
        super().__init__(n_genes, model, seed)
        if n_classes < 2:
            raise ValueError(f"supervised training needs at least 2 classes, got {n_classes}")
        self.classifier = classifier_head(model.latent, n_classes)
        del self.autoencoder.decoder  # never used: keep it out of the optimiser and the checkpoint
        # inverse class frequency of the training labels (the reference's class-weighted cross-entropy); not a
        # parameter and not exported
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._share: float | None = None  # (ranks × micro-batches) / the step's total weight, once normalised

    def logits(self, x: torch.Tensor, step: int = 0, cells=None) -> torch.Tensor:
        with self.draws(step, cells, x.shape[0]):
            return self.net(self.classifier, self.encode(self.encoder, x, kernels.no_mask(x)))

    def normalise_over(self, labels: list[torch.Tensor]) -> None:
        """Before a training step: the weighted cross-entropy's normaliser (the summed weight of the labelled cells)
        over the whole step, every rank and micro-batch, so that each micro-batch's loss is its share of the global
        batch's and accumulation or more ranks change nothing."""
        weights = [self.class_weights[l[l >= 0]] if self.class_weights is not None else (l >= 0).float()
                   for l in labels]
        total = reduce_sum(torch.stack([w.double().sum() for w in weights]).sum().reshape(1))
        self._share = world_size() * len(labels) / max(float(total), 1e-12)

    def forward(self, x, labels=None, step: int = 0, cells=None):
        if labels is None:
            raise ValueError("the supervised objective needs cell-type labels in the batch")
        logits = self.logits(x, step, cells)
        if self.training and self._share is not None:
            loss = F.cross_entropy(logits, labels, weight=self.class_weights, ignore_index=-1,
                                   reduction="sum") * self._share
        else:  # validation scores the plain loss
            loss = F.cross_entropy(logits, labels, weight=self.class_weights if self.training else None,
                                   ignore_index=-1)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}


OBJECTIVES = {"reconstruction": Reconstruction, "mae": MaskedAutoencoder, "byol": BYOL,
              "barlow_twins": BarlowTwins, "supervised": Supervised}
