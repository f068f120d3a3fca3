"""Checkpoints and exported models, read without ever executing code from a file.

Checkpoints: DeepSpeed's engine state plus the parts registered with the `Checkpointer` (the loader's position,
step and best score, RNG, the store's fingerprint and the run's config). Every rank writes its part of a step folder;
once all have (a barrier), rank 0 marks the folder complete and only then points `latest` at it, through a temporary
file and a rename, so an interrupted save leaves the previous checkpoint as the one a resume finds; a `latest` that is
missing, empty or names an incomplete folder falls back to the newest complete one. With ZeRO stage 0 (the packaged
config) the weights, optimiser and client state are whole in rank 0's file: a checkpoint loads on any number of
ranks, and the client state holds only what is the same on every rank. DeepSpeed unpickles its files with
`weights_only=False`; `SafeCheckpointEngine` replaces that with torch's restricted unpickler (tensors, plain
containers and the few DeepSpeed types its state holds), so a crafted checkpoint is refused, not run.

Exported models (`model.safetensors`): the weights as safetensors, the run config and gene ids as JSON metadata.
safetensors holds tensors and strings only, so a model file from anyone is safe to open. A pickle-based `model.pt`
from cellssl < 0.2 is refused with the command that converts it (`cellssl upgrade-model`, which itself reads it
with the restricted unpickler).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from cellssl.loaders import InputError

MODEL_FILE = "model.safetensors"
LAST_MODEL_FILE = "model-last.safetensors"  # beside a model kept by validation: the last step's
MODEL_FORMAT = "cellssl-model"
MODEL_FORMAT_VERSION = "1"
UNPICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError)


def _safe_globals() -> list:
    """Types DeepSpeed's own checkpoint state holds besides tensors and plain containers."""
    import argparse
    import collections

    found = [argparse.Namespace, collections.OrderedDict]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        found += [ZeroStageEnum, LossScaler]
    except ImportError:  # pragma: no cover - other DeepSpeed layouts: the refusal names what is missing
        pass
    return found


def safe_load(path: str | Path, map_location="cpu"):
    """torch.load with the restricted unpickler: a file that needs anything else is refused, not executed."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except UNPICKLE_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"refusing to load it: it holds objects beyond tensors and plain values ({first[:200]})",
                         "load only checkpoints this cellssl wrote; a file from elsewhere may run code when unpickled")


def safe_checkpoint_engine(engine) -> None:
    """Make DeepSpeed read this engine's checkpoints with `safe_load` instead of its unrestricted torch.load."""
    current = engine.checkpoint_engine

    class SafeCheckpointEngine(type(current)):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    current.__class__ = SafeCheckpointEngine


class Checkpointer:
    """Saves and restores the DeepSpeed engine together with every part registered with it. A part is anything
    with `state_dict()` and `load_state_dict(state)` (the loader's position, the step and best score, the RNG, the
    checks of config and store); its state travels in DeepSpeed's client state under its name, and parts are
    restored in the order they were registered."""

    def __init__(self, engine, folder: Path, records: dict[str, str] | None = None):
        """`records`: text files rank 0 writes into every checkpoint's folder beside DeepSpeed's (file name → text),
        for readers that must not unpickle the checkpoint to learn what it holds."""
        self.engine, self.folder, self.parts, self.records = engine, Path(folder), {}, records or {}

    def register(self, name: str, part) -> None:
        if name in self.parts:
            raise ValueError(f"a checkpoint part named {name!r} is already registered")
        self.parts[name] = part

    def save(self, step: int) -> None:
        client = {name: part.state_dict() for name, part in self.parts.items()}
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(self.folder), tag=tag, client_state=client, save_latest=False)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are written
        if self.engine.global_rank == 0:
            for name, text in self.records.items():
                (self.folder / tag / name).write_text(text)
            (self.folder / tag / COMPLETE).write_text(f"{step}\n")
            latest = self.folder / "latest"
            tmp = latest.with_name(f".latest.tmp-{os.getpid()}")
            tmp.write_text(tag)
            os.replace(tmp, latest)

    def load(self) -> None:
        """Restore the engine and every part from the newest complete checkpoint."""
        tag = latest_tag(self.folder)
        if tag is None:
            raise InputError(self.folder, "no complete checkpoint to resume from", "start the run without --resume "
                             "(or with --overwrite)")
        safe_checkpoint_engine(self.engine)
        path, client = self.engine.load_checkpoint(str(self.folder), tag=tag)
        if path is None or client is None:
            raise InputError(self.folder / tag, "DeepSpeed could not read this checkpoint",
                             "restore it from a copy, or start the run again with --overwrite")
        missing = [name for name in self.parts if name not in client]
        if missing:
            raise InputError(self.folder / tag, f"the checkpoint lacks {missing} (written by an older cellssl)",
                             "start the run again with --overwrite")
        for name, part in self.parts.items():
            part.load_state_dict(client[name])


class RandomState:
    """torch's CPU generator, and the CUDA one where there is one (dropout draws from it on a GPU)."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


COMPLETE = ".complete"  # written into a step folder once every rank's files are in it


def _complete(folder: Path) -> bool:
    """A step folder a resume may load: marked complete, or (cellssl before the mark) holding the config record."""
    return (folder / COMPLETE).is_file() or (folder / "config.json").is_file()


def latest_tag(folder: Path) -> str | None:
    """The checkpoint a resume loads: the one `latest` names, if it is complete; else the newest complete step
    folder (a `latest` left empty or stale by a crash); None when there is none."""
    latest = folder / "latest"
    try:
        named = latest.read_text().strip() if latest.is_file() else ""
    except OSError:
        named = ""
    if named and "/" not in named and not named.startswith(".") and _complete(folder / named):
        return named
    steps = sorted(p.name for p in folder.glob("step*") if p.is_dir() and _complete(p)) if folder.is_dir() else []
    return steps[-1] if steps else None


# --- exported models ---------------------------------------------------------------------------------------------
def export_model(objective: torch.nn.Module, config_json: str, gene_ids: list[str], path: Path,
                 gene_names: list[str] | None = None, trained: dict | None = None,
                 classes: list[str] | None = None) -> None:
    """The weights as safetensors, the config, the genes (ids, and symbols: data without ids is matched by them),
    the training budget behind the weights (`trained`: steps, epochs, cells seen) and a classifier's class names
    (its outputs in order: another store codes its labels otherwise) as metadata; written under a temporary name and
    renamed."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}
    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "config": config_json,
            "gene_ids": json.dumps(list(gene_ids))}
    if gene_names is not None:
        meta["gene_names"] = json.dumps([str(n) for n in gene_names])
    if trained is not None:
        meta["trained"] = json.dumps(trained)
    if classes is not None:
        meta["classes"] = json.dumps([str(c) for c in classes])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def model_path(path: str | Path) -> Path:
    """A model file, or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        raise InputError(path, f"no {MODEL_FILE} in this folder",
                         "pass a finished run's folder or its model file (a run exports it at its end)")
    if not path.is_file():
        raise InputError(path, "no such model file", f"pass a {MODEL_FILE} written by a recipe, or its run folder")
    return path


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"  # torch's zip format, or a bare pickle


METADATA_KEYS = {"format", "format_version", "config", "gene_ids", "gene_names", "trained", "classes"}
METADATA_BYTES = 16 << 20  # per value: gene lists of ~60,000 ids are ~1.5 MB


def check_metadata(path: Path, meta: dict) -> None:
    """A model's metadata against what cellssl writes: known keys, sizes in reason, a config whose objective
    exists. A file that fails is one line naming the field, never a crash later."""
    from .config import ObjectiveConfig
    from .fields import check_values

    unknown = sorted(set(meta) - METADATA_KEYS)
    if unknown:
        raise InputError(path, f"model metadata has unknown field(s) {unknown[:5]}", "pass a model written by cellssl")
    for key, value in meta.items():
        if len(value) > METADATA_BYTES:
            raise InputError(f"{path}: {key}", f"metadata of {len(value):,} bytes (at most {METADATA_BYTES:,})",
                             "pass a model written by cellssl")
    try:
        config = json.loads(meta.get("config", ""))
        objective = ObjectiveConfig(**config.get("objective", {}))
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: config", f"not a cellssl run config ({str(exc)[:200]})",
                         "pass a model written by cellssl") from None
    try:
        check_values(objective)
    except InputError as exc:
        raise InputError(f"{path}: config.objective", exc.problem, "pass a model written by cellssl") from None


def load_model(path: str | Path) -> dict:
    """{"config": JSON text, "gene_ids": [...], "gene_names": [...], "trained": {steps, epochs, cells_seen}, "classes":
    [...] (classifiers; both None for models of older cellssl), "state_dict": {name: tensor}} of an exported model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = model_path(path)
    unreadable = f"pass a {MODEL_FILE} written by a recipe; re-copy it if it is truncated"
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        if _is_pickle(path):  # asked only once it is not safetensors: a safetensors header may begin so too
            raise InputError(path, "a pickle-based model file (cellssl < 0.2): loading pickles can run code",
                             f"if you trust its origin, convert it once: cellssl upgrade-model {path}") from None
        raise InputError(path, f"not a readable model file ({str(exc)[:200]})", unreadable) from None
    if meta.get("format") != MODEL_FORMAT:
        raise InputError(path, f"a safetensors file, but not a cellssl model (format {meta.get('format')!r})",
                         "pass a model written by a cellssl recipe")
    if meta.get("format_version") != MODEL_FORMAT_VERSION:
        raise InputError(path, f"model format_version {meta.get('format_version')!r}; this cellssl reads "
                         f"{MODEL_FORMAT_VERSION}", "use the cellssl version that wrote it")
    check_metadata(path, meta)
    try:
        names = json.loads(meta["gene_names"]) if "gene_names" in meta else None
        trained = json.loads(meta["trained"]) if "trained" in meta else None
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        return {"path": path, "config": meta["config"], "gene_ids": json.loads(meta["gene_ids"]), "gene_names": names,
                "trained": trained, "classes": classes, "state_dict": load_file(str(path))}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"not a readable model file ({str(exc)[:200]})", unreadable) from None


def architecture(model_config: dict) -> str:
    """A model config's widths, as a person reads them: 512-512-256-256 → 64."""
    hidden = model_config.get("hidden", ())
    return f"{'-'.join(map(str, hidden))} → {model_config.get('latent')}"


def upgrade_model(old: str | Path, new: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert a cellssl < 0.2 `model.pt` (config, gene ids and weights pickled by torch) to model.safetensors;
    it is read with the restricted unpickler, so even this step runs no code from the file."""
    old = Path(old)
    if not old.is_file():
        raise InputError(old, "no such model file", "pass the model.pt to convert")
    saved = safe_load(old)
    if not isinstance(saved, dict) or not {"config", "gene_ids", "state_dict"} <= set(saved):
        raise InputError(old, "not a cellssl model (it lacks config, gene_ids or state_dict)",
                         "pass a model.pt written by cellssl < 0.2")
    new = Path(new) if new else old.with_name(MODEL_FILE)
    if (new.exists() or new.is_symlink()) and not overwrite:
        raise InputError(new, "already exists", "pass --overwrite to replace it, or name another output")
    from safetensors.torch import save_file

    meta = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "config": saved["config"],
            "gene_ids": json.dumps([str(g) for g in saved["gene_ids"]])}
    tmp = new.with_name(f".{new.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in saved["state_dict"].items()}, str(tmp), metadata=meta)
        os.replace(tmp, new)
    finally:
        tmp.unlink(missing_ok=True)
    return new


def encoder_state(saved: dict) -> dict:
    """The encoder's weights out of an exported model (whatever objective trained it)."""
    prefix = "autoencoder.encoder."
    return {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
