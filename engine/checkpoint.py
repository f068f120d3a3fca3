"""Checkpoints: DeepSpeed's engine state plus what it does not hold (loader position, step, RNG), and the
plain exported model.

DeepSpeed writes a tag directory and only then updates the `latest` file, so an interrupted save leaves the
previous checkpoint as the one a resume finds. The exported model (`model.pt`) is a plain torch file with the
config and gene ids beside the weights, readable without DeepSpeed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save(engine, folder: Path, step: int, stream_state: dict) -> None:
    client = {"step": step, "stream": stream_state, "torch_rng": torch.get_rng_state()}
    engine.save_checkpoint(str(folder), tag=f"step{step:08d}", client_state=client)


def latest_tag(folder: Path) -> str | None:
    latest = folder / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine, folder: Path) -> dict | None:
    """Restore the engine from the newest complete checkpoint; its client state, or None if there is none."""
    tag = latest_tag(folder)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(str(folder), tag=tag)
    torch.set_rng_state(client["torch_rng"])
    return client


def export_model(objective: torch.nn.Module, config_json: str, gene_ids: list[str], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": config_json, "gene_ids": gene_ids, "state_dict": objective.state_dict()}, tmp)
    os.replace(tmp, path)


def load_model(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def encoder_state(saved: dict) -> dict:
    """The encoder's weights out of an exported model (whatever objective trained it)."""
    prefix = "autoencoder.encoder."
    return {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
