"""Patterns of real exports that ONNX shape inference alone loses (issue #9), each as a small
model built here: computed Pad, channel shuffle, chunk, an LSTM after a computed Reshape, ``-1``
input dims, an IR 3 model, weights inside ``If`` branches, a class token through ``Expand``, a
``ConvInteger`` model through ``rewrite``. Every expected MAC count is computed by hand from the
shapes onnxruntime actually produces (the model is run and its output shapes read)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main
from click.testing import CliRunner

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _out(name, rank):
    """A graph output of known rank and dims left to inference (the checker wants a shape)."""
    return _vi(name, [f"{name}_{i}" for i in range(rank)])


def _ort_shapes(model, feeds, names):
    """The shapes onnxruntime computes for ``names`` (intermediate tensors made outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(names, feeds)
    return {n: o.shape for n, o in zip(names, outs)}


def _conv_macs(out_shape, w_shape, group=1):
    n, m = out_shape[0], out_shape[1]
    spatial = int(np.prod(out_shape[2:]))
    return n * m * spatial * (w_shape[1] * int(np.prod(w_shape[2:])))


# --- computed Pad (tf2onnx: Constant -> ConstantOfShape -> Concat -> Slice -> Pad) -------------
def _computed_pad_model():
    nodes = [
        helper.make_node("Constant", [], ["four"], value=numpy_helper.from_array(np.array([4], np.int64))),
        helper.make_node("ConstantOfShape", ["four"], ["zeros"],
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Concat", ["zeros", "hw_pads"], ["all"], axis=0),   # [0,0,0,0, 0,0,1,2, 0,0,1,2]
        helper.make_node("Slice", ["all", "s", "e"], ["pads"]),               # [0,0,1,2, 0,0,1,2]
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Conv", ["xp", "W"], ["y"], name="conv", kernel_shape=[3, 3]),
    ]
    inits = [_i64("hw_pads", [0, 0, 1, 2, 0, 0, 1, 2]), _i64("s", [4]), _i64("e", [12]), numpy_helper.from_array(_w(5, 3, 3, 3), "W")]
    return _model(nodes, [_vi("x", [1, 3, 8, 8])], [_out("y", 4)], inits)


def test_computed_pad_is_resolved():
    m = _computed_pad_model()
    shapes = _ort_shapes(m, {"x": _w(1, 3, 8, 8)}, ["xp", "y"])
    assert shapes["xp"] == (1, 3, 10, 12)  # pads [begin H, W, end H, W] = [1, 2, 1, 2]
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.totals.macs == _conv_macs(shapes["y"], (5, 3, 3, 3)) == 5 * 8 * 10 * 27
    assert a.totals.params == 5 * 3 * 3 * 3


# --- channel shuffle (PyTorch: Shape -> Gather -> Div -> Concat -> Reshape) --------------------
def _shuffle_model(batch):
    g = 2
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Shape", ["a"], ["sh"])]
    for i, n in enumerate("nchw"):
        nodes += [helper.make_node("Gather", ["sh", f"i{i}"], [n], axis=0),
                  helper.make_node("Unsqueeze", [n, "ax0"], [n + "1"])]
    nodes += [helper.make_node("Div", ["c", "groups"], ["cg"]),
              helper.make_node("Unsqueeze", ["cg", "ax0"], ["cg1"]),
              helper.make_node("Concat", ["n1", "groups1", "cg1", "h1", "w1"], ["shape5"], axis=0),
              helper.make_node("Reshape", ["a", "shape5"], ["r5"]),
              helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4]),
              helper.make_node("Concat", ["n1", "c1", "h1", "w1"], ["shape4"], axis=0),
              helper.make_node("Reshape", ["t5", "shape4"], ["shuffled"]),
              helper.make_node("Conv", ["shuffled", "W2"], ["y"], name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(_w(8, 8, 1, 1), "W1"), numpy_helper.from_array(_w(6, 8, 3, 3), "W2"),
             _i64("ax0", [0]), numpy_helper.from_array(np.array(g, np.int64), "groups"), _i64("groups1", [g])]
    inits += [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(4)]
    return _model(nodes, [_vi("x", [batch, 8, 5, 7])], [_out("y", 4)], inits)


def test_channel_shuffle_static():
    m = _shuffle_model(2)
    shapes = _ort_shapes(m, {"x": _w(2, 8, 5, 7)}, ["a", "shuffled", "y"])
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.totals.macs == _conv_macs(shapes["a"], (8, 8, 1, 1)) + _conv_macs(shapes["y"], (6, 8, 3, 3))
    assert a.totals.macs == 2 * 35 * (8 * 8 + 6 * 72)


def test_channel_shuffle_symbolic_batch_is_a_formula():
    a = sepify.analyze(_shuffle_model("N"))
    assert a.totals.unknown == 0
    per_sample = 35 * (8 * 8 + 6 * 72)  # the static case at batch 1
    assert a.totals.macs == per_sample  # N unbound: 1 for the numbers
    assert "N" in a.totals.macs_formula
    assert sepify.analyze(_shuffle_model("N"), dims={"N": 3}).totals.macs == 3 * per_sample


# --- chunk (Slice ends computed from Shape) ----------------------------------------------------
def _chunk_model():
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "one"], ["c"], axis=0),
             helper.make_node("Div", ["c", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "ax0"], ["half1"]),
             helper.make_node("Unsqueeze", ["c", "ax0"], ["c1"]),
             helper.make_node("Slice", ["x", "zero1", "half1", "one1"], ["lo"]),
             helper.make_node("Slice", ["x", "half1", "c1", "one1"], ["hi"]),
             helper.make_node("Conv", ["lo", "Wlo"], ["ylo"], name="clo", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["hi", "Whi"], ["yhi"], name="chi", kernel_shape=[3, 3])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(2, np.int64), "two"),
             _i64("ax0", [0]), _i64("zero1", [0]), _i64("one1", [1]),
             numpy_helper.from_array(_w(4, 6, 1, 1), "Wlo"), numpy_helper.from_array(_w(2, 6, 3, 3), "Whi")]
    return _model(nodes, [_vi("x", [1, 12, 6, 6])], [_out("ylo", 4), _out("yhi", 4)], inits)


def test_chunk_is_resolved():
    m = _chunk_model()
    shapes = _ort_shapes(m, {"x": _w(1, 12, 6, 6)}, ["lo", "hi", "ylo", "yhi"])
    assert shapes["lo"] == shapes["hi"] == (1, 6, 6, 6)
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.totals.macs == _conv_macs(shapes["ylo"], (4, 6, 1, 1)) + _conv_macs(shapes["yhi"], (2, 6, 3, 3))
    assert a.totals.macs == 4 * 36 * 6 + 2 * 16 * 54


# --- LSTM after a computed Reshape (CRNN, as ddddocr's: [N, C, H, W] -> [W, N, C*H], opset 11) ----
def _crnn_model(width):
    hidden, c, h = 5, 4, 2
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["f"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[3, 0, 1, 2])]   # [W, N, C, H]
    for i in range(4):
        nodes += [helper.make_node("Shape", ["ft"], [f"sh{i}"]),
                  helper.make_node("Gather", [f"sh{i}", f"i{i}"], [f"d{i}"], axis=0)]
    nodes += [helper.make_node("Mul", ["d2", "d3"], ["ch"]),
              helper.make_node("Unsqueeze", ["d0"], ["u0"], axes=[0]),
              helper.make_node("Unsqueeze", ["d1"], ["u1"], axes=[0]),
              helper.make_node("Unsqueeze", ["ch"], ["u2"], axes=[0]),
              helper.make_node("Concat", ["u0", "u1", "u2"], ["shape3"], axis=0),
              helper.make_node("Reshape", ["ft", "shape3"], ["seq"]),           # [W, 1, C*H]
              helper.make_node("LSTM", ["seq", "W", "R"], ["Y"], name="lstm", hidden_size=hidden)]
    inits = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in range(4)]
    inits += [numpy_helper.from_array(_w(c, 3, 1, 1), "Wc"), numpy_helper.from_array(_w(1, 4 * hidden, c * h), "W"),
              numpy_helper.from_array(_w(1, 4 * hidden, hidden), "R")]
    m = _model(nodes, [_vi("x", [1, 3, h, width])], [_out("Y", 4)], inits, opset=11)
    return m, hidden, c * h


def test_lstm_after_computed_reshape():
    m, hidden, feat = _crnn_model("width")
    shapes = _ort_shapes(m, {"x": _w(1, 3, 2, 9)}, ["f", "seq", "Y"])
    seq, batch, _ = shapes["seq"]
    assert (seq, batch) == (9, 1)
    expected = _conv_macs(shapes["f"], (4, 3, 1, 1)) + seq * batch * 4 * hidden * (feat + hidden)
    for a in (sepify.analyze(m, input_shapes={"x": [1, 3, 2, 9]}), sepify.analyze(m, dims={"width": 9})):
        assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
        assert a.totals.macs == expected


# --- dims written -1 / 0 -----------------------------------------------------------------------
def _conv_with_dims(x_dims, y_dims):
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])]
    m = _model(nodes, [_vi("x", x_dims)], [_vi("y", y_dims)], [numpy_helper.from_array(_w(4, 3, 3, 3), "W")])
    return m


def test_minus_one_dims_are_dynamic(tmp_path):
    # -1 in an input and 0/-1 in an output are dynamic for onnxruntime (a 0 in an *input* is a
    # fixed empty dimension for it: such a model is refused, see test_hostile's zero_input_dim)
    m = _conv_with_dims([-1, 3, -1, 10], [0, 4, -1, -1])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": _w(2, 3, 7, 10)})[0]
    assert y.shape == (2, 4, 5, 8)
    a = sepify.analyze(m)
    assert set(a.symbols) == {"x_d0", "x_d2"}
    assert a.inputs[0]["shape"] == ["x_d0", 3, "x_d2", 10]
    assert any("written -1" in n for n in a.notes)
    bound = sepify.analyze(m, dims={"x_d0": 2, "x_d2": 7})
    assert bound.totals.macs == 2 * 4 * 5 * 8 * 27 == _conv_macs(y.shape, (4, 3, 3, 3))
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    r = CliRunner().invoke(main, ["analyze", str(path), "--dim", "x_d0=2", "--dim", "x_d2=7", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["totals"]["macs"] == 2 * 4 * 5 * 8 * 27


def test_other_negative_dims_are_still_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_conv_with_dims([1, 3, -8, 8], [1, 4, 6, 6]), str(path))
    r = CliRunner().invoke(main, ["analyze", str(path)])
    assert r.exit_code == 2 and "negative dimension (-8" in r.output


# --- IR 3: an initializer not listed among the inputs -----------------------------------------
def test_ir3_initializer_not_an_input_is_read_as_onnxruntime_does(tmp_path):
    m = _conv_with_dims([1, 3, 8, 8], [1, 4, 6, 6])
    m.ir_version = 3
    m.opset_import[0].version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": _w(1, 3, 8, 8)})[0]
    a = sepify.analyze(m)
    assert a.totals.macs == _conv_macs(y.shape, (4, 3, 3, 3)) == 4 * 36 * 27
    assert a.totals.params == 4 * 27
    assert any("IR version 3" in n and "onnxruntime" in n for n in a.notes)
    path = tmp_path / "ir3.onnx"
    onnx.save(m, str(path))
    r = CliRunner().invoke(main, ["rewrite", str(path), "-o", str(tmp_path / "out.onnx"), "--format", "json"])
    assert r.exit_code == 0, r.output


# --- weights inside If branches ----------------------------------------------------------------
def _if_model(with_unknown: bool):
    def branch(name, w):
        nodes = [helper.make_node("Constant", [], [f"{name}_W"], value=numpy_helper.from_array(w)),
                 helper.make_node("Conv", ["x", f"{name}_W"], [f"{name}_y"], kernel_shape=list(w.shape[2:]))]
        if with_unknown and name == "then":
            nodes.append(helper.make_node("Mystery", [f"{name}_y"], [f"{name}_out"], domain="com.example"))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_y"], [f"{name}_out"]))
        return helper.make_graph(nodes, name, [], [_out(f"{name}_out", 4)])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", _w(4, 3, 3, 3)),
                              else_branch=branch("else", _w(4, 3, 1, 1)))]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8]), _vi("cond", [], TensorProto.BOOL)], [_out("y", 4)])
    if with_unknown:
        m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def test_weights_inside_if_branches_are_params():
    a = sepify.analyze(_if_model(False))
    assert a.totals.params == 4 * 27 + 4 * 3  # both branches' constants: the model stores both
    assert a.totals.macs == 4 * 36 * 27  # the costlier branch (3x3 on 8x8 -> 6x6)
    # a node of unknown cost in a branch makes the If unknown, but its weights still count
    b = sepify.analyze(_if_model(True))
    assert b.totals.unknown == 1
    assert b.totals.params == 4 * 27 + 4 * 3


# --- class token through Expand (ViT: cls.expand(n, -1, -1), the shape made by Where/Equal) -----
def test_class_token_through_expand_is_a_param():
    dim, batch = 16, 3
    nodes = [helper.make_node("Equal", ["want", "minus1"], ["is_keep"]),
             helper.make_node("ConstantOfShape", ["three"], ["ones"], value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Where", ["is_keep", "ones", "want"], ["cls_shape"]),   # [3, 1, 1]
             helper.make_node("Expand", ["cls", "cls_shape"], ["cls_b"]),             # [3, 1, 16]
             helper.make_node("Concat", ["cls_b", "x"], ["tokens"], axis=1),
             helper.make_node("Add", ["tokens", "pos"], ["tp"]),
             helper.make_node("MatMul", ["tp", "Wq"], ["y"], name="proj")]
    inits = [_i64("want", [batch, -1, -1]), _i64("minus1", [-1]), _i64("three", [3]),
             numpy_helper.from_array(_w(1, 1, dim), "cls"),
             numpy_helper.from_array(_w(1, 5, dim), "pos"), numpy_helper.from_array(_w(dim, dim), "Wq")]
    m = _model(nodes, [_vi("x", [batch, 4, dim])], [_out("y", 3)], inits)
    shapes = _ort_shapes(m, {"x": _w(batch, 4, dim)}, ["cls_b", "y"])
    assert shapes["cls_b"] == (batch, 1, dim)
    a = sepify.analyze(m)
    # the stored class token (not its expanded copies), the position embedding, the projection
    assert a.totals.params == dim + 5 * dim + dim * dim
    assert a.totals.unknown == 0
    assert a.totals.macs == int(np.prod(shapes["y"])) * dim == batch * 5 * dim * dim


# --- a quantized model through rewrite: nothing eligible -> unchanged copy, exit 0 -------------
def test_conv_integer_model_rewrite_exits_0_unchanged(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("ConvInteger", ["xq", "Wq"], ["acc"], name="qconv", kernel_shape=[3, 3]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["accf", "W1"], ["y"], name="pw", kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "zp"),
             numpy_helper.from_array(RNG.integers(0, 255, (4, 3, 3, 3), dtype=np.uint8), "Wq"),
             numpy_helper.from_array(_w(2, 4, 1, 1), "W1")]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 2, 6, 6])], inits, opset=13)
    src = tmp_path / "q.onnx"
    onnx.save(m, str(src))
    out = tmp_path / "q.sep.onnx"
    r = CliRunner().invoke(main, ["rewrite", str(src), "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"pw", "qconv"} and "1x1" in skipped["pw"] and "quantized (ConvInteger)" in skipped["qconv"]
    assert onnx.load(str(out)).graph.node[1].op_type == "ConvInteger"
    a = sepify.analyze(m)
    assert a.totals.macs == 4 * 36 * 27 + 2 * 36 * 4
    assert report["totals"]["before"]["macs"] == report["totals"]["after"]["macs"] == a.totals.macs


# --- one analysis: every command reports the same totals for one file and bindings ------------
def test_analyze_rewrite_check_diff_agree(tmp_path):
    from sepify.rewrite import rewrite as run_rewrite

    cases = [(_shuffle_model("N"), {}), (_crnn_model("width")[0], {}), (_crnn_model("width")[0], {"width": 9}),
             (_computed_pad_model(), {})]
    for i, (m, dims) in enumerate(cases):
        path = tmp_path / f"m{i}.onnx"
        onnx.save(m, str(path))
        a = sepify.analyze(str(path), dims=dims).totals
        before = run_rewrite(str(path), dims=dims).report["totals"]["before"]
        assert (before["macs"], before["params"], before["flops"]) == (a.macs, a.params, a.flops), i
        checked = sepify.check([str(path)], limits={"macs": 10**12}, dims=dims, discover=False).to_dict()["models"][0]
        if i == 1:  # check refuses a MAC budget on an unbound width it cannot guess (not a polynomial)
            assert checked["status"] == "error" and "width" in checked["error"]
        else:
            assert checked["status"] == "pass", (i, checked["error"])
            assert (checked["totals"]["macs"], checked["totals"]["params"]) == (a.macs, a.params), i
        d = sepify.compare(str(path), str(path), dims=dims).to_dict()["totals"]
        assert (d["macs"]["old"], d["params"]["new"]) == (a.macs, a.params), i
    assert a.macs > 0


# --- rewrite: a Conv whose spatial size is a symbol (and one derived from it) is rewritable -----
def test_rewrite_conv_with_symbolic_spatial_dims(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="c2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    m = _model(nodes, [_vi("x", [1, 3, "H", "W"])], [_out("y", 4)],
               [numpy_helper.from_array(_w(8, 3, 3, 3), "W1"), numpy_helper.from_array(_w(6, 8, 3, 3), "W2")])
    r = sepify.rewrite(m, rank=1)
    assert {x.name for x in r.layers} == {"c1", "c2"}, r.report["skipped"]
    # unbound, the sizes (H+1)//2 are lost to inference (not polynomial): the layers are planned
    # with the symbols at 1, as the analysis numbers are. Bound, H = W = 16 -> 8x8:
    bound = sepify.rewrite(m, rank=1, dims={"H": 16, "W": 16})
    x = _w(1, 3, 16, 16)
    shapes = _ort_shapes(m, {"x": x}, ["a", "y"])
    assert shapes["a"] == shapes["y"][:1] + (8, 8, 8) and shapes["y"] == (1, 6, 8, 8)
    after = bound.report["totals"]["after"]["macs"]
    per = {x.name: x for x in bound.layers}
    assert per["c2"].macs_before == 6 * 8 * 9 * 64
    assert after == sum(x.macs_after for x in bound.layers)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    out = ort.InferenceSession(bound.model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (1, 6, 8, 8)


# --- what stays unknown says why: only value-dependent sizes are called so, naming the op -------
def test_data_dependent_size_names_the_op():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("Squeeze", ["nz", "ax0"], ["idx"]),
             helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "Wm"], ["y"], name="mm")]
    m = _model(nodes, [_vi("x", [10])], [_out("y", 2)],
               [_i64("ax0", [0]), numpy_helper.from_array(_w(10, 8), "table"), numpy_helper.from_array(_w(8, 4), "Wm")])
    a = sepify.analyze(m)
    mm = next(x for x in a.layers if x.name == "mm")
    assert mm.macs is None and "depends on the input values (NonZero 'nz')" in mm.unknown
    assert a.totals.params == 10 * 8 + 8 * 4


def test_rewrite_keeps_declared_output_types_the_graph_library_would_lose(tmp_path):
    # ddddocr's common_old.onnx: a graph output also listed in value_info with a type and no
    # shape (valid ONNX). onnx-graphsurgeon's round trip gave the output no shape, and the
    # rewritten model failed the checker (exit 3).
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 6, 6])], [numpy_helper.from_array(_w(4, 3, 3, 3), "W")])
    m.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    src, out = tmp_path / "m.onnx", tmp_path / "m.sep.onnx"
    onnx.save(m, str(src))
    r = CliRunner().invoke(main, ["rewrite", str(src), "-o", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["totals"]["rewritten"] == 1
    new = onnx.load(str(out))
    assert [d.dim_value for d in new.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 6, 6]


def test_computed_shape_read_inside_if_branches():
    # the pads are computed in the main graph and read by both branches (silero-vad's layout):
    # the branch convs' sizes come from the resolved pads
    pad_nodes = _computed_pad_model().graph.node[:4]  # Constant, ConstantOfShape, Concat, Slice -> pads

    def branch(name, k):
        w = _w(4, 3, k, k)
        nodes = [helper.make_node("Constant", [], [f"{name}_W"], value=numpy_helper.from_array(w)),
                 helper.make_node("Pad", ["x", "pads"], [f"{name}_xp"]),
                 helper.make_node("Conv", [f"{name}_xp", f"{name}_W"], [f"{name}_out"], kernel_shape=[k, k])]
        return helper.make_graph(nodes, name, [], [_out(f"{name}_out", 4)])

    nodes = list(pad_nodes) + [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 3),
                                                else_branch=branch("else", 1))]
    m = _model(nodes, [_vi("x", [1, 3, 8, 8]), _vi("cond", [], TensorProto.BOOL)], [_out("y", 4)],
               [_i64("hw_pads", [0, 0, 1, 2, 0, 0, 1, 2]), _i64("s", [4]), _i64("e", [12])])
    shapes = _ort_shapes(m, {"x": _w(1, 3, 8, 8), "cond": np.array(True)}, ["y"])
    assert shapes["y"] == (1, 4, 8, 10)  # then: 3x3 on the padded 10x12
    a = sepify.analyze(m)
    assert a.totals.unknown == 0, [x.unknown for x in a.layers if x.unknown]
    assert a.totals.macs == _conv_macs(shapes["y"], (4, 3, 3, 3))
    assert a.totals.params == 4 * 27 + 4 * 3
