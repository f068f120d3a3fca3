"""Gene spaces and the alignment of a source's genes to a target gene list.

A gene space is an ordered list of (Ensembl id, symbol). Sources are aligned to a target space by Ensembl id
when both sides carry ids, else by symbol; target genes the source lacks become zero columns. Depends on
numpy, pandas and pyarrow only; never imports engine or kernels.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ID_COLUMNS = ("gene_id", "gene_ids", "feature_id", "ensembl_id", "ensembl_ids", "gene_ensembl_id")
_NAME_COLUMNS = ("gene_name", "gene_names", "feature_name", "gene_symbol", "gene_symbols", "symbol")
DEFAULT_GENES_RESOURCE = "reference_genes.tsv"


def strip_version(gene_id: str) -> str:
    """ENSG00000141510.17 -> ENSG00000141510: versions differ between annotations of the same gene."""
    return gene_id.split(".", 1)[0] if _ENSEMBL.match(gene_id) else gene_id


def looks_like_ensembl(ids) -> bool:
    ids = list(ids[:1000])
    return bool(ids) and sum(bool(_ENSEMBL.match(str(i))) for i in ids) >= 0.9 * len(ids)


@dataclass(frozen=True)
class GeneSpace:
    """Ordered genes: `gene_id` (Ensembl where known) and `gene_name` (symbol), both arrays of str."""

    gene_id: np.ndarray
    gene_name: np.ndarray

    def __post_init__(self):
        if len(self.gene_id) != len(self.gene_name):
            raise ValueError("gene_id and gene_name differ in length")

    def __len__(self) -> int:
        return len(self.gene_id)

    @classmethod
    def from_lists(cls, gene_id, gene_name=None) -> "GeneSpace":
        ids = np.asarray([str(g) for g in gene_id], dtype=object)
        names = ids if gene_name is None else np.asarray([str(g) for g in gene_name], dtype=object)
        return cls(ids, names)

    @classmethod
    def default(cls) -> "GeneSpace":
        """The paper's reference gene list (19,350 genes), shipped with the package."""
        with resources.files("cellssl.loaders.resources").joinpath(DEFAULT_GENES_RESOURCE).open("r") as fh:
            return cls.from_frame(pd.read_csv(fh, sep="\t", dtype=str), "the packaged default gene list")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, where: str) -> "GeneSpace":
        """Pick the id and symbol columns of a var-like table (its index when it has neither)."""
        id_col = next((c for c in _ID_COLUMNS if c in frame.columns), None)
        name_col = next((c for c in _NAME_COLUMNS if c in frame.columns), None)
        index = frame.index.astype(str)
        ids = frame[id_col].astype(str) if id_col else index
        names = frame[name_col].astype(str) if name_col else index
        if id_col is None and name_col is not None and looks_like_ensembl(index):
            ids = index
        if len(frame) == 0:
            raise InputError(where, "the gene table is empty", "give a table with one row per gene")
        return cls.from_lists(list(ids), list(names))

    @classmethod
    def from_file(cls, path: str | Path) -> "GeneSpace":
        """A TSV/CSV with a header naming gene_id and/or gene_name, or a plain list of one gene per line."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "gene list file not found", "pass an existing file, a store, 'default' or 'keep'")
        first = path.read_text().splitlines()[:1]
        sep = "\t" if first and "\t" in first[0] else ","
        header = first[0].split(sep) if first else []
        if any(h in _ID_COLUMNS + _NAME_COLUMNS for h in header):
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        else:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            frame = pd.DataFrame(index=pd.Index(lines))
        return cls.from_frame(frame, str(path))

    def lookup(self) -> tuple[dict[str, int], dict[str, int]]:
        """(version-stripped Ensembl id → column, upper-case symbol → first column with it), built once."""
        if "_lookup" not in self.__dict__:
            by_id = {strip_version(str(g)): i for i, g in enumerate(self.gene_id)}
            by_name = {str(n).upper(): i for i, n in reversed(list(enumerate(self.gene_name)))}
            object.__setattr__(self, "_lookup", (by_id, by_name))
        return self.__dict__["_lookup"]

    def column(self, key: str) -> int:
        """Column of a gene given by Ensembl id (any version) or symbol (any case); -1 if absent."""
        by_id, by_name = self.lookup()
        return by_id.get(strip_version(str(key)), by_name.get(str(key).upper(), -1))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"gene_id": self.gene_id.astype(str), "gene_name": self.gene_name.astype(str)})

    def checksum(self) -> str:
        """sha256 of the id list: two stores share a gene space exactly when their checksums agree."""
        return hashlib.sha256("\n".join(map(str, self.gene_id)).encode()).hexdigest()


@dataclass(frozen=True)
class GeneAlignment:
    """Where each source column goes in the target space (-1: not in the target, dropped)."""

    source: GeneSpace
    target: GeneSpace
    source_to_target: np.ndarray
    matched_by: str

    @property
    def n_matched(self) -> int:
        return int((self.source_to_target >= 0).sum())

    @property
    def is_identity(self) -> bool:
        return len(self.source) == len(self.target) and bool(
            np.array_equal(self.source_to_target, np.arange(len(self.source)))
        )

    def report(self) -> str:
        n_t, n_s, n_m = len(self.target), len(self.source), self.n_matched
        return (
            f"genes: {n_m:,} of {n_t:,} target genes matched by {self.matched_by} "
            f"({100 * n_m / max(n_t, 1):.1f} %); {n_t - n_m:,} target genes missing (zero columns); "
            f"{n_s - n_m:,} of {n_s:,} source genes not in the target (dropped)"
        )


def _unique_or_raise(keys: np.ndarray, where: str, what: str) -> None:
    values, counts = np.unique(keys, return_counts=True)
    dups = values[counts > 1]
    if len(dups):
        shown = ", ".join(map(str, dups[:5])) + (" …" if len(dups) > 5 else "")
        raise InputError(
            where,
            f"{len(dups)} duplicated {what} ({shown})",
            "make gene identifiers unique (e.g. anndata's var_names_make_unique) or drop the duplicates",
        )


def align_genes(source: GeneSpace, target: GeneSpace, where: str) -> GeneAlignment:
    """Map source columns onto target columns, by Ensembl id when possible, else by symbol."""
    src_ids = np.array([strip_version(g) for g in source.gene_id], dtype=object)
    by_id, by_name = target.lookup()
    id_hits = np.array([by_id.get(g, -1) for g in src_ids], dtype=np.int64)
    name_hits = np.array([by_name.get(str(n).upper(), -1) for n in source.gene_name], dtype=np.int64)
    use_ids = (id_hits >= 0).sum() >= (name_hits >= 0).sum()
    mapping, matched_by = (id_hits, "Ensembl id") if use_ids else (name_hits, "symbol")
    _unique_or_raise(src_ids if use_ids else np.array([n.upper() for n in source.gene_name]), where,
                     "gene ids" if use_ids else "gene symbols")
    if (mapping >= 0).sum() == 0:
        raise InputError(
            where,
            f"none of its {len(source):,} genes (e.g. {', '.join(map(str, source.gene_id[:3]))}) matches the "
            f"{len(target):,}-gene target space by Ensembl id or symbol",
            "check the species and identifier type, or convert with --genes keep to keep the source's own genes",
        )
    _unique_or_raise(mapping[mapping >= 0], where, "genes mapping onto the same target gene")
    return GeneAlignment(source, target, mapping, matched_by)
