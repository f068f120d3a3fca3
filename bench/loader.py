"""Loader benchmark: batches of 8,192 cells (CSR, and dense float32 × 19,350) per second, ours beside peer loaders.

One command builds (or reuses) a synthetic store in the default gene space, exports the same cells to the
formats the peers recommend (h5ad for scDataset and AnnLoader, SCDL memmap for bionemo-scdl, an annbatch
zarr collection in a Python 3.12 virtualenv the script creates), then measures, each in its own process so
peak RSS is its own: our BatchStream (raw counts, and log1p per 10k), scDataset, bionemo-scdl, AnnLoader,
annbatch, and the machine's ceiling (zero-filling the batch buffer plus a vectorised numpy scatter of the same
rows from memory). Warm cache by default; --cold drops the page cache before each run (needs root).
Each loader reports its first epoch from a cold start and then its steady state (one more epoch's batches), and
its peak RSS. CSR rows compare our CSR batches with annbatch's sparse-only reads; the *-bound rows measure what
bounds any reader of this store on the 2 threads ours uses: decoding the split's chunk bytes already in memory,
their crc32c, and a plain copy of the decoded CSR.
Usage: python bench/loader.py [--cells 200000] [--batches N] [--cold] [--only ours-csr-log1p,annbatch-sparse]
Peers: pip install scdataset bionemo-scdl (into this environment); annbatch is installed by the script.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 8192
BOUNDS = ("decode-bound", "crc-bound", "copy-bound")
RESIDENT = ("resident-csr-raw", "resident-csr-log1p", "resident-dense-raw", "resident-dense-log1p", "scipy-rows",
            "scipy-rows-dense", "annbatch-memory", "annbatch-memory-sparse")
PEERS = ("ours-csr-log1p", "ours-csr-raw", "annbatch-sparse", "ours-raw", "ours-log1p", "annbatch", "ceiling", *BOUNDS,
         *RESIDENT, "scdataset", "bionemo-scdl", "anndata-annloader")


# --- data in each format -----------------------------------------------------------------------------------
def prepare(workdir: Path, cells: int, needed: set[str]) -> dict[str, Path]:
    from cellssl.loaders import CellStore
    from cellssl.loaders.synth import synth

    paths = {"store": workdir / f"synthetic-{cells}.cellstore", "h5ad": workdir / f"synthetic-{cells}.h5ad",
             "scdl": workdir / f"synthetic-{cells}.scdl", "annbatch": workdir / f"synthetic-{cells}.annbatch.zarr"}
    if not (paths["store"] / "zarr.json").exists():
        synth(paths["store"], cells, progress=True)
    if not paths["h5ad"].exists() and needed - {"store"}:
        export_h5ad(CellStore(paths["store"]), paths["h5ad"])
    if not paths["scdl"].exists() and "scdl" in needed:
        from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

        print("building the SCDL memmap …", file=sys.stderr)
        SingleCellMemMapDataset(str(paths["scdl"]), h5ad_path=str(paths["h5ad"]), use_X_not_raw=True,
                                data_dtype="float32")
    return paths


def export_h5ad(store, path: Path, step: int = 50_000) -> None:
    """The store's train split, in store order, as an h5ad with CSR counts (X) and cell_type in obs."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    start, stop = store.split("train")
    tmp = path.with_suffix(".tmp.h5ad")
    with h5py.File(tmp, "w") as f:
        for i, a in enumerate(range(start, stop, step)):
            block = store.to_scipy(a, min(a + step, stop)).astype(np.float32)
            if i == 0:
                write_elem(f, "X", block, dataset_kwargs={"chunks": (1 << 16,)})
            else:
                sparse_dataset(f["X"]).append(block)
        obs = store.obs(["cell_type"]).iloc[start:stop]
        obs.index = obs.index.astype(str)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=store.var["gene_id"].to_numpy()))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    os.rename(tmp, path)
    ad.read_h5ad(path, backed="r")  # fails loudly if anndata cannot read what we wrote


# --- one process per loader ----------------------------------------------------------------------------------
def run_ours(paths, batches, normalize, output="dense", resident="off"):
    """Our stream from disk, or (`resident="host"`) from the train split held in RAM after one read."""
    from cellssl.loaders import BatchStream

    stream = BatchStream(paths["store"], "train", batch_size=BATCH, seed=0, normalize=normalize, output=output,
                         resident=resident)
    if resident != "off":
        stream.load_share()  # read at the first use otherwise: here it falls inside load_s
    return (b.x if output == "dense" else b for b in stream.endless())


def run_scipy(paths, batches, dense=False):
    """What users with the data in memory do today: the train split as one scipy CSR, `X[rows]` with a uniform
    permutation per epoch (and `.toarray()`)."""
    from cellssl.loaders import CellStore

    store = CellStore(paths["store"])
    x = store.to_scipy(*store.split("train"))

    def gen():
        for epoch in itertools.count():
            order = np.random.default_rng(epoch).permutation(x.shape[0])
            for s in range(0, len(order) - BATCH + 1, BATCH):
                sub = x[order[s:s + BATCH]]
                yield sub.toarray() if dense else sub
    return gen()


def chunk_bytes(store_path: Path):
    """Every stored inner chunk of the train split's X/indices and X/data, as read from disk (codec frame + crc32c),
    with the array it belongs to."""
    from cellssl.loaders import CellStore
    from cellssl.loaders.chunks import ShardedArray

    store = CellStore(store_path)
    start, stop = store.split("train")
    lo, hi = int(store.indptr[start]), int(store.indptr[stop])
    out = []
    for name in ("indices", "data"):
        array = ShardedArray(store.path / "X" / name)
        for j in range(lo // array.chunk, (hi - 1) // array.chunk + 1):
            k, i = divmod(j, array.per_shard)
            fd, index = array._shard(k)
            offset, nbytes = index[i]
            out.append((array, os.pread(fd, int(nbytes), int(offset))))
    return stop - start, out


def run_bound(paths, what: str, threads: int = 2) -> dict:
    """What bounds a reader of this store, on the threads our loader uses: the codec's decode of the train split's
    chunk bytes (already in memory), their crc32c, and a plain copy of the decoded CSR; as cells/s of the split."""
    from concurrent.futures import ThreadPoolExecutor

    import google_crc32c

    cells, chunks = chunk_bytes(paths["store"])
    decoded = [np.zeros(a.chunk, a.dtype) for a, _ in chunks]
    copies = [np.empty_like(d) for d in decoded]

    def work(i):
        array, raw = chunks[i]
        if what == "crc":
            google_crc32c.value(raw[:-4])
        elif what == "decode":
            array.codec.decode(raw[:-4], out=decoded[i])
        else:
            np.copyto(copies[i], decoded[i])

    with ThreadPoolExecutor(threads) as pool:
        if what == "copy":
            list(pool.map(lambda i: chunks[i][0].codec.decode(chunks[i][1][:-4], out=decoded[i]), range(len(chunks))))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            list(pool.map(work, range(len(chunks))))
            best = min(best, time.perf_counter() - t0)
    return {"cells_per_s": cells / best, "bytes_per_cell": sum(len(r) for _, r in chunks) / cells}


def run_ceiling(paths, batches):
    """Zero-fill of the batch buffer + a vectorised numpy scatter of the same rows, from CSR already in memory
    with its flat destinations precomputed: pure memory traffic, no decode, no I/O, no bookkeeping."""
    from cellssl.loaders import CellStore

    store = CellStore(paths["store"])
    out = np.empty((BATCH, store.n_genes), np.float32)
    prepared = []
    for i in range(4):
        indptr, indices, data = store.read_rows(i * BATCH, (i + 1) * BATCH)
        rows = np.repeat(np.arange(BATCH), np.diff(indptr))
        prepared.append((rows * store.n_genes + indices, data.astype(np.float32)))

    def gen():
        flat = out.reshape(-1)
        for i in itertools.count():
            dest, values = prepared[i % 4]
            out.fill(0.0)
            flat[dest] = values
            yield out
    return gen()


def run_scdataset(paths, batches):
    import anndata as ad
    import torch
    from scdataset import BlockShuffling, scDataset
    from torch.utils.data import DataLoader

    adata = ad.read_h5ad(paths["h5ad"], backed="r")
    dataset = scDataset(adata, BlockShuffling(block_size=64), batch_size=BATCH, fetch_factor=2,
                        fetch_transform=lambda view: view.to_memory().X.toarray().astype(np.float32),
                        batch_transform=torch.from_numpy)
    return iter(DataLoader(dataset, batch_size=None, num_workers=2, prefetch_factor=3))


def run_bionemo(paths, batches):
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import DataLoader

    ds = SingleCellMemMapDataset(str(paths["scdl"]))
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=collate_sparse_matrix_batch, num_workers=2)
    return (b.to_dense() for b in loader)


def run_annloader(paths, batches):
    import anndata as ad
    from anndata.experimental import AnnLoader

    adata = ad.read_h5ad(paths["h5ad"], backed="r")
    loader = AnnLoader(adata, batch_size=BATCH, shuffle=True)
    return (b.X if not hasattr(b.X, "toarray") else b.X.toarray() for b in loader)


ANNBATCH_SCRIPT = r'''
import json, sys, time
import anndata as ad, numpy as np, zarr
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
from annbatch import DatasetCollection, Loader
h5ad, path, batches, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
collection = DatasetCollection(path)
if mode == "build":
    collection.add_adatas(adata_paths=[h5ad], shuffle=True)
    sys.exit(0)
def in_memory(g):  # annbatch's in-memory mode: the collection's arrays copied into a zarr MemoryStore first
    mem = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    x = mem.create_group("X")
    x.attrs.update(dict(g["X"].attrs))
    for name in ("indptr", "indices", "data"):
        src = g["X"][name]
        x.create_array(name, data=src[:], chunks=src.chunks, shards=src.shards, compressors=src.compressors)
    return ad.AnnData(X=ad.io.sparse_dataset(mem["X"]))
memory = mode.startswith("memory")
mode = mode.removeprefix("memory-") if memory else mode
t_load = time.perf_counter()
with ad.settings.override(remove_unused_categories=False):
    loader = Loader(batch_size=%d, chunk_size=32, preload_nchunks=256).use_collection(
        collection, load_adata=in_memory if memory else lambda g: ad.AnnData(X=ad.io.sparse_dataset(g["X"])))
t_load = time.perf_counter() - t_load
import threading, psutil
peak = [0]; me = psutil.Process(); done = threading.Event()
def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]))
threading.Thread(target=sample, daemon=True).start()
def endless():
    while True:
        yield from loader
it = endless()
rates = []
for _ in range(2):  # the first epoch from a cold start, then steady state
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        x = next(it)["X"]
        if mode == "dense":
            x = x.toarray().astype(np.float32, copy=False)
        n += x.shape[0]
    rates.append(n / (time.perf_counter() - t0))
done.set()
print(json.dumps({"cells_per_s": rates[1], "first_epoch_cells_per_s": rates[0], "batches": batches,
                  "peak_rss_mb": peak[0] / 2 ** 20, "load_s": t_load}))
''' % BATCH


def annbatch_env(workdir: Path) -> Path:
    venv = workdir / "venv-annbatch-py312"
    python = venv / "bin" / "python"
    if not python.exists():
        candidates = [os.environ.get("PYTHON312"),  # pyenv's python3.12 shim exits 127 unless selected
                      *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python"))),
                      shutil.which("python3.12")]
        base = next((c for c in candidates if c and Path(c).exists()), None)
        if base is None:
            raise RuntimeError("annbatch needs Python >= 3.12: set PYTHON312 to its interpreter")
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "annbatch[zarrs]", "psutil"], check=True)
    return python


class TreeRSS:
    """Peak resident memory of this process plus its children (DataLoader workers), sampled every 20 ms."""

    def __init__(self):
        import threading

        import psutil

        self.peak, self._stop, self._me = 0, threading.Event(), psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.wait(0.02):
            total = 0
            for p in [self._me, *self._me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2 ** 20


def cells_in(batch) -> int:
    return batch.shape[0] if hasattr(batch, "shape") else len(batch)


def measure(gen, batches: int, rss: TreeRSS) -> dict:
    """cells/s over the first `batches` batches from a cold start (threads, JIT, first window: the first epoch) and
    over the next `batches` (steady state)."""
    rates = []
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for _ in range(batches):
            batch = next(gen)
            assert cells_in(batch) == BATCH, cells_in(batch)
            n += BATCH
        rates.append(n / (time.perf_counter() - t0))
    return {"cells_per_s": rates[1], "first_epoch_cells_per_s": rates[0], "batches": batches,
            "peak_rss_mb": rss.stop()}


def child(name: str, paths: dict[str, Path], batches: int) -> dict:
    if name in BOUNDS:
        return run_bound(paths, name.removesuffix("-bound"))
    runners = {"ours-raw": lambda p, b: run_ours(p, b, False), "ours-log1p": lambda p, b: run_ours(p, b, True),
               "ours-csr-raw": lambda p, b: run_ours(p, b, False, "csr"),
               "ours-csr-log1p": lambda p, b: run_ours(p, b, True, "csr"),
               **{f"resident-{o}-{k}": (lambda p, b, o=o, k=k: run_ours(p, b, k == "log1p", o, "host"))
                  for o in ("csr", "dense") for k in ("raw", "log1p")},
               "scipy-rows": run_scipy, "scipy-rows-dense": lambda p, b: run_scipy(p, b, True),
               "ceiling": run_ceiling, "scdataset": run_scdataset, "bionemo-scdl": run_bionemo,
               "anndata-annloader": run_annloader}
    import cellssl.loaders  # noqa: F401 -- imports are not load time
    rss = TreeRSS()
    t0 = time.perf_counter()
    gen = runners[name](paths, batches)  # a resident stream reads its share here: its load time
    load = time.perf_counter() - t0
    return {**measure(gen, batches, rss), "load_s": load}


FILES = {"ours-raw": "store", "ours-log1p": "store", "ours-csr-raw": "store", "ours-csr-log1p": "store",
         "ceiling": "store", **{b: "store" for b in BOUNDS}, **{r: "store" for r in RESIDENT[:6]},
         "scdataset": "h5ad", "bionemo-scdl": "scdl", "anndata-annloader": "h5ad", "annbatch": "annbatch",
         "annbatch-sparse": "annbatch", "annbatch-memory": "annbatch", "annbatch-memory-sparse": "annbatch"}


def warm_page_cache(path: Path) -> None:
    """Read every file once, so a warm run measures the loader, not the disk."""
    for f in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_loader(name: str, paths: dict[str, Path], workdir: Path, batches: int, env: dict) -> dict:
    """One loader in its own process (its peak RSS is its own): its JSON result, or {"error": …}."""
    if name.startswith("annbatch"):
        python = annbatch_env(workdir)
        if not (paths["annbatch"] / "zarr.json").exists():
            subprocess.run([str(python), "-c", ANNBATCH_SCRIPT, str(paths["h5ad"]), str(paths["annbatch"]), "0",
                            "build"], check=True)
        mode = ("memory-" if "memory" in name else "") + ("sparse" if name.endswith("sparse") else "dense")
        cmd = [str(python), "-c", ANNBATCH_SCRIPT, str(paths["h5ad"]), str(paths["annbatch"]), str(batches), mode]
    else:
        cmd = [sys.executable, __file__, "--_child", name, "--batches", str(batches)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:150]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> None:
    print("| loader | output | steady cells/s | first epoch cells/s | load s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        output = "bound" if name in BOUNDS else "CSR" if "csr" in name or name.endswith(("sparse", "rows")) else \
            "dense"
        if "error" in r:
            print(f"| {name} | {output} | failed: {r['error']} | | | |")
        elif name in BOUNDS:
            print(f"| {name} | {output} | {r['cells_per_s']:,.0f} | | | ({r['bytes_per_cell']:,.0f} B/cell on disk) |")
        else:
            print(f"| {name} | {output} | {r['cells_per_s']:,.0f} | {r['first_epoch_cells_per_s']:,.0f} | "
                  f"{r.get('load_s', 0):.1f} | {r['peak_rss_mb']:,.0f} |")
    for ours, peer in (("ours-csr-log1p", "annbatch-sparse"), ("ours-csr-raw", "annbatch-sparse"),
                       ("ours-log1p", "annbatch"), ("ours-raw", "annbatch"), ("resident-csr-raw", "scipy-rows"),
                       ("resident-dense-raw", "scipy-rows-dense"), ("resident-csr-raw", "annbatch-memory-sparse"),
                       ("resident-dense-raw", "annbatch-memory")):
        a, b = results.get(ours, {}), results.get(peer, {})
        if "cells_per_s" in a and "cells_per_s" in b:
            print(f"- {ours} / {peer}: steady {a['cells_per_s'] / b['cells_per_s']:.2f}x, first epoch "
                  f"{a['first_epoch_cells_per_s'] / b['first_epoch_cells_per_s']:.2f}x, peak RSS "
                  f"{a['peak_rss_mb']:,.0f} vs {b['peak_rss_mb']:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=0, help="timed batches per phase (default: one epoch)")
    parser.add_argument("--workdir", type=Path, default=Path("bench/data"))
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each loader")
    parser.add_argument("--only", default=",".join(PEERS))
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args._child:
        paths = {k: Path(v) for k, v in json.loads(os.environ["CELLSSL_BENCH_PATHS"]).items()}
        print(json.dumps(child(args._child, paths, args.batches)))
        return
    names = args.only.split(",")
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        parser.error(f"unknown loader(s) {unknown}; choose from {', '.join(PEERS)}")
    if args.cold and not drop_caches():
        parser.error("cannot drop the page cache (not root): --cold numbers would be warm")
    paths = prepare(args.workdir, args.cells, {FILES[n] for n in names})
    from cellssl.loaders import CellStore

    start, stop = CellStore(paths["store"]).split("train")
    batches = args.batches or (stop - start) // BATCH
    env = {**os.environ, "CELLSSL_BENCH_PATHS": json.dumps({k: str(v) for k, v in paths.items()})}
    results = {}
    for name in names:
        drop_caches() if args.cold else warm_page_cache(paths[FILES[name]])
        results[name] = run_loader(name, paths, args.workdir, batches, env)
        print(name, results[name], file=sys.stderr, flush=True)
    print(f"{args.cells:,}-cell synthetic atlas (train split {stop - start:,} cells), batches of {BATCH} x 19,350, "
          f"{batches} batches per phase (first epoch from a cold start, then steady state), "
          f"{'cold' if args.cold else 'warm'} page cache, {os.cpu_count()} cores")
    report(results)


if __name__ == "__main__":
    main()
