"""A run folder holds exactly one run: starting refuses a folder that holds one unless the user says --resume
(continue it) or --overwrite (start again); a resume continues only the same experiment on the same data; after a
resume the log holds every step once. Every refusal is one `InputError` naming the folder or field and the fix.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cellssl.loaders import CellStore, InputError

from .config import TrainConfig

# what a run writes into its folder (--overwrite removes these and nothing else)
RUN_FILES = ("config.json", "log.jsonl", "checkpoints", "model.safetensors", "model.pt", "tensorboard", "csv_monitor")
RUN_GLOBS = ("trace-rank*.jsonl", ".model.safetensors.tmp-*")
# what a user may change when continuing a run: how long it goes on, how often it reports, and how batches reach the
# model (the same numbers either way)
RESUMABLE_FIELDS = ("max_steps", "log_every", "val_every", "checkpoint_every", "resume", "overwrite", "trace",
                    "monitor", "input")


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("config.json", "log.jsonl", "checkpoints"))


def check_start(cfg: TrainConfig) -> None:
    """Before any rank writes: the folder is free, or the user said what to do with the run in it."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise InputError("--resume/--overwrite", "both given", "pass --resume to continue the run in "
                         f"{out}, or --overwrite to start it again, not both")
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder", "choose another --out")
    if cfg.resume:
        if not (out / "checkpoints" / "latest").is_file():
            raise InputError(out / "checkpoints", "no checkpoint to resume from",
                             "start the run without --resume (or with --overwrite if the folder holds a failed start)")
    elif holds_run(out) and not cfg.overwrite:
        raise InputError(out, "already holds a run (config.json, log.jsonl or checkpoints/)",
                         "pass --resume to continue it, --overwrite to start it again (its files are deleted), or "
                         "choose another --out")


def clear(out: Path) -> None:
    """--overwrite: remove the previous run's files (only those a run writes; anything else stays)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    for pattern in RUN_GLOBS:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_config(cfg: TrainConfig, saved_json: str, out: Path) -> None:
    """A resume continues the same experiment: the config it was started with, but for RESUMABLE_FIELDS. Checked
    before DeepSpeed loads anything, so another architecture is one line, not a shape error."""
    saved = _flatten(json.loads(saved_json))
    now = _flatten(json.loads(cfg.to_json()))
    for key in sorted(set(saved) | set(now)):
        if key.split(".")[0] in RESUMABLE_FIELDS or key == "data":  # data: compared by fingerprint (check_store)
            continue
        if saved.get(key) != now.get(key):
            raise InputError(f"{out}: {key}", f"the run was started with {saved.get(key)!r}, this resume asks for "
                             f"{now.get(key)!r}", "resume with the run's own settings (only --max-steps and the "
                             "logging and checkpoint cadence may change), or start a new run in another --out")


def check_store(store: CellStore, saved: dict | None, out: Path) -> None:
    """A resume continues on the same data: the checkpoint's store fingerprint is this store's."""
    if saved is None:
        raise InputError(out / "checkpoints", "the checkpoint records no store fingerprint (written by an older "
                         "cellssl)", "start the run again with --overwrite")
    for key in CellStore.FINGERPRINT:
        if saved.get(key) != store.attrs.get(key):
            raise InputError(store.path, f"is not the data this run trained on: {key} was {saved.get(key)!r}, is "
                             f"{store.attrs.get(key)!r}", "resume with the run's own --data, or start a new run in "
                             "another --out")
