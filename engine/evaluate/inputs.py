"""What the evaluators read from a labelled store, checked: a split's labels, its paired-modality values and its
log1p expression (sparse). A missing split, an unknown or non-categorical column, or a split without any label
ends in one `InputError` that names the store, the field and the fix."""
from __future__ import annotations

import numpy as np

from cellssl.loaders import CellStore, InputError


def split_range(store: CellStore, split: str) -> tuple[int, int]:
    if split not in store.splits:
        raise InputError(store.path, f"no {split!r} split (it has {sorted(store.splits)})",
                         "convert the dataset with --split-by or --val-frac/--test-frac so it has train and test cells")
    return store.split(split)


def labels(store: CellStore, column: str, split: str) -> np.ndarray:
    """int64 codes of `column` for the split's cells (−1: unlabelled)."""
    if column not in store.obs_columns:
        raise InputError(store.path / "obs.parquet", f"no column {column!r}",
                         f"choose --label from the categorical columns {sorted(store.categories)}")
    if column not in store.categories:
        raise InputError(store.path / "obs.parquet", f"column {column!r} is not categorical",
                         f"choose --label from {sorted(store.categories)}")
    start, stop = split_range(store, split)
    codes = store.obs_codes(column)[start:stop].astype(np.int64)
    if not (codes >= 0).any():
        raise InputError(store.path / "obs.parquet", f"no cell of the {split!r} split has a {column!r} label",
                         "label the cells, or evaluate another column")
    return codes


def modality_columns(store: CellStore, columns: list[str] | None = None, prefix: str = "protein_") -> list[str]:
    """The paired-modality columns: `columns` as given, or every numeric obs column starting with `prefix`."""
    chosen = columns or [c for c in store.obs_columns if c.startswith(prefix) and c not in store.categories]
    if not chosen:
        raise InputError(store.path / "obs.parquet", f"no paired-modality columns (none named {prefix}*)",
                         "store the paired measurements (proteins, ATAC peaks) as numeric obs columns, or pass "
                         "--modality COL,COL,…")
    unknown = [c for c in chosen if c not in store.obs_columns]
    if unknown:
        raise InputError(store.path / "obs.parquet", f"no column(s) {unknown}", f"choose from {store.obs_columns}")
    categorical = [c for c in chosen if c in store.categories]
    if categorical:
        raise InputError(store.path / "obs.parquet", f"column(s) {categorical} are categorical, not measurements",
                         "pass numeric columns")
    return chosen


def modality(store: CellStore, columns: list[str], split: str) -> np.ndarray:
    start, stop = split_range(store, split)
    values = np.stack([store.obs_codes(c)[start:stop].astype(np.float32) for c in columns], axis=1)
    if not np.isfinite(values).all():
        raise InputError(store.path / "obs.parquet", "paired-modality columns hold NaN or infinite values",
                         "drop or impute those cells before converting")
    return values
