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
# StepLR ×0.9 every 2 epochs, gradient clipping at norm 1.0, dropout 0.1, batch 8,192. Every pretraining run exports
# the step with the best validation loss (the reference's `best_checkpoint_val`, which fine-tuning starts from) and
# keeps the last step beside it (model-last.safetensors).
_MAE = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01, scheduler="step", lr_step_epochs=2, lr_gamma=0.9,
                   gradient_clipping=1.0, model=ModelConfig(dropout=0.1), batch_size=8192, select="val_loss")
# the reference's classifier (trainer/classifier/train.py, models/lightning_modules MLPClassifier and its scripts):
# ReLU blocks with one after the 64-unit layer too, then Linear 64 → classes; class-weighted cross-entropy, AdamW
# lr 9e-4, weight decay 0.05, StepLR ×0.9 every 2 epochs, clipping 1.0, dropout 0.1, batch 16,384 (the split, if
# smaller: the trainer caps it); the model kept is the one with the best validation loss
_CLASSIFIER = TrainConfig(objective=ObjectiveConfig(name="supervised", class_weighted=True), optimizer="adamw",
                          lr=9e-4, weight_decay=0.05, scheduler="step", lr_step_epochs=2, lr_gamma=0.9,
                          gradient_clipping=1.0, batch_size=16384, select="val_loss",
                          model=ModelConfig(dropout=0.1, activation="relu", head_block=True))
# our variant: the SSL encoder's own SELU network (no block after the embedding), kept by validation macro F1
_CLASSIFIER_SELU = replace(_CLASSIFIER, model=ModelConfig(dropout=0.1), select="val_macro_f1")

# BYOL (reference: trainer/contrastive/train.py with scripts/pretraining/contrastive/BYOL/BYOL.sh): AdamW lr 1e-2,
# weight decay 1e-5, no scheduler, encoder dropout 0, clipping 1.0; projector on the 256-unit block, 4,096
# hidden, 256 out; EMA 0.99 (the reference's target never moves: --byol-target frozen); NB noise 0.2 and dropout
# 0.1, each with p = 0.3 (the script)
_BYOL = TrainConfig(objective=ObjectiveConfig(name="byol", augment_p=0.3, noise_intensity=0.2,
                                              dropout_intensity=0.1, ema=0.99),
                    optimizer="adamw", lr=1e-2, weight_decay=1e-5, scheduler="none", gradient_clipping=1.0,
                    model=ModelConfig(dropout=0.0), select="val_loss", out="runs/byol")

EXPERIMENTS: dict[str, TrainConfig] = {
    "mae_random": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="random", rate=0.5), out="runs/mae_random"),
    # reference scripts: 50 % of the programmes, drawn once per batch
    "mae_gene_program": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gene_program", rate=0.5,
                                                                rate_of="programmes", per="batch"),
                                out="runs/mae_gene_program"),
    # scripts/pretraining/masking/gp_to_gp/MLP.sh and gp_to_tf/MLP.sh: dropout 0.05, no weight decay, batches of
    # 32,768 and 16,384
    "mae_gp_to_gp": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gp_to_gp", per="cell"),
                            model=ModelConfig(dropout=0.05), weight_decay=0.0, batch_size=32768,
                            out="runs/mae_gp_to_gp"),
    "mae_gp_to_tf": replace(_MAE, objective=ObjectiveConfig(name="mae", mask="gp_to_tf", per="cell"),
                            model=ModelConfig(dropout=0.05), weight_decay=0.0, batch_size=16384,
                            out="runs/mae_gp_to_tf"),
    "reconstruction": replace(_MAE, objective=ObjectiveConfig(name="reconstruction"), out="runs/reconstruction"),
    "byol": _BYOL,
    # BYOL as the reference's code runs it: its EMA update is never called, so the target stays at initialisation
    "byol_frozen": replace(_BYOL, objective=replace(_BYOL.objective, byol_target="frozen"), out="runs/byol_frozen"),
    # Barlow Twins (reference: models/contrastive/bt.py with scripts/pretraining/contrastive/BarlowTwins/BT.sh): LARS
    # (momentum 0.9, η 0.001; biases and norms without decay or adaptation), rates 0.2 (weights) and 0.0048 (biases)
    # per 256 cells of the global batch, linear warm-up over 10 epochs then cosine decay to 1/1000 at epoch 1,000
    # (counted in epochs of the training split whatever --max-steps is), weight decay 1e-5, no clipping, encoder
    # dropout 0, λ 0.0051, NB noise 0.2 (the script) and dropout 0.1
    "barlow_twins": TrainConfig(objective=ObjectiveConfig(name="barlow_twins", noise_intensity=0.2,
                                                          dropout_intensity=0.1, lambd=0.0051),
                                optimizer="lars", lr=0.2, lr_biases=0.0048, weight_decay=1e-5,
                                scheduler="warmup_cosine", warmup_epochs=10, schedule_epochs=1000,
                                gradient_clipping=0.0, model=ModelConfig(dropout=0.0), select="val_loss",
                                out="runs/barlow_twins"),
    "supervised": replace(_CLASSIFIER, out="runs/supervised"),
    "supervised_selu": replace(_CLASSIFIER_SELU, out="runs/supervised_selu"),
    # fine-tuning a pretrained encoder: the reference's scripts use dropout 0 there (models/ fine-tuning code)
    "finetune": replace(_CLASSIFIER, model=replace(_CLASSIFIER.model, dropout=0.0), out="runs/finetune"),
    "finetune_selu": replace(_CLASSIFIER_SELU, model=replace(_CLASSIFIER_SELU.model, dropout=0.0),
                             out="runs/finetune_selu"),
}

PRETRAINING = ("mae_random", "mae_gene_program", "mae_gp_to_gp", "mae_gp_to_tf", "byol", "barlow_twins",
               "reconstruction")


def experiment(name: str) -> TrainConfig:
    if name not in EXPERIMENTS:
        from cellssl.loaders import InputError

        raise InputError("experiment", f"unknown experiment {name!r}", f"choose from {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]
