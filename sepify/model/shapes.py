"""Shape resolution: the shapes ONNX shape inference loses, recovered before the cost walk.

Exporters compute shapes at run time: ``Shape -> Gather -> Div -> Concat -> Reshape`` (PyTorch's
channel shuffle), ``Slice`` ends computed from a ``Shape`` (``chunk``), pads computed by
``Constant -> ConstantOfShape -> Concat -> Slice`` (tf2onnx). ONNX shape inference with data
propagation follows only part of this arithmetic, and every tensor after the first lost
dimension gets an unknown (``unk__N``) size. Yet onnxruntime runs these models with every shape
static: the values are constants once the input shapes are known.

The stage runs after ONNX shape inference, only when the graph computes values that shapes
depend on (``Shape``, ``Size``, control flow, or a shape input of ``Reshape``/``Pad``/``Slice``/...
made by another node: the test that also decides data propagation, one pass over the op types)
and some tensor of the main graph lost a dimension (one scan of its value_info). A model
without computed shapes pays nothing else.

1. **fold**: evaluate, in graph order, every node whose inputs are all known values — small
   initializers and ``Constant`` outputs, ``Shape``/``Size`` of a tensor whose shape is known,
   and the outputs of nodes folded before — with onnx's reference evaluator
   (:mod:`onnx.reference`, one node at a time, results of at most 65,536 elements). A ``Shape``
   of a tensor with symbolic dims is a vector of ints and symbols; ``Gather``/``Slice`` on it
   with constant indices keep that form, so ``Gather(Shape(x), 1)`` is the constant 3 even when
   the batch is a symbol, and the symbolic entries are left for data propagation;
2. **substitute**: in a scratch copy of the graph, the folded nodes are removed and their
   results needed by the other nodes become initializers;
3. **re-infer**: ONNX shape inference (data propagation on) on the scratch copy;
4. repeat from 1 until nothing new folds (a fixpoint; at most 16 rounds).

The same runs inside ``If``/``Loop``/``Scan`` bodies (nested ones too), each body with its own
folder that also sees the known values of the enclosing scopes (ONNX scoping); each ``If``
branch is folded on its own; values a body computes from its inputs are never constants (a
``Loop``'s iteration number and carried values change every iteration), and the shape of a
carried input is used only when the body's matching output has the same static shape (see
"bodies" below). ONNX inference of a body reads no values from enclosing scopes, so in the
scratch copy a body gets ``Constant`` copies of the outer values it reads. An ``If`` whose
condition is a folded value (PyTorch's ``squeeze(d)`` of a dynamic dim:
``If(Equal(Gather(Shape(x), d), 1))``) runs one branch: in the scratch copy the dead branch
becomes a renamed copy of the live one (inference of the dead one may fail: a ``Squeeze`` of a
dim that is not 1), and the decision is returned (``taken``) for the cost walk, which counts
only the branch that runs. When strict inference of the scratch copy fails in a model with
bodies, a lenient one (nodes it cannot infer skipped) lets the next round decide such Ifs.

onnxruntime's contrib ops (``com.microsoft``: FusedConv, FusedMatMul, QuickGelu,
DynamicQuantizeLSTM, ...; see ``_SURROGATES``) have no ONNX schema: inference gives their
outputs no shape. In the scratch copy each is replaced by a standard op with the same output
shapes (a surrogate; int8 weights by float stand-ins without data), retried each round for those
that need a shape found in an earlier one (the rank of a transposed FusedMatMul operand).
Some ``ai.onnx.ml`` ops have a schema but no shape inference (Scaler, Normalizer, Imputer,
LinearRegressor, SVMRegressor, FeatureVectorizer: scikit-learn models converted by skl2onnx
start with a Scaler, and every tensor after it lost its shape): surrogates as well (a Cast, a
MatMul by a stub of the coefficients' shape, a Concat).

The shapes found are written into the model's ``value_info`` (bodies' too; a dead branch keeps
what it had); the nodes of the model are not changed (the analysis still has one row per node). Why this and not onnxruntime's
``symbolic_shape_infer``: measured on the exports in ``bench/realworld.py`` it fails outright on
a third of them (models with ``-1`` dims, ``If`` bodies, quantized ops), and takes 15-18 s on
two detection models where this stage takes milliseconds; ONNX inference plus folding recovers
every static shape of those models (figures in the README).

What remains unknown afterwards is reported with its origin: the first node whose output lost
the dimension. Ops whose output size depends on input *values* (``NonZero``,
``NonMaxSuppression``, ``TopK`` with a computed k, ``Unique``, ...) are named as making it
data-dependent; anything else is a dimension shape inference could not resolve.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..cost.symbolic import dim_poly
from .graph import all_graphs, has_subgraph, node_attrs, outer_inputs, static_numel, subgraphs
from .symdims import derive

MAX_ELEMENTS = 1 << 16  # largest value folded (shape vectors, pads, small tables)
MAX_ROUNDS = 16

# ops whose output *size* depends on the values of their data inputs
DATA_DEPENDENT = {"NonZero", "NonMaxSuppression", "Unique", "Compress", "TopK", "StringSplit",
                  "RegexFullMatch", "Loop", "Scan", "If", "SequenceAt", "SplitToSequence", "ConcatFromSequence",
                  "SequenceConstruct", "RoiAlign"}
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}


def _dims(vi: onnx.ValueInfoProto) -> tuple | None:
    t = vi.type
    if t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim)


def _input_symbols(graph: onnx.GraphProto) -> set[str]:
    out = set()
    for vi in graph.input:
        s = _dims(vi)
        if s:
            out.update(d for d in s if d.__class__ is str)
    return out


def any_lost(model: onnx.ModelProto) -> bool:
    """Does :func:`lost_tensors` find anything? The same test, fast: each distinct type of the
    main graph's value_info is read once (a 50,000-node chain has one; ~30 ms, where the full
    list takes ~370 ms), then the node outputs with no type at all."""
    g = model.graph
    symbols = _input_symbols(g)
    seen: set[bytes] = set()
    typed: set[str] = set()
    for vi in (*g.value_info, *g.output):
        typed.add(vi.name)
        key = vi.type.SerializeToString()
        if key in seen:
            continue
        seen.add(key)
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return True
        for d in tt.shape.dim:
            if not d.HasField("dim_value") and d.dim_param not in symbols and dim_poly(d.dim_param) is None:
                return True
    typed.update(t.name for t in g.initializer)
    return any(o and o not in typed for n in g.node for o in n.output)


def lost_tensors(model: onnx.ModelProto) -> list[str]:
    """Node outputs of the main graph with no shape, or with a dimension that is neither a
    number nor a symbol of the graph inputs (in graph order)."""
    g = model.graph
    symbols = _input_symbols(g)
    shapes = {vi.name: _dims(vi) for vi in (*g.value_info, *g.output)}
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    lost = []
    for n in g.node:
        for o in n.output:
            if not o:
                continue
            s = shapes.get(o)
            if s is None or any(d is None or (d.__class__ is str and d not in symbols and dim_poly(d) is None)
                                for d in s):
                lost.append(o)
    return lost


class _Folder:
    """Known values of one graph: numpy arrays, or for shape vectors with symbolic entries a
    tuple of ints and symbol names."""

    def __init__(self, model: onnx.ModelProto | None, graph: onnx.GraphProto | None = None,
                 outer: "_Folder | None" = None, hidden=()):
        """``model``: the main graph's folder; ``graph``/``outer``: a body's folder, which also
        sees the values of the enclosing scopes (not the names the body declares as its inputs)."""
        if outer is None:
            self.opset = {(o.domain or ""): o.version for o in model.opset_import}
            self.values: dict[str, np.ndarray] = {}
            self.partial: dict[str, tuple] = {}
            graph = model.graph
        else:
            self.opset = outer.opset
            hidden = frozenset(hidden)
            self.values = _Scoped(outer.values, hidden)
            self.partial = _Scoped(outer.partial, hidden)
        for t in graph.initializer:
            if t.data_location != TensorProto.EXTERNAL and static_numel(t.dims) <= MAX_ELEMENTS:
                try:
                    self.values[t.name] = numpy_helper.to_array(t)
                except Exception:  # noqa: BLE001 - an odd initializer is simply not folded
                    pass

    def fold(self, graph: onnx.GraphProto, shapes: dict[str, tuple | None]) -> set[int]:
        """Evaluate what can be; return the indices of the nodes folded (all outputs known)."""
        folded = set()
        values = self.values
        for idx, node in enumerate(graph.node):
            outs = [o for o in node.output if o]
            if not outs or all(o in values for o in outs):
                if outs:
                    folded.add(idx)
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED:
                continue
            try:
                done = self._fold_node(node, shapes)
            except Exception:  # noqa: BLE001 - an op the evaluator cannot run is left to inference
                done = False
            if done:
                folded.add(idx)
        return folded

    def _fold_node(self, node: onnx.NodeProto, shapes) -> bool:
        values, partial = self.values, self.partial
        op, ins = node.op_type, list(node.input)
        out = node.output[0]
        if op in ("Shape", "Size"):
            s = shapes.get(ins[0]) if ins else None
            if ins and ins[0] in values:
                s = values[ins[0]].shape
            if s is None:
                return False
            if op == "Size":
                if any(d.__class__ is not int for d in s):
                    return False
                values[out] = np.array(static_numel(s), dtype=np.int64)
                return True
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(s))
            vec = tuple(s[slice(start, end)])
            if any(d is None for d in vec):
                return False
            if all(d.__class__ is int for d in vec):
                values[out] = np.array(vec, dtype=np.int64)
                partial.pop(out, None)
            else:
                partial[out] = vec
            return out in values
        if ins and ins[0] in partial and ins[0] not in values and op in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Identity"):
            return self._fold_partial(node)
        if any(n and n not in values for n in ins):
            return False
        if op == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t  # (read directly: bodies hold many of them)
            if t.data_location == TensorProto.EXTERNAL or static_numel(t.dims) > MAX_ELEMENTS:
                return False
            values[out] = numpy_helper.to_array(t)
            return True
        if op == "Constant" or not ins:
            pass
        elif op == "ConstantOfShape":
            if static_numel(values[ins[0]].reshape(-1).tolist()) > MAX_ELEMENTS:
                return False
        elif op in ("Expand", "Tile", "Range"):
            pass  # checked on the result
        results = _evaluate(node, self.opset, {n: values[n] for n in ins if n})
        if any(np.asarray(r).size > MAX_ELEMENTS for r in results):
            return False
        for name, r in zip(node.output, results):
            if name:
                values[name] = np.asarray(r)
        return True

    def _fold_partial(self, node: onnx.NodeProto) -> bool:
        """Gather/Slice/Squeeze/Unsqueeze/Identity on a shape vector with symbolic entries."""
        vec = self.partial[node.input[0]]
        op, ins, values = node.op_type, node.input, self.values
        if any(n and n not in values for n in ins[1:]):
            return False
        if op == "Gather":
            idx = values[ins[1]]
            picked = [vec[int(i)] for i in idx.reshape(-1)]
            result = picked[0] if idx.ndim == 0 else tuple(picked)
        elif op == "Slice":
            if len(ins) < 3:
                return False
            starts, ends = values[ins[1]].reshape(-1), values[ins[2]].reshape(-1)
            steps = values[ins[4]].reshape(-1) if len(ins) > 4 and ins[4] else [1]
            if len(starts) != 1:
                return False
            n = len(vec)
            s, e, st = int(starts[0]), int(ends[0]), int(steps[0])
            s, e = max(min(s, n), -n - 1), max(min(e, n), -n - 1)
            result = tuple(vec[slice(s, e, st)])
        else:  # Squeeze/Unsqueeze of a 1-element vector and Identity keep the entries
            result = vec
        if result.__class__ is tuple:
            if all(d.__class__ is int for d in result):
                values[node.output[0]] = np.array(result, dtype=np.int64).reshape(-1 if op != "Squeeze" else ())
                return True
            self.partial[node.output[0]] = result
            return False
        if result.__class__ is int:
            values[node.output[0]] = np.array(result, dtype=np.int64)
            return True
        return False


class _Scoped(dict):
    """A body's own entries, then (by lookup, never copied) those of the enclosing scopes, as
    ONNX scoping says: a body sees every outer name it does not declare itself (``hidden``: its
    inputs). Writes and ``len`` are the body's own."""

    __slots__ = ("outer", "hidden")

    def __init__(self, outer, hidden=frozenset()):
        super().__init__()
        self.outer, self.hidden = outer, hidden

    def __missing__(self, key):
        if key in self.hidden:
            raise KeyError(key)
        return self.outer[key]

    def __contains__(self, key):
        return dict.__contains__(self, key) or (key not in self.hidden and key in self.outer)

    def get(self, key, default=None):
        return self[key] if key in self else default


def _evaluate(node: onnx.NodeProto, opset: dict[str, int], feeds: dict[str, np.ndarray]) -> list:
    """Run one node with onnx's reference evaluator, at the model's opset (a bare NodeProto
    would run at the newest opset: ``Unsqueeze`` with an ``axes`` attribute would fail)."""
    from onnx.reference import ReferenceEvaluator

    g = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opset.items()])
    return ReferenceEvaluator(m).run(None, feeds)


def resolve_shapes(model: onnx.ModelProto, infer, taken: dict | None = None,
                   status: dict | None = None) -> tuple[onnx.ModelProto, int]:
    """Recover lost shapes (see the module docstring). ``infer``: the caller's shape inference
    (model -> inferred model, raising on failure). Returns the model with the shapes found in
    its ``value_info`` and the number of rounds run (0: nothing was lost). ``taken``: filled
    with what the shapes decide about control flow, by the node's first output name: an ``If``
    whose condition is known -> the branch that runs (``then_branch`` or ``else_branch``); a
    ``Loop`` whose trip count is a computed value -> that count (an int). ``status["strict"]``: whether the
    last inference of the scratch copy was the caller's (strict) one and succeeded."""
    if taken is None:
        taken = {}
    if status is None:
        status = {}
    status["strict"] = False
    symbols = _input_symbols(model.graph)
    has_bodies = any(has_subgraph(n) for n in model.graph.node)
    if not lost_tensors(model) and not (has_bodies and _lost_in_bodies(model.graph, symbols)):
        return model, 0
    folder = _Folder(model)
    bodies: dict[tuple, _Folder] = {}  # the folder of each If/Loop/Scan body, by its path
    from .external import weightless_copy

    scratch = weightless_copy(model)  # (weights stubbed: each re-inference serializes the graph only)
    contrib = True  # (until a round finds no contrib op left that a surrogate could replace)
    keep_names = {o.name for o in model.graph.output}
    rounds = 0
    while rounds < MAX_ROUNDS:
        rounds += 1
        g = scratch.graph
        fresh = _add_surrogates(g) if contrib else 0
        contrib = fresh > 0 or (fresh == 0 and rounds == 1)  # (a second try: ranks known after round 1)
        fresh = max(fresh, 0)
        shapes = {vi.name: _dims(vi) for vi in (*g.value_info, *g.output, *g.input)}
        known_before = len(folder.values) + _body_count(bodies)
        folded = folder.fold(g, shapes)
        body_folded = _fold_bodies(g, folder, shapes, bodies, taken) if has_bodies else {}
        if len(folder.values) + _body_count(bodies) == known_before and rounds > 1 and not fresh:
            break
        if not folded and not any(body_folded.values()) and not fresh and not (has_bodies and rounds == 1):
            break  # (round 1 goes on with bodies: their Constant copies of outer values may be all they need;
            # so does a round with new surrogate nodes: inference on them is what they are for)
        # substitute: folded nodes out, their results read by the remaining nodes in as initializers
        remaining = [n for i, n in enumerate(g.node) if i not in folded]
        needed = {x for n in remaining for x in (*n.input, *outer_inputs(n))} | keep_names  # (bodies read outer names)
        have = {t.name for t in g.initializer}
        new_inits = [numpy_helper.from_array(folder.values[name], name)
                     for i in sorted(folded) for name in g.node[i].output
                     if name and name in needed and name not in have]
        del g.node[:]
        g.node.extend(remaining)
        g.initializer.extend(new_inits)
        if has_bodies:  # (on ``g.node``, not ``remaining``: extend copied those messages)
            _substitute_bodies(g, bodies, body_folded, taken)
        del g.value_info[:]
        for vi in g.output:  # declared output shapes are hints (a lost ``unk__N`` would be kept over
            if vi.type.WhichOneof("value") == "tensor_type":  # what inference finds; some are wrong)
                vi.type.tensor_type.ClearField("shape")
        for body in all_graphs(g):  # bodies' declared output dims too (not input symbols: re-derived)
            if body is g:
                continue
            del body.value_info[:]
            for vi in body.output:
                if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.HasField("shape"):
                    for d in vi.type.tensor_type.shape.dim:
                        if not d.HasField("dim_value") and d.dim_param not in symbols:
                            d.Clear()
        try:
            scratch = infer(scratch)
            status["strict"] = True
        except Exception:  # noqa: BLE001 - the scratch copy is a help, never a new error
            status["strict"] = False
            lenient = infer_lenient(scratch) if has_bodies else None
            if lenient is None:
                break
            scratch = lenient
        if not lost_tensors(scratch) and not (has_bodies and _lost_in_bodies(scratch.graph, symbols)):
            break
    if lost_tensors(scratch) or (has_bodies and _lost_in_bodies(scratch.graph, symbols)):
        derive(scratch, symbols)  # symbolic dims through Conv/pool/Resize arithmetic, as formulas (bodies too)
    _write_back(model, scratch, folder, bodies, taken)
    return model, rounds


# --- contrib ops ONNX inference does not know -------------------------------------------------
# onnx has no schema for onnxruntime's com.microsoft ops, so their outputs (and everything after
# them) get no shape. Where a standard op has the same output shapes, the scratch copy runs
# inference on that op instead (the model keeps its node).

def _stub(graph: onnx.GraphProto, name: str, dims) -> str:
    """A float initializer of these dims and no data (inference reads only its type)."""
    stub = onnx.TensorProto(name=f"sepify_surrogate__{name}", data_type=TensorProto.FLOAT, dims=list(dims))
    stub.data_location = TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "sepify-weightless"
    graph.initializer.append(stub)
    return stub.name


def _attrs(node: onnx.NodeProto, keep=None, drop=()) -> dict:
    return {k: v for k, v in node_attrs(node).items() if (keep is None or k in keep) and k not in drop}


def _surrogate_dq_lstm(node, graph, shapes):
    """DynamicQuantizeLSTM -> LSTM: the same inputs at positions 0 and 3-7 (X, B, sequence_lens,
    initial_h, initial_c, P) and attributes; W (D, I, 4H) and R (D, H, 4H) are int8 and
    transposed against LSTM's (D, 4H, I) / (D, 4H, H): float stubs stand in."""
    ins = list(node.input)
    if len(ins) < 3:
        return None
    w, r = shapes.get(ins[1]), shapes.get(ins[2])
    if w is None or r is None or len(w) != 3 or len(r) != 3:
        return None
    ws, rs = _stub(graph, ins[1], (w[0], w[2], w[1])), _stub(graph, ins[2], (r[0], r[2], r[1]))
    return onnx.helper.make_node("LSTM", [ins[0], ws, rs, *ins[3:8]], list(node.output), name=node.name,
                                 **_attrs(node, drop=("layout",)))


def _surrogate_dq_matmul(node, graph, shapes):
    """DynamicQuantizeMatMul (A float, B int8, scales, zero points, bias) -> MatMul(A, float B)."""
    b = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if b is None:
        return None
    return onnx.helper.make_node("MatMul", [node.input[0], _stub(graph, node.input[1], b)], [node.output[0]], name=node.name)


def _surrogate_as(op: str, n_inputs: int, keep=None, unless=()):
    """The standard op ``op`` on the first ``n_inputs`` inputs, with the attributes in ``keep``
    (none if empty; all if None); not when an attribute of ``unless`` is set (non-zero)."""
    def make(node, graph, shapes):
        a = _attrs(node)
        if any(a.get(k) for k in unless):
            return None
        ins = [x for x in list(node.input)[:n_inputs]]
        while ins and not ins[-1]:
            ins.pop()
        return onnx.helper.make_node(op, ins, [node.output[0]], name=node.name,
                                     **({} if keep == () else _attrs(node, keep=keep)))
    return make


def _surrogate_fused_matmul(node, graph, shapes):
    """FusedMatMul -> MatMul, after a Transpose of the last two axes of A (``transA``) or B
    (``transB``); the rank from the shapes known so far. (``transBatch*``: no surrogate.)"""
    a = _attrs(node)
    if a.get("transBatchA") or a.get("transBatchB") or len(node.input) < 2:
        return None
    ins, pre = list(node.input[:2]), []
    for i, flag in enumerate(("transA", "transB")):
        if not a.get(flag):
            continue
        rank = len(shapes[ins[i]]) if shapes.get(ins[i]) is not None else 0
        if rank < 2:
            return None
        t = f"sepify_surrogate__{node.output[0]}_{i}"
        pre.append(onnx.helper.make_node("Transpose", [ins[i]], [t], perm=[*range(rank - 2), rank - 1, rank - 2]))
        ins[i] = t
    return pre + [onnx.helper.make_node("MatMul", ins, [node.output[0]], name=node.name)]


def _surrogate_cast_float(node, graph, shapes):
    """An ai.onnx.ml op whose output is X's shape as float (Scaler, Normalizer) -> Cast."""
    return onnx.helper.make_node("Cast", [node.input[0]], [node.output[0]], name=node.name, to=TensorProto.FLOAT)


def _surrogate_ml_linear(count):
    """An ai.onnx.ml op with an [N, k] float output from X [N, C] (LinearRegressor: k targets;
    SVMRegressor: 1) -> Cast to float, MatMul by a (C, k) stub; ``count(attrs, C)`` gives k. X must
    be 2-D with C known."""
    def make(node, graph, shapes):
        x = shapes.get(node.input[0]) if node.input else None
        if x is None or len(x) != 2 or x[1].__class__ is not int:
            return None
        k = count(_attrs(node), x[1])
        if not k:
            return None
        cast = f"sepify_surrogate__{node.output[0]}_cast"
        return [onnx.helper.make_node("Cast", [node.input[0]], [cast], to=TensorProto.FLOAT),
                onnx.helper.make_node("MatMul", [cast, _stub(graph, node.output[0], (x[1], k))], [node.output[0]],
                                      name=node.name)]
    return make


def _surrogate_feature_vectorizer(node, graph, shapes):
    """FeatureVectorizer -> Concat on axis 1 of the inputs cast to float, when each is [N, d]
    with d its ``inputdimensions`` entry (onnxruntime pads or cuts an input to that width)."""
    dims = list(_attrs(node).get("inputdimensions") or [])
    ins = list(node.input)
    if len(dims) != len(ins):
        return None
    out = []
    for i, (x, d) in enumerate(zip(ins, dims)):
        s = shapes.get(x)
        if s is None or len(s) != 2 or s[1] != d:
            return None
        out.append(onnx.helper.make_node("Cast", [x], [f"sepify_surrogate__{node.output[0]}_{i}"], to=TensorProto.FLOAT))
    return out + [onnx.helper.make_node("Concat", [n.output[0] for n in out], [node.output[0]], name=node.name, axis=1)]


_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_SURROGATES = {
    ("com.microsoft", "DynamicQuantizeLSTM"): _surrogate_dq_lstm,
    ("com.microsoft", "DynamicQuantizeMatMul"): _surrogate_dq_matmul,
    ("com.microsoft", "FusedConv"): _surrogate_as("Conv", 3, keep=_CONV_ATTRS),
    ("com.microsoft", "FusedGemm"): _surrogate_as("Gemm", 3, keep=("alpha", "beta", "transA", "transB")),
    ("com.microsoft", "FusedMatMul"): lambda node, graph, shapes: _surrogate_fused_matmul(node, graph, shapes),
    ("com.microsoft", "QuickGelu"): _surrogate_as("Identity", 1, keep=()),
    ("com.microsoft", "Gelu"): _surrogate_as("Identity", 1, keep=()),
    ("com.microsoft", "FastGelu"): _surrogate_as("Add", 2, keep=()),  # (X + bias; X alone: Identity below)
    ("com.microsoft", "BiasGelu"): _surrogate_as("Add", 2, keep=()),
    ("com.microsoft", "BiasAdd"): _surrogate_as("Add", 2, keep=()),
    # ai.onnx.ml ops that ONNX has a schema for but no shape inference (skl2onnx's Scaler: every
    # tensor after it lost its shape)
    ("ai.onnx.ml", "Scaler"): _surrogate_cast_float,
    ("ai.onnx.ml", "Normalizer"): _surrogate_cast_float,
    ("ai.onnx.ml", "Imputer"): _surrogate_as("Identity", 1, keep=()),
    ("ai.onnx.ml", "LinearRegressor"): _surrogate_ml_linear(lambda a, c: int(a.get("targets", 1))),
    ("ai.onnx.ml", "SVMRegressor"): _surrogate_ml_linear(lambda a, c: 1),
    ("ai.onnx.ml", "FeatureVectorizer"): _surrogate_feature_vectorizer,
}
# ops of the model that shape resolution replaces by surrogates in its scratch copy (the loader
# runs the stage when one is present)
SURROGATE_OPS = frozenset(op for _, op in _SURROGATES)


def _add_surrogates(graph: onnx.GraphProto) -> int:
    """Replace, in the scratch copy (bodies included), the ops of :data:`_SURROGATES`
    that can be now (a FusedMatMul with transA needs the rank of A: known in a later round);
    return how many were (-1: the graph has none of them)."""
    every = list(all_graphs(graph))
    graphs = [g for g in every if any((n.domain, n.op_type) in _SURROGATES for n in g.node)]
    if not graphs:
        return -1
    shapes: dict = {}
    for g in every:
        shapes.update((vi.name, _dims(vi)) for vi in (*g.value_info, *g.input, *g.output))
        shapes.update((t.name, tuple(t.dims)) for t in g.initializer)
    count = 0
    for g in graphs:
        nodes = []
        for n in g.node:
            make = _SURROGATES.get((n.domain, n.op_type))
            sub = make(n, g, shapes) if make is not None else None
            if sub is None:
                nodes.append(n)
                continue
            if not isinstance(sub, list):
                sub = [sub]
            if sub[-1].op_type == "Add" and len(sub[-1].input) == 1:
                sub[-1] = onnx.helper.make_node("Identity", list(sub[-1].input), list(sub[-1].output), name=sub[-1].name)
            nodes.extend(sub)
            count += 1
        if count:
            del g.node[:]
            g.node.extend(nodes)
    return count


# --- bodies ------------------------------------------------------------------------------------
def infer_lenient(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX inference that skips the nodes it cannot infer. Used when strict inference fails on
    a scratch copy whose shapes are now known: typically in the dead branch of an ``If`` whose
    condition is decided by those shapes only in the next round (``Squeeze`` of a dim that is not
    1, in the branch run when it is)."""
    ir = model.ir_version
    try:
        model.ir_version = max(ir, 4)  # (as the loader's inference: IR < 4 reads no initializer types)
        out = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a help, never a new error
        return None
    finally:
        model.ir_version = ir
    out.ir_version = ir
    return out


# A body (If branch, Loop/Scan body) is folded like the main graph, with its own folder that
# also sees the known values of the enclosing scopes. What a body computes from its inputs is
# not a constant: a Loop's iteration number and carried values, a Scan's states and slices
# change from one iteration to the next. The *shape* of a body input is used only when it is the
# same in every iteration: a Scan slice always; a Loop/Scan carried value when the body's
# matching output has the same static shape as the input (by induction from the initial value).

def _body_path(path: tuple, node: onnx.NodeProto, key: str) -> tuple | None:
    return path + (node.output[0], key) if node.output and node.output[0] else None


def _body_count(bodies: dict) -> int:
    return sum(dict.__len__(f.values) for f in bodies.values())


def _body_shapes(node: onnx.NodeProto, body: onnx.GraphProto, outer: dict) -> _Scoped:
    shapes = _Scoped(outer)
    for vi in (*body.value_info, *body.output, *body.input):
        shapes[vi.name] = _dims(vi)
    carried: list = []
    if node.op_type == "Loop":
        carried = list(zip(body.input[2:], body.output[1:]))
    elif node.op_type == "Scan":
        n_scan = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        n_state = len(node.input) - n_scan
        carried = list(zip(body.input[:n_state], body.output[:n_state]))
    for vi_in, vi_out in carried:
        s_in, s_out = _dims(vi_in), _dims(vi_out)
        if s_in is None or s_in != s_out or any(d is None for d in s_in):
            shapes[vi_in.name] = None
    return shapes


def _branch_taken(node: onnx.NodeProto, values) -> str | None:
    """The branch an ``If`` runs when its condition is a known value (PyTorch exports
    ``squeeze(d)`` of a dynamic dim as ``If(Equal(Gather(Shape(x), d), 1))``: once the shape
    is known, one branch is dead, and ONNX inference may even fail on it)."""
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or not node.input or not node.output[0]:
        return None
    v = values.get(node.input[0])
    if v is None or np.asarray(v).size != 1:
        return None
    return "then_branch" if bool(np.asarray(v).reshape(())) else "else_branch"


def _fold_bodies(graph: onnx.GraphProto, folder: _Folder, shapes: dict, bodies: dict, taken: dict,
                 path: tuple = ()) -> dict[tuple, set[int]]:
    """Fold every body of ``graph``'s nodes (nested ones too; of an ``If`` whose condition is
    known, only the branch that runs); values only, the graphs are not changed. Returns, per
    body path, the indices of its nodes folded. Fills ``taken`` (see :func:`resolve_shapes`)."""
    out: dict[tuple, set[int]] = {}
    for node in graph.node:
        if not has_subgraph(node):
            continue
        branch = _branch_taken(node, folder.values)
        if branch is not None:
            taken[node.output[0]] = branch
        elif node.op_type == "Loop" and node.input and node.input[0] and node.output and node.output[0]:
            trips = folder.values.get(node.input[0])  # a trip count computed from shapes (Shape(x)[0])
            if trips is not None and np.asarray(trips).size == 1:
                taken[node.output[0]] = int(np.asarray(trips).reshape(()))
        for key, body in subgraphs(node):
            p = _body_path(path, node, key)
            if p is None or (branch is not None and key != branch):
                continue
            sub = bodies.get(p)
            if sub is None:
                sub = bodies[p] = _Folder(None, body, outer=folder, hidden=[i.name for i in body.input])
            body_shapes = _body_shapes(node, body, shapes)
            out[p] = sub.fold(body, body_shapes)
            out.update(_fold_bodies(body, sub, body_shapes, bodies, taken, p))
    return out


def _injectable(v: np.ndarray) -> bool:
    """An outer value worth a Constant copy inside a body: shape-like data, not weights."""
    return v.dtype.kind in "iub" or v.size <= 1024


def _substitute_bodies(graph: onnx.GraphProto, bodies: dict, folded: dict, taken: dict, path: tuple = ()) -> None:
    """In each body of ``graph`` (scratch copy): its folded nodes out (``Constant`` nodes stay
    as they are), a ``Constant`` node for each folded result still read; and a ``Constant`` copy
    of each known outer value the body reads (ONNX inference of a body reads no values from
    enclosing scopes). The dead branch of an ``If`` whose condition is known becomes a copy of
    the branch that runs (inference then gives the If the shapes of that branch)."""
    for node in graph.node:
        if not has_subgraph(node):
            continue
        branch = taken.get(node.output[0]) if node.output and node.op_type == "If" else None
        for key, body in subgraphs(node):
            p = _body_path(path, node, key)
            sub = bodies.get(p) if p is not None else None
            if sub is None or (branch is not None and key != branch):
                continue
            done = folded.get(p, ())
            remaining = [n for i, n in enumerate(body.node) if i not in done or n.op_type == "Constant"]
            produced = {o for n in remaining for o in n.output}
            local = produced | {i.name for i in body.input} | {t.name for t in body.initializer}
            needed = {x for n in remaining for x in (*n.input, *outer_inputs(n))} | {o.name for o in body.output}
            values = sub.values
            consts = []
            for i in sorted(done):
                for name in body.node[i].output:
                    if name and name in needed and name not in produced:
                        consts.append(onnx.helper.make_node("Constant", [], [name],
                                                            value=numpy_helper.from_array(values[name], name)))
                        local.add(name)
            for name in dict.fromkeys(x for n in remaining for x in n.input):
                if name and name not in local and name in values and _injectable(values[name]):
                    consts.append(onnx.helper.make_node("Constant", [], [name],
                                                        value=numpy_helper.from_array(values[name], name)))
                    local.add(name)
            if consts or len(remaining) != len(body.node):
                del body.node[:]
                body.node.extend(consts + remaining)
            _substitute_bodies(body, bodies, folded, taken, p)
        if branch is not None:
            graphs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
            dead = "else_branch" if branch == "then_branch" else "then_branch"
            if branch in graphs and dead in graphs:
                graphs[dead].CopyFrom(_renamed_copy(graphs[branch], "sepify_dead__"))


def _renamed_copy(graph: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """A copy of a body with every name it defines (nested bodies' too) prefixed: ONNX data
    propagation keys values by name, so a plain copy beside the original collides."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    local: set[str] = set()
    for g in all_graphs(out):
        local.update(i.name for i in g.input)
        local.update(t.name for t in g.initializer)
        for n in g.node:
            local.update(o for o in n.output if o)
    for g in all_graphs(out):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.name in local:
                vi.name = prefix + vi.name
        for t in g.initializer:
            t.name = prefix + t.name
        for n in g.node:
            for field in (n.input, n.output):
                for i, x in enumerate(field):
                    if x in local:
                        field[i] = prefix + x
            if n.name:
                n.name = prefix + n.name
    return out


def _lost_in_bodies(graph: onnx.GraphProto, symbols: set[str]) -> bool:
    """Does a node output inside some body have no shape, or a dimension that is neither a
    number, a symbol of the graph inputs nor a formula of them (``⌈H/2⌉``)?"""
    for body in all_graphs(graph):
        if body is graph:
            continue
        shapes = {vi.name: _dims(vi) for vi in (*body.value_info, *body.output)}
        for t in body.initializer:
            shapes[t.name] = tuple(t.dims)
        for n in body.node:
            for o in n.output:
                if o:
                    s = shapes.get(o)
                    if s is None or any(d is None or (d.__class__ is str and d not in symbols and dim_poly(d) is None)
                                        for d in s):
                        return True
    return False


def _write_back(model: onnx.ModelProto, scratch: onnx.ModelProto, folder: _Folder, bodies: dict | None = None,
                taken: dict | None = None) -> None:
    """The shapes of ``scratch`` (and of the folded values) into ``model``'s value_info and
    outputs, where they know more than what the model has."""
    symbols = _input_symbols(model.graph)

    def score(s):
        if s is None:
            return -1
        return sum(1 for d in s if d.__class__ is int or (d.__class__ is str and (d in symbols or dim_poly(d) is not None)))

    found: dict[str, onnx.ValueInfoProto] = {vi.name: vi for vi in (*scratch.graph.value_info, *scratch.graph.output)}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.value_info, *model.graph.output)}
    for name, v in folder.values.items():
        if name not in found and name not in elem:
            continue
        dtype = elem.get(name) or onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
        found[name] = onnx.helper.make_tensor_value_info(name, dtype, list(v.shape))
    for t in scratch.graph.initializer:  # substituted results
        if t.name in folder.values and t.name not in found:
            found[t.name] = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    _write_back_bodies(model.graph, scratch.graph, bodies or {}, taken or {}, score)
    current = {vi.name: vi for vi in model.graph.value_info}
    for vi in model.graph.output:
        better = found.get(vi.name)
        if better is not None and score(_dims(better)) > score(_dims(vi)):
            vi.type.CopyFrom(better.type)
    outputs = {vi.name for vi in model.graph.output}
    inits = {t.name for t in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output if o}
    for name, better in found.items():
        if name in outputs or name in inits or name not in produced:
            continue
        vi = current.get(name)
        if vi is None:
            model.graph.value_info.append(better)
        elif score(_dims(better)) > score(_dims(vi)):
            vi.type.CopyFrom(better.type)


def _write_back_bodies(graph: onnx.GraphProto, scratch: onnx.GraphProto, bodies: dict, taken: dict, score,
                       path: tuple = ()) -> None:
    """What inference found in the If/Loop/Scan bodies of ``scratch`` (with the outer shapes
    resolved), and the shapes of the values folded in them: into the value_info and output
    types of the model's same bodies, nested ones too, where they know more. (The model's
    bodies keep their nodes: the scratch ones lack the folded nodes and start with Constant
    nodes of folded values.)"""
    by_output = {n.output[0]: n for n in scratch.node if n.output and has_subgraph(n)}
    for n in graph.node:
        if not n.output or not has_subgraph(n):
            continue
        twin = by_output.get(n.output[0])
        if twin is None or twin.op_type != n.op_type:
            continue
        theirs = dict(subgraphs(twin))
        branch = taken.get(n.output[0]) if n.op_type == "If" else None
        for key, body in subgraphs(n):
            found = theirs.get(key)
            if found is None or len(found.output) != len(body.output) or (branch is not None and key != branch):
                continue  # (a dead branch keeps what it had: the scratch one is a copy of the other)
            p = _body_path(path, n, key)
            better = {vi.name: vi for vi in found.value_info}
            sub = bodies.get(p)
            elem = {vi.name: vi.type.tensor_type.elem_type for vi in (*body.value_info, *body.output)}
            for name, v in (dict.items(sub.values) if sub is not None else ()):
                if name not in better:
                    dtype = elem.get(name) or onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
                    better[name] = onnx.helper.make_tensor_value_info(name, dtype, list(v.shape))
            for vi, fvi in zip(body.output, found.output):
                if vi.name == fvi.name and score(_dims(fvi)) >= score(_dims(vi)):
                    vi.type.CopyFrom(fvi.type)
            outputs = {vi.name for vi in body.output}
            produced = {o for x in body.node for o in x.output if o}
            current = {vi.name: vi for vi in body.value_info}
            for name, vi_new in better.items():
                if name in outputs or name not in produced:
                    continue
                vi = current.get(name)
                if vi is None:
                    body.value_info.append(vi_new)
                elif score(_dims(vi_new)) > score(_dims(vi)):
                    vi.type.CopyFrom(vi_new.type)
            _write_back_bodies(body, found, bodies, taken, score, p)


def origins(model: onnx.ModelProto) -> dict[str, str]:
    """For each tensor of the main graph whose shape is still lost, why: the first node on its
    path whose output lost the dimension while its inputs had theirs, named with its op (and
    whether that op makes sizes depend on input values)."""
    lost = lost_tensors(model)
    if not lost:
        return {}
    lost_set = set(lost)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    why: dict[str, str] = {}
    for name in lost:  # graph order: a node's lost inputs are explained before its outputs
        n = producer[name]
        upstream = [x for x in n.input if x in lost_set]
        if upstream and upstream[0] in why:
            why[name] = why[upstream[0]]
            continue
        label = f"{n.op_type} {n.name!r}" if n.name else n.op_type
        if n.op_type in DATA_DEPENDENT and not (n.op_type == "TopK" and _const_input(model, n, 1)):
            why[name] = f"its size depends on the input values ({label})"
        else:
            why[name] = f"shape inference could not resolve it (first lost at {label})"
    return why


class Origins:
    """:func:`origins` of a model, computed on the first lookup (a walk that meets no unknown
    shape never pays for it)."""

    def __init__(self, model: onnx.ModelProto, taken: dict | None = None):
        self._model, self._why = model, None
        self.taken = taken or {}  # If nodes whose condition the shapes decide (see :func:`resolve_shapes`)

    def get(self, name: str, default=None):
        if self._why is None:
            self._why = origins(self._model)
        return self._why.get(name, default)


def _const_input(model: onnx.ModelProto, node: onnx.NodeProto, i: int) -> bool:
    if len(node.input) <= i:
        return False
    name = node.input[i]
    return any(t.name == name for t in model.graph.initializer) or any(
        n.op_type == "Constant" and name in n.output for n in model.graph.node)
