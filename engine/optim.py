"""Optimisers and learning-rate schedules the reference code trains with, built once per run from the config.

AdamW goes to DeepSpeed as its own optimizer (config JSON); LARS (Barlow Twins) is ours and handed to DeepSpeed as a
client optimizer. Schedules are LambdaLR factors over optimiser steps, because DeepSpeed steps the scheduler once
per optimiser step: StepLR counted in epochs of the training split, warm-up then cosine, or constant.
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio η·‖w‖/‖g + λw‖ (You et al. 2017), as Barlow Twins uses it:
    parameters with one dimension (biases, norms) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def lars(params, cfg: TrainConfig, global_batch: int) -> LARS:
    """Weights at `lr`, biases and norms at `lr_biases`, both per 256 cells of the global batch (the reference's
    linear scaling: base rate = batch / 256)."""
    params = [p for p in params if p.requires_grad]
    scale = global_batch / 256
    groups = [{"params": [p for p in params if p.ndim > 1], "lr": cfg.lr * scale},
              {"params": [p for p in params if p.ndim <= 1], "lr": (cfg.lr_biases or cfg.lr) * scale}]
    return LARS(groups, lr=cfg.lr * scale, weight_decay=cfg.weight_decay)


def schedule(cfg: TrainConfig, steps_per_epoch: float):
    """The factor on each group's base rate after `step` optimiser steps (`steps_per_epoch`: optimiser steps an
    epoch of the training split takes, fractional where accumulation does not divide it)."""
    if cfg.scheduler == "none":
        return lambda step: 1.0
    if cfg.scheduler == "step":
        every = max(1, round(cfg.lr_step_epochs * steps_per_epoch))
        return lambda step: cfg.lr_gamma ** (step // every)
    if cfg.scheduler == "warmup_cosine":  # in epochs, as the reference: a short run ends early in its schedule
        warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
        decay = max(1, round(cfg.schedule_epochs * steps_per_epoch) - warmup)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup  # the reference counts the step being taken
            q = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
            return q + 0.001 * (1 - q)  # to 1/1000 of the base rate, as the reference ends

        return factor
    from cellssl.loaders import InputError

    raise InputError("--scheduler", f"unknown schedule {cfg.scheduler!r}", "choose step, warmup_cosine or none")
