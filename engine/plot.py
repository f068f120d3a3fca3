"""`cellssl plot RUN [RUN …]`: training curves of one or more runs, side by side on the same axes, in one PNG —
training loss, validation loss (and macro F1 for classifiers), learning rate and cells/s against the step, read
from each run's log.jsonl."""
from __future__ import annotations

from pathlib import Path

from cellssl.loaders import InputError

from .runlog import LOG_FILE
from .runlog import read_log as read_records

PANELS = (("loss", "training loss", True), ("val_loss", "validation loss", True), ("lr", "learning rate", True),
          ("cells_per_s", "cells / s", False))


def read_log(run: Path) -> list[dict]:
    log = Path(run) / LOG_FILE
    if not log.is_file():
        raise InputError(run, f"no {LOG_FILE} in this folder", "pass the folder of a run a recipe wrote")
    return read_records(log)


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
    classifier = any("val_macro_f1" in r for records in logs.values() for r in records)
    panels = PANELS + ((("val_macro_f1", "validation macro F1", False),) if classifier else ())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title, log_scale) in zip(axes[0], panels):
        for name, records in logs.items():
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_scale and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
