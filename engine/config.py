"""Run configuration: plain dataclasses a recipe fills in and the trainer reads; their fields are the command line.

Each field's metadata gives its help text and, where it concerns only some objectives, which ones: the recipe
command line (engine/options.py) offers a recipe exactly the fields that apply to it. Defaults are declared here
once; the per-objective values of the paper's reference code live in the experiment registry (engine/experiments.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .fields import at_least, dropout, fraction, non_negative, opt, positive, probability
from .models import ModelConfig

MAE, BYOL, BT, SUPERVISED = ("mae",), ("byol",), ("barlow_twins",), ("supervised",)
CONTRASTIVE = BYOL + BT


@dataclass
class ObjectiveConfig:
    name: str = opt("mae", "objective (fixed by the recipe)", choices=("mae", "reconstruction", "byol",
                                                                       "barlow_twins", "supervised"))
    mask: str = opt("random", "masking strategy", MAE, ("random", "gene_program", "gp_to_gp", "gp_to_tf"))
    rate: float = opt(0.5, "masking rate: of genes (random), of programmes or genes (gene_program, see --rate-of)",
                      MAE, check=fraction)
    rate_of: str = opt("programmes", "gene_program: the rate is the fraction of programmes drawn (the paper) or the "
                       "fraction of genes to mask, drawing programmes until it is covered", MAE,
                       ("programmes", "genes"))
    programmes: str | None = opt(None, "GMT file of gene programmes (symbols or Ensembl ids); default: the "
                                 "packaged GO programmes, or the synthetic atlas's own for its stores", MAE)
    per: str = opt("batch", "draw the programmes once per batch (the paper) or per cell", MAE, ("batch", "cell"))
    label: str = opt("cell_type", "obs column to predict", SUPERVISED)
    class_weighted: bool = opt(True, "weight the cross-entropy by inverse class frequency (the reference's "
                               "fine-tuning)", SUPERVISED)
    augment_p: float = opt(0.5, "probability of each augmentation of a view (NB noise, dropout)", BYOL,
                           check=probability)
    noise_intensity: float = opt(0.1, "NB-noise intensity of the augmented views", CONTRASTIVE, check=non_negative)
    dropout_intensity: float = opt(0.1, "fraction of genes dropped in the augmented views", CONTRASTIVE,
                                   check=dropout)
    ema: float = opt(0.99, "EMA decay of the target network", BYOL, check=probability)
    byol_target: str = opt("ema", "the target network: moved by EMA after every step (the paper's intent) or frozen "
                           "at initialisation (the reference's code, which never calls its EMA update)", BYOL,
                           ("ema", "frozen"))
    lambd: float = opt(0.0051, "weight of the off-diagonal terms", BT, check=non_negative)


@dataclass
class TrainConfig:
    data: str | None = opt(None, "cell store (default: the embedded synthetic store)")
    out: str = opt("runs/default", "run folder")
    objective: ObjectiveConfig = opt(ObjectiveConfig, "")
    model: ModelConfig = opt(ModelConfig, "")
    batch_size: int = opt(8192, "cells per rank per micro-batch (DeepSpeed's micro-batch)", check=at_least(1))
    gradient_accumulation: int = opt(1, "micro-batches per optimiser step: the global batch is batch size × this × "
                                     "ranks, and --max-steps, the schedule and the log count optimiser steps",
                                     check=at_least(1))
    optimizer: str = opt("adamw", "optimiser", choices=("adamw", "lars"))
    lr: float = opt(1e-3, "learning rate (LARS: of the weights)", check=positive)
    lr_biases: float = opt(0.0, "LARS: learning rate of biases and norms (0: the same as --lr)", check=non_negative)
    weight_decay: float = opt(0.01, "weight decay", check=non_negative)
    scheduler: str = opt("step", "learning-rate schedule: StepLR (×gamma every lr-step-epochs), linear warm-up then "
                         "cosine decay to 1/1000 (both in epochs of the training split), or constant",
                         choices=("step", "warmup_cosine", "none"))
    lr_step_epochs: int = opt(2, "StepLR period in epochs of the training split", check=at_least(1))
    lr_gamma: float = opt(0.9, "StepLR factor", check=positive)
    warmup_epochs: float = opt(10.0, "warmup_cosine: epochs of linear warm-up (the reference: 10)", check=non_negative)
    schedule_epochs: float = opt(1000.0, "warmup_cosine: epoch at which the cosine reaches 1/1000 of the rate (the "
                                 "reference: 1,000, whatever a run's length)", check=positive)
    gradient_clipping: float = opt(1.0, "max gradient norm; 0: off", check=non_negative)
    input: str = opt("csr", "how batches reach the model: CSR (on a GPU copied compactly and densified there; on CPU "
                     "read sparse by the first layer and the losses) or dense from the loader",
                     choices=("csr", "dense"))
    precision: str = opt("fp32", "fp32, or bf16 matmuls under autocast (fp32 weights, optimiser and loss)",
                         choices=("fp32", "bf16"))
    resident: str = opt("auto", "hold the training split in memory after one read (on each GPU, or in RAM: every "
                        "rank a copy), the same batches as streaming, faster; auto: where it fits on every rank, else "
                        "stream from disk (decided once for all ranks)", choices=("auto", "off", "host", "device"))
    max_steps: int = opt(1000, "optimiser steps to train for", check=at_least(1))
    seed: int = opt(0, "seed of the weights, the data order and every mask and view", check=at_least(0))
    log_every: int = opt(10, "steps between log lines", check=at_least(1))
    val_every: int = opt(200, "steps between validations", check=at_least(1))
    val_batches: int = opt(4, "validation: this many global batches of the validation split (0: all of it), the "
                           "same cells and draws each time on any number of ranks", check=non_negative)
    val_batch_size: int = opt(0, "cells per rank in each validation pass (0: --batch-size); the cells validated stay "
                              "--val-batches global batches, only their chunks change (not for objectives whose loss "
                              "couples the cells of a batch)", check=non_negative)
    select: str = opt("last", "which model a run exports: the last step's, or the one with the best validation loss "
                      "or macro F1 (classifiers)", choices=("last", "val_loss", "val_macro_f1"))
    checkpoint_every: int = opt(500, "steps between checkpoints", check=at_least(1))
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = opt(False, "start again in an --out that holds a run, deleting its files")
    init_encoder: str | None = opt(None, "a model (or run folder) whose encoder starts this run (fine-tuning)")
    deepspeed_config: str | None = opt(None, "DeepSpeed JSON; default: the packaged engine/deepspeed.json")
    monitor: str = opt("none", "also log to DeepSpeed's monitor in the run folder: TensorBoard event files (needs the "
                       "tensorboard package) or CSV files", choices=("none", "tensorboard", "csv"))
    trace: bool = opt(False, "each rank logs its batches' cells and a weight checksum (trace-rankN.jsonl)")
    collective_timeout: int = opt(300, "seconds a rank waits in a collective (a gradient all-reduce, a barrier) for "
                                  "the others before the launch ends: a lost or stalled rank ends every rank within "
                                  "it (the rendezvous at the start waits CELLSSL_RENDEZVOUS_TIMEOUT instead)",
                                  check=at_least(10))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        names = {f.name for f in fields(ObjectiveConfig)}
        d["objective"] = ObjectiveConfig(**{k: v for k, v in d.get("objective", {}).items() if k in names})
        model = d.get("model", {})
        d["model"] = ModelConfig(**{**model, "hidden": tuple(model.get("hidden", ModelConfig.hidden))})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())
