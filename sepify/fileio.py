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


TWO_GB = 2**31 - 1


def refuse_overwrite(output: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """The input model is never modified: refuse an output path that is the input file."""
    if source is not None and Path(output).resolve() == Path(source).resolve():
        raise UsageError(f"{output}: the output path is the input model; refusing to overwrite it")


def has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def save_model(model, target: str | os.PathLike, external_data: bool = False) -> None:
    """Write an ONNX model atomically. With ``external_data`` (or when the model is too large
    for one protobuf) the weights go to ``<target>.data`` beside it; both files are written to
    temporary names first and renamed into place, the data file first."""
    import shutil

    import onnx

    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{target}: folder {folder} does not exist")
    if not external_data:
        try:
            size = model.ByteSize()
        except Exception:  # noqa: BLE001 - protobuf refuses to size > 2 GB messages
            size = TWO_GB
        external_data = size >= TWO_GB - 2**20
    if not external_data:
        write_bytes(target, model.SerializeToString())
        return
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    data_name = target.name + ".data"
    try:
        onnx.save_model(model, str(tmpdir / target.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, folder / data_name)
        os.replace(tmpdir / target.name, target)
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
