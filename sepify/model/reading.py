"""Reading a model: the file (or a ModelProto copy), what makes it a model at all (parse, IR
version, a graph, UTF-8 text, no negative declared dims), the ONNX checker, topological sorting
when the nodes are out of order, and the IR < 4 convention of initializers listed as inputs.

Everything that can go wrong with the *file* is a :class:`~sepify.errors.ModelError` with one
line naming the file and the problem; the CLI maps it to exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelError, first_line as _first_line
from .external import _without_external_initializers, check_external_data
from .graph import outer_inputs


Source = "str | os.PathLike | onnx.ModelProto"


def read_model(source, *, load_external_data: bool = False, copy: bool = True) -> tuple[onnx.ModelProto, Path | None]:
    """Read a model from a path or copy a ModelProto (``copy=False``: use it as it is, for a
    private copy the caller owns); validate that it is a model at all."""
    model, path, _, _ = _read(source, load_external_data=load_external_data, copy=copy)
    return model, path


def _read(source, *, load_external_data: bool = False, copy: bool = True,
          defer_scan: bool = False) -> tuple[onnx.ModelProto, Path | None, bytes | None, list[str]]:
    """:func:`read_model`, also returning the file's bytes when they are the model exactly as
    parsed and hold no external data reference (the checker and shape inference can take them
    as they are, saving a serialization each), else None; and the initializer names.

    ``defer_scan``: when the bytes are returned, the scan for external tensors is left to the
    caller, who must give the bytes to the checker (it rejects an external tensor with no
    location, the only kind a file without the string "location" can hold) or else call
    :func:`check_external_data` itself (``everywhere=False``)."""
    if isinstance(source, onnx.ModelProto):
        if copy:
            model = onnx.ModelProto()
            model.CopyFrom(source)
        else:
            model = source
        path = None
        label = "<model>"
    else:
        if not os.fspath(source):  # Path("") is ".": a folder, which would be a riddle
            raise ModelError("'': an empty model path (an unset variable in a script?)")
        path = Path(os.fspath(source))
        label = str(path)
        if not path.exists():
            raise ModelError(f"{label}: no such file")
        if path.is_dir():
            raise ModelError(f"{label}: is a directory, not an ONNX file")
        if not path.is_file():  # a FIFO or a device would block the read or never end
            raise ModelError(f"{label}: not a regular file (a pipe or a device?), not an ONNX file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelError(f"{label}: cannot read: {e.strerror or e}") from None
        if not data:
            raise ModelError(f"{label}: empty file, not an ONNX model")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise ModelError(f"{label}: not an ONNX model or truncated file (protobuf parse failed: {_first_line(e)})") from None
        init_names = [t.name for t in model.graph.initializer]
        _sanity(model, label, init_names)
        # walking every node's attributes costs ~0.2 s on 50,000 nodes: only a file that spells
        # the external data key "location" somewhere can have external tensors with a location
        has_location = b"location" in data
        pristine = not has_location and not load_external_data
        if not (pristine and defer_scan):
            check_external_data(model, path.parent, label, everywhere=has_location)
        if load_external_data:
            read_external_data(model, path)
        return model, path, (data if pristine else None), init_names
    init_names = [t.name for t in model.graph.initializer]
    _sanity(model, label, init_names)
    return model, path, None, init_names


def read_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Load the external weight bytes of a model read from ``path`` (validated by
    :func:`check_external_data` when it was read); a failure is a :class:`ModelError`."""
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise ModelError(f"{path}: cannot read external data: {_first_line(e)}") from None


def _sanity(model: onnx.ModelProto, label: str, init_names: list[str]) -> None:
    """Is it a model at all, with text where ONNX wants text? ``init_names``: the initializer
    names, read once by the caller."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelError(f"{label}: not an ONNX model (no IR version or no graph)")
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{label}: not an ONNX model (the graph has no nodes and no outputs)")
    _check_text(model, label, init_names)
    _check_declared_dims(model.graph, label)


def _check_text(model: onnx.ModelProto, label: str, init_names: list[str]) -> None:
    """Strings in ONNX are UTF-8, but protobuf does not check it for ONNX's (proto2) messages:
    a corrupt string reads back as ``bytes``, which reports and the rewriter cannot use. The
    model-level strings and the initializer names are checked here; the checker trips over a
    corrupt op type or domain, and :func:`check_inferred_shapes` checks node and tensor names
    (on the graph view, which reads them anyway)."""
    def bad(where: str):
        raise ModelError(f"{label}: {where} is not valid UTF-8 text (a corrupt file?)")

    for f in ("producer_name", "producer_version", "domain", "doc_string"):
        if getattr(model, f).__class__ is not str:
            bad(f"the model's {f}")
    for p in model.metadata_props:
        if p.key.__class__ is not str or p.value.__class__ is not str:
            bad("a metadata_props entry")
    for o in model.opset_import:
        if o.domain.__class__ is not str:
            bad("an opset_import domain")
    g = model.graph
    if g.name.__class__ is not str or g.doc_string.__class__ is not str:
        bad("the graph's name or doc_string")
    for vi in (*g.input, *g.output):
        if vi.name.__class__ is not str:
            bad(f"the name of graph input/output {vi.name!r}")
    try:
        "".join(init_names)  # one C loop; raises on a name that is bytes
    except TypeError:
        bad(f"the name of initializer {next(x for x in init_names if x.__class__ is not str)!r}")


def _check_declared_dims(graph: onnx.GraphProto, label: str) -> None:
    """A declared dimension (graph input, output, value_info) may not be negative, except -1:
    paddle2onnx and others write a dynamic dimension so, and onnxruntime reads it as one
    (:func:`~sepify.model.loading.dynamic_dims` names it). The checker rejects negative
    initializer dims; shape inference would only report a confusing mismatch. A symbolic
    dimension's name must be text (see :func:`_check_text`)."""
    for kind, vis in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in vis:
            if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
                continue
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.dim_value < -1:
                    raise ModelError(f"{label}: {kind} {vi.name!r} declares a negative dimension ({d.dim_value} at axis {axis})")
                if d.WhichOneof("value") == "dim_param" and d.dim_param.__class__ is not str:
                    raise ModelError(f"{label}: {kind} {vi.name!r}: the name of dimension {axis} is not valid UTF-8 text "
                                     f"(a corrupt file?)")


def check(model: onnx.ModelProto, label: str, data: bytes | None = None) -> None:
    """The ONNX checker; a failure is a :class:`ModelError`. ``data``: the model serialized, with
    no external data reference (see :func:`_read`)."""
    try:
        onnx.checker.check_model(data if data is not None else _without_external_initializers(model))
    except UnicodeDecodeError as e:  # the checker's message quotes a corrupt op type or name
        raise ModelError(f"{label}: invalid graph: an op type, domain or name is not valid UTF-8 text "
                         f"(byte {e.object[e.start:e.start + 1]!r} in {e.object[:60]!r})") from None
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise ModelError(f"{label}: invalid graph: {_first_line(e)}") from None


def list_initializers_as_inputs(model: onnx.ModelProto) -> list[str]:
    """IR < 4 requires every initializer to be listed as a graph input too; onnxruntime runs a
    model that does not, reading the initializers as constants. List the missing ones (so the
    checker accepts the model; :func:`drop_initializer_inputs` then removes them all) and
    return their names."""
    if model.ir_version >= 4:
        return []
    listed = {i.name for i in model.graph.input}
    missing = [t for t in model.graph.initializer if t.name not in listed]
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in missing)
    return [t.name for t in missing]


def drop_initializer_inputs(model: onnx.ModelProto) -> bool:
    """IR < 4: initializers are also listed as graph inputs. Remove them from the input list."""
    if model.ir_version >= 4:
        return False
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) == len(model.graph.input):
        return False
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return True


def topological_sort(graph: onnx.GraphProto, label: str) -> None:
    """Reorder ``graph.node`` topologically (networkx). Called only when the checker reports
    that the nodes are not sorted; a cycle, a node reading its own output or an undefined
    tensor is a :class:`ModelError`."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    import networkx as nx

    producer = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = i
    g = nx.DiGraph()
    g.add_nodes_from(range(len(graph.node)))
    for i, node in enumerate(graph.node):
        for name in list(node.input) + outer_inputs(node):
            j = producer.get(name)
            if j is not None and j != i:
                g.add_edge(j, i)
            elif j == i:
                raise ModelError(f"{label}: invalid graph: node {node.name or node.op_type!r} reads its own output {name!r}")
            elif j is None and name and name not in known:
                raise ModelError(f"{label}: invalid graph: node {node.name or node.op_type!r} reads undefined tensor {name!r}")
    try:
        order = list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        names = [graph.node[a].name or graph.node[a].op_type for a, _ in cycle]
        raise ModelError(f"{label}: invalid graph: cycle through nodes {' -> '.join(names[:6])}") from None
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
