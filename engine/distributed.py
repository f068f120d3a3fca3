"""The process group a run trains in: defaults for a one-process run, DeepSpeed's init (NCCL on GPUs, gloo on
CPUs), and the one-time build of DeepSpeed's CPU communication op announced before it starts.

`python recipes/X.py` or `cellssl train X` is one process: it gets RANK 0 of WORLD_SIZE 1 and a free port, so
two runs on one machine do not collide. The deepspeed launcher sets the real values.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from cellssl.loaders import InputError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def announce_op_build(rank: int) -> None:
    """DeepSpeed compiles its CPU communication op the first time it runs on a machine, and again when DeepSpeed's
    sources are newer than the build (an upgrade): 1–3 minutes, silently. Say so before it starts."""
    if torch.cuda.is_available() or rank != 0:
        return
    import importlib.util

    from torch.utils.cpp_extension import _get_build_directory

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return
    sources = [p for p in (Path(spec.origin).parent / "ops" / "csrc" / "cpu" / "comm").rglob("*") if p.is_file()]
    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so"
    if not built.exists():
        what = "building DeepSpeed's CPU communication op once"
    elif sources and max(p.stat().st_mtime for p in sources) > built.stat().st_mtime:
        what = "rebuilding DeepSpeed's CPU communication op (DeepSpeed changed since it was built)"
    else:
        return
    print(f"cellssl: {what} (1–3 minutes; cached in {built.parent})", file=sys.stderr, flush=True)


def quiet_deepspeed() -> None:
    """Before DeepSpeed is imported: on a machine without CUDA, name its CPU accelerator, so that it does not warn
    that it found no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """(global rank, world size, this rank's device), the process group initialised (once per process)."""
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    quiet_deepspeed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not torch.distributed.is_initialized():
        announce_op_build(rank)
        _init_group()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def _init_group() -> None:
    import contextlib
    import io

    import deepspeed

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "… shm_comm_op built successfully" on every start
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    except Exception as exc:  # torch raises several types; the message says which port
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise InputError(f"MASTER_PORT={os.environ['MASTER_PORT']}", "port already in use (another run?)",
                             "set MASTER_PORT (or the launcher's --master_port) to a free port") from None
        raise
