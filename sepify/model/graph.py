"""A read-only view of an ONNX graph for analysis: tensor shapes and dtypes, which tensors are
constant, producers and consumers, nested scopes for subgraphs.

Shapes come from the model after shape inference (``graph.value_info``, inputs, outputs,
initializers, ``Constant`` attributes). A dimension is an ``int``, a ``str`` (a symbol) or
``None`` (unknown).

**Constant** means: an initializer, the output of a ``Constant`` node, or the output of a
deterministic node whose inputs are all constant (``ConstantOfShape``, ``Cast``, ``Reshape``,
``Transpose``, ``DequantizeLinear`` ... of constants). Constants are tracked by name only; their
values are never materialized here, so a model with external data is analyzed without reading
the weight bytes.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

Dim = "int | str | None"
Shape = "tuple[int | str | None, ...] | None"

# Nodes with no inputs that still do not produce constants.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1"):
    if hasattr(TensorProto, _name):
        _FLOAT_TYPES.add(getattr(TensorProto, _name))


_SUB_BYTE_BITS = {"INT2": 2, "UINT2": 2, "INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}


@functools.lru_cache(maxsize=None)
def itemsize(dtype: int) -> float | None:
    """Bytes per element of an ONNX tensor dtype (sub-byte types give fractions)."""
    if dtype in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    name = TensorProto.DataType.Name(dtype)
    bits = _SUB_BYTE_BITS.get(name)
    if bits is not None:  # packed: several elements per byte
        return bits / 8
    if name.startswith("FLOAT8"):
        return 1.0
    try:
        return float(onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def is_float(dtype: int) -> bool:
    return dtype in _FLOAT_TYPES


def static_numel(shape: tuple) -> int | None:
    """Number of elements when every dim is a known int, else None."""
    n = 1
    for d in shape:
        if d.__class__ is not int:
            return None
        n *= d
    return n


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (``onnx.helper.get_attribute_value``; strings as bytes)."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class TensorInfo:
    """Shape (``None``: rank unknown) and dtype of a tensor. Tensors of the same type share one
    instance (see :class:`GraphView`), so an instance is never changed after it is made; the
    cost rules cache the dims they compute with in ``dims`` (see :mod:`sepify.cost.costs`)."""

    __slots__ = ("shape", "dtype", "dims", "numel")

    def __init__(self, shape: tuple | None, dtype: int = TensorProto.UNDEFINED):
        self.shape = shape
        self.dtype = dtype
        self.dims = None  # the shape as cost rules use it, or the reason it is unusable
        self.numel = None  # the product of ``dims``, once a rule has asked for it

    def __repr__(self) -> str:
        return f"TensorInfo(shape={self.shape!r}, dtype={self.dtype!r})"
    # (equality and hash are identity: caches key on the shared instance)


def _shape_of(t: onnx.TypeProto) -> tuple | None:
    if t.WhichOneof("value") != "tensor_type":
        return None
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return None
    return _dims_of(tt.shape.dim)


def _dims_of(dims) -> tuple:
    """ints, symbol names, or None (unknown). The common case, a non-zero ``dim_value``, costs
    one field read."""
    return tuple([d.dim_value or _zero_or_param(d) for d in dims])


def _zero_or_param(d) -> int | str | None:
    p = d.dim_param
    return p if p else (0 if d.HasField("dim_value") else None)


_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Does the node carry graph attributes? (cheap test first: only a few ops can)"""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
        return False
    return _has_graph_attribute(node)


def _has_graph_attribute(node: onnx.NodeProto) -> bool:
    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def _constant_attr_info(node: onnx.NodeProto) -> TensorInfo | None:
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeProto.TENSOR:
            return TensorInfo(tuple(int(d) for d in a.t.dims), a.t.data_type)
        if a.name == "sparse_value":
            return TensorInfo(tuple(int(d) for d in a.sparse_tensor.dims), a.sparse_tensor.values.data_type)
        if a.name == "value_float":
            return TensorInfo((), TensorProto.FLOAT)
        if a.name == "value_floats":
            return TensorInfo((len(a.floats),), TensorProto.FLOAT)
        if a.name == "value_int":
            return TensorInfo((), TensorProto.INT64)
        if a.name == "value_ints":
            return TensorInfo((len(a.ints),), TensorProto.INT64)
    return None


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Names that a node's subgraphs (If/Loop/Scan bodies, nested) read from enclosing scopes."""
    names: list[str] = []
    for _, g in subgraphs(node):
        local = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            names.extend(x for x in n.input if x and x not in local)
            names.extend(x for x in outer_inputs(n) if x not in local)
            local.update(n.output)
    return names


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in it."""
    yield graph
    for node in graph.node:
        for _, g in subgraphs(node):
            yield from all_graphs(g)


def _scoped(view: "GraphView | None", table: str, name: str):
    """Look ``name`` up in ``view.<table>``, then in the enclosing scopes."""
    while view is not None:
        found = getattr(view, table).get(name)
        if found is not None:
            return found
        view = view.outer
    return None


class GraphView:
    """Shapes, dtypes, constness, producers and consumers of one graph scope."""

    def __init__(self, graph: onnx.GraphProto, outer: "GraphView | None" = None, symbols=None, lost=None):
        self.graph = graph
        self.outer = outer
        # tensor -> why its shape is unknown (from shape resolution, :mod:`sepify.model.shapes`)
        self.lost: dict = lost if lost is not None else (outer.lost if outer else {})
        # the symbolic dims that stand for model inputs; other dim_params (``unk__3``, made by
        # shape inference for data-dependent sizes) are unknown dimensions
        self.symbols: frozenset = frozenset(symbols) if symbols is not None else (outer.symbols if outer else frozenset())
        self.nodes = list(graph.node)
        self.info: dict[str, TensorInfo] = {}
        self.const: set[str] = set()
        self.initializers: dict[str, TensorProto] = {}
        self._producer: dict[str, int] | None = None
        self._consumers: dict[str, list[int]] | None = None
        self.graph_outputs = [o.name for o in graph.output]
        self.graph_inputs = [i.name for i in graph.input]
        self._input_set = set(self.graph_inputs)

        info = self.info
        # hot: one value_info per tensor of the graph. Most tensors share a few types, so each
        # distinct serialized TypeProto is decoded once (one C call per tensor instead of ~10
        # field reads) and its TensorInfo is shared.
        by_type: dict[bytes, TensorInfo] = {}
        for vi in graph.value_info:
            t = vi.type
            key = t.SerializeToString()
            ti = by_type.get(key)
            if ti is None:
                ti = by_type[key] = TensorInfo(_shape_of(t), t.tensor_type.elem_type)
            info[vi.name] = ti
        for vi in list(graph.input) + list(graph.output):
            info[vi.name] = TensorInfo(_shape_of(vi.type), vi.type.tensor_type.elem_type)
        by_dims: dict[tuple, TensorInfo] = {}
        initializers = self.initializers
        for init in graph.initializer:
            name = init.name
            key = init.dims[:]
            key.append(init.data_type)
            key = tuple(key)
            ti = by_dims.get(key)
            if ti is None:
                ti = by_dims[key] = TensorInfo(key[:-1], key[-1])
            info[name] = ti
            initializers[name] = init
        self.const.update(initializers)
        for sp in graph.sparse_initializer:
            info[sp.values.name] = TensorInfo(tuple(int(d) for d in sp.dims), sp.values.data_type)
            self.const.add(sp.values.name)

        const = self.const
        last = self._last_use = {}  # tensor -> index of the last node that reads it
        # per node: inputs, outputs (plain lists: protobuf reads are slow), has subgraph
        self.io: list[tuple[list[str], list[str], bool]] = []
        self.ops: list[str] = []  # per node: op type
        self.domains: list[str] = []  # per node: domain ("" for the default domain)
        self.names: list[str] = []  # per node: name (may be "")
        io, ops, domains, names = self.io, self.ops, self.domains, self.names
        for idx, node in enumerate(self.nodes):
            ins = node.input[:]
            outs = node.output[:]
            op = node.op_type
            domain = node.domain
            if domain == "ai.onnx":
                domain = ""
            names.append(node.name)
            # only a few default-domain ops, and ops of other domains, can carry subgraphs
            sub = (domain != "" or op in _SUBGRAPH_OPS) and _has_graph_attribute(node)
            io.append((ins, outs, sub))
            ops.append(op)
            domains.append(domain)
            for name in ins:
                last[name] = idx
            if sub:
                for name in outer_inputs(node):
                    last[name] = idx
            if domain:
                continue
            if op == "Constant":
                const.update(outs)
                if outs[0] not in info or info[outs[0]].shape is None:
                    ci = _constant_attr_info(node)
                    if ci is not None:
                        info[outs[0]] = ci
            elif ins and not sub and op not in _NONDETERMINISTIC:
                for n in ins:  # (in sorted order, a constant of this scope is already in ``const``)
                    if n and n not in const and (outer is None or not self.is_const(n)):
                        break
                else:
                    const.update(o for o in outs if o)
        last.pop("", None)

    def distinct_infos(self) -> list[TensorInfo]:
        """Each distinct :class:`TensorInfo` of this scope once (tensors of one type share one)."""
        return list({id(t): t for t in self.info.values()}.values())

    def loses_dims(self) -> bool:
        """Did shape inference leave any tensor of this scope without a shape, or with an
        unknown or data-dependent (``unk__``) dimension?"""
        for t in self.distinct_infos():
            if t.shape is None or any(d is None or (d.__class__ is str and d.startswith("unk__")) for d in t.shape):
                return True
        return False

    @property
    def producer(self) -> dict[str, int]:
        """For each tensor made by a node of this graph, the node's index."""
        if self._producer is None:
            self._producer = {o: idx for idx, (_, outs, _) in enumerate(self.io) for o in outs if o}
        return self._producer

    @property
    def consumers(self) -> dict[str, list[int]]:
        """For each tensor, the indices of the nodes that read it (not through subgraphs)."""
        if self._consumers is None:
            consumers: dict[str, list[int]] = {}
            for idx, (ins, _, _) in enumerate(self.io):
                for name in ins:
                    if name:
                        consumers.setdefault(name, []).append(idx)
            self._consumers = consumers
        return self._consumers

    # -- lookups -------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo | None:
        t = self.info.get(name)  # hot path: the local scope first
        return t if t is not None or self.outer is None else _scoped(self.outer, "info", name)

    def shape(self, name: str) -> tuple | None:
        if not name:
            return None
        t = self.tensor(name)
        return t.shape if t else None

    def dtype(self, name: str) -> int:
        t = self.tensor(name)
        return t.dtype if t else TensorProto.UNDEFINED

    def is_const(self, name: str) -> bool:
        v = self
        while v is not None:
            if name in v.const:
                return True
            if name in v.producer or name in v._input_set:
                return False
            v = v.outer
        return False

    def initializer(self, name: str) -> TensorProto | None:
        return _scoped(self, "initializers", name)

    def producer_node(self, name: str) -> onnx.NodeProto | None:
        idx = self.producer.get(name)
        return self.nodes[idx] if idx is not None else None

    def const_value(self, name: str, base_dir: str | None = None, max_elements: int = 1 << 16) -> np.ndarray | None:
        """The value of a small constant (trip counts, shape vectors), or None.

        Only initializers and ``Constant`` nodes are read, and only when small; computed
        constants are not evaluated.
        """
        init = self.initializer(name)
        if init is not None:
            n = int(np.prod(init.dims)) if init.dims else 1
            if n > max_elements or init.data_location == TensorProto.EXTERNAL:
                return None
            return onnx.numpy_helper.to_array(init)
        v = self
        while v is not None:
            idx = v.producer.get(name)
            if idx is not None:
                node = v.nodes[idx]
                if node.op_type == "Constant":
                    try:
                        return onnx.numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0])) \
                            if node.attribute[0].type == AttributeProto.TENSOR else np.array(onnx.helper.get_attribute_value(node.attribute[0]))
                    except Exception:  # noqa: BLE001 - unusual constant: treat as unknown
                        return None
                return None
            v = v.outer
        return None

    def topological(self) -> Iterable[tuple[int, onnx.NodeProto]]:
        """Nodes in execution order (the loader has sorted the main graph already)."""
        return enumerate(self.nodes)

    def last_use(self) -> dict[str, int]:
        """For each tensor, the index of the last node that reads it (inputs of subgraphs included)."""
        return self._last_use


def unique_node_names(names: Sequence[str], ops: Sequence[str]) -> tuple[list[str], dict[int, str]]:
    """Unique names for the nodes of a graph, and {node index: own name} of the derived ones.

    A named node keeps its name unless an earlier node has it; an unnamed node is called
    ``<op>_<index>`` and a later node of a name already taken ``<name>_<index>`` (``_2``,
    ``_3``... appended if that too is taken), with ``index`` its position in the node list.
    ``sepify rewrite`` names the nodes of the model it writes the same way, so the names in
    the analysis of a model are the names in its rewritten copy."""
    out = list(names)
    if all(names) and len(set(names)) == len(names):  # the common case
        return out, {}
    used = {n for n in names if n}
    seen: set[str] = set()
    originals: dict[int, str] = {}
    for i, n in enumerate(names):
        if n and n not in seen:
            seen.add(n)
            continue
        base = f"{n or ops[i]}_{i}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        out[i] = name
        originals[i] = n
        used.add(name)
        seen.add(name)
    return out, originals
