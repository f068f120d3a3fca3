"""The loaders' error types: each names the file, the problem and the fix, so a user never debugs a traceback."""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input to a conversion or a gene alignment: `where` (file or field), `problem`, `fix`."""

    def __init__(self, where: str | Path, problem: str, fix: str | None = None):
        self.where, self.problem, self.fix = str(where), problem, fix
        super().__init__(f"{where}: {problem}" + (f". Fix: {fix}" if fix else ""))

    def __reduce__(self):
        """Rebuilt from its three parts: raised in a worker process, it reaches the parent as itself."""
        return type(self), (self.where, self.problem, self.fix)


class CellStoreError(InputError):
    """A store that is missing, corrupt, of another format or version, or inconsistent."""
