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

from cellssl.loaders import CellStore, GeneSpace, InputError
from cellssl.loaders.synth import synth

from .checkpoint import MODEL_FILE
from .evaluate import celltype
from .evaluate.inputs import labels
from .evaluate.representations import ModelRepresentation
from .experiments import EXPERIMENTS, experiment
from .runlog import LOG_FILE, read_log

METHODS = ("mae_random", "mae_gene_program", "byol", "barlow_twins")  # experiment-registry names
AUX_DATASETS = tuple(range(10))
TARGET_DATASETS = (10, 11)


@dataclass
class StudyConfig:
    out: str = "runs/transfer_study"
    aux_cells: int = 60_000
    target_cells: int = 4_000
    n_genes: int = 5_000                      # a seeded subset of the 19,350 reference genes (0: all of them)
    methods: tuple[str, ...] = METHODS
    target_methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    pretrain_steps: int = 300
    finetune_steps: int = 150
    batch_size: int = 2048                    # pretraining
    finetune_batch_size: int = 512            # the target's train split is small: several steps per epoch
    precision: str = "fp32"                   # bf16 only where the CPU has AVX512-BF16/AMX (else ~12× slower)
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
    """SSL pretraining with the method's settings from the experiment registry. StepLR (masked autoencoders) decays
    every `decay_steps` optimiser steps on any store: counted in epochs, the 2,400-cell target would decay its
    learning rate 20× faster than the auxiliary store does. A finished run is reused; an unfinished one restarts."""
    from .trainer import train

    if finished(out, cfg.pretrain_steps):
        return out / MODEL_FILE
    start, stop = store.split("train")
    steps = cfg.pretrain_steps
    base = experiment(method)
    run = replace(base, data=str(store.path), out=str(out), seed=seed, batch_size=min(cfg.batch_size, stop - start),
                  max_steps=steps, precision=cfg.precision,
                  lr_step_epochs=max(1, round(decay_steps / steps_per_epoch(store, cfg.batch_size))),
                  log_every=max(1, steps // 20), val_every=max(1, steps // 4), checkpoint_every=steps, overwrite=True)
    return train(run)


def epochs(cfg: StudyConfig, store: CellStore, steps: int, batch_size: int) -> float:
    start, stop = store.split("train")
    return steps * min(batch_size, stop - start) / (stop - start)


def masked_fraction(run: Path) -> float | None:
    """Mean realised masked fraction over a pretraining run's log (masking objectives only)."""
    values = [r["masked_fraction"] for r in read_log(run / LOG_FILE) if "masked_fraction" in r]
    return float(np.mean(values)) if values else None


def finished(run: Path, steps: int) -> bool:
    """The run reached its last step (a classifier exports its model earlier, at its best validation)."""
    latest = run / "checkpoints" / "latest"
    return (run / MODEL_FILE).is_file() and latest.is_file() and latest.read_text().strip() == f"step{steps:08d}"


def finetune(cfg: StudyConfig, target: CellStore, init: Path | None, seed: int, out: Path) -> dict:
    model = out / MODEL_FILE
    if not finished(out, cfg.finetune_steps):
        model = celltype.finetune(target, "cell_type", out, init, cfg.finetune_steps, cfg.finetune_batch_size, seed,
                                  cfg.precision)
    scores = celltype.finetuned_scores(model, target, "cell_type")
    return {"macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"]}


def frozen_scores(cfg: StudyConfig, model: Path, target: CellStore) -> dict:
    """Linear probe and zero-shot kNN on the pretrained encoder's embeddings of the target, no fine-tuning."""
    rep = ModelRepresentation(model)
    z = {s: rep.embed(target, s) for s in ("train", "test")}
    y = {s: labels(target, "cell_type", s) for s in ("train", "test")}
    return {"probe_macro_f1": celltype.linear_probe(z["train"], y["train"], z["test"], y["test"])["macro_f1"],
            "knn_macro_f1": celltype.knn(z["train"], y["train"], z["test"], y["test"], k=cfg.knn_k)["macro_f1"]}


def run_study(cfg: StudyConfig) -> list[dict]:
    out = Path(cfg.out)
    unknown = (set(cfg.methods) | set(cfg.target_methods)) - set(EXPERIMENTS)
    if unknown:
        raise InputError("--methods", f"unknown method(s) {sorted(unknown)}", f"choose from {sorted(METHODS)}")
    aux, target = stores(cfg, out)
    records: list[dict] = []
    decay_steps = 2 * steps_per_epoch(aux, cfg.batch_size)  # the paper's 2 epochs, on the auxiliary store

    def record(**r):
        records.append(r)
        (out / "records.json").write_text(json.dumps({"config": asdict(cfg), "records": records}, indent=1))
        print(json.dumps(r))

    finetune_epochs = epochs(cfg, target, cfg.finetune_steps, cfg.finetune_batch_size)
    for seed in cfg.seeds:
        run = out / f"seed{seed}"
        record(seed=seed, setting="a", method="supervised", finetune_epochs=finetune_epochs,
               **finetune(cfg, target, None, seed, run / "a_supervised"))
        for setting, store, methods in (("b", aux, cfg.methods), ("c", target, cfg.target_methods)):
            where = "aux" if setting == "b" else "target"
            for m in methods:
                folder = run / f"pretrain_{where}_{m}"
                model = pretrain(cfg, store, m, seed, folder, decay_steps)
                record(seed=seed, setting=setting, method=m, masked_fraction=masked_fraction(folder),
                       pretrain_epochs=epochs(cfg, store, cfg.pretrain_steps, cfg.batch_size),
                       finetune_epochs=finetune_epochs, **frozen_scores(cfg, model, target),
                       **finetune(cfg, target, model, seed, run / f"{setting}_{m}"))
    return records


SETTINGS = {"a": "supervised on the target only", "b": "SSL on auxiliary → fine-tune on target",
            "c": "SSL on the target itself → fine-tune on target"}


COLUMNS = (("macro_f1", "fine-tuned macro F1"), ("micro_f1", "fine-tuned micro F1"),
           ("probe_macro_f1", "linear probe macro F1"), ("knn_macro_f1", "zero-shot kNN macro F1"),
           ("masked_fraction", "masked fraction"))


def _mean_sd(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"


def paired(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """b − a over seeds paired by seed: mean, a 95 % bootstrap interval of the mean (seeds resampled), how often b
    wins, and the two-sided sign-test p-value (ties dropped)."""
    from scipy.stats import binomtest

    d = np.asarray(b, float) - np.asarray(a, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"mean": float(d.mean()), "low": float(np.quantile(means, 0.025)), "high": float(np.quantile(means, 0.975)),
            "wins": wins, "n": len(d), "p": float(p)}


def _paired_rows(frame: pd.DataFrame, baseline: tuple[str, str], metric: str) -> list[str]:
    base = frame[(frame.setting == baseline[0]) & (frame.method == baseline[1])].set_index("seed")[metric]
    rows = []
    for (setting, method), group in frame.groupby(["setting", "method"], sort=False):
        if (setting, method) == baseline or metric not in group or group[metric].isna().all():
            continue
        other = group.set_index("seed")[metric]
        seeds = sorted(set(base.index) & set(other.index))
        if len(seeds) < 2:
            continue
        r = paired(base[seeds].to_numpy(), other[seeds].to_numpy())
        rows.append(f"| ({setting}) {method} | {r['mean']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | "
                    f"{r['wins']}/{r['n']} | {r['p']:.3f} |")
    return rows


def summary(records: list[dict]) -> str:
    """Markdown: mean ± standard deviation over seeds per setting and method, then per-seed paired differences
    against the supervised baseline (fine-tuned) and against random masking (frozen and fine-tuned)."""
    frame = pd.DataFrame(records)
    head = "| setting | method | seeds | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for (setting, method), group in frame.groupby(["setting", "method"], sort=False):
        cells = " | ".join(_mean_sd(group[c]) if c in group else "–" for c, _ in COLUMNS)
        lines.append(f"| ({setting}) {SETTINGS[setting]} | {method} | {len(group)} | {cells} |")
    header = ["| setting, method | mean difference | 95 % bootstrap interval | seeds better | sign test p |",
              "|---|---:|---:|---:|---:|"]
    comparisons = [(("a", "supervised"), "macro_f1", "Fine-tuned macro F1 minus the supervised baseline's (a), "
                    "paired by seed")]
    if ((frame.setting == "b") & (frame.method == "mae_random")).any():
        comparisons += [(("b", "mae_random"), metric, f"{label} minus (b) mae_random's, paired by seed")
                        for metric, label in (("macro_f1", "Fine-tuned macro F1"),
                                              ("probe_macro_f1", "Linear-probe macro F1"))]
    for baseline, metric, title in comparisons:
        rows = _paired_rows(frame, baseline, metric)
        if rows:
            lines += ["", f"{title}:", "", *header, *rows]
    return "\n".join(lines) + "\n"
