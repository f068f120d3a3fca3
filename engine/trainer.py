"""The training loop, read top to bottom: set up → (resume) → loop over batches → log → validate → checkpoint
→ export.

DeepSpeed wraps the objective (`deepspeed.initialize` with `recipes/deepspeed.json`, batch size and optimiser
filled in from the run config); the loader is a `BatchStream` sharded by global rank, whose position goes into
every checkpoint. On a CPU-only machine DeepSpeed runs with its CPU accelerator and the gloo backend.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cellssl.loaders import BatchStream, CellStore
from cellssl.loaders.synthetic import default_store

from . import checkpoint
from .config import TrainConfig
from .setup import build_objective

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class NonFiniteLoss(RuntimeError):
    pass


def init_distributed() -> tuple[int, int, torch.device]:
    """Single-process defaults for `python recipe.py`; the deepspeed launcher sets the real ones."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def deepspeed_config(cfg: TrainConfig) -> dict:
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else RECIPES / "deepspeed.json"
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.pop("train_batch_size", None)  # derived: micro-batch × accumulation × world size
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                   "torch_adam": True}}
    return ds


def step_lr(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The paper's StepLR (×0.9 every 2 epochs), counted in optimiser steps because DeepSpeed steps it each one."""
    every = max(1, cfg.lr_step_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.lr_gamma ** (s // every))


@torch.no_grad()
def validate(engine, stream: BatchStream, cfg: TrainConfig, device, step: int) -> float:
    engine.eval()
    losses = []
    for i, batch in enumerate(stream):
        if i >= cfg.val_batches:
            break
        labels = batch.obs.get(cfg.objective.label)
        loss, _ = engine(batch.x.to(device), None if labels is None else labels.to(device), step)
        losses.append(float(loss))
    engine.train()
    return sum(losses) / max(len(losses), 1)


def train(cfg: TrainConfig) -> Path:
    import deepspeed

    rank, world, device = init_distributed()
    out = Path(cfg.out)
    store = CellStore(cfg.data or default_store(progress=rank == 0))
    torch.manual_seed(cfg.seed)
    columns = [cfg.objective.label] if cfg.objective.label in store.obs_columns else []
    stream = BatchStream(store, "train", cfg.batch_size, cfg.seed, rank, world, columns=columns)
    val_split = "val" if "val" in store.splits else None
    val = BatchStream(store, val_split, min(cfg.batch_size, store.split(val_split)[1] - store.split(val_split)[0]),
                      cfg.seed, rank, world, columns=columns) if val_split else None
    objective = build_objective(cfg, store)
    params = [p for p in objective.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=params, config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: step_lr(opt, cfg, len(stream)))
    step, epoch = 0, 0
    if cfg.resume and (client := checkpoint.load(engine, out / "checkpoints")) is not None:
        step = client["step"]
        stream.load_state_dict(client["stream"])
        epoch = stream.epoch
    out.mkdir(parents=True, exist_ok=True)  # every rank: on separate nodes each may be the first here
    if rank == 0:
        cfg.save(out / "config.json")
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    trace = open(out / f"trace-rank{rank}.jsonl", "a") if cfg.trace else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    started, cells = time.perf_counter(), 0
    while step < cfg.max_steps:
        for batch in stream:
            x = batch.x.to(device, non_blocking=True)
            labels = batch.obs.get(cfg.objective.label)
            loss, metrics = engine(x, None if labels is None else labels.to(device), step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at step {step}; stopping with the last good checkpoint "
                                    f"in {out / 'checkpoints'} intact (lower the learning rate, or check the data)")
            engine.backward(loss)
            engine.step()
            objective.after_step()
            step += 1
            if trace:
                weight = next(objective.encoder.parameters())
                trace.write(json.dumps({"step": step, "cells": batch.index.tolist(),
                                        "weight_sum": float(weight.detach().double().abs().sum())}) + "\n")
            cells += len(batch) * world
            bar.update(1)
            if log and (step % cfg.log_every == 0 or step == cfg.max_steps):
                seconds = time.perf_counter() - started
                record = {"step": step, "epoch": epoch, "loss": value, "lr": scheduler.get_last_lr()[0],
                          "cells_per_s": cells / seconds, "seconds": seconds,
                          **{k: float(v) for k, v in metrics.items() if k != "loss"}}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{value:.4f}")
            if val is not None and step % cfg.val_every == 0:
                val_loss = validate(engine, val, cfg, device, step)
                if log:
                    log.write(json.dumps({"step": step, "epoch": epoch, "val_loss": val_loss}) + "\n")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint.save(engine, out / "checkpoints", step, stream.state_dict())
            if step >= cfg.max_steps:
                break
        else:
            epoch += 1
            stream.set_epoch(epoch)
    bar.close()
    if trace:
        trace.close()
    if rank == 0:
        checkpoint.export_model(objective, cfg.to_json(), list(store.genes.gene_id), out / "model.pt")
        log.close()
    return out / "model.pt"
