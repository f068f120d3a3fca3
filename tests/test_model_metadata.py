"""A model file's metadata is held to what cellssl writes: unknown fields, an objective that does not exist or a huge
value are one line naming the field, before anything is built from it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cellssl.engine.checkpoint import MODEL_FORMAT, MODEL_FORMAT_VERSION, load_model
from cellssl.engine.config import TrainConfig
from cellssl.loaders import InputError


def _model(path, **meta):
    base = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "config": TrainConfig().to_json(),
            "gene_ids": json.dumps(["ENSG1", "ENSG2"])}
    save_file({"w": torch.zeros(2)}, str(path), metadata={**base, **meta})
    return path


def test_model_metadata_is_checked(tmp_path):
    assert load_model(_model(tmp_path / "ok.safetensors"))["gene_ids"] == ["ENSG1", "ENSG2"]
    cases = {"extra": ({"surprise": "1"}, "unknown field"),
             "objective": ({"config": json.dumps({"objective": {"name": "simclr"}})}, "config.objective: 'simclr' is "
                           "not one of"),
             "huge": ({"gene_names": "x" * (17 << 20)}, "gene_names: metadata of"),
             "garbled": ({"config": "{not json"}, "config: not a cellssl run config")}
    for name, (meta, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_model(_model(tmp_path / f"{name}.safetensors", **meta))
