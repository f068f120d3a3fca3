"""What the ranks of a launch check and decide together before they train: the store is the same on every rank, the
run folder is free and one folder for all, resident or streaming once for all. Every check runs after the rendezvous
and its verdict is agreed (distributed.agree): a problem on one rank ends every rank with the same one line, instead
of leaving the others waiting in a collective.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

from cellssl.loaders import CellStore, InputError
from cellssl.loaders.lock import FolderLock
from cellssl.loaders.resident import choose
from cellssl.loaders.synthetic import default_store

from . import rundir
from .config import TrainConfig
from .distributed import agree, gather, host

TOKEN_FILE = ".launch-token"  # rank 0's proof that every rank's --out is the folder it writes


@contextlib.contextmanager
def agreed():
    """Run a check on every rank; a user error in it (InputError) on any rank ends every rank with it."""
    problem = None
    try:
        yield
    except InputError as exc:
        problem = exc
    agree(problem)


def open_store(cfg: TrainConfig, rank: int) -> tuple[CellStore, dict]:
    """The training store and its full fingerprint (values included), the same on every rank: ranks given different
    stores (two nodes' copies that differ, a typo on one node) are refused, naming them."""
    with agreed():
        store = CellStore(cfg.data or default_store(progress=rank == 0))
        fingerprint = store.fingerprint(values=True)
    reports = gather({"rank": rank, "host": host(), "path": str(store.path), "fingerprint": fingerprint})
    first = reports[0]
    for other in reports[1:]:
        differs = [k for k in first["fingerprint"] if first["fingerprint"][k] != other["fingerprint"].get(k)]
        if differs:
            raise InputError(f"--data {other['path']}", f"rank {other['rank']} on {other['host']} opened another store "
                             f"than rank 0 on {first['host']} ({first['path']}): {differs[0]} differs",
                             "give every rank the same store: one on a shared filesystem, or identical copies "
                             "(rsync -a)")
    return store, fingerprint


LEVELS = ("off", "host", "device")


def decide_residence(want: str, store: CellStore, start: int, stop: int, device, reserve: int) -> tuple[str, str]:
    """Resident or streaming, once for all ranks (the cells of a step do not depend on it, its speed does): each
    rank's verdict counts the RAM shared with the ranks on its machine; where the ranks differ, all stream."""
    sharing = [r["host"] for r in gather({"host": host()})].count(host())
    with agreed():
        choice, reason = choose(want, store, start, stop, device, reserve, sharing)
    reports = gather({"host": host(), "choice": choice, "reason": reason})
    if len({r["choice"] for r in reports}) == 1:
        return choice, reason + (f" (every one of {len(reports)} ranks)" if len(reports) > 1 else "")
    said = "; ".join(f"rank {i} on {r['host']}: {r['choice']}" for i, r in enumerate(reports))
    return "off", f"streaming from disk on every rank: the ranks could not all hold the split alike ({said})"


def prepare_folder(cfg: TrainConfig, rank: int, world: int) -> FolderLock | None:
    """Rank 0 checks the run folder (free, or --resume / --overwrite as asked, the config a resume continues),
    takes its lock and leaves a token; every rank then reads the token: a folder that is not shared (node-local
    --out) is refused before anything is written, as a resume would need the checkpoints on every rank."""
    out, lock, token = Path(cfg.out), None, None
    try:
        with agreed():
            if rank == 0:
                rundir.check_start(cfg)
                if cfg.resume:  # before DeepSpeed loads anything: another architecture is one line
                    rundir.check_config(cfg, rundir.trained_config(out), out)
                out.mkdir(parents=True, exist_ok=True)
                lock = FolderLock(out / rundir.LOCK_FILE, "a training run").acquire()
                rundir.check_no_links(out)
                token = f"{uuid.uuid4().hex} {time.time()}"
                (out / TOKEN_FILE).write_text(token)
        if world > 1:
            first = gather({"token": token, "host": host()})[0]
            with agreed():
                mine = (out / TOKEN_FILE).read_text() if (out / TOKEN_FILE).is_file() else None
                if mine != first["token"]:
                    raise InputError(f"--out {out}", f"is not the folder rank 0 on {first['host']} writes (no "
                                     "token of this launch in it here)", "put --out on a filesystem every node "
                                     "shares: the checkpoints of every rank must be there for a resume")
    except InputError:
        if lock is not None:
            lock.release()
        raise
    return lock
