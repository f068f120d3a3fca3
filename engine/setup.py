"""Build an objective from a run config and the store it trains on (gene programmes, TFs, label counts).

Bad configurations end here with one clear error: an unknown objective, a programme file that matches no gene,
a store without the labels a supervised run needs.
"""
from __future__ import annotations

import numpy as np
import torch

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.genesets import index_programmes, read_gmt

from .config import TrainConfig
from .objectives import BYOL, OBJECTIVES, BarlowTwins, MaskedAutoencoder, Objective, Supervised

TRUTH = "synthetic_truth"  # what `cellssl synth` writes beside a synthetic store's data


def programme_file(cfg: TrainConfig, store: CellStore, truth_file: str) -> str | None:
    """--programmes, else the synthetic atlas's own planted programmes where the store has them (the analogue of
    the cell-type signatures / TF targets the paper's scripts mask with), else None (the packaged GO set)."""
    if cfg.objective.programmes is not None:
        return cfg.objective.programmes
    planted = store.path / TRUTH / truth_file
    return str(planted) if planted.is_file() else None


def programme_bits(cfg: TrainConfig, store: CellStore) -> torch.Tensor:
    path = programme_file(cfg, store, "programmes.gmt")
    sets = read_gmt(path)
    index = index_programmes(sets, store.genes, where=path or "packaged GO programmes")
    print(index.report())
    return torch.from_numpy(index.bits)


def tf_programmes(cfg: TrainConfig, store: CellStore) -> tuple[torch.Tensor, torch.Tensor]:
    """TF → target sets: the TF is the set's description when that is a gene of the store (as in the synthetic
    truth), else the set name's first token as a symbol (MSigDB C3 TFT style, e.g. ATF2_TARGET_GENES)."""
    path = programme_file(cfg, store, "tf_targets.gmt")
    if path is None:
        raise InputError("--programmes", "GP→TF needs a TF → targets GMT file",
                         "pass --programmes (e.g. MSigDB C3 TFT; synthetic stores carry their own)")
    sets = read_gmt(path)
    genes = store.genes
    tfs = [genes.column(s.description) if genes.column(s.description) >= 0 else genes.column(s.name.split("_")[0])
           for s in sets]
    keep = [s for s, t in zip(sets, tfs) if t >= 0]
    if not keep:
        raise InputError(path, "no programme's transcription factor is a gene of the store",
                         "name each set after its TF (e.g. ATF2_TARGET_GENES) or put the TF's id in the description")
    index = index_programmes(keep, store.genes, where=path)
    named = dict(zip((s.name for s in keep), (t for t in tfs if t >= 0)))
    print(f"{index.report()}; {len(keep)} of {len(sets)} sets have their TF in the store")
    return torch.from_numpy(index.bits), torch.tensor([named[n] for n in index.names], dtype=torch.int32)


def class_weights(store: CellStore, label: str, n_classes: int) -> torch.Tensor:
    """n / (classes present · n_c) over the training split's labelled cells ("balanced"); 1 for absent classes."""
    start, stop = store.split("train")
    codes = store.obs_codes(label)[start:stop]
    counts = np.bincount(codes[codes >= 0], minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def load_pretrained_encoder(objective: Objective, saved: dict, cfg: TrainConfig) -> None:
    """The pretrained encoder's weights into this run's encoder, which must have its architecture."""
    import json
    from dataclasses import asdict

    from .checkpoint import architecture, encoder_state

    try:
        theirs = json.loads(saved["config"])["model"]
    except (ValueError, KeyError, TypeError):
        theirs = {}
    mine = asdict(cfg.model)
    if [theirs.get("hidden") and list(theirs["hidden"]), theirs.get("latent")] != [list(mine["hidden"]),
                                                                                     mine["latent"]]:
        raise InputError(f"--init-encoder {cfg.init_encoder}", f"the pretrained encoder is {architecture(theirs)}, "
                         f"this run's {architecture(mine)}", "fine-tune with the pretrained model's widths (--hidden "
                         "and --latent as it was trained), or pretrain the architecture you want")
    try:
        objective.encoder.load_state_dict(encoder_state(saved))
    except RuntimeError as exc:
        raise InputError(saved["path"], f"its encoder weights do not fit its config ({str(exc).splitlines()[0][:200]})",
                         "use a model.safetensors a cellssl run exported, unmodified") from None


def build_objective(cfg: TrainConfig, store: CellStore) -> Objective:
    o, g = cfg.objective, store.n_genes
    if o.name not in OBJECTIVES:
        raise InputError("--objective", f"unknown objective {o.name!r}", f"choose from {sorted(OBJECTIVES)}")
    if o.name == "mae":
        programmes = tf_genes = None
        if o.mask in ("gene_program", "gp_to_gp"):
            programmes = programme_bits(cfg, store)
        elif o.mask == "gp_to_tf":
            programmes, tf_genes = tf_programmes(cfg, store)
        objective = MaskedAutoencoder(g, cfg.model, o.mask, o.rate, programmes, tf_genes, o.per, cfg.seed,
                                      o.rate_of)
    elif o.name == "supervised":
        categories = store.categories.get(o.label)
        if categories is None:
            raise InputError(store.path / "obs.parquet", f"no categorical column {o.label!r} to predict",
                             f"choose --label from {sorted(store.categories)}, or convert a labelled dataset")
        if len(categories) < 2:
            raise InputError(store.path / "obs.parquet", f"column {o.label!r} has {len(categories)} category",
                             "a classifier needs at least two cell types: choose another --label")
        weights = class_weights(store, o.label, len(categories)) if o.class_weighted else None
        objective = Supervised(g, cfg.model, len(categories), cfg.seed, weights)
    elif o.name == "byol":
        objective = BYOL(g, cfg.model, ema=o.ema, seed=cfg.seed, p=o.augment_p, intensity=o.noise_intensity,
                         dropout=o.dropout_intensity, target=o.byol_target)
    elif o.name == "barlow_twins":
        objective = BarlowTwins(g, cfg.model, lambd=o.lambd, seed=cfg.seed, intensity=o.noise_intensity,
                                dropout=o.dropout_intensity)
    else:
        objective = OBJECTIVES[o.name](g, cfg.model, seed=cfg.seed)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {cfg.precision!r}")
    objective.compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    if cfg.init_encoder:
        from .checkpoint import load_model

        saved = load_model(cfg.init_encoder)
        if list(saved["gene_ids"]) != list(store.genes.gene_id):
            raise InputError(cfg.init_encoder, "the pretrained model's genes differ from the store's",
                             "convert the store with --genes PRETRAINING_STORE so both share one gene space")
        load_pretrained_encoder(objective, saved, cfg)
    return objective

