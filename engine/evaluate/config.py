"""What an evaluation run does: the store, the models, the tasks and their budgets (no heavy imports here, so the
command line can describe them cheaply). The fields are `cellssl eval`'s options (engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("cell_type", "reconstruction", "cross_modality", "integration")
NO_PRETRAINING = "no pretraining"


def opt(default, help: str, choices=None):
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "objectives": None, "choices": choices})


@dataclass
class EvalConfig:
    data: str = opt("default", "labelled cell store with train and test splits (default: the embedded synthetic "
                    "store)")
    models: dict[str, str] = opt(dict, "name → model.safetensors or its run folder (positional arguments)")
    out: str = opt("runs/evaluate", "output folder: results.json, results.md, plots/")
    overwrite: bool = opt(False, "replace the results of an earlier evaluation in --out")
    label: str = opt("cell_type", "categorical obs column to predict")
    batch: str = opt("dataset_id", "categorical obs column of batches (integration)")
    modality: tuple[str, ...] | None = opt(None, "paired-modality obs columns, comma-separated (default: every "
                                           "numeric column named protein_*)")
    tasks: tuple[str, ...] = opt(TASKS, f"comma-separated subset of {','.join(TASKS)}")
    baselines: bool = opt(True, "PCA and the supervised model trained from scratch beside the models")
    finetune_steps: int = opt(200, "fine-tuning steps per model (and for the from-scratch baseline)")
    crossmodal_steps: int = opt(200, "steps of the end-to-end cross-modality training")
    batch_size: int = opt(2048, "cells per step of fine-tuning and cross-modality training")
    precision: str = opt("fp32", "fine-tuning precision", ("fp32", "bf16"))
    knn: int = opt(5, "neighbours of the zero-shot kNN classifier")
    mask_rate: float | None = opt(0.5, "also score reconstruction on the positions of a random mask of this rate")
    integration_cells: int = opt(10_000, "subsample for the scIB metrics")
    plots: bool = opt(True, "UMAP and per-class F1 plots")
    seed: int = opt(0, "seed of probes, heads, fine-tuning and subsamples")
