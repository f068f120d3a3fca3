"""A realistic synthetic atlas: negative-binomial counts from a latent model with known truth.

Cell types sit in a two-level hierarchy (lineage → type) with strongly imbalanced frequencies; each type's
profile switches on GO gene programmes and marker genes; transcription factors drive planted target
programmes (the truth is recorded); datasets and donors add batch effects and their own library sizes; a
paired protein panel follows linked genes. Cells are generated in independent seeded chunks, so any size
streams in bounded memory and the same seed gives the same atlas. Never imports engine or kernels.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .genes import GeneSpace
from .genesets import index_programmes, read_gmt
from .sources.base import RowChunk, Source
from .store import TARGET_SUM

LINEAGES = ("lymphoid", "myeloid", "epithelial", "endothelial", "stromal", "neural")
TISSUES = {"lymphoid": "blood", "myeloid": "blood", "epithelial": "lung", "endothelial": "lung",
           "stromal": "kidney", "neural": "brain"}
ASSAYS = (("10x 3' v2", 2500.0), ("10x 3' v3", 6000.0), ("10x 5' v1", 4000.0))
CHUNK_CELLS = 2048
NB_THETA = 10.0          # NB dispersion of the biological noise
POISSON_BELOW = 0.3      # mean count under which NB ≈ Poisson (the extra variance mu²/θ is < 3 % of mu)


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    types_per_lineage: tuple[int, ...] = (8, 6, 7, 4, 5, 4)
    n_datasets: int = 12
    donors_per_dataset: int = 4
    n_tfs: int = 60
    targets_per_tf: int = 40
    n_proteins: int = 32
    n_state_programmes: int = 12
    datasets: tuple[int, ...] | None = None   # draw cells from these datasets only (None: all), e.g. a held-out target
    draw: int = 0                              # another draw of cells from the same atlas (same types, genes, batches)


@dataclass
class SyntheticAtlas:
    """The latent model: everything but the per-cell draws."""

    config: SyntheticConfig
    genes: GeneSpace
    type_names: list[str] = field(init=False)
    type_lineage: np.ndarray = field(init=False)

    def __post_init__(self):
        cfg, rng, G = self.config, np.random.default_rng([self.config.seed, 0]), len(self.genes)
        if cfg.datasets is not None and (not cfg.datasets or not all(0 <= d < cfg.n_datasets for d in cfg.datasets)):
            raise ValueError(f"datasets must be a non-empty subset of 0…{cfg.n_datasets - 1}, not {cfg.datasets}")
        programmes = index_programmes(read_gmt(), self.genes, min_genes=15, max_genes=300, where="GO programmes") \
            if len(self.genes) > 1000 else None
        self.type_names, lineage = [], []
        for li, (name, k) in enumerate(zip(LINEAGES, cfg.types_per_lineage)):
            self.type_names += [f"{name} cell {j + 1}" for j in range(k)]
            lineage += [li] * k
        self.type_lineage = np.array(lineage)
        T = len(self.type_names)
        # Heavy-tailed baseline abundance: a few hundred genes carry most of the UMIs, as in 10x data.
        self.base = rng.normal(-11.2, 1.9, G).astype(np.float32)
        pick = (lambda n: [programmes.members[i] for i in rng.choice(len(programmes.members), n, replace=False)]) \
            if programmes else (lambda n: [rng.choice(G, 30, replace=False) for _ in range(n)])
        self.programme_sets = []
        lineage_profile = np.zeros((len(LINEAGES), G), np.float32)
        for li in range(len(LINEAGES)):
            for cols in pick(6):
                lineage_profile[li, cols] += rng.normal(1.2, 0.3)
                self.programme_sets.append((f"lineage:{LINEAGES[li]}", cols))
        self.type_profile = np.zeros((T, G), np.float32)
        for t in range(T):
            prof = lineage_profile[self.type_lineage[t]].copy()
            for cols in pick(3):
                prof[cols] += rng.normal(0.9, 0.3)
                self.programme_sets.append((f"type:{self.type_names[t]}", cols))
            markers = rng.choice(G, 25, replace=False)
            prof[markers] += rng.uniform(1.5, 3.0, 25)
            self.type_profile[t] = prof + rng.normal(0, 0.15, G)
        self.state_loadings = np.zeros((cfg.n_state_programmes, G), np.float32)
        for s, cols in enumerate(pick(cfg.n_state_programmes)):
            self.state_loadings[s, cols] = 1.0
        self._plant_tfs(rng)
        self.type_freq = 1.0 / np.arange(1, T + 1) ** 1.3
        rng.shuffle(self.type_freq)
        self.type_freq /= self.type_freq.sum()
        self.dataset_effect = rng.normal(0, 0.25, (cfg.n_datasets, G)).astype(np.float32)
        self.dataset_assay = rng.integers(0, len(ASSAYS), cfg.n_datasets)
        self.dataset_types = [rng.random(T) < rng.uniform(0.4, 0.9) for _ in range(cfg.n_datasets)]
        self.donor_effect = rng.normal(0, 0.1, (cfg.n_datasets * cfg.donors_per_dataset, G)).astype(np.float32)
        var = self.type_profile.var(axis=0) * (self.base > -11)
        self.protein_genes = np.argsort(var)[::-1][:cfg.n_proteins]
        self.protein_scale = rng.uniform(50, 500, cfg.n_proteins).astype(np.float32)

    def _plant_tfs(self, rng) -> None:
        from importlib import resources

        import pandas as pd

        with resources.files("cellssl.loaders.resources").joinpath("human_tfs.tsv").open() as fh:
            tf_ids = set(pd.read_csv(fh, sep="\t")["gene_id"])
        candidates = np.array([i for i, g in enumerate(self.genes.gene_id) if g in tf_ids])
        if len(candidates) < self.config.n_tfs:
            candidates = np.arange(len(self.genes))
        G, T = len(self.genes), len(self.type_names)
        self.tfs = rng.choice(candidates, self.config.n_tfs, replace=False)
        self.tf_targets = [np.sort(rng.choice(np.setdiff1d(np.arange(G), self.tfs), self.config.targets_per_tf,
                                              replace=False)) for _ in self.tfs]
        self.tf_weights = np.zeros((len(self.tfs), G), np.float32)
        for k, (tf, targets) in enumerate(zip(self.tfs, self.tf_targets)):
            self.tf_weights[k, targets] = rng.uniform(0.5, 1.0, len(targets))
            self.tf_weights[k, tf] = 1.0
        self.tf_type_mean = (rng.random((T, len(self.tfs))) < 0.15) * rng.uniform(0.8, 1.6, (T, len(self.tfs)))
        self.base[self.tfs] = np.maximum(self.base[self.tfs], -10.5)

    # --- per-cell draws --------------------------------------------------------------------------------
    def cells(self, n_cells: int, chunk_cells: int = CHUNK_CELLS) -> Iterator[tuple[np.ndarray, ...]]:
        """(indptr, indices, counts, obs codes, proteins) per chunk; chunk i depends only on (seed, i), so
        chunks are drawn on a few threads (numpy releases the GIL) and still come out the same."""
        starts = list(range(0, n_cells, chunk_cells))
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            pending: deque = deque()
            for i, start in enumerate(starts + [None] * 3):
                if start is not None:
                    key = [self.config.seed, 1, i] + ([self.config.draw] if self.config.draw else [])
                    pending.append(pool.submit(self._chunk, np.random.default_rng(key),
                                               min(chunk_cells, n_cells - start)))
                if len(pending) > 2 or (start is None and pending):
                    yield pending.popleft().result()

    def _chunk(self, rng, n: int):
        cfg = self.config
        dataset = rng.integers(0, cfg.n_datasets, n) if cfg.datasets is None else rng.choice(cfg.datasets, n)
        donor = dataset * cfg.donors_per_dataset + rng.integers(0, cfg.donors_per_dataset, n)
        cell_type = np.empty(n, np.int64)
        for d in np.unique(dataset):
            members = dataset == d
            p = self.type_freq * self.dataset_types[d]
            cell_type[members] = rng.choice(len(p), members.sum(), p=p / p.sum())
        tf_activity = self.tf_type_mean[cell_type] + rng.normal(0, 0.4, (n, len(self.tfs)))
        state = rng.normal(0, 0.35, (n, cfg.n_state_programmes)).astype(np.float32)
        logit = self.base + self.type_profile[cell_type] + self.dataset_effect[dataset] + self.donor_effect[donor]
        logit += state @ self.state_loadings + tf_activity.astype(np.float32) @ self.tf_weights
        logit -= logit.max(axis=1, keepdims=True)
        prob = np.exp(logit, out=logit)
        prob /= prob.sum(axis=1, keepdims=True)
        library = np.array([ASSAYS[a][1] for a in self.dataset_assay[dataset]]) * rng.lognormal(0, 0.45, n)
        mean = prob * library[:, None].astype(np.float32)
        indptr, indices, counts = sample_nb(rng, mean)
        expected = mean[:, self.protein_genes] / library[:, None].astype(np.float32) * TARGET_SUM
        proteins = np.log1p(expected * self.protein_scale * rng.gamma(20, 1 / 20, expected.shape) + rng.gamma(
            2, 5, expected.shape)).astype(np.float32)
        obs = {"cell_type": cell_type, "lineage": self.type_lineage[cell_type], "dataset_id": dataset,
               "donor_id": donor, "assay": self.dataset_assay[dataset]}
        return indptr, indices, counts, obs, proteins

    # --- labels and truth ------------------------------------------------------------------------------
    def categories(self) -> dict[str, list[str]]:
        cfg = self.config
        return {"cell_type": self.type_names, "lineage": list(LINEAGES),
                "dataset_id": [f"dataset_{d:02d}" for d in range(cfg.n_datasets)],
                "donor_id": [f"donor_{d:03d}" for d in range(cfg.n_datasets * cfg.donors_per_dataset)],
                "assay": [a for a, _ in ASSAYS],
                "tissue": sorted(set(TISSUES.values()))}

    def protein_names(self) -> list[str]:
        return [f"protein_{self.genes.gene_name[g]}" for g in self.protein_genes]

    def truth_files(self) -> dict[str, str]:
        """tf_targets.gmt (planted TF → targets), programmes.gmt (what shaped each type), cell_types.tsv, proteins.tsv
        and config.json, as file name → text."""
        ids = self.genes.gene_id
        return {
            "tf_targets.gmt": "".join("\t".join([f"{self.genes.gene_name[tf]}_targets", ids[tf], *ids[targets]]) + "\n"
                                      for tf, targets in zip(self.tfs, self.tf_targets)),
            "programmes.gmt": "".join("\t".join([f"planted_{k}", role, *ids[cols]]) + "\n"
                                      for k, (role, cols) in enumerate(self.programme_sets)),
            "cell_types.tsv": "cell_type\tlineage\tfrequency\n" + "".join(
                f"{t}\t{LINEAGES[li]}\t{f:.6f}\n" for t, li, f in zip(self.type_names, self.type_lineage,
                                                                    self.type_freq)),
            "proteins.tsv": "protein\tgene_id\tgene_name\n" + "".join(
                f"{p}\t{ids[g]}\t{self.genes.gene_name[g]}\n" for p, g in zip(self.protein_names(), self.protein_genes)),
            "config.json": json.dumps(self.config.__dict__, indent=1)}

    def write_truth(self, folder: Path) -> None:
        """The truth files (truth_files) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.truth_files().items():
            (folder / name).write_text(text)


def sample_nb(rng, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR counts ~ NB(mean, θ) per element: Gamma–Poisson where mean ≥ POISSON_BELOW; below, each cell's
    remaining Poisson mass is drawn as one total and thinned into genes through its cumulative sum."""
    n, G = mean.shape
    high = mean >= POISSON_BELOW
    r_hi, c_hi = np.nonzero(high)
    mu = mean[r_hi, c_hi].astype(np.float64)
    k_hi = rng.poisson(mu * rng.standard_gamma(NB_THETA, len(mu)) / NB_THETA)
    cdf = np.cumsum(np.where(high, np.float32(0), mean), axis=1, dtype=np.float32)
    k = rng.poisson(cdf[:, -1].astype(np.float64))
    lo_keys = [r * G + np.minimum(np.searchsorted(cdf[r], rng.random(k[r], np.float32) * cdf[r, -1], side="right"),
                                  G - 1) for r in range(n)]
    keys_lo, k_lo = np.unique(np.concatenate(lo_keys), return_counts=True)
    keys = np.concatenate([r_hi * G + c_hi, keys_lo])
    vals = np.concatenate([k_hi, k_lo])
    keep = vals > 0
    keys, vals = keys[keep], vals[keep]
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(keys // G, minlength=n), out=indptr[1:])
    return indptr, (keys % G).astype(np.int64), vals.astype(np.float32)


class SyntheticSource(Source):
    """The synthetic atlas as a conversion source (counts; categorical labels; protein_* float columns)."""

    def __init__(self, n_cells: int, config: SyntheticConfig = SyntheticConfig(), genes: GeneSpace | None = None):
        self.atlas = SyntheticAtlas(config, genes or GeneSpace.default())
        numeric = {name: np.dtype(np.float32) for name in self.atlas.protein_names()}
        super().__init__(Path(f"synthetic-seed{config.seed}"), self.atlas.genes, n_cells, "counts",
                         self.atlas.categories(), numeric)

    def describe(self) -> str:
        return f"synthetic:seed={self.atlas.config.seed}"

    def chunks(self, scratch: Path) -> Iterator[RowChunk]:
        start = 0
        tissue_of = {i: self.categories["tissue"].index(TISSUES[li]) for i, li in enumerate(LINEAGES)}
        for indptr, indices, counts, obs, proteins in self.atlas.cells(self.n_cells):
            codes = {k: v.astype(np.int32) for k, v in obs.items()}
            codes["tissue"] = np.vectorize(tissue_of.get, otypes=[np.int32])(obs["lineage"])
            codes.update({name: proteins[:, j] for j, name in enumerate(self.atlas.protein_names())})
            yield RowChunk(start, indptr, indices, counts, codes)
            start += len(indptr) - 1


def cache_dir() -> Path:
    root = os.environ.get("CELLSSL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cellssl")
    return Path(root)


DEFAULT_CELLS = 100_000  # 80,000 train cells: two ranks of 8,192 and a StepLR that decays every 18 steps
DEFAULT_NAME = f"default-synthetic-v2-{DEFAULT_CELLS}.cellstore"  # v2: store format 2


def default_store(progress: bool = True) -> Path:
    """The embedded default dataset: a deterministic synthetic store made once in the user cache.

    A file lock makes concurrent first uses (several ranks) build it once."""
    from .convert import convert

    path = cache_dir() / DEFAULT_NAME
    if (path / "zarr.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{DEFAULT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "zarr.json").is_file():
            source = SyntheticSource(DEFAULT_CELLS)
            convert(source, path, progress=progress)
            source.atlas.write_truth(path / "synthetic_truth")
    return path
