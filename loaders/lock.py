"""One writer per folder: an exclusive OS lock (flock) on a lock file, held while a run, an evaluation or a conversion
writes. The lock belongs to the open file, so it dies with its process: a `kill -9` leaves nothing that blocks the
next writer. The file holds the holder's pid, which the refusal names; it is removed on release.

Removing a lock file safely: after taking the lock, the holder checks that the path still names the file it locked
(another process may have removed it and made a new one in between) and otherwise tries again. Never imports engine
or kernels.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import InputError


def _filesystem(folder: Path) -> str:
    """The mount holding `folder` and its type, from /proc/mounts where there is one."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(Path(folder).resolve())
    best = max((m for m in mounts if target == m[0] or target.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return f"{best[1]} at {best[0]}" if best else "unknown"


class FolderLock:
    """`with FolderLock(folder / ".lock", what):` — one writer of `folder` at a time; another is refused at once."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise InputError(self.path, f"cannot create the lock file ({exc.strerror})",
                                 "write somewhere you may create files, or remove the link in the way") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise InputError(self.path.parent, f"is being written by process {holder} ({self.what})",
                                 "wait for it to finish or stop it (its lock ends with it), or choose another "
                                 "folder") from None
            except OSError as exc:  # ENOLCK: NFS without a lock manager; EINVAL/ENOSYS: no flock at all
                os.close(fd)
                raise InputError(self.path.parent, f"its filesystem ({_filesystem(self.path.parent)}) refuses file "
                                 f"locks ({exc.strerror})", "write the run to a filesystem with locking (for NFS: "
                                 "run its lock manager, or mount without 'nolock'), or to a local folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # the file was replaced between open and lock: lock the new one

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
