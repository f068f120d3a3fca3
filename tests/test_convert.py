"""Round trips: every value and label read back from the store equals the source (after gene alignment)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import gene_table, make_anndata, write_10x

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.convert import convert, open_source


def store_dense(store: CellStore) -> np.ndarray:
    """Store rows put back in source order."""
    x = store.to_scipy().toarray()
    out = np.zeros_like(x)
    out[store.obs_codes("original_index")] = x
    return out


def check_labels(store: CellStore, adata) -> None:
    obs = store.obs().set_index("original_index").sort_index()
    assert list(obs["cell_type"]) == list(adata.obs["cell_type"])
    assert list(obs["donor"]) == list(adata.obs["donor"])
    assert list(obs["cell_id"]) == list(adata.obs_names)
    np.testing.assert_array_equal(obs["n_counts"].to_numpy(), adata.obs["n_counts"].to_numpy())


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_h5ad_round_trip(tmp_path, counts, layout):
    x = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray()}[layout]
    adata = make_anndata(x)
    adata.write_h5ad(tmp_path / "in.h5ad")
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes="keep", progress=False)
    assert store.value_kind == "counts" and store.n_cells == counts.shape[0]
    assert store.to_scipy().dtype == np.uint16
    np.testing.assert_array_equal(store_dense(store), counts.toarray())
    check_labels(store, adata)


def test_counts_layer_preferred_and_log1p_x_detected(tmp_path, counts):
    lognorm = counts.multiply(1e4 / np.maximum(counts.sum(axis=1), 1)).tocsr()
    lognorm.data = np.log1p(lognorm.data).astype(np.float32)
    adata = make_anndata(lognorm)
    adata.layers["counts"] = counts
    adata.write_h5ad(tmp_path / "in.h5ad")
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "a", genes="keep", progress=False)
    np.testing.assert_array_equal(store_dense(store), counts.toarray())
    store = convert(open_source("h5ad", tmp_path / "in.h5ad", layer="X"), tmp_path / "b", genes="keep",
                    progress=False)
    assert store.value_kind == "log1p_10k" and store.to_scipy().dtype == np.float32
    np.testing.assert_allclose(store_dense(store), lognorm.toarray(), rtol=1e-6)


def test_gene_alignment_to_file_and_store(tmp_path, counts):
    make_anndata(counts).write_h5ad(tmp_path / "in.h5ad")
    genes = gene_table()
    rng = np.random.default_rng(0)
    target = pd.concat([genes.iloc[rng.permutation(len(genes))[:40]],
                        pd.DataFrame({"gene_id": ["ENSG99999999999"], "gene_name": ["NOVEL"]})])
    target.to_csv(tmp_path / "target.tsv", sep="\t", index=False)
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "out", genes=tmp_path / "target.tsv",
                    progress=False)
    assert list(store.var["gene_id"]) == list(target["gene_id"])
    src = counts.toarray()
    cols = [int(g[4:]) - 1 for g in target["gene_id"][:40]]
    expected = np.concatenate([src[:, cols], np.zeros((src.shape[0], 1))], axis=1)
    np.testing.assert_array_equal(store_dense(store), expected)
    # aligning a second dataset to the first store's genes gives the same gene space
    again = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "again", genes=tmp_path / "out",
                    progress=False)
    assert again.attrs["var_checksum"] == store.attrs["var_checksum"]


def test_alignment_by_symbol_with_versioned_ids(tmp_path, counts):
    adata = make_anndata(counts)
    adata.var = pd.DataFrame(index=[f"GENE{i}" for i in range(1, counts.shape[1] + 1)])
    adata.write_h5ad(tmp_path / "sym.h5ad")
    target = gene_table()
    target["gene_id"] = target["gene_id"] + ".7"
    target.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    store = convert(open_source("h5ad", tmp_path / "sym.h5ad"), tmp_path / "o", genes=tmp_path / "t.tsv",
                    progress=False)
    assert "symbol" in store.attrs["gene_alignment"]
    np.testing.assert_array_equal(store_dense(store), counts.toarray())


def test_default_gene_space(tmp_path, counts):
    from cellssl.loaders.genes import GeneSpace

    default = GeneSpace.default()
    adata = make_anndata(counts)
    adata.var = pd.DataFrame({"gene_ids": default.gene_id[100:100 + counts.shape[1]]},
                             index=default.gene_name[100:100 + counts.shape[1]])
    adata.write_h5ad(tmp_path / "in.h5ad")
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "o", genes="default", progress=False)
    assert store.n_genes == 19350
    np.testing.assert_array_equal(store_dense(store)[:, 100:100 + counts.shape[1]], counts.toarray())
    assert store.nnz == counts.nnz


@pytest.mark.parametrize("gz", [True, False])
def test_10x_round_trip(tmp_path, counts, gz):
    folder = write_10x(tmp_path / "tenx", counts, gz=gz)
    store = convert(open_source("10x", folder), tmp_path / "out", genes="keep", progress=False)
    assert store.n_genes == counts.shape[1]  # antibody features dropped
    np.testing.assert_array_equal(store_dense(store), counts.toarray())
    obs = store.obs().set_index("original_index").sort_index()
    assert list(obs["cell_id"]) == [f"bc{i}-1" for i in range(counts.shape[0])]


def test_sctab_round_trip(tmp_path):
    from cellssl.loaders.synth import synth

    src = synth(tmp_path / "merlin_cxg_2023_05_15_sf-log1p", 700, "sctab-parquet", progress=False)
    store = convert(open_source("sctab", src), tmp_path / "out", progress=False)
    assert store.value_kind == "log1p_10k"
    parts = {s: sorted((src / s).glob("*.parquet")) for s in ("train", "val", "test")}
    tables = [pq.read_table(f) for s in ("train", "val", "test") for f in parts[s]]
    dense = np.concatenate([np.stack(t.column("X").to_numpy(zero_copy_only=False)) for t in tables])
    np.testing.assert_array_equal(store_dense(store), dense)
    obs = store.obs().set_index("original_index").sort_index()
    labels = pd.read_parquet(src / "categorical_lookup" / "cell_type.parquet")["label"]
    codes = np.concatenate([t.column("cell_type").to_numpy() for t in tables])
    assert list(obs["cell_type"]) == list(labels[codes])
    np.testing.assert_array_equal(obs["soma_joinid"], np.concatenate([t.column("soma_joinid").to_numpy()
                                                                       for t in tables]))
    n_train = sum(len(pq.read_table(f)) for f in parts["train"])
    assert store.split("train") == (0, n_train)
    # the synthetic types are all leaves: each is only its own "child" (the identity the writer stores)
    assert store.hierarchy("cell_type") == [[i] for i in range(len(labels))]


def test_sctab_cell_type_hierarchy_is_kept_and_checked(tmp_path):
    from cellssl.loaders.synth import synth

    src = synth(tmp_path / "merlin", 300, "sctab-parquet", progress=False)
    matrix_file = src / "cell_type_hierarchy" / "child_matrix.npy"
    n = np.load(matrix_file).shape[0]
    matrix = np.zeros((n, n), np.int8)
    matrix[0, [1, 2]] = 1  # type 0 is the parent of types 1 and 2
    np.save(matrix_file, matrix)
    store = convert(open_source("sctab", src), tmp_path / "out", progress=False)
    assert store.hierarchy("cell_type")[:3] == [[1, 2], [], []] and store.hierarchy("dataset_id") is None
    np.save(matrix_file, np.zeros((n, n + 1)))
    with pytest.raises(InputError, match=r"child_matrix.npy: a \(\d+, \d+\) array.*Fix: use the child matrix"):
        open_source("sctab", src)


def test_splits_and_shuffle(tmp_path, h5ad_csr):
    a = convert(open_source("h5ad", h5ad_csr), tmp_path / "a", genes="keep", split_by="split", progress=False)
    labels = make_anndata_split(h5ad_csr)
    idx = a.obs_codes("original_index")
    for name, (start, stop) in a.splits.items():
        assert set(labels[idx[start:stop]]) == {name}
        assert not np.all(np.diff(idx[start:stop]) > 0)  # shuffled within the split
    b = convert(open_source("h5ad", h5ad_csr), tmp_path / "b", genes="keep", val_frac=0.2, test_frac=0.1,
                seed=3, progress=False)
    assert b.splits == {"train": (0, 210), "val": (210, 270), "test": (270, 300)}
    c = convert(open_source("h5ad", h5ad_csr), tmp_path / "c", genes="keep", val_frac=0.2, test_frac=0.1,
                seed=3, progress=False)
    np.testing.assert_array_equal(b.obs_codes("original_index"), c.obs_codes("original_index"))
    d = convert(open_source("h5ad", h5ad_csr), tmp_path / "d", genes="keep", val_frac=0.2, test_frac=0.1,
                seed=4, progress=False)
    assert not np.array_equal(b.obs_codes("original_index"), d.obs_codes("original_index"))
    assert b.attrs["shuffle_seed"] == 3


def make_anndata_split(path) -> np.ndarray:
    import anndata as ad

    return ad.read_h5ad(path, backed="r").obs["split"].astype(str).to_numpy()


def test_bounded_buckets_still_exact(tmp_path, counts, monkeypatch):
    """Many tiny scratch buckets (as a huge atlas would have) give the same store as one bucket."""
    import cellssl.loaders.passes as conv

    make_anndata(counts).write_h5ad(tmp_path / "in.h5ad")
    one = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "one", genes="keep", progress=False)
    monkeypatch.setattr(conv, "BUCKET_BYTES", 1)
    many = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "many", genes="keep", progress=False)
    np.testing.assert_array_equal(one.to_scipy().toarray(), many.to_scipy().toarray())
    np.testing.assert_array_equal(one.obs_codes("original_index"), many.obs_codes("original_index"))


def test_multi_shard_store_reads_any_range(tmp_path, counts):
    from cellssl.loaders.store import Layout

    make_anndata(counts).write_h5ad(tmp_path / "in.h5ad")
    store = convert(open_source("h5ad", tmp_path / "in.h5ad"), tmp_path / "o", genes="keep", progress=False,
                    layout=Layout(chunk=64, shard=256, indptr_chunk=32))
    assert len(list((tmp_path / "o" / "X" / "data" / "c").iterdir())) > 5
    full = store.to_scipy().toarray()
    for a, b in [(0, 1), (17, 90), (250, 300), (299, 300), (40, 40)]:
        np.testing.assert_array_equal(store.to_scipy(a, b).toarray(), full[a:b])


def test_h5ad_keeps_paired_modalities_from_obsm(tmp_path):
    from cellssl.engine.evaluate.inputs import modality_columns
    from cellssl.loaders.synth import synth

    synth(tmp_path / "a.h5ad", 300, "h5ad", progress=False)
    source = open_source("h5ad", tmp_path / "a.h5ad")
    assert "kept obsm['protein'] (32 columns) as obs columns protein_*" in source.report()
    store = convert(source, tmp_path / "a.cellstore", genes="keep", split_by="split", progress=False)
    columns = modality_columns(store)
    assert len(columns) == 32 and all(c.startswith("protein_") and not c.startswith("protein_protein") for c in columns)
    import anndata as ad

    adata = ad.read_h5ad(tmp_path / "a.h5ad")
    obs = store.obs().sort_values("original_index")
    np.testing.assert_allclose(obs[columns].to_numpy(), adata.obsm["protein"], rtol=1e-6)
    assert "kept obsm['protein']" in store.attrs["kept"]


def test_log1p_per_another_total_is_rescaled_to_10k(tmp_path, counts):
    from conftest import make_anndata

    x = counts.copy().astype(np.float64)
    totals = np.asarray(x.sum(1)).ravel()
    keep = totals > 0
    per_million = x[keep].multiply(1e6 / totals[keep][:, None]).tocsr()
    per_million.data = np.log1p(per_million.data)
    adata = make_anndata(per_million.astype(np.float32))
    adata.write_h5ad(tmp_path / "cpm.h5ad")
    store = convert(open_source("h5ad", tmp_path / "cpm.h5ad"), tmp_path / "out", genes="keep", progress=False)
    assert store.value_kind == "log1p_10k" and store.attrs["source_scale"] == pytest.approx(1e6)
    order = np.argsort(store.obs()["original_index"].to_numpy())
    got = store.to_scipy().toarray()[order]
    expected = x[keep].toarray() / totals[keep][:, None] * 1e4
    np.testing.assert_allclose(got, np.log1p(expected), rtol=1e-5, atol=1e-5)


def same_bytes(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_sctab_conversion_in_parallel_is_byte_identical(tmp_path):
    """Every pass split over worker processes (reading runs of part files; writing and verifying many small shards):
    the store is the same bytes as with one."""
    from cellssl.loaders.store import Layout
    from cellssl.loaders.synth import synth

    src = synth(tmp_path / "merlin", 700, "sctab-parquet", progress=False)
    source = open_source("sctab", src)
    assert len(source.partitions(2)) == 2 and source.partitions(2)[-1][1] == source.n_cells
    small = Layout(chunk=1024, shard=8192, indptr_chunk=128)  # ~170 shards: tasks of several shards each
    one = convert(source, tmp_path / "one.cellstore", progress=False, workers=1, layout=small)
    three = convert(open_source("sctab", src), tmp_path / "three.cellstore", progress=False, workers=3, layout=small)
    assert len(list((one.path / "X" / "data" / "c").iterdir())) > 100
    assert same_bytes(one.path, three.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merlin", "one.cellstore", "three.cellstore"]


def test_h5ad_conversion_in_parallel_is_byte_identical(tmp_path, counts):
    """A CSR h5ad is read in row ranges by several workers; a CSC one is read whole: both as with one worker."""
    from cellssl.loaders.store import Layout

    small = Layout(chunk=64, shard=512, indptr_chunk=32)
    make_anndata(counts).write_h5ad(tmp_path / "csr.h5ad")
    stores = [convert(open_source("h5ad", tmp_path / "csr.h5ad"), tmp_path / f"csr-{w}", genes="keep",
                      progress=False, workers=w, layout=small) for w in (1, 2)]
    assert same_bytes(stores[0].path, stores[1].path)
    assert len(open_source("h5ad", tmp_path / "csr.h5ad").partitions(2)) == 2
    make_anndata(counts.tocsc()).write_h5ad(tmp_path / "csc.h5ad")
    assert len(open_source("h5ad", tmp_path / "csc.h5ad").partitions(2)) == 1
