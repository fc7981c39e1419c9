"""Atomic output: write to a temporary file beside the target, fsync, then ``os.replace``.

A reader (or a crash, or Ctrl-C) sees either the old file or the complete new one, never a
half-written file, and no temporary file is left behind on error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UsageError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target``."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{target}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    try:
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    try:
        with atomic_path(target) as tmp:
            writer(tmp)
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None
