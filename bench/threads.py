"""Threads for small and large work: seconds of a small MLP fit (the evaluation's frozen cross-modality head, many
tiny steps; `frozen` runs it on one thread) and of masked-autoencoder training steps (large matrix products), each
in a fresh process with torch's default threads (OpenMP threads spin a while between parallel regions), with
OMP_WAIT_POLICY=PASSIVE (they sleep at once) and on one thread, on a quiet machine or, with --load, while two busy
processes share the cores.
Usage: python bench/threads.py [--load] [--repeats 2]"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time

HEAD = """
import time, numpy as np
from cellssl.engine.evaluate.crossmodal import _fit_head
rng = np.random.default_rng(0)
z, y = rng.normal(size=(2400, 64)).astype(np.float32), rng.normal(size=(2400, 10)).astype(np.float32)
t = time.perf_counter(); _fit_head(z, y, z[:800], y[:800], [str(i) for i in range(10)], 100, 512, 1e-3, 0)
print(time.perf_counter() - t)
"""
STEPS = """
import time, torch
from cellssl.engine.models import AutoEncoder, ModelConfig
torch.manual_seed(0)
model = AutoEncoder(4000, ModelConfig())
opt = torch.optim.AdamW(model.parameters())
x = torch.rand(2048, 4000)
def step():
    loss = (model(x) - x).square().mean(); opt.zero_grad(); loss.backward(); opt.step()
step()
t = time.perf_counter()
for _ in range(5): step()
print((time.perf_counter() - t) / 5)
"""


def _busy(stop) -> None:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((400, 400))
    while not stop.is_set():
        a = np.tanh(a @ a.T / 400)


MODES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {"OMP_NUM_THREADS": "1"}}


def _seconds(code: str, mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(MODES[mode])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(2 if a.load else 0)]
    for hog in hogs:
        hog.start()
    time.sleep(1)
    try:
        print(f"| {'loaded' if a.load else 'quiet'} machine | " + " | ".join(MODES) + " |\n|---|" + "---:|" * len(MODES))
        for name, code in (("frozen head fit, s", HEAD), ("AE step, 2,048 × 4,000, s", STEPS)):
            runs = [min(_seconds(code, mode) for _ in range(a.repeats)) for mode in MODES]
            print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in runs) + " |")
    finally:
        stop.set()
        for hog in hogs:
            hog.join()


if __name__ == "__main__":
    main()
