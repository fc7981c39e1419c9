"""External data: every reference is validated from metadata only, before anything is read (a
location must be a relative path to a regular file inside the model's folder, reached through no
symbolic link; offset and length must fit the file and the tensor's dims and type); the checker is
given a copy whose external initializers are inputs; the weightless copy that lets the checker and
shape inference run without the weight bytes; protobuf field copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..errors import ModelError, first_line as _first_line


def _external_tensors(model: onnx.ModelProto, everywhere: bool = True):
    """Every tensor of the model (all graphs: initializers, sparse initializers, node attributes)
    whose data is in an external file; ``everywhere=False``: the main graph's initializers."""
    from .graph import all_graphs

    external = onnx.TensorProto.EXTERNAL
    if not everywhere:
        yield from (t for t in model.graph.initializer if t.data_location == external)
        return
    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_location == external:
                yield t
        for s in g.sparse_initializer:
            yield from (t for t in (s.values, s.indices) if t.data_location == external)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors = [a.t]
                elif a.type == onnx.AttributeProto.TENSORS:
                    tensors = list(a.tensors)
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    tensors = [a.sparse_tensor.values, a.sparse_tensor.indices]
                else:
                    continue
                yield from (t for t in tensors if t.data_location == external)


# byte-aligned element types (sub-byte types are packed: INT4, UINT4, FLOAT4E2M1 two per byte)
_PACKED_HALF = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


_PACKED_QUARTER = {getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


_BYTE_ALIGNED = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "BOOL", "FLOAT16", "DOUBLE", "UINT32", "UINT64",
    "COMPLEX64", "COMPLEX128", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
    "FLOAT8E8M0") if hasattr(onnx.TensorProto, n)}


def file_bytes(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """The bytes a model occupies on disk: its file and the external-data files it references
    (each once), what a device has to store and load. Unreadable data files count 0 here (the
    external-data check reports them)."""
    path = Path(path)
    total = path.stat().st_size
    seen: set[str] = set()
    for t in _external_tensors(model):
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if location and location not in seen:
            seen.add(location)
            try:
                total += (path.parent / location).stat().st_size
            except (OSError, ValueError):
                pass
    return total


def _data_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's data from its dims and type, or None when unknown (strings, new types)."""
    n = 1
    for d in t.dims:
        if d < 0:
            return None
        n *= d
    if t.data_type in _PACKED_HALF:
        return (n + 1) // 2
    if t.data_type in _PACKED_QUARTER:
        return (n + 3) // 4
    if t.data_type in _BYTE_ALIGNED:
        from .graph import itemsize

        return n * int(itemsize(t.data_type))
    return None


def _confined(base_dir: Path, location: str, where: str) -> Path:
    """The path of an external data file, if it is inside ``base_dir``: a relative location whose
    normalized form does not climb out with ``..`` and that goes through no symbolic link (onnx
    refuses to read through one; one that leads outside is named so). Only ``lstat`` is used."""
    import stat

    outside = f"{where}: location {location!r} is outside the model's folder; refused"
    if "\0" in location:
        raise ModelError(f"{where}: invalid location {location!r} (NUL byte)")
    if os.path.isabs(location) or Path(location).anchor:
        raise ModelError(outside + " (an absolute path)")
    rel = os.path.normpath(location)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ModelError(outside)
    path = base_dir
    for part in Path(rel).parts:
        path = path / part
        try:
            is_link = stat.S_ISLNK(path.lstat().st_mode)
        except FileNotFoundError:
            break  # reported by the caller as a missing file
        except (OSError, ValueError) as e:
            raise ModelError(f"{where}: {location!r}: cannot stat: {getattr(e, 'strerror', None) or e}") from None
        if is_link:
            try:
                real, root = path.resolve(), base_dir.resolve()
            except (OSError, RuntimeError) as e:  # a symlink loop
                raise ModelError(f"{where}: {location!r}: {_first_line(e)}") from None
            if real != root and root not in real.parents:
                raise ModelError(outside + f" (through the symbolic link {str(path.relative_to(base_dir))!r})")
            raise ModelError(f"{where}: location {location!r} goes through a symbolic link "
                             f"({str(path.relative_to(base_dir))!r}); refused (onnx does not read external data through links)")
    return base_dir / rel


def check_external_data(model: onnx.ModelProto, base_dir: Path, label: str, everywhere: bool = True) -> None:
    """Validate every external data reference from metadata only (``lstat``/``stat``, nothing
    is opened): the location is a relative path to a regular file inside the model's folder
    that climbs out with no ``..`` and goes through no symbolic link (an absolute path, an
    escape, a link are refused, as onnx refuses to read them), and offset + length fit in the
    file (and the length is what the tensor's dims and type need). ``everywhere=False``: only
    the main graph's initializers can be external (see :func:`read_model`)."""
    sizes: dict[str, int] = {}
    for t in _external_tensors(model, everywhere):
        info = {e.key: e.value for e in t.external_data}
        what = f"external data of tensor {t.name!r}"
        location = info.get("location", "")
        if not location:
            raise ModelError(f"{label}: {what} has no location")
        if location not in sizes:
            target = _confined(base_dir, location, f"{label}: {what}")
            try:
                st = target.stat()
            except FileNotFoundError:
                raise ModelError(f"{label}: {what}: {location!r}: no such file (missing external data file)") from None
            except (OSError, ValueError) as e:
                raise ModelError(f"{label}: {what}: {location!r}: cannot stat: {getattr(e, 'strerror', None) or e}") from None
            import stat

            if stat.S_ISDIR(st.st_mode):
                raise ModelError(f"{label}: {what}: {location!r} is a folder, not a data file")
            if not stat.S_ISREG(st.st_mode):
                raise ModelError(f"{label}: {what}: {location!r} is not a regular file")
            sizes[location] = st.st_size
        size = sizes[location]
        values = {}
        for key in ("offset", "length"):
            text = info.get(key)
            if text is None:
                continue
            try:
                values[key] = int(text)
            except ValueError:
                values[key] = -1
            if values[key] < 0:
                raise ModelError(f"{label}: {what}: {key} {text[:40]!r} is not a non-negative integer")
        offset, length = values.get("offset", 0), values.get("length")
        need = _data_bytes(t)
        if offset > size:
            raise ModelError(f"{label}: {what}: offset {offset} is past the end of {location!r} ({size} bytes)")
        if length is not None and offset + length > size:
            raise ModelError(f"{label}: {what}: offset {offset} + length {length} is past the end of {location!r} "
                             f"({size} bytes)")
        if length is not None and need is not None and length != need:
            raise ModelError(f"{label}: {what}: length {length} bytes, but its dims {list(t.dims)} and type need {need}")
        if length is None and need is not None and size - offset < need:
            raise ModelError(f"{label}: {what}: needs {need} bytes from offset {offset}, but {location!r} has only "
                             f"{size - offset}")


def _without_external_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The checker resolves external data locations against the current directory (it is not
    told the model's folder) and fails elsewhere. sepify never reads weight bytes, so check a
    copy in which the external initializers are graph inputs of the same type and shape."""
    ext = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not ext:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    names = {t.name for t in ext}
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    listed = {i.name for i in graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in ext if t.name not in listed)
    return copy


def weightless_copy(model: onnx.ModelProto, keep_bytes: int = 1024, label: str | None = None) -> onnx.ModelProto:
    """A copy of the model whose initializers larger than ``keep_bytes`` keep their name, type
    and shape but no data (they are marked external, location ``sepify-weightless``). The
    weight bytes are never copied; checker and shape inference on it cost what the graph costs.
    Small initializers (shape vectors, scalars) and int32/int64 ones of at most
    :data:`~sepify.model.shapes.MAX_ELEMENTS` elements are kept whole: shape inference and
    shape resolution read them.

    ``label`` (a model read from a file): first check what the checker would have checked
    about the data the stubs hide (a :class:`ModelError` naming ``label``)."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or _nbytes(t) <= keep_bytes or _shape_data(t):
            out.graph.initializer.append(t)
            continue
        if label is not None:
            _check_hidden_data(t, label)
        stub = out.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "sepify-weightless"
    return out


_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def _shape_data(t: onnx.TensorProto) -> bool:
    """An int32/int64 tensor small enough for shape resolution to fold (shape vectors, index
    tables): kept whole by :func:`weightless_copy`, so a rewrite resolves the shapes analyze does."""
    from .shapes import MAX_ELEMENTS

    if t.data_type not in _INTEGER_TYPES:
        return False
    n = 1
    for d in t.dims:
        n *= d
    return n <= MAX_ELEMENTS


def _check_hidden_data(t: onnx.TensorProto, label: str) -> None:
    """The checker's verdict on a tensor's data against its dims and type (the same messages),
    for a tensor that :func:`weightless_copy` replaces by a stub. ``len(raw_data)`` copies the
    bytes of one tensor at a time (about 0.8 s per GB); typed data goes to the checker."""
    n = 1
    for d in t.dims:
        n *= d
    if n >= 2**63:
        raise ModelError(f"{label}: invalid graph: Tensor dimension product overflow (tensor name: {t.name})")
    if t.HasField("raw_data"):
        need, have = _data_bytes(t), len(t.raw_data)
        if need is not None and have < need:
            raise ModelError(f"{label}: invalid graph: TensorProto (tensor name: {t.name}) raw_data size ({have} bytes) "
                             f"is too small for the declared shape and type ({need} bytes required).")
        return
    try:
        onnx.checker.check_tensor(t)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise ModelError(f"{label}: invalid graph: {_first_line(e)}") from None


def _nbytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's data from its dims (``ByteSize()`` would walk the bytes)."""
    n = 1
    for d in t.dims:
        n *= d
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        size = 8
    return n * size


def copy_fields(src, dst, skip: str | tuple[str, ...]) -> None:
    """Copy every set field of message ``src`` into ``dst`` except the field(s) ``skip``."""
    skip = (skip,) if isinstance(skip, str) else skip
    for fd, value in src.ListFields():
        if fd.name not in skip:
            set_field(dst, fd, value)


def set_field(dst, fd, value) -> None:
    """Copy one protobuf field (``fd`` from ``ListFields()``) into ``dst``, whatever its kind."""
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf < 5
    if repeated:
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)
