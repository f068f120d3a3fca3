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
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cellssl.loaders import BatchStream, CellStore, InputError
from cellssl.loaders.synthetic import default_store

from . import checkpoint, optim, rundir
from .config import TrainConfig
from .feed import Feed
from .setup import build_objective

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class NonFiniteLoss(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Single-process defaults for `python recipe.py` (a free port, so two runs on one machine do not collide);
    the deepspeed launcher sets the real ones."""
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    except Exception as exc:  # torch raises several types; the message says which port
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise InputError(f"MASTER_PORT={os.environ['MASTER_PORT']}", "port already in use (another run?)",
                             "set MASTER_PORT (or the launcher's --master_port) to a free port") from None
        raise
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def announce_op_build(rank: int) -> None:
    """DeepSpeed compiles its CPU communication op the first time it runs on a machine (1–3 minutes, silently):
    say so before it starts."""
    if torch.cuda.is_available() or rank != 0:
        return
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    if not any(root.rglob("deepspeed_shm_comm*.so")):
        print(f"cellssl: building DeepSpeed's CPU communication op once (1–3 minutes; cached in {root})",
              file=sys.stderr, flush=True)


def deepspeed_config(cfg: TrainConfig) -> dict:
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else RECIPES / "deepspeed.json"
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds.pop("train_batch_size", None)  # derived: micro-batch × accumulation × world size
    if cfg.optimizer == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                       "torch_adam": True}}
    else:
        ds.pop("optimizer", None)  # ours, handed to deepspeed.initialize
    ds["gradient_clipping"] = cfg.gradient_clipping
    if cfg.monitor == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("--monitor tensorboard", "the tensorboard package is not installed",
                             "pip install tensorboard, or use --monitor csv")
    if cfg.monitor != "none":  # DeepSpeed writes its own lr; the trainer adds loss, cells/s and validation
        ds["tensorboard" if cfg.monitor == "tensorboard" else "csv_monitor"] = {
            "enabled": True, "output_path": str(Path(cfg.out).resolve()),
            "job_name": "tensorboard" if cfg.monitor == "tensorboard" else "csv_monitor"}
    return ds


def build_optimizer(cfg: TrainConfig, params, world: int):
    """None for the optimisers DeepSpeed builds from its config (AdamW); ours otherwise."""
    if cfg.optimizer == "adamw":
        return None
    if cfg.optimizer == "lars":
        return optim.lars(params, cfg, cfg.batch_size * world)
    raise InputError("--optimizer", f"unknown optimiser {cfg.optimizer!r}", "choose adamw or lars")


VALIDATION_STEP = 1 << 62  # the randomness key of every validation pass: the same masks and views each time


@torch.no_grad()
def validate(engine, val: BatchStream, feed: Feed, cfg: TrainConfig, device) -> dict:
    """Scores of the first `val_batches` batches of a fresh pass (epoch 0) over the validation split: the same cells
    and the same masks on every call, summed over every rank's cells. `val_loss` always; `val_macro_f1` and
    `val_micro_f1` for classifiers (from the confusion matrix of all ranks)."""
    engine.eval()
    model = engine.module
    classes = model.classifier.out_features if hasattr(model, "classifier") else 0
    total = torch.zeros(2, dtype=torch.float64, device=device)
    confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)
    val.set_epoch(0)
    for batch, x in feed(val):
        if batch.step >= cfg.val_batches:
            break
        labels = batch.obs.get(cfg.objective.label)
        labels = None if labels is None else labels.to(device)
        loss, _ = engine(x, labels, VALIDATION_STEP)
        total += torch.tensor([float(loss) * len(batch), len(batch)], dtype=torch.float64, device=device)
        if classes:
            known = labels >= 0
            pairs = labels[known] * classes + model.logits(x).argmax(1)[known]
            confusion += torch.bincount(pairs, minlength=classes * classes).view(classes, classes).double()
    val.set_epoch(0)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        if classes:
            torch.distributed.all_reduce(confusion)
    engine.train()
    scores = {"val_loss": float(total[0] / total[1]) if total[1] else float("nan")}
    if classes:
        scores.update(f1_from_confusion(confusion.cpu()))
    return scores


def f1_from_confusion(confusion: torch.Tensor) -> dict:
    """Macro F1 over the classes that occur (as truth or prediction) and micro F1, as scikit-learn computes them."""
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    occurs = (predicted + actual) > 0
    f1 = torch.where(occurs, 2 * tp / (predicted + actual).clamp(min=1), torch.zeros_like(tp))
    return {"val_macro_f1": float(f1[occurs].mean()) if occurs.any() else 0.0,
            "val_micro_f1": float(tp.sum() / confusion.sum().clamp(min=1))}


def train(cfg: TrainConfig) -> Path:
    import deepspeed

    rundir.check_start(cfg)  # before any rank writes into the folder
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    store = CellStore(cfg.data or default_store(progress=rank == 0))
    torch.manual_seed(cfg.seed)
    columns = [cfg.objective.label] if cfg.objective.label in store.obs_columns else []
    feed = Feed(cfg.input, device, store)
    stream = feed.stream(store, "train", cfg.batch_size, cfg.seed, rank, world, columns=columns)
    val = None
    if "val" in store.splits:
        start, stop = store.split("val")
        val = feed.stream(store, "val", max(1, min(cfg.batch_size, -(-(stop - start) // world))), cfg.seed, rank,
                          world, columns=columns, drop_last=False)
    if cfg.resume and (out / "config.json").is_file():
        rundir.check_config(cfg, (out / "config.json").read_text(), out)
    objective = build_objective(cfg, store)
    params = [p for p in objective.parameters() if p.requires_grad]
    factor = optim.schedule(cfg, len(stream))
    announce_op_build(rank)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=params, config=deepspeed_config(cfg),
        optimizer=build_optimizer(cfg, params, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    step, best = 0, -math.inf  # classifiers export their best validation macro F1, not their last step
    if cfg.resume:
        client = checkpoint.load(engine, out / "checkpoints")
        rundir.check_config(cfg, client["config"], out)
        rundir.check_store(store, client, out)
        step, best = client["step"], client.get("best", -math.inf)
        stream.load_state_dict(client["stream"])
    elif cfg.overwrite and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        rundir.clear(out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the folder is checked (and cleared) before anyone writes
    out.mkdir(parents=True, exist_ok=True)  # every rank: on separate nodes each may be the first here
    if rank == 0:
        if cfg.resume:
            rundir.truncate_log(out / "log.jsonl", step)
        else:
            cfg.save(out / "config.json")
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    trace = open(out / f"trace-rank{rank}.jsonl", "a") if cfg.trace else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=rank != 0)
    started, cells = time.perf_counter(), 0
    for batch, x in feed(stream.endless()) if step < cfg.max_steps else ():
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
            record = {"step": step, "epoch": batch.epoch, "loss": value, "lr": scheduler.get_last_lr()[0],
                      "cells_per_s": cells / seconds, "seconds": seconds,
                      **{k: float(v) for k, v in metrics.items() if k != "loss"}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{value:.4f}")
        if cfg.monitor != "none" and (step % cfg.log_every == 0 or step == cfg.max_steps):
            engine.monitor.write_events([(f"Train/{k}", v, step) for k, v in (
                ("loss", value), *((k, float(v)) for k, v in metrics.items() if k != "loss"))])
        if val is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
            scores = validate(engine, val, feed, cfg, device)
            improved = scores.get("val_macro_f1", -math.inf) > best
            if improved:
                best = scores["val_macro_f1"]
                if rank == 0:
                    checkpoint.export_model(objective, cfg.to_json(), list(store.genes.gene_id), out / checkpoint.MODEL_FILE)
            if cfg.monitor != "none":
                engine.monitor.write_events([(f"Validation/{k}", v, step) for k, v in scores.items()])
            if log:
                log.write(json.dumps({"step": step, "epoch": batch.epoch, **scores,
                                      **({"best": True} if improved else {})}) + "\n")
                log.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint.save(engine, out / "checkpoints", step, {"stream": stream.state_after(batch),
                                                                "store": store.fingerprint(),
                                                                "config": cfg.to_json(), "best": best})
        if step >= cfg.max_steps:
            break
    bar.close()
    if trace:
        trace.close()
    if rank == 0:
        if best == -math.inf:  # no classifier validation: the last step is the model
            checkpoint.export_model(objective, cfg.to_json(), list(store.genes.gene_id), out / checkpoint.MODEL_FILE)
        log.close()
    return out / checkpoint.MODEL_FILE
