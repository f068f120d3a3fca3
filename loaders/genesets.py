"""Gene programmes: read a GMT file (genes by Ensembl id or symbol) and index it against a gene space.

`ProgrammeIndex` holds, per programme, the gene columns it covers and a packed bitset (one bit per gene, as
the masking kernels read it), plus a report of how many programme genes could be mapped. Never imports
engine or kernels.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError
from .genes import GeneSpace

GO_BP_RESOURCE = "go_bp_programs.gmt.gz"


@dataclass(frozen=True)
class GeneSet:
    name: str
    description: str
    genes: tuple[str, ...]


def read_gmt(path: str | Path | None = None) -> list[GeneSet]:
    """A GMT file (`name <tab> description <tab> gene …`, optionally gzipped); None reads the packaged GO BP set."""
    if path is None:
        raw = resources.files("cellssl.loaders.resources").joinpath(GO_BP_RESOURCE).read_bytes()
        text, where = gzip.decompress(raw).decode(), f"packaged {GO_BP_RESOURCE}"
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "gene-programme file not found", "pass an existing GMT file")
        try:
            text = (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)).read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(path, f"unreadable ({exc})", "pass a plain or gzipped GMT text file") from exc
        where = str(path)
    sets = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3:
            raise InputError(f"{where}:{lineno}", "fewer than 3 tab-separated fields",
                             "GMT lines are: name <tab> description <tab> gene <tab> gene …")
        sets.append(GeneSet(fields[0], fields[1], tuple(g for g in fields[2:] if g)))
    if not sets:
        raise InputError(where, "no gene programmes", "pass a GMT file with at least one line")
    return sets


@dataclass(frozen=True)
class ProgrammeIndex:
    """Programmes mapped onto a gene space: `members[p]` are sorted gene columns, `bits` is [P, ceil(G/32)] int32."""

    names: list[str]
    members: list[np.ndarray]
    n_genes: int
    n_listed: int
    n_mapped: int

    @property
    def bits(self) -> np.ndarray:
        words = np.zeros((len(self.members), -(-self.n_genes // 32)), np.uint32)
        for p, cols in enumerate(self.members):
            np.bitwise_or.at(words[p], cols // 32, (np.uint32(1) << (cols % 32).astype(np.uint32)))
        return words.view(np.int32)

    def dense(self) -> np.ndarray:
        out = np.zeros((len(self.members), self.n_genes), bool)
        for p, cols in enumerate(self.members):
            out[p, cols] = True
        return out

    def report(self) -> str:
        return (f"programmes: {len(self.members):,} kept; {self.n_mapped:,} of {self.n_listed:,} listed programme "
                f"genes found in the {self.n_genes:,}-gene space")


def index_programmes(sets: list[GeneSet], space: GeneSpace, min_genes: int = 1, max_genes: int | None = None,
                     where: str = "gene programmes") -> ProgrammeIndex:
    """Map each set's genes (Ensembl ids or symbols, matched per gene) to columns; keep sets within the size limits."""
    names, members, listed, mapped = [], [], 0, 0
    for s in sets:
        cols = {space.column(g) for g in s.genes}
        cols.discard(-1)
        listed += len(s.genes)
        mapped += len(cols)
        if len(cols) >= min_genes and (max_genes is None or len(cols) <= max_genes):
            names.append(s.name)
            members.append(np.array(sorted(cols), dtype=np.int64))
    if mapped == 0:
        raise InputError(where, f"none of the {listed:,} programme genes matches the {len(space):,}-gene space",
                         "check that the GMT uses Ensembl ids or symbols of the same species")
    return ProgrammeIndex(names, members, len(space), listed, mapped)
