"""Shape arithmetic computed inside If/Loop bodies (issue #9): folded per body, with the outer
scope's known shapes visible, each If branch on its own, and in a Loop only what does not change
from one iteration to the next. Each expected MAC count is computed by hand from the shapes
onnxruntime produces (the model is run and its output shapes read)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import sepify

RNG = np.random.default_rng(0)


def _c(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64), name))


def _w(name, *shape):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        RNG.standard_normal(shape).astype(np.float32), name))


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=()):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [o.shape for o in sess.run(None, feeds)]


def _half_area_reshape(p, src):
    """``Reshape(src, [n, h*w/2, -1])`` for ``src`` of shape (n, c, h, w), the shape computed
    from ``Shape(src)``; ONNX data propagation does not follow ReduceProd/Div."""
    return [helper.make_node("Shape", [src], [f"{p}s"]), _c(f"{p}i", [0]), _c(f"{p}hw", [2, 3]), _c(f"{p}two", 2),
            _c(f"{p}m1", [-1]),
            helper.make_node("Gather", [f"{p}s", f"{p}i"], [f"{p}n"], axis=0),
            helper.make_node("Gather", [f"{p}s", f"{p}hw"], [f"{p}hwv"], axis=0),
            helper.make_node("ReduceProd", [f"{p}hwv"], [f"{p}area"], keepdims=1, axes=[0]),
            helper.make_node("Div", [f"{p}area", f"{p}two"], [f"{p}half"]),
            helper.make_node("Concat", [f"{p}n", f"{p}half", f"{p}m1"], [f"{p}shape"], axis=0),
            helper.make_node("Reshape", [src, f"{p}shape"], [f"{p}x2"])]


X = np.ones((2, 3, 4, 5), np.float32)


def test_if_branches_fold_shape_arithmetic_of_an_outer_tensor():
    # then: x (outer, 2x3x4x5) -> Reshape to [2, 10, -1] (computed) -> MatMul 6x7
    # else: x -> Reshape to [2*3, -1] (computed, Mul) -> MatMul 20x9
    then = helper.make_graph(_half_area_reshape("t_", "x") + [_w("t_W", 6, 7), helper.make_node("MatMul", ["t_x2", "t_W"], ["t_y"])],
                             "then", [], [_vi("t_y", [None, None, None])])
    els = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["e_s"]), _c("e_i0", [0]), _c("e_i1", [1]), _c("e_m1", [-1]),
         helper.make_node("Gather", ["e_s", "e_i0"], ["e_a"], axis=0),
         helper.make_node("Gather", ["e_s", "e_i1"], ["e_b"], axis=0),
         helper.make_node("Mul", ["e_a", "e_b"], ["e_ab"]),
         helper.make_node("Div", ["e_ab", "e_i1"], ["e_ab1"]),  # (/1: lost to ONNX data propagation)
         helper.make_node("Concat", ["e_ab1", "e_m1"], ["e_shape"], axis=0),
         helper.make_node("Reshape", ["x", "e_shape"], ["e_x2"]), _w("e_W", 20, 9),
         helper.make_node("MatMul", ["e_x2", "e_W"], ["e_y2"]), _c("e_ax", [0]),
         helper.make_node("Unsqueeze", ["e_y2", "e_ax"], ["e_y"])],
        "else", [], [_vi("e_y", [None, None, None])])
    m = _model([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)],
               [_vi("x", [2, 3, 4, 5]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [None, None, None])])
    (then_shape,) = _run(m, {"x": X, "cond": np.array(True)})
    (else_shape,) = _run(m, {"x": X, "cond": np.array(False)})
    assert then_shape == (2, 10, 7) and else_shape == (1, 6, 9)
    then_macs = 2 * 10 * 6 * 7  # (2,10,6) @ (6,7)
    else_macs = 6 * 20 * 9  # (6,20) @ (20,9)
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    assert a.totals.macs == max(then_macs, else_macs) == 1080  # the costlier branch
    assert "then_branch has 840 MACs" in a.layers[0].note
    assert a.totals.params == 6 * 7 + 20 * 9


def _loop_model(dependent: bool):
    """Loop of 3 iterations. Loop-invariant: x (outer) reshaped by computed dims, MatMul 6x7.
    Carried: ``acc`` grows by one column per iteration (1x1 -> 1x4). ``dependent``: a MatMul
    whose size is acc's width, read by Shape(acc): it changes every iteration."""
    nodes = _half_area_reshape("b_", "x") + [
        _w("b_W", 6, 7), helper.make_node("MatMul", ["b_x2", "b_W"], ["b_y"]),  # (2,10,7) every iteration
        helper.make_node("ReduceSum", ["b_y"], ["b_r"], keepdims=0), _c("b_11", [1, 1]),
        helper.make_node("Reshape", ["b_r", "b_11"], ["b_r11"]),
        helper.make_node("Concat", ["acc", "b_r11"], ["acc_out"], axis=1),
        helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    outs = [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", [1, None])]
    if dependent:
        nodes += [helper.make_node("Shape", ["acc"], ["d_s"]), _c("d_1", [1]), _c("d_7", [7]),
                  helper.make_node("Gather", ["d_s", "d_1"], ["d_k"], axis=0),
                  helper.make_node("Concat", ["d_k", "d_7"], ["d_shape"], axis=0),
                  helper.make_node("ConstantOfShape", ["d_shape"], ["d_ones"],
                                   value=numpy_helper.from_array(np.ones(1, np.float32))),
                  helper.make_node("MatMul", ["acc", "d_ones"], ["d_z"])]
        outs.append(_vi("d_z", [None, None]))
    body = helper.make_graph(nodes, "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
                                             _vi("acc", [1, None])], outs)
    loop_outs = ["acc_final"] + (["zs"] if dependent else [])
    return _model([helper.make_node("Loop", ["M", "c0", "acc0"], loop_outs, name="loop", body=body)],
                  [_vi("x", [2, 3, 4, 5])],
                  [_vi("acc_final", [1, None])] + ([_vi("zs", [None, None, None])] if dependent else []),
                  [numpy_helper.from_array(np.array(3, np.int64), "M"), numpy_helper.from_array(np.array(True), "c0"),
                   numpy_helper.from_array(np.zeros((1, 1), np.float32), "acc0")])


def test_loop_body_folds_loop_invariant_shape_arithmetic():
    m = _loop_model(dependent=False)
    assert _run(m, {"x": X}) == [(1, 4)]  # 3 iterations, each appends one column
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    assert a.totals.macs == 3 * (2 * 10 * 6 * 7)  # (2,10,6) @ (6,7) per iteration
    assert a.totals.params == 6 * 7


def test_loop_carried_shapes_are_not_folded_as_constants():
    # Shape(acc) is 1x1, 1x2, 1x3 in the three iterations: no single figure is right, and the
    # first iteration's must not be reported as if it were
    m = _loop_model(dependent=True)
    assert _run(m, {"x": X}) == [(1, 4), (3, 1, 7)]
    a = sepify.analyze(m)
    assert a.totals.unknown == 1
    assert "MatMul" in a.layers[0].unknown and "'acc'" in a.layers[0].unknown


def _squeeze_branches():
    """The two branches of PyTorch's squeeze-If: Squeeze of the last dim then a MatMul by an 8x4
    weight (then), a MatMul by a 3x4 weight (else)."""
    then = helper.make_graph([_c("t_ax", [-1]), helper.make_node("Squeeze", ["x", "t_ax"], ["t_sq"]), _w("t_W", 8, 4),
                              helper.make_node("MatMul", ["t_sq", "t_W"], ["t_y2"]), _c("t_one", [1]),
                              helper.make_node("Unsqueeze", ["t_y2", "t_one"], ["t_y"])],
                             "then", [], [_vi("t_y", [None, None, None])])
    els = helper.make_graph([_w("e_W", 3, 4), helper.make_node("MatMul", ["x", "e_W"], ["e_y"])],
                            "else", [], [_vi("e_y", [None, None, None])])
    return then, els


def _squeeze_if_model():
    """PyTorch's export of ``squeeze(-1)`` on a dynamic dim: ``If(Shape(x)[-1] == 1)`` with
    Squeeze in one branch and the tensor as it is in the other. x (2, 8, w/8) is computed from
    x0 (2, 24) by a Reshape ONNX inference loses, so only folding sees that w/8 = 3: the then
    branch (Squeeze of a 3) cannot run and ONNX inference of it fails once the shape is known."""
    then, els = _squeeze_branches()
    nodes = [helper.make_node("Shape", ["x0"], ["s0"]), _c("i0", [0]), _c("i1", [1]), _c("eight", [8]),
             helper.make_node("Gather", ["s0", "i0"], ["n"], axis=0), helper.make_node("Gather", ["s0", "i1"], ["w"], axis=0),
             helper.make_node("Div", ["w", "eight"], ["w8"]),
             helper.make_node("Concat", ["n", "eight", "w8"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x0", "shape"], ["x"]),
             helper.make_node("Shape", ["x"], ["sx"]), _c("last", [-1]), _c("one", [1]),
             helper.make_node("Gather", ["sx", "last"], ["d"], axis=0), helper.make_node("Equal", ["d", "one"], ["eq"]),
             helper.make_node("Squeeze", ["eq"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)]
    return _model(nodes, [_vi("x0", [2, 24])], [_vi("y", [None, None, None])])


def test_if_decided_by_the_shapes_counts_the_branch_that_runs():
    m = _squeeze_if_model()
    (shape,) = _run(m, {"x0": np.ones((2, 24), np.float32)})
    assert shape == (2, 8, 4)  # the else branch ran: (2,8,3) @ (3,4)
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    assert a.totals.macs == 2 * 8 * 3 * 4
    row = next(x for x in a.layers if x.op_type == "If")
    assert "else_branch runs" in row.note
    assert a.totals.params == 8 * 4 + 3 * 4  # both branches' constants are stored in the file


# --- com.microsoft DynamicQuantizeLSTM (ddddocr's common_old.onnx) --------------------------------
def _dq_lstm_model(seq, batch, inp, hidden):
    q = lambda *shape: RNG.integers(-127, 127, shape, dtype=np.int8)
    f = lambda *shape: RNG.standard_normal(shape).astype(np.float32)
    inits = [numpy_helper.from_array(q(1, inp, 4 * hidden), "W"), numpy_helper.from_array(q(1, hidden, 4 * hidden), "R"),
             numpy_helper.from_array(f(1, 8 * hidden), "B"),
             numpy_helper.from_array(np.array([0.02], np.float32), "W_scale"), numpy_helper.from_array(np.zeros(1, np.int8), "W_zp"),
             numpy_helper.from_array(np.array([0.03], np.float32), "R_scale"), numpy_helper.from_array(np.zeros(1, np.int8), "R_zp"),
             numpy_helper.from_array(f(hidden, 6), "Wm")]
    nodes = [helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "B", "", "", "", "", "W_scale", "W_zp", "R_scale", "R_zp"],
                              ["Y", "Y_h", "Y_c"], domain="com.microsoft", hidden_size=hidden, name="lstm"),
             helper.make_node("MatMul", ["Y_h", "Wm"], ["z"], name="head")]  # after the LSTM: needs its output shape
    g = helper.make_graph(nodes, "g", [_vi("x", [seq, batch, inp])], [_vi("z", [None, None, None]), _vi("Y", [None] * 4)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def test_dynamic_quantize_lstm():
    seq, batch, inp, hidden = 5, 2, 3, 4
    m = _dq_lstm_model(seq, batch, inp, hidden)
    z, y = _run(m, {"x": RNG.standard_normal((seq, batch, inp)).astype(np.float32)})
    assert y == (seq, 1, batch, hidden) and z == (1, batch, 6)
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    lstm, head = a.layers
    w, r = inp * 4 * hidden, hidden * 4 * hidden  # int8 weight elements
    assert lstm.macs == seq * batch * (w + r) == 1120  # as a float LSTM: integer MACs are MACs
    steps = seq * batch * 1
    assert lstm.flops == 2 * 1120 + steps * (15 * hidden + 4 * (inp + hidden) + 2 * 8 * hidden)
    assert head.macs == batch * hidden * 6  # (1,2,4) @ (4,6): the LSTM's output shape was known
    assert lstm.params == w + r + 8 * hidden  # int8 W and R, float B; scales and zero points are not
    assert a.totals.params == w + r + 8 * hidden + hidden * 6


# --- contrib ops of onnxruntime-optimized models (FusedConv, QuickGelu, FusedMatMul, ...) ---------
def test_onnxruntime_contrib_ops_keep_shapes_and_costs():
    """ONNX inference has no schema for com.microsoft ops: without the shape stage's stand-in
    standard ops, every tensor after the first FusedConv has no shape (an onnxruntime-optimized
    PP-OCR model: 149 nodes of unknown cost)."""
    f = lambda *shape: RNG.standard_normal(shape).astype(np.float32)
    inits = [numpy_helper.from_array(f(4, 3, 3, 3), "W1"), numpy_helper.from_array(f(4), "B1"),
             numpy_helper.from_array(f(2, 4, 1, 1), "W2"), numpy_helper.from_array(np.array([1, 2, 36], np.int64), "s"),
             numpy_helper.from_array(f(2, 5), "M"),
             numpy_helper.from_array(RNG.integers(-127, 127, (5, 7), dtype=np.int8), "Q"),
             numpy_helper.from_array(np.array(0.05, np.float32), "Q_scale"), numpy_helper.from_array(np.array(0, np.int8), "Q_zp")]
    ms = "com.microsoft"
    nodes = [helper.make_node("FusedConv", ["x", "W1", "B1"], ["c1"], domain=ms, name="fconv", kernel_shape=[3, 3],
                              activation="Relu"),                                        # (1,4,6,6)
             helper.make_node("QuickGelu", ["c1"], ["g"], domain=ms, name="gelu", alpha=1.702),
             helper.make_node("Conv", ["g", "W2"], ["c2"], name="conv"),                 # (1,2,6,6)
             helper.make_node("Reshape", ["c2", "s"], ["r"], name="reshape"),            # (1,2,36)
             helper.make_node("FusedMatMul", ["r", "M"], ["mm"], domain=ms, name="fmm", transA=1),  # (1,36,2)x(2,5)
             helper.make_node("DynamicQuantizeMatMul", ["mm", "Q", "Q_scale", "Q_zp"], ["y"], domain=ms, name="dqmm")]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 3, 8, 8])], [_vi("y", [None, None, None])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
    m.ir_version = 8
    (y,) = _run(m, {"x": f(1, 3, 8, 8)})
    assert y == (1, 36, 7)
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    macs = {x.name: x.macs for x in a.layers}
    assert macs["fconv"] == 4 * 6 * 6 * (3 * 3 * 3)
    assert macs["conv"] == 2 * 6 * 6 * 4
    assert macs["fmm"] == 36 * 5 * 2  # K = 2: A is transposed
    assert macs["dqmm"] == 36 * 7 * 5  # integer MACs count as MACs
    assert a.totals.params == 4 * 27 + 4 + 2 * 4 + 2 * 5 + 5 * 7  # int8 Q counted; its scale and zero point not


def test_if_decided_by_bound_shapes_when_the_dead_branch_fails_inference():
    # the squeeze-If on a dynamic dim bound with --input-shape: with w = 3, ONNX inference (strict)
    # fails in the then branch (Squeeze of a 3), which never runs; with w = 1 the else branch is dead
    then, els = _squeeze_branches()
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), _c("last", [-1]), _c("one", [1]),
             helper.make_node("Gather", ["sx", "last"], ["d"], axis=0), helper.make_node("Equal", ["d", "one"], ["eq"]),
             helper.make_node("Squeeze", ["eq"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)]
    m = _model(nodes, [_vi("x", ["n", 8, "w"])], [_vi("y", [None, None, None])])
    for w, branch, macs in ((3, "else_branch", 2 * 8 * 3 * 4), (1, "then_branch", 2 * 8 * 4)):
        (shape,) = _run(m, {"x": np.ones((2, 8, w), np.float32)})
        assert shape == ((2, 8, 4) if w == 3 else (2, 1, 4))
        a = sepify.analyze(m, input_shapes={"x": [2, 8, w]})
        assert a.totals.unknown == 0 and a.totals.macs == macs
        assert f"{branch} runs" in next(x for x in a.layers if x.op_type == "If").note


def test_loop_trip_count_computed_from_a_shape():
    # for i in range(x.shape[0]): y_i = x[i][None] @ W — the trip count is Shape(x)[0], a value
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["row0"], axis=0),  # (4,)
         helper.make_node("Unsqueeze", ["row0", "ax0"], ["row"]),  # (1, 4)
         _w("W", 4, 5), helper.make_node("MatMul", ["row", "W"], ["y_i"]),  # (1, 5): 20 MACs
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL)],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("y_i", [None, None])])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), _c("zero", 0), _c("ax0", [0]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Loop", ["n", "", ], ["ys"], name="loop", body=body)]
    m = _model(nodes, [_vi("x", [3, 4])], [_vi("ys", [None, None, None])])
    assert _run(m, {"x": np.ones((3, 4), np.float32)}) == [(3, 1, 5)]
    a = sepify.analyze(m)
    loop = next(x for x in a.layers if x.op_type == "Loop")
    assert loop.macs == 3 * (1 * 4 * 5) and "3 iterations" in loop.note


def test_scan_body_folds_shape_arithmetic_of_its_slice():
    # Scan over the rows of x (4, 6): each slice (6,) is reshaped to [2, 6/2] (computed: Div) and
    # multiplied by W (3, 5); a slice's shape is the same in every iteration
    body = helper.make_graph(
        [helper.make_node("Shape", ["row"], ["s"]), _c("two", [2]),
         helper.make_node("Div", ["s", "two"], ["half"]),
         helper.make_node("Concat", ["two", "half"], ["shape"], axis=0),
         helper.make_node("Reshape", ["row", "shape"], ["r2"]),  # (2, 3)
         _w("W", 3, 5), helper.make_node("MatMul", ["r2", "W"], ["out"]),  # (2, 5): 30 MACs
         helper.make_node("Identity", ["acc"], ["acc_out"])],
        "body", [_vi("acc", [1]), _vi("row", [None])], [_vi("acc_out", [1]), _vi("out", [None, None])])
    m = _model([helper.make_node("Scan", ["acc0", "x"], ["acc_final", "outs"], name="scan", body=body, num_scan_inputs=1)],
               [_vi("x", [4, 6])], [_vi("acc_final", [1]), _vi("outs", [None, None, None])],
               [numpy_helper.from_array(np.zeros(1, np.float32), "acc0")])
    assert _run(m, {"x": np.ones((4, 6), np.float32)}) == [(1,), (4, 2, 5)]
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    assert a.totals.macs == 4 * (2 * 3 * 5)


def test_symbolic_dims_derived_inside_if_branches():
    """silero-vad's op18_ifless export: the whole model is an If on the sample rate (an input
    value: both branches are walked, the costlier counted), each branch a Conv over the free
    length. The branches' Conv outputs had no shape (derived dims were written only in the main
    graph): the If was unknown. Now they are formulas: then 4·3·L (k 3, pad 1), else
    4·5·⌈L/2⌉ (k 5, pad 2, stride 2)."""
    then_g = helper.make_graph([_w("w3", 4, 1, 3), helper.make_node("Conv", ["x", "w3"], ["t"], pads=[1, 1]),
                                helper.make_node("Relu", ["t"], ["yt"])], "then", [], [_vi("yt", None)])
    else_g = helper.make_graph([_w("w5", 4, 1, 5), helper.make_node("Conv", ["x", "w5"], ["e"], pads=[2, 2],
                                                                     strides=[2]),
                                helper.make_node("Relu", ["e"], ["ye"])], "else", [], [_vi("ye", None)])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    m = _model([node], [_vi("x", [1, 1, "L"]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [1, 4, None])])
    a = sepify.analyze(m)
    layer = a.layer("if")
    assert a.totals.unknown == 0 and layer.unknown is None
    # at the stand-in L = 1: then 12, else 20 MACs: else counted
    assert layer.macs == 20 and a.totals.macs_formula == "20·⌈L/2⌉"
    assert "else_branch is costlier" in layer.note
    b = sepify.analyze(m, dims={"L": 64})  # then 768, else 640: then counted
    assert b.layer("if").macs == 4 * 3 * 64 == 768
    # the branches' output lengths are onnxruntime's
    xs = np.ones((1, 1, 64), np.float32)
    assert _run(m, {"x": xs, "cond": np.array(True)}) == [(1, 4, 64)]
    assert _run(m, {"x": xs, "cond": np.array(False)}) == [(1, 4, 32)]
