"""Plan: the eligibility rules of the rewrite.

Each Conv is checked once (:func:`plan_conv`): the result is a :class:`Candidate` (its weight,
possibly BN-folded, and its SVD spectra) or the reason it is not rewritten (a string).

Conv -> BatchNormalization with constant statistics is folded before factorizing::

    s = gamma / sqrt(var + eps);   W' = W * s[:, None, ...];   b' = (b - mean) * s + beta

so the factorized kernel is what the deployed model computes and the BN node disappears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..cost.symbolic import Poly, dim_poly, is_symbolic
from ..model.graph import GraphView, is_float, node_attrs, outer_inputs, unique_node_names
from .factorize import ORIENTATIONS, Spectrum, original_macs, spectrum
from .options import RewriteOptions


@dataclass
class Candidate:
    """An eligible Conv: its (possibly BN-folded) weight and spectra."""

    node: onnx.NodeProto
    index: int
    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    p_in: int  # batch x prod(input spatial)
    p_out: int  # batch x prod(output spatial)
    spectra: dict[str, Spectrum]
    bn: onnx.NodeProto | None = None
    original_macs: int = 0
    original_params: int = 0
    # p_in / p_out as formulas of the unbound symbols (None when static), for the report's formulas
    p_in_sym: Poly | None = None
    p_out_sym: Poly | None = None

    def _plan_positions(self) -> tuple[int, int]:
        """Positions for decisions that compare costs (is a rank cheaper than the Conv, which
        orientation is cheaper): with symbolic positions, the formulas at ``PLAN_SIZE`` for every
        unbound symbol, not at the stand-in 1, where a stride-32 map has 0 or 1 positions and
        every layer looks alike."""
        if self.p_in_sym is None and self.p_out_sym is None:
            return self.p_in, self.p_out
        at = lambda p, n: n if p is None else p.evaluate({k: PLAN_SIZE for k in p.symbols})  # noqa: E731
        return at(self.p_in_sym, self.p_in), at(self.p_out_sym, self.p_out)

    def plan_macs(self, orientation: str, rank: int) -> int:
        """MACs of the pair at ``rank``, at the planning positions (see ``_plan_positions``)."""
        return self.spectra[orientation].macs(rank, *self._plan_positions())

    def saves(self, orientation: str, rank: int) -> bool:
        """Is the pair at ``rank`` cheaper than the Conv (at the planning positions)?"""
        p_in, p_out = self._plan_positions()
        sp = self.spectra[orientation]
        return sp.macs(rank, p_in, p_out) < original_macs(sp.weight_shape, sp.group, p_out)


#: the value of each unbound symbolic dimension when costs are compared (see Candidate.saves)
PLAN_SIZE = 1024



@dataclass
class Skipped:
    name: str
    reason: str



# --- weights ---------------------------------------------------------------------------------
def _const_array(model: onnx.ModelProto, view: GraphView, name: str, base_dir: str | None) -> np.ndarray:
    """The value of a constant tensor: an initializer, a Constant node's value, or evaluated from
    the constant-only nodes that compute it (with onnx's reference evaluator)."""
    init = view.initializer(name)
    if init is not None:
        return onnx.numpy_helper.to_array(init, base_dir or "")
    needed: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [name]
    inits: dict[str, onnx.TensorProto] = {}
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        i = view.initializer(t)
        if i is not None:
            inits[t] = i
            continue
        node = view.producer_node(t)
        if node is None:
            raise ValueError(f"constant {t!r} has no producer")
        if node not in needed:
            needed.append(node)
        stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(view.nodes)}
    needed.sort(key=lambda n: order[id(n)])
    from onnx.reference import ReferenceEvaluator

    tensors = []
    for t in inits.values():
        arr = onnx.numpy_helper.to_array(t, base_dir or "")
        tensors.append(onnx.numpy_helper.from_array(arr, t.name))
    g = onnx.helper.make_graph(needed, "const", [], [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)], tensors)
    m = onnx.helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        return np.asarray(ReferenceEvaluator(m).run(None, {})[0])
    except Exception as first:  # noqa: BLE001 - e.g. no reference kernel for the model's opset
        # (onnx's reference has DequantizeLinear from opset 19 only): onnxruntime runs every opset
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        m.graph.output[0].ClearField("type")  # onnxruntime refuses an UNDEFINED element type
        try:
            return np.asarray(ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                              .run(None, {})[0])
        except Exception:  # noqa: BLE001 - report the reference evaluator's reason
            raise first from None


_attrs = node_attrs  # (the name the rewrite stages import)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


SHAPE_UNKNOWN = "input or output shape unknown"


def _selection(name: str, opts: RewriteOptions) -> str | None:
    """Why ``--include`` / ``--exclude`` leave the node ``name`` alone, or None when they allow it."""
    if opts.include and not _matches(name, opts.include):
        return "not matched by --include"
    if opts.exclude and _matches(name, opts.exclude):
        return "excluded by --exclude"
    return None


def plan_conv(model, view: GraphView, idx: int, node: onnx.NodeProto, opts: RewriteOptions,
              base_dir: str | None, values: Mapping[str, int]) -> Candidate | str:
    """Check one Conv: a :class:`Candidate`, or the reason it is not rewritten."""
    name = node.name
    refused = _selection(name, opts)
    if refused:
        return refused
    if len(node.input) < 2 or not view.is_const(node.input[1]):
        return "weight is not a constant"
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias and not view.is_const(node.input[2]):
        return "bias is not a constant"
    wshape = view.shape(node.input[1])
    if wshape is None or not all(isinstance(d, int) for d in wshape) or not 3 <= len(wshape) <= 5:
        return "weight shape unknown or not 1-D/2-D/3-D"
    if not is_float(view.dtype(node.input[1])):
        return "weight is not floating point"
    attrs = _attrs(node)
    group = int(attrs.get("group", 1))
    n_out, c_per_group = wshape[0], wshape[1]
    kernel = wshape[2:]
    if _prod(kernel) == 1:
        return "1x1 kernel (already pointwise)"
    if c_per_group == 1 and group > 1:
        return "already depthwise (group == C_in)"
    xs, ys = view.shape(node.input[0]), view.shape(node.output[0])
    if xs is None or ys is None or len(ys) != len(wshape) or len(xs) != len(wshape):
        return SHAPE_UNKNOWN

    def positions(shape):
        """batch x prod(spatial): the number at the symbols' values, and the formula (a Poly,
        or the same int when every dim is static)."""
        dims = [shape[0]] + list(shape[2:])
        out, formula = 1, 1
        for d in dims:
            if d is None:
                return None, None
            if isinstance(d, int):
                out, formula = out * d, formula * d
            elif d in values:
                out, formula = out * values[d], formula * Poly.symbol(d)
            elif (p := dim_poly(d)) is not None:  # a derived dim (⌈H/2⌉: sepify.model.symdims)
                out, formula = out * p.evaluate(values), formula * p
            else:
                return None, None
        return out, formula

    (p_in, p_in_sym), (p_out, p_out_sym) = positions(xs), positions(ys)
    if p_in is None or p_out is None:
        return SHAPE_UNKNOWN
    if p_in < 0 or p_out < 0:  # a size derived from a free dim is negative at its stand-in
        return ("input or output size negative at the stand-in values of the free dimensions "
                "(bind them with --dim NAME=VALUE)")
    got = _weights(model, view, node, opts, base_dir)
    if isinstance(got, str):
        return got
    weight, bias, bn = got
    if tuple(weight.shape) != tuple(wshape):
        return f"weight shape {tuple(weight.shape)} disagrees with inferred {tuple(wshape)}"
    orientations = ORIENTATIONS if opts.orientation == "auto" else (opts.orientation,)
    spectra = {o: spectrum(weight, group, o) for o in orientations}
    original = original_macs(wshape, group, p_out)
    return Candidate(node, idx, weight, bias, group, p_in, p_out, spectra, bn, original,
                     weight.size + (bias.size if bias is not None else 0),
                     p_in_sym if is_symbolic(p_in_sym) else None, p_out_sym if is_symbolic(p_out_sym) else None)


@dataclass
class Kept:
    """A Conv the rewrite leaves dense, whose weights a calibrated rewrite may refit to undo the
    drift of the rewritten layers before it (``factorize.refit_dense``); ``weight``/``bias``
    have a following BatchNormalization ``bn`` folded in, as a :class:`Candidate`'s."""

    node: onnx.NodeProto
    index: int
    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    bn: onnx.NodeProto | None = None
    # "conv"; or "recurrent": the INPUT projection of an LSTM / GRU / RNN (:func:`kept_recurrent`),
    # ``weight`` its W as a (D * gates * hidden, input, 1) kernel, ``bias`` the Wb half of B
    kind: str = "conv"
    gates: int = 1  # recurrent: gates per direction (LSTM 4, GRU 3, RNN 1)
    recurrent_bias: np.ndarray | None = None  # recurrent: the Rb half of B (D, G*H), None without B
    directions: int = 1  # recurrent: D, W's first axis


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def kept_recurrent(model, view: GraphView, idx: int, node: onnx.NodeProto, opts: RewriteOptions,
                   base_dir: str | None) -> Kept | None:
    """The input projection ``W x_t (+ Wb)`` of an LSTM / GRU / RNN node as a :class:`Kept` of
    kind "recurrent" when its W (and B) are float constants and --include / --exclude allow it,
    else None: a linear map of every time step's input, refitted as a 1x1 conv over the time
    steps (``factorize.refit_dense``). The recurrence (R, Rb, the gates) is left as it is."""
    gates = RECURRENT_GATES.get(node.op_type)
    if gates is None or node.domain not in ("", "ai.onnx") or len(node.input) < 3 or not node.input[0]:
        return None
    if _selection(node.name, opts):
        return None
    has_b = len(node.input) > 3 and bool(node.input[3])
    if not view.is_const(node.input[1]) or not is_float(view.dtype(node.input[1])):
        return None
    if has_b and not view.is_const(node.input[3]):
        return None
    try:
        w = _const_array(model, view, node.input[1], base_dir)
        b = _const_array(model, view, node.input[3], base_dir) if has_b else None
    except Exception:  # noqa: BLE001 - unreadable: left alone
        return None
    if w.ndim != 3 or w.shape[1] % gates or (b is not None and b.shape != (w.shape[0], 2 * w.shape[1])):
        return None
    if not np.all(np.isfinite(w)) or (b is not None and not np.all(np.isfinite(b))):
        return None
    d, gh, size = w.shape
    bias = None if b is None else np.ascontiguousarray(b[:, :gh]).reshape(-1)
    rb = None if b is None else np.ascontiguousarray(b[:, gh:])
    return Kept(node, idx, np.ascontiguousarray(w).reshape(d * gh, size, 1), bias, 1, None, "recurrent", gates, rb, d)


def kept_conv(model, view: GraphView, idx: int, node: onnx.NodeProto, opts: RewriteOptions,
              base_dir: str | None) -> Kept | None:
    """The Conv at ``idx`` as a :class:`Kept` when its weights can be refitted (float constant
    weight and bias, allowed by --include/--exclude), else None."""
    if _selection(node.name, opts):
        return None
    if len(node.input) < 2 or not view.is_const(node.input[1]) or not is_float(view.dtype(node.input[1])):
        return None
    if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
        return None
    got = _weights(model, view, node, opts, base_dir)
    if isinstance(got, str):
        return None
    weight, bias, bn = got
    if not 3 <= weight.ndim <= 5:
        return None
    return Kept(node, idx, weight, bias, int(_attrs(node).get("group", 1)), bn)


def _weights(model, view: GraphView, node: onnx.NodeProto, opts: RewriteOptions, base_dir: str | None):
    """(weight, bias or None, folded BN or None) of a Conv with constant weight (and bias), the
    following BatchNormalization folded in when ``opts.fold_batchnorm`` allows and it folds to
    finite values; or the reason (a string) they cannot be used."""
    has_bias = len(node.input) > 2 and bool(node.input[2])
    try:
        weight = _const_array(model, view, node.input[1], base_dir)
        bias = _const_array(model, view, node.input[2], base_dir) if has_bias else None
    except Exception as e:  # noqa: BLE001 - an unreadable constant is a reason, not a crash
        return f"cannot read weight ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
    bn = _foldable_bn(view, node) if opts.fold_batchnorm else None
    if bn is not None:
        try:
            folded = _fold_bn(model, view, bn, weight, bias, base_dir)
            if not all(np.all(np.isfinite(a)) for a in folded):
                raise ValueError("folding gives NaN or infinite values")
            weight, bias = folded
        except Exception:  # noqa: BLE001 - leave unfoldable BN alone
            bn = None
    if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
        return "weight or bias contains NaN or infinite values"
    return weight, bias, bn


def _foldable_bn(view: GraphView, node: onnx.NodeProto) -> onnx.NodeProto | None:
    out = node.output[0]
    users = view.consumers.get(out, [])
    if len(users) != 1 or out in view.graph_outputs:
        return None
    bn = view.nodes[users[0]]
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or bn.input[0] != out:
        return None
    if int(_attrs(bn).get("training_mode", 0)) != 0 or any(o for o in bn.output[1:]):
        return None
    if len(bn.input) < 5 or not all(view.is_const(i) for i in bn.input[1:5]):
        return None
    return bn


def _fold_bn(model, view, bn, weight, bias, base_dir):
    gamma, beta, mean, var = (_const_array(model, view, n, base_dir).astype(np.float64) for n in bn.input[1:5])
    eps = float(_attrs(bn).get("epsilon", 1e-5))
    with np.errstate(all="ignore"):  # a negative variance: NaN, and the caller does not fold
        s = gamma / np.sqrt(var + eps)
        w = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
        b0 = bias.astype(np.float64) if bias is not None else np.zeros_like(s)
        b = ((b0 - mean) * s + beta).astype(weight.dtype)
    return w, b


def _live_nodes(view: GraphView) -> set[int]:
    """Indices of the nodes whose outputs reach a graph output (subgraph reads included)."""
    live: set[int] = set()
    producer = view.producer
    stack = [producer[o] for o in view.graph_outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        ins, _, sub = view.io[i]
        stack.extend(producer[n] for n in (ins + outer_inputs(view.nodes[i]) if sub else ins) if n in producer)
    return live


def _name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed top-level nodes a name (``Conv_12``), and nodes whose name an earlier node
    already has a unique one (``conv_12``), so rows and rewrites can refer to them: the names
    :func:`~sepify.model.graph.unique_node_names` gives the analysis rows. Returns how many."""
    nodes = model.graph.node
    names, derived = unique_node_names([n.name for n in nodes], [n.op_type for n in nodes])
    for i in derived:
        nodes[i].name = names[i]
    return len(derived)
