"""The process group a run trains in: defaults for a one-process run, DeepSpeed's init (NCCL on GPUs, gloo on
CPUs), the one-time build of DeepSpeed's CPU communication op announced before it starts (several ranks only: a
one-process run skips it, and the build is cached in TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), the timeout of every
collective, and the start-up verdicts all ranks agree on.

`python recipes/X.py` or `cellssl train X` is one process: it gets RANK 0 of WORLD_SIZE 1 and a free port, so
two runs on one machine do not collide. The deepspeed launcher and torchrun set the real values; under srun or
mpirun the local rank comes from SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK.

Two timeouts: the rendezvous waits CELLSSL_RENDEZVOUS_TIMEOUT (600 s: nodes of a job start at different times);
after it every process group, DeepSpeed's own included, waits `--collective-timeout` (300 s; torch's default is
30 minutes on gloo) in a collective, so a lost or stalled rank ends the launch promptly.
"""
from __future__ import annotations

import os
import re
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


RENDEZVOUS_SECONDS = int(os.environ.get("CELLSSL_RENDEZVOUS_TIMEOUT", "600"))


def _integer(key: str) -> int | None:
    text = os.environ.get(key)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{key}={text!r}", "is not an integer", "unset it, or launch with the deepspeed "
                         "launcher, which sets it") from None


LOCAL_RANK_KEYS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank(world: int) -> int:
    """This process's rank on its machine: LOCAL_RANK, else the launcher's own variable; refused when several ranks
    run and none says (every rank would take GPU 0 and act as its node's first)."""
    for key in LOCAL_RANK_KEYS:
        value = _integer(key)
        if value is not None:
            return value
    if world > 1:
        raise InputError("LOCAL_RANK", f"unset, but WORLD_SIZE is {world}: every rank would take the first GPU and "
                         "clean the node's files", "launch with deepspeed or torchrun (they set it), or export "
                         "LOCAL_RANK per process (srun and mpirun: SLURM_LOCALID / OMPI_COMM_WORLD_LOCAL_RANK are "
                         "read too)")
    return 0


def check_environment() -> tuple[int, int]:
    """(rank, world size) from the environment, refused up front when they cannot describe a job that will ever
    start: a rank outside the world, one of RANK/WORLD_SIZE without the other, several ranks but no address to meet
    at. A one-process run has neither (leftover values from another job's shell are the usual cause)."""
    rank, world, local = _integer("RANK"), _integer("WORLD_SIZE"), _integer("LOCAL_RANK")
    fix = ("for one process unset RANK, WORLD_SIZE and LOCAL_RANK; for several, start them with the deepspeed "
           "launcher (deepspeed --num_gpus N …)")
    if (rank is None) != (world is None):
        raise InputError("RANK/WORLD_SIZE", f"only {'RANK' if world is None else 'WORLD_SIZE'} is set", fix)
    rank, world = (0, 1) if rank is None else (rank, world)
    if world < 1 or not 0 <= rank < world or (local is not None and local < 0):
        raise InputError("RANK/WORLD_SIZE/LOCAL_RANK", f"rank {rank} of world size {world} (local rank {local}) "
                         "cannot exist", fix)
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise InputError("MASTER_ADDR", f"unset, but WORLD_SIZE is {world}: the ranks have nowhere to meet", fix)
    os.environ["LOCAL_RANK"] = str(local_rank(world))
    return rank, world


def init_distributed() -> tuple[int, int, torch.device]:
    """(global rank, world size, this rank's device), the process group initialised (once per process)."""
    rank, world = check_environment()
    chosen = "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ
    if chosen:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", str(rank)), ("WORLD_SIZE", str(world)), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    quiet_deepspeed()
    if not torch.distributed.is_initialized():
        if world > 1:
            announce_op_build(rank)
        if world > 1 and rank == 0:
            print(f"cellssl: waiting for {world} ranks at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                  f"(up to {RENDEZVOUS_SECONDS} s)", file=sys.stderr, flush=True)
        _init_group_on_a_free_port(world, chosen)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def _init_group_on_a_free_port(world: int, chosen: bool, tries: int = 3) -> None:
    """A port we chose ourselves was free when chosen; another process may take it before the group binds it (CI saw
    it once). Then choose again; a port the user or the launcher set is never changed."""
    for attempt in range(tries):
        try:
            return _init_group(world)
        except InputError as exc:
            if not chosen or "port already in use" not in str(exc) or attempt == tries - 1:
                raise
            os.environ["MASTER_PORT"] = str(free_port())


def _init_group(world: int) -> None:
    """DeepSpeed's process group; the rendezvous waits at most RENDEZVOUS_SECONDS (CELLSSL_RENDEZVOUS_TIMEOUT)."""
    import contextlib
    import datetime
    import io

    import deepspeed

    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if world == 1:  # one process talks to nobody: DeepSpeed's CPU shared-memory op would be built (minutes) for nothing
        import importlib

        # by module name: the package's attribute `deepspeed.comm.torch` is torch itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "… shm_comm_op built successfully" on every start
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       timeout=datetime.timedelta(seconds=RENDEZVOUS_SECONDS))
    except Exception as exc:  # torch raises several types; the message says which
        text = str(exc).lower()
        if "eaddrinuse" in text or "address already in use" in text:
            raise InputError(f"MASTER_PORT={os.environ['MASTER_PORT']}", "port already in use (another run?)",
                             "set MASTER_PORT (or the launcher's --master_port) to a free port") from None
        if "timed out" in text or "timeout" in text:
            raise InputError(f"rendezvous at {where}", f"not all {world} ranks arrived within {RENDEZVOUS_SECONDS} s",
                             "start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (the deepspeed "
                             "launcher does), or raise CELLSSL_RENDEZVOUS_TIMEOUT") from None
        raise


def set_collective_timeout(seconds: int) -> None:
    """Every process group, those that exist (DeepSpeed's) and those made later, waits at most `seconds` in a
    collective. DeepSpeed creates its groups without a timeout, so torch would give them its default (30 minutes on
    gloo): the default is replaced, as torchtitan does after its start-up."""
    import datetime

    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    c10d._get_default_timeout = lambda backend: timeout
    if torch.distributed.is_initialized():
        for group in list(c10d._world.pg_map):
            if not c10d._rank_not_in_group(group):
                c10d._set_pg_timeout(timeout, group)


def host() -> str:
    return socket.gethostname()


def gather(report: dict) -> list[dict]:
    """Every rank's `report` (small, picklable), in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [report]
    reports: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reports, report)
    return reports


def agree(problem: InputError | None) -> None:
    """A start-up check's verdict, agreed: if any rank found a problem, every rank raises it (the first rank's, naming
    that rank and its host), so no rank waits for one that has stopped."""
    reports = gather({"rank": int(os.environ.get("RANK", 0)), "host": host(),
                      "problem": None if problem is None else (problem.where, problem.problem, problem.fix)})
    found = [r for r in reports if r["problem"]]
    if not found:
        return
    first = found[0]
    where, what, fix = first["problem"]
    if len(reports) > 1:
        more = f", and {len(found) - 1} more rank(s)" if len(found) > 1 else ""
        what = f"{what} (rank {first['rank']} on {first['host']}{more})"
    raise InputError(where, what, fix)


LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe",
                "connection refused", "socket closed", "nccl error", "watchdog")


def lost_rank(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stalled (gloo and NCCL raise their own
    errors, with a peer address where they know it), or None when `exc` is something else."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    text = str(exc)
    dist_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(exc, dist_error) or any(m in text.lower() for m in LOST_MARKERS)):
        return None
    peer = re.search(r"\[([^\]\s]+)\]:\d+", text)
    what = "stalled" if "timed out" in text.lower() else "stopped"
    return (f"rank {torch.distributed.get_rank()} on {host()}: another rank of this launch {what}"
            + (f" (the one at {peer.group(1)})" if peer else "") + "; the launch ends here. Fix: look for that "
            "rank's own error (or the node that died), then run the same command with --resume: it continues from "
            "the last complete checkpoint on any number of ranks")
