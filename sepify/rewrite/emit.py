"""Emit: the graph edit of one rewritten Conv (onnx-graphsurgeon), in one of three graph forms.

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
- ``split``:  ``Conv1x1(Q', group=g)`` with the rows ordered (j, i, nl) -> Split into g*r parts
  -> for each i, the N channels of filter i (Concat over the groups when g > 1) -> r
  multiplier-1 convs ``Conv(S[:, i:i+1], group=N)`` -> Sum.
- ``tiled``:  ``Conv1x1(Q', group=g)`` -> one multiplier-1 conv ``Conv(S', group=N*r)`` ->
  Split into g*r parts -> Sum over i (then Concat over the groups when g > 1),
  ``Q'[(j, i, nl)] = Q[(j*Ng + nl)*r + i]``, ``S'[(j, i, nl)] = S[j*Ng + nl, i]``.

  The bias goes to the convs of filter i = 0 only (zeros elsewhere in ``tiled``).

At rank 1 the three forms are the same graph; it is emitted (and reported) as ``native``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..model.graph import all_graphs
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


# --- the graph edit ------------------------------------------------------------------------------
def _split_attrs(opset: int, parts: int) -> dict:
    # opset >= 18 needs num_outputs (or a split input); before, the outputs' count splits equally
    return {"axis": 1, **({"num_outputs": parts} if opset >= 18 else {})}


def emit_pair(graph, gs, x, y, first_w: np.ndarray, second_w: np.ndarray, bias: np.ndarray | None, *,
              spatial_attrs: dict, group: int, orientation: str, rank: int, form: str, names: _Names,
              base: str, opset: int) -> list[str]:
    """Append the nodes computing ``y`` from ``x`` with the factors of one rank-``rank`` conv in
    ``form`` to the gs ``graph``; returns the names of the new nodes (in execution order)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    if rank == 1:
        form = "native"
    dtype = first_w.dtype
    nd = first_w.ndim - 2
    point_attrs = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd), "dilations": [1] * nd}
    new: list[str] = []

    def var(label: str):
        return gs.Variable(names.make(f"{base}/{label}"), dtype=dtype)

    def const(label: str, arr: np.ndarray):
        return gs.Constant(names.make(f"{base}/{label}"), np.ascontiguousarray(arr.astype(dtype, copy=False)))

    def node(op: str, label: str, inputs, outputs, attrs=None) -> None:
        name = names.make(f"{base}/{label}")
        graph.nodes.append(gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outputs))
        new.append(name)

    def split(t, parts: int, label: str) -> list:
        if parts == 1:
            return [t]
        outs = [var(f"{label}_out{k}") for k in range(parts)]
        node("Split", label, [t], outs, _split_attrs(opset, parts))
        return outs

    def concat(ts: list, label: str, out=None):
        if len(ts) == 1 and out is None:
            return ts[0]
        out = out if out is not None else var(f"{label}_out")
        node("Concat", label, ts, [out], {"axis": 1})
        return out

    b = [const("bias", bias)] if bias is not None else []
    if orientation == "dw-first":
        m = first_w.shape[0] // rank
        if form == "native":
            mid = var("depthwise_out")
            node("Conv", "depthwise", [x, const("depthwise.weight", first_w)], [mid], dict(spatial_attrs, group=m))
            p = second_w
        else:
            d2, p = dw_permuted(first_w, second_w, group, rank)
            mg = m // group
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
            del mg
        node("Conv", "pointwise", [mid, const("pointwise.weight", p)] + b, [y], dict(point_attrs, group=group))
        return new

    n = second_w.shape[0]
    ng = n // group
    if form == "native":
        mid = var("pointwise_out")
        node("Conv", "pointwise", [x, const("pointwise.weight", first_w)], [mid], dict(point_attrs, group=group))
        node("Conv", "spatial", [mid, const("spatial.weight", second_w)] + b, [y], dict(spatial_attrs, group=n))
        return new
    q2, s2 = pw_permuted(first_w, second_w, group, rank)
    mid = var("pointwise_out")
    node("Conv", "pointwise", [x, const("pointwise.weight", q2)], [mid], dict(point_attrs, group=group))
    if form == "split":
        parts = split(mid, group * rank, "split")  # part j*r + i: filter i of group j
        outs = []
        for i in range(rank):
            xi = concat([parts[j * rank + i] for j in range(group)], f"concat_{i}")
            o = var(f"spatial_{i}_out")
            bi = b if i == 0 else []
            node("Conv", f"spatial_{i}", [xi, const(f"spatial_{i}.weight", second_w[:, i:i + 1])] + bi, [o],
                 dict(spatial_attrs, group=n))
            outs.append(o)
        node("Sum", "sum", outs, [y])
        return new
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
        return new
    sums = []
    for j in range(group):
        s = var(f"sum_{j}_out")
        node("Sum", f"sum_{j}", parts[j * rank:(j + 1) * rank], [s])
        sums.append(s)
    concat(sums, "concat", out=y)
    return new


def _spatial_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _build(graph, gs, by_name: dict, c: Candidate, orientation: str, rank: int, names: _Names,
           form: str = "native", factors: tuple[np.ndarray, np.ndarray] | None = None,
           bias: np.ndarray | None = None, opset: int = 13) -> list[str]:
    """Replace the Conv (and its folded BN) in the gs graph by the two factor convs in ``form``.
    ``by_name``: the gs nodes by name (every top-level node is named, see :func:`_name_nodes`).
    ``factors``/``bias``: the (first, second) factor weights and the bias to emit (default: the
    weight-SVD factors at ``rank`` and the candidate's bias)."""
    node = by_name[c.node.name]
    first_w, second_w = factors if factors is not None else c.spectra[orientation].factors(rank)
    if factors is None:
        bias = c.bias
    x = node.inputs[0]
    if c.bn is not None:
        bn = by_name[c.bn.name]
        y = bn.outputs[0]
        bn.outputs = []
        bn.inputs = []
    else:
        y = node.outputs[0]
    spatial = _spatial_attrs(dict(node.attrs))
    node.outputs = []
    node.inputs = []
    base = c.node.name or f"conv{c.index}"
    return emit_pair(graph, gs, x, y, first_w, second_w, bias, spatial_attrs=spatial, group=c.group,
                     orientation=orientation, rank=rank, form=form, names=names, base=base, opset=opset)
