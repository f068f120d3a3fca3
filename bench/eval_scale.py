"""`cellssl eval` as the data grows: one model (a masked autoencoder trained a few steps), cell_type and
reconstruction with the baselines on, on synthetic stores of several sizes; per-stage seconds (from eval's own stage
lines), total seconds, seconds per 1,000 cells and peak RSS of the evaluation process (and per stage: which one sets
it), each size in a fresh process; and how far eval's estimates were from the truth: the worst ratio of its
predicted total (elapsed + "about … left") to the measured one, among the estimates made after the first minute.
Usage: python bench/eval_scale.py [--cells 40000,160000] [--finetune-steps 1] [--folder bench/data/eval_scale]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"cellssl eval: (.*) \((\d+:\d\d(?::\d\d)?) elapsed")
ESTIMATE = re.compile(r"\((\d+:\d\d(?::\d\d)?) elapsed, about (\d+:\d\d(?::\d\d)?) left\)")

MEASURE = """
import resource, sys
from cellssl.engine.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def _seconds(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def prepare(folder: Path, cells: int) -> tuple[Path, Path]:
    store, run = folder / f"s{cells}.cellstore", folder / f"mae{cells}"
    if not store.exists():
        subprocess.run([sys.executable, "-m", "cellssl", "synth", str(store), "--cells", str(cells), "--quiet"],
                       check=True, cwd=ROOT)
    if not (run / "model.safetensors").exists():
        subprocess.run([sys.executable, "recipes/mae_random.py", "--data", str(store), "--out", str(run),
                        "--max-steps", "2", "--batch-size", "256", "--overwrite"], check=True, cwd=ROOT,
                       capture_output=True)
    return store, run


def measure(store: Path, run: Path, out: Path, finetune_steps: int) -> dict:
    """Runs the evaluation, sampling its resident set every 50 ms and charging each sample to the stage whose line
    came last: the peak per stage says which one sets the process's peak."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", MEASURE, "eval", f"mae={run}", "--data", str(store), "--out",
                              str(out), "--overwrite", "--tasks", "cell_type,reconstruction", "--no-plots",
                              "--finetune-steps", str(finetune_steps)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stage, peaks, lines = ["start-up"], {}, []
    sampling = threading.Event()

    def sample():
        process = psutil.Process(child.pid)
        while not sampling.is_set():
            try:
                rss = process.memory_info().rss / 2 ** 20
            except psutil.Error:
                return
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in child.stderr:
        lines.append(line)
        found = STAGE.search(line)
        if found:
            stage[0] = found.group(1)
    child.wait()
    sampling.set()
    sampler.join()
    total = time.perf_counter() - started
    stderr = "".join(lines)
    if child.returncode:
        raise SystemExit(stderr[-3000:])
    stages = [(m.group(1), _seconds(m.group(2))) for m in STAGE.finditer(stderr)]
    spans = {name: later - at for (name, at), (_, later) in zip(stages, stages[1:] + [("end", round(total))])}
    rss = int(re.search(r"PEAK_RSS_KB (\d+)", stderr).group(1)) / 1024
    predicted = [_seconds(at) + _seconds(left) for at, left in ESTIMATE.findall(stderr) if _seconds(at) >= 60]
    eta = max((max(p / total, total / p) for p in predicted if p > 0), default=float("nan"))
    return {"seconds": total, "rss_mb": rss, "stages": spans, "stage_rss_mb": peaks, "eta_worst": eta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="40000,160000")
    parser.add_argument("--finetune-steps", type=int, default=1)
    parser.add_argument("--folder", default=str(ROOT / "bench" / "data" / "eval_scale"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(c) for c in args.cells.split(",")]:
        store, run = prepare(folder, n)
        result = measure(store, run, folder / f"eval{n}", args.finetune_steps)
        rows.append((n, result))
        peaks = result["stage_rss_mb"]
        stages = "; ".join(f"{k}: {v} s, {peaks.get(k, 0):,.0f} MB" for k, v in result["stages"].items())
        print(f"| {n:,} | {result['seconds']:.0f} | {1000 * result['seconds'] / n:.2f} | {result['rss_mb']:,.0f} | "
              f"{result['eta_worst']:.2f}× | {stages} |", flush=True)


if __name__ == "__main__":
    main()
