"""OpenMP threads that spin or sleep between parallel regions (OMP_WAIT_POLICY, which every cellssl command line sets
to PASSIVE unless the user chose): seconds of a small MLP fit (the evaluation's frozen cross-modality head, many tiny
steps) and of masked-autoencoder training steps (large matrix products), each in a fresh process under each policy,
on a quiet machine or, with --load, while two busy processes share the cores.
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
from cellssl.engine.evaluate.crossmodal import frozen
rng = np.random.default_rng(0)
z, y = rng.normal(size=(2400, 64)).astype(np.float32), rng.normal(size=(2400, 10)).astype(np.float32)
t = time.perf_counter(); frozen(z, y, z[:800], y[:800], [str(i) for i in range(10)]); print(time.perf_counter() - t)
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


def _seconds(code: str, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
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
        print(f"| {'loaded' if a.load else 'quiet'} machine | OpenMP default (spin) | PASSIVE | ratio |\n|---|---:|---:|---:|")
        for name, code in (("frozen head fit, s", HEAD), ("AE step, 2,048 × 4,000, s", STEPS)):
            runs = {p: min(_seconds(code, p) for _ in range(a.repeats)) for p in (None, "PASSIVE")}
            print(f"| {name} | {runs[None]:.2f} | {runs['PASSIVE']:.2f} | {runs[None] / runs['PASSIVE']:.2f} |")
    finally:
        stop.set()
        for hog in hogs:
            hog.join()


if __name__ == "__main__":
    main()
