"""Disk to batches: the cell store, converters, the synthetic atlas and gene spaces.

Never imports engine or kernels.
"""
from .errors import CellStoreError, InputError
from .genes import GeneAlignment, GeneSpace, align_genes
from .store import CellStore, CellStoreWriter, Layout, open_store

__all__ = ["CellStore", "CellStoreError", "CellStoreWriter", "GeneAlignment", "GeneSpace", "InputError", "Layout",
           "align_genes", "open_store"]
