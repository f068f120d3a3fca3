"""The Trainer: set up once from a run config; `train_step` is the one training step (forward, backward, gradient
clipping, optimiser and schedule, EMA) that training, every benchmark and bench/gpu_check.py run; `train` is the
loop around it, read top to bottom: step → log → validate → checkpoint, then export.

DeepSpeed wraps the objective (`deepspeed.initialize` with the packaged `deepspeed.json`, or `--deepspeed-config`,
batch size, accumulation and optimiser filled in from the run config; ZeRO stage 0: these MLPs are small, and every
rank's copy of weights and optimiser state is whole, so a checkpoint loads on any number of ranks). The loader is a
`BatchStream` whose ranks slice one global order; masks, views and dropout are keyed by the cell; statistics span
the global batch; logged metrics are the global batch's. So a run is the same experiment on 1, 2 or 16 ranks, and
with `--gradient-accumulation N` (N micro-batches an optimiser step) it is one batch N times larger wherever the
loss is a sum over cells (objectives that couple the cells of a batch refuse accumulation). The loader's position
(cells into the epoch: the same on every rank), the step, the best validation score and the checks of config and
store are registered with the checkpointer once and travel in every checkpoint; `--max-steps`, the schedule, the log
and the checkpoints count optimiser steps. On a CPU-only machine DeepSpeed runs with its CPU accelerator and gloo.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from cellssl.loaders import BatchStream, BlockShuffleSampler, InputError

from . import checkpoint, optim, rundir, startup
from .collective import any_rank, mean_over_ranks
from .config import TrainConfig
from .distributed import init_distributed, set_collective_timeout
from .feed import Fed, Feed
from .flops import flops_per_cell, matmul_peak
from .runlog import LOG_FILE, RunLog, truncate_log
from .setup import build_objective
from .validation import Validator, validation_sampler

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
        """Set up on this rank: the process group, the store (the same on every rank), the objective (built from the
        config unless one is given), the loader and validation, and the DeepSpeed engine. Each check that can fail
        runs after the rendezvous, its verdict agreed by every rank."""
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        set_collective_timeout(cfg.collective_timeout)
        import deepspeed  # after init_distributed, which prepares its environment

        self.store, self.fingerprint = startup.open_store(cfg, self.rank)
        torch.manual_seed(cfg.seed)  # the weights; DeepSpeed broadcasts rank 0's anyway
        self.feed = Feed(cfg.input, self.device, self.store, cfg.objective.label, kept=cfg.gradient_accumulation)
        start, stop = self.store.split("train")
        with startup.agreed():
            self.objective = objective if objective is not None else build_objective(cfg, self.store)
            self._check_accumulation()
            if cfg.select == "val_macro_f1" and not hasattr(self.objective, "classifier"):
                raise InputError("--select val_macro_f1", f"{cfg.objective.name} has no classifier, so no macro F1 "
                                 "to select by", "use --select val_loss (or last)")
            sampler = BlockShuffleSampler(start, stop, cfg.batch_size, cfg.seed, self.rank, self.world,
                                          accumulation=cfg.gradient_accumulation)
            val_sampler, self.val_note = validation_sampler(self.store, cfg, self.rank, self.world)
            if val_sampler is None and cfg.select != "last":
                self.val_note = (f"{self.val_note or 'the store has no validation split'}: --select {cfg.select} "
                                 "cannot choose, so the last step's model is exported")
        reserve = self._device_reserve()
        resident, self.residence_reason = ("off", "streaming from disk (--resident off)") if cfg.resident == "off" \
            else startup.decide_residence(cfg.resident, self.store, start, stop,
                                          self._resident_device(cfg.resident), reserve)
        self.stream = self.feed.stream(self.store, "train", sampler, resident, reserve)
        self.flops_per_cell = flops_per_cell(self.objective, self.store.n_genes)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        factor = optim.schedule(cfg, len(self.stream) / cfg.gradient_accumulation)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.objective, model_parameters=params, config=deepspeed_config(cfg, self.world),
            optimizer=build_optimizer(cfg, params, cfg.batch_size * cfg.gradient_accumulation * self.world),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        set_collective_timeout(cfg.collective_timeout)  # the groups DeepSpeed made meanwhile
        self.validator = None if val_sampler is None else Validator(
            self.feed.stream(self.store, "val", val_sampler), self.feed, cfg.val_every, cfg.max_steps, cfg.select)
        self.progress, self.position = Progress(), LoaderPosition(self.stream)

    def _check_accumulation(self) -> None:
        """Accumulated micro-batches equal one larger batch, and validation chunks of another size score the same,
        only where the loss is a sum over cells: an objective whose batch statistics couple its cells would train (or
        validate) another experiment, so it is refused."""
        coupled = getattr(self.objective, "couples_cells", False) or self.cfg.model.norm == "batch"
        what = "--norm batch" if self.cfg.model.norm == "batch" else self.cfg.objective.name
        if self.cfg.gradient_accumulation > 1 and coupled:
            raise InputError("--gradient-accumulation", f"{self.cfg.gradient_accumulation} with {what}: its batch "
                             "statistics (BatchNorm, the cross-correlation) couple the cells of a batch, so "
                             "accumulated micro-batches would not train like one batch of "
                             f"{self.cfg.batch_size * self.cfg.gradient_accumulation * self.world:,} cells",
                             "use more ranks for the same global batch (statistics span all of them), or "
                             "--gradient-accumulation 1")
        if self.cfg.val_batch_size not in (0, self.cfg.batch_size) and coupled:
            raise InputError("--val-batch-size", f"{self.cfg.val_batch_size} with {what}: its batch statistics couple "
                             "the cells of a batch, so validation in chunks other than the training batch would score "
                             "another loss", "leave --val-batch-size at 0 (the training batch)")

    def _resident_device(self, want: str):
        return self.device if self.device.type == "cuda" or want == "device" else None

    def _device_reserve(self) -> int:
        """GPU bytes the step needs beside the data: weights, gradients and AdamW's two moments (4 × 4 bytes a
        parameter) and a few dense batches' worth of activations and gradients."""
        params = sum(p.numel() for p in self.objective.parameters())
        return 16 * params + 6 * 4 * self.cfg.batch_size * self.store.n_genes

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
        """One optimiser step over `batch` (this rank's micro-batches of the global batch): forward and backward
        each, then DeepSpeed averages the gradient over ranks, clips it and steps optimiser and schedule; the
        objective's EMA follows. Every micro-batch draws with the step's key and its cells' rows, as one larger batch
        would. A non-finite loss on any rank stops every rank before the backward. Returns the global batch's loss
        and metrics (averaged over micro-batches and ranks)."""
        if hasattr(self.objective, "normalise_over") and batch[0].labels is not None:
            self.objective.normalise_over([fed.labels for fed in batch])
        totals: dict[str, float] = {}
        for fed in batch:
            with record_function("forward"):
                loss, metrics = self.engine(fed.x, fed.labels, step, fed.source.index)
            value = float(loss.detach())
            if any_rank(not math.isfinite(value), self.device):
                which = f"loss is {value}" if not math.isfinite(value) else "another rank's loss is not finite"
                raise NonFiniteLoss(f"{which} at step {step + 1}; every rank stops with the last good checkpoint in "
                                    f"{Path(self.cfg.out) / 'checkpoints'} intact (lower the learning rate, or check "
                                    "the data)")
            with record_function("backward"):
                self.engine.backward(loss)
            with record_function("optimizer step"):
                self._optimizer_step(step)
            for key, v in {**metrics, "loss": value}.items():
                totals[key] = totals.get(key, 0.0) + float(v)
        with record_function("after step"):
            self.objective.after_step()
        return mean_over_ranks({key: v / len(batch) for key, v in totals.items()}, self.device)

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
        started = time.time()
        lock = startup.prepare_folder(self.cfg, self.rank, self.world)
        try:
            return self._train(out, started)
        finally:
            if lock is not None:
                lock.release()

    def _train(self, out: Path, started: float) -> Path:
        cfg = self.cfg
        if self.rank == 0:
            print(f"cellssl: training data {self.residence_reason}", file=sys.stderr, flush=True)
            if self.val_note:
                print(f"cellssl: {self.val_note}", file=sys.stderr, flush=True)
        saver = self._checkpointer(out)
        self._open_run(out, saver, started)
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
            if not (out / checkpoint.MODEL_FILE).is_file():  # no validation was ever finite: the last step it is
                self._export(out / checkpoint.MODEL_FILE)
        return out / checkpoint.MODEL_FILE

    def _checkpointer(self, out: Path) -> checkpoint.Checkpointer:
        saver = checkpoint.Checkpointer(self.engine, out / "checkpoints", {rundir.RECORD: self.cfg.to_json()})
        saver.register("config", _Check(self.cfg.to_json(), lambda saved: rundir.check_config(self.cfg, saved, out)))
        saver.register("store", _Check(self.fingerprint, lambda saved: rundir.check_store(self.store, saved, out,
                                                                                           self.fingerprint)))
        saver.register("stream", self.position)
        saver.register("progress", self.progress)
        if self.validator is not None:
            saver.register("validation", self.validator)
        saver.register("rng", checkpoint.RandomState())
        return saver

    def _open_run(self, out: Path, saver: checkpoint.Checkpointer, started: float) -> None:
        """Resume (every registered part restored and checked, on any number of ranks), or clear the (shared)
        folder on --overwrite, once; then every rank waits until the folder is ready before anyone writes. A
        resume cuts the log and this rank's trace back to the checkpoint: those steps run again."""
        if self.cfg.resume:
            with startup.agreed():
                saver.load()
        elif self.cfg.overwrite and self.rank == 0:
            rundir.clear(out, started)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.cfg.resume:
            truncate_log(out / f"trace-rank{self.rank}.jsonl", self.progress.step)
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
                      self.flops_per_cell, peak * self.world)  # mfu: per device, every rank's device alike

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
    """Check the run folder where one process can before anything heavy starts, then set up every rank and train;
    the model's path. (Several ranks check it after their rendezvous, all agreeing: startup.prepare_folder.)"""
    if "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1":
        rundir.check_start(cfg)
    return Trainer(cfg).train()
