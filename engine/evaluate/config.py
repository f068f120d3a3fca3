"""What an evaluation run does: the store, the models, the tasks and their budgets (no heavy imports here, so the
command line can describe them cheaply)."""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("cell_type", "reconstruction", "cross_modality", "integration")
NO_PRETRAINING = "no pretraining"


@dataclass
class EvalConfig:
    store: str
    models: dict[str, str] = field(default_factory=dict)   # name → model.safetensors or its run folder
    out: str = "runs/evaluate"
    label: str = "cell_type"
    batch: str = "dataset_id"                                # the batch key of the integration metrics
    modality: list[str] | None = None                        # None: every numeric obs column named protein_*
    tasks: tuple[str, ...] = TASKS
    baselines: bool = True                                   # PCA and the supervised model trained from scratch
    finetune_steps: int = 200
    crossmodal_steps: int = 200
    batch_size: int = 2048
    precision: str = "fp32"
    knn_k: int = 5
    mask_rate: float | None = 0.5                            # also score reconstruction on masked positions
    integration_cells: int = 10_000
    plots: bool = True
    seed: int = 0
