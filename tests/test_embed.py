"""Embeddings line up with the user's cells: `cellssl embed` writes them in the order and under the names of the
store's source, and `cellssl.embed` reads an AnnData or .h5ad straight, in its own order."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_anndata

import cellssl
from cellssl.engine.checkpoint import export_model
from cellssl.engine.cli import main
from cellssl.engine.embed import load_encoder
from cellssl.engine.experiments import experiment
from cellssl.engine.setup import build_objective
from cellssl.loaders import CellStore


@pytest.fixture(scope="module")
def converted(tmp_path_factory, counts):
    """An h5ad with named cells, its store (cells shuffled within splits) and an exported model of the store."""
    root = tmp_path_factory.mktemp("embed")
    adata = make_anndata(counts)
    adata.obs_names = [f"cell-{i:03d}-{c}" for i, c in enumerate(adata.obs["cell_type"])]
    adata.write_h5ad(root / "src.h5ad")
    assert main(["convert", "h5ad", str(root / "src.h5ad"), str(root / "s.cellstore"), "--genes", "keep",
                 "--split-by", "split", "--quiet"]) == 0
    store = CellStore(root / "s.cellstore")
    torch.manual_seed(0)
    cfg = experiment("mae_random")
    export_model(build_objective(cfg, store), cfg.to_json(), list(store.genes.gene_id), root / "model.safetensors",
                 list(store.genes.gene_name))
    return root, adata, store


def direct(adata, model) -> np.ndarray:
    """Each cell through the encoder on its own: log1p of its counts per 10,000."""
    encoder, _ = load_encoder(model)
    x = np.asarray(adata.X.todense(), dtype=np.float32)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * np.float32(1e4))
    with torch.no_grad():
        return encoder(torch.from_numpy(x)).numpy()


def test_cellssl_embed_writes_the_source_order_and_names(converted):
    root, adata, store = converted
    assert not np.array_equal(store.obs_codes("original_index"), np.arange(store.n_cells))  # the store shuffled
    model = root / "model.safetensors"
    assert main(["embed", str(model), str(root / "s.cellstore"), str(root / "e.h5ad")]) == 0
    emb = ad.read_h5ad(root / "e.h5ad")
    assert list(emb.obs_names) == list(adata.obs_names)
    adata.obsm["X_cellssl"] = emb.obsm["X_cellssl"]  # what a user does: each cell must get its own row
    np.testing.assert_allclose(adata.obsm["X_cellssl"], direct(adata, model), rtol=1e-4, atol=1e-5)
    assert list(emb.obs["cell_type"]) == list(adata.obs["cell_type"])
    assert main(["embed", str(model), str(root / "s.cellstore"), str(root / "e.parquet")]) == 0
    frame = pd.read_parquet(root / "e.parquet")
    assert list(frame["cell_id"]) == list(adata.obs_names)
    np.testing.assert_allclose(frame[[f"z{j}" for j in range(64)]].to_numpy(), emb.obsm["X_cellssl"], rtol=1e-6)


def test_embed_refuses_to_replace_an_output_unless_told(converted, capsys):
    root, _, _ = converted
    args = ["embed", str(root / "model.safetensors"), str(root / "s.cellstore"), str(root / "twice.parquet")]
    assert main(args) == 0
    before = (root / "twice.parquet").read_bytes()
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (root / "twice.parquet").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_python_embed_reads_anndata_h5ad_and_stores_in_their_own_order(converted):
    root, adata, _ = converted
    model = root / "model.safetensors"
    want = direct(adata, model)
    np.testing.assert_allclose(cellssl.embed(adata, model), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cellssl.embed(str(root / "src.h5ad"), model), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cellssl.embed(root / "s.cellstore", model), want, rtol=1e-4, atol=1e-5)
    shuffled = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # genes in another order too
    shuffled = shuffled[:, np.random.default_rng(1).permutation(shuffled.n_vars)].copy()
    np.testing.assert_allclose(cellssl.embed(shuffled, model), direct(shuffled[:, adata.var_names], model),
                               rtol=1e-4, atol=1e-5)


def test_cellssl_embed_reads_an_h5ad_and_a_10x_folder_and_names_its_model(converted, tmp_path, counts):
    """`cellssl embed RUN cells.h5ad out.h5ad` works like the store form: the source's obs and names, the embedding
    in obsm, and in uns the model that made it (path, checksum, objective, steps, gene space, version)."""
    import hashlib
    import json

    import pyarrow.parquet as pq
    from conftest import write_10x

    root, adata, _ = converted
    model = root / "model.safetensors"
    assert main(["embed", str(model), str(root / "src.h5ad"), str(tmp_path / "h.h5ad")]) == 0
    emb = ad.read_h5ad(tmp_path / "h.h5ad")
    assert list(emb.obs_names) == list(adata.obs_names)
    assert list(emb.obs["cell_type"]) == list(adata.obs["cell_type"])
    np.testing.assert_allclose(emb.obsm["X_cellssl"], direct(adata, model), rtol=1e-4, atol=1e-5)
    made = emb.uns["cellssl"]
    assert made["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert made["objective"] == "mae" and made["cellssl_version"] and len(made["genes_sha256"]) == 64
    folder = write_10x(tmp_path / "tenx", counts, n_antibody=0)
    assert main(["embed", str(model), str(folder), str(tmp_path / "t.parquet")]) == 0
    frame = pd.read_parquet(tmp_path / "t.parquet")
    assert len(frame) == counts.shape[0] and frame["cell_id"].iloc[0] == "bc0-1"
    meta = json.loads(pq.read_schema(tmp_path / "t.parquet").metadata[b"cellssl"])
    assert meta["model_sha256"] == made["model_sha256"]
