"""Run configuration: plain dataclasses a recipe fills in and the trainer reads. Paper defaults throughout."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .models import ModelConfig


@dataclass
class ObjectiveConfig:
    name: str = "mae"                    # mae, reconstruction, byol, barlow_twins, supervised
    mask: str = "random"                 # mae: random, gene_program, gp_to_gp, gp_to_tf
    rate: float = 0.5
    programmes: str | None = None        # GMT file (symbols or Ensembl ids); None: the packaged GO programmes
    per: str = "batch"                   # programme choice per "batch" (paper) or per "cell"
    label: str = "cell_type"             # supervised: the obs column to predict


@dataclass
class TrainConfig:
    data: str | None = None              # a cell store; None: the embedded synthetic default
    out: str = "runs/default"
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 8192               # per rank (DeepSpeed's micro-batch)
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_step_epochs: int = 2              # StepLR(step 2 epochs, gamma 0.9)
    lr_gamma: float = 0.9
    precision: str = "fp32"              # "bf16": matmuls under bf16 autocast (fp32 weights, optimiser and loss)
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 4
    checkpoint_every: int = 500
    resume: bool = False
    init_encoder: str | None = None      # fine-tuning: a model.pt whose encoder starts this run
    deepspeed_config: str | None = None  # JSON; None: recipes/deepspeed.json
    trace: bool = False                  # each rank logs its batches' cells and a weight checksum (tests, debugging)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["objective"] = ObjectiveConfig(**d.get("objective", {}))
        model = d.get("model", {})
        d["model"] = ModelConfig(**{**model, "hidden": tuple(model.get("hidden", ModelConfig.hidden))})
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())
