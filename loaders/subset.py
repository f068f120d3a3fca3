"""A store made of some of another store's cells, each keeping its split: what a label-share study fine-tunes on
(a share of the train split, the whole validation and test splits). Written through an .h5ad and the converter, so
the subset is a cell store like any other (checked, checksummed, its obs and categories kept). Never imports engine
or kernels.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .store import SPLITS, CellStore


def subset_store(store: CellStore, rows: dict[str, np.ndarray], dst: str | Path, seed: int = 0) -> CellStore:
    """The cells `rows[split]` (positions within each split) of `store`, in a new store at `dst` where each keeps
    its split; a split not named is kept whole."""
    import anndata
    import pandas as pd

    dst = Path(dst)
    taken, names = [], []
    for split in SPLITS:
        if split not in store.splits:
            continue
        start, stop = store.split(split)
        chosen = np.arange(stop - start) if split not in rows else np.asarray(rows[split], np.int64)
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= stop - start):
            raise InputError(f"rows of {split!r}", f"positions outside the split's {stop - start:,} cells",
                             "pass positions within the split")
        taken.append(start + np.sort(chosen))
        names += [split] * len(chosen)
    cells = np.concatenate(taken)
    x = store.to_scipy()[cells]
    obs = store.obs().iloc[cells].reset_index(drop=True)
    obs = obs.drop(columns=[c for c in ("original_index", "cell_id") if c in obs])  # the converter writes its own
    obs.index = pd.Index(store.cell_names()[cells].astype(str))
    obs["split"] = pd.Categorical(names, categories=[s for s in SPLITS if s in names])
    var = pd.DataFrame({"gene_symbols": np.asarray(store.genes.gene_name, dtype=str)},
                       index=np.asarray(store.genes.gene_id, dtype=str))
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        h5ad = Path(tmp) / "subset.h5ad"
        anndata.AnnData(x, obs=obs, var=var).write_h5ad(h5ad)
        from .convert import convert, open_source

        return convert(open_source("h5ad", h5ad), dst, split_by="split", seed=seed, overwrite=True, progress=False,
                       log=lambda message: None)
