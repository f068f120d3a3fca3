"""The paper's question as a study: does self-supervised pretraining on a large auxiliary atlas help when labelled
target data are scarce? Per seed and per labelled share of the target's train split (1 %, 5 %, 20 %, 100 % by
default), macro F1 on the target's test split of
  (a) the supervised classifier trained on the labelled share only;
  (b) SSL pretraining on the auxiliary store → fine-tuning on the labelled share (plus the frozen embedding's
      probe and kNN scores, which need no target labels beyond the validation split's);
  (c) optionally, SSL pretraining on the target's whole train split (its labels unused) → fine-tuning on the share.
Each fine-tuned model is scored twice: the paper's kNN score (its embedding, validation neighbours, hierarchy-
corrected where the target has a hierarchy) and the classifier's own predictions. By default the stores are drawn
from the synthetic atlas — the auxiliary store from datasets 0–9 once, a fresh target from the held-out datasets
10–11 for every seed, so the seeds vary the data as well as the training — or any two stores in one gene space
(`--aux`, `--target`: scTab and a user's dataset); with a given target, each seed draws its own labelled share.
Every run goes through the engine; finished runs are kept, so an interrupted study resumes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cellssl.loaders import CellStore, GeneSpace, InputError
from cellssl.loaders.subset import subset_store
from cellssl.loaders.synth import synth

from ..checkpoint import MODEL_FILE
from ..experiments import EXPERIMENTS, experiment
from ..fields import at_least, opt, positive
from ..runlog import LOG_FILE, read_log
from . import celltype
from .inputs import labels
from .representations import ModelRepresentation

METHODS = ("mae_random", "mae_gene_program", "byol", "barlow_twins")  # experiment-registry names
AUX_DATASETS = tuple(range(10))
TARGET_DATASETS = (10, 11)


def _shares(v) -> str | None:
    return None if all(0 < s <= 1 for s in v) and v else "label shares must lie in (0, 1]"


@dataclass
class StudyConfig:
    out: str = opt("runs/transfer_study", "output folder: stores, every run, records.json and summary.md")
    aux: str | None = opt(None, "auxiliary store to pretrain on (default: a synthetic atlas of datasets 0–9, made in "
                          "--out)")
    target: str | None = opt(None, "labelled target store with train, val and test splits (default: per seed a fresh "
                             "synthetic draw from the held-out datasets 10–11)")
    label: str = opt("cell_type", "categorical obs column to predict")
    aux_cells: int = opt(60_000, "synthetic auxiliary store: cells", check=at_least(100))
    target_cells: int = opt(4_000, "synthetic target stores: cells (60 % train, 10 % val, 30 % test)",
                            check=at_least(100))
    n_genes: int = opt(5_000, "synthetic stores: a seeded subset of the 19,350 reference genes (0: all of them)",
                       check=at_least(0))
    methods: tuple[str, ...] = opt(METHODS, "SSL experiments pretrained on the auxiliary store (setting b)")
    target_methods: tuple[str, ...] = opt((), "SSL experiments pretrained on the target's train split (setting c)")
    label_shares: tuple[float, ...] = opt((0.01, 0.05, 0.2, 1.0), "shares of the target's train split that keep "
                                          "their labels (the rest is left out of fine-tuning)", check=_shares)
    seeds: tuple[int, ...] = opt((0, 1, 2, 3, 4), "seeds: weights, batches, masks, views, labelled shares and (for "
                                 "synthetic targets) the target's draw")
    pretrain_steps: int = opt(300, "pretraining steps of each SSL method", check=at_least(1))
    finetune_steps: int = opt(150, "fine-tuning steps (and the supervised baseline's)", check=at_least(1))
    batch_size: int = opt(2048, "cells per pretraining step", check=at_least(1))
    finetune_batch_size: int = opt(16384, "cells per fine-tuning step (the reference's 16,384, capped at the labelled "
                                   "share)", check=at_least(1))
    classifier: str = opt("reference", "fine-tuned network and protocol (see cellssl eval --classifier)",
                          choices=("reference", "selu"))
    precision: str = opt("fp32", "bf16 only where the CPU has AVX512-BF16/AMX (else ~12× slower)",
                         choices=("fp32", "bf16"))
    knn_k: int = opt(5, "neighbours of the kNN scores", check=at_least(1))
    margin: float = opt(0.02, "equivalence margin in macro F1, stated before the runs: a difference is called "
                        "negligible only when its 90 % t interval lies inside ±margin", check=positive)


def _genes(cfg: StudyConfig, out: Path) -> str:
    if not cfg.n_genes:
        return "default"
    space = GeneSpace.default()
    keep = np.sort(np.random.default_rng(0).choice(len(space), min(cfg.n_genes, len(space)), replace=False))
    path = out / "genes.tsv"
    pd.DataFrame({"gene_id": space.gene_id[keep], "gene_name": space.gene_name[keep]}).to_csv(path, sep="\t",
                                                                                            index=False)
    return str(path)


def aux_store(cfg: StudyConfig, out: Path) -> CellStore:
    if cfg.aux:
        return CellStore(cfg.aux)
    path = out / "auxiliary.cellstore"
    if not (path / "zarr.json").is_file():
        synth(path, cfg.aux_cells, genes=_genes(cfg, out), datasets=AUX_DATASETS, overwrite=True)
    return CellStore(path)


def target_store(cfg: StudyConfig, out: Path, seed: int) -> CellStore:
    """The given target, or this seed's own synthetic draw from the held-out datasets."""
    if cfg.target:
        return CellStore(cfg.target)
    path = out / f"target-seed{seed}.cellstore"
    if not (path / "zarr.json").is_file():
        synth(path, cfg.target_cells, genes=_genes(cfg, out), datasets=TARGET_DATASETS, draw=1 + seed,
              overwrite=True, val_frac=0.1, test_frac=0.3)
    return CellStore(path)


def labelled_share(cfg: StudyConfig, target: CellStore, share: float, seed: int, out: Path) -> CellStore:
    """The target with only `share` of its train split (drawn by the seed, at least one cell per 100 %), its
    validation and test splits whole."""
    if share >= 1:
        return target
    path = out / f"share{share:g}.cellstore"
    if not (path / "zarr.json").is_file():
        start, stop = target.split("train")
        n = max(1, round(share * (stop - start)))
        rows = np.random.default_rng([seed, 7]).choice(stop - start, n, replace=False)
        subset_store(target, {"train": rows}, path, seed)
    return CellStore(path)


def steps_per_epoch(store: CellStore, batch_size: int) -> int:
    start, stop = store.split("train")
    return max(1, (stop - start) // min(batch_size, stop - start))


def pretrain(cfg: StudyConfig, store: CellStore, method: str, seed: int, out: Path, decay_steps: int,
             **settings) -> Path:
    """SSL pretraining with the method's settings from the experiment registry (`settings` override them). StepLR
    (masked autoencoders) decays every `decay_steps` optimiser steps on any store: counted in epochs, a small target
    would decay its learning rate far faster than the auxiliary store does. A finished run is reused; an unfinished
    one restarts."""
    from ..trainer import train

    if finished(out, cfg.pretrain_steps):
        return out / MODEL_FILE
    start, stop = store.split("train")
    steps = cfg.pretrain_steps
    run = replace(experiment(method), data=str(store.path), out=str(out), seed=seed,
                  batch_size=min(cfg.batch_size, stop - start), max_steps=steps, precision=cfg.precision,
                  lr_step_epochs=max(1, round(decay_steps / steps_per_epoch(store, cfg.batch_size))),
                  log_every=max(1, steps // 20), val_every=max(1, steps // 4), checkpoint_every=steps, overwrite=True)
    return train(replace(run, **settings))


def epochs(store: CellStore, steps: int, batch_size: int) -> float:
    start, stop = store.split("train")
    return steps * min(batch_size, stop - start) / (stop - start)


def masked_fraction(run: Path) -> float | None:
    """Mean realised masked fraction over a pretraining run's log (masking objectives only)."""
    values = [r["masked_fraction"] for r in read_log(run / LOG_FILE) if "masked_fraction" in r]
    return float(np.mean(values)) if values else None


def finished(run: Path, steps: int) -> bool:
    """The run reached its last step (a model kept by validation is exported before it)."""
    latest = run / "checkpoints" / "latest"
    return (run / MODEL_FILE).is_file() and latest.is_file() and latest.read_text().strip() == f"step{steps:08d}"


def _paper_knn(cfg: StudyConfig, rep: ModelRepresentation, target: CellStore, z: dict | None = None) -> float:
    """The paper's kNN score; `z`: embeddings by split already made (each split is embedded once)."""
    z = dict(z or {})
    z.update({s: rep.embed(target, s) for s in ("val", "test") if s not in z})
    y = {s: labels(target, cfg.label, s) for s in ("val", "test")}
    return celltype.paper_knn(z["val"], y["val"], z["test"], y["test"], k=cfg.knn_k,
                              children=target.hierarchy(cfg.label))["macro_f1"]


def finetune(cfg: StudyConfig, share: CellStore, target: CellStore, init: Path | None, seed: int, out: Path,
             decay_steps: int) -> dict:
    """Fine-tune on a labelled share, its StepLR decaying every `decay_steps` optimiser steps as pretraining's does
    (counted in epochs of a share that is one batch, it would decay every 2 steps); both scores on the target's test
    split, and the step the kept model comes from."""
    model = out / MODEL_FILE
    if not finished(out, cfg.finetune_steps):
        model = celltype.finetune(share, cfg.label, out, init, cfg.finetune_steps, cfg.finetune_batch_size, seed,
                                  cfg.precision, cfg.classifier, lr_step_epochs=max(1, round(
                                      decay_steps / steps_per_epoch(share, cfg.finetune_batch_size))))
    scores = celltype.finetuned_scores(model, target, cfg.label)
    return {"macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"],
            "paper_knn_f1": _paper_knn(cfg, ModelRepresentation(model), target),
            "finetune_epochs": epochs(share, cfg.finetune_steps, cfg.finetune_batch_size),
            "kept_step": (scores["trained"] or {}).get("steps")}


def collapse_signs(z: np.ndarray) -> dict:
    """The signs of a collapsed embedding: its effective rank (exp of the entropy of the centred embedding's
    normalised singular values; at most its width) and its mean norm."""
    z = z.astype(np.float64)
    s = np.linalg.svd(z - z.mean(0), compute_uv=False)
    p = s[s > 0] / s.sum()
    return {"effective_rank": float(np.exp(-(p * np.log(p)).sum())),
            "embedding_norm": float(np.linalg.norm(z, axis=1).mean())}


def frozen_scores(cfg: StudyConfig, model: Path, target: CellStore, shares: dict | None = None) -> dict:
    """Linear probe and kNN (ours, train neighbours) and the paper's kNN on the pretrained encoder's embedding; the
    probe on the whole train split and, per labelled share, on the share's cells only (`probe_f1_by_share`: what the
    frozen embedding gives with as few labels as the supervised baseline has)."""
    rep = ModelRepresentation(model)
    z = {s: rep.embed(target, s) for s in ("train", "test")}
    y = {s: labels(target, cfg.label, s) for s in ("train", "test")}
    scores = {"probe_macro_f1": celltype.linear_probe(z["train"], y["train"], z["test"], y["test"])["macro_f1"],
              "knn_macro_f1": celltype.knn(z["train"], y["train"], z["test"], y["test"], k=cfg.knn_k)["macro_f1"],
              "frozen_paper_knn_f1": _paper_knn(cfg, rep, target, z), **collapse_signs(z["test"]),
              "probe_f1_by_share": {}}
    names = target.cell_names()[slice(*target.split("train"))]
    for share, labelled in (shares or {}).items():
        keep = np.isin(names, labelled.cell_names()[slice(*labelled.split("train"))])
        scores["probe_f1_by_share"][share] = celltype.linear_probe(z["train"][keep], y["train"][keep], z["test"],
                                                                   y["test"])["macro_f1"]
    return scores


def _check(cfg: StudyConfig) -> None:
    unknown = (set(cfg.methods) | set(cfg.target_methods)) - set(EXPERIMENTS)
    if unknown:
        raise InputError("--methods", f"unknown method(s) {sorted(unknown)}", f"choose from {sorted(METHODS)}")
    if cfg.target:
        target = CellStore(cfg.target)
        missing = {"train", "val", "test"} - set(target.splits)
        if missing:
            raise InputError(cfg.target, f"no {sorted(missing)} split(s)", "convert it with train, val and test splits")
        labels(target, cfg.label, "train")


def share_facts(target: CellStore, labelled: CellStore, label: str) -> dict:
    """What a share's scores rest on: its labelled cells and their types, the test split's types, and how many of
    those the validation split (the paper's kNN neighbours, the kept model's judge) holds at most 2 cells of, or
    none."""
    y = {s: labels(target, label, s) for s in ("val", "test")}
    train = labels(labelled, label, "train")
    test_types = np.unique(y["test"][y["test"] >= 0])
    val_cells = np.array([(y["val"] == t).sum() for t in test_types])
    return {"labelled_cells": len(train), "labelled_types": int(len(np.unique(train[train >= 0]))),
            "val_cells": int((y["val"] >= 0).sum()), "test_cells": int((y["test"] >= 0).sum()),
            "test_types": int(len(test_types)), "test_types_at_most_2_val_cells": int((val_cells <= 2).sum()),
            "test_types_without_val_cells": int((val_cells == 0).sum())}


def atlas_facts(aux: CellStore, label: str) -> dict:
    """The auxiliary store as the study read it (the numbers docs/results.md states come from these records)."""
    obs = aux.obs()
    facts = {"cells": aux.n_cells, "genes": aux.n_genes, "train_cells": aux.split("train")[1] - aux.split("train")[0],
             "cell_types": int(obs[label].nunique())}
    facts.update({f"{c}s": int(obs[c].nunique()) for c in ("dataset_id", "donor_id", "assay") if c in obs})
    return facts


def run_study(cfg: StudyConfig) -> list[dict]:
    import time

    _check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    aux = aux_store(cfg, out)
    records: list[dict] = []
    decay_steps = 2 * steps_per_epoch(aux, cfg.batch_size)  # the paper's 2 epochs, on the auxiliary store
    started = time.perf_counter()
    settings = {name: asdict(experiment(name)) for name in ("supervised", "finetune", *cfg.methods,
                                                            *cfg.target_methods)}
    facts = {"auxiliary": atlas_facts(aux, cfg.label), "lr_step_optimiser_steps": decay_steps}

    def record(**r):
        records.append(r)
        stores = {"aux": str(aux.path), "target": cfg.target or str(out / "target-seed*.cellstore")}
        (out / "records.json").write_text(json.dumps({
            "config": asdict(cfg), "stores": stores, "facts": facts, "settings": settings, "records": records,
            "wall_seconds": round(time.perf_counter() - started)}, indent=1))
        print(json.dumps(r), flush=True)

    for seed in cfg.seeds:
        run, target = out / f"seed{seed}", target_store(cfg, out, seed)
        run.mkdir(exist_ok=True)
        shares = {s: labelled_share(cfg, target, s, seed, run) for s in cfg.label_shares}
        models = {("b", m): (pretrain(cfg, aux, m, seed, run / f"pretrain_aux_{m}", decay_steps), aux)
                  for m in cfg.methods}
        models.update({("c", m): (pretrain(cfg, target, m, seed, run / f"pretrain_target_{m}", decay_steps), target)
                       for m in cfg.target_methods})
        frozen = {key: {"masked_fraction": masked_fraction(model.parent), "pretrain_epochs": epochs(
            store, cfg.pretrain_steps, cfg.batch_size), **frozen_scores(cfg, model, target, shares)}
                  for key, (model, store) in models.items()}
        for share, labelled in shares.items():
            known = share_facts(target, labelled, cfg.label)
            record(seed=seed, share=share, **known, setting="a", method="supervised",
                   **finetune(cfg, labelled, target, None, seed, run / f"share{share:g}_supervised", decay_steps))
            for (setting, method), (model, _) in models.items():
                kept = {k: v for k, v in frozen[(setting, method)].items() if k != "probe_f1_by_share"}
                record(seed=seed, share=share, **known, setting=setting, method=method, **kept,
                       share_probe_macro_f1=frozen[(setting, method)]["probe_f1_by_share"][share],
                       **finetune(cfg, labelled, target, model, seed, run / f"share{share:g}_{setting}_{method}",
                                  decay_steps))
    return records


def main(argv: list[str] | None = None, prog: str = "transfer_study.py") -> None:
    """`cellssl study`, `python -m cellssl.engine.evaluate.transfer` and recipes/transfer_study.py: the study from a command
    line whose options are StudyConfig's; writes summary.md naming the stores it read. A bad option or input is one
    line, no traceback."""
    import sys

    from ..options import OneLineParser, add_options, apply
    from .study_stats import summary

    parser = OneLineParser(prog=prog, description="The paper's transfer "
                            "study: SSL pretraining on an auxiliary atlas, fine-tuning on labelled shares of a target, "
                            "against the supervised baseline, over seeds.", allow_abbrev=False)
    paths = add_options(parser, StudyConfig())
    try:
        cfg = apply(StudyConfig(), parser.parse_args(argv), paths)
        records = run_study(cfg)
    except InputError as exc:
        print(f"cellssl: error: {exc}", file=sys.stderr)
        sys.exit(2)
    stores = f"auxiliary store: {cfg.aux or Path(cfg.out) / 'auxiliary.cellstore'}; target: " + (
        cfg.target or f"a synthetic draw per seed ({Path(cfg.out)}/target-seed*.cellstore)")
    table = f"{stores}\n\n" + summary(records, cfg.margin)
    (Path(cfg.out) / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(prog="python -m cellssl.engine.evaluate.transfer")
