"""The experiment registry: every recipe's configuration, with the settings the paper's reference code
(theislab/ssl_in_scg) trains each objective with; recipes, recipes/evaluate.py, the transfer study and the training
benchmark all read it. Every value stays overridable from the recipe's command line; docs/fidelity.md says where
and why a value differs from the reference.
"""
from __future__ import annotations

from dataclasses import replace

from .config import ObjectiveConfig, TrainConfig
from .models import ModelConfig

# Masked autoencoders (reference: trainer/masking/train.py and its scripts): AdamW lr 1e-3, weight decay 0.01,
# StepLR ×0.9 every 2 epochs, gradient clipping at norm 1.0, dropout 0.1, batch 8,192.
_MAE = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01, scheduler="step", lr_step_epochs=2, lr_gamma=0.9,
                   gradient_clipping=1.0, model=ModelConfig(dropout=0.1), batch_size=8192)

EXPERIMENTS: dict[str, TrainConfig] = {
    "mae_random": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="random", rate=0.5), out="runs/mae_random"),
    # reference scripts: 50 % of the programmes, drawn once per batch
    "mae_gene_program": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gene_program", rate=0.5,
                                                                rate_of="programmes", per="batch"),
                                out="runs/mae_gene_program"),
    "mae_gp_to_gp": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gp_to_gp", per="cell"),
                            out="runs/mae_gp_to_gp"),
    "mae_gp_to_tf": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gp_to_tf", per="cell"),
                            out="runs/mae_gp_to_tf"),
    "reconstruction": replace(_MAE, objective=ObjectiveConfig(name="reconstruction"), out="runs/reconstruction"),
    # BYOL (reference: trainer/contrastive/train.py): AdamW lr 1e-2, weight decay 1e-5, no scheduler, encoder dropout
    # 0, gradient clipping 1.0; projector 256 / hidden 4,096, EMA 0.99; NB noise 0.1 and dropout 0.1, each p = 0.5
    "byol": TrainConfig(objective=ObjectiveConfig(name="byol", augment_p=0.5, noise_intensity=0.1,
                                                  dropout_intensity=0.1, ema=0.99),
                        optimizer="adamw", lr=1e-2, weight_decay=1e-5, scheduler="none", gradient_clipping=1.0,
                        model=ModelConfig(dropout=0.0), out="runs/byol"),
    # Barlow Twins (reference: models/contrastive/bt.py): LARS (momentum 0.9, η 0.001; biases and norms without
    # decay or adaptation), rates 0.2 (weights) and 0.0048 (biases) per 256 cells of the global batch, linear
    # warm-up for 1 % of training then cosine decay, weight decay 1e-5, no clipping, encoder dropout 0, λ 0.0051
    "barlow_twins": TrainConfig(objective=ObjectiveConfig(name="barlow_twins", noise_intensity=0.1,
                                                          dropout_intensity=0.1, lambd=0.0051),
                                optimizer="lars", lr=0.2, lr_biases=0.0048, weight_decay=1e-5,
                                scheduler="warmup_cosine", warmup_fraction=0.01, gradient_clipping=0.0,
                                model=ModelConfig(dropout=0.0), out="runs/barlow_twins"),
    # Supervised from scratch and fine-tuning (reference: trainer/classifier/train.py with its scripts' --lr 9e-4
    # --weight_decay 0.05): the whole network, class-weighted cross-entropy, AdamW, StepLR ×0.9 every 2 epochs,
    # clipping 1.0; the model kept is the one with the best validation macro F1
    "supervised": TrainConfig(objective=ObjectiveConfig(name="supervised", class_weighted=True), optimizer="adamw",
                              lr=9e-4, weight_decay=0.05, scheduler="step", lr_step_epochs=2, lr_gamma=0.9,
                              gradient_clipping=1.0, model=ModelConfig(dropout=0.1), select="val_macro_f1",
                              out="runs/supervised"),
}
EXPERIMENTS["finetune"] = replace(EXPERIMENTS["supervised"], out="runs/finetune")

PRETRAINING = ("mae_random", "mae_gene_program", "mae_gp_to_gp", "mae_gp_to_tf", "byol", "barlow_twins",
               "reconstruction")


def experiment(name: str) -> TrainConfig:
    if name not in EXPERIMENTS:
        from cellssl.loaders import InputError

        raise InputError("experiment", f"unknown experiment {name!r}", f"choose from {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]
