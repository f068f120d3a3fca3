"""Embeddings of every cell of a store from a trained model's encoder, written as parquet or as obsm of an h5ad;
`map_split` runs any network over a split's cells in store order (embedding, prediction, reconstruction)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from cellssl.loaders import BatchStream, CellStore, InputError

from .checkpoint import encoder_state, load_model
from .config import TrainConfig
from .models import AutoEncoder


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_genes(store: CellStore, gene_ids: list[str], model_path: str | Path) -> None:
    if list(store.genes.gene_id) != list(gene_ids):
        raise InputError(store.path, f"its {store.n_genes:,} genes are not the {len(gene_ids):,} of model {model_path}",
                         "convert the data with `cellssl convert … --genes PRETRAINING_STORE` first")


def load_autoencoder(model_path: str | Path) -> tuple[AutoEncoder, list[str], TrainConfig]:
    """The exported model's autoencoder (decoder weights only where the objective trained one)."""
    saved = load_model(model_path)
    cfg = TrainConfig.from_dict(json.loads(saved["config"]))
    autoencoder = AutoEncoder(len(saved["gene_ids"]), cfg.model)
    autoencoder.encoder.load_state_dict(encoder_state(saved))
    prefix = "autoencoder.decoder."
    decoder = {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
    if decoder:
        autoencoder.decoder.load_state_dict(decoder)
    else:
        autoencoder.decoder = None
    return autoencoder.eval(), list(saved["gene_ids"]), cfg


def load_encoder(model_path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    autoencoder, gene_ids, _ = load_autoencoder(model_path)
    return autoencoder.encoder, gene_ids


@torch.no_grad()
def map_split(store: CellStore, split: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              batch_size: int = 8192) -> np.ndarray:
    """fn(dense log1p batch on the device, its store rows) for every cell of `split`, stacked in store order."""
    start, stop = store.split(split)
    stream = BatchStream(store, split, min(batch_size, stop - start), seed=0, rank=0, world_size=1,
                         drop_last=False, columns=[])
    out = None
    for batch in stream:
        y = fn(batch.x.to(device()), batch.index).float().cpu().numpy()
        out = np.empty((stop - start, *y.shape[1:]), np.float32) if out is None else out
        out[batch.index.numpy() - start] = y
    return out


def embed(model_path: str | Path, store_path: str | Path, batch_size: int = 8192) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings [n_cells, latent] in store order, obs) for every split of the store."""
    encoder, gene_ids = load_encoder(model_path)
    store = CellStore(store_path)
    check_genes(store, gene_ids, model_path)
    encoder.to(device())
    parts = [map_split(store, split, lambda x, _: encoder(x), batch_size)
             for split, _ in sorted(store.splits.items(), key=lambda kv: kv[1][0])]
    return np.concatenate(parts), store.obs()


EMBEDDING_FORMATS = (".parquet", ".h5ad")


def check_output(path: str | Path) -> None:
    """Before any work: the output is a format we write, in a folder that exists."""
    path = Path(path)
    if path.suffix not in EMBEDDING_FORMATS:
        raise InputError(path, f"cannot write embeddings as {path.suffix!r}",
                         "name the output OUT.parquet (obs columns + z0…) or OUT.h5ad (obsm['X_cellssl'])")
    if not path.parent.is_dir():
        raise InputError(path, "its folder does not exist", "create it first")


def write_embeddings(embeddings: np.ndarray, obs: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    if path.suffix == ".h5ad":
        import anndata as ad

        obs = obs.copy()
        obs.index = obs.index.astype(str)
        ad.AnnData(obs=obs, obsm={"X_cellssl": embeddings}).write_h5ad(path)
    else:
        frame = obs.reset_index(drop=True)
        for j in range(embeddings.shape[1]):
            frame[f"z{j}"] = embeddings[:, j]
        frame.to_parquet(path)
