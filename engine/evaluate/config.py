"""What an evaluation run does: the store, the models, the tasks and their budgets (no heavy imports here, so the
command line can describe them cheaply). The fields are `cellssl eval`'s options (engine/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from ..fields import at_least, fraction, opt

TASKS = ("cell_type", "reconstruction", "cross_modality", "integration")
NO_PRETRAINING = "no pretraining"
RESUMABLE = ("resume", "overwrite", "plots")  # what a resumed evaluation may change


@dataclass
class EvalConfig:
    data: str = opt("default", "labelled cell store with train and test splits (default: the embedded synthetic "
                    "store)")
    models: dict[str, str] = opt(dict, "name → model.safetensors or its run folder (positional arguments)")
    out: str = opt("runs/evaluate", "output folder: results.json, results.md, plots/")
    overwrite: bool = opt(False, "replace the results of an earlier evaluation in --out")
    resume: bool = opt(False, "continue an interrupted evaluation in --out: what results.json holds is kept, the "
                       "rest is done (the same settings only)")
    label: str = opt("cell_type", "categorical obs column to predict")
    batch: str = opt("dataset_id", "categorical obs column of batches (integration)")
    modality: tuple[str, ...] | None = opt(None, "paired-modality obs columns, comma-separated (default: every "
                                           "numeric column named protein_*)")
    tasks: tuple[str, ...] = opt(TASKS, f"comma-separated subset of {','.join(TASKS)}")
    baselines: bool = opt(True, "PCA and the supervised model trained from scratch beside the models")
    finetune_steps: int = opt(25, "fine-tuning steps per model (and for the from-scratch baseline); 0: no "
                              "fine-tuning", check=at_least(0))
    finetune_batch_size: int = opt(16384, "cells per fine-tuning step (the reference's 16,384; capped at the train "
                                   "split)", check=at_least(1))
    classifier: str = opt("reference", "the fine-tuned network and protocol: the reference's (ReLU, best validation "
                          "loss) or ours (the encoder's SELU network, best validation macro F1)",
                          choices=("reference", "selu"))
    crossmodal_steps: int = opt(200, "steps of the end-to-end cross-modality training; 0: frozen heads only",
                                check=at_least(0))
    batch_size: int = opt(2048, "cells per step of cross-modality training", check=at_least(1))
    precision: str = opt("fp32", "fine-tuning precision", choices=("fp32", "bf16"))
    knn: int = opt(5, "neighbours of the kNN classifiers (ours and the paper's)", check=at_least(1))
    child_matrix: str | None = opt(None, "cell-type child matrix (.npy, types × types, row i marking the children of "
                                   "type i) for the paper's hierarchy-corrected kNN score; default: the store's own "
                                   "(scTab conversions keep it), else no correction")
    mask_rate: float | None = opt(0.5, "also score reconstruction on the positions of a random mask of this rate",
                                  check=fraction)
    integration_cells: int = opt(10_000, "subsample for the scIB metrics", check=at_least(2))
    plots: bool = opt(True, "UMAP and per-class F1 plots")
    seed: int = opt(0, "seed of probes, heads, fine-tuning and subsamples", check=at_least(0))
