"""Append-only scratch files keyed by bucket: how the converters shuffle and transpose in bounded memory.

A bucket holds per-row records (fixed-width fields) and per-element arrays; both are appended with one
`write` each and read back whole. Pure numpy; never imports engine or kernels.
"""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from .errors import InputError


class Spill:
    def __init__(self, root: Path, row_dtype: np.dtype, elem_dtypes: dict[str, np.dtype]):
        self.root, self.row_dtype, self.elem_dtypes = Path(root), np.dtype(row_dtype), elem_dtypes
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, bucket: int, field: str) -> Path:
        return self.root / f"{bucket}.{field}"

    def append(self, bucket: int, rows: np.ndarray, elems: dict[str, np.ndarray]) -> None:
        try:
            for field, arr in (("rows", rows), *elems.items()):
                with open(self._file(bucket, field), "ab") as fh:
                    fh.write(np.ascontiguousarray(arr).data)
        except OSError as exc:
            raise disk_error(self.root, exc) from exc

    def append_split(self, buckets: np.ndarray, rows: np.ndarray, elem_offsets: np.ndarray,
                     elems: dict[str, np.ndarray]) -> None:
        """Append rows already sorted by bucket: `elem_offsets[i]` is where row i's elements start."""
        cuts = np.flatnonzero(np.diff(buckets)) + 1
        starts, stops = np.concatenate(([0], cuts)), np.concatenate((cuts, [len(buckets)]))
        for a, b in zip(starts, stops):
            lo, hi = elem_offsets[a], elem_offsets[b]
            self.append(int(buckets[a]), rows[a:b], {k: v[lo:hi] for k, v in elems.items()})

    def rows(self, bucket: int) -> np.ndarray:
        """A bucket's row records."""
        path = self._file(bucket, "rows")
        return np.fromfile(path, dtype=self.row_dtype) if path.exists() else np.zeros(0, self.row_dtype)

    def read(self, bucket: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A bucket whole: its row records and element arrays (the files stay: several readers may need them)."""
        elems = {}
        for field, dtype in self.elem_dtypes.items():
            path = self._file(bucket, field)
            elems[field] = np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype)
        return self.rows(bucket), elems

    def pop(self, bucket: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Read a bucket back whole and delete its files (scratch space shrinks as the output grows)."""
        rows, elems = self.read(bucket)
        for field in ("rows", *self.elem_dtypes):
            self._file(bucket, field).unlink(missing_ok=True)
        return rows, elems


def disk_error(path: Path, exc: OSError) -> InputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(path, "disk full while converting; nothing was kept",
                          "free space (a conversion needs about twice the final store size) or write elsewhere")
    return InputError(path, f"cannot write ({exc.strerror or exc})", "check the path and its permissions")
