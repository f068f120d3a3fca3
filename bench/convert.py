"""Conversion benchmark: a synthetic scTab-layout directory → cell store; cells/s and peak RSS.

Builds (or reuses) `<workdir>/sctab-<N>` with `cellssl synth --format sctab-parquet`, then times
`cellssl convert sctab` in a child process and reads the child's peak RSS from the kernel, so the number covers
the whole conversion (read, shuffle, write, full verification). Prints one markdown row per size.
With `--workers 1 2`, each size is converted once per worker count (`cellssl convert sctab --workers N`); the peak
RSS is then the largest of the processes' (each worker's own). Usage:
python bench/convert.py --cells 200000 1000000 [--workers 1 2] [--workdir bench/data]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak < before:
        raise RuntimeError("peak RSS did not grow: run one size per process")
    return seconds, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[200_000])
    parser.add_argument("--workdir", type=Path, default=Path("bench/data"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--keep", action="store_true", help="keep the converted store")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "cellssl.engine.cli"]
    rows = []
    for n in args.cells:
        src = args.workdir / f"sctab-{n}"
        if not (src / "var.parquet").exists():
            subprocess.run(cli + ["synth", str(src), "--cells", str(n), "--format", "sctab-parquet", "--quiet"],
                           check=True)
        for workers in args.workers:
            dst = args.workdir / f"sctab-{n}.cellstore"
            if dst.exists():
                shutil.rmtree(dst)
            # one child per run: RUSAGE_CHILDREN keeps the maximum over all children waited for
            out = subprocess.run([sys.executable, __file__, "--_child", str(src), str(dst), str(workers)], check=True,
                                 capture_output=True, text=True).stdout.split()
            seconds, peak_mb = float(out[0]), float(out[1])
            rows.append(f"| {n:,} | {workers} | {du(src) / 1e9:.2f} | {seconds:.0f} | {n / seconds:,.0f} | "
                        f"{peak_mb:,.0f} | {du(dst) / 1e9:.2f} |")
            if not args.keep:
                shutil.rmtree(dst)
    print("| cells | workers | source GB (parquet) | seconds | cells/s | peak RSS MB (largest process) | store GB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_child":
        seconds, peak = run([sys.executable, "-m", "cellssl.engine.cli", "convert", "sctab", sys.argv[2], sys.argv[3],
                             "--quiet", "--workers", sys.argv[4]])
        print(seconds, peak)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        main()
