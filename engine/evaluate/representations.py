"""What gets evaluated: a trained model (`model.safetensors` from any recipe) or the PCA baseline, behind one small
interface: `embed(store, split)` and, where the representation can reconstruct expression, `reconstructor`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cellssl.loaders import CellStore

from ..checkpoint import load_model
from ..embed import check_genes, device, load_autoencoder, map_split
from .pca import StreamedPCA


class ModelRepresentation:
    """The encoder (and decoder, where one was trained) of an exported model."""

    kind = "model"

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.parent.name or self.path.stem
        saved = load_model(self.path)
        self.autoencoder, self.gene_ids, self.config = load_autoencoder(saved)
        self.trained = saved["trained"]  # steps, epochs, cells seen (None: a model of an older cellssl)
        self.autoencoder.to(device())

    def check(self, store: CellStore) -> None:
        check_genes(store, self.gene_ids, self.path)

    def embed(self, store: CellStore, split: str) -> np.ndarray:
        self.check(store)
        return map_split(store, split, lambda x, _: self.autoencoder.encoder(x))

    @property
    def reconstructor(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.autoencoder.decoder is None:
            return None
        return lambda x: self.autoencoder.decoder(self.autoencoder.encoder(x))


class PCARepresentation:
    """PCA (50 components) of log1p expression, fitted on the store's train split: the paper's linear baseline, in
    streamed passes (evaluate/pca.py: memory O(genes × components) however many cells)."""

    kind = "baseline"
    path = None  # fitted here, not read from a file
    config = trained = None

    def __init__(self, store: CellStore, n_components: int = 50, seed: int = 0, fit_split: str = "train"):
        self.name, self.store_path = "PCA", store.path
        self.pca = StreamedPCA(n_components, seed=seed).fit(store, fit_split)

    def embed(self, store: CellStore, split: str) -> np.ndarray:
        return self.pca.transform(store, split)

    @property
    def reconstructor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        components = torch.from_numpy(self.pca.components_.astype(np.float32)).to(device())
        mean = torch.from_numpy(self.pca.mean_.astype(np.float32)).to(device())
        return lambda x: (x - mean) @ components.T @ components + mean
