"""`cellssl plot RUN [RUN …]`: training curves of one or more runs, side by side on the same axes, in one PNG —
training loss, validation loss (and macro F1 for classifiers), learning rate and cells/s against the step, read
from each run's log.jsonl. Runs whose losses differ by orders of magnitude (a Barlow Twins loss in the hundreds
beside a masked autoencoder's 0.1) get a row of panels per objective, each with its own scale; series with few
points (validation, short runs) are drawn as points."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cellssl.loaders import InputError

from .runlog import LOG_FILE
from .runlog import read_log as read_records

PANELS = (("loss", "training loss", True), ("val_loss", "validation loss", True), ("lr", "learning rate", True),
          ("cells_per_s", "cells / s", False))
SPARSE = 30  # fewer points than this: draw each one


def read_log(run: Path) -> list[dict]:
    log = Path(run) / LOG_FILE
    if not log.is_file():
        raise InputError(run, f"no {LOG_FILE} in this folder", "pass the folder of a run a recipe wrote")
    return read_records(log)


def objective_of(run: Path) -> str:
    try:
        return json.loads((Path(run) / "config.json").read_text())["objective"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def rows_of(logs: dict[str, list[dict]], objectives: dict[str, str]) -> list[list[str]]:
    """Runs grouped into rows of panels: one row, unless objectives' typical losses differ tenfold or more."""
    typical = {}
    for name, records in logs.items():
        losses = [r["loss"] for r in records if r.get("loss") is not None and r["loss"] > 0]
        if losses:
            typical.setdefault(objectives[name], []).append(float(np.median(losses)))
    scales = [np.median(v) for v in typical.values()]
    if len(scales) < 2 or max(scales) / min(scales) < 10:
        return [list(logs)]
    return [[n for n in logs if objectives[n] == objective] for objective in typical] + \
        ([[n for n in logs if objectives[n] not in typical]] if any(objectives[n] not in typical for n in logs) else [])


def _panel(ax, logs: dict[str, list[dict]], names: list[str], key: str, title: str, log_scale: bool) -> None:
    for name in names:
        points = [(r["step"], r[key]) for r in logs[name] if key in r and r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=name, marker="o" if len(points) < SPARSE else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log_scale and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(out, "plots are written as PNG", "name the output OUT.png")
    logs = {Path(r).name or str(r): read_log(Path(r)) for r in runs}
    if len(logs) < len(runs):
        raise InputError(", ".join(map(str, runs)), "two runs share a folder name", "plot runs with distinct names")
    objectives = {Path(r).name or str(r): objective_of(Path(r)) for r in runs}
    classifier = any("val_macro_f1" in r for records in logs.values() for r in records)
    panels = PANELS + ((("val_macro_f1", "validation macro F1", False),) if classifier else ())
    rows = rows_of(logs, objectives)
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.6 * len(rows)), squeeze=False)
    for row, names in zip(axes, rows):
        for ax, (key, title, log_scale) in zip(row, panels):
            label = f"{title} ({', '.join(sorted({objectives[n] for n in names}))})" if len(rows) > 1 else title
            _panel(ax, logs, names, key, label, log_scale)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
