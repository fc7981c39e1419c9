"""Loading and preparing a model: read, validate, normalize, bind shapes, infer shapes.

Everything that can go wrong with the *file* is turned into :class:`ModelError` with one line
naming the file and the problem; the CLI maps it to exit code 2.

Preparation steps, in order:

1. read the protobuf without the external weight bytes (``load_external_data=False``);
2. reject what is not a model (empty, truncated, random bytes, a protobuf of another kind);
3. inline model-local functions;
4. ``onnx.checker`` (structure, not shapes); when it reports nodes out of topological order,
   sort them (networkx) and check again (a cycle or an undefined tensor is an error);
5. old models (IR < 4) list initializers among the graph inputs: drop them from the inputs so
   shape inference treats them as the constants they are (after the checker, which for
   IR < 4 requires them to be listed);
6. apply ``--input-shape`` overrides and ``--dim`` bindings; name anonymous input dims;
7. ONNX shape inference with data propagation (strict: a rejected opset or contradictory
   shapes is an error).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, UsageError
from .graph import outer_inputs

Source = "str | os.PathLike | onnx.ModelProto"


@dataclass
class LoadedModel:
    """A prepared model: shapes inferred, inputs bound. ``model`` is a private copy."""

    model: onnx.ModelProto
    path: Path | None
    file_size: int | None
    symbols: dict[str, int | None] = field(default_factory=dict)  # name -> bound value or None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<model>"

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None


def read_model(source, *, load_external_data: bool = False, copy: bool = True) -> tuple[onnx.ModelProto, Path | None]:
    """Read a model from a path or copy a ModelProto (``copy=False``: use it as it is, for a
    private copy the caller owns); validate that it is a model at all."""
    if isinstance(source, onnx.ModelProto):
        if copy:
            model = onnx.ModelProto()
            model.CopyFrom(source)
        else:
            model = source
        path = None
        label = "<model>"
    else:
        path = Path(os.fspath(source))
        label = str(path)
        if not path.exists():
            raise ModelError(f"{label}: no such file")
        if path.is_dir():
            raise ModelError(f"{label}: is a directory, not an ONNX file")
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
        if load_external_data:
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError) as e:
                raise ModelError(f"{label}: cannot read external data: {_first_line(e)}") from None
    _sanity(model, label)
    return model, path


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _sanity(model: onnx.ModelProto, label: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelError(f"{label}: not an ONNX model (no IR version or no graph)")
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{label}: not an ONNX model (the graph has no nodes and no outputs)")


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


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*([A-Za-z0-9_?,x\s]+)$")


def parse_input_shape(text: str) -> tuple[str, list[int | str]]:
    """``images=1x3x640x640`` → ``("images", [1, 3, 640, 640])``; a non-number stays a symbol."""
    m = _SHAPE_RE.match(text)
    if not m:
        raise UsageError(f"invalid --input-shape {text!r} (expected NAME=1x3x224x224)")
    name, dims = m.group(1), m.group(2)
    out: list[int | str] = []
    for d in re.split(r"[x,]", dims.replace(" ", "")):
        if not d:
            raise UsageError(f"invalid --input-shape {text!r} (empty dimension)")
        out.append(int(d) if d.isdigit() else d)
    return name, out


def parse_dim(text: str) -> tuple[str, int]:
    """``batch=8`` → ``("batch", 8)``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"invalid --dim {text!r} (expected SYMBOL=POSITIVE_INTEGER)")
    return name.strip(), int(value)


def _set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    tt = vi.type.tensor_type
    tt.shape.Clear()
    for d in dims:
        dim = tt.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        else:
            dim.dim_param = d


def _bind_value_infos(vis, dims: Mapping[str, int]) -> None:
    for vi in vis:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = dims[d.dim_param]


def bind_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    label: str = "<model>",
) -> dict[str, int | None]:
    """Apply input shape overrides and symbol bindings in place; return the symbols seen.

    Anonymous input dims (no value, no name) are given the name ``<input>_d<axis>`` so they can
    be bound with ``--dim`` and appear in formulas. Returns ``{symbol: bound value or None}``.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    for name, shape in (input_shapes or {}).items():
        if name not in inputs:
            raise UsageError(f"--input-shape names {name!r}, which is not a graph input (inputs: {', '.join(inputs) or 'none'})")
        vi = inputs[name]
        old = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        if old and len(old) != len(shape):
            raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the model declares rank {len(old)}")
        _set_dims(vi, shape)
    if input_shapes:
        # shapes declared for outputs and intermediates were for the old input shapes: forget
        # their dimensions (keep types and ranks) so shape inference recomputes them
        for vi in graph.output:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                for d in vi.type.tensor_type.shape.dim:
                    d.Clear()
        del graph.value_info[:]
    dims = dict(dims or {})
    symbols: dict[str, int | None] = {}
    for vi in inputs.values():
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                continue
            if not d.HasField("dim_param") or not d.dim_param:
                d.dim_param = f"{vi.name}_d{axis}"
            symbols[d.dim_param] = dims.get(d.dim_param)
    unused = sorted(set(dims) - set(symbols))
    if unused:
        raise UsageError(f"--dim {unused[0]}: no input of the model has a dimension named {unused[0]!r}"
                         + (f" (symbols: {', '.join(sorted(symbols))})" if symbols else " (it has no symbolic dimensions)"))
    # a declared output/intermediate dim named by something other than an input symbol (exporters
    # write "Convy_dim_0", "batch_size_out"...) would stay opaque: shape inference keeps the
    # declared name over the one it derives. Forget it so inference derives the dimension.
    for vi in list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param not in symbols:
                    d.Clear()
    bound = {k: v for k, v in symbols.items() if v is not None}
    if bound:
        _bind_value_infos(graph.input, bound)
        _bind_value_infos(graph.output, bound)
        _bind_value_infos(graph.value_info, bound)
    return symbols


def infer_shapes(model: onnx.ModelProto, label: str = "<model>") -> onnx.ModelProto:
    """ONNX shape inference with data propagation; errors become :class:`ModelError`.

    For IR < 4 the C++ inferencer reads no types from initializers (they were inputs then);
    since :func:`drop_initializer_inputs` has removed them from the inputs, infer as IR 4
    and restore the original IR version on the result."""
    ir = model.ir_version
    try:
        if ir < 4:
            model.ir_version = 4
            try:
                out = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=_needs_data_prop(model))
            finally:
                model.ir_version = ir
            out.ir_version = ir
            return out
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=_needs_data_prop(model))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as e:
        raise ModelError(f"{label}: shape inference failed: {_first_line(e)}") from None


def _needs_data_prop(model: onnx.ModelProto) -> bool:
    """Data propagation only helps where shapes are computed at run time (``Shape``/``Size``
    feeding ``Reshape``, ``Expand``...) or computed from constants by other nodes (a weight made
    by ``ConstantOfShape`` of a ``Concat`` of constants); without such ops it is skipped (it
    costs ~70%). Initializers and ``Constant`` outputs are read without it."""
    present = {n.op_type for n in model.graph.node}
    if present & {"Shape", "Size", "If", "Loop", "Scan"}:
        return True
    if not present & _SHAPE_CONSUMERS:
        return False
    computed: set[str] = set()
    for n in model.graph.node:
        op = n.op_type
        if op in _SHAPE_CONSUMERS:
            start = 0 if op in ("ConstantOfShape", "Range") else 1
            if any(name in computed for name in n.input[start:]):
                return True
        if op != "Constant":
            computed.update(n.output)
    return False


# ops whose output shape depends on the values of their (non-data) inputs
_SHAPE_CONSUMERS = {"Reshape", "Expand", "ConstantOfShape", "Tile", "Slice", "Pad", "Resize", "Upsample",
                    "Unsqueeze", "Squeeze", "Split", "Range", "OneHot", "TopK", "CenterCropPad"}


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


def weightless_copy(model: onnx.ModelProto, keep_bytes: int = 1024) -> onnx.ModelProto:
    """A copy of the model whose initializers larger than ``keep_bytes`` keep their name, type
    and shape but no data (they are marked external, location ``sepify-weightless``). The
    weight bytes are never copied; checker and shape inference on it cost what the graph costs.
    Small initializers (shape vectors, scalars) are kept whole: shape inference reads them."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or _nbytes(t) <= keep_bytes:
            out.graph.initializer.append(t)
            continue
        stub = out.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "sepify-weightless"
    return out


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


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf < 5
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def check(model: onnx.ModelProto, label: str) -> None:
    try:
        onnx.checker.check_model(_without_external_initializers(model))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise ModelError(f"{label}: invalid graph: {_first_line(e)}") from None


def load(
    source,
    *,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    load_external_data: bool = False,
    bind_unbound_to: int | None = None,
    copy: bool = True,
) -> LoadedModel:
    """Read, validate and prepare a model, with shapes inferred. See the module docstring.

    ``bind_unbound_to``: give every symbol left unbound this value (used for a numeric pass).
    ``copy=False``: a ModelProto source is a private copy that may be changed in place.
    """
    model, path = read_model(source, load_external_data=load_external_data, copy=copy)
    label = str(path) if path else "<model>"
    notes: list[str] = []
    if model.functions:
        try:
            import onnx.inliner

            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:  # noqa: BLE001 - a broken function body is a model error
            raise ModelError(f"{label}: cannot inline model-local functions: {_first_line(e)}") from None
        notes.append("model-local functions were inlined")
    try:
        check(model, label)
    except ModelError as e:
        # the checker (C++, fast) tells whether the nodes are sorted; sort only if needed
        if "topologically sorted" not in str(e):
            raise
        topological_sort(model.graph, label)
        notes.append("nodes were not in topological order; sorted")
        check(model, label)
    # after the checker: for IR < 4 it requires every initializer to be listed as an input
    if drop_initializer_inputs(model):
        notes.append(f"IR version {model.ir_version}: initializers listed as graph inputs were treated as constants")
    symbols = bind_inputs(model, input_shapes, dims, label)
    if bind_unbound_to is not None:
        free = {k: bind_unbound_to for k, v in symbols.items() if v is None}
        if free:
            bind_inputs(model, None, free, label)
    model = infer_shapes(model, label)
    size = path.stat().st_size if path else None
    return LoadedModel(model=model, path=path, file_size=size, symbols=symbols, notes=notes)
