"""Symbolic dimensions through the ops where ONNX shape inference drops them.

ONNX shape inference keeps a symbolic dimension through ops that copy it (``Relu``,
``BatchNormalization``, ``MatMul``, ``Transpose``...) but gives up on any arithmetic: a ``Conv``
over a ``1x3xHxW`` image has an output of unknown height even with stride 1, and so does every
tensor after it. The costs of such a model were numbers at ``H = 1``, not formulas.

This stage runs after shape resolution (:mod:`sepify.model.shapes`), only when a tensor of the
main graph lost a dimension and the graph inputs have symbolic dims. It walks the graph once, in
order, and for each node with a lost output dimension:

- a **rule** of this module computes the output dims as exact formulas of the input dims, for
  the ops whose dims are arithmetic (the table below); the quotients of strided ops are the atoms
  of :mod:`sepify.cost.symbolic` (``⌈H/2⌉``);
- any other op goes to ONNX's own per-node inference
  (:func:`onnx.shape_inference.infer_node_outputs`) with the input types found so far, which
  carries the derived dims through the ops that copy dims.

A derived dimension is written into ``value_info`` as a ``dim_param`` named by its formula
(``⌈H/2⌉``, ``2·⌈H/32⌉``); the cost walk reads the name back as its polynomial
(:func:`sepify.cost.symbolic.dim_poly`). A formula that is negative with every symbol at
``CHECK_SIZE`` (1024) is not written: that tensor stays lost, and the analysis says which
dimension to bind, as before.

========================  =====================================================================
op                        output dimension (``x`` an input dimension)
========================  =====================================================================
Conv, ConvInteger,        ``floor((x + pad_begin + pad_end - dilation·(k-1) - 1)/stride) + 1``;
QLinearConv               ``auto_pad`` SAME: ``ceil(x/stride)``
MaxPool, AveragePool,     the same; ``ceil_mode``: ``ceil`` for the quotient, where the window is
LpPool                    at least ``stride + pad_end`` wide (else the last window rule needs a
                          ``max``)
ConvTranspose             ``stride·(x-1) + output_padding + dilation·(k-1) + 1 - pads``
Resize, Upsample          constant scales: ``floor(x·scale)``; constant sizes: the sizes
Pad                       constant pads: ``x + begin + end``
Slice                     constant starts/ends/steps, step > 0 (the dimension is assumed
                          at least as large as the constants, as in every valid run)
Reshape                   constant shape; ``-1`` by cancelling equal factors
Flatten, Concat, Split,   their definitions
DepthToSpace, SpaceToDepth
broadcasting ops          numpy broadcasting; two different formulas on one axis (a model
                          that runs only where they are equal) give the first operand's
========================  =====================================================================
"""

from __future__ import annotations

from collections import ChainMap
from fractions import Fraction

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper, shape_inference

from ..cost.symbolic import Num, Poly, dim_name, dim_poly, floordiv
from .graph import has_subgraph, node_attrs, static_numel, subgraphs

_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
              "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "BitShift"}
_MAX_CONST = 1 << 16


def derive(model: onnx.ModelProto, symbols: set[str]) -> int:
    """Fill the lost dimensions of ``model`` (in place, in its value_info) with formulas of the
    input symbols: the main graph, and the If/Loop/Scan bodies (nested ones too), each walked
    when its node is reached, seeing the types and constants of the enclosing scopes (ONNX
    scoping; a body's inputs hide outer names). Returns the number of tensors given a full shape."""
    g = model.graph
    if not symbols:
        return 0
    opset = {(o.domain or ""): o.version for o in model.opset_import}
    types: dict[str, onnx.TypeProto] = {}
    consts: dict[str, np.ndarray] = {}
    _scope(g, types, consts)
    return _derive_graph(g, types, consts, {}, _Ctx(symbols), opset, model.ir_version)


def _scope(g: onnx.GraphProto, types, consts) -> None:
    """The types (inputs, value_info, outputs, initializers) and small constants of ``g``."""
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.WhichOneof("value") == "tensor_type":
            types[vi.name] = vi.type
    for t in g.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT, TensorProto.DOUBLE) \
                and static_numel(t.dims) <= _MAX_CONST and t.data_location != TensorProto.EXTERNAL:
            consts[t.name] = numpy_helper.to_array(t)
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))


def _body_scope(body: onnx.GraphProto, types, consts, svals):
    """The scope of a body: its own entries first, then the enclosing ones (by lookup, not
    copied), without the outer names its inputs hide."""
    hidden = {i.name for i in body.input}
    b_types, b_consts = ChainMap({}, types), ChainMap({}, consts)
    b_svals = ChainMap({}, svals)
    if hidden & set(consts) or hidden & set(svals):  # (rare: a body input named as an outer constant)
        b_consts = {k: v for k, v in consts.items() if k not in hidden}
        b_svals = {k: v for k, v in svals.items() if k not in hidden}
    for name in hidden:
        b_types.maps[0][name] = None  # (replaced by the input's type below when it has one)
    _scope(body, b_types, b_consts)
    return b_types, b_consts, b_svals


def _derive_graph(g: onnx.GraphProto, types, consts, svals, ctx: "_Ctx", opset: dict, ir_version: int) -> int:
    """:func:`derive` on one graph, whose scope is ``types``/``consts``/``svals``."""
    value_info = {vi.name: vi for vi in g.value_info}
    outputs = {vi.name: vi for vi in g.output}
    found = 0
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            v = _constant_value(node)
            if v is not None:
                consts[node.output[0]] = v
            continue
        if has_subgraph(node):
            for _, body in subgraphs(node):
                found += _derive_graph(body, *_body_scope(body, types, consts, svals), ctx, opset, ir_version)
        if node.domain not in ("", "ai.onnx"):
            continue
        ins = [ctx.dims(types.get(x)) if x else None for x in node.input]
        vals = _Values(consts, svals)
        if node.op_type in _VALUE_RULES and node.output and node.output[0]:
            try:
                v = _VALUE_RULES[node.op_type](node, ins, vals, _attrs(node))
            except (ValueError, ZeroDivisionError, IndexError, KeyError, TypeError):
                v = None
            if v is not None and not isinstance(v, np.ndarray):  # (a scalar picked by a Gather)
                scalar = np.empty((), dtype=object)
                scalar[()] = v
                v = scalar
            if v is not None and v.size <= _MAX_VALUE:
                svals[node.output[0]] = v
        outs = [o for o in node.output if o]
        if not outs or not any(ctx.lost(types.get(o)) for o in outs):
            continue
        new: list | None = None
        rule = _RULES.get(node.op_type)
        if rule is not None:
            try:
                new = rule(node, ins, vals, _attrs(node), opset.get("", 1))
            except (ValueError, ZeroDivisionError, IndexError, KeyError, TypeError):
                new = None
        inferred = _infer(node, types, consts, opset, ir_version)
        for i, o in enumerate(node.output):
            if not o or not ctx.lost(types.get(o)):
                continue
            dims = new[i] if new is not None and i < len(new) else None
            t = inferred.get(o)
            if dims is None and t is not None:
                dims = ctx.dims(t)
            if dims is None or any(d is None for d in dims) or not _positive(dims):
                continue
            elem = _elem(types.get(o)) or _elem(t) or (_elem(types.get(node.input[0])) if node.input else 0)
            if not elem:
                continue
            tp = onnx.helper.make_tensor_type_proto(elem, [dim_name(d) for d in dims])
            types[o] = tp
            if o in outputs:
                outputs[o].type.CopyFrom(tp)
            elif o in value_info:
                value_info[o].type.CopyFrom(tp)
            else:
                vi = g.value_info.add()
                vi.name = o
                vi.type.CopyFrom(tp)
                value_info[o] = vi
            found += 1
    return found


class _Ctx:
    def __init__(self, symbols: set[str]):
        self.symbols = symbols

    def known(self, p: str) -> bool:
        return p in self.symbols or dim_poly(p) is not None

    def lost(self, t: onnx.TypeProto | None) -> bool:
        if t is None or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
            return True
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            if not (d.dim_param and self.known(d.dim_param)):
                return True
        return False

    def dims(self, t: onnx.TypeProto | None) -> tuple | None:
        """The dims as ints and Polys (None for an unknown one), or None without a shape."""
        if t is None or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
            return None
        out = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                out.append(int(d.dim_value))
            elif d.dim_param in self.symbols:
                out.append(Poly.symbol(d.dim_param))
            else:
                out.append(dim_poly(d.dim_param) if d.dim_param else None)
        return tuple(out)


def _elem(t: onnx.TypeProto | None) -> int:
    if t is None or t.WhichOneof("value") != "tensor_type":
        return 0
    return t.tensor_type.elem_type


def _positive(dims) -> bool:
    """No dimension negative at a real size (every symbol at ``CHECK_SIZE``). A formula may be
    0 or negative at small sizes — a 2-wide pool over ``⌈W/8⌉`` is 0 wide at ``W = 1``, and
    SqueezeNet's unpadded 7x7 stride-2 stem is ``⌈H/2⌉ - 3`` — the analysis then takes larger
    stand-in values for its numbers (:func:`sepify.cost.analysis.stand_in_values`)."""
    for d in dims:
        if d.__class__ is int:
            if d < 0:
                return False
        elif d.evaluate({s: CHECK_SIZE for s in d.symbols}) < 0:
            return False
    return True


#: the size at which a derived formula must be non-negative to be written
CHECK_SIZE = 1024


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeProto.TENSOR and static_numel(a.t.dims) <= _MAX_CONST:
            return numpy_helper.to_array(a.t)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
    return None


def _attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes, strings as text (``auto_pad``, ``mode``)."""
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in node_attrs(node).items()}


def _infer(node, types, consts, opset, ir_version) -> dict[str, onnx.TypeProto]:
    """ONNX's inference of one node from the types found so far ({} when it cannot run)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset.get("", 1), "")
    except Exception:  # noqa: BLE001 - an op ONNX does not know: no inference
        return {}
    in_types = {}
    for x in node.input:
        if x:
            if x not in types:
                return {}
            in_types[x] = types[x]
    data = {x: numpy_helper.from_array(consts[x], x) for x in node.input if x in consts}
    try:
        return shape_inference.infer_node_outputs(
            schema, node, in_types, data, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opset.items()],
            ir_version=ir_version or 8)
    except Exception:  # noqa: BLE001 - inference failing on one node leaves its outputs lost
        return {}


def _const(consts, node, i):
    """Input ``i`` as a constant array, or None (``consts`` may be a :class:`_Values`)."""
    if len(node.input) > i and node.input[i]:
        return consts.get(node.input[i])
    return None


class _Values:
    """Constants and symbolic shape values, looked up by tensor name. ``get``: a numpy array for
    a constant (None otherwise); ``array``: an object array of ints and Polys for either;
    ``vector``: that array as a flat list (a shape vector, a scalar as a list of one)."""

    def __init__(self, consts: dict, svals: dict):
        self.consts, self.svals = consts, svals

    def get(self, name):
        return self.consts.get(name)

    def __contains__(self, name):
        return name in self.consts

    def array(self, node, i) -> np.ndarray | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        name = node.input[i]
        v = self.svals.get(name)
        if v is not None:
            return v
        c = self.consts.get(name)
        if c is None or c.dtype.kind not in "iub":
            return None
        return c.astype(object)

    def vector(self, node, i) -> list | None:
        a = self.array(node, i)
        if a is None or a.ndim > 1:
            return None
        return list(a.ravel())


# -- symbolic values: the int shape arithmetic exporters compute shapes with ------------------------
# Values are numpy object arrays of ints and Polys (so numpy does the indexing, reshaping and
# broadcasting), started by a ``Shape`` and kept only while small (``_MAX_VALUE`` elements).

_MAX_VALUE = 64


def _registrar(table: dict, what: str):
    """A decorator ``@rule("Op", ...)`` filling ``table``; a second rule for an op is refused."""
    def rule(*ops):
        def register(fn):
            for op in ops:
                if op in table:
                    raise ValueError(f"duplicate {what} rule for {op}")
                table[op] = fn
            return fn
        return register
    return rule


_VALUE_RULES: dict = {}
_value_rule = _registrar(_VALUE_RULES, "value")


def _ints(a: np.ndarray | None) -> list[int] | None:
    if a is None or any(x.__class__ is not int for x in a.ravel()):
        return None
    return [int(x) for x in a.ravel()]


def _axes(node, vals, attrs, i, rank) -> list[int] | None:
    axes = attrs.get("axes")
    if axes is None and len(node.input) > i and node.input[i]:
        axes = _ints(vals.array(node, i))
        if axes is None:
            return None
    return None if axes is None else [a % rank for a in axes]


@_value_rule("Shape")
def _v_shape(node, ins, vals, attrs):
    x = ins[0]
    if x is None or any(d is None for d in x):
        return None
    r = len(x)
    start, end = attrs.get("start", 0), attrs.get("end", r)
    out = np.empty(len(x[slice(start, end)]), dtype=object)
    out[:] = list(x[slice(start, end)])
    return out


@_value_rule("Cast", "Identity")
def _v_same(node, ins, vals, attrs):
    return vals.array(node, 0) if node.op_type != "Cast" or attrs.get("to") != TensorProto.BOOL else None


@_value_rule("Squeeze")
def _v_squeeze(node, ins, vals, attrs):
    a = vals.array(node, 0)
    if a is None:
        return None
    axes = _axes(node, vals, attrs, 1, a.ndim)
    return a.reshape([d for i, d in enumerate(a.shape) if (d != 1 if axes is None else i not in axes)])


@_value_rule("Unsqueeze")
def _v_unsqueeze(node, ins, vals, attrs):
    a = vals.array(node, 0)
    if a is None:
        return None
    axes = _axes(node, vals, attrs, 1, a.ndim + len(attrs.get("axes") or _ints(vals.array(node, 1)) or []))
    if axes is None:
        return None
    shape = list(a.shape)
    for ax in sorted(axes):
        shape.insert(ax, 1)
    return a.reshape(shape)


@_value_rule("Reshape")
def _v_reshape(node, ins, vals, attrs):
    a, shape = vals.array(node, 0), _ints(vals.array(node, 1))
    if a is None or shape is None:
        return None
    shape = [a.shape[i] if d == 0 and not attrs.get("allowzero", 0) else d for i, d in enumerate(shape)]
    return a.reshape(shape)


@_value_rule("Flatten")
def _v_flatten(node, ins, vals, attrs):
    a = vals.array(node, 0)
    if a is None:
        return None
    axis = attrs.get("axis", 1) % (a.ndim + 1)
    return a.reshape(int(np.prod(a.shape[:axis])), -1)


@_value_rule("Transpose")
def _v_transpose(node, ins, vals, attrs):
    a = vals.array(node, 0)
    return None if a is None else np.transpose(a, attrs.get("perm"))


@_value_rule("Gather")
def _v_gather(node, ins, vals, attrs):
    a, idx = vals.array(node, 0), _const(vals, node, 1)
    if a is None or idx is None:
        return None
    return np.take(a, idx.astype(np.int64), axis=attrs.get("axis", 0))


@_value_rule("Slice")
def _v_slice(node, ins, vals, attrs):
    a = vals.array(node, 0)
    starts, ends = _ints(vals.array(node, 1)), _ints(vals.array(node, 2))
    if a is None or starts is None or ends is None:
        return None
    axes = _ints(vals.array(node, 3)) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = _ints(vals.array(node, 4)) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    if axes is None or steps is None:
        return None
    index = [slice(None)] * a.ndim
    for ax, b, e, st in zip(axes, starts, ends, steps):
        index[ax % a.ndim] = slice(b, e, st)  # (ONNX clamps the bounds as Python does)
    return a[tuple(index)]


@_value_rule("Concat")
def _v_concat(node, ins, vals, attrs):
    parts = [vals.array(node, i) for i in range(len(node.input))]
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=attrs.get("axis", 0))


def _elementwise(node, vals, fn):
    a, b = vals.array(node, 0), vals.array(node, 1)
    if a is None or b is None:
        return None
    out = np.frompyfunc(fn, 2, 1)(a, b)
    out = np.asarray(out, dtype=object)
    return None if any(x is None for x in out.ravel()) or out.size > _MAX_VALUE else out


def _div(x, y):
    if y.__class__ is int:
        return floordiv(x, y) if y > 0 else None  # (shape values are non-negative: truncation is floor)
    if len(y.terms) != 1 or x.__class__ is int:
        return None
    # by a monomial (windows·batch / windows): exact when every term of x is a multiple of it
    (my, cy), = y.terms.items()
    py = dict(my)
    out = {}
    for mx, cx in x.terms.items():
        px = dict(mx)
        if cx % cy or any(px.get(sym, 0) < k for sym, k in py.items()):
            return None
        q = {sym: k - py.get(sym, 0) for sym, k in px.items() if k - py.get(sym, 0)}
        out[tuple(sorted(q.items()))] = cx // cy
    return Poly._of(out) if any(out) else out.get((), 0)


@_value_rule("Mul")
def _v_mul(node, ins, vals, attrs):
    return _elementwise(node, vals, lambda x, y: x * y)


@_value_rule("Add")
def _v_add(node, ins, vals, attrs):
    return _elementwise(node, vals, lambda x, y: x + y)


@_value_rule("Sub")
def _v_sub(node, ins, vals, attrs):
    return _elementwise(node, vals, lambda x, y: x - y)


@_value_rule("Div")
def _v_div(node, ins, vals, attrs):
    return _elementwise(node, vals, _div)


def _mod(x, y):
    if y.__class__ is not int or y <= 0:
        return None
    return x % y if x.__class__ is int else x - floordiv(x, y) * y  # (x >= 0: a size)


@_value_rule("Mod")
def _v_mod(node, ins, vals, attrs):
    return _elementwise(node, vals, _mod)


def _equal(x, y):
    if x.__class__ is int and y.__class__ is int:
        return x == y
    if x == y:
        return True
    # a formula against a constant: a size formula is never -1 or 0 (a dim is compared with
    # the -1 of "keep this dim" in exported expand/reshape patterns)
    if (x.__class__ is int and x <= 0) or (y.__class__ is int and y <= 0):
        return False
    return None


@_value_rule("Equal")
def _v_equal(node, ins, vals, attrs):
    return _elementwise(node, vals, _equal)


@_value_rule("Where")
def _v_where(node, ins, vals, attrs):
    c, a, b = vals.array(node, 0), vals.array(node, 1), vals.array(node, 2)
    if c is None or a is None or b is None:
        return None
    return np.where(c.astype(bool), a, b).astype(object)


@_value_rule("ConstantOfShape")
def _v_constant_of_shape(node, ins, vals, attrs):
    shape = _ints(vals.array(node, 0))
    fill = 0
    for a in node.attribute:
        if a.name == "value":
            t = numpy_helper.to_array(a.t)
            if t.dtype.kind not in "iub":
                return None
            fill = int(t.ravel()[0])
    if shape is None or int(np.prod(shape)) > _MAX_VALUE:
        return None
    return np.full(shape, fill, dtype=object)


# -- rules: (node, input dims, constants, attributes, opset) -> dims of each output ----------------

_RULES: dict = {}
_rule = _registrar(_RULES, "dims")


def window(x: Num, k: int, s: int, d: int, begin: int, end: int, auto_pad: str = "NOTSET",
           ceil_mode: int = 0) -> Num | None:
    """Output size of a sliding window (Conv and pools) over ``x``, an int or a formula; None
    where it is not one formula (ceil mode whose last window may start in the padding)."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return floordiv(x + (s - 1), s)
    if auto_pad == "VALID":
        begin = end = 0
    span = x + (begin + end) - (d * (k - 1) + 1)
    if ceil_mode:
        # onnxruntime drops a last window that would start in the end padding; that never
        # happens when the window is at least ``stride + pad_end`` wide (its start is then
        # before ``x + begin``), else the size is a max() of two formulas
        if d * (k - 1) + 1 < s + end:
            return None
        return floordiv(span + (s - 1), s) + 1
    return floordiv(span, s) + 1


def _spatial(x, kernel, attrs, ceil_mode=0):
    n = len(kernel)
    if x is None or len(x) != n + 2:
        return None
    strides = attrs.get("strides") or [1] * n
    dil = attrs.get("dilations") or [1] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    out = []
    for i in range(n):
        if x[2 + i] is None:
            return None
        o = window(x[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + n], auto_pad, ceil_mode)
        if o is None:
            return None
        out.append(o)
    return out


@_rule("Conv", "ConvInteger")
def _conv(node, ins, consts, attrs, opset):
    x, w = ins[0], ins[1]
    if x is None or w is None or w[0] is None:
        return None
    kernel = attrs.get("kernel_shape") or list(w[2:])
    sp = _spatial(x, kernel, attrs)
    return None if sp is None else [(x[0], w[0], *sp)]


@_rule("QLinearConv")
def _qlinear_conv(node, ins, consts, attrs, opset):
    x, w = ins[0], ins[3] if len(ins) > 3 else None
    if x is None or w is None or w[0] is None:
        return None
    kernel = attrs.get("kernel_shape") or list(w[2:])
    sp = _spatial(x, kernel, attrs)
    return None if sp is None else [(x[0], w[0], *sp)]


@_rule("MaxPool", "AveragePool", "LpPool")
def _pool(node, ins, consts, attrs, opset):
    x = ins[0]
    sp = _spatial(x, attrs["kernel_shape"], attrs, attrs.get("ceil_mode", 0))
    if sp is None:
        return None
    return [(x[0], x[1], *sp)] * len(node.output)


@_rule("ConvTranspose")
def _conv_transpose(node, ins, consts, attrs, opset):
    x, w = ins[0], ins[1]
    if x is None or w is None or w[1] is None:
        return None
    n = len(x) - 2
    channels = w[1] * attrs.get("group", 1)
    if attrs.get("output_shape"):
        return [(x[0], channels, *attrs["output_shape"][-n:])]
    kernel = attrs.get("kernel_shape") or list(w[2:])
    strides = attrs.get("strides") or [1] * n
    dil = attrs.get("dilations") or [1] * n
    outpad = attrs.get("output_padding") or [0] * n
    pads = attrs.get("pads") or [0] * (2 * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    out = []
    for i in range(n):
        d = x[2 + i]
        if d is None:
            return None
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(d * strides[i])
        else:
            total = 0 if auto_pad == "VALID" else pads[i] + pads[i + n]
            out.append(d * strides[i] - strides[i] + outpad[i] + dil[i] * (kernel[i] - 1) + 1 - total)
    return [(x[0], channels, *out)]


def _scaled(d: Num, scale: float) -> Num | None:
    f = Fraction(float(scale))
    if f <= 0 or f.denominator > (1 << 20):
        return None
    return floordiv(d * f.numerator, f.denominator)


@_rule("Resize", "Upsample")
def _resize(node, ins, consts, attrs, opset):
    x = ins[0]
    if x is None:
        return None
    if node.op_type == "Upsample" or opset < 10 and node.op_type == "Resize":
        scales = attrs.get("scales")
        if scales is None:
            scales = _const(consts, node, 1)
        sizes = None
    else:
        scales = _const(consts, node, 2 if opset >= 11 else 1)
        sizes = consts.vector(node, 3) if opset >= 11 else None
    axes = attrs.get("axes")
    if sizes:
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return None
        out = list(x)
        for a, v in zip(axes or range(len(x)), sizes):
            out[a] = v
        return [tuple(out)]
    if scales is None or not np.size(scales):
        return None
    out = list(x)
    for a, s in zip(axes or range(len(x)), np.ravel(scales)):
        if out[a] is None:
            return None
        out[a] = _scaled(out[a], float(s))
        if out[a] is None:
            return None
    return [tuple(out)]


@_rule("Pad")
def _pad(node, ins, consts, attrs, opset):
    x = ins[0]
    pads = attrs.get("pads") if opset < 11 else consts.vector(node, 1)
    if x is None or pads is None:
        return None
    axes = _const(consts, node, 3)
    axes = list(range(len(x))) if axes is None else [int(a) % len(x) for a in np.ravel(axes)]
    n = len(axes)
    out = list(x)
    for j, a in enumerate(axes):
        if out[a] is None:
            return None
        out[a] = out[a] + (pads[j] + pads[j + n])
    return [tuple(out)]


@_rule("Slice")
def _slice(node, ins, consts, attrs, opset):
    x = ins[0]
    if x is None:
        return None
    if opset < 10:
        starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
    else:
        starts, ends = consts.vector(node, 1), consts.vector(node, 2)
        axes, steps = _const(consts, node, 3), _const(consts, node, 4)
        if len(node.input) > 3 and node.input[3] and axes is None or len(node.input) > 4 and node.input[4] and steps is None:
            return None
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [int(a) % len(x) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.ravel(steps)]
    out = list(x)
    big = 1 << 30
    for a, b, e, s in zip(axes, starts, ends, steps):
        d = out[a]
        if d is None or s <= 0:
            return None
        if d.__class__ is int and b.__class__ is int and e.__class__ is int:
            out[a] = len(range(*slice(b, e, s).indices(d)))
            continue
        # symbolic: the bounds are assumed within the dimension (as in every valid run)
        lo = d + b if b.__class__ is int and b < 0 else b
        hi = d if e.__class__ is int and e >= big else (d + e if e.__class__ is int and e < 0 else e)
        out[a] = floordiv(hi - lo + (s - 1), s)
    return [tuple(out)]


def _cancel(have: list, known: list) -> Num | None:
    """``prod(have) / prod(known)``, exact: equal factors cancel, then an integer divides."""
    have = list(have)
    rest = []
    for k in known:
        for j, h in enumerate(have):
            if h == k:
                del have[j]
                break
        else:
            rest.append(k)
    if any(r.__class__ is not int for r in rest):
        return None
    div = 1
    for r in rest:
        div *= r
    num: Num = 1
    for h in have:
        num = num * h
    if num.__class__ is int:
        return num // div if div and num % div == 0 else None
    if div == 0 or any(c % div for c in num.terms.values()):
        return None
    return Poly._of({m: c // div for m, c in num.terms.items()})


@_rule("Reshape")
def _reshape(node, ins, consts, attrs, opset):
    x, shape = ins[0], consts.vector(node, 1)
    if x is None or shape is None or any(d is None for d in x):
        return None
    out: list = []
    for i, s in enumerate(shape):
        if s.__class__ is int and s == 0 and not attrs.get("allowzero", 0):
            out.append(x[i])
        else:
            out.append(s)
    minus = [i for i, d in enumerate(out) if d.__class__ is int and d == -1]
    if len(minus) > 1:
        return None
    if minus:
        j = minus[0]
        q = _cancel(list(x), [d for i, d in enumerate(out) if i != j])
        if q is None:
            return None
        out[j] = q
    return [tuple(out)]


@_rule("Flatten")
def _flatten(node, ins, consts, attrs, opset):
    x = ins[0]
    if x is None or any(d is None for d in x):
        return None
    axis = attrs.get("axis", 1) % (len(x) + 1) if x else 0
    a: Num = 1
    b: Num = 1
    for d in x[:axis]:
        a = a * d
    for d in x[axis:]:
        b = b * d
    return [(a, b)]


@_rule("Concat")
def _concat(node, ins, consts, attrs, opset):
    shapes = [s for s in ins if s is not None]
    if len(shapes) != len([x for x in node.input if x]) or not shapes:
        return None
    axis = attrs["axis"] % len(shapes[0])
    total: Num = 0
    for s in shapes:
        if s[axis] is None:
            return None
        total = total + s[axis]
    out = list(shapes[0])
    out[axis] = total
    return [tuple(out)]


@_rule("Split")
def _split(node, ins, consts, attrs, opset):
    x = ins[0]
    if x is None:
        return None
    axis = attrs.get("axis", 0) % len(x)
    sizes = attrs.get("split") if opset < 13 else _const(consts, node, 1)
    n = len(node.output)
    if sizes is not None and np.size(sizes):
        parts = [int(v) for v in np.ravel(sizes)]
    elif x[axis] is None:
        return None
    else:
        parts = [floordiv(x[axis], n)] * n
    out = []
    for p in parts:
        s = list(x)
        s[axis] = p
        out.append(tuple(s))
    return out


@_rule("DepthToSpace", "SpaceToDepth")
def _depth_space(node, ins, consts, attrs, opset):
    x = ins[0]
    b = attrs["blocksize"]
    if x is None or len(x) != 4 or any(d is None for d in x):
        return None
    if node.op_type == "DepthToSpace":
        return [(x[0], floordiv(x[1], b * b), x[2] * b, x[3] * b)]
    return [(x[0], x[1] * (b * b), floordiv(x[2], b), floordiv(x[3], b))]


@_rule(*sorted(_BROADCAST))
def _broadcast(node, ins, consts, attrs, opset):
    shapes = [s for s in ins if s is not None]
    if len(shapes) != len([x for x in node.input if x]):
        return None
    return _broadcast_dims(shapes)


def _broadcast_dims(shapes):
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        got = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        if any(d is None for d in got):
            return None
        big = [d for d in got if not (d.__class__ is int and d == 1)]
        fixed = [d for d in big if d.__class__ is int]  # (a static size says more than a formula)
        out.append(fixed[0] if fixed else big[0] if big else 1)
    return [tuple(out)]


@_rule("Expand")
def _expand(node, ins, consts, attrs, opset):
    x, shape = ins[0], consts.vector(node, 1)
    if x is None or shape is None or any(d is None for d in x):
        return None
    return _broadcast_dims([x, tuple(shape)])


@_rule("ConstantOfShape")
def _constant_of_shape(node, ins, consts, attrs, opset):
    shape = consts.vector(node, 0)
    return None if shape is None else [tuple(shape)]


@_rule("Tile")
def _tile(node, ins, consts, attrs, opset):
    x, reps = ins[0], consts.vector(node, 1)
    if x is None or reps is None or len(reps) != len(x) or any(d is None for d in x):
        return None
    return [tuple(d * r for d, r in zip(x, reps))]


@_rule("Range")
def _range(node, ins, consts, attrs, opset):
    start, limit, delta = (consts.vector(node, i) for i in range(3))
    if not start or not limit or not delta or len(start) != 1 or len(limit) != 1 or len(delta) != 1:
        return None
    d = delta[0]
    if d.__class__ is not int or d <= 0:
        return None
    return [(floordiv(limit[0] - start[0] + (d - 1), d),)]
