"""Worker processes for the conversion's passes: tasks run in spawned processes (never forked: the parent's
libraries run threads), started once per conversion and reused by every pass; their progress ticks reach one bar, a
task's exception reaches the caller as itself, and an interruption stops everything at once.

Ctrl-C reaches every process of the terminal's group; the workers ignore it and the parent, which turns it (and
SIGTERM) into KeyboardInterrupt, terminates them: an interrupted conversion ends in one line, its temporary files
removed by the caller's cleanup, whatever pass it was in. Never imports engine or kernels.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Iterable


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a batch job's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, and terminates us


class Workers:
    """`with Workers(n) as workers: workers.run(fn, tasks, tick)`; with n == 1 tasks run in this process."""

    def __init__(self, n: int):
        self.n, self.pool, self.manager = max(1, n), None, None

    def __enter__(self) -> "Workers":
        if self.n > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            self.manager = context.Manager()
            self.pool = ProcessPoolExecutor(self.n, mp_context=context, initializer=_quiet_worker)
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
        return [f.result() for f in futures]  # re-raises a task's exception as itself


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
