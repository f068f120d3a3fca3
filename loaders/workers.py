"""Worker processes for the conversion's passes: tasks run in spawned processes (never forked: the parent's
libraries run threads), started once per conversion and reused by every pass; their progress ticks reach one bar, a
task's exception reaches the caller as itself, and an interruption stops everything at once.

Ctrl-C reaches every process of the terminal's group; the workers ignore it and the parent, which turns it (and
SIGTERM) into KeyboardInterrupt, terminates them: an interrupted conversion ends in one line, its temporary files
removed by the caller's cleanup, whatever pass it was in. A parent killed outright (kill -9) takes its workers with
it: each asks the kernel for SIGKILL when its parent dies (Linux's parent-death signal). A worker that dies is one
line naming it, never a BrokenProcessPool traceback. Never imports engine or kernels.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Iterable


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a batch job's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _quiet_worker(parent: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, and terminates us
    _die_with_parent(parent)


def _die_with_parent(parent: int | None) -> None:
    """SIGKILL this process when the process that started it dies (Linux); if it died already, exit now."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's cleanup still terminates us on any exit but kill -9
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


class Workers:
    """`with Workers(n) as workers: workers.run(fn, tasks, tick)`; with n == 1 tasks run in this process."""

    def __init__(self, n: int):
        self.n, self.pool, self.manager = max(1, n), None, None

    def __enter__(self) -> "Workers":
        if self.n > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing.managers import SyncManager

            context = multiprocessing.get_context("spawn")
            self.manager = SyncManager(ctx=context)
            self.manager.start(_quiet_worker, (os.getpid(),))
            self.pool = ProcessPoolExecutor(self.n, mp_context=context, initializer=_quiet_worker,
                                            initargs=(os.getpid(),))
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.pool is not None:
            if exc is not None:  # an interruption or a failed task: nothing may keep writing
                for process in list(getattr(self.pool, "_processes", {}).values()):
                    process.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.manager.shutdown()

    def run(self, fn: Callable, tasks: Iterable[tuple], tick: Callable[[int], None]) -> list:
        """[fn(*task, ticks) for task in tasks], in task order; `ticks.put(n)` in a task advances `tick`."""
        tasks = list(tasks)
        if self.pool is None or len(tasks) <= 1:
            return [fn(*task, _Ticks(tick)) for task in tasks]
        ticks = self.manager.Queue()
        futures = [self.pool.submit(fn, *task, ticks) for task in tasks]
        while not all(f.done() for f in futures):
            _drain(ticks, tick, timeout=0.2)
        _drain(ticks, tick)
        from concurrent.futures.process import BrokenProcessPool

        try:
            return [f.result() for f in futures]  # re-raises a task's exception as itself
        except BrokenProcessPool:
            from .errors import InputError

            raise InputError("conversion worker", "a worker process died (killed, or out of memory)",
                             "run the conversion again (with fewer --workers if memory is short); nothing partial "
                             "was kept") from None


def _drain(ticks, tick: Callable[[int], None], timeout: float | None = None) -> None:
    try:
        tick(ticks.get(timeout=timeout) if timeout else ticks.get_nowait())
        while True:
            tick(ticks.get_nowait())
    except Exception:  # queue.Empty through the manager's proxy
        pass


class _Ticks:
    """The queue interface of `ticks` for tasks run in this process."""

    def __init__(self, tick: Callable[[int], None]):
        self.put = tick
