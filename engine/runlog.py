"""What a run reports while it trains: rank 0's `log.jsonl` (one JSON object a line), its progress bar and
DeepSpeed's monitor (TensorBoard or CSV), and each rank's optional trace; `read_log` and `truncate_log` read and
mend a log after the fact (`cellssl plot`, the transfer study, a resume).

A training record holds step, epoch, loss, lr, cells/s, seconds and the objective's metrics, plus `mfu`: the
dense network's matmul FLOPs per second over the matmul rate measured on this device (nanoGPT's model FLOPs
utilisation; engine/flops.py). The logger decides its own cadence (`due`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

LOG_FILE = "log.jsonl"


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a line cut short by an interruption is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resume's checkpoint): the steps after it are about to be run again."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_log(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def _number(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class RunLog:
    """Rank 0 writes the log, the bar and the monitor; every rank may write its trace. `flops_per_cell` and `peak`
    (FLOP/s) give the `mfu` column."""

    def __init__(self, out: Path | None, rank: int, every: int, max_steps: int, start_step: int, monitor=None,
                 trace: bool = False, flops_per_cell: float = 0.0, peak: float = 0.0):
        self.rank, self.every, self.max_steps, self.monitor = rank, every, max_steps, monitor
        self.flops_per_cell, self.peak = flops_per_cell, peak
        self.file = open(out / LOG_FILE, "a") if out is not None and rank == 0 else None
        self.trace = open(out / f"trace-rank{rank}.jsonl", "a") if out is not None and trace else None
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=rank != 0)
        self.started, self.cells = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def step(self, step: int, epoch: int, cells: int, metrics: dict, lr: float) -> None:
        """After optimiser step `step` (counted from 1), which trained on `cells` cells over all ranks."""
        self.cells += cells
        self.bar.update(1)
        if not self.due(step):
            return
        seconds = time.perf_counter() - self.started
        rate = self.cells / seconds
        values = {k: _number(v) for k, v in metrics.items()}
        record = {"step": step, "epoch": epoch, "loss": values.pop("loss"), "lr": lr, "cells_per_s": rate,
                  "seconds": seconds, **values}
        if self.peak > 0:
            record["mfu"] = rate * self.flops_per_cell / self.peak
        self._write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if self.monitor is not None:
            self.monitor.write_events([(f"Train/{k}", v, step) for k, v in record.items()
                                       if k not in ("step", "epoch", "lr", "seconds")])

    def validation(self, step: int, epoch: int, scores: dict, best: bool) -> None:
        self._write({"step": step, "epoch": epoch, **scores, **({"best": True} if best else {})})
        if self.monitor is not None:
            self.monitor.write_events([(f"Validation/{k}", v, step) for k, v in scores.items()])

    def traced(self, step: int, cells: list[int], weight_sum: float) -> None:
        if self.trace:
            self.trace.write(json.dumps({"step": step, "cells": cells, "weight_sum": weight_sum}) + "\n")

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        for fh in (self.file, self.trace):
            if fh is not None:
                fh.close()
