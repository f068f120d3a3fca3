"""Embeddings of every cell of a store from a trained model's encoder, written as parquet or as obsm of an h5ad."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loaders import BatchStream, CellStore, InputError

from .checkpoint import encoder_state, load_model
from .config import TrainConfig
from .models import AutoEncoder


def load_encoder(model_path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    saved = load_model(Path(model_path))
    cfg = TrainConfig.from_dict(json.loads(saved["config"]))
    autoencoder = AutoEncoder(len(saved["gene_ids"]), cfg.model)
    autoencoder.encoder.load_state_dict(encoder_state(saved))
    return autoencoder.encoder.eval(), list(saved["gene_ids"])


@torch.no_grad()
def embed(model_path: str | Path, store_path: str | Path, batch_size: int = 8192) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings [n_cells, latent] in store order, obs) for every split of the store."""
    encoder, gene_ids = load_encoder(model_path)
    store = CellStore(store_path)
    if list(store.genes.gene_id) != gene_ids:
        raise InputError(store_path, f"its {store.n_genes:,} genes are not the model's {len(gene_ids):,}",
                         "convert the data with `cellssl convert … --genes PRETRAINING_STORE` first")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    out = None
    for split, (start, stop) in store.splits.items():
        stream = BatchStream(store, split, min(batch_size, stop - start), seed=0, rank=0, world_size=1,
                             drop_last=False, columns=[])
        for batch in stream:
            z = encoder(batch.x.to(device)).float().cpu().numpy()
            out = np.empty((store.n_cells, z.shape[1]), np.float32) if out is None else out
            out[batch.index.numpy()] = z
    return out, store.obs()


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
