"""Atomic file writes: a temporary file in the target's directory, fsync, then ``os.replace``. A reader
sees the old file or the new one, never a part; an interrupted write leaves at most a ``.<name>.*.tmp`` file,
which :func:`remove_stale_temporaries` clears."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(f: IO[Any]) -> None:
        f.write(text)

    atomic_write(path, write, binary=False)


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` of ``directory/name`` left; return them.
    Call it only while no other process writes there (under the directory's lock)."""
    removed = []
    for p in Path(directory).glob(f".{name}.*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


__all__ = ["atomic_write", "atomic_write_text", "remove_stale_temporaries"]
