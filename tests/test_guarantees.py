"""The promises of README's "Guarantees": no file a user receives runs code, a run folder holds one run, a resume
continues only the same experiment, every user error is one line with exit status 2, and validation measures the
same thing every time on every rank."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import BIN, ROOT, free_port, losses, recipe_args, run

from cellssl.engine import checkpoint
from cellssl.engine.cli import main
from cellssl.engine.runlog import truncate_log
from cellssl.loaders import CellStore, InputError


class Payload:
    """Unpickling this creates `marker`: what a malicious model or checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def recipe(*args, env=None, **kw):
    return subprocess.run([sys.executable, "recipes/mae_random.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MASTER_PORT": str(free_port()), **(env or {})}, **kw)


def one_line_error(done, *phrases):
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("cellssl: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert " Fix: " in lines[0] and all(p in lines[0] for p in phrases), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mae"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 3)])
    return out


# --- 1. loading a file never executes code from it ---------------------------------------------------------------
def test_exported_model_is_safetensors_with_config_and_genes(trained, synthetic_store):
    from safetensors import safe_open

    path = trained / "model.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "cellssl-model" and json.loads(meta["config"])["objective"]["mask"] == "random"
    assert json.loads(meta["gene_ids"]) == list(CellStore(synthetic_store).genes.gene_id)
    assert checkpoint.load_model(trained)["state_dict"].keys() == checkpoint.load_model(path)["state_dict"].keys()


def test_a_pickle_model_runs_no_code_at_any_entry_point(trained, synthetic_store, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"config": "{}", "gene_ids": [], "state_dict": Payload(marker)}, evil)
    with pytest.raises(InputError, match="pickle-based model file .* cellssl upgrade-model"):
        checkpoint.load_model(evil)
    assert main(["embed", str(evil), str(synthetic_store), str(tmp_path / "e.parquet")]) == 2
    assert main(["eval", f"x={evil}", "--data", str(synthetic_store), "--out", str(tmp_path / "ev"),
                 "--no-baselines", "--tasks", "cell_type"]) == 2
    assert main(["upgrade-model", str(evil)]) == 2  # even the converter reads it with the restricted unpickler
    done = recipe("--data", str(synthetic_store), "--out", str(tmp_path / "ft"), "--init-encoder", str(evil),
                  "--max-steps", "1", "--batch-size", "64")
    one_line_error(done, "pickle-based model file")
    assert not marker.exists()


def test_a_legacy_model_converts_safely(trained, tmp_path):
    saved = {k: checkpoint.load_model(trained)[k] for k in ("config", "gene_ids", "state_dict")}
    torch.save(saved, tmp_path / "model.pt")  # what cellssl < 0.2 wrote: a torch pickle of plain values
    assert main(["upgrade-model", str(tmp_path / "model.pt")]) == 0
    again = checkpoint.load_model(tmp_path / "model.safetensors")
    assert again["gene_ids"] == saved["gene_ids"] and again["config"] == saved["config"]
    assert all(torch.equal(again["state_dict"][k], v) for k, v in saved["state_dict"].items())


def test_a_crafted_checkpoint_is_refused_on_resume(synthetic_store, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 3)])
    marker = tmp_path / "pwned"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    states = next((out / "checkpoints" / tag).glob("*model_states.pt"))
    torch.save({"module": Payload(marker)}, states)
    done = recipe(*recipe_args(synthetic_store, out, 5), "--resume")
    one_line_error(done, "refusing to load it")
    assert not marker.exists()


# --- 2. a run folder holds exactly one run -----------------------------------------------------------------------
def test_a_typo_never_starts_a_run(synthetic_store, tmp_path):
    for typo in (["--max-stpes", "5"], ["--max", "5"], ["--lr", "fast"], ["--input", "coo"]):
        done = recipe("--data", str(synthetic_store), "--out", str(tmp_path / "x"), *typo)
        one_line_error(done, "mae_random.py")
    assert not (tmp_path / "x").exists()


def test_the_help_lists_only_what_applies(capsys):
    from cellssl.engine.experiments import experiment
    from cellssl.engine.options import recipe_parser

    byol = recipe_parser(experiment("byol"), "")[0].format_help()
    mae = recipe_parser(experiment("mae_random"), "")[0].format_help()
    assert "--ema" in byol and "--mask" not in byol and "--label" not in byol and "default: 0.01" in byol
    assert "--mask" in mae and "--rate-of" in mae and "--ema" not in mae and "--lambd" not in mae


def test_a_second_run_in_the_same_folder(trained, synthetic_store):
    done = recipe(*recipe_args(synthetic_store, trained, 3))
    one_line_error(done, "already holds a run", "--resume", "--overwrite")
    done = recipe(*recipe_args(synthetic_store, trained, 3), "--resume", "--overwrite")
    one_line_error(done, "not both")


def test_overwrite_starts_again_and_keeps_other_files(synthetic_store, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 3)])
    (out / "notes.txt").write_text("mine")
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 2), "--overwrite"])
    assert sorted(losses(out)) == [1, 2] and (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"


def test_resume_refuses_other_settings_and_other_data(trained, synthetic_store, tmp_path):
    done = recipe(*recipe_args(synthetic_store, trained, 6), "--resume", "--lr", "0.5")
    one_line_error(done, "lr: the run was started with 0.001, this resume asks for 0.5")
    done = recipe(*recipe_args(synthetic_store, trained, 6), "--resume", "--hidden", "64,32")
    one_line_error(done, "model.hidden")
    from cellssl.loaders.synth import synth

    other = synth(tmp_path / "other.cellstore", 1500, seed=1, progress=False)
    done = recipe(*recipe_args(other, trained, 6), "--resume")
    one_line_error(done, "is not the data this run trained on")
    empty = tmp_path / "never"
    done = recipe(*recipe_args(synthetic_store, empty, 6), "--resume")
    one_line_error(done, "no complete checkpoint to resume from")


def test_after_a_resume_the_log_holds_every_step_once(synthetic_store, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 6)])
    (out / "checkpoints" / "latest").write_text("step00000003")  # killed after logging 4-6, before saving 6
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 6), "--resume"])
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncate_log_drops_steps_after_the_checkpoint_and_cut_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "val_loss": 1}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1}\n{"step": 2, "val_loss": 1}\n'


# --- 3. every failure a user can cause is one line ---------------------------------------------------------------
def test_batch_larger_than_a_ranks_share(synthetic_store, tmp_path):
    done = recipe("--data", str(synthetic_store), "--out", str(tmp_path / "x"), "--batch-size", "100000")
    one_line_error(done, "--batch-size: 100000 × 1 rank(s) × 1 accumulated = 100,000 cells a step exceeds the "
                   "1,200 cells", "use --batch-size 1200 or less")


def test_port_in_use(synthetic_store, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = recipe(*recipe_args(synthetic_store, tmp_path / "x", 1), env={"MASTER_PORT": str(port)})
    one_line_error(done, f"MASTER_PORT={port}: port already in use")


def test_missing_model_and_unwritable_embedding_formats(trained, synthetic_store, tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope.safetensors"), str(synthetic_store), str(tmp_path / "e.parquet")]) == 2
    assert "nope.safetensors: no such model file" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), str(synthetic_store), str(tmp_path / "e.parquet")]) == 2
    assert "no model.safetensors in this folder" in capsys.readouterr().err
    assert main(["embed", str(trained), str(synthetic_store), str(tmp_path / "e.csv")]) == 2
    err = capsys.readouterr().err
    assert "e.csv: cannot write embeddings as '.csv'" in err and "Fix:" in err and not (tmp_path / "e.csv").exists()
    assert main(["embed", str(trained), str(synthetic_store), str(tmp_path / "e.parquet")]) == 0  # a run folder


# --- validation measures the same thing every time, over all ranks ----------------------------------------------
def val_losses(out: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if "val_loss" in line]


def test_validation_scores_the_same_cells_every_time_on_every_rank(synthetic_store, tmp_path):
    """With the weights frozen, every validation gives the same loss (same cells, same masks); and a deterministic
    objective's validation loss is the whole split's, however many ranks share it."""
    frozen = ["--lr", "1e-30", "--val-every", "2", "--val-batches", "100"]  # float32 weights do not move
    masked, one, two = tmp_path / "masked", tmp_path / "one", tmp_path / "two"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, masked, 4), *frozen])
    run([sys.executable, "recipes/reconstruction.py", *recipe_args(synthetic_store, one, 2), *frozen])
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "recipes/reconstruction.py",
         *recipe_args(synthetic_store, two, 2), *frozen])
    m = val_losses(masked)
    assert len(m) == 2 and m[0] == m[1]
    assert val_losses(two)[0] == pytest.approx(val_losses(one)[0], rel=1e-5)


def test_a_one_process_run_chooses_another_port_when_its_port_is_taken_meanwhile():
    """The port a one-process run picks is free when picked; another process can bind it before the group does."""
    script = """
import os, socket
from cellssl.engine import distributed
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
ports = iter([taken.getsockname()[1]])
real = distributed.free_port
distributed.free_port = lambda: next(ports, None) or real()
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
    os.environ.pop(key, None)
distributed.init_distributed()
assert int(os.environ["MASTER_PORT"]) != taken.getsockname()[1]
print("ok")
"""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=clean)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
