"""Disk to batches: the cell store, converters, the synthetic atlas, gene spaces and the streaming loader.

Never imports engine or kernels.
"""
from .errors import CellStoreError, InputError
from .genes import GeneAlignment, GeneSpace, align_genes
from .sampler import BlockShuffleSampler
from .store import TARGET_SUM, CellStore, CellStoreWriter, Layout, open_store


def __getattr__(name: str):
    """The stream (and torch with it) is imported at its first use: conversion workers never need it."""
    if name in ("Batch", "BatchStream"):
        from . import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["TARGET_SUM", "Batch", "BatchStream", "BlockShuffleSampler", "CellStore", "CellStoreError",
           "CellStoreWriter", "GeneAlignment", "GeneSpace", "InputError", "Layout", "align_genes", "open_store"]
