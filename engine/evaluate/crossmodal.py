"""Cross-modality prediction (RNA → protein, or any paired measurement stored as numeric obs columns): an MLP
head on the frozen embeddings, or encoder + head trained together (fine-tuned from a pretrained encoder, or from
random weights: the no-pretraining baseline). Trained on the train split, scored on the test split by Pearson
correlation per cell and per feature, in the measurements' own units."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cellssl.loaders import BatchStream, CellStore

from ..embed import device, map_split
from ..models import MLP
from .inputs import modality
from .metrics import pearson
from .threads import one_thread


class _Standardise:
    def __init__(self, y: np.ndarray):
        self.mean, self.std = y.mean(0), y.std(0) + 1e-6

    def __call__(self, y):
        return (y - self.mean) / self.std

    def invert(self, y):
        return y * self.std + self.mean


def head_for(latent: int, n_out: int) -> torch.nn.Module:
    return MLP([latent, 256, n_out], dropout=0.1)


def frozen(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, names: list[str],
           epochs: int = 100, batch_size: int = 512, lr: float = 1e-3, seed: int = 0) -> dict:
    """Fit a head on fixed embeddings (standardised inputs and targets)."""
    if len(z_train) != len(y_train) or len(z_test) != len(y_test):
        raise ValueError(f"cross-modality: {len(z_train):,}/{len(z_test):,} embeddings but "
                         f"{len(y_train):,}/{len(y_test):,} paired measurements (train/test)")
    torch.manual_seed(seed)
    with one_thread():
        return _fit_head(z_train, y_train, z_test, y_test, names, epochs, batch_size, lr, seed)


def _fit_head(z_train, y_train, z_test, y_test, names, epochs, batch_size, lr, seed) -> dict:
    zs, ys = _Standardise(z_train), _Standardise(y_train)
    x, y = torch.from_numpy(zs(z_train)).float(), torch.from_numpy(ys(y_train)).float()
    head = head_for(x.shape[1], y.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.mse_loss(head(x[rows]), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    head.eval()
    with torch.no_grad():
        predicted = ys.invert(head(torch.from_numpy(zs(z_test)).float()).numpy())
    return pearson(y_test, predicted, names)


def end_to_end(encoder: torch.nn.Module, latent: int, store: CellStore, columns: list[str], steps: int,
               batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, split: str = "test") -> dict:
    """Train `encoder` (a copy: the caller's stays as it was) and a head on the train split's cells."""
    import copy

    torch.manual_seed(seed)
    encoder = copy.deepcopy(encoder).to(device()).train()
    start = store.split("train")[0]
    y_train = modality(store, columns, "train")
    ys = _Standardise(y_train)
    targets = torch.from_numpy(ys(y_train)).float()
    model = torch.nn.Sequential(encoder, head_for(latent, len(columns))).to(device())
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = BatchStream(store, "train", min(batch_size, len(y_train)), seed=seed, rank=0, world_size=1, columns=[])
    for step, batch in enumerate(tqdm(stream.endless(), total=steps, desc="encoder + head", unit="step")):
        if step == steps:
            break
        loss = F.mse_loss(model(batch.x.to(device())), targets[batch.index - start].to(device()))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    predicted = ys.invert(map_split(store, split, lambda x, _: model(x)))
    return pearson(modality(store, columns, split), predicted, columns)
