"""A run folder holds exactly one run: starting refuses a folder that holds one unless the user says --resume
(continue it) or --overwrite (start again); a resume continues only the same experiment on the same data; after a
resume the log holds every step once. Every refusal is one `InputError` naming the folder or field and the fix.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cellssl.loaders import CellStore, InputError

from .checkpoint import latest_tag
from .config import TrainConfig

LOCK_FILE = ".lock"  # held by the run writing the folder (loaders/lock.py)
# what a run writes into its folder (--overwrite removes these and nothing else)
RUN_FILES = ("config.json", "log.jsonl", "checkpoints", "model.safetensors", "model-last.safetensors", "model.pt",
             "tensorboard", "csv_monitor")
RUN_GLOBS = ("trace-rank*.jsonl", ".model.safetensors.tmp-*", ".model-last.safetensors.tmp-*")
# what a user may change when continuing a run: how long it goes on, how often it reports, how batches reach the
# model (the same numbers either way), and how the global batch is cut among ranks and micro-batches (the loader's
# position refuses another global batch, naming it)
RESUMABLE_FIELDS = ("max_steps", "log_every", "val_every", "checkpoint_every", "resume", "overwrite", "trace",
                    "monitor", "input", "resident", "batch_size", "gradient_accumulation", "val_batch_size",
                    "collective_timeout")
RESUMABLE = ("only --max-steps, the logging, validation and checkpoint cadence, --val-batch-size, --input, --resident "
             "and how the global batch is cut (--batch-size × --gradient-accumulation × ranks, the product unchanged) "
             "may change")


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
        if latest_tag(out / "checkpoints") is None:
            raise InputError(out / "checkpoints", "no complete checkpoint to resume from",
                             "start the run without --resume (or with --overwrite if the folder holds a failed start)")
    elif holds_run(out) and not cfg.overwrite:
        raise InputError(out, "already holds a run (config.json, log.jsonl or checkpoints/)",
                         "pass --resume to continue it, --overwrite to start it again (its files are deleted), or "
                         "choose another --out")


def check_no_links(out: Path) -> None:
    """A run writes its own files only: a symbolic link where one of them goes (a log pointing at someone's file, a
    checkpoints folder pointing elsewhere) is refused, not written through."""
    for path in [out / name for name in RUN_FILES] + [p for g in RUN_GLOBS for p in out.glob(g)]:
        if path.is_symlink():
            raise InputError(path, "is a symbolic link: a run writes only its own files, never through a link",
                             "remove the link (or choose another --out)")


MONITOR_DIRS = ("tensorboard", "csv_monitor")  # DeepSpeed opens them before the folder is cleared


def clear(out: Path, started: float = float("inf")) -> None:
    """--overwrite: remove the previous run's files (only those a run writes; anything else stays). The monitor's
    folders keep what this launch (`started`, a time.time()) has already made in them: DeepSpeed set them up."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and name in MONITOR_DIRS:
            for old in [p for p in path.rglob("*") if p.is_file() and p.stat().st_mtime < started]:
                old.unlink(missing_ok=True)
        elif path.is_dir():
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


RECORD = "config.json"  # also written into every checkpoint's folder: the config the run trained with


def _differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ, but for what a resume may change and what is compared otherwise (the data by
    fingerprint; the folder is where the run is, wherever it has been moved)."""
    return [k for k in sorted(set(a) | set(b))
            if k.split(".")[0] not in RESUMABLE_FIELDS and k not in ("data", "out") and a.get(k) != b.get(k)]


def _parsed(path: Path, text: str) -> dict:
    try:
        return _flatten(json.loads(text))
    except (ValueError, AttributeError) as exc:
        raise InputError(path, f"is not a readable run config ({exc})", "restore it from the checkpoint's copy "
                         "(checkpoints/<latest>/config.json), or start a new run in another --out") from None


def trained_config(out: Path) -> str:
    """The config the run in `out` trained with: the latest checkpoint's record of it, which the folder's config.json
    (a copy for people to read) must still match."""
    mine, tag = out / "config.json", latest_tag(out / "checkpoints")
    record = out / "checkpoints" / tag / RECORD if tag else None
    if record is None or not record.is_file():  # a checkpoint of an older cellssl: config.json is all there is
        if not mine.is_file():
            raise InputError(mine, "missing, and the checkpoint records no config", "start the run again with "
                             "--overwrite, or in another --out")
        return mine.read_text()
    if mine.is_file() and (diff := _differences(_parsed(mine, mine.read_text()), _parsed(record, record.read_text()))):
        raise InputError(mine, f"was edited after the run started ({diff[0]} differs from the checkpoint's record "
                         f"{record})", f"restore it (cp {record} {mine}) and resume with the run's own settings: "
                         + RESUMABLE)
    return record.read_text()


def check_config(cfg: TrainConfig, saved_json: str, out: Path) -> None:
    """A resume continues the same experiment: the config it was started with, but for RESUMABLE_FIELDS (and the
    folder, which may have moved). Checked before DeepSpeed loads anything, so another architecture is one line,
    not a shape error."""
    saved, now = _parsed(out / "checkpoints", saved_json), _flatten(json.loads(cfg.to_json()))
    for key in _differences(saved, now)[:1]:
        raise InputError(f"{out}: {key}", f"the run was started with {saved.get(key)!r}, this resume asks for "
                         f"{now.get(key)!r}", f"resume with the run's own settings ({RESUMABLE}), or start a new "
                         "run in another --out")


def check_store(store: CellStore, saved: dict | None, out: Path, now: dict | None = None) -> None:
    """A resume continues on the same data: the checkpoint's store fingerprint (values included) is this store's."""
    if saved is None or "values_checksum" not in saved:
        raise InputError(out / "checkpoints", "the checkpoint records no full store fingerprint (written by an older "
                         "cellssl)", "start the run again with --overwrite")
    now = now or store.fingerprint(values=True)
    for key in now:
        if saved.get(key) != now.get(key):
            raise InputError(store.path, f"is not the data this run trained on: {key} was {saved.get(key)!r}, is "
                             f"{now.get(key)!r}", "resume with the run's own --data, or start a new run in another "
                             "--out")
