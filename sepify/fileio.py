"""Atomic output: write to a temporary file beside the target, fsync, then ``os.replace``.

A reader (or a crash, or Ctrl-C) sees either the old file or the complete new one, never a
half-written file, and no temporary file is left behind on error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UsageError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", inputs: "Inputs | None" = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target``.

    ``inputs``: the files the command reads; a target that is one of them is refused
    (:meth:`Inputs.refuse`). The file gets the mode a new file gets under the umask (0644 under
    022), or the mode of the file it replaces."""
    target = Path(target)
    if inputs is not None:
        inputs.refuse(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{target}: folder {folder} does not exist")
    tmp_path = _new_temp(folder, f".{target.name}.", suffix + ".tmp")
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            keep_mode(f.fileno(), target)
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _new_temp(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file with a fresh name in ``folder``, with the mode the umask gives a new
    file (``tempfile.mkstemp`` would make it 0600 whatever the umask)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name in {folder}")


def keep_mode(fd: int, target: Path) -> None:
    """Give the open file ``fd`` the permission bits of the existing file ``target`` (an
    overwritten file keeps its mode); a new target keeps the umask's mode."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return
    os.fchmod(fd, mode)


def write_text(target: str | os.PathLike, text: str, inputs: "Inputs | None" = None) -> None:
    write_bytes(target, text.encode("utf-8"), inputs)


def write_bytes(target: str | os.PathLike, data: bytes, inputs: "Inputs | None" = None) -> None:
    try:
        with atomic_path(target, inputs=inputs) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None


def write_with(target: str | os.PathLike, writer: Callable[[Path], None], inputs: "Inputs | None" = None) -> None:
    try:
        with atomic_path(target, inputs=inputs) as tmp:
            writer(tmp)
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None


TWO_GB = 2**31 - 1


class Inputs:
    """The files a command reads — models and their external-data files, baselines, config
    files, inputs files. No output may land on one of them: :meth:`refuse` is the one check
    every writer runs (``-o``, ``--report``, ``--junit``, a rewritten model and its data file).

    Files are compared as files (device and inode: the same path spelled differently, a
    symbolic link, a hard link), not as strings. A target that does not exist yet cannot be an
    input, so the external-data files of a model are listed only when a target exists."""

    def __init__(self) -> None:
        self._files: list[tuple[str, str]] = []   # (path, role)
        self._models: list[tuple[str, str]] = []  # models whose external-data files count too
        self._expanded = False

    def add(self, path: str | os.PathLike | None, role: str) -> "Inputs":
        if path is not None and os.fspath(path) not in ("", "-"):
            self._files.append((os.fspath(path), role))
        return self

    def add_model(self, path: str | os.PathLike | None, role: str = "the input model") -> "Inputs":
        """A model file: the file itself and the external-data files it references."""
        if path is not None:
            self.add(path, role)
            self._models.append((os.fspath(path), role))
        return self

    def files(self) -> list[tuple[str, str]]:
        if not self._expanded:
            self._expanded = True
            for path, role in self._models:
                for data in external_data_files(path):
                    self._files.append((str(data), f"an external-data file of {role} {path}"))
        return list(self._files)

    def find(self, target: str | os.PathLike) -> tuple[str, str] | None:
        """The input (path, role) that ``target`` is, or None."""
        try:
            st = os.stat(target)
        except OSError:
            return None  # not there (or unreachable): it is no input of this command
        for path, role in self.files():
            try:
                if os.path.samestat(st, os.stat(path)):
                    return path, role
            except OSError:
                continue
        return None

    def refuse(self, target: str | os.PathLike, what: str | None = None) -> None:
        """Raise :class:`UsageError` (exit 2, one line) when ``target`` is one of the inputs."""
        hit = self.find(target)
        if hit is not None:
            path, role = hit
            same = "" if os.path.abspath(path) == os.path.abspath(target) else f" ({path})"
            raise UsageError(f"{target}: {what + ' ' if what else ''}is {role}{same}; refusing to overwrite an input")


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file references (none if it is not a readable model)."""
    path = Path(model_path)
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:
        return []
    if b"location" not in data:
        return []
    from onnx import ModelProto, TensorProto

    model = ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - not a model (an analyze JSON, say): it references nothing
        return []
    out: list[Path] = []
    for t, _ in _tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and (path.parent / loc) not in out:
                out.append(path.parent / loc)
    return out


def refuse_overwrite(output: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """The input model is never modified: refuse an output path that is the input model or one
    of its external-data files (compared as files; see :class:`Inputs`)."""
    Inputs().add_model(source).refuse(output)


def has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def save_model(model, target: str | os.PathLike, external_data: bool = False,
               source: str | os.PathLike | None = None, inputs: Inputs | None = None) -> bool:
    """Write an ONNX model atomically; return whether it was written with external data.

    With ``external_data`` (or when the model is too large for one protobuf, or still references
    external data files) the weights go to ``<target>.data`` (or ``<target>.alt.data``, see
    :func:`_data_names`) beside it; both files are written
    to temporary names first and renamed into place, the data file first. Tensors that
    reference external data (a rewrite leaves the weights it does not change on disk) are
    copied from their files in the folder of ``source`` (the model file they came from) in
    chunks, never loaded whole. ``model`` itself is not modified: the file's header is a copy
    whose moved tensors hold no bytes.

    ``inputs`` (default: ``source`` and its data files): neither the model file nor its data
    file may be one of them (:meth:`Inputs.refuse`); a data file name that is an input is not
    chosen. Files get the umask's mode, or the mode of the file they replace."""
    import shutil

    target = Path(target)
    if inputs is None:
        inputs = Inputs().add_model(source)
    inputs.refuse(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{target}: folder {folder} does not exist")
    from onnx import TensorProto

    external_data = external_data or any(t.data_location == TensorProto.EXTERNAL for t, _ in _tensors(model))
    if not external_data:
        try:
            size = model.ByteSize()
        except Exception:  # noqa: BLE001 - protobuf refuses to size > 2 GB messages
            size = TWO_GB
        external_data = size >= TWO_GB - 2**20
    if not external_data:
        write_bytes(target, model.SerializeToString(), inputs)
        return False
    src = Path(source) if source is not None else None
    data_name, stale = _data_names(model, target, src, inputs)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    try:
        with open(tmpdir / data_name, "wb") as data:  # (open() applies the umask; mkdtemp's 0700 is the folder's)
            moved = _write_data(model, data, src)
            data.flush()
            keep_mode(data.fileno(), folder / data_name)
            os.fsync(data.fileno())
        header = _header(model, moved, data_name)
        with open(tmpdir / target.name, "wb") as f:
            f.write(header.SerializeToString())
            f.flush()
            keep_mode(f.fileno(), target)
            os.fsync(f.fileno())
        if moved:  # a name the previous model does not reference: the previous pair stays whole
            os.replace(tmpdir / data_name, folder / data_name)
        os.replace(tmpdir / target.name, target)  # the commit point
        if stale is not None:  # the previous output's data file, now referenced by nothing
            with contextlib.suppress(OSError):
                stale.unlink()
    except OSError as e:
        raise UsageError(f"{target}: cannot write: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return True


def _data_names(model, target: Path, source: Path | None, inputs: Inputs) -> tuple[str, Path | None]:
    """The data file name for a new ``target`` and the previous output's data file to remove
    after the commit. The two names ``<target>.data`` and ``<target>.alt.data`` alternate, so the
    new data file never replaces the one the previous ``target`` reads (an interruption between
    the two renames would pair the old model with new data). A name that is an input of the
    command (a data file of the source model, say) is never chosen nor removed."""
    folder = target.parent if str(target.parent) else Path(".")
    names = (target.name + ".data", target.name + ".alt.data")
    protected = {n for n in names if inputs.find(folder / n) is not None}
    in_use = _referenced_data(target)
    choices = [n for n in names if n not in protected]
    if not choices:
        path, role = inputs.find(folder / names[0])
        raise UsageError(f"{target}: both data file names {names[0]} and {names[1]} are inputs "
                         f"({names[0]} is {role}); refusing to overwrite an input")
    fresh = [n for n in choices if n not in in_use] or choices
    name = fresh[0]
    old = [n for n in names if n != name and n in in_use and n not in protected]
    return name, (folder / old[0]) if old else None


def _referenced_data(model_path: Path) -> set[str]:
    """External data locations the existing file at ``model_path`` reads (none if unreadable)."""
    if not model_path.is_file():
        return set()
    try:
        import onnx

        header = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model (e.g. some other file): references nothing
        return set()
    from onnx import TensorProto

    return {e.value for t, _ in _tensors(header) if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


_INLINE_BELOW = 1024  # in-memory initializers smaller than this stay in the model file (as onnx.save_model)
_ALIGN_FROM, _ALIGN = 2**20, 2**16  # tensors of 1 MiB or more start on a 64 KiB boundary (mappable)
_COPY_CHUNK = 16 * 2**20  # bytes copied at a time from a source data file


def _tensors(model):
    """Every tensor of the model, in a fixed order, with whether it is an initializer: the
    initializers and sparse initializers of every graph and the tensors of node attributes
    (subgraphs and model-local functions included)."""
    from onnx import AttributeProto as A

    def from_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.type == A.TENSOR:
                    yield a.t, False
                elif a.type == A.TENSORS:
                    yield from ((t, False) for t in a.tensors)
                elif a.type == A.SPARSE_TENSOR:
                    yield from ((t, False) for t in (a.sparse_tensor.values, a.sparse_tensor.indices))
                elif a.type == A.GRAPH:
                    yield from from_graph(a.g)
                elif a.type == A.GRAPHS:
                    for g in a.graphs:
                        yield from from_graph(g)

    def from_graph(g):
        yield from ((t, True) for t in g.initializer)
        for s in g.sparse_initializer:
            yield from ((t, False) for t in (s.values, s.indices))
        yield from from_nodes(g.node)

    yield from from_graph(model.graph)
    for f in model.functions:
        yield from from_nodes(f.node)


def _write_data(model, data, source: Path | None) -> dict[int, tuple[int, int]]:
    """Write the data of the tensors that go to the data file, in :func:`_tensors` order:
    in-memory initializers of at least ``_INLINE_BELOW`` bytes (from memory) and every tensor
    that references external data (copied from ``source``'s folder in chunks). Returns
    ``{tensor index: (offset, length)}``."""
    from onnx import TensorProto

    external = TensorProto.EXTERNAL
    if any(t.data_location == external for t, _ in _tensors(model)):
        if source is None:
            raise UsageError("the model references external data files but was not read from a file: "
                             "their folder is unknown (load the model from its path)")
        from .model.external import check_external_data

        check_external_data(model, source.parent, str(source))  # confined to the folder, in bounds
    moved: dict[int, tuple[int, int]] = {}
    buf = None
    for i, (t, is_init) in enumerate(_tensors(model)):
        if t.data_location == external:
            info = {e.key: e.value for e in t.external_data}
            path = source.parent / info["location"]
            start = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else path.stat().st_size - start
            offset = _pad(data, length)
            buf = buf or bytearray(_COPY_CHUNK)
            _copy_range(path, start, length, data, memoryview(buf), f"{source}: external data of tensor {t.name!r}")
            moved[i] = (offset, length)
        elif is_init and t.HasField("raw_data"):
            raw = t.raw_data
            if len(raw) < _INLINE_BELOW:
                continue
            offset = _pad(data, len(raw))
            data.write(raw)
            moved[i] = (offset, len(raw))
    return moved


def _copy_range(path: Path, start: int, length: int, data, buf: memoryview, what: str) -> None:
    """Append ``length`` bytes of ``path`` from ``start`` to ``data``, one buffer at a time.
    A read failure is a :class:`ModelError` (the input); a write failure stays an OSError."""
    from .errors import ModelError

    try:
        src = open(path, "rb")
    except OSError as e:
        raise ModelError(f"{what}: cannot read {path.name!r}: {e.strerror or e}") from None
    with src:
        left = length
        try:
            src.seek(start)
        except OSError as e:
            raise ModelError(f"{what}: cannot read {path.name!r}: {e.strerror or e}") from None
        while left:
            try:
                n = src.readinto(buf[:min(left, len(buf))])
            except OSError as e:
                raise ModelError(f"{what}: cannot read {path.name!r}: {e.strerror or e}") from None
            if not n:
                raise ModelError(f"{what}: {path.name!r} ended {left} bytes early")
            data.write(buf[:n])
            left -= n


def _pad(data, size: int) -> int:
    """Zero-pad the data file so that a tensor of ``size`` bytes starts aligned; its offset."""
    offset = data.tell()
    if size >= _ALIGN_FROM and offset % _ALIGN:
        data.write(b"\0" * (-offset % _ALIGN))
        offset = data.tell()
    return offset


def _header(model, moved: dict[int, tuple[int, int]], data_name: str):
    """A copy of ``model`` in which the tensors of ``moved`` reference ``data_name`` and hold no
    bytes. The top-level initializers are copied field by field without their bytes; the rest
    of the graph (subgraphs, attributes: small) is copied whole and then pointed at the file."""
    from onnx import ModelProto, TensorProto

    from .model.external import copy_fields

    header = ModelProto()
    copy_fields(model, header, skip="graph")
    copy_fields(model.graph, header.graph, skip="initializer")
    for i, t in enumerate(model.graph.initializer):
        if i not in moved:
            header.graph.initializer.append(t)
            continue
        copy_fields(t, header.graph.initializer.add(), skip=("raw_data", "external_data"))
    for i, (t, _) in enumerate(_tensors(header)):
        if i in moved:
            offset, length = moved[i]
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    return header


