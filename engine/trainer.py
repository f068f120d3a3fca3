"""The Trainer: set up once from a run config; `train_step` is the one training step (forward, backward, gradient
clipping, optimiser and schedule, EMA) that training, every benchmark and bench/gpu_check.py run; `train` is the
loop around it, read top to bottom: step → log → validate → checkpoint, then export.

DeepSpeed wraps the objective (`deepspeed.initialize` with the packaged `deepspeed.json`, or `--deepspeed-config`,
batch size, accumulation and optimiser filled in from the run config); the loader is a `BatchStream` sharded by
global rank. The loader's position, the step, the best validation score, the RNG and the checks of config and
store are registered with the checkpointer once and travel in every checkpoint. With `--gradient-accumulation N` an
optimiser step takes N micro-batches: `--max-steps`, the schedule, the log and the checkpoints all count optimiser
steps. On a CPU-only machine DeepSpeed runs with its CPU accelerator and the gloo backend.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from cellssl.loaders import BatchStream, CellStore, InputError
from cellssl.loaders.lock import FolderLock
from cellssl.loaders.synthetic import default_store

from . import checkpoint, optim, rundir
from .config import TrainConfig
from .distributed import init_distributed
from .feed import Fed, Feed
from .flops import flops_per_cell, matmul_peak
from .runlog import LOG_FILE, RunLog, truncate_log
from .setup import build_objective
from .validation import Validator

DEFAULT_DEEPSPEED = Path(__file__).with_name("deepspeed.json")


class NonFiniteLoss(RuntimeError):
    pass


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with what the run config decides filled in; a file that disagrees with the run config on
    batch size or accumulation is refused (one place says each)."""
    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else DEFAULT_DEEPSPEED
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable DeepSpeed JSON ({exc})", "pass a JSON file to --deepspeed-config")
    decided = {"train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch-size"),
               "gradient_accumulation_steps": (cfg.gradient_accumulation, "--gradient-accumulation"),
               "train_batch_size": (cfg.batch_size * cfg.gradient_accumulation * world, "--batch-size × "
                                    "--gradient-accumulation × ranks")}
    for key, (value, option) in decided.items():
        if key in ds and ds[key] != value:
            raise InputError(f"{path}: {key}", f"{ds[key]} disagrees with the run's {value} ({option})",
                             f"remove {key} from the file and set it with {option}")
        ds[key] = value
    if cfg.optimizer == "adamw":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                       "torch_adam": True}}
    else:
        ds.pop("optimizer", None)  # ours, handed to deepspeed.initialize
    ds["gradient_clipping"] = cfg.gradient_clipping
    ds.update(_monitor_config(cfg))
    return ds


def _monitor_config(cfg: TrainConfig) -> dict:
    if cfg.monitor == "none":
        return {}
    if cfg.monitor == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("--monitor tensorboard", "the tensorboard package is not installed",
                             "pip install tensorboard, or use --monitor csv")
    name = "tensorboard" if cfg.monitor == "tensorboard" else "csv_monitor"
    return {name: {"enabled": True, "output_path": str(Path(cfg.out).resolve()), "job_name": name}}


def build_optimizer(cfg: TrainConfig, params, global_batch: int):
    """None for the optimisers DeepSpeed builds from its config (AdamW); ours otherwise."""
    if cfg.optimizer == "adamw":
        return None
    if cfg.optimizer == "lars":
        return optim.lars(params, cfg, global_batch)
    raise InputError("--optimizer", f"unknown optimiser {cfg.optimizer!r}", "choose adamw or lars")


@dataclass
class Progress:
    """Optimiser steps taken."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class LoaderPosition:
    """The training stream's position after the last batch a step consumed (the feed may have read further)."""

    def __init__(self, stream: BatchStream):
        self.stream, self.last = stream, None

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self.last is None else self.stream.state_after(self.last)

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class _Check:
    """A checkpoint part that restores nothing: it records a value and, on resume, compares it."""

    def __init__(self, value, compare):
        self.value, self.compare = value, compare

    def state_dict(self):
        return self.value

    def load_state_dict(self, saved) -> None:
        self.compare(saved)


class Trainer:
    def __init__(self, cfg: TrainConfig, objective: torch.nn.Module | None = None):
        """Set up on this rank: the process group, the store, the loader and validation, the objective (built from
        the config unless one is given) and its DeepSpeed engine."""
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        import deepspeed  # after init_distributed, which prepares its environment

        self.store = CellStore(cfg.data or default_store(progress=self.rank == 0))
        torch.manual_seed(cfg.seed)
        self.feed = Feed(cfg.input, self.device, self.store, cfg.objective.label, kept=cfg.gradient_accumulation)
        self.objective = objective if objective is not None else build_objective(cfg, self.store)
        self.stream = self.feed.stream(self.store, "train", cfg.batch_size, cfg.seed, self.rank, self.world,
                                       cfg.resident, self._device_reserve())
        self.flops_per_cell = flops_per_cell(self.objective, self.store.n_genes)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        factor = optim.schedule(cfg, len(self.stream) / cfg.gradient_accumulation)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.objective, model_parameters=params, config=deepspeed_config(cfg, self.world),
            optimizer=build_optimizer(cfg, params, cfg.batch_size * cfg.gradient_accumulation * self.world),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.validator = self._validator()
        self.progress, self.position = Progress(), LoaderPosition(self.stream)

    def _device_reserve(self) -> int:
        """GPU bytes the step needs beside the data: weights, gradients and AdamW's two moments (4 × 4 bytes a
        parameter) and a few dense batches' worth of activations and gradients."""
        params = sum(p.numel() for p in self.objective.parameters())
        return 16 * params + 6 * 4 * self.cfg.batch_size * self.store.n_genes

    def _validator(self) -> Validator | None:
        if "val" not in self.store.splits:
            return None
        start, stop = self.store.split("val")
        batch = max(1, min(self.cfg.batch_size, -(-(stop - start) // self.world)))
        stream = self.feed.stream(self.store, "val", batch, self.cfg.seed, self.rank, self.world, self.cfg.resident,
                                  self._device_reserve(), drop_last=False)
        return Validator(stream, self.feed, self.cfg.val_every, self.cfg.val_batches, self.cfg.max_steps,
                         self.cfg.select)

    # --- the step ------------------------------------------------------------------------------------------------
    def batches(self):
        """The training split, endlessly, as optimiser steps: lists of `gradient_accumulation` micro-batches."""
        micro: list[Fed] = []
        for fed in self.feed(self.stream.endless()):
            micro.append(fed)
            if len(micro) == self.cfg.gradient_accumulation:
                yield micro
                micro = []

    def train_step(self, batch: list[Fed], step: int) -> dict:
        """One optimiser step over `batch` (its micro-batches): forward and backward each, then DeepSpeed clips the
        accumulated gradient and steps optimiser and schedule; the objective's EMA follows. Micro-batch i of step s
        draws its masks and views with key s · N + i (N micro-batches a step: with N = 1, the step). Returns the
        loss and the objective's metrics, averaged over the micro-batches."""
        totals: dict[str, float] = {}
        for i, fed in enumerate(batch):
            with record_function("forward"):
                loss, metrics = self.engine(fed.x, fed.labels, step * len(batch) + i)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at step {step + 1}; stopping with the last good checkpoint "
                                    f"in {Path(self.cfg.out) / 'checkpoints'} intact (lower the learning rate, or "
                                    "check the data)")
            with record_function("backward"):
                self.engine.backward(loss)
            with record_function("optimizer step"):
                self._optimizer_step(step)
            for key, v in {**metrics, "loss": value}.items():
                totals[key] = totals.get(key, 0.0) + float(v)
        with record_function("after step"):
            self.objective.after_step()
        return {key: v / len(batch) for key, v in totals.items()}

    def _optimizer_step(self, step: int) -> None:
        """DeepSpeed's step (only at the last micro-batch: it counts them); an absurd learning rate that overflows
        the update's arithmetic is the user's setting, said in one line."""
        try:
            self.engine.step()
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise NonFiniteLoss(f"the optimiser's update overflowed at step {step + 1} ({str(exc).splitlines()[0]}); "
                                f"lower the learning rate (--lr {self.cfg.lr:g})") from None

    # --- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to `max_steps` (resuming or starting the run folder as the config says); returns the model path."""
        out = Path(self.cfg.out)
        lock = self._lock(out)
        try:
            return self._train(out)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, out: Path) -> Path:
        cfg = self.cfg
        if self.rank == 0:
            print(f"cellssl: training data {self.stream.residence_reason}", file=sys.stderr, flush=True)
        saver = self._checkpointer(out)
        self._open_run(out, saver)
        log = self._log(out)
        try:
            for batch in (self.batches() if self.progress.step < cfg.max_steps else ()):
                metrics = self.train_step(batch, self.progress.step)
                step = self.progress.step = self.progress.step + 1
                self.position.last = last = batch[-1].source
                log.step(step, last.epoch, sum(map(len, batch)) * self.world, metrics, self.scheduler.get_last_lr()[0])
                if cfg.trace:
                    log.traced(step, [int(i) for f in batch for i in f.source.index], self._weight_sum())
                if self.validator is not None and self.validator.due(step):
                    self._validate(log, step, last.epoch, out)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    self._check_weights(step)  # a checkpoint is only ever a good one
                    saver.save(step)
                if step >= cfg.max_steps:
                    break
        finally:
            log.close()
        if self.rank == 0:  # a model kept by validation was exported when it was best; the last step beside it
            last = self.validator is None or self.validator.select == "last"
            self._check_weights(self.progress.step)
            self._export(out / (checkpoint.MODEL_FILE if last else checkpoint.LAST_MODEL_FILE))
        return out / checkpoint.MODEL_FILE

    def _lock(self, out: Path) -> FolderLock | None:
        """Rank 0 holds the run folder's lock for the whole run; every rank learns whether it got it, so a second
        run into the folder ends at once, on all its ranks, before anything is read or written."""
        lock, problem = None, None
        if self.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = FolderLock(out / rundir.LOCK_FILE, "a training run").acquire()
                rundir.check_no_links(out)
            except InputError as exc:
                problem = exc
        if self.world > 1:
            shared = [None if problem is None else (problem.where, problem.problem, problem.fix)]
            torch.distributed.broadcast_object_list(shared, src=0)
            problem = InputError(*shared[0]) if shared[0] is not None else None
        if problem is not None:
            if lock is not None:
                lock.release()
            raise problem
        return lock

    def _checkpointer(self, out: Path) -> checkpoint.Checkpointer:
        saver = checkpoint.Checkpointer(self.engine, out / "checkpoints", {rundir.RECORD: self.cfg.to_json()})
        saver.register("config", _Check(self.cfg.to_json(), lambda saved: rundir.check_config(self.cfg, saved, out)))
        fingerprint = self.store.fingerprint(values=True)
        saver.register("store", _Check(fingerprint, lambda saved: rundir.check_store(self.store, saved, out,
                                                                                      fingerprint)))
        saver.register("stream", self.position)
        saver.register("progress", self.progress)
        if self.validator is not None:
            saver.register("validation", self.validator)
        saver.register("rng", checkpoint.RandomState())
        return saver

    def _open_run(self, out: Path, saver: checkpoint.Checkpointer) -> None:
        """Resume (every registered part restored and checked), or clear the folder on --overwrite; then every rank
        waits until the folder is ready before anyone writes."""
        if self.cfg.resume:
            saver.load()
        elif self.cfg.overwrite and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            rundir.clear(out)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        out.mkdir(parents=True, exist_ok=True)  # every rank: on separate nodes each may be the first here
        if self.rank == 0:
            if self.cfg.resume:
                truncate_log(out / LOG_FILE, self.progress.step)
            else:
                self.cfg.save(out / "config.json")

    def _log(self, out: Path) -> RunLog:
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        peak = matmul_peak(self.device, dtype) if self.rank == 0 else 0.0
        return RunLog(out, self.rank, self.cfg.log_every, self.cfg.max_steps, self.progress.step,
                      self.engine.monitor if self.cfg.monitor != "none" else None, self.cfg.trace,
                      self.flops_per_cell, peak)

    def _check_weights(self, step: int) -> None:
        """Finite losses can still leave non-finite weights (an update that overflows): stop before they are saved."""
        bad = [n for n, p in self.objective.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteLoss(f"weights became non-finite at step {step} ({bad[0]}{' and others' * (len(bad) > 1)});"
                                f" stopping with the last good checkpoint in {Path(self.cfg.out) / 'checkpoints'} "
                                "intact (lower the learning rate)")

    def _validate(self, log: RunLog, step: int, epoch: int, out: Path) -> None:
        scores = self.validator(self.engine)
        if not math.isfinite(scores["val_loss"]):
            raise NonFiniteLoss(f"validation loss is {scores['val_loss']} at step {step}; stopping with the last good "
                                f"checkpoint in {out / 'checkpoints'} intact and no model exported from it (lower the "
                                "learning rate, or check the data)")
        improved = self.validator.improved(scores)
        if improved and self.rank == 0:
            self._export(out / checkpoint.MODEL_FILE)
        if self.rank == 0:
            log.validation(step, epoch, scores, improved)

    def cells_seen(self) -> int:
        """Training cells the optimiser has stepped on, over all ranks (repeats across epochs counted)."""
        return self.progress.step * self.cfg.batch_size * self.cfg.gradient_accumulation * self.world

    def _export(self, path: Path) -> None:
        genes, (start, stop) = self.store.genes, self.store.split("train")
        trained = {"steps": self.progress.step, "epochs": round(self.cells_seen() / (stop - start), 3),
                   "cells_seen": self.cells_seen()}
        classes = self.store.categories[self.cfg.objective.label] if self.cfg.objective.name == "supervised" else None
        checkpoint.export_model(self.objective, self.cfg.to_json(), list(genes.gene_id), path, list(genes.gene_name),
                                trained, None if classes is None else list(classes))

    def _weight_sum(self) -> float:
        return float(next(self.objective.encoder.parameters()).detach().double().abs().sum())


def train(cfg: TrainConfig) -> Path:
    """Check the run folder (before any rank writes or anything heavy starts), then train; the model's path."""
    rundir.check_start(cfg)
    if cfg.resume:  # before DeepSpeed loads anything: another architecture is one line, not a shape error
        rundir.check_config(cfg, rundir.trained_config(Path(cfg.out)), Path(cfg.out))
    return Trainer(cfg).train()
