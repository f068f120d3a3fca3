"""Shared fixtures: small hand-made sources in every input format, and a small synthetic store."""
from __future__ import annotations

import gzip
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run on CPU tensors

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

N_CELLS, N_GENES = 300, 60


def gene_table(n=N_GENES) -> pd.DataFrame:
    return pd.DataFrame({"gene_id": [f"ENSG{i:011d}" for i in range(1, n + 1)],
                         "gene_name": [f"GENE{i}" for i in range(1, n + 1)]})


def random_counts(seed=0, n=N_CELLS, g=N_GENES, density=0.2) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n, g, density=density, format="csr", random_state=rng, dtype=np.float32)
    m.data = np.ceil(m.data * 20).astype(np.float32)
    m[5] = 0  # an all-zero cell
    m.eliminate_zeros()
    return m.tocsr()


def make_anndata(x, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "NK cell"], n)),
        "donor": rng.choice(["d1", "d2"], n),
        "n_counts": np.asarray(x.sum(axis=1)).ravel(),
        "split": pd.Categorical(rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])),
    }, index=[f"bc{i}" for i in range(n)])
    var = gene_table(x.shape[1]).set_index("gene_id", drop=False).rename_axis(None)
    return ad.AnnData(X=x, obs=obs, var=var)


@pytest.fixture(scope="session")
def counts():
    return random_counts()


@pytest.fixture(scope="session")
def h5ad_csr(tmp_path_factory, counts):
    path = tmp_path_factory.mktemp("h5ad") / "csr.h5ad"
    make_anndata(counts).write_h5ad(path)
    return path


def write_10x(folder, x: sp.csr_matrix, n_antibody=3, gz=True):
    """A Cell Ranger folder: genes x cells matrix.mtx with `n_antibody` extra Antibody Capture features."""
    folder.mkdir(parents=True, exist_ok=True)
    n, g = x.shape
    genes = gene_table(g)
    feats = pd.DataFrame({0: list(genes.gene_id) + [f"AB{i}" for i in range(n_antibody)],
                          1: list(genes.gene_name) + [f"CD{i}" for i in range(n_antibody)],
                          2: ["Gene Expression"] * g + ["Antibody Capture"] * n_antibody})
    coo = x.tocoo()
    ab = sp.random(n, n_antibody, density=0.5, format="coo", random_state=1)
    rows = np.concatenate([coo.col + 1, ab.col + g + 1])
    cols = np.concatenate([coo.row + 1, ab.row + 1])
    vals = np.concatenate([coo.data, np.ceil(ab.data * 9)]).astype(int)
    order = np.lexsort((rows, cols))
    opener = (lambda p: gzip.open(str(p) + ".gz", "wt")) if gz else (lambda p: open(p, "w"))
    with opener(folder / "matrix.mtx") as fh:
        fh.write("%%MatrixMarket matrix coordinate integer general\n%metadata_json: {}\n")
        fh.write(f"{g + n_antibody} {n} {len(vals)}\n")
        for r, c, v in zip(rows[order], cols[order], vals[order]):
            fh.write(f"{r} {c} {v}\n")
    with opener(folder / "features.tsv") as fh:
        feats.to_csv(fh, sep="\t", header=False, index=False)
    with opener(folder / "barcodes.tsv") as fh:
        fh.write("".join(f"bc{i}-1\n" for i in range(n)))
    return folder


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    from cellssl.loaders.synth import synth

    return synth(tmp_path_factory.mktemp("synth") / "s.cellstore", 1500, progress=False)


@pytest.fixture(params=["torch", "numba", "triton"])
def backend(request, monkeypatch):
    """Run a kernel test with the torch reference, the CPU path (numba) and the Triton kernel (interpreted)."""
    monkeypatch.setenv("CELLSSL_KERNELS", request.param)
    return request.param


def block_programmes(n_genes: int, n_programmes: int, size: int):
    """Disjoint programmes of `size` consecutive genes, as int32 bitsets."""
    import torch

    from cellssl.kernels.masking import pack_bits

    flags = torch.zeros(n_programmes, n_genes, dtype=torch.bool)
    for p in range(n_programmes):
        flags[p, p * size:(p + 1) * size] = True
    return pack_bits(flags)
