"""DeepSpeed training end to end (CPU, gloo): one process, exact resume, 2 ranks, 2 nodes with --no_ssh."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_args(store, out, steps, *extra):
    return ["--data", str(store), "--out", str(out), "--max-steps", str(steps), "--batch-size", "128",
            "--log-every", "1", "--checkpoint-every", "3", "--val-every", "3", *extra]


def run(cmd, **kw):
    env = {**os.environ, "MASTER_PORT": str(free_port()), "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, **kw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_single_process_and_exact_resume(synthetic_store, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, straight, 6)])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, resumed, 3)])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, resumed, 6), "--resume"])
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bitwise: loader position, RNG, optimiser and scheduler all restored
    assert (straight / "model.safetensors").exists() and (straight / "checkpoints" / "latest").read_text() == "step00000006"
    assert json.loads((straight / "config.json").read_text())["objective"]["mask"] == "random"
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "loss", "lr", "cells_per_s", "seconds"} <= set(records[0])
    assert any("val_loss" in r for r in records)


def test_csr_and_dense_input_train_alike(synthetic_store, tmp_path):
    """--input csr (the default: the first layer and the loss read the batch's nonzeros) and --input dense (the
    loader's dense batches) are one computation: the same losses, step after step, up to float summation order."""
    for name in ("mae_random", "byol"):
        runs = {}
        for kind in ("csr", "dense"):
            out = tmp_path / f"{name}-{kind}"
            run([sys.executable, f"recipes/{name}.py", *recipe_args(synthetic_store, out, 4), "--input", kind])
            runs[kind] = losses(out)
        assert sorted(runs["csr"]) == [1, 2, 3, 4]
        for step, loss in runs["dense"].items():
            assert abs(runs["csr"][step] - loss) <= 1e-4 * abs(loss), (name, step, runs)


def check_ranks(out: Path) -> None:
    traces = [[json.loads(line) for line in (out / f"trace-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(traces[0]) == len(traces[1]) == 3
    for a, b in zip(*traces):
        assert not set(a["cells"]) & set(b["cells"])  # disjoint data
        assert a["weight_sum"] == b["weight_sum"]       # in sync


def test_two_ranks_with_the_deepspeed_launcher(synthetic_store, tmp_path):
    out = tmp_path / "two_ranks"
    done = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "recipes/mae_random.py",
                *recipe_args(synthetic_store, out, 3, "--trace")])
    check_ranks(out)
    assert (done.stdout + done.stderr).count("model: ") == 1  # rank 0 exports, rank 0 says so


def test_two_nodes_without_ssh(synthetic_store, tmp_path):
    out, port = tmp_path / "two_nodes", free_port()
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    launcher = [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--no_ssh", "--master_addr",
                "127.0.0.1", "--master_port", str(port)]
    args = ["recipes/mae_random.py", *recipe_args(synthetic_store, out, 3, "--trace")]
    second = subprocess.Popen([*launcher, "--node_rank", "1", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        run([*launcher, "--node_rank", "0", *args])
        assert second.wait(timeout=300) == 0, second.stdout.read()[-3000:]
    finally:
        second.kill()
    check_ranks(out)


def test_batch_larger_than_split_is_a_clear_error(synthetic_store, tmp_path):
    done = subprocess.run([sys.executable, "recipes/mae_random.py", "--data", str(synthetic_store), "--out",
                           str(tmp_path / "x"), "--batch-size", "100000", "--max-steps", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2 and "--batch-size: 100000 × 1 rank(s) × 1 accumulated" in done.stderr


def test_non_finite_loss_stops_with_last_good_checkpoint(synthetic_store, tmp_path):
    out = tmp_path / "nan"
    done = subprocess.run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 30),
                           "--lr", "1e12", "--checkpoint-every", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert done.returncode == 2
    assert "cellssl: error: loss is nan" in done.stderr and "last good checkpoint" in done.stderr
    latest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / latest).is_dir() and not (out / "model.safetensors").exists()


def test_embed_writes_every_cell(synthetic_store, tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd

    from cellssl.engine.cli import main
    from cellssl.loaders import CellStore

    out = tmp_path / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 2)])
    assert main(["embed", str(out / "model.safetensors"), str(synthetic_store), str(tmp_path / "e.parquet")]) == 0
    assert main(["embed", str(out / "model.safetensors"), str(synthetic_store), str(tmp_path / "e.h5ad")]) == 0
    frame = pd.read_parquet(tmp_path / "e.parquet")
    store = CellStore(synthetic_store)
    assert len(frame) == store.n_cells and [f"z{j}" for j in range(64)] == list(frame.columns[-64:])
    assert list(frame["cell_type"]) == list(store.obs()["cell_type"].iloc[store.source_order()])  # source order
    adata = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(adata.obsm["X_cellssl"], frame[[f"z{j}" for j in range(64)]].to_numpy(), rtol=1e-5)
    other = tmp_path / "other.cellstore"
    from cellssl.loaders.synth import synth
    (tmp_path / "genes.txt").write_text("\n".join(store.genes.gene_id[:100]))
    synth(other, 200, genes=tmp_path / "genes.txt", progress=False)
    assert main(["embed", str(out / "model.safetensors"), str(other), str(tmp_path / "x.parquet")]) == 2


def test_monitor_files_and_curves_of_two_runs(synthetic_store, tmp_path):
    from cellssl.engine.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, a, 3), "--monitor", "csv"])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, b, 3), "--lr", "0.01"])
    csv = {p.name for p in (a / "csv_monitor").rglob("*.csv")}
    assert {"Train_loss.csv", "Validation_val_loss.csv"} <= csv, csv
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2


ACCUMULATION_CHECK = """
import sys
from dataclasses import replace

import torch

from cellssl.engine.experiments import experiment
from cellssl.engine.feed import Fed
from cellssl.engine.models import ModelConfig
from cellssl.engine.trainer import Trainer

store, out = sys.argv[1], sys.argv[2]
cfg = replace(experiment("reconstruction"), data=store, out=out, input="dense", model=ModelConfig(dropout=0.0),
              max_steps=10**9)
whole = Trainer(replace(cfg, batch_size=64))
halves = Trainer(replace(cfg, batch_size=32, gradient_accumulation=2))
fed = next(whole.feed(whole.stream))
x = fed.x.clone()
for step in range(3):
    whole.train_step([Fed(x, None, fed.source)], step)
    halves.train_step([Fed(x[:32], None, fed.source), Fed(x[32:], None, fed.source)], step)
for (name, a), b in zip(whole.objective.named_parameters(), halves.objective.parameters()):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
assert halves.engine.global_steps == whole.engine.global_steps == 3
print("same")
"""


def test_gradient_accumulation_equals_one_larger_batch(synthetic_store, tmp_path):
    """Two accumulated micro-batches of 32 cells train like one batch of 64: the same weights after three optimiser
    steps (averaged gradient, clipped once, one AdamW step each)."""
    done = run([sys.executable, "-c", ACCUMULATION_CHECK, str(synthetic_store), str(tmp_path / "x")])
    assert done.stdout.strip().endswith("same")


def test_accumulated_run_counts_optimiser_steps_and_resumes_exactly(synthetic_store, tmp_path):
    """--max-steps counts optimiser steps; the loader's position in a checkpoint is after both micro-batches, so a
    resumed run continues exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    accumulate = ["--gradient-accumulation", "2"]
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, straight, 5), *accumulate])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, resumed, 3), *accumulate])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, resumed, 5), *accumulate, "--resume"])
    assert losses(straight) == losses(resumed) and sorted(losses(straight)) == [1, 2, 3, 4, 5]
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = 1200 // 128 / 2  # micro-batches of the training split, two per optimiser step
    assert [r["epoch"] for r in records if "loss" in r] == [int(s * 2 // 2 // steps_per_epoch) for s in range(1, 6)]
