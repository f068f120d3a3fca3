"""Disk to batches: the cell store, converters, the synthetic atlas, gene spaces and the streaming loader.

Never imports engine or kernels.
"""
from .errors import CellStoreError, InputError
from .genes import GeneAlignment, GeneSpace, align_genes
from .sampler import BlockShuffleSampler
from .store import TARGET_SUM, CellStore, CellStoreWriter, Layout, open_store
from .stream import Batch, BatchStream

__all__ = ["TARGET_SUM", "Batch", "BatchStream", "BlockShuffleSampler", "CellStore", "CellStoreError",
           "CellStoreWriter", "GeneAlignment", "GeneSpace", "InputError", "Layout", "align_genes", "open_store"]
