"""Conversion worker processes: a worker's error reaches the parent as the same one line; a dead worker is one
line naming it; workers die with a parent killed outright (kill -9)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import workers_task

from cellssl.loaders.errors import CellStoreError, InputError
from cellssl.loaders.workers import Workers

HERE = Path(__file__).resolve().parent


def test_an_error_raised_in_a_worker_reaches_the_parent_as_itself():
    with pytest.raises(CellStoreError) as caught:
        with Workers(2) as workers:
            workers.run(workers_task.refuse, [(0,), (1,), (2,)], lambda n: None)
    assert str(caught.value) == ("h5ad X/indices: gene column 19355 outside [0, 19350) at cell 701. Fix: reconvert "
                                 "the source")


def test_a_dead_worker_is_one_line():
    with pytest.raises(InputError, match="conversion worker: a worker process died"):
        with Workers(2) as workers:
            workers.run(workers_task.die, [(0,), (1,), (2,)], lambda n: None)


def test_workers_die_with_a_parent_killed_outright():
    script = ("import sys; sys.path.insert(0, %r)\nimport workers_task\nfrom cellssl.loaders.workers import Workers\n"
              "with Workers(2) as w:\n    w.run(workers_task.sleep, [(0,), (1,)], lambda n: None)\n") % str(HERE)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(parent.pid).children(recursive=True)) < 3:  # the manager and two workers
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        children = psutil.Process(parent.pid).children(recursive=True)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        parent.kill()
