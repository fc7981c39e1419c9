"""Validation after shape inference, on the graph view: names are text, no tensor has a negative
dimension, an input has no dimension of size 0, every Conv agrees with its weight. ONNX shape
inference checks none of these; each failure is a :class:`~sepify.errors.ModelError`.
"""

from __future__ import annotations

import onnx

from ..errors import ModelError


def check_input_dims(graph: onnx.GraphProto, label: str, inits: set[str]) -> None:
    """After binding: a graph input with a dimension of size 0 (given with ``--input-shape``; or
    written in the model: onnxruntime too reads it as a fixed 0) is an empty tensor, and the model has no costs to report for it: an error.
    ``inits``: the names of the initializers."""
    for vi in graph.input:
        if vi.name in inits or vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value == 0:
                raise ModelError(f"{label}: input {vi.name!r} has a dimension of size 0 (axis {axis}): an empty tensor; "
                                 f"give its shape with --input-shape {vi.name}=...")


def check_inferred_shapes(view, label: str) -> None:
    """After shape inference, on the graph view that every command builds (its dims are already
    Python tuples, so this costs little on a 50,000-node graph): every node and tensor name is
    text, and no tensor has a negative dimension (ONNX shape inference does not check it; a
    negative size would give negative costs). Each Conv is checked by :func:`check_conv`, which
    the analysis calls in its one pass over the nodes."""
    outputs = [o for _, outs, _ in view.io for o in outs]
    for what, names in (("tensor", view.info), ("tensor", view.last_use()), ("tensor", outputs), ("node", view.names)):
        try:
            "".join(names)  # one C loop; raises on a name that is bytes
        except TypeError:
            name = next(k for k in names if k.__class__ is not str)
            raise ModelError(f"{label}: the {what} name {name!r} is not valid UTF-8 text (a corrupt file?)") from None
    shapes = {t.shape for t in view.distinct_infos()}  # tensors share their type's info: test each once
    if any(s and any(d.__class__ is int and d < 0 for d in s) for s in shapes):
        name, shape = next((n, t.shape) for n, t in view.info.items()
                           if t.shape and any(d.__class__ is int and d < 0 for d in t.shape))
        raise ModelError(f"{label}: tensor {name!r} gets the negative shape {list(shape)} "
                         f"(the model is inconsistent: an input smaller than a kernel, a wrong stride or pad?)")


def check_conv(node, view, ins: list[str], outs: list[str], label: str) -> None:
    """A Conv agrees with its weight: input channels ``C == W[1] * group``, output channels a
    multiple of ``group``, output spatial size >= 1 (a zero size means the input is smaller than
    the kernel). ONNX shape inference checks none of these. A failure is a :class:`ModelError`."""
    if len(ins) < 2:
        return
    info = view.info
    x, w = info.get(ins[0]), info.get(ins[1])
    xs, ws = (x.shape if x else view.shape(ins[0])), (w.shape if w else view.shape(ins[1]))
    if not xs or not ws or len(xs) < 2 or len(ws) < 2:
        return
    group = 1
    if b"group" in node.SerializeToString():  # (one C call: most Convs have no group attribute)
        for a in node.attribute:
            if a.name == "group":
                group = a.i
                break
    if group != 1 or xs[1] != ws[1]:
        _check_conv_channels(node, label, group, ins, xs, ws)
    if outs and 0 not in xs:
        ys = view.shape(outs[0])
        if ys and 0 in ys[2:]:
            raise ModelError(f"{label}: Conv {node.name or node.op_type!r}: output {outs[0]!r} has shape {list(ys)}: "
                             f"the input {list(xs)} is smaller than the kernel")


def _check_conv_channels(node, label: str, group: int, ins: list[str], xs: tuple, ws: tuple) -> None:
    name = node.name or node.op_type
    if group < 1:
        raise ModelError(f"{label}: Conv {name!r}: group {group} is not a positive integer")
    c, cw, m = xs[1], ws[1], ws[0]
    if c.__class__ is int and cw.__class__ is int and c != cw * group:
        raise ModelError(f"{label}: Conv {name!r}: input {ins[0]!r} has {c} channels, but weight {ins[1]!r} "
                         f"of shape {list(ws)} with group {group} expects {cw * group}")
    if m.__class__ is int and m % group:
        raise ModelError(f"{label}: Conv {name!r}: weight {ins[1]!r} has {m} output channels, "
                         f"not a multiple of group {group}")
