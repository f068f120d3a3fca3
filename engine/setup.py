"""Build an objective from a run config and the store it trains on (gene programmes, TFs, label counts).

Bad configurations end here with one clear error: an unknown objective, a programme file that matches no gene,
a store without the labels a supervised run needs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.genesets import index_programmes, read_gmt

from .config import TrainConfig
from .objectives import OBJECTIVES, MaskedAutoencoder, Objective


def programme_bits(cfg: TrainConfig, store: CellStore) -> torch.Tensor:
    sets = read_gmt(cfg.objective.programmes)
    index = index_programmes(sets, store.genes, where=cfg.objective.programmes or "packaged GO programmes")
    print(index.report())
    return torch.from_numpy(index.bits)


def tf_programmes(cfg: TrainConfig, store: CellStore) -> tuple[torch.Tensor, torch.Tensor]:
    """TF → target sets: the TF is the set's description when that is a gene of the store (as in the synthetic
    truth), else the set name's first token as a symbol (MSigDB C3 TFT style, e.g. ATF2_TARGET_GENES)."""
    if cfg.objective.programmes is None:
        raise InputError("objective.programmes", "GP→TF needs a TF → targets GMT file",
                         "pass --programmes (e.g. MSigDB C3 TFT, or synthetic_truth/tf_targets.gmt of a synthetic store)")
    sets = read_gmt(cfg.objective.programmes)
    genes = store.genes
    tfs = [genes.column(s.description) if genes.column(s.description) >= 0 else genes.column(s.name.split("_")[0])
           for s in sets]
    keep = [s for s, t in zip(sets, tfs) if t >= 0]
    if not keep:
        raise InputError(cfg.objective.programmes, "no programme's transcription factor is a gene of the store",
                         "name each set after its TF (e.g. ATF2_TARGET_GENES) or put the TF's id in the description")
    index = index_programmes(keep, store.genes, where=cfg.objective.programmes)
    named = dict(zip((s.name for s in keep), (t for t in tfs if t >= 0)))
    print(f"{index.report()}; {len(keep)} of {len(sets)} sets have their TF in the store")
    return torch.from_numpy(index.bits), torch.tensor([named[n] for n in index.names], dtype=torch.int32)


def build_objective(cfg: TrainConfig, store: CellStore) -> Objective:
    o, g = cfg.objective, store.n_genes
    if o.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {o.name!r}: choose from {sorted(OBJECTIVES)}")
    if o.name == "mae":
        programmes = tf_genes = None
        if o.mask in ("gene_program", "gp_to_gp"):
            programmes = programme_bits(cfg, store)
        elif o.mask == "gp_to_tf":
            programmes, tf_genes = tf_programmes(cfg, store)
        objective = MaskedAutoencoder(g, cfg.model, o.mask, o.rate, programmes, tf_genes, o.per, cfg.seed)
    elif o.name == "supervised":
        categories = store.categories.get(o.label)
        if categories is None:
            raise InputError(store.path / "obs.parquet", f"no categorical column {o.label!r} to predict",
                             f"choose --label from {sorted(store.categories)}, or convert a labelled dataset")
        objective = OBJECTIVES["supervised"](g, cfg.model, len(categories), cfg.seed)
    else:
        objective = OBJECTIVES[o.name](g, cfg.model, seed=cfg.seed)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {cfg.precision!r}")
    objective.compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    if cfg.init_encoder:
        from .checkpoint import encoder_state, load_model

        saved = load_model(Path(cfg.init_encoder))
        if list(saved["gene_ids"]) != list(store.genes.gene_id):
            raise InputError(cfg.init_encoder, "the pretrained model's genes differ from the store's",
                             "convert the store with --genes PRETRAINING_STORE so both share one gene space")
        objective.encoder.load_state_dict(encoder_state(saved))
    return objective

