"""Disk to batches: the cell store, converters, the synthetic atlas, gene spaces and the streaming loader.

Never imports engine or kernels.
"""
from .errors import CellStoreError, InputError
from .genes import GeneAlignment, GeneSpace, align_genes
from .store import CellStore, CellStoreWriter, Layout, open_store
from .stream import Batch, BatchStream

__all__ = ["Batch", "BatchStream", "CellStore", "CellStoreError", "CellStoreWriter", "GeneAlignment", "GeneSpace",
           "InputError", "Layout", "align_genes", "open_store"]
