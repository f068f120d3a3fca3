"""Multi-rank runs that survive (gloo, CPU ranks; a two-"node" --no_ssh launch on localhost): a lost or stalled rank
ends the launch promptly with one line on the survivors, a NaN on one rank stops every rank, a broken `latest`
falls back to the newest complete checkpoint, and launches that cannot work (a node-local --out, another store on
one node, no LOCAL_RANK) are refused in one line before anything trains."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_trainer import BIN, ROOT, free_port, losses, recipe_args, run

from cellssl.loaders import InputError


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, **extra}


def _nodes(store, outs, *extra, port=None, timeout="300"):
    """Start a two-"node" launch (two deepspeed launchers with --no_ssh on localhost, one rank each); `outs`: each
    node's --out. Returns the two launcher processes, in their own process groups."""
    port = port or free_port()
    hostfile = Path(outs[0]).parent / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    procs = []
    for node, (data, out) in enumerate(zip(store if isinstance(store, list) else [store, store], outs)):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "recipes/mae_random.py",
               *recipe_args(data, out, 1000), "--checkpoint-every", "2", "--collective-timeout", timeout, *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(), start_new_session=True))
    return procs


def _wait(procs, seconds: float) -> list[str]:
    """Wait for every process to end (within `seconds`, else the test fails); their outputs."""
    deadline = time.monotonic() + seconds
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            raise AssertionError(f"a process of the launch was still running after {seconds} s")
        outputs.append(out)
    return outputs


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(launcher.pid).children(recursive=True) if "mae_random" in " ".join(c.cmdline())]


def _until_checkpoint(out: Path, procs, seconds=300) -> None:
    deadline = time.monotonic() + seconds
    while not (out / "checkpoints" / "latest").is_file():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                _kill_group(p)
            raise AssertionError("no checkpoint came: " + "".join(p.communicate()[0][-2000:] for p in procs))
        time.sleep(0.5)


def _resume_finishes(store, out: Path) -> None:
    steps = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "config.json").read_text())
    assert steps  # the checkpoint's config record is there
    run([sys.executable, "recipes/mae_random.py", *recipe_args(store, out, 6), "--batch-size", "256", "--resume"])
    assert sorted(losses(out))[-1] == 6


def test_killing_one_node_ends_the_other_in_one_line_and_resume_continues(synthetic_store, tmp_path):
    out = tmp_path / "run"
    procs = _nodes(synthetic_store, [out, out])
    _until_checkpoint(out, procs)
    started = time.monotonic()
    _kill_group(procs[1])  # the whole second "node": its launcher and its rank
    outputs = _wait(procs, 60)
    assert time.monotonic() - started < 60
    survivor = outputs[0]
    assert "cellssl: error: rank 0 on" in survivor and "another rank of this launch stopped" in survivor
    assert "Traceback" not in survivor and procs[0].returncode != 0
    _resume_finishes(synthetic_store, out)  # on one rank: the same global batch (2 × 128 = 256)


def test_killing_one_rank_ends_the_launch(synthetic_store, tmp_path):
    out = tmp_path / "run"
    launcher = subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                                 "recipes/mae_random.py", *recipe_args(synthetic_store, out, 1000),
                                 "--checkpoint-every", "2", "--collective-timeout", "30"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)
    _until_checkpoint(out, [launcher])
    victim = [w for w in _workers(launcher) if "--local_rank=1" in " ".join(w.cmdline())]
    assert victim, [w.cmdline() for w in _workers(launcher)]
    victim[0].kill()
    started = time.monotonic()
    (output,) = _wait([launcher], 60)
    assert time.monotonic() - started < 60 and launcher.returncode != 0
    assert "Traceback" not in output  # the launcher ends the survivor (SIGTERM): it says nothing
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    _resume_finishes(synthetic_store, out)


def test_a_stalled_rank_ends_the_launch_within_the_timeout(synthetic_store, tmp_path):
    out = tmp_path / "run"
    procs = _nodes(synthetic_store, [out, out], timeout="15")
    _until_checkpoint(out, procs)
    stalled = _workers(procs[1])
    for w in stalled:
        w.suspend()  # SIGSTOP
    try:
        started = time.monotonic()
        (survivor,) = _wait(procs[:1], 60)
        assert time.monotonic() - started < 60
        assert "another rank of this launch stalled" in survivor and "Traceback" not in survivor
    finally:
        for w in stalled:
            w.resume()
        _kill_group(procs[1])


def test_a_nan_on_one_rank_stops_every_rank_in_one_line(synthetic_store, tmp_path):
    done = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                           "tests/nan_rank.py", "1", "2", "mae_random", *recipe_args(synthetic_store, tmp_path / "r", 5)],
                          cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in text
    assert text.count("cellssl: error:") == 2, text[-3000:]  # every rank, one line each
    assert "loss is nan at step 3" in text and "another rank's loss is not finite at step 3" in text


def test_a_node_local_out_and_another_store_on_one_node_are_refused(synthetic_store, tmp_path):
    from cellssl.loaders.synth import synth

    procs = _nodes(synthetic_store, [tmp_path / "a", tmp_path / "b"])
    outputs = _wait(procs, 300)
    for text in outputs:
        assert "is not the folder rank 0 on" in text and "shares" in text and "Traceback" not in text, text[-3000:]
    other = synth(tmp_path / "other.cellstore", 1500, seed=1, progress=False)
    procs = _nodes([synthetic_store, other], [tmp_path / "c", tmp_path / "c"])
    outputs = _wait(procs, 300)
    for text in outputs:
        assert "rank 1 on" in text and "opened another store than rank 0" in text and "Traceback" not in text


def test_several_ranks_without_local_rank_are_refused(synthetic_store, tmp_path):
    done = subprocess.run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, tmp_path / "r", 2)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert done.returncode == 2 and "LOCAL_RANK: unset, but WORLD_SIZE is 2" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(synthetic_store, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, straight, 6)])
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 4), "--checkpoint-every", "2"])
    (out / "checkpoints" / "latest").write_text("")  # a crash while it was written
    (out / "checkpoints" / "step00000004" / ".complete").unlink()  # and the newest folder incomplete
    run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 6), "--resume"])
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6)


def test_the_csv_monitor_survives_overwrite(synthetic_store, tmp_path):
    out = tmp_path / "run"
    for extra in ([], ["--overwrite"]):
        run([sys.executable, "recipes/mae_random.py", *recipe_args(synthetic_store, out, 2), "--monitor", "csv",
             *extra])
    assert list((out / "csv_monitor").rglob("*.csv"))


def test_a_filesystem_without_locks_is_one_line(tmp_path, monkeypatch):
    import fcntl

    from cellssl.loaders.lock import FolderLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(InputError, match=r"its filesystem \(.*\) refuses file locks \(No locks available\).*Fix"):
        FolderLock(tmp_path / ".lock", "a training run").acquire()
