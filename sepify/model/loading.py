"""Preparing a model for analysis: read it (:mod:`.reading`), bind shapes, infer shapes.

Preparation steps, in order:

1. read the protobuf without the external weight bytes (``load_external_data=False``);
2. reject what is not a model (empty, truncated, random bytes, a protobuf of another kind);
3. inline model-local functions (their unnamed nodes named first: :func:`name_function_nodes`);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import onnx

from ..errors import ModelError, UsageError, first_line as _first_line
from .external import check_external_data, file_bytes
from .graph import all_graphs
from .reading import _read, check, drop_initializer_inputs, list_initializers_as_inputs, topological_sort
from .shapes import SURROGATE_OPS, Origins, any_lost, resolve_shapes
from .symdims import derive
from .validation import check_input_dims


@dataclass
class LoadedModel:
    """A prepared model: shapes inferred, inputs bound. ``model`` is a private copy."""

    model: onnx.ModelProto
    path: Path | None
    file_size: int | None
    symbols: dict[str, int | None] = field(default_factory=dict)  # name -> bound value or None
    notes: list[str] = field(default_factory=list)
    unused_dims: list[str] = field(default_factory=list)  # ``dims`` names the model has no symbol for
    lost: Mapping[str, str] = field(default_factory=dict)  # tensor whose shape is unknown -> why (.get only)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<model>"

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None


def name_function_nodes(model: onnx.ModelProto) -> None:
    """Name the unnamed nodes of model-local function bodies ``<function>/<op>_<index>``, in
    place: the inliner then names their copies ``<that>__<call number>``. Every command inlines
    after this (``analyze`` here, ``rewrite`` before its edit), so a node of a function has one
    name in every report, the same before and after a rewrite (names derived from node
    positions would shift with the new nodes)."""
    for f in model.functions:
        for i, n in enumerate(f.node):
            if not n.name:
                n.name = f"{f.name}/{n.op_type}_{i}"


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


def dynamic_dims(graph: onnx.GraphProto, initializers: set[str]) -> list[str]:
    """A dimension written ``-1`` in a graph input, or ``-1``/``0`` in a graph output, is dynamic,
    as onnxruntime reads it (paddle2onnx and others write it so): clear it, so that
    :func:`bind_inputs` names an input's (``<input>_d<axis>``, bindable with ``--dim``) and
    shape inference derives an output's. A ``-1`` in ``value_info`` is dropped. (A ``0`` in an
    input is a fixed empty dimension for onnxruntime: refused by
    :func:`~sepify.model.validation.check_input_dims`.) Returns the input dims named, for the note."""
    named = []
    for kind, vis in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in vis:
            if vi.name in initializers or vi.type.WhichOneof("value") != "tensor_type" \
                    or not vi.type.tensor_type.HasField("shape"):
                continue
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.HasField("dim_value") and (d.dim_value == -1 or (d.dim_value == 0 and kind == "output")):
                    if kind == "input":
                        named.append(f"{vi.name}_d{axis} ({vi.name!r} axis {axis}, written {d.dim_value})")
                    d.Clear()
    return named


def bind_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    label: str = "<model>",
    initializers: set[str] | None = None,
    shape_words: Mapping[str, str] | None = None,
) -> tuple[dict[str, int | None], bool]:
    """Apply input shape overrides and symbol bindings in place; return the symbols seen and
    whether the model was changed. A ``dims`` name that is no symbol of the model is ignored
    (the caller reports it: see :attr:`LoadedModel.unused_dims`). ``shape_words``: how errors
    name the override of each input (default ``--input-shape NAME``; a config says
    ``input-shape.NAME in FILE``).

    Anonymous input dims (no value, no name) are given the name ``<input>_d<axis>`` so they can
    be bound with ``--dim`` and appear in formulas. The symbols are ``{symbol: bound value or
    None}``. ``initializers``: the names of the initializers, when the caller has them.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer} if initializers is None else initializers
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    changed = bool(input_shapes)
    for name, shape in (input_shapes or {}).items():
        words = (shape_words or {}).get(name) or f"--input-shape {name}"
        if name not in inputs:
            raise UsageError(f"{label}: {words}: {name!r} is not a graph input (inputs: {', '.join(inputs) or 'none'})")
        vi = inputs[name]
        old = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        if old and len(old) != len(shape):
            raise UsageError(f"{label}: {words}: rank {len(shape)} given, the model declares rank {len(old)}")
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


def _decide_ifs(model: onnx.ModelProto, label: str, error: ModelError):
    """Strict shape inference failed. If it failed in the dead branch of an ``If`` whose condition
    the shapes decide (PyTorch's ``squeeze(d)`` of a dynamic dim, bound with ``--input-shape``:
    the Squeeze of a dim that is not 1 is in the branch that never runs), onnxruntime runs the
    model: infer leniently, let shape resolution decide the Ifs, and accept the result when strict
    inference then succeeds on the scratch copy (the dead branches left out). Returns (model,
    the Ifs decided, a note) or None."""
    if not any(n.op_type == "If" for g in all_graphs(model.graph) for n in g.node):
        return None
    from .shapes import infer_lenient

    lenient = infer_lenient(model)
    if lenient is None:
        return None
    taken: dict[str, str] = {}
    status: dict = {}
    out, _ = resolve_shapes(lenient, lambda m: infer_shapes(m, label), taken=taken, status=status)
    if not status.get("strict") or not taken:
        return None
    return out, taken, (f"shape inference fails only in If branches that never run at these shapes "
                        f"({len(taken)} If node(s) decided by the shapes); they are left out")


def _needs_data_prop(model: onnx.ModelProto) -> bool:
    """Data propagation only helps where shapes are computed at run time (``Shape``/``Size``
    feeding ``Reshape``, ``Expand``...) or computed from constants by other nodes (a weight made
    by ``ConstantOfShape`` of a ``Concat`` of constants); without such ops it is skipped (it
    costs ~70%). Initializers and ``Constant`` outputs are read without it."""
    present = {n.op_type for n in model.graph.node}
    if present & {"Shape", "Size", "If", "Loop", "Scan"} or present & SURROGATE_OPS:  # (contrib ops: see shapes.py)
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


def load(
    source,
    *,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    load_external_data: bool = False,
    bind_unbound_to: int | Mapping[str, int] | None = None,
    copy: bool = True,
    path: str | os.PathLike | None = None,
    shape_words: Mapping[str, str] | None = None,
) -> LoadedModel:
    """Read, validate and prepare a model, with shapes inferred. See the module docstring.

    ``bind_unbound_to``: give every symbol left unbound this value, or its value in a mapping
    (1 where the mapping has none; used for a numeric pass).
    ``copy=False``: a ModelProto source is a private copy that may be changed in place.
    ``path``: the file a ModelProto source was read from (named in errors, set on the result).
    """
    model, read_path, data, init_names = _read(source, load_external_data=load_external_data, copy=copy,
                                               defer_scan=True)
    path = read_path or (Path(os.fspath(path)) if path is not None else None)
    label = str(path) if path else "<model>"
    size = file_bytes(model, read_path) if read_path else None  # (the file and its external-data files)
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

            name_function_nodes(model)  # (``model`` is a private copy)
            model = onnx.inliner.inline_local_functions(model)
            init_names = [t.name for t in model.graph.initializer]
        except Exception as e:  # noqa: BLE001 - a broken function body is a model error
            raise ModelError(f"{label}: cannot inline model-local functions: {_first_line(e)}") from None
        notes.append("model-local functions were inlined")
    unlisted = list_initializers_as_inputs(model)
    if unlisted:
        data = None
        notes.append(f"IR version {model.ir_version}: {len(unlisted)} initializer(s) not listed as graph inputs "
                     f"(IR < 4 wants them listed) were read as constants, as onnxruntime does")
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
    named = dynamic_dims(model.graph, initializers)
    if named:
        data = None
        notes.append("dimensions written -1 in graph inputs are dynamic (as onnxruntime reads them): "
                     + ", ".join(named))
    symbols, changed = bind_inputs(model, input_shapes, dims, label, initializers, shape_words)
    unused = sorted(set(dims or {}) - set(symbols))
    if bind_unbound_to is not None:
        free = {k: (bind_unbound_to.get(k, 1) if isinstance(bind_unbound_to, Mapping) else bind_unbound_to)
                for k, v in symbols.items() if v is None}
        if free:
            bind_inputs(model, None, free, label, initializers)
            changed = True
    if changed:
        data = None
    check_input_dims(model.graph, label, initializers)
    rescued = None
    try:
        model = infer_shapes(model, label, data)
    except ModelError as error:
        rescued = _decide_ifs(model, label, error)
        if rescued is not None:
            model = rescued[0]
            notes.append(rescued[2])
        elif bind_unbound_to is None or all(v is not None for v in symbols.values()):
            raise
        # the values given to unbound symbols are stand-ins for the numbers: an output declared
        # 8 wide for an input of unknown width is no contradiction, but it is one at width 1
        else:
            _forget_derived_dims(model.graph)
            model = infer_shapes(model, label)
    rounds = 0
    taken: dict[str, str] = rescued[1] if rescued is not None else {}
    if rescued is None and _needs_data_prop(model):  # (else no node computes a value a shape depends on: nothing to fold)
        model, rounds = resolve_shapes(model, lambda m: infer_shapes(m, label), taken=taken)
    elif rescued is None and any(v is None for v in symbols.values()) and any_lost(model):
        derive(model, {k for k, v in symbols.items() if v is None})  # (formulas: :mod:`sepify.model.symdims`)
    lost = Origins(model, taken)
    if size is None and path is not None:
        size = path.stat().st_size
    return LoadedModel(model=model, path=path, file_size=size, symbols=symbols, notes=notes, unused_dims=unused, lost=lost)
