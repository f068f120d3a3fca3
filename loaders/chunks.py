"""A direct reader of the cell store's sharded 1-D arrays (X/indices, X/data), for the streaming loader.

zarr-python spends ~0.5–0.9 ms of Python per read call, which caps a block-shuffled reader at a few tens of
thousands of cells/s. This reader understands exactly the layout the writer produces (zarr v3
`sharding_indexed`, index at the end, inner chunks of bytes → blosc|zstd → crc32c): it reads a shard's index
once, `pread`s each inner chunk, checks its crc32c, decodes it with numcodecs (which releases the GIL) and
serves many element ranges from chunks decoded once. A layout it does not recognise is refused.
Never imports engine or kernels.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Executor
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from .errors import CellStoreError

_EMPTY = np.iinfo(np.uint64).max
MAX_CHUNK_BYTES = 1 << 30  # far above any layout we write (2^18 elements); a larger claim is a crafted header


def _decoder(codecs: list[dict], dtype: np.dtype):
    names = [c["name"] for c in codecs]
    if names[0] != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    inner = names[1:]
    checksum = inner[-1:] == ["crc32c"]
    inner = inner[:-1] if checksum else inner
    if inner == ["blosc"]:
        codec = numcodecs.Blosc()
    elif inner == ["zstd"]:
        codec = numcodecs.Zstd()
    elif inner == []:
        codec = None
    else:
        return None
    return codec, checksum


def check_chunk_keys(array_dir: Path, meta: dict | None = None) -> None:
    """The array's chunk keys are zarr v3's default ('c/' + index) that cellssl writes and reads; any other encoding
    (zarr v2's, another separator) would be read from the wrong files, so it is refused."""
    meta = meta if meta is not None else json.loads((Path(array_dir) / "zarr.json").read_text())
    keys = meta.get("chunk_key_encoding", {"name": "default"})
    if not isinstance(keys, dict) or keys.get("name") != "default" or \
            keys.get("configuration", {}).get("separator", "/") != "/":
        raise CellStoreError(Path(array_dir) / "zarr.json", f"chunk keys encoded as {keys} (cellssl writes zarr v3's "
                             "default, 'c/' + index): its chunk files are not where this reader looks; the store is "
                             "damaged", "reconvert the source with `cellssl convert`, or restore the store from a copy")


class ShardedArray:
    """Element ranges of one sharded 1-D array, decoding each needed inner chunk exactly once per call."""

    def __init__(self, array_dir: Path):
        self.dir = Path(array_dir)
        meta = json.loads((self.dir / "zarr.json").read_text())
        self.dtype = np.dtype(meta["data_type"])
        self.size = int(meta["shape"][0])
        self.fill = meta.get("fill_value", 0)
        self.native = None
        check_chunk_keys(self.dir, meta)
        codecs = meta.get("codecs", [])
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            decode = _decoder(conf["codecs"], self.dtype)
            index_ok = [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
            if decode and index_ok and conf.get("index_location", "end") == "end":
                self.shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
                self.chunk = int(conf["chunk_shape"][0])
                if not 0 < self.chunk <= self.shard or self.chunk * self.dtype.itemsize > MAX_CHUNK_BYTES:
                    self._fail("zarr.json", f"inner chunks of {self.chunk} elements in shards of {self.shard}: not a "
                               "layout cellssl writes")
                self.per_shard = self.shard // self.chunk
                self.codec, self.checksum = decode
                self.native = True
        if not self.native:  # never a fallback: zarr would read a missing chunk as zeros
            self._fail("zarr.json", f"an array layout cellssl does not write ({[c.get('name') for c in codecs]})")
        self._indexes: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fail(self, what: str, problem: str):
        raise CellStoreError(self.dir / what, f"{problem}; the store is damaged",
                             "reconvert the source with `cellssl convert`, or restore the store from a copy")

    def _shard(self, k: int) -> tuple[int, np.ndarray]:
        with self._lock:
            if k not in self._fds:
                path = self.dir / "c" / str(k)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    self._fail(f"c/{k}", f"chunk file missing or unreadable ({exc.strerror})")
                size = os.fstat(fd).st_size
                n = 16 * self.per_shard + 4
                raw = os.pread(fd, n, size - n) if size >= n else b""
                if len(raw) != n or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    os.close(fd)
                    self._fail(f"c/{k}", "shard index checksum mismatch (truncated or corrupted file)")
                self._indexes[k] = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
                self._fds[k] = fd
            return self._fds[k], self._indexes[k]

    def chunk_checksums(self) -> bytes:
        """The crc32c every stored inner chunk ends with, in order: a fingerprint of the values that reads 4 bytes a
        chunk, not the chunks (an empty chunk contributes 4 zero bytes)."""
        if not self.native or not self.checksum:
            self._fail("zarr.json", "chunks without crc32c: not a layout cellssl writes")
        crcs = []
        for j in range(-(-self.size // self.chunk)):
            k, i = divmod(j, self.per_shard)
            fd, index = self._shard(k)
            offset, nbytes = index[i]
            crcs.append(b"\0\0\0\0" if offset == _EMPTY else os.pread(fd, 4, int(offset + nbytes - 4)))
        return b"".join(crcs)

    def decode_chunk(self, j: int, out: np.ndarray | None = None) -> np.ndarray:
        """Inner chunk j (global numbering), decoded and checked; into `out` (a whole chunk's length) where the
        codec guarantees to fill it exactly (none, Blosc), else into a buffer of its own."""
        k, i = divmod(j, self.per_shard)
        fd, index = self._shard(k)
        offset, nbytes = index[i]
        n = min(self.chunk, self.size - j * self.chunk)
        if offset == _EMPTY:
            if out is None:
                return np.full(n, self.fill, self.dtype)
            out[:n] = self.fill
            return out[:n]
        if offset + nbytes > os.fstat(fd).st_size:  # a crafted index must not make us allocate what is not there
            self._fail(f"c/{k}", f"chunk {i} claims bytes [{offset}, {offset + nbytes}) beyond the end of the file")
        raw = os.pread(fd, int(nbytes), int(offset))
        if self.checksum:
            if len(raw) < 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                self._fail(f"c/{k}", f"chunk {i} checksum mismatch")
            raw = raw[:-4]
        # decoded into a buffer of the size the layout implies (zarr writes whole inner chunks), zeroed unless the
        # decode is checked to fill it: a chunk whose header claims more is an error, not an allocation of whatever
        # it claims
        exact = self.codec is None or isinstance(self.codec, numcodecs.Blosc)
        if out is None or len(out) != self.chunk or not exact:
            out = np.zeros(self.chunk, self.dtype)
        try:
            if self.codec is None:
                if len(raw) != out.nbytes:
                    raise ValueError(f"{len(raw)} bytes, expected {out.nbytes}")
                out[:] = np.frombuffer(raw, self.dtype)
            else:
                claimed = int.from_bytes(raw[4:8], "little")  # blosc's header: the decoded size
                if isinstance(self.codec, numcodecs.Blosc) and claimed != out.nbytes:
                    raise ValueError(f"holds {claimed} bytes, expected {out.nbytes}")
                self.codec.decode(raw, out=out)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError for garbage and for oversized output
            self._fail(f"c/{k}", f"chunk {i} cannot be decoded ({exc})")
        return out[:n]

    def read(self, ranges: np.ndarray, pool: Executor | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Concatenation of the element ranges [lo, hi) (int64 [R, 2]), into `out` where given, each needed chunk
        decoded once, by one task that copies its pieces out and lets it go (a chunk a range covers whole is decoded
        in place): the read holds its output and one chunk per thread, not every chunk it needs."""
        lengths = ranges[:, 1] - ranges[:, 0]
        out = np.empty(int(lengths.sum()), self.dtype) if out is None else out
        pieces: dict[int, list[tuple[int, int, int]]] = {}  # chunk → (first element in it, length, position in out)
        pos = 0
        for lo, hi in ranges[lengths > 0].tolist():
            while lo < hi:
                j, start = divmod(lo, self.chunk)
                take = min(hi - lo, self.chunk - start)
                pieces.setdefault(j, []).append((start, take, pos))
                pos += take
                lo += take

        def one(item) -> None:
            j, parts = item
            if len(parts) == 1 and parts[0][:2] == (0, self.chunk):
                at = parts[0][2]
                decoded = self.decode_chunk(j, out[at:at + self.chunk])
                if not np.shares_memory(decoded, out):  # a codec that decodes into its own buffer
                    out[at:at + self.chunk] = decoded
                return
            decoded = self.decode_chunk(j)
            for start, take, at in parts:
                out[at:at + take] = decoded[start:start + take]

        list((pool.map if pool else map)(one, pieces.items()))
        return out
