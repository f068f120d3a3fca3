"""One evaluation run: every requested task for every model and baseline on one labelled store, written as
results.json, results.md and PNG plots. What `cellssl eval` and `recipes/evaluate.py` run.

results.json and results.md are rewritten (atomically: a temporary file renamed) after each (task, representation)
finishes, with `missing` naming what is still to come, so a killed evaluation leaves a valid partial record;
`--resume` keeps what it holds (the same settings only) and does the rest."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.lock import FolderLock

from ..models import AutoEncoder, ModelConfig
from . import celltype, crossmodal, integration, report
from .config import NO_PRETRAINING, RESUMABLE, TASKS, EvalConfig
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


class Clock:
    """Stage lines with the time since the start and an estimate of what is left. The estimate divides the time so
    far by the work done so far, work being cells through a network: three passes a cell for training (forward and
    backward), one for embedding; scIB metrics and UMAP plots, as measured on a 2-core CPU, a fixed cost (JIT
    compilation) plus a few units a cell. A guide, not a promise: on a GPU training shrinks and they do not."""

    def __init__(self, total: float):
        import psutil

        # the wall clock since the command started: imports and start-up count, as the user's watch counts them
        self.started, self.total, self.done, self.pending = psutil.Process().create_time(), max(total, 1.0), 0.0, 0.0
        self.begun = time.time()  # the estimate rates only the evaluation's own work

    def note(self, message: str) -> None:
        """A line of progress inside a stage, with the clock; the estimate is left as it was."""
        print(f"cellssl eval: {message} ({_clock(time.time() - self.started)} elapsed)", file=sys.stderr, flush=True)

    def stage(self, message: str, work: float = 0.0) -> None:
        self.done += self.pending
        self.pending = work
        now = time.time()
        elapsed, working = now - self.started, now - self.begun
        left = f", about {_clock(working / self.done * max(self.total - self.done, 0))} left" if self.done else ""
        print(f"cellssl eval: {message} ({_clock(elapsed)} elapsed{left})", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


def _sizes(store: CellStore) -> tuple[int, int]:
    return tuple(b - a for a, b in (store.split(s) for s in ("train", "test")))


def workload(cfg: EvalConfig, store: CellStore, models: int) -> dict[str, float]:
    """The work of each kind of stage, and the total, for `models` models (Clock's units)."""
    n_train, n_test = _sizes(store)
    reps = models + 2 * cfg.baselines
    work = {"finetune": cfg.finetune_steps * min(cfg.finetune_batch_size, n_train) * 3 + 2 * n_test,
            "embed": n_train + n_test, "pca": 3 * (n_train + n_test),  # measured: PCA's fit ~3 embedding passes
            "crossmodal_frozen": 3 * n_train,  # measured: a frozen head's 100 epochs on one thread, ~3 units a cell
            "crossmodal": cfg.crossmodal_steps * min(cfg.batch_size, n_train) * 6 + n_test,
            # measured on 4,000 cells (~4,500 units/s here): 13 s warm, ~40 s with jax's compilation cold; the fixed
            # part sits between the two, so that either is within 2× of the estimate
            "reconstruction": 4 * n_test, "integration": 90_000 + 10 * min(cfg.integration_cells, n_test) * reps,
            "plots": (3_000 + 6 * min(n_test, 10_000)) * reps}
    tasks = set(cfg.tasks)
    work["total"] = (work["finetune"] * (models + cfg.baselines) * ("cell_type" in tasks) + work["embed"] * reps
                     + work["pca"] + (work["crossmodal"] * (models + cfg.baselines)
                                      + work["crossmodal_frozen"] * reps) * ("cross_modality" in tasks)
                     + work["reconstruction"] * reps * ("reconstruction" in tasks)
                     + work["integration"] * ("integration" in tasks) + work["plots"] * cfg.plots)
    return work


class _Run:
    """What every task of one evaluation shares: the store, the representations and their test/train embeddings."""

    def __init__(self, cfg: EvalConfig, store: CellStore, out: Path):
        self.cfg, self.store, self.out = cfg, store, out
        self.reps = [ModelRepresentation(path, name) for name, path in cfg.models.items()]
        for rep in self.reps:
            rep.check(store)
        self.work = workload(cfg, store, len(self.reps))
        self.clock = Clock(self.work["total"])
        self.clock.stage("PCA of the train split (the linear baseline)", self.work["pca"])
        self.pca = PCARepresentation(store, seed=cfg.seed)
        self.finetuned: dict[str, Path] = {}
        if cfg.baselines and cfg.finetune_steps:
            self.clock.stage("baseline: the supervised model from scratch (fine-tuning protocol)",
                             self.work["finetune"])
            self.finetuned[NO_PRETRAINING] = self.finetune(out / "no_pretraining", None)
            scratch = ModelRepresentation(self.finetuned[NO_PRETRAINING], NO_PRETRAINING)
            scratch.kind = "baseline"
            self.reps += [self.pca, scratch]
        elif cfg.baselines:
            print("cellssl eval: --finetune-steps 0: no fine-tuning, and no from-scratch baseline", file=sys.stderr)
            self.reps.append(self.pca)
        self.clock.stage(f"embedding the train and test cells with {len(self.reps)} representation(s)",
                         self.work["embed"] * len(self.reps))
        self.splits = ("train", "val", "test") if "val" in store.splits else ("train", "test")
        self.z = {rep.name: {s: rep.embed(store, s) for s in self.splits} for rep in self.reps}
        self.y = {s: labels(store, cfg.label, s) for s in self.splits}
        self.children = hierarchy(cfg, store)

    def save(self, results: dict) -> None:
        """results.json and results.md as they stand, with what is still missing, each written under a temporary
        name and renamed: a kill at any moment leaves the previous complete file."""
        missing = []
        for task in getattr(self, "tasks", ()):
            if task in results["skipped"]:
                continue
            if task == "integration":
                missing += [] if "integration" in results else ["integration"]
                continue
            wanted = [r.name for r in self.reps if task != "reconstruction" or r.reconstructor is not None]
            missing += [f"{task}: {name}" for name in wanted if name not in results.get(task, {})]
        results["missing"] = missing
        for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", report.markdown(results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def finetune(self, folder: Path, init: Path | None) -> Path:
        """A fine-tuned model in `folder`: the one a resumed evaluation already made, else trained now."""
        cfg = self.cfg
        done = folder / "model.safetensors"
        if cfg.resume and done.is_file():
            return done
        return celltype.finetune(self.store, cfg.label, folder, init, cfg.finetune_steps, cfg.finetune_batch_size,
                                 cfg.seed, cfg.precision, cfg.classifier)


def hierarchy(cfg: EvalConfig, store: CellStore) -> list[list[int]] | None:
    """The children of each label code for the paper's correction: --child-matrix, else the store's own."""
    if cfg.child_matrix:
        from cellssl.loaders.sources.sctab import read_child_matrix

        return read_child_matrix(Path(cfg.child_matrix), len(store.categories[cfg.label]),
                                 f"pass a {len(store.categories[cfg.label])} × {len(store.categories[cfg.label])} "
                                 f"child matrix in the order of the store's {cfg.label!r} categories")
    return store.hierarchy(cfg.label)


def _paper_knn(run: "_Run", z: dict) -> dict:
    y, names = run.y, run.store.categories[run.cfg.label]
    return celltype.paper_knn(z["val"], y["val"], z["test"], y["test"], names, run.cfg.knn, run.children)


def cell_type(run: _Run, results: dict) -> None:
    cfg, names, y = run.cfg, run.store.categories[run.cfg.label], run.y
    part = results.setdefault("cell_type", {})
    paper = "val" in run.splits
    if not paper:
        results["skipped"]["paper_knn"] = "the store has no validation split (the paper's kNN draws its neighbours there)"
    for rep in run.reps:
        if rep.name in part:
            continue
        zr = run.z[rep.name]
        run.clock.note(f"cell type: {rep.name}: linear probe")
        probe = celltype.linear_probe(zr["train"], y["train"], zr["test"], y["test"], names, cfg.seed)
        run.clock.note(f"cell type: {rep.name}: kNN")
        part[rep.name] = {"linear_probe": probe,
                          "knn": celltype.knn(zr["train"], y["train"], zr["test"], y["test"], names, cfg.knn)}
        if paper:
            part[rep.name]["paper_knn"] = _paper_knn(run, zr)
        if rep.kind == "model" and cfg.finetune_steps:
            run.clock.stage(f"fine-tuning {rep.name}", run.work["finetune"])
            run.finetuned[rep.name] = run.finetune(run.out / "finetune" / rep.name, rep.path)
        if rep.name in run.finetuned:
            scores = part[rep.name]["finetune"] = celltype.finetuned_scores(run.finetuned[rep.name], run.store,
                                                                            cfg.label)
            if paper:  # the fine-tuned network's embedding (the baseline's is its frozen one, scored above)
                tuned = rep if rep.name == NO_PRETRAINING else ModelRepresentation(run.finetuned[rep.name])
                scores["paper_knn"] = part[rep.name]["paper_knn"] if tuned is rep else _paper_knn(
                    run, {s: tuned.embed(run.store, s) for s in ("val", "test")})
        run.save(results)


def reconstruction(run: _Run, results: dict) -> None:
    part = results.setdefault("reconstruction", {})
    for rep in run.reps:
        if (fn := rep.reconstructor) is None or rep.name in part:
            continue
        run.clock.note(f"reconstruction: {rep.name}")
        part[rep.name] = {"all": reconstruction_scores(fn, run.store, seed=run.cfg.seed)}
        if run.cfg.mask_rate:
            part[rep.name]["masked"] = reconstruction_scores(fn, run.store, mask_rate=run.cfg.mask_rate,
                                                             seed=run.cfg.seed)
        run.save(results)
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
    part = results.setdefault("cross_modality", {})
    m = {s: modality(store, columns, s) for s in ("train", "test")}
    if not cfg.crossmodal_steps:
        results["skipped"]["cross_modality_end_to_end"] = "--crossmodal-steps 0: frozen heads only"
        print("cellssl eval: --crossmodal-steps 0: cross-modality heads on frozen embeddings only, no encoder "
              "trained", file=sys.stderr)
    for rep in run.reps:
        if rep.name in part:
            continue
        zr = run.z[rep.name]
        trains = (rep.kind == "model" or rep.name == NO_PRETRAINING) and cfg.crossmodal_steps > 0
        run.clock.stage(f"cross-modality: {rep.name}", run.work["crossmodal_frozen"] + run.work["crossmodal"] * trains)
        part[rep.name] = {"frozen": crossmodal.frozen(zr["train"], m["train"], zr["test"], m["test"], columns,
                                                      seed=cfg.seed)}
        encoder = None
        if not trains:
            pass
        elif rep.kind == "model":
            encoder, latent = rep.autoencoder.encoder, rep.config.model.latent
        elif rep.name == NO_PRETRAINING:  # trained from random weights for this task
            encoder, latent = AutoEncoder(store.n_genes, ModelConfig()).encoder, ModelConfig().latent
        if encoder is not None:
            part[rep.name]["finetuned"] = crossmodal.end_to_end(encoder, latent, store, columns, cfg.crossmodal_steps,
                                                                cfg.batch_size, seed=cfg.seed)
        run.save(results)


def integration_task(run: _Run, results: dict) -> None:
    if "integration" in results:
        return
    if not integration.available():  # default tasks only: _check refused an explicit request
        results["skipped"]["integration"] = 'scib-metrics is not installed (pip install "cellssl[eval]")'
        return
    unintegrated = run.z[run.pca.name]["test"] if run.pca.name in run.z else run.pca.embed(run.store, "test")
    results["integration"] = integration.scib_scores({r.name: run.z[r.name]["test"] for r in run.reps},
                                                     labels(run.store, run.cfg.batch, "test"), run.y["test"],
                                                     unintegrated, run.cfg.integration_cells, run.cfg.seed)
    run.save(results)


def _task_work(run: _Run, task: str) -> float:
    """A task's own work (its fine-tunings and cross-modality trainings announce theirs)."""
    return {"reconstruction": run.work["reconstruction"] * len(run.reps),
            "integration": run.work["integration"]}.get(task, 0.0)


TASK_RUNNERS = {"cell_type": cell_type, "reconstruction": reconstruction, "cross_modality": cross_modality,
                "integration": integration_task}


def evaluate(cfg: EvalConfig) -> dict:
    store = CellStore(cfg.data)
    _check(cfg, store)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out / ".lock", "an evaluation"):
        earlier = _earlier(cfg, out)
        return _evaluate(cfg, store, out, earlier)


def _settings(config: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in RESUMABLE}


def _earlier(cfg: EvalConfig, out: Path) -> dict | None:
    """The results a --resume continues (its settings checked), or None; results in the way without --resume or
    --overwrite are refused."""
    path = out / "results.json"
    if not path.exists():
        return None
    if cfg.resume:
        try:
            earlier = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(path, f"is not readable ({exc})", "start again with --overwrite") from None
        mine, theirs = _settings(asdict(cfg)), _settings(earlier.get("config", {}))
        differs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if differs:
            raise InputError(f"{path}: {differs[0]}", f"the evaluation was started with {theirs.get(differs[0])!r}, "
                             f"this resume asks for {mine.get(differs[0])!r}", "resume with its own settings, or "
                             "start again with --overwrite (or in another --out)")
        return earlier
    if not cfg.overwrite:
        raise InputError(out, "already holds evaluation results", "pass --resume to finish an interrupted one, "
                         "--overwrite to replace them, or choose another --out")
    return None


def _evaluate(cfg: EvalConfig, store: CellStore, out: Path, earlier: dict | None = None) -> dict:
    run = _Run(cfg, store, out)
    results: dict = {"store": str(store.path), "label": cfg.label, "config": asdict(cfg), "skipped": {},
                     "representations": {r.name: {"kind": r.kind, "path": str(r.path or ""), "trained": r.trained,
                                                  "objective": r.config.objective.name if r.config else "pca"}
                                         for r in run.reps}}
    if earlier:
        results.update({t: earlier[t] for t in TASKS if t in earlier})
        results["skipped"].update(earlier.get("skipped", {}))
    tasks = [t for t in TASKS if t in cfg.tasks]
    run.tasks = tasks
    for i, task in enumerate(tasks, 1):
        run.clock.stage(f"[{i}/{len(tasks)}] {task.replace('_', ' ')}", _task_work(run, task))
        TASK_RUNNERS[task](run, results)
    run.save(results)
    if cfg.plots:
        run.clock.stage("plots", run.work["plots"])
        names = store.categories[cfg.label]
        batches = labels(store, cfg.batch, "test") if cfg.batch in store.categories else None
        results["plots"] = report.plots(results, {r: v["test"] for r, v in run.z.items()}, run.y["test"], names,
                                        batches, out / "plots", cfg.seed,
                                        batch_names=store.categories.get(cfg.batch))
        run.save(results)
    return results
