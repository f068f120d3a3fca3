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
    """DeepSpeed compiles its CPU communication op the first time it runs on a machine (1–3 minutes, silently):
    say so before it starts."""
    if torch.cuda.is_available() or rank != 0:
        return
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    if not any(root.rglob("deepspeed_shm_comm*.so")):
        print(f"cellssl: building DeepSpeed's CPU communication op once (1–3 minutes; cached in {root})",
              file=sys.stderr, flush=True)


def init_distributed() -> tuple[int, int, torch.device]:
    """(global rank, world size, this rank's device), the process group initialised (once per process)."""
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not torch.distributed.is_initialized():
        announce_op_build(rank)
        _init_group()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def _init_group() -> None:
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    except Exception as exc:  # torch raises several types; the message says which port
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise InputError(f"MASTER_PORT={os.environ['MASTER_PORT']}", "port already in use (another run?)",
                             "set MASTER_PORT (or the launcher's --master_port) to a free port") from None
        raise
