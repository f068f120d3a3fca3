"""The transfer-learning study of the paper, on the synthetic atlas: a large auxiliary store (datasets 0–9, all
cell types) and a small target store drawn from two held-out datasets (their own batch effects, donors and
assays: the shift). Per seed, macro F1 on the target's test split of
  (a) the supervised model trained on the target only;
  (b) SSL pretraining on the auxiliary store → fine-tuning on the target, plus zero-shot kNN on its embeddings;
  (c) SSL pretraining on the target's own train split → fine-tuning on the target.
Every run goes through the engine (DeepSpeed trainer); finished runs are kept, so an interrupted study resumes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cellssl.loaders import CellStore, GeneSpace
from cellssl.loaders.synthetic import synth

from ..config import ObjectiveConfig, TrainConfig
from . import celltype
from .inputs import labels
from .representations import ModelRepresentation

METHODS = {"mae_random": ObjectiveConfig(name="mae", mask="random"),
           "mae_gene_program": ObjectiveConfig(name="mae", mask="gene_program"),
           "byol": ObjectiveConfig(name="byol"),
           "barlow_twins": ObjectiveConfig(name="barlow_twins")}
AUX_DATASETS = tuple(range(10))
TARGET_DATASETS = (10, 11)


@dataclass
class StudyConfig:
    out: str = "runs/transfer_study"
    aux_cells: int = 60_000
    target_cells: int = 4_000
    n_genes: int = 5_000                      # a seeded subset of the 19,350 reference genes (0: all of them)
    methods: tuple[str, ...] = tuple(METHODS)
    target_methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 300
    finetune_steps: int = 150
    batch_size: int = 2048                    # pretraining
    finetune_batch_size: int = 512            # the target's train split is small: several steps per epoch
    precision: str = "bf16"
    knn_k: int = 5


def _genes(cfg: StudyConfig, out: Path) -> str:
    if not cfg.n_genes:
        return "default"
    space = GeneSpace.default()
    keep = np.sort(np.random.default_rng(0).choice(len(space), min(cfg.n_genes, len(space)), replace=False))
    path = out / "genes.tsv"
    pd.DataFrame({"gene_id": space.gene_id[keep], "gene_name": space.gene_name[keep]}).to_csv(path, sep="\t",
                                                                                            index=False)
    return str(path)


def stores(cfg: StudyConfig, out: Path) -> tuple[CellStore, CellStore]:
    out.mkdir(parents=True, exist_ok=True)
    genes = _genes(cfg, out)
    aux, target = out / "auxiliary.cellstore", out / "target.cellstore"
    if not (aux / "zarr.json").is_file():
        synth(aux, cfg.aux_cells, genes=genes, datasets=AUX_DATASETS, overwrite=True)
    if not (target / "zarr.json").is_file():  # a small labelled set: 60 % train, 10 % val, 30 % test
        synth(target, cfg.target_cells, genes=genes, datasets=TARGET_DATASETS, draw=1, overwrite=True,
              val_frac=0.1, test_frac=0.3)
    return CellStore(aux), CellStore(target)


def steps_per_epoch(store: CellStore, batch_size: int) -> int:
    start, stop = store.split("train")
    return max(1, (stop - start) // min(batch_size, stop - start))


def pretrain(cfg: StudyConfig, store: CellStore, method: str, seed: int, out: Path, decay_steps: int) -> Path:
    """SSL pretraining with the paper's StepLR (×0.9) every `decay_steps` optimiser steps on any store: counted in
    epochs, the 2,400-cell target would decay its learning rate 20× faster than the auxiliary store does."""
    from ..trainer import train

    if (out / "model.pt").is_file():
        return out / "model.pt"
    start, stop = store.split("train")
    steps = cfg.pretrain_steps
    run = TrainConfig(data=str(store.path), out=str(out), objective=replace(METHODS[method]), seed=seed,
                      batch_size=min(cfg.batch_size, stop - start), max_steps=steps, precision=cfg.precision,
                      lr_step_epochs=max(1, round(decay_steps / steps_per_epoch(store, cfg.batch_size))),
                      log_every=max(1, steps // 20), val_every=max(1, steps // 4), checkpoint_every=steps)
    return train(run)


def finetune(cfg: StudyConfig, target: CellStore, init: Path | None, seed: int, out: Path) -> dict:
    model = out / "model.pt"
    if not model.is_file():
        model = celltype.finetune(target, "cell_type", out, init, cfg.finetune_steps, cfg.finetune_batch_size, seed,
                                  cfg.precision)
    scores = celltype.finetuned_scores(model, target, "cell_type")
    return {"macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"]}


def zero_shot(cfg: StudyConfig, model: Path, target: CellStore) -> float:
    rep = ModelRepresentation(model)
    z = {s: rep.embed(target, s) for s in ("train", "test")}
    y = {s: labels(target, "cell_type", s) for s in ("train", "test")}
    return celltype.knn(z["train"], y["train"], z["test"], y["test"], k=cfg.knn_k)["macro_f1"]


def run_study(cfg: StudyConfig) -> list[dict]:
    out = Path(cfg.out)
    aux, target = stores(cfg, out)
    unknown = set(cfg.methods) | set(cfg.target_methods)
    if unknown - set(METHODS):
        raise ValueError(f"unknown method(s) {sorted(unknown - set(METHODS))}: choose from {sorted(METHODS)}")
    records: list[dict] = []
    decay_steps = 2 * steps_per_epoch(aux, cfg.batch_size)  # the paper's 2 epochs, on the auxiliary store

    def record(**r):
        records.append(r)
        (out / "records.json").write_text(json.dumps({"config": asdict(cfg), "records": records}, indent=1))
        print(json.dumps(r))

    for seed in cfg.seeds:
        run = out / f"seed{seed}"
        record(seed=seed, setting="a", method="supervised", **finetune(cfg, target, None, seed, run / "a_supervised"))
        for m in cfg.methods:
            model = pretrain(cfg, aux, m, seed, run / f"pretrain_aux_{m}", decay_steps)
            record(seed=seed, setting="b", method=m, knn_macro_f1=zero_shot(cfg, model, target),
                   **finetune(cfg, target, model, seed, run / f"b_{m}"))
        for m in cfg.target_methods:
            model = pretrain(cfg, target, m, seed, run / f"pretrain_target_{m}", decay_steps)
            record(seed=seed, setting="c", method=m, knn_macro_f1=zero_shot(cfg, model, target),
                   **finetune(cfg, target, model, seed, run / f"c_{m}"))
    return records


SETTINGS = {"a": "supervised on the target only", "b": "SSL on auxiliary → fine-tune on target",
            "c": "SSL on the target itself → fine-tune on target"}


def summary(records: list[dict]) -> str:
    """Markdown: mean ± standard deviation over seeds per setting and method."""
    frame = pd.DataFrame(records)
    lines = ["| setting | method | seeds | macro F1 | micro F1 | zero-shot kNN macro F1 |", "|---|---|---:|---:|---:|---:|"]
    for (setting, method), group in frame.groupby(["setting", "method"], sort=False):
        def cell(col):
            if col not in group or group[col].isna().all():
                return "–"
            v = group[col].dropna()
            return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"
        lines.append(f"| ({setting}) {SETTINGS[setting]} | {method} | {len(group)} | {cell('macro_f1')} | "
                     f"{cell('micro_f1')} | {cell('knn_macro_f1')} |")
    return "\n".join(lines) + "\n"
