"""cellssl: self-supervised pretraining on single-cell atlases. This package is the installed `cellssl` itself: its
subpackages are `cellssl.loaders` (stores, conversion, batches), `cellssl.kernels` (the per-element ops) and
`cellssl.engine` (models, objectives, the Trainer, evaluation); `cellssl.train` is the training entry point
(`python -m cellssl.train EXPERIMENT`, `deepspeed --module cellssl.train EXPERIMENT`), `python -m cellssl` the
command line. For notebooks, `cellssl.embed`. Imports nothing heavy until a function is called.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellssl")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"


def embed(data, model, *, batch_size: int = 8192, layer: str = "auto"):
    """The embedding of every cell of `data` by `model`, as a float32 array [cells, latent] in `data`'s own cell
    order: `adata.obsm["X_cellssl"] = cellssl.embed(adata, "runs/mae_random")` lines up cell by cell.

    `data`: an AnnData (in memory), an .h5ad path, or a cell store (its cells come back in the order of the source
    it was converted from). `model`: a model.safetensors or a run folder. Genes are matched to the model's by
    Ensembl id (or by symbol when `data` has no ids); genes the model knows and `data` lacks are zeros, and the match
    is reported. Counts are normalised to log1p per 10,000 as in training; log1p values are used as they are
    (rescaled when they are log1p per another total). `layer` picks the matrix of an AnnData: auto (layers/counts,
    else raw, else X), X, raw or a layer name."""
    from cellssl.engine.embed import embed_cells

    return embed_cells(data, model, batch_size=batch_size, layer=layer)


__all__ = ["__version__", "embed"]
