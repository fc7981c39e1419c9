"""Emit: the graph edit of one rewritten Conv (onnx-graphsurgeon)."""

from __future__ import annotations

import numpy as np
import onnx

from ..model.graph import all_graphs
from .plan import Candidate


class _Names:
    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = set()
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


def _build(graph, gs, by_name: dict, c: Candidate, orientation: str, rank: int, names: _Names) -> list[str]:
    """Replace the Conv (and its folded BN) in the gs graph by the two factor convs.
    ``by_name``: the gs nodes by name (every top-level node is named, see :func:`_name_nodes`)."""
    node = by_name[c.node.name]
    first_w, second_w = c.spectra[orientation].factors(rank)
    attrs = dict(node.attrs)
    spatial_attrs = {k: v for k, v in attrs.items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}
    nd = c.weight.ndim - 2
    point_attrs = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd), "dilations": [1] * nd}
    x = node.inputs[0]
    if c.bn is not None:
        bn = by_name[c.bn.name]
        y = bn.outputs[0]
        bn.outputs = []
        bn.inputs = []
    else:
        y = node.outputs[0]
    node.outputs = []
    node.inputs = []
    base = c.node.name or f"conv{c.index}"
    dtype = first_w.dtype
    mid = gs.Variable(names.make(f"{base}/{'depthwise' if orientation == 'dw-first' else 'pointwise'}_out"), dtype=dtype)
    bias = None
    if c.bias is not None:
        bias = gs.Constant(names.make(f"{base}/bias"), np.ascontiguousarray(c.bias.astype(dtype)))
    if orientation == "dw-first":
        n1 = f"{base}/depthwise"
        n2 = f"{base}/pointwise"
        w1 = gs.Constant(names.make(f"{n1}.weight"), np.ascontiguousarray(first_w))
        w2 = gs.Constant(names.make(f"{n2}.weight"), np.ascontiguousarray(second_w))
        a1 = dict(spatial_attrs, group=int(c.weight.shape[1] * c.group))
        a2 = dict(point_attrs, group=c.group)
    else:
        n1 = f"{base}/pointwise"
        n2 = f"{base}/spatial"
        w1 = gs.Constant(names.make(f"{n1}.weight"), np.ascontiguousarray(first_w))
        w2 = gs.Constant(names.make(f"{n2}.weight"), np.ascontiguousarray(second_w))
        a1 = dict(point_attrs, group=c.group)
        a2 = dict(spatial_attrs, group=int(c.weight.shape[0]))
    n1, n2 = names.make(n1), names.make(n2)
    graph.nodes.append(gs.Node("Conv", name=n1, attrs=a1, inputs=[x, w1], outputs=[mid]))
    graph.nodes.append(gs.Node("Conv", name=n2, attrs=a2, inputs=[mid, w2] + ([bias] if bias is not None else []), outputs=[y]))
    return [n1, n2]
