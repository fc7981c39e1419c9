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

from ..errors import ModelError, UsageError, first_line as _first_line
from .external import _without_external_initializers, check_external_data
from .validation import check_input_dims
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
    """A declared dimension (graph input, output, value_info) may not be negative (the checker
    rejects negative initializer dims; shape inference would only report a confusing mismatch),
    and a symbolic one's name must be text (see :func:`_check_text`)."""
    for kind, vis in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in vis:
            if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
                continue
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.dim_value < 0:
                    raise ModelError(f"{label}: {kind} {vi.name!r} declares a negative dimension ({d.dim_value} at axis {axis})")
                if d.WhichOneof("value") == "dim_param" and d.dim_param.__class__ is not str:
                    raise ModelError(f"{label}: {kind} {vi.name!r}: the name of dimension {axis} is not valid UTF-8 text "
                                     f"(a corrupt file?)")


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


def _forget_derived_dims(graph: onnx.GraphProto) -> None:
    """Shapes declared for outputs and intermediates were for the declared input shapes: forget
    their dimensions (keep types and ranks) so shape inference recomputes them."""
    for vi in graph.output:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                d.Clear()
    del graph.value_info[:]


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
    initializers: set[str] | None = None,
) -> tuple[dict[str, int | None], bool]:
    """Apply input shape overrides and symbol bindings in place; return the symbols seen and
    whether the model was changed.

    Anonymous input dims (no value, no name) are given the name ``<input>_d<axis>`` so they can
    be bound with ``--dim`` and appear in formulas. The symbols are ``{symbol: bound value or
    None}``. ``initializers``: the names of the initializers, when the caller has them.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer} if initializers is None else initializers
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    changed = bool(input_shapes)
    for name, shape in (input_shapes or {}).items():
        if name not in inputs:
            raise UsageError(f"--input-shape names {name!r}, which is not a graph input (inputs: {', '.join(inputs) or 'none'})")
        vi = inputs[name]
        old = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        if old and len(old) != len(shape):
            raise UsageError(f"--input-shape {name}: rank {len(shape)} given, the model declares rank {len(old)}")
        _set_dims(vi, shape)
    if input_shapes:
        _forget_derived_dims(graph)
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
                changed = True
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
                    changed = True
    bound = {k: v for k, v in symbols.items() if v is not None}
    if bound:
        _bind_value_infos(graph.input, bound)
        _bind_value_infos(graph.output, bound)
        _bind_value_infos(graph.value_info, bound)
        changed = True
    return symbols, changed


def infer_shapes(model: onnx.ModelProto, label: str = "<model>", data: bytes | None = None) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; errors become :class:`ModelError`.

    For IR < 4 the C++ inferencer reads no types from initializers (they were inputs then);
    since :func:`drop_initializer_inputs` has removed them from the inputs, infer as IR 4
    and restore the original IR version on the result. ``data``: the model serialized (saves
    serializing it again)."""
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
        return onnx.shape_inference.infer_shapes(model if data is None else data, check_type=True, strict_mode=True,
                                                 data_prop=_needs_data_prop(model))
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


def check(model: onnx.ModelProto, label: str, data: bytes | None = None) -> None:
    """The ONNX checker; a failure is a :class:`ModelError`. ``data``: the model serialized, with
    no external data reference (see :func:`_read`)."""
    if model.ir_version < 4:  # (the checker would not see it for the external ones, turned into inputs)
        listed = {i.name for i in model.graph.input}
        missing = next((t.name for t in model.graph.initializer if t.name not in listed), None)
        if missing is not None:
            raise ModelError(f"{label}: invalid graph: initializer {missing!r} is not listed as a graph input "
                             f"(IR version {model.ir_version} < 4 requires it)")
    try:
        onnx.checker.check_model(data if data is not None else _without_external_initializers(model))
    except UnicodeDecodeError as e:  # the checker's message quotes a corrupt op type or name
        raise ModelError(f"{label}: invalid graph: an op type, domain or name is not valid UTF-8 text "
                         f"(byte {e.object[e.start:e.start + 1]!r} in {e.object[:60]!r})") from None
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
    path: str | os.PathLike | None = None,
) -> LoadedModel:
    """Read, validate and prepare a model, with shapes inferred. See the module docstring.

    ``bind_unbound_to``: give every symbol left unbound this value (used for a numeric pass).
    ``copy=False``: a ModelProto source is a private copy that may be changed in place.
    ``path``: the file a ModelProto source was read from (named in errors, set on the result).
    """
    model, read_path, data, init_names = _read(source, load_external_data=load_external_data, copy=copy,
                                               defer_scan=True)
    path = read_path or (Path(os.fspath(path)) if path is not None else None)
    label = str(path) if path else "<model>"
    notes: list[str] = []
    unscanned = data is not None  # _read left the external-data scan to the checker reading ``data``

    def scan_external_data_now() -> None:
        nonlocal unscanned
        if unscanned:
            check_external_data(model, path.parent, label, everywhere=False)
            unscanned = False

    if model.functions:
        data = None
        try:
            import onnx.inliner

            model = onnx.inliner.inline_local_functions(model)
            init_names = [t.name for t in model.graph.initializer]
        except Exception as e:  # noqa: BLE001 - a broken function body is a model error
            raise ModelError(f"{label}: cannot inline model-local functions: {_first_line(e)}") from None
        notes.append("model-local functions were inlined")
    if data is None:
        scan_external_data_now()
    try:
        check(model, label, data)
    except ModelError as e:
        # the checker (C++, fast) tells whether the nodes are sorted; sort only if needed
        if "topologically sorted" not in str(e):
            raise
        topological_sort(model.graph, label)
        scan_external_data_now()  # (it stopped at the order: it may not have seen every tensor)
        data = None
        notes.append("nodes were not in topological order; sorted")
        check(model, label)
    # after the checker: for IR < 4 it requires every initializer to be listed as an input
    if drop_initializer_inputs(model):
        data = None
        notes.append(f"IR version {model.ir_version}: initializers listed as graph inputs were treated as constants")
    initializers = set(init_names)
    symbols, changed = bind_inputs(model, input_shapes, dims, label, initializers)
    if bind_unbound_to is not None:
        free = {k: bind_unbound_to for k, v in symbols.items() if v is None}
        if free:
            bind_inputs(model, None, free, label, initializers)
            changed = True
    if changed:
        data = None
    check_input_dims(model.graph, label, initializers)
    try:
        model = infer_shapes(model, label, data)
    except ModelError:
        if bind_unbound_to is None or all(v is not None for v in symbols.values()):
            raise
        # the values given to unbound symbols are stand-ins for the numbers: an output declared
        # 8 wide for an input of unknown width is no contradiction, but it is one at width 1
        _forget_derived_dims(model.graph)
        model = infer_shapes(model, label)
    size = path.stat().st_size if path else None
    return LoadedModel(model=model, path=path, file_size=size, symbols=symbols, notes=notes)
