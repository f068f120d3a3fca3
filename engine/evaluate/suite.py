"""One evaluation run: every requested task for every model and baseline on one labelled store, written as
results.json, results.md and PNG plots. What `cellssl eval` and `recipes/evaluate.py` run."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from cellssl.loaders import CellStore, InputError

from ..models import AutoEncoder, ModelConfig
from . import celltype, crossmodal, integration, report
from .config import NO_PRETRAINING, TASKS, EvalConfig
from .inputs import labels, modality, modality_columns
from .reconstruction import reconstruction_scores
from .representations import ModelRepresentation, PCARepresentation


def _check(cfg: EvalConfig, store: CellStore) -> None:
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise InputError("--tasks", f"unknown task(s) {sorted(unknown)}", f"choose from {list(TASKS)}")
    if not cfg.models and not cfg.baselines:
        raise InputError("--models", "nothing to evaluate", "pass models (model.safetensors or run folders), or keep the baselines on")
    for split in ("train", "test"):
        labels(store, cfg.label, split)
    if "integration" in cfg.tasks:
        labels(store, cfg.batch, "test")
        if tuple(cfg.tasks) != TASKS and not integration.available():  # asked for: fail before hours of work
            raise InputError("scib-metrics", "the integration task needs it", 'pip install "cellssl[eval]"')


def evaluate(cfg: EvalConfig) -> dict:
    store = CellStore(cfg.data)
    _check(cfg, store)
    out = Path(cfg.out)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise InputError(out, "already holds evaluation results", "pass --overwrite to replace them, or choose "
                         "another --out")
    out.mkdir(parents=True, exist_ok=True)
    reps = [ModelRepresentation(path, name) for name, path in cfg.models.items()]
    for rep in reps:
        rep.check(store)
    pca = PCARepresentation(store, seed=cfg.seed)
    finetuned: dict[str, Path] = {}
    if cfg.baselines:
        print("baseline: supervised from scratch")
        finetuned[NO_PRETRAINING] = celltype.finetune(store, cfg.label, out / "no_pretraining", None,
                                                      cfg.finetune_steps, cfg.batch_size, cfg.seed, cfg.precision)
        reps += [pca, ModelRepresentation(finetuned[NO_PRETRAINING], NO_PRETRAINING)]
        reps[-1].kind = "baseline"
    z = {rep.name: {s: rep.embed(store, s) for s in ("train", "test")} for rep in reps}
    y = {s: labels(store, cfg.label, s) for s in ("train", "test")}
    names = store.categories[cfg.label]
    results: dict = {"store": str(store.path), "label": cfg.label, "config": asdict(cfg), "skipped": {},
                     "representations": {r.name: {"kind": r.kind, "path": str(getattr(r, "path", ""))} for r in reps}}

    if "cell_type" in cfg.tasks:
        part = results["cell_type"] = {}
        for rep in reps:
            zr = z[rep.name]
            part[rep.name] = {
                "linear_probe": celltype.linear_probe(zr["train"], y["train"], zr["test"], y["test"], names, cfg.seed),
                "knn": celltype.knn(zr["train"], y["train"], zr["test"], y["test"], names, cfg.knn)}
            if rep.kind == "model":
                print(f"fine-tuning {rep.name}")
                finetuned[rep.name] = celltype.finetune(store, cfg.label, out / "finetune" / rep.name, rep.path,
                                                        cfg.finetune_steps, cfg.batch_size, cfg.seed, cfg.precision)
            if rep.name in finetuned:
                part[rep.name]["finetune"] = celltype.finetuned_scores(finetuned[rep.name], store, cfg.label)

    if "reconstruction" in cfg.tasks:
        part = results["reconstruction"] = {}
        for rep in reps:
            if (fn := getattr(rep, "reconstructor", None)) is None:
                continue
            part[rep.name] = {"all": reconstruction_scores(fn, store, seed=cfg.seed)}
            if cfg.mask_rate:
                part[rep.name]["masked"] = reconstruction_scores(fn, store, mask_rate=cfg.mask_rate, seed=cfg.seed)
        if not part:
            results["skipped"]["reconstruction"] = "no model with a decoder (and no PCA baseline)"

    if "cross_modality" in cfg.tasks:
        try:
            columns = modality_columns(store, cfg.modality)
        except InputError as exc:
            if cfg.modality is not None or tuple(cfg.tasks) != TASKS:
                raise
            results["skipped"]["cross_modality"] = str(exc)
            columns = None
        if columns:
            part = results["cross_modality"] = {}
            m = {s: modality(store, columns, s) for s in ("train", "test")}
            for rep in reps:
                zr = z[rep.name]
                part[rep.name] = {"frozen": crossmodal.frozen(zr["train"], m["train"], zr["test"], m["test"], columns,
                                                              seed=cfg.seed)}
                encoder = None
                if rep.kind == "model":
                    encoder, latent = rep.autoencoder.encoder, rep.config.model.latent
                elif rep.name == NO_PRETRAINING:  # trained from random weights for this task
                    encoder, latent = AutoEncoder(store.n_genes, ModelConfig()).encoder, ModelConfig().latent
                if encoder is not None:
                    part[rep.name]["finetuned"] = crossmodal.end_to_end(
                        encoder, latent, store, columns, cfg.crossmodal_steps, cfg.batch_size, seed=cfg.seed)

    if "integration" in cfg.tasks and not integration.available():  # default tasks only: _check refused the rest
        results["skipped"]["integration"] = 'scib-metrics is not installed (pip install "cellssl[eval]")'
    elif "integration" in cfg.tasks:
        batch = labels(store, cfg.batch, "test")
        results["integration"] = integration.scib_scores({r.name: z[r.name]["test"] for r in reps}, batch, y["test"],
                                                         z[pca.name]["test"] if pca.name in z else pca.embed(store, "test"),
                                                         cfg.integration_cells, cfg.seed)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results))
    if cfg.plots:
        results["plots"] = report.plots(results, {r: v["test"] for r, v in z.items()}, y["test"], names,
                                        labels(store, cfg.batch, "test") if cfg.batch in store.categories else None,
                                        out / "plots", cfg.seed)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
