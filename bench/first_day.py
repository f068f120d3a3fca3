"""The README's commands as a new user meets them: wall seconds of each, with cold caches (an empty CELLSSL_CACHE:
the default store is generated, nothing compiled is cached) and warm (the same commands again), on a quiet machine
or, with --load, while two busy processes (a stand-in for another user's job) share the cores.
Usage: python bench/first_day.py [--load] [--folder bench/data/first_day] [--only main,convert,embed,eval_small]
Prints one markdown row per command and cache state."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _busy(stop) -> None:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((400, 400))
    while not stop.is_set():
        a = np.tanh(a @ a.T / 400)


def _cellssl(*args, env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cellssl", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"cellssl {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    (cwd / f"{args[0]}-{int(started)}.stderr").write_text(done.stderr)  # eval's stage lines: its clock and estimates
    return time.perf_counter() - started


def _step_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    rate = [r["cells_per_s"] for r in rows if "cells_per_s" in r]
    return 8192 / (sum(rate) / len(rate)) if rate else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", action="store_true", help="two busy processes share the cores meanwhile")
    parser.add_argument("--folder", type=Path, default=ROOT / "bench" / "data" / "first_day")
    parser.add_argument("--only", default="main,convert,embed,eval_small")
    a = parser.parse_args()
    only = set(a.only.split(","))
    folder = a.folder.resolve()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    env = {**os.environ, "CELLSSL_CACHE": str(folder / "cache")}
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(2 if a.load else 0)]
    for hog in hogs:
        hog.start()
    state = "loaded" if a.load else "quiet"
    rows = []
    try:
        for cache in ("cold", "warm"):
            if "main" in only:
                run = folder / f"mae_{cache}"
                seconds = _cellssl("train", "mae_random", "--max-steps", 30, "--out", run, env=env, cwd=folder)
                rows.append(("cellssl train mae_random --max-steps 30", cache, seconds,
                             f"{_step_seconds(run):.1f} s a step"))
            if "convert" in only or "embed" in only:
                h5ad = folder / "cells100k.h5ad"
                if not h5ad.exists():
                    _cellssl("synth", h5ad, "--cells", 100_000, "--format", "h5ad", "--quiet", env=env, cwd=folder)
                store = folder / f"cells100k_{cache}.cellstore"
                seconds = _cellssl("convert", "h5ad", h5ad, store, "--genes", "default", env=env, cwd=folder)
                rows.append(("cellssl convert h5ad (100k cells)", cache, seconds, ""))
                if "embed" in only:
                    model = folder / "mae_cold" if (folder / "mae_cold").exists() else None
                    if model is None:
                        model = folder / "mae_tiny"
                        if not model.exists():
                            _cellssl("train", "mae_random", "--data", store, "--max-steps", 1, "--batch-size", 256,
                                     "--out", model, env=env, cwd=folder)
                    seconds = _cellssl("embed", model, store, folder / f"emb_{cache}.h5ad", env=env, cwd=folder)
                    rows.append(("cellssl embed (100k cells)", cache, seconds, ""))
            if "eval_small" in only:
                small = folder / "s4k.cellstore"
                if not small.exists():
                    _cellssl("synth", small, "--cells", 4000, "--quiet", env=env, cwd=folder)
                    _cellssl("train", "mae_random", "--data", small, "--max-steps", 2, "--batch-size", 256, "--out",
                             folder / "mae4k", env=env, cwd=folder)
                seconds = _cellssl("eval", folder / "mae4k", "--data", small, "--out", folder / f"eval_{cache}",
                                   "--finetune-steps", 2, "--crossmodal-steps", 2, env=env, cwd=folder)
                rows.append(("cellssl eval, 4,000 cells, every task and plot, 2 + 2 steps", cache, seconds, ""))
    finally:
        stop.set()
        for hog in hogs:
            hog.join()
    print(f"| command | caches | {state} machine, seconds | note |\n|---|---|---:|---|")
    for command, cache, seconds, note in rows:
        print(f"| {command} | {cache} | {seconds:.0f} | {note} |")


if __name__ == "__main__":
    main()
