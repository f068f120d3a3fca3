"""A run is the same experiment on any number of ranks (gloo, CPU ranks): for every objective with its default
settings, 2 ranks × B, 1 rank × 2B and (where the loss is a sum over cells) 1 rank × B with accumulation 2 (and
validation in chunks of 8 cells) see the same cells in every step, and their losses, validation losses and final weights agree; a checkpoint resumes on 2, 1 or 4
ranks (deepspeed and torchrun launches) and continues the uninterrupted run's trajectory. The launches train every
objective one after another (tests/multirank.py), so the whole comparison costs four launches and four resumes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import BIN, ROOT, free_port, losses, run

STEPS = "3"
PRE = "mae_random"  # trained first in every launch; the 1-rank one's model starts fine-tuning everywhere
OBJECTIVES = ["mae_random", "mae_gene_program", "mae_gp_to_tf", "byol", "barlow_twins", "supervised", "finetune"]
SUMS = ["mae_random", "mae_gene_program", "mae_gp_to_tf", "supervised", "finetune"]  # accumulation allowed


def _names(names, root: Path, *extra: str):
    pre = root / "one" / PRE / "model.safetensors"
    return [":".join([n, ",".join([*extra, *(["--init-encoder", str(pre)] if n == "finetune" else [])])])
            for n in names]


def _launch(ranks: int, *args, launcher: str = "deepspeed"):
    if ranks == 1:
        cmd = [sys.executable, "tests/multirank.py"]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
               "tests/multirank.py"]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "tests/multirank.py"]
    return run([*cmd, *map(str, args)])


@pytest.fixture(scope="module")
def runs(synthetic_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    _launch(1, synthetic_store, root / "one", 64, 1, STEPS, *_names(OBJECTIVES, root))
    _launch(2, synthetic_store, root / "two", 32, 1, STEPS, *_names(OBJECTIVES, root))
    # with validation in chunks of 8 cells: where the loss is a sum over cells, the chunks change no score
    _launch(1, synthetic_store, root / "acc", 32, 2, STEPS, *_names(SUMS, root, "--val-batch-size", "8"))
    return root


def _trace(out: Path) -> dict[int, tuple[set, float]]:
    """{step: (cells over every rank, weight checksum)} from the ranks' trace files."""
    steps: dict[int, tuple[set, float]] = {}
    for path in sorted(out.glob("trace-rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            cells, _ = steps.get(r["step"], (set(), 0.0))
            steps[r["step"]] = (cells | set(r["cells"]), r["weight_sum"])
    return steps


def _val(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def _close(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b), (a, b)
    for k in a:
        assert abs(a[k] - b[k]) <= rtol * abs(b[k]) + 1e-12, (k, a[k], b[k])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "model-last.safetensors" if (out / "model-last.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


# BYOL trains with Adam at lr 1e-2, whose first steps move each weight by ±lr (the sign of its gradient): gradients
# that cancel to ~0 take their sign from float rounding, which splitting the batch changes (the sums run in another
# order), and a few flipped steps grow over three steps. Its losses agree to ~1e-6, its validation loss to ~1e-3 and
# the most affected tensor (a first-layer bias) to ~2 %: the bounds for it are those (measured, docs/multinode.md).
WEIGHTS, VAL = {"byol": 0.05}, {"byol": 3e-3}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_two_ranks_train_like_one_rank_with_twice_the_batch(runs, name):
    one, others = runs / "one" / name, [runs / "two" / name] + ([runs / "acc" / name] if name in SUMS else [])
    for other in others:
        a, b = _trace(one), _trace(other)
        assert {s: c for s, (c, _) in a.items()} == {s: c for s, (c, _) in b.items()}, other  # the same cells
        _close(losses(other), losses(one), 1e-4)
        _close(_val(other), _val(one), VAL.get(name, 1e-4))
        mine, theirs = _weights(one), _weights(other)
        assert mine.keys() == theirs.keys()
        for key in mine:
            if not mine[key].dtype.is_floating_point:  # BatchNorm's step counter
                assert torch.equal(mine[key], theirs[key]), key
                continue
            diff = float((mine[key] - theirs[key]).norm() / mine[key].norm().clamp(min=1e-12))
            assert diff <= WEIGHTS.get(name, 1e-3), (other, key, diff)


@pytest.fixture(scope="module")
def straight(runs, synthetic_store):
    _launch(1, synthetic_store, runs / "straight", 64, 1, 6, PRE)
    return losses(runs / "straight" / PRE)


@pytest.mark.parametrize("source,ranks,batch,launcher", [("two", 2, 32, "deepspeed"), ("two", 1, 64, "deepspeed"),
                                                          ("one", 2, 32, "torchrun"), ("two", 4, 16, "torchrun")])
def test_a_checkpoint_resumes_on_any_number_of_ranks(runs, straight, synthetic_store, source, ranks, batch, launcher):
    """A run checkpointed at step 3 on 1 or 2 ranks continues on 2, 1 or 4 ranks along the uninterrupted run's
    losses; the log and the traces hold each step once."""
    target = runs / f"resume-{source}-{ranks}"
    shutil.copytree(runs / source / PRE, target / PRE)
    _launch(ranks, synthetic_store, target, batch, 1, 6, f"{PRE}:--resume", launcher=launcher)
    resumed = losses(target / PRE)
    _close(resumed, straight, 1e-4)
    steps = [json.loads(line)["step"] for line in (target / PRE / "trace-rank0.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] or steps == [4, 5, 6], steps


def test_another_global_batch_is_refused_on_resume(runs, synthetic_store):
    target = runs / "resume-other-batch"
    shutil.copytree(runs / "two" / PRE, target / PRE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "tests/multirank.py", str(synthetic_store), str(target), "32", "1", "6",
                           f"{PRE}:--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 2 and "global_batch=64, this launch 32" in done.stderr
    assert "Traceback" not in done.stderr
