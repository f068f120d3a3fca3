"""One evaluation run: every requested task for every model and baseline on one labelled store, written as
results.json, results.md and PNG plots. What `cellssl eval` and `recipes/evaluate.py` run."""
from __future__ import annotations

import json
import sys
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


class _Run:
    """What every task of one evaluation shares: the store, the representations and their test/train embeddings."""

    def __init__(self, cfg: EvalConfig, store: CellStore, out: Path):
        self.cfg, self.store, self.out = cfg, store, out
        self.reps = [ModelRepresentation(path, name) for name, path in cfg.models.items()]
        for rep in self.reps:
            rep.check(store)
        self.pca = PCARepresentation(store, seed=cfg.seed)
        self.finetuned: dict[str, Path] = {}
        if cfg.baselines:
            _stage("baseline: the supervised model from scratch (fine-tuning protocol)")
            self.finetuned[NO_PRETRAINING] = celltype.finetune(store, cfg.label, out / "no_pretraining", None,
                                                               cfg.finetune_steps, cfg.batch_size, cfg.seed,
                                                               cfg.precision)
            scratch = ModelRepresentation(self.finetuned[NO_PRETRAINING], NO_PRETRAINING)
            scratch.kind = "baseline"
            self.reps += [self.pca, scratch]
        _stage(f"embedding the train and test cells with {len(self.reps)} representation(s)")
        self.z = {rep.name: {s: rep.embed(store, s) for s in ("train", "test")} for rep in self.reps}
        self.y = {s: labels(store, cfg.label, s) for s in ("train", "test")}


def _stage(message: str) -> None:
    print(f"cellssl eval: {message}", file=sys.stderr, flush=True)


def cell_type(run: _Run, results: dict) -> None:
    cfg, names, y = run.cfg, run.store.categories[run.cfg.label], run.y
    part = results["cell_type"] = {}
    for rep in run.reps:
        zr = run.z[rep.name]
        part[rep.name] = {
            "linear_probe": celltype.linear_probe(zr["train"], y["train"], zr["test"], y["test"], names, cfg.seed),
            "knn": celltype.knn(zr["train"], y["train"], zr["test"], y["test"], names, cfg.knn)}
        if rep.kind == "model":
            _stage(f"fine-tuning {rep.name}")
            run.finetuned[rep.name] = celltype.finetune(run.store, cfg.label, run.out / "finetune" / rep.name,
                                                        rep.path, cfg.finetune_steps, cfg.batch_size, cfg.seed,
                                                        cfg.precision)
        if rep.name in run.finetuned:
            part[rep.name]["finetune"] = celltype.finetuned_scores(run.finetuned[rep.name], run.store, cfg.label)


def reconstruction(run: _Run, results: dict) -> None:
    part = results["reconstruction"] = {}
    for rep in run.reps:
        if (fn := rep.reconstructor) is None:
            continue
        part[rep.name] = {"all": reconstruction_scores(fn, run.store, seed=run.cfg.seed)}
        if run.cfg.mask_rate:
            part[rep.name]["masked"] = reconstruction_scores(fn, run.store, mask_rate=run.cfg.mask_rate,
                                                             seed=run.cfg.seed)
    if not part:
        results["skipped"]["reconstruction"] = "no model with a decoder (and no PCA baseline)"


def cross_modality(run: _Run, results: dict) -> None:
    cfg, store = run.cfg, run.store
    try:
        columns = modality_columns(store, list(cfg.modality) if cfg.modality else None)
    except InputError as exc:
        if cfg.modality is not None or tuple(cfg.tasks) != TASKS:
            raise
        results["skipped"]["cross_modality"] = str(exc)
        return
    part = results["cross_modality"] = {}
    m = {s: modality(store, columns, s) for s in ("train", "test")}
    for rep in run.reps:
        zr = run.z[rep.name]
        part[rep.name] = {"frozen": crossmodal.frozen(zr["train"], m["train"], zr["test"], m["test"], columns,
                                                      seed=cfg.seed)}
        encoder = None
        if rep.kind == "model":
            encoder, latent = rep.autoencoder.encoder, rep.config.model.latent
        elif rep.name == NO_PRETRAINING:  # trained from random weights for this task
            encoder, latent = AutoEncoder(store.n_genes, ModelConfig()).encoder, ModelConfig().latent
        if encoder is not None:
            part[rep.name]["finetuned"] = crossmodal.end_to_end(encoder, latent, store, columns, cfg.crossmodal_steps,
                                                                cfg.batch_size, seed=cfg.seed)


def integration_task(run: _Run, results: dict) -> None:
    if not integration.available():  # default tasks only: _check refused an explicit request
        results["skipped"]["integration"] = 'scib-metrics is not installed (pip install "cellssl[eval]")'
        return
    unintegrated = run.z[run.pca.name]["test"] if run.pca.name in run.z else run.pca.embed(run.store, "test")
    results["integration"] = integration.scib_scores({r.name: run.z[r.name]["test"] for r in run.reps},
                                                     labels(run.store, run.cfg.batch, "test"), run.y["test"],
                                                     unintegrated, run.cfg.integration_cells, run.cfg.seed)


TASK_RUNNERS = {"cell_type": cell_type, "reconstruction": reconstruction, "cross_modality": cross_modality,
                "integration": integration_task}


def evaluate(cfg: EvalConfig) -> dict:
    store = CellStore(cfg.data)
    _check(cfg, store)
    out = Path(cfg.out)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise InputError(out, "already holds evaluation results", "pass --overwrite to replace them, or choose "
                         "another --out")
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, store, out)
    results: dict = {"store": str(store.path), "label": cfg.label, "config": asdict(cfg), "skipped": {},
                     "representations": {r.name: {"kind": r.kind, "path": str(r.path or "")}
                                         for r in run.reps}}
    tasks = [t for t in TASKS if t in cfg.tasks]
    for i, task in enumerate(tasks, 1):
        _stage(f"[{i}/{len(tasks)}] {task.replace('_', ' ')}")
        TASK_RUNNERS[task](run, results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results))
    if cfg.plots:
        _stage("plots")
        names = store.categories[cfg.label]
        batches = labels(store, cfg.batch, "test") if cfg.batch in store.categories else None
        results["plots"] = report.plots(results, {r: v["test"] for r, v in run.z.items()}, run.y["test"], names,
                                        batches, out / "plots", cfg.seed,
                                        batch_names=store.categories.get(cfg.batch))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
