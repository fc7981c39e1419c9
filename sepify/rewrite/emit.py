"""Emit: the graph edit of the rewritten Convs, in one of three graph forms, made directly on
the ModelProto.

The edit touches only what changes (:func:`apply`): each rewritten Conv (with the
BatchNormalization folded into it) is replaced, at its position in the node list, by the nodes
of its pair; the new weights are appended to the initializers; an initializer, value_info
entry, quantization annotation or constant-producing node that only the replaced nodes read is
removed (nothing else, a subgraph body included, reads it). Every other node, tensor and
field of the model stays byte for byte as it was: no graph library round trip, which can lose
what it does not model (node metadata_props and doc_strings, model-local functions, sparse
initializers, training_info, quantization annotations, the node order; see
``bench/roundtrip_fidelity.py``).

A rank-r factorization computes the same function in every form; the forms differ only in how
the depthwise stage is laid out for the runtime (onnxruntime's fast NCHWc depthwise kernel takes
grouped convs with one input and one output channel per group only, see docs/rewrite.md):

dw-first, D (M*r, 1, *k) group=M, P (N, Mg*r, 1..1) group=g (``D[m*r+i]`` is filter i of input
channel m; ``P[n, ml*r+i]`` its pointwise weight):

- ``native``: ``Conv(D, group=M)`` (channel multiplier r) -> ``Conv1x1(P, group=g)``.
- ``split``:  r multiplier-1 convs ``Conv(D[i::r], group=M)``, i = 0..r-1, -> Concat (for g > 1
  each output is first split into its g groups, so that the Concat orders channels as
  (group j, filter i, channel ml)) -> ``Conv1x1(P', group=g)``.
- ``tiled``:  the input repeated r times along the channels (Concat of r copies; for g > 1 of
  each group's channels, giving the same (j, i, ml) order) -> one multiplier-1 conv
  ``Conv(D', group=M*r)`` -> ``Conv1x1(P', group=g)``.

  with the permuted factors ``D'[(j, i, ml)] = D[(j*Mg + ml)*r + i]`` and
  ``P'[n, i*Mg + ml] = P[n, ml*r + i]``: channel (j, i, ml) carries the same signal, and meets the
  same pointwise weight, as channel (j*Mg + ml)*r + i of the native form. Exact permutations:
  every form is exact wherever native is (e.g. at full rank).

pw-first, Q (N*r, Mg, 1..1) group=g, S (N, r, *k) group=N (``Q[n*r+i]`` feeds filter ``S[n, i]``):

- ``native``: ``Conv1x1(Q, group=g)`` -> ``Conv(S, group=N)`` (r input channels per group).
- ``split``:  for each i, ``Conv1x1(Q[i::r], group=g)`` (the N rows of filter i) ->
  ``Conv(S[:, i:i+1], group=N)`` (multiplier 1), the r results summed by a chain of binary Adds
  (``((s_0 + s_1) + s_2) + ...``). No Split: onnxruntime's NCHWc layout has no Split (a Split
  costs a reorder to NCHW and back); each Add is fused into the conv before it and the
  activation after the pair into the last conv (checked in bench/bench_speedup.py).
- ``tiled``:  ``Conv1x1(Q', group=g)`` -> one multiplier-1 conv ``Conv(S', group=N*r)`` ->
  Split into g*r parts -> Sum over i (then Concat over the groups when g > 1),
  ``Q'[(j, i, nl)] = Q[(j*Ng + nl)*r + i]``, ``S'[(j, i, nl)] = S[j*Ng + nl, i]``.

  The bias goes to the convs of filter i = 0 only (zeros elsewhere in ``tiled``). ``tiled`` ends
  with a Split, which onnxruntime runs in NCHW (reorders around it): measure it in context.

At rank 1 the three forms are the same graph; it is emitted (and reported) as ``native``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..model.graph import all_graphs, has_subgraph, outer_inputs
from .plan import Candidate

FORMS = ("native", "split", "tiled")
FORM_CHOICES = FORMS + ("auto",)


class _Names:
    def __init__(self, model: onnx.ModelProto | None = None):
        self.used: set[str] = set()
        if model is None:
            return
        for g in all_graphs(model.graph):
            self.used.update(n.name for n in g.node)
            self.used.update(o for n in g.node for o in n.output)
            self.used.update(i.name for i in g.initializer)
            self.used.update(i.name for i in g.input)
            self.used.update(v.name for v in g.value_info)
            self.used.update(t.values.name for t in g.sparse_initializer)

    def make(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


# --- permutations of the factors (pure numpy) --------------------------------------------------
def dw_permuted(d: np.ndarray, p: np.ndarray, group: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """dw-first factors in the (group j, filter i, channel ml) channel order of ``split``/``tiled``."""
    m_r, sp = d.shape[0], d.shape[2:]
    mg = m_r // rank // group
    d2 = d.reshape(group, mg, rank, 1, *sp).transpose(0, 2, 1, 3, *range(4, 4 + len(sp))).reshape(d.shape)
    n, ones = p.shape[0], p.shape[2:]
    p2 = p.reshape(n, mg, rank, *ones).transpose(0, 2, 1, *range(3, 3 + len(ones))).reshape(p.shape)
    return np.ascontiguousarray(d2), np.ascontiguousarray(p2)


def pw_permuted(q: np.ndarray, s: np.ndarray, group: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """pw-first factors with the mid channels in (group j, filter i, channel nl) order: Q' (N*r, Mg, ..)
    and S' (N*r, 1, *k) for ``tiled`` (``split`` takes S' in r slices of N rows per group)."""
    n, sp = s.shape[0], s.shape[2:]
    ng = n // group
    q2 = q.reshape(group, ng, rank, *q.shape[1:]).transpose(0, 2, 1, *range(3, 3 + q.ndim - 1)).reshape(q.shape)
    s2 = s.reshape(group, ng, rank, *sp).transpose(0, 2, 1, *range(3, 3 + len(sp))).reshape(n * rank, 1, *sp)
    return np.ascontiguousarray(q2), np.ascontiguousarray(s2)


# --- the new nodes of one pair ------------------------------------------------------------------
def _split_attrs(opset: int, parts: int) -> dict:
    # opset >= 18 needs num_outputs (or a split input); before, the outputs' count splits equally
    return {"axis": 1, **({"num_outputs": parts} if opset >= 18 else {})}


@dataclass
class Pair:
    """The nodes (in execution order) and the new initializers computing one Conv's output."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def emit_pair(x: str, y: str, first_w: np.ndarray, second_w: np.ndarray, bias: np.ndarray | None, *,
              spatial_attrs: dict, group: int, orientation: str, rank: int, form: str, names: _Names,
              base: str, opset: int) -> Pair:
    """The nodes computing tensor ``y`` from tensor ``x`` with the factors of one rank-``rank``
    conv in ``form``, and their weights (new names from ``names``, derived from ``base``)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    if rank == 1:
        form = "native"
    dtype = first_w.dtype
    nd = first_w.ndim - 2
    point_attrs = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd), "dilations": [1] * nd}
    out = Pair()

    def var(label: str) -> str:
        return names.make(f"{base}/{label}")

    def const(label: str, arr: np.ndarray) -> str:
        name = names.make(f"{base}/{label}")
        out.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype, copy=False)), name))
        return name

    def node(op: str, label: str, inputs, outputs, attrs=None) -> None:
        name = names.make(f"{base}/{label}")
        out.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **(attrs or {})))

    def split(t, parts: int, label: str) -> list:
        if parts == 1:
            return [t]
        outs = [var(f"{label}_out{k}") for k in range(parts)]
        node("Split", label, [t], outs, _split_attrs(opset, parts))
        return outs

    def concat(ts: list, label: str, out_name=None):
        if len(ts) == 1 and out_name is None:
            return ts[0]
        out_name = out_name if out_name is not None else var(f"{label}_out")
        node("Concat", label, ts, [out_name], {"axis": 1})
        return out_name

    b = [const("bias", bias)] if bias is not None else []
    if orientation == "dw-first":
        m = first_w.shape[0] // rank
        if form == "native":
            mid = var("depthwise_out")
            node("Conv", "depthwise", [x, const("depthwise.weight", first_w)], [mid], dict(spatial_attrs, group=m))
            p = second_w
        else:
            d2, p = dw_permuted(first_w, second_w, group, rank)
            if form == "split":
                outs = []
                for i in range(rank):
                    o = var(f"depthwise_{i}_out")
                    di = first_w[i::rank]  # filter i of every input channel, in channel order
                    node("Conv", f"depthwise_{i}", [x, const(f"depthwise_{i}.weight", di)], [o], dict(spatial_attrs, group=m))
                    outs.append(split(o, group, f"depthwise_{i}_split"))
                mid = concat([outs[i][j] for j in range(group) for i in range(rank)], "concat")
            else:  # tiled
                parts = split(x, group, "input_split")
                tiled = concat([parts[j] for j in range(group) for _ in range(rank)], "tile")
                mid = var("depthwise_out")
                node("Conv", "depthwise", [tiled, const("depthwise.weight", d2)], [mid], dict(spatial_attrs, group=m * rank))
        node("Conv", "pointwise", [mid, const("pointwise.weight", p)] + b, [y], dict(point_attrs, group=group))
        return out

    n = second_w.shape[0]
    ng = n // group
    if form == "native":
        mid = var("pointwise_out")
        node("Conv", "pointwise", [x, const("pointwise.weight", first_w)], [mid], dict(point_attrs, group=group))
        node("Conv", "spatial", [mid, const("spatial.weight", second_w)] + b, [y], dict(spatial_attrs, group=n))
        return out
    if form == "split":
        # r pointwise convs Q_i = Q[i::r] (the rows of filter i, in output-channel order, so the
        # groups need no reordering), r multiplier-1 spatial convs S[:, i], and a chain of binary
        # Adds: no Split (onnxruntime keeps no Split in its NCHWc layout), and every Add follows
        # the conv that produced one of its inputs, so the NCHWc transformer fuses it into that
        # conv (its "Sum" input) and the activation after the pair into the last one
        acc = None
        for i in range(rank):
            pi = var(f"pointwise_{i}_out")
            node("Conv", f"pointwise_{i}", [x, const(f"pointwise_{i}.weight", first_w[i::rank])], [pi],
                 dict(point_attrs, group=group))
            o = var(f"spatial_{i}_out")
            node("Conv", f"spatial_{i}", [pi, const(f"spatial_{i}.weight", second_w[:, i:i + 1])] + (b if i == 0 else []),
                 [o], dict(spatial_attrs, group=n))
            if acc is None:
                acc = o
                continue
            acc_out = y if i == rank - 1 else var(f"add_{i}_out")
            node("Add", f"add_{i}", [acc, o], [acc_out])
            acc = acc_out
        return out
    q2, s2 = pw_permuted(first_w, second_w, group, rank)
    mid = var("pointwise_out")
    node("Conv", "pointwise", [x, const("pointwise.weight", q2)], [mid], dict(point_attrs, group=group))
    # tiled: one multiplier-1 conv over the N*r mid channels, then the sums over i
    bt = []
    if bias is not None:
        full = np.zeros((group, rank, ng), dtype=dtype)
        full[:, 0, :] = bias.reshape(group, ng)
        bt = [const("bias", full.reshape(-1))]
    dwo = var("spatial_out")
    node("Conv", "spatial", [mid, const("spatial.weight", s2)] + bt, [dwo], dict(spatial_attrs, group=n * rank))
    parts = split(dwo, group * rank, "split")
    if group == 1:
        node("Sum", "sum", parts, [y])
        return out
    sums = []
    for j in range(group):
        s = var(f"sum_{j}_out")
        node("Sum", f"sum_{j}", parts[j * rank:(j + 1) * rank], [s])
        sums.append(s)
    concat(sums, "concat", out_name=y)
    return out


def _spatial_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


@dataclass
class Replacement:
    """One rewritten Conv: the name of the Conv node, of the BatchNormalization folded into it
    (or None), and the pair that replaces them."""

    conv: str
    bn: str | None
    pair: Pair
    conv_output: str = ""  # the Conv's output tensor (tells the node apart from a namesake)


def build(c: Candidate, orientation: str, rank: int, names: _Names, form: str = "native",
          factors: tuple[np.ndarray, np.ndarray] | None = None, bias: np.ndarray | None = None,
          opset: int = 13) -> Replacement:
    """The replacement of the Conv ``c`` (and its folded BN) by its two factor convs in ``form``:
    the pair reads the Conv's input and writes the tensor the Conv (or the BN) wrote, so its
    consumers are unchanged. ``factors``/``bias``: the (first, second) factor weights and the
    bias to emit (default: the weight-SVD factors at ``rank`` and the candidate's bias)."""
    first_w, second_w = factors if factors is not None else c.spectra[orientation].factors(rank)
    if factors is None:
        bias = c.bias
    x = c.node.input[0]
    y = c.bn.output[0] if c.bn is not None else c.node.output[0]
    spatial = _spatial_attrs({a.name: helper.get_attribute_value(a) for a in c.node.attribute})
    base = c.node.name or f"conv{c.index}"
    pair = emit_pair(x, y, first_w, second_w, bias, spatial_attrs=spatial, group=c.group, orientation=orientation,
                     rank=rank, form=form, names=names, base=base, opset=opset)
    return Replacement(c.node.name, c.bn.name if c.bn is not None else None, pair, c.node.output[0])


def refitted(k, weight: np.ndarray, bias: np.ndarray | None, names: _Names) -> Replacement:
    """A kept Conv ``k`` (:class:`~sepify.rewrite.plan.Kept`, with its folded BN) with refitted
    weights: one Conv of the same name and attributes reading new initializers and writing the
    tensor the Conv (or the BN) wrote. A recurrent node's input projection (``k.kind ==
    "recurrent"``): the node with a new W and B (``calibrate.recurrent_inputs``)."""
    node = onnx.NodeProto()
    node.CopyFrom(k.node)
    base = k.node.name or f"conv{k.index}"
    if getattr(k, "kind", "conv") == "recurrent":
        from .calibrate import recurrent_inputs

        w_new, b_new = recurrent_inputs(k, weight, bias)
        w = numpy_helper.from_array(w_new, names.make(f"{base}/refit/W"))
        b = numpy_helper.from_array(b_new, names.make(f"{base}/refit/B"))
        while len(node.input) < 4:
            node.input.append("")
        node.input[1], node.input[3] = w.name, b.name
        return Replacement(k.node.name, None, Pair([node], [w, b]), k.node.output[0] if k.node.output else "")
    w = numpy_helper.from_array(np.ascontiguousarray(weight), names.make(f"{base}/refit/weight"))
    inits = [w]
    del node.input[:]
    node.input.extend([k.node.input[0], w.name])
    if bias is not None:
        b = numpy_helper.from_array(np.ascontiguousarray(bias.astype(weight.dtype)), names.make(f"{base}/refit/bias"))
        inits.append(b)
        node.input.append(b.name)
    del node.output[:]
    node.output.append(k.bn.output[0] if k.bn is not None else k.node.output[0])
    return Replacement(k.node.name, k.bn.name if k.bn is not None else None, Pair([node], inits), k.node.output[0])


# --- the edit of the graph -----------------------------------------------------------------------
def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name read anywhere inside the subgraphs of the graph's nodes (an over-approximation
    of their outer-scope reads: a name a body defines itself is counted too, which only keeps
    a tensor that could have gone)."""
    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
            for g in subs:
                for inner in all_graphs(g):
                    out.update(i for m in inner.node for i in m.input)
                    out.update(o.name for o in inner.output)
    return out


def is_sorted(graph: onnx.GraphProto) -> bool:
    """Does every node read only tensors defined before it (graph inputs, initializers, earlier
    nodes' outputs; subgraphs' outer-scope reads included)?"""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for n in graph.node:
        ins = list(n.input) + (outer_inputs(n) if has_subgraph(n) else [])
        if any(t not in known for t in ins):
            return False
        known.update(n.output)
    return True


def apply(model: onnx.ModelProto, replacements: list[Replacement]) -> None:
    """Replace, in ``model.graph`` (modified in place), each Conv (and its folded BN) by its pair
    at the Conv's position, add the pairs' initializers, and remove what only the replaced
    nodes read (see the module docstring). For IR < 4, where every initializer is also a graph
    input, the inputs of removed initializers go and the new ones are added (unless the model
    lists none of its own)."""
    graph = model.graph
    index = {n.name: i for i, n in enumerate(graph.node)}
    at: dict[int, Replacement] = {}
    removed: set[int] = set()
    freed: list[str] = []
    for r in replacements:
        i = index[r.conv]
        at[i] = r
        removed.add(i)
        conv = graph.node[i]
        freed.extend(conv.input[1:])
        if r.bn is not None:
            j = index[r.bn]
            removed.add(j)
            freed.extend(graph.node[j].input[1:])
            freed.append(conv.output[0])  # the tensor between the Conv and the BN
    # readers of every tensor after the edit; subgraph and graph-output reads are never released
    keep = _subgraph_reads(graph) | {o.name for o in graph.output}
    old_ir = model.ir_version < 4
    # IR < 4 lists every initializer among the inputs; a model that does not (onnxruntime reads
    # it all the same) gets its new initializers unlisted too, as its own are
    listed = old_ir and {t.name for t in graph.initializer} <= {i.name for i in graph.input}
    if not old_ir:  # an initializer that is also a graph input is an input with a default: kept
        keep.update(i.name for i in graph.input)
    reads: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        if i not in removed:
            for t in n.input:
                reads[t] = reads.get(t, 0) + 1
    for r in replacements:
        for n in r.pair.nodes:
            for t in n.input:
                reads[t] = reads.get(t, 0) + 1
    producer = {o: i for i, n in enumerate(graph.node) if i not in removed for o in n.output if o}
    # nodes that only fed the replaced ones (a Constant weight, a DequantizeLinear chain): gone too
    gone: set[str] = set()
    stack = [t for t in freed if t]
    while stack:
        t = stack.pop()
        if not t or t in keep or reads.get(t, 0) or t in gone:
            continue
        i = producer.get(t)
        if i is None or i in removed:  # an initializer, or the output of a replaced node
            gone.add(t)
            continue
        n = graph.node[i]
        if any(o and (o in keep or reads.get(o, 0)) for o in n.output) or has_subgraph(n):
            continue
        removed.add(i)
        gone.update(o for o in n.output if o)
        for u in n.input:
            reads[u] = reads.get(u, 0) - 1
            stack.append(u)
    if at or removed:
        tail = min(min(removed, default=len(graph.node)), min(at, default=len(graph.node)))
        rebuilt = onnx.GraphProto()
        for i in range(tail, len(graph.node)):
            if i in at:
                rebuilt.node.extend(at[i].pair.nodes)
            elif i not in removed:
                rebuilt.node.append(graph.node[i])
        del graph.node[tail:]
        graph.node.extend(rebuilt.node)

    def drop(field_, name_of) -> None:
        idx = [k for k, e in enumerate(field_) if name_of(e) in gone]
        for k in reversed(idx):
            del field_[k]

    drop(graph.initializer, lambda t: t.name)
    drop(graph.value_info, lambda v: v.name)
    drop(graph.quantization_annotation, lambda a: a.tensor_name)
    if old_ir:
        drop(graph.input, lambda v: v.name)
    for r in replacements:
        graph.initializer.extend(r.pair.initializers)
        if listed:
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in r.pair.initializers)
