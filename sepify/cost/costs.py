"""Per-op cost rules: one small formula per op, registered with :func:`cost_rule`.

Conventions (docs/conventions.md has the full text; tests follow it):

* **MACs** are the multiply-accumulates of the linear ops only (Conv, ConvTranspose, Gemm,
  MatMul, Einsum, their quantized forms, RNN/GRU/LSTM, attention). A bias add is not a MAC.
* **FLOPs** = 2 x MACs + the arithmetic of everything else, at a documented per-element cost
  (see ``ELEMENTWISE``), including bias adds of Conv/Gemm. Data-movement ops cost 0.
* A rule returns :class:`Cost`; when it cannot compute the cost (a shape it needs is unknown)
  it raises :class:`Unknown` with the reason. An op with no rule is unknown, never 0.

Dimensions are ``int`` or :class:`~sepify.cost.symbolic.Poly` (symbolic); rules only add and
multiply them, so a symbolic batch gives a polynomial cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import helper

from ..model.graph import GraphView
from .symbolic import Num, Poly, dim_poly, prod


class Unknown(Exception):
    """The cost of this node cannot be computed; ``str()`` says why."""


@dataclass
class Cost:
    macs: Num = 0
    flops: Num = 0
    note: str = ""


class OpContext:
    """What a rule sees: the node, its attributes, and shapes of its inputs and outputs."""

    __slots__ = ("node", "view", "ins", "outs", "_attrs")

    def __init__(self, node: onnx.NodeProto, view: GraphView, ins: list[str] | None = None,
                 outs: list[str] | None = None):
        self.node = node
        self.view = view
        self.ins = list(node.input) if ins is None else ins  # plain lists: protobuf reads are slow
        self.outs = list(node.output) if outs is None else outs
        self._attrs = None

    @property
    def attrs(self) -> dict:
        if self._attrs is None:
            self._attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute
                           if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}
        return self._attrs

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def has_input(self, i: int) -> bool:
        return len(self.ins) > i and bool(self.ins[i])

    def _info(self, name: str, what: str):
        """The tensor's :class:`~sepify.model.graph.TensorInfo` with its rule dims (ints and symbolic
        :class:`Poly`) computed: once per distinct tensor type, since tensors share their info."""
        view = self.view
        t = view.info.get(name)
        if t is None:
            t = view.tensor(name)
            if t is None:
                raise Unknown(f"shape of {what} {name!r} unknown")
        dims = t.dims
        if dims is None:
            dims = t.dims = _convert_dims(t.shape, view.symbols)
        if dims.__class__ is str:
            why = view.lost.get(name)
            raise Unknown(dims.format(what=what, name=name) + (f": {why}" if why else ""))
        return t

    def in_shape(self, i: int) -> tuple:
        if not self.has_input(i):
            raise Unknown(f"input {i} missing")
        return self._info(self.ins[i], "input").dims

    def out_shape(self, i: int = 0) -> tuple:
        if len(self.outs) <= i or not self.outs[i]:
            raise Unknown(f"output {i} missing")
        return self._info(self.outs[i], "output").dims

    def in_numel(self, i: int = 0) -> Num:
        if not self.has_input(i):
            raise Unknown(f"input {i} missing")
        t = self._info(self.ins[i], "input")
        if t.numel is None:
            t.numel = prod(t.dims)
        return t.numel

    def out_numel(self, i: int = 0) -> Num:
        if len(self.outs) <= i or not self.outs[i]:
            raise Unknown(f"output {i} missing")
        t = self._info(self.outs[i], "output")
        if t.numel is None:
            t.numel = prod(t.dims)
        return t.numel


def _convert_dims(shape: tuple | None, symbols) -> tuple | str:
    """The dims a rule computes with, or the reason (a template) they are unusable."""
    if shape is None:
        return "shape of {what} {name!r} unknown"
    out = []
    for d in shape:
        if d.__class__ is int:
            out.append(d)
        elif d is None:
            return "shape of {what} {name!r} has an unknown dimension"
        elif d in symbols:
            out.append(Poly.symbol(d))
        elif (p := dim_poly(d)) is not None:  # a derived dimension (``⌈H/2⌉``: sepify.model.symdims)
            out.append(p)
        else:
            return "shape of {what} {name!r} has an unresolved dimension " + repr(d).replace("{", "{{").replace("}", "}}")
    return tuple(out)


Rule = Callable[[OpContext], Cost]
RULES: dict[tuple[str, str], Rule] = {}


def cost_rule(*op_types: str, domain: str = "") -> Callable[[Rule], Rule]:
    """Register ``fn`` as the cost rule of ``op_types`` in ``domain``; a second rule for an op
    is refused (ValueError at import)."""

    def register(fn: Rule) -> Rule:
        for op in op_types:
            if (domain, op) in RULES:
                raise ValueError(f"duplicate cost rule for {domain + '.' if domain else ''}{op}")
            RULES[(domain, op)] = fn
        return fn

    return register


def find_rule(domain: str, op_type: str) -> Rule | None:
    return RULES.get(("" if domain == "ai.onnx" else domain, op_type))


# --- data movement: 0 MACs, 0 FLOPs ---------------------------------------------------------
DATA_MOVEMENT = (
    "Reshape", "Transpose", "Concat", "Split", "SplitToSequence", "Slice", "Gather", "GatherElements",
    "GatherND", "Scatter", "ScatterElements", "ScatterND", "Pad", "Squeeze", "Unsqueeze", "Flatten",
    "Identity", "Expand", "Tile", "Shape", "Size", "Cast", "CastLike", "DepthToSpace", "SpaceToDepth",
    "Constant", "ConstantOfShape", "Dropout", "Range", "NonZero", "OneHot", "Compress", "ReverseSequence",
    "Trilu", "Where", "EyeLike", "Unique", "SequenceConstruct", "SequenceAt", "SequenceEmpty",
    "SequenceInsert", "SequenceErase", "SequenceLength", "ConcatFromSequence", "Optional",
    "OptionalGetElement", "OptionalHasElement", "Col2Im", "CenterCropPadding", "CenterCropPad",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
    "NonMaxSuppression", "MaxRoiPool", "MaxUnpool",
)


@cost_rule(*DATA_MOVEMENT)
def _data_movement(ctx: OpContext) -> Cost:
    return Cost(0, 0)


# --- element-wise: FLOPs per output element --------------------------------------------------
ELEMENTWISE: dict[str, int] = {
    # arithmetic and comparisons: 1
    **{op: 1 for op in (
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Mean", "Sum", "Pow", "Mod", "Sqrt",
        "Reciprocal", "Exp", "Log", "Sign", "Floor", "Ceil", "Round", "Relu", "Erf", "Sin", "Cos", "Tan",
        "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Equal", "Greater", "Less",
        "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "BitShift",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "CumSum", "Shrink")},
    # two-step activations: 2
    **{op: 2 for op in ("LeakyRelu", "PRelu", "Clip", "ThresholdedRelu", "QuantizeLinear",
                         "DequantizeLinear", "BatchNormalization", "Affine", "ScaledTanh")},
    "HardSigmoid": 3, "Elu": 3, "Celu": 3, "Softplus": 3, "Softsign": 3, "Selu": 4, "Sigmoid": 4,
    "HardSwish": 4, "Tanh": 5, "Mish": 7, "Gelu": 8, "FastGelu": 8, "BiasGelu": 9, "QuickGelu": 5,
    "DynamicQuantizeLinear": 4,
}
# ops of the com.microsoft domain that are element-wise
_MS_ELEMENTWISE = ("FastGelu", "BiasGelu", "QuickGelu", "Gelu", "BiasAdd", "Affine", "ScaledTanh")
ELEMENTWISE_MS = {op: ELEMENTWISE.get(op, 1) for op in _MS_ELEMENTWISE}


def _elementwise(per_element: int) -> Rule:
    def rule(ctx: OpContext) -> Cost:
        return Cost(0, per_element * ctx.out_numel(0))

    return rule


for _op, _k in ELEMENTWISE.items():
    cost_rule(_op)(_elementwise(_k))
for _op, _k in ELEMENTWISE_MS.items():
    cost_rule(_op, domain="com.microsoft")(_elementwise(_k))

# normalizations, per element: mean 1, variance 2, normalize 2, scale and shift 2
NORMALIZATION = {"LayerNormalization": 7, "InstanceNormalization": 7, "GroupNormalization": 7,
                 "MeanVarianceNormalization": 5, "LpNormalization": 3, "RMSNormalization": 5,
                 "SimplifiedLayerNormalization": 5, "SkipLayerNormalization": 8,
                 "SkipSimplifiedLayerNormalization": 6}
for _op, _k in NORMALIZATION.items():
    cost_rule(_op)(_elementwise(_k))
    cost_rule(_op, domain="com.microsoft")(_elementwise(_k))

# softmax family, per element: max, subtract, exp, sum, divide
for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    cost_rule(_op)(_elementwise(5))


@cost_rule("LRN")
def _lrn(ctx: OpContext) -> Cost:
    size = int(ctx.attr("size", 1))
    return Cost(0, (2 * size + 3) * ctx.out_numel(0))


# --- pooling and reductions -----------------------------------------------------------------
@cost_rule("MaxPool", "AveragePool", "LpPool")
def _pool(ctx: OpContext) -> Cost:
    """Per output element: one op per kernel element."""
    kernel = ctx.attr("kernel_shape")
    if not kernel:
        raise Unknown("kernel_shape missing")
    return Cost(0, prod(kernel) * ctx.out_numel(0))


@cost_rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceSum", "ReduceMax",
           "ReduceMin", "ReduceProd", "ReduceL1", "ArgMax", "ArgMin", "TopK")
def _reduce(ctx: OpContext) -> Cost:
    """One op per input element."""
    return Cost(0, ctx.in_numel(0))


@cost_rule("ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def _reduce2(ctx: OpContext) -> Cost:
    """Two ops per input element (square or exp, then accumulate)."""
    return Cost(0, 2 * ctx.in_numel(0))


@cost_rule("Resize", "Upsample")
def _resize(ctx: OpContext) -> Cost:
    """nearest: 0 (data movement); linear: 3 per output element per resized axis; cubic: 8."""
    mode = ctx.attr("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "nearest":
        return Cost(0, 0)
    x, y = ctx.in_shape(0), ctx.out_shape(0)
    axes = sum(1 for a, b in zip(x, y) if a != b) or 1
    per_axis = 8 if mode == "cubic" else 3
    return Cost(0, per_axis * axes * prod(y))


_INTERPOLATION = {"nearest": 0, "linear": 3, "bilinear": 3, "cubic": 8, "bicubic": 8}


@cost_rule("GridSample")
def _grid_sample(ctx: OpContext) -> Cost:
    """Interpolation at the grid's points, as Resize: nearest 0; (bi)linear 3 per output
    element per spatial axis; (bi)cubic 8 (the grid's coordinate arithmetic is not counted)."""
    mode = ctx.attr("mode", "linear")  # (the default: "bilinear" before opset 20, "linear" since)
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in _INTERPOLATION:
        raise Unknown(f"GridSample mode {mode!r}")
    y = ctx.out_shape(0)
    return Cost(0, _INTERPOLATION[mode] * (len(y) - 2) * ctx.out_numel(0))


@cost_rule("RoiAlign")
def _roi_align(ctx: OpContext) -> Cost:
    """Each output element pools sampling_ratio² points, each a bilinear (or max) read of the
    feature map: 2 axes x 3 for the interpolation, plus 1 to pool it; so 7 x sampling_ratio²
    per output element. An adaptive sampling ratio (0, the default) follows each box's size,
    known only at run time: counted at 1 point per bin, a lower bound, and the row says so."""
    ratio = int(ctx.attr("sampling_ratio", 0))
    if ratio <= 0:
        return Cost(0, 7 * ctx.out_numel(0), "adaptive sampling_ratio: FLOPs at 1 sample per bin (a lower bound)")
    return Cost(0, 7 * ratio * ratio * ctx.out_numel(0))


# --- convolutions ---------------------------------------------------------------------------
def _conv_cost(ctx: OpContext, x: int, w: int, bias: int | None) -> Cost:
    """MACs = output elements x (C_in/group) x prod(kernel) = numel(Y) * prod(W.shape[1:])."""
    wshape = ctx.in_shape(w)
    if len(wshape) < 3:
        raise Unknown(f"weight rank {len(wshape)} < 3")
    y = ctx.out_numel(0)
    macs = y * prod(wshape[1:])
    flops = 2 * macs
    if bias is not None and ctx.has_input(bias):
        flops = flops + y
    return Cost(macs, flops)


@cost_rule("Conv")
def conv(ctx: OpContext) -> Cost:
    return _conv_cost(ctx, 0, 1, 2)


@cost_rule("ConvInteger")
def conv_integer(ctx: OpContext) -> Cost:
    return _conv_cost(ctx, 0, 1, None)


@cost_rule("QLinearConv")
def qlinear_conv(ctx: OpContext) -> Cost:
    return _conv_cost(ctx, 0, 3, 8)


@cost_rule("FusedConv", domain="com.microsoft")
def fused_conv(ctx: OpContext) -> Cost:
    c = _conv_cost(ctx, 0, 1, 2)
    return Cost(c.macs, c.flops + ctx.out_numel(0))  # fused activation: 1 per element


@cost_rule("ConvTranspose")
def conv_transpose(ctx: OpContext) -> Cost:
    """Counted on the *input* size: every input element is multiplied by a C_out/group x kernel
    slice of W, so MACs = numel(X) * (C_out/group) * prod(kernel) = numel(X) * prod(W.shape[1:]).
    (Counting on the output size over-counts by stride^d.)"""
    wshape = ctx.in_shape(1)
    if len(wshape) < 3:
        raise Unknown(f"weight rank {len(wshape)} < 3")
    macs = ctx.in_numel(0) * prod(wshape[1:])
    flops = 2 * macs
    if ctx.has_input(2):
        flops = flops + ctx.out_numel(0)
    return Cost(macs, flops)


# --- matrix products ------------------------------------------------------------------------
@cost_rule("Gemm")
def gemm(ctx: OpContext) -> Cost:
    """MACs = M x K x N (after transA/transB); C adds M x N FLOPs."""
    a = ctx.in_shape(0)
    if len(a) != 2:
        raise Unknown("Gemm input A is not 2-D")
    k = a[0] if ctx.attr("transA", 0) else a[1]
    y = ctx.out_numel(0)
    macs = y * k
    flops = 2 * macs + (y if ctx.has_input(2) else 0)
    return Cost(macs, flops)


def _matmul_cost(ctx: OpContext, a: int, b: int) -> Cost:
    """MACs = numel(Y) x K: every output element is a K-long dot product (batch dims broadcast)."""
    ashape = ctx.in_shape(a)
    if not ashape:
        raise Unknown("MatMul of a scalar")
    k = ashape[-1]
    try:
        y = ctx.out_numel(0)
    except Unknown:
        y = prod(_matmul_out_shape(ashape, ctx.in_shape(b)))
    macs = y * k
    return Cost(macs, 2 * macs)


def _broadcast(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        else:
            raise Unknown(f"cannot broadcast {a} with {b}")
    return tuple(out)


def _matmul_out_shape(a: tuple, b: tuple) -> tuple:
    a_vec, b_vec = len(a) == 1, len(b) == 1
    a2 = (1,) + tuple(a) if a_vec else tuple(a)
    b2 = tuple(b) + (1,) if b_vec else tuple(b)
    batch = _broadcast(a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if a_vec:
        out = out[:-2] + out[-1:]
    if b_vec:
        out = out[:-1]
    return out


@cost_rule("MatMul")
def matmul(ctx: OpContext) -> Cost:
    return _matmul_cost(ctx, 0, 1)


@cost_rule("MatMulInteger")
def matmul_integer(ctx: OpContext) -> Cost:
    return _matmul_cost(ctx, 0, 1)


@cost_rule("QLinearMatMul")
def qlinear_matmul(ctx: OpContext) -> Cost:
    return _matmul_cost(ctx, 0, 3)


@cost_rule("FusedMatMul", domain="com.microsoft")
def fused_matmul(ctx: OpContext) -> Cost:
    """alpha·op(A)·op(B), op = transpose of the last two axes when ``transA``/``transB``:
    MACs = numel(Y) x K with K the contracted length (A's second-to-last axis with transA)."""
    if ctx.attr("transBatchA", 0) or ctx.attr("transBatchB", 0):
        raise Unknown("FusedMatMul with transBatchA/transBatchB")
    a, b = list(ctx.in_shape(0)), list(ctx.in_shape(1))
    if len(a) < 2 or len(b) < 2:
        return _matmul_cost(ctx, 0, 1) if not (ctx.attr("transA", 0) or ctx.attr("transB", 0)) else _no_1d()
    if ctx.attr("transA", 0):
        a[-2], a[-1] = a[-1], a[-2]
    if ctx.attr("transB", 0):
        b[-2], b[-1] = b[-1], b[-2]
    try:
        y = ctx.out_numel(0)
    except Unknown:
        y = prod(_matmul_out_shape(tuple(a), tuple(b)))
    macs = y * a[-1]
    return Cost(macs, 2 * macs)


def _no_1d():
    raise Unknown("FusedMatMul transA/transB of a 1-D operand")


@cost_rule("DynamicQuantizeMatMul", "MatMulIntegerToFloat", domain="com.microsoft")
def dynamic_quantize_matmul(ctx: OpContext) -> Cost:
    """onnxruntime's int8 MatMul with float output: A (float; DynamicQuantizeMatMul quantizes it
    on the fly) x B (int8). MACs = numel(Y) x K, integer multiply-accumulates like
    MatMulInteger's. FLOPs: 2 x MACs, + 4 per element of A for its dynamic quantization
    (DynamicQuantizeLinear's), + 2 per output element for the dequantization (a scale product)
    and 1 for the bias when there is one."""
    c = _matmul_cost(ctx, 0, 1)
    y = ctx.out_numel(0)
    extra = 2 * y + (y if ctx.has_input(4 if ctx.node.op_type == "DynamicQuantizeMatMul" else 6) else 0)
    if ctx.node.op_type == "DynamicQuantizeMatMul":
        extra = extra + 4 * prod(ctx.in_shape(0))
    return Cost(c.macs, c.flops + extra)


@cost_rule("MatMulNBits", domain="com.microsoft")
def matmul_nbits(ctx: OpContext) -> Cost:
    """A (..., K) x dequantized B (N, K): MACs = numel(Y) x K."""
    k = int(ctx.attr("K", 0)) or ctx.in_shape(0)[-1]
    macs = ctx.out_numel(0) * k
    return Cost(macs, 2 * macs)


_EINSUM_TERM = re.compile(r"[A-Za-z]|\.\.\.")


@cost_rule("Einsum")
def einsum(ctx: OpContext) -> Cost:
    """Evaluated left to right, one pair of operands at a time (as onnxruntime does): each
    contraction costs the product of the sizes of the indices of its two operands; the partial
    result keeps the indices still needed (by later operands or the output). For two operands
    this is the product of the sizes of all distinct indices.
    A single-operand Einsum (transpose, trace, reduction) is 0 MACs and numel(input) FLOPs."""
    eq = ctx.attr("equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ctx.ins):
        raise Unknown(f"equation {eq!r} does not match {len(ctx.ins)} inputs")
    if len(terms) == 1:
        return Cost(0, ctx.in_numel(0))
    sizes: dict[str, Num] = {}
    ell: tuple = ()
    term_letters: list[set[str]] = []
    for i, term in enumerate(terms):
        shape = ctx.in_shape(i)
        letters = _EINSUM_TERM.findall(term)
        term_letters.append(set(letters))
        n_named = sum(1 for t in letters if t != "...")
        pos = 0
        for t in letters:
            if t == "...":
                span = len(shape) - n_named
                ell = _broadcast(ell, shape[pos:pos + span]) if ell else tuple(shape[pos:pos + span])
                pos += span
            else:
                if pos >= len(shape):
                    raise Unknown(f"equation {eq!r} does not match input rank")
                d = shape[pos]
                if t not in sizes or sizes[t] == 1:
                    sizes[t] = d
                pos += 1
    sizes["..."] = prod(ell)
    if arrow:
        out_letters = set(_EINSUM_TERM.findall(rhs))
    else:  # implicit output: the letters that appear once, and the ellipsis
        counts: dict[str, int] = {}
        for letters in term_letters:
            for t in letters:
                counts[t] = counts.get(t, 0) + 1
        out_letters = {t for t, c in counts.items() if c == 1 or t == "..."}
    macs: Num = 0
    current = term_letters[0]
    for j in range(1, len(terms)):
        pair = current | term_letters[j]
        macs = macs + prod(sizes[t] for t in sorted(pair))
        later = set(out_letters).union(*term_letters[j + 1:])
        current = pair & later
    return Cost(macs, 2 * macs)


# --- recurrent ------------------------------------------------------------------------------
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_RNN_ELEMENTWISE = {"RNN": 3, "GRU": 12, "LSTM": 15}  # per hidden unit per step: biases, activations, gates


@cost_rule("RNN", "GRU", "LSTM")
def recurrent(ctx: OpContext) -> Cost:
    """Per time step and batch row: input projection (gates·H·I) + recurrent projection
    (gates·H·H) per direction; = seq x batch x (numel(W) + numel(R)). Element-wise gate math
    is charged to FLOPs: RNN 3, GRU 12, LSTM 15 per hidden unit per step per direction."""
    x = ctx.in_shape(0)
    w, r = ctx.in_shape(1), ctx.in_shape(2)
    if len(x) != 3:
        raise Unknown("X is not 3-D")
    seq, batch = (x[1], x[0]) if ctx.attr("layout", 0) else (x[0], x[1])
    macs = seq * batch * (prod(w) + prod(r))
    dirs, hidden = w[0], r[-1]
    flops = 2 * macs + _RNN_ELEMENTWISE[ctx.node.op_type] * seq * batch * dirs * hidden
    return Cost(macs, flops)


@cost_rule("DynamicQuantizeLSTM", domain="com.microsoft")
def dynamic_quantize_lstm(ctx: OpContext) -> Cost:
    """onnxruntime's LSTM on int8 weights W (D, I, 4H) and R (D, H, 4H) (transposed against
    LSTM's), X and h quantized to uint8 on the fly. MACs as LSTM's: seq x batch x (numel(W) +
    numel(R)), integer multiply-accumulates like ConvInteger's. FLOPs: 2 x MACs, the LSTM gate
    math (15 per hidden unit per step per direction), the dynamic quantization of x_t and h_t-1
    (DynamicQuantizeLinear's 4 per element: seq x batch x D x (I + H)) and the dequantization of
    the two int32 gate products (DequantizeLinear's 2 per element: seq x batch x D x 2 x 4H)."""
    x = ctx.in_shape(0)
    w, r = ctx.in_shape(1), ctx.in_shape(2)
    if len(x) != 3 or len(w) != 3 or len(r) != 3:
        raise Unknown("X, W and R must be 3-D")
    seq, batch = x[0], x[1]
    dirs, inp, hidden = w[0], w[1], r[1]
    macs = seq * batch * (prod(w) + prod(r))
    steps = seq * batch * dirs
    flops = 2 * macs + steps * (15 * hidden + 4 * (inp + hidden) + 2 * 8 * hidden)
    return Cost(macs, flops)


# --- attention ------------------------------------------------------------------------------
def _attention_core(batch: Num, heads: Num, q_len: Num, kv_len: Num, qk_dim: Num, v_dim: Num) -> Cost:
    """Q·Kᵀ (q_len x kv_len x qk_dim) and P·V (q_len x kv_len x v_dim) per head; softmax 5 per score."""
    macs = batch * heads * q_len * kv_len * (qk_dim + v_dim)
    flops = 2 * macs + 5 * batch * heads * q_len * kv_len
    return Cost(macs, flops)


@cost_rule("Attention")
def attention(ctx: OpContext) -> Cost:
    """ONNX ``Attention`` (opset 23): Q, K, V either 4-D (B, heads, seq, head) or 3-D
    (B, seq, hidden) with ``q_num_heads``/``kv_num_heads``; ``past_key`` (input 4) lengthens K."""
    q, k, v = ctx.in_shape(0), ctx.in_shape(1), ctx.in_shape(2)
    if len(q) == 4:
        batch, heads, q_len, qk = q
        kv_len, v_dim = k[2], v[3]
    elif len(q) == 3:
        heads = ctx.attr("q_num_heads")
        kv_heads = ctx.attr("kv_num_heads")
        if not heads or not kv_heads:
            raise Unknown("3-D Attention without q_num_heads/kv_num_heads")
        batch, q_len, hidden = q
        if not isinstance(hidden, int):
            raise Unknown("symbolic hidden size")
        qk = hidden // heads
        kv_len = k[1]
        if not isinstance(v[2], int):
            raise Unknown("symbolic value size")
        v_dim = v[2] // kv_heads
    else:
        raise Unknown("Q is neither 3-D nor 4-D")
    if ctx.has_input(4):
        past = ctx.in_shape(4)
        kv_len = kv_len + past[2]
    return _attention_core(batch, heads, q_len, kv_len, qk, v_dim)


@cost_rule("Attention", domain="com.microsoft")
def ms_attention(ctx: OpContext) -> Cost:
    """com.microsoft ``Attention``: QKV projection input (B, S, D_in) x weights (D_in, Dq+Dk+Dv)
    plus the attention core over S (+ past) positions."""
    x, w = ctx.in_shape(0), ctx.in_shape(1)
    heads = int(ctx.attr("num_heads", 0))
    if len(x) != 3 or len(w) != 2 or not heads:
        raise Unknown("unsupported Attention input layout")
    batch, seq, d_in = x
    sizes = ctx.attr("qkv_hidden_sizes")
    if sizes:
        dq, _, dv = (int(s) for s in sizes)  # Q·Kᵀ needs dk == dq
    else:
        if not isinstance(w[1], int):
            raise Unknown("symbolic weight size")
        dq = dv = w[1] // 3
    proj = batch * seq * d_in * w[1]
    kv_len: Num = seq
    if ctx.has_input(4):
        past = ctx.in_shape(4)
        kv_len = kv_len + past[3]
    core = _attention_core(batch, heads, seq, kv_len, dq // heads, dv // heads)
    bias = batch * seq * w[1] if ctx.has_input(2) else 0
    return Cost(proj + core.macs, 2 * proj + core.flops + bias)


@cost_rule("MultiHeadAttention", domain="com.microsoft")
def ms_multihead_attention(ctx: OpContext) -> Cost:
    """com.microsoft ``MultiHeadAttention`` with separate query (B, S, D), key (B, L, D) and value
    (B, L, Dv), or 4-D key/value (B, heads, L, head)."""
    heads = int(ctx.attr("num_heads", 0))
    q = ctx.in_shape(0)
    if not heads or len(q) != 3 or not ctx.has_input(1) or not ctx.has_input(2):
        raise Unknown("packed QKV layout not supported")
    k, v = ctx.in_shape(1), ctx.in_shape(2)
    batch, seq, d = q
    if len(k) == 3:
        kv_len, dv = k[1], v[2]
    elif len(k) == 4:
        kv_len, dv = k[2], v[1] * v[3]
    else:
        raise Unknown("unsupported key rank")
    if not isinstance(d, int) or not isinstance(dv, int):
        raise Unknown("symbolic hidden size")
    return _attention_core(batch, heads, seq, kv_len, d // heads, dv // heads)


@cost_rule("GroupQueryAttention", domain="com.microsoft")
def ms_group_query_attention(ctx: OpContext) -> Cost:
    """com.microsoft ``GroupQueryAttention``: query (B, S, heads x head); total key length from
    the ``present_key`` output (B, kv_heads, T, head)."""
    heads = int(ctx.attr("num_heads", 0))
    q = ctx.in_shape(0)
    if not heads or len(q) != 3:
        raise Unknown("unsupported GroupQueryAttention layout")
    present = ctx.out_shape(1)
    batch, seq = q[0], q[1]
    head = present[3]
    # K and V may have fewer heads (kv_num_heads), but every query head attends over all T positions
    return _attention_core(batch, heads, seq, present[2], head, head)


# --- ai.onnx.ml (scikit-learn and other classical models converted to ONNX) ----------------
# Their weights are attributes (not tensors): not counted as parameters. A tree node test is a
# comparison: 1 FLOP, as Less/Greater, never a MAC; the linear models and SVM kernels are
# multiply-accumulates (a Gemm). N = the samples (X is [N, C], or [C]: one sample).
ML = "ai.onnx.ml"
_POST_TRANSFORM = {"NONE": 0, "SOFTMAX": 5, "LOGISTIC": 4, "SOFTMAX_ZERO": 5, "PROBIT": 8}
_POST_TRANSFORM_IDS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")  # TreeEnsemble's ints


def _text(v, default: str = "") -> str:
    if v is None:
        return default
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _samples(ctx: OpContext) -> Num:
    """Rows of X: every axis but the features (the last)."""
    x = ctx.in_shape(0)
    return prod(x[:-1]) if len(x) > 1 else 1


def _post_transform(ctx: OpContext) -> int:
    """FLOPs per output score of ``post_transform``: softmax 5, logistic 4 (as Sigmoid), probit 8
    (an inverse-erf polynomial, as Gelu's erf)."""
    v = ctx.attr("post_transform", "NONE")
    name = _POST_TRANSFORM_IDS[v] if isinstance(v, int) and 0 <= v < len(_POST_TRANSFORM_IDS) else _text(v, "NONE")
    if name not in _POST_TRANSFORM:
        raise Unknown(f"post_transform {name!r}")
    return _POST_TRANSFORM[name]


@cost_rule("ArrayFeatureExtractor", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
           "LabelEncoder", "OneHotEncoder", "ZipMap", domain=ML)
def _ml_data_movement(ctx: OpContext) -> Cost:
    """Selections, lookups and re-packings (a Gather, a table lookup, a Concat, a map): 0."""
    return Cost(0, 0)


@cost_rule("Scaler", domain=ML)
def ml_scaler(ctx: OpContext) -> Cost:
    """(x - offset) x scale: 2 per element, as BatchNormalization."""
    return Cost(0, 2 * ctx.in_numel(0))


@cost_rule("Binarizer", "Imputer", domain=ML)
def ml_compare(ctx: OpContext) -> Cost:
    """One comparison per element (the replacement is a select)."""
    return Cost(0, ctx.in_numel(0))


@cost_rule("Normalizer", domain=ML)
def ml_normalizer(ctx: OpContext) -> Cost:
    """Per element: MAX 2 (max, divide), L1 3 (abs, add, divide), L2 3 (square-accumulate 2,
    divide) + 1 square root per row."""
    norm = _text(ctx.attr("norm"), "MAX")
    if norm not in ("MAX", "L1", "L2"):
        raise Unknown(f"Normalizer norm {norm!r}")
    n = ctx.in_numel(0)
    if norm == "MAX":
        return Cost(0, 2 * n)
    return Cost(0, 3 * n + (_samples(ctx) if norm == "L2" else 0))


def _linear(ctx: OpContext, n_scores: int) -> tuple[Num, Num]:
    """(MACs, FLOPs) of the scores of a linear model: N x len(coefficients) MACs (the
    coefficients are n_scores x C), + 1 per score for the intercepts, + the post-transform."""
    coefficients = ctx.attr("coefficients") or []
    n = _samples(ctx)
    macs = n * len(coefficients)
    flops = 2 * macs + (n * n_scores if ctx.attr("intercepts") else 0) + _post_transform(ctx) * n * n_scores
    return macs, flops


@cost_rule("LinearRegressor", domain=ML)
def ml_linear_regressor(ctx: OpContext) -> Cost:
    """MACs = N x len(coefficients) (targets x C); FLOPs 2 x MACs, + N x targets with intercepts,
    + the post-transform per target."""
    macs, flops = _linear(ctx, int(ctx.attr("targets", 1)))
    return Cost(macs, flops)


@cost_rule("LinearClassifier", domain=ML)
def ml_linear_classifier(ctx: OpContext) -> Cost:
    """As LinearRegressor over the class scores (len(intercepts), else the class labels), + 1
    comparison per score for the label (the arg max)."""
    labels = ctx.attr("classlabels_ints") or ctx.attr("classlabels_strings") or []
    n_scores = len(ctx.attr("intercepts") or []) or len(labels)
    macs, flops = _linear(ctx, n_scores)
    return Cost(macs, flops + _samples(ctx) * n_scores)


# SVM kernels, per (sample, support vector) on top of the C multiply-accumulates of the dot
# product (RBF: of the squared distance, + C subtractions): gamma, coef0, pow / exp / tanh
_KERNEL_EXTRA = {"LINEAR": 0, "POLY": 3, "RBF": 2, "SIGMOID": 7}


def _kernel(ctx: OpContext, n_sv: int) -> tuple[Num, Num]:
    """(MACs, FLOPs) of the kernel values of every sample against every support vector."""
    kernel = _text(ctx.attr("kernel_type"), "LINEAR")
    if kernel not in _KERNEL_EXTRA:
        raise Unknown(f"SVM kernel_type {kernel!r}")
    n = _samples(ctx)
    macs = n * len(ctx.attr("support_vectors") or [])  # n_sv x C
    flops = 2 * macs + n * n_sv * _KERNEL_EXTRA[kernel] + (macs if kernel == "RBF" else 0)
    return macs, flops


@cost_rule("SVMRegressor", domain=ML)
def ml_svm_regressor(ctx: OpContext) -> Cost:
    """With support vectors: the kernel values (N x n_supports x C MACs, see ``_KERNEL_EXTRA``),
    then their dot product with the coefficients (N x n_supports MACs) and rho (1 per sample);
    without (a linear SVM): N x len(coefficients) MACs and rho. + the post-transform."""
    n = _samples(ctx)
    n_sv = int(ctx.attr("n_supports", 0))
    if n_sv > 0:
        macs, flops = _kernel(ctx, n_sv)
        macs, flops = macs + n * n_sv, flops + 2 * n * n_sv
    else:
        macs = n * len(ctx.attr("coefficients") or [])
        flops = 2 * macs
    return Cost(macs, flops + n + _post_transform(ctx) * n)


@cost_rule("SVMClassifier", domain=ML)
def ml_svm_classifier(ctx: OpContext) -> Cost:
    """K classes. With support vectors (``vectors_per_class``, n_sv in all): the kernel values
    (N x n_sv x C MACs), then one-vs-one, a decision per pair of classes over the support vectors
    of both: (K-1) x n_sv MACs per sample, + rho and a vote per pair (2 FLOPs). Without (a linear
    SVM): N x len(coefficients) MACs, + rho and 1 comparison per class (the arg max). Platt
    probabilities (``prob_a``): 6 per pair (A·f + B, a sigmoid); their pairwise coupling iterates
    until it converges (a count that depends on the values): not counted, the row says so."""
    n = _samples(ctx)
    per_class = [int(v) for v in ctx.attr("vectors_per_class") or []]
    labels = ctx.attr("classlabels_ints") or ctx.attr("classlabels_strings") or []
    k = len(per_class) or len(labels)
    n_sv = sum(per_class)
    note = ""
    if n_sv > 0:
        pairs = k * (k - 1) // 2
        macs, flops = _kernel(ctx, n_sv)
        macs, flops = macs + n * (k - 1) * n_sv, flops + 2 * n * (k - 1) * n_sv + 2 * n * pairs
        if ctx.attr("prob_a"):
            flops = flops + 6 * n * pairs
            if k > 2:
                note = "SVM probability coupling (iterative) not counted: FLOPs are a lower bound"
    else:
        macs = n * len(ctx.attr("coefficients") or [])
        flops = 2 * macs + 2 * n * k
    return Cost(macs, flops + _post_transform(ctx) * n * k, note)


def _deepest(children: dict, costs: dict, roots) -> list[Num]:
    """For each root, the largest sum of node costs on a path from it to a leaf (a node absent
    from ``children`` is a leaf, cost 0). Iterative (trees can be deep); a cycle is malformed."""
    best: dict = {}
    out = []
    for root in roots:
        stack = [(root, False)]
        on_path: set = set()
        while stack:
            node, done = stack.pop()
            if node in best:
                continue
            kids = children.get(node)
            if kids is None:
                best[node] = 0
                continue
            if done:
                on_path.discard(node)
                best[node] = costs[node] + max(best[c] for c in kids)
                continue
            if node in on_path:
                raise Unknown("tree ensemble with a cycle")
            on_path.add(node)
            stack.append((node, True))
            stack.extend((c, False) for c in kids if c not in best)
        out.append(best[root])
    if any(node not in best for node in children):
        raise Unknown("tree ensemble with a node no root reaches (a cycle)")
    return out


def _legacy_trees(ctx: OpContext, weight_prefix: str) -> tuple[int, int]:
    """TreeEnsembleRegressor/Classifier: (comparisons on the deepest path of each tree, summed;
    weights of the largest leaf of each tree, summed)."""
    a = ctx.attrs
    trees, ids, modes = a.get("nodes_treeids") or [], a.get("nodes_nodeids") or [], a.get("nodes_modes") or []
    true_ids, false_ids = a.get("nodes_truenodeids") or [], a.get("nodes_falsenodeids") or []
    if not (len(trees) == len(ids) == len(modes)) or len(true_ids) < len(ids) or len(false_ids) < len(ids):
        raise Unknown("tree ensemble attributes of different lengths")
    children: dict = {}
    known = set(zip(trees, ids))
    referenced = set()
    for t, i, m, yes, no in zip(trees, ids, modes, true_ids, false_ids):
        if _text(m) == "LEAF":
            continue
        kids = ((t, yes), (t, no))
        if not all(c in known for c in kids):
            raise Unknown("tree ensemble node with a missing child")
        children[(t, i)] = kids
        referenced.update(kids)
    roots = sorted(known - referenced)
    if len({t for t, _ in roots}) != len(roots) or {t for t, _ in roots} != {t for t, _ in known}:
        raise Unknown("tree ensemble with a tree that has no single root (a cycle or a shared node)")
    comparisons = sum(_deepest(children, dict.fromkeys(children, 1), roots))
    leaf_weights: dict = {}
    for t, i in zip(a.get(weight_prefix + "treeids") or [], a.get(weight_prefix + "nodeids") or []):
        leaf_weights[(t, i)] = leaf_weights.get((t, i), 0) + 1
    largest: dict = {}
    for (t, _), c in leaf_weights.items():
        largest[t] = max(largest.get(t, 0), c)
    return comparisons, sum(largest.values())


def _tree_cost(ctx: OpContext, comparisons: int, adds: int, n_outputs: int, average: bool, label: bool) -> Cost:
    """N x (comparisons + adds) + base values, averaging, post-transform (per output) and the
    label's arg max (1 per class)."""
    n = _samples(ctx)
    per_sample = comparisons + adds + n_outputs * (
        (1 if ctx.attr("base_values") or ctx.attr("base_values_as_tensor") else 0) + (1 if average else 0)
        + _post_transform(ctx) + (1 if label else 0))
    return Cost(0, n * per_sample, "tree ensemble: comparisons on each tree's deepest path (an upper bound: "
                                   "the path a sample takes depends on its values)")


@cost_rule("TreeEnsembleRegressor", domain=ML)
def ml_tree_regressor(ctx: OpContext) -> Cost:
    """Per sample: 1 FLOP per node comparison on the deepest root-to-leaf path of each tree (an
    upper bound; the path taken depends on the values), 1 per weight of the largest leaf of each
    tree (the aggregation), + per target: base value 1, AVERAGE 1, post-transform."""
    comparisons, adds = _legacy_trees(ctx, "target_")
    average = _text(ctx.attr("aggregate_function"), "SUM") == "AVERAGE"
    return _tree_cost(ctx, comparisons, adds, int(ctx.attr("n_targets", 1)), average, False)


@cost_rule("TreeEnsembleClassifier", domain=ML)
def ml_tree_classifier(ctx: OpContext) -> Cost:
    """As TreeEnsembleRegressor over the class scores, + 1 comparison per class for the label."""
    comparisons, adds = _legacy_trees(ctx, "class_")
    labels = ctx.attr("classlabels_int64s") or ctx.attr("classlabels_strings") or []
    return _tree_cost(ctx, comparisons, adds, len(labels), False, True)


@cost_rule("TreeEnsemble", domain=ML)
def ml_tree_ensemble(ctx: OpContext) -> Cost:
    """ai.onnx.ml 5 ``TreeEnsemble``: as TreeEnsembleRegressor; a leaf holds one weight (1 add
    per tree); a set-membership node (mode 6) costs one comparison per member of its set."""
    from onnx import numpy_helper

    a = ctx.attrs
    roots = [int(r) for r in a.get("tree_roots") or []]
    modes_t, true_ids, false_ids = a.get("nodes_modes"), a.get("nodes_truenodeids") or [], a.get("nodes_falsenodeids") or []
    if modes_t is None:
        raise Unknown("TreeEnsemble without nodes_modes")
    modes = [int(m) for m in numpy_helper.to_array(modes_t).reshape(-1)]
    true_leaf = a.get("nodes_trueleafs") or [0] * len(modes)
    false_leaf = a.get("nodes_falseleafs") or [0] * len(modes)
    if not (len(modes) == len(true_ids) == len(false_ids) == len(true_leaf) == len(false_leaf)):
        raise Unknown("tree ensemble attributes of different lengths")
    members = a.get("membership_values")
    sets = []
    if members is not None:  # one set per membership node, in node order, NaN between sets
        count = 0
        for v in numpy_helper.to_array(members).reshape(-1):
            if v != v:
                sets.append(count)
                count = 0
            else:
                count += 1
        if count:
            sets.append(count)
    costs, children, k = {}, {}, 0
    for i, m in enumerate(modes):
        if m == 6:
            costs[i] = max(1, sets[k] if k < len(sets) else 1)
            k += 1
        else:
            costs[i] = 1
        kids = tuple(("leaf", c) if leaf else c for c, leaf in ((true_ids[i], true_leaf[i]), (false_ids[i], false_leaf[i])))
        if any(not isinstance(c, tuple) and not 0 <= c < len(modes) for c in kids):
            raise Unknown("tree ensemble node with a missing child")
        children[i] = kids
    if any(not 0 <= r < len(modes) for r in roots):
        raise Unknown("tree ensemble root out of range")
    comparisons = sum(_deepest(children, costs, roots))
    agg = a.get("aggregate_function", 1)
    return _tree_cost(ctx, comparisons, len(roots), int(a.get("n_targets", 1)), agg == 0, False)


# --- parameter roles ------------------------------------------------------------------------
# For each op, the role of a constant input at a position: "param" (counted as a parameter even
# when it is an integer, e.g. quantized weights), "buffer" (statistics), or "none" (shape
# vectors, scales, indices, clip bounds). Positions not listed follow the default: a constant
# floating-point tensor of more than one element is a parameter.
PARAM_ROLES: dict[str, dict[int, str]] = {
    "BatchNormalization": {1: "param", 2: "param", 3: "buffer", 4: "buffer"},
    "QLinearConv": {1: "none", 2: "none", 3: "param", 4: "none", 5: "none", 6: "none", 7: "none", 8: "param"},
    "ConvInteger": {1: "param", 2: "none", 3: "none"},
    "MatMulInteger": {0: "param", 1: "param", 2: "none", 3: "none"},
    "QLinearMatMul": {0: "param", 1: "none", 2: "none", 3: "param", 4: "none", 5: "none", 6: "none", 7: "none"},
    "Resize": {1: "none", 2: "none", 3: "none"},
    "Upsample": {1: "none"},
    "Clip": {1: "none", 2: "none"},
    "Pad": {1: "none", 2: "none", 3: "none"},
    "QuantizeLinear": {1: "none", 2: "none"},
    "DequantizeLinear": {0: "param", 1: "none", 2: "none"},
    "Gather": {0: "param", 1: "none"},
    "Pow": {1: "none"},
    "MatMulNBits": {1: "param", 2: "none", 3: "none", 4: "none", 5: "none"},
    "DynamicQuantizeLSTM": {1: "param", 2: "param", 8: "none", 9: "none", 10: "none", 11: "none"},
    "DynamicQuantizeMatMul": {1: "param", 2: "none", 3: "none"},
    "MatMulIntegerToFloat": {0: "param", 1: "param", 2: "none", 3: "none", 4: "none", 5: "none"},
}
