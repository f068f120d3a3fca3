"""Embeddings of cells by a trained model's encoder, in the order and under the names the cells have in their source:
`cellssl embed MODEL DATA OUT` (DATA a store, whose cells come back in the order of the file it was converted from,
named as there; or an .h5ad or a 10x folder, read straight) and `cellssl.embed(data, model)` (an AnnData too). The
written file says which model made it (`provenance`). `map_split` runs any network over a split's cells in store
order (what the evaluators use).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from cellssl.loaders import BatchStream, CellStore, GeneSpace, InputError, align_genes
from cellssl.loaders.densify import log1p_per_10k, scatter_rows
from cellssl.loaders.rows import SourceRows

from .checkpoint import encoder_state, load_model
from .config import TrainConfig
from .models import AutoEncoder

TRAINED_DECODER = ("mae", "reconstruction")  # objectives whose decoder is trained (and may reconstruct)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_genes(store: CellStore, gene_ids: list[str], model_path: str | Path) -> None:
    if list(store.genes.gene_id) != list(gene_ids):
        raise InputError(store.path, f"its {store.n_genes:,} genes are not the {len(gene_ids):,} of model {model_path}",
                         "convert the data with `cellssl convert … --genes PRETRAINING_STORE` first")


def load_autoencoder(model: str | Path | dict) -> tuple[AutoEncoder, list[str], TrainConfig]:
    """The exported model's autoencoder (`model`: its path, or what load_model read from it); its decoder only where
    the objective trained one (BYOL, Barlow Twins and classifiers have none worth reconstructing with)."""
    saved = model if isinstance(model, dict) else load_model(model)
    try:
        cfg = TrainConfig.from_dict(json.loads(saved["config"]))
        autoencoder = AutoEncoder(len(saved["gene_ids"]), cfg.model)
        autoencoder.encoder.load_state_dict(encoder_state(saved))
        prefix = "autoencoder.decoder."
        decoder = {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}
        if decoder and cfg.objective.name in TRAINED_DECODER:
            autoencoder.decoder.load_state_dict(decoder)
        else:
            autoencoder.decoder = None
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:  # crafted or damaged metadata
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(saved["path"], f"its weights and its config disagree ({first})", "use a model.safetensors "
                         "a cellssl run exported, unmodified") from None
    return autoencoder.eval(), list(saved["gene_ids"]), cfg


def load_encoder(model_path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    autoencoder, gene_ids, _ = load_autoencoder(model_path)
    return autoencoder.encoder, gene_ids


@torch.no_grad()
def map_split(store: CellStore, split: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              batch_size: int = 2048) -> np.ndarray:
    """fn(dense log1p batch on the device, its store rows) for every cell of `split`, stacked in store order. Batches
    of 2,048 by default: the loader's ring holds three dense batches (~160 MB each at 19,350 genes, not ~630)."""
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
    """(embeddings [n_cells, latent], obs) of every cell of the store, both in the order of the store's source and
    obs indexed by the source's cell names."""
    encoder, gene_ids = load_encoder(model_path)
    store = CellStore(store_path)
    check_genes(store, gene_ids, model_path)
    encoder.to(device())
    z = np.concatenate([map_split(store, split, lambda x, _: encoder(x), batch_size)
                        for split, _ in sorted(store.splits.items(), key=lambda kv: kv[1][0])])
    order = store.source_order()
    obs = store.obs().iloc[order].drop(columns=["cell_id"], errors="ignore")
    obs.index = pd.Index(store.cell_names()[order], name="cell_id")
    return z[order], obs


def _is_store(data) -> bool:
    return isinstance(data, CellStore) or (isinstance(data, (str, Path)) and (Path(data) / "zarr.json").is_file())


def _source(data, layer: str):
    from cellssl.loaders.sources import AnnDataSource, H5adSource
    from cellssl.loaders.sources.tenx import TenxSource

    if isinstance(data, (str, Path)) and Path(data).is_dir():
        return TenxSource(data)
    if isinstance(data, (str, Path)):
        return H5adSource(data, layer)
    if hasattr(data, "obs_names") and hasattr(data, "X"):
        return AnnDataSource(data, layer)
    raise InputError(type(data).__name__, "cannot be embedded", "pass an AnnData, an .h5ad path, a 10x folder or a "
                     "cell store")


def source_obs(source) -> pd.DataFrame:
    """A source's cell table as it is there, indexed by its cell names: an h5ad's own obs (read alone, the matrix
    left on disk); else the columns the format has (10x: none) as labels."""
    if Path(source.path).suffix == ".h5ad":
        import anndata as ad

        obs = ad.read_h5ad(source.path, backed="r").obs.copy()
        obs.index.name = "cell_id"
        return obs
    names = source.cell_names if source.cell_names is not None else np.arange(source.n_cells).astype(str)
    return pd.DataFrame({name: source.column(name) for name in source.columns()},
                        index=pd.Index(names, name="cell_id"))


def embed_data(model: str | Path, data: str | Path, batch_size: int = 8192) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings, obs indexed by cell name) of a store, an .h5ad or a 10x folder, in the source's cell order."""
    if _is_store(data):
        return embed(model, data, batch_size)
    source = _source(data, "auto")
    return embed_cells(source, model, batch_size), source_obs(source)


def provenance(model: str | Path) -> dict[str, str]:
    """What made an embedding: the model file and its checksum, the run, its experiment and steps, the checksum of
    its gene space, and this cellssl's version."""
    from importlib.metadata import PackageNotFoundError, version

    saved = load_model(model)
    path = Path(saved["path"]).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cfg = TrainConfig.from_dict(json.loads(saved["config"]))
    try:
        ours = version("cellssl")
    except PackageNotFoundError:  # pragma: no cover - a source tree never installed
        ours = "unknown"
    return {"model": str(path), "model_sha256": digest.hexdigest(), "run": str(path.parent),
            "objective": cfg.objective.name, "mask": str(cfg.objective.mask), "steps": str((saved["trained"] or {})
                                                                                      .get("steps", "unknown")),
            "genes_sha256": hashlib.sha256("\n".join(saved["gene_ids"]).encode()).hexdigest(),
            "cellssl_version": ours}


@torch.no_grad()
def embed_cells(data, model: str | Path, batch_size: int = 8192, layer: str = "auto") -> np.ndarray:
    """cellssl.embed: see its docstring (api/__init__.py). `data` may also be a loaders Source."""
    if _is_store(data):
        return embed(model, data.path if isinstance(data, CellStore) else data, batch_size)[0]
    saved = load_model(model)
    encoder, gene_ids = load_encoder(model)
    encoder.to(device())
    source = data if hasattr(data, "chunks") and hasattr(data, "genes") else _source(data, layer)
    target = GeneSpace.from_lists(gene_ids, saved.get("gene_names"))
    alignment = align_genes(source.genes, target, source.describe())
    print(f"cellssl.embed: {source.describe()}: {alignment.report()}", file=sys.stderr)
    reader = SourceRows(source, alignment)
    out = np.empty((source.n_cells, encoder[-1].out_features), np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        for chunk, (indptr, cols, vals) in reader.chunks(Path(scratch)):
            if reader.kind.kind == "counts":
                vals = log1p_per_10k(indptr, vals)
            for a in range(0, len(chunk), batch_size):
                rows = np.arange(a, min(a + batch_size, len(chunk)))
                x = np.empty((len(rows), len(target)), np.float32)
                scatter_rows(x, rows, indptr, cols, vals)
                out[chunk.start + a:chunk.start + a + len(rows)] = encoder(torch.from_numpy(x).to(device())).cpu()
    return out


EMBEDDING_FORMATS = (".parquet", ".h5ad")


def check_output(path: str | Path, overwrite: bool = False) -> None:
    """Before any work: the output is a format we write, in a folder that exists, and not a file already there
    unless the user said --overwrite."""
    path = Path(path)
    if path.suffix not in EMBEDDING_FORMATS:
        raise InputError(path, f"cannot write embeddings as {path.suffix!r}",
                         "name the output OUT.parquet (obs columns + z0…) or OUT.h5ad (obsm['X_cellssl'])")
    if not path.parent.is_dir():
        raise InputError(path, "its folder does not exist", "create it first")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(path, "already exists", "pass --overwrite to replace it, or choose another name")
    if path.is_dir():
        raise InputError(path, "is a folder", "name a file OUT.parquet or OUT.h5ad")


def write_embeddings(embeddings: np.ndarray, obs: pd.DataFrame, path: str | Path,
                     made_by: dict[str, str] | None = None) -> None:
    """h5ad: obs (indexed by cell name), obsm["X_cellssl"] and uns["cellssl"] (`made_by`: provenance); parquet:
    cell_id, the obs columns, z0… and `made_by` as the file's metadata under b"cellssl"; written under a temporary
    name and renamed, so an interrupted write leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".h5ad":
            import anndata as ad

            ad.AnnData(obs=obs, obsm={"X_cellssl": embeddings},
                       uns={"cellssl": made_by} if made_by else None).write_h5ad(tmp)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            frame = obs.reset_index()
            frame = pd.concat([frame, pd.DataFrame(embeddings, columns=[f"z{j}" for j in range(embeddings.shape[1])])],
                              axis=1)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if made_by:
                table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                       b"cellssl": json.dumps(made_by).encode()})
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
