"""Readers of the formats a cell store can be converted from; each yields rows in source order."""
from .base import RowChunk, Source
from .h5ad import AnnDataSource, H5adSource
from .sctab import ScTabSource
from .tenx import TenxSource

__all__ = ["AnnDataSource", "H5adSource", "RowChunk", "ScTabSource", "Source", "TenxSource"]
