"""Writers of the synthetic atlas in peer formats: AnnData .h5ad (CSR counts, streamed) and the published
scTab merlin-parquet layout (dense log1p-per-10k rows). They exist so that converters, tests and benchmarks
meet the formats users bring. Never imports engine or kernels.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from tqdm import tqdm

from .store import SPLITS, TARGET_SUM
from .synthetic import CHUNK_CELLS, LINEAGES, TISSUES, SyntheticAtlas

SCTAB_ROWS_PER_PART = 65536
SCTAB_ROW_GROUP = 4096


def _split_of(rng_seed: int, n: int, val_frac: float, test_frac: float) -> np.ndarray:
    u = np.random.default_rng([rng_seed, 3]).random(n)
    return np.where(u < test_frac, 2, np.where(u < test_frac + val_frac, 1, 0))


def write_h5ad(atlas: SyntheticAtlas, n_cells: int, path: Path, val_frac=0.1, test_frac=0.1, progress=True) -> None:
    """Counts in a CSR X appended chunk by chunk; obs categoricals (with a `split` column); proteins in obsm; the
    planted truth in uns["synthetic_truth"] (file name → text, as the other forms write it beside the data)."""
    cats = atlas.categories()
    codes = {k: [] for k in ("cell_type", "lineage", "dataset_id", "donor_id", "assay")}
    proteins = []
    with h5py.File(path, "w") as f:
        first = True
        for indptr, indices, counts, obs, prot in tqdm(atlas.cells(n_cells), desc="h5ad", unit="chunk",
                                                         total=-(-n_cells // CHUNK_CELLS),
                                                         disable=not progress):
            block = sp.csr_matrix((counts, indices, indptr), shape=(len(indptr) - 1, len(atlas.genes)))
            if first:
                write_elem(f, "X", block, dataset_kwargs={"chunks": (1 << 16,)})
                first = False
            else:
                sparse_dataset(f["X"]).append(block)
            for k in codes:
                codes[k].append(obs[k])
            proteins.append(prot)
        frame = pd.DataFrame({k: pd.Categorical.from_codes(np.concatenate(v), cats[k]) for k, v in codes.items()},
                             index=[f"cell_{i}" for i in range(n_cells)])
        frame["tissue"] = pd.Categorical([TISSUES[LINEAGES[li]] for li in np.concatenate(codes["lineage"])])
        frame["split"] = pd.Categorical.from_codes(_split_of(atlas.config.seed, n_cells, val_frac, test_frac),
                                                   list(SPLITS))
        write_elem(f, "obs", frame)
        write_elem(f, "var", atlas.genes.to_frame().set_index("gene_id", drop=False).rename_axis(None))
        write_elem(f, "obsm", {"protein": np.concatenate(proteins)})
        write_elem(f, "uns", {"protein_names": np.array(atlas.protein_names(), dtype=object),
                              "synthetic_truth": atlas.truth_files()})  # what the store form keeps in synthetic_truth/
        for key in ("layers", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"


def write_sctab(atlas: SyntheticAtlas, n_cells: int, folder: Path, val_frac=0.1, test_frac=0.1,
                progress=True) -> None:
    """The merlin layout of scTab: {train,val,test}/part.N.parquet with dense log1p(counts per 10k) rows."""
    G = len(atlas.genes)
    cats = atlas.categories()
    lookups = {**{k: cats[k] for k in ("cell_type", "dataset_id", "donor_id", "assay", "tissue")},
               "tissue_general": cats["tissue"], "development_stage": ["adult stage"], "disease": ["normal"],
               "tech_sample": cats["donor_id"]}
    folder.mkdir(parents=True)
    (folder / "categorical_lookup").mkdir()
    for name, labels in lookups.items():
        pd.DataFrame({"label": labels}).to_parquet(folder / "categorical_lookup" / f"{name}.parquet")
    pd.DataFrame({"feature_id": atlas.genes.gene_id.astype(str), "feature_name": atlas.genes.gene_name.astype(str)}
                 ).to_parquet(folder / "var.parquet")
    schema = pa.schema([("X", pa.list_(pa.float32(), G))] + [(c, pa.int64()) for c in
                       ("cell_type", "dataset_id", "donor_id", "assay", "development_stage", "disease", "tissue",
                        "tissue_general", "tech_sample", "soma_joinid", "idx")])
    writers = {s: None for s in SPLITS}
    rows_in_part = {s: 0 for s in SPLITS}
    parts = {s: 0 for s in SPLITS}
    split = _split_of(atlas.config.seed, n_cells, val_frac, test_frac)
    tissue_code = np.array([cats["tissue"].index(TISSUES[li]) for li in LINEAGES])
    type_counts = np.zeros(len(cats["cell_type"]))
    start = 0
    for indptr, indices, counts, obs, _ in tqdm(atlas.cells(n_cells), desc="sctab", unit="chunk",
                                                  total=-(-n_cells // CHUNK_CELLS),
                                                  disable=not progress):
        n = len(indptr) - 1
        dense = sp.csr_matrix((counts, indices, indptr), shape=(n, G)).toarray()
        dense = np.log1p(dense / dense.sum(axis=1, keepdims=True).clip(1) * TARGET_SUM, dtype=np.float32)
        columns = {"cell_type": obs["cell_type"], "dataset_id": obs["dataset_id"], "donor_id": obs["donor_id"],
                   "assay": obs["assay"], "development_stage": np.zeros(n, int), "disease": np.zeros(n, int),
                   "tissue": tissue_code[obs["lineage"]], "tissue_general": tissue_code[obs["lineage"]],
                   "tech_sample": obs["donor_id"], "soma_joinid": np.arange(start, start + n),
                   "idx": np.arange(start, start + n)}
        type_counts += np.bincount(obs["cell_type"], minlength=len(type_counts))
        for code, name in enumerate(SPLITS):
            rows = np.flatnonzero(split[start:start + n] == code)
            if not len(rows):
                continue
            if writers[name] is None or rows_in_part[name] >= SCTAB_ROWS_PER_PART:
                if writers[name] is not None:
                    writers[name].close()
                (folder / name).mkdir(exist_ok=True)
                writers[name] = pq.ParquetWriter(folder / name / f"part.{parts[name]}.parquet", schema)
                parts[name] += 1
                rows_in_part[name] = 0
            x = pa.FixedSizeListArray.from_arrays(pa.array(dense[rows].ravel()), G)
            table = pa.table([x] + [pa.array(np.asarray(columns[c][rows], np.int64)) for c in schema.names[1:]],
                             schema=schema)
            writers[name].write_table(table, row_group_size=SCTAB_ROW_GROUP)
            rows_in_part[name] += len(rows)
        start += n
    for w in writers.values():
        if w is not None:
            w.close()
    weights = type_counts.sum() / np.maximum(type_counts, 1) / len(type_counts)
    np.save(folder / "class_weights.npy", weights.astype(np.float32))
    (folder / "cell_type_hierarchy").mkdir()
    np.save(folder / "cell_type_hierarchy" / "child_matrix.npy", np.eye(len(type_counts), dtype=bool))
