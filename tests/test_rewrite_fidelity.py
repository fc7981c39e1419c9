"""The rewrite's graph edit changes only what it rewrites (docs/rewrite.md, "The output model").

One small model carries every kind of information a graph library's round trip can lose: node
doc_strings and metadata_props, an attribute doc_string, a model-local function, a
custom-domain node, an If with bodies (their value_info, an outer initializer read only
there), value_info of untouched tensors, a sparse initializer, a quantization annotation,
training_info, graph/model doc strings and metadata, float16 / raw int8 initializers. Two Convs
are rewritten: one with a BatchNormalization folded into it, one whose weight is a Constant
node. Untouched parts are compared as serialized protos with the source; the rewritten parts
are checked against onnxruntime (at full rank the rewrite is exact, so the rewritten model
must compute what the source computes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify

F = TensorProto.FLOAT


def _vi(name, shape, elem=F, doc=""):
    v = helper.make_tensor_value_info(name, elem, shape)
    v.doc_string = doc
    return v


def _model(ir_version: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(arr(8, 4, 3, 3), "w1"), numpy_helper.from_array(arr(8), "b1"),
             numpy_helper.from_array(arr(8) + 2.0, "bn_s"), numpy_helper.from_array(arr(8), "bn_b"),
             numpy_helper.from_array(arr(8), "bn_mean"), numpy_helper.from_array(np.abs(arr(8)) + 0.5, "bn_var"),
             numpy_helper.from_array(np.float32(0.25).reshape(()), "k"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "h16"),
             helper.make_tensor("i8", TensorProto.INT8, [3], np.array([1, -2, 3], np.int8).tobytes(), raw=True)]
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu", doc_string="relu doc")
    relu.metadata_props.add(key="pkg.origin", value="torch.nn.ReLU")
    leaky = helper.make_node("LeakyRelu", ["y1"], ["a1"], name="leaky", alpha=0.1)
    leaky.attribute[0].doc_string = "slope"
    leaky.metadata_props.add(key="scope", value="block1")
    then = helper.make_graph(
        [helper.make_node("Add", ["y2", "b1"], ["t1"], name="then_add"),  # b1: also read by conv1
         helper.make_node("Mul", ["t1", "k"], ["t"], name="then_mul", doc_string="in a body")],
        "then", [], [_vi("t", [1, 8, 8, 8])], value_info=[_vi("t1", [1, 8, 8, 8], doc="body value_info")])
    els = helper.make_graph([helper.make_node("Neg", ["y2"], ["e"], name="else_neg")], "else", [], [_vi("e", [1, 8, 8, 8])])
    nodes = [
        relu,
        helper.make_node("Conv", ["r", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_mean", "bn_var"], ["y1"], name="bn"),
        leaky,
        helper.make_node("Constant", [], ["w2"], name="w2_const", value=numpy_helper.from_array(arr(8, 8, 3, 3))),
        helper.make_node("Conv", ["a1", "w2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Swish", ["y2"], ["f"], name="swish", domain="local.fn"),
        helper.make_node("Gelu", ["y2"], ["gl"], name="gelu", domain="com.microsoft"),
        helper.make_node("ReduceSum", ["y2"], ["s"], name="rsum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then, else_branch=els),
        helper.make_node("Cast", ["h16"], ["h32"], name="cast16", to=F),
        helper.make_node("Cast", ["i8"], ["i32"], name="cast8", to=TensorProto.INT32),
    ]
    fn = helper.make_function("local.fn", "Swish", ["a"], ["o"],
                              [helper.make_node("Sigmoid", ["a"], ["sg"]), helper.make_node("Mul", ["a", "sg"], ["o"])],
                              [helper.make_opsetid("", 17)], doc_string="x * sigmoid(x)")
    g = helper.make_graph(nodes, "fidelity", [_vi("x", [1, 4, 8, 8], doc="an image")],
                          [_vi(n, [1, 8, 8, 8]) for n in ("f", "gl", "z")] + [_vi("h32", [2, 3]), _vi("i32", [3], TensorProto.INT32)],
                          inits, doc_string="graph doc",
                          value_info=[_vi("r", [1, 4, 8, 8], doc="untouched"), _vi("c1", [1, 8, 8, 8], doc="between conv1 and bn"),
                                      _vi("y2", [1, 8, 8, 8], doc="conv2 output")])
    g.sparse_initializer.extend([helper.make_sparse_tensor(  # unread: no standard op takes one
        numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "sp"),
        numpy_helper.from_array(np.array([1, 5], np.int64), "sp_i"), [8])])
    for t in ("r", "c1"):
        g.quantization_annotation.add(tensor_name=t).quant_parameter_tensor_names.add(key="SCALE_TENSOR", value="k")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1),
                                            helper.make_opsetid("com.microsoft", 1)],
                          ir_version=ir_version, functions=[fn], producer_name="exporter", producer_version="9.9",
                          doc_string="model doc", domain="com.example", model_version=7)
    helper.set_model_props(m, {"author": "me", "sepify.version": "0.0.0-an-earlier-rewrite"})
    ti = m.training_info.add()
    ti.algorithm.CopyFrom(helper.make_graph([], "algorithm", [], []))
    onnx.checker.check_model(m, full_check=True)
    return m


REMOVED = {"conv1", "bn", "w2_const", "conv2"}


def _ser(msgs) -> list[bytes]:
    return [m.SerializeToString() for m in msgs]


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("kw", [dict(orientation="dw-first"), dict(orientation="pw-first")], ids=["dw-split", "pw-split"])
def test_untouched_parts_are_byte_identical_and_rewritten_parts_exact(kw, tmp_path):
    src = _model()
    result = sepify.rewrite(src, rank="full", allow_increase=True, **kw)
    out = result.model
    assert [r.name for r in result.layers] == ["conv1", "conv2"]
    assert result.layers[0].folded_batchnorm == "bn"
    assert {r.form for r in result.layers} == {"split"}  # the default form, fast: split in both orientations
    # nodes: the untouched ones byte-identical, in their order; each pair where its Conv was
    pair1, pair2 = (r.new_nodes for r in result.layers)
    kept = [n for n in src.graph.node if n.name not in REMOVED]
    expected = ["relu", *pair1, "leaky", *pair2] + [n.name for n in kept[2:]]
    assert [n.name for n in out.graph.node] == expected
    by_name = {n.name: n for n in out.graph.node}
    assert _ser(by_name[n.name] for n in kept) == _ser(kept)
    assert by_name[pair1[-1]].output == ["y1"] and by_name[pair2[-1]].output == ["y2"]  # consumers unchanged
    # model and graph fields
    for f in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(out, f) == getattr(src, f), f
    for f in ("opset_import", "functions", "training_info"):
        assert _ser(getattr(out, f)) == _ser(getattr(src, f)), f
    for f in ("input", "output", "sparse_initializer"):
        assert _ser(getattr(out.graph, f)) == _ser(getattr(src.graph, f)), f
    assert (out.graph.name, out.graph.doc_string) == (src.graph.name, src.graph.doc_string)
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "me" and meta["sepify.version"] == sepify.__version__
    assert [p.key for p in out.metadata_props] == ["author", "sepify.version", "sepify.rewrite"]
    # what only the replaced nodes read is gone; b1 stays (the If body reads it)
    assert _ser(out.graph.value_info) == _ser(v for v in src.graph.value_info if v.name != "c1")
    assert _ser(out.graph.quantization_annotation) == _ser(src.graph.quantization_annotation[:1])
    src_inits = {t.name: t for t in src.graph.initializer}
    kept_inits = [t for t in src.graph.initializer if t.name not in {"w1", "bn_s", "bn_b", "bn_mean", "bn_var"}]
    assert _ser(out.graph.initializer[:len(kept_inits)]) == _ser(kept_inits)
    new_inits = [t.name for t in out.graph.initializer[len(kept_inits):]]
    assert new_inits and all(n.startswith(("conv1/", "conv2/")) for n in new_inits)
    assert "b1" in src_inits and "w2" not in {t.name for t in out.graph.initializer}
    # the report's layer diff matches every untouched node (the function's inlined ones too)
    rows = result.report["diff"]["rows"]
    assert {(r["status"], r["name"]) for r in rows if r["status"] != "unchanged"} == \
        {("changed", "conv1"), ("changed", "conv2"), ("removed", "bn"), ("changed", "if")}  # if: b1 now counted there
    assert {"Swish/Sigmoid_0__1", "Swish/Mul_1__1"} <= {r["name"] for r in rows if r["status"] == "unchanged"}
    # the written model passes the full check; at full rank it computes what the source does
    path = tmp_path / "out.onnx"
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want, got = _run(src, x), _run(onnx.load(str(path)), x)
    for name, a, b in zip(("f", "gl", "z", "h32", "i32"), want, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()), err_msg=name)
    assert src.SerializeToString() == _model().SerializeToString()  # the input is never modified


def test_rank1_rewrite_matches_its_factors_in_onnxruntime():
    """Rank 1 (not exact): the rewritten model equals a model built from the reported pair alone,
    i.e. the edit wired the pair exactly where the Conv + BN were."""
    src = _model()
    result = sepify.rewrite(src, rank=1)
    out = result.model
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    # reference: the source with conv1+bn replaced by the rewritten model's pair, via the pair's
    # own output y1 exposed as a graph output in both and conv2 left as it is in the source
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(_vi("y1", [1, 8, 8, 8]))
    y1 = _run(probe, x)[-1]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    dw, pw = (n for n in out.graph.node if n.name in result.layers[0].new_nodes)
    r = np.maximum(x, 0)
    # depthwise 3x3 (pads 1, group 4) then pointwise 1x1 with bias, in numpy
    d = inits[dw.input[1]]
    rp = np.pad(r, ((0, 0), (0, 0), (1, 1), (1, 1)))
    mid = np.zeros((1, 4, 8, 8), np.float64)
    for c in range(4):
        for i in range(8):
            for j in range(8):
                mid[0, c, i, j] = np.sum(rp[0, c, i:i + 3, j:j + 3] * d[c, 0])
    p, b = inits[pw.input[1]][:, :, 0, 0], inits[pw.input[2]]
    expect = np.einsum("nc,bchw->bnhw", p, mid) + b[None, :, None, None]
    np.testing.assert_allclose(y1, expect, rtol=1e-4, atol=1e-5)


def test_external_data_references_of_untouched_initializers_are_kept(tmp_path):
    src = _model()
    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                    size_threshold=0)
    on_disk = onnx.load(str(path), load_external_data=False)
    result = sepify.rewrite(str(path), rank="full", allow_increase=True)
    refs = {t.name: t for t in result.model.graph.initializer}
    for t in on_disk.graph.initializer:
        if t.name in ("b1", "k", "zero", "h16", "i8"):
            assert refs[t.name].SerializeToString() == t.SerializeToString(), t.name
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result.save(out)
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    for a, b in zip(_run(src, x), _run(onnx.load(str(out)), x)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def _ir3_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"], name="relu")], "ir3",
                          [_vi("x", [1, 3, 6, 6]), _vi("w", [6, 3, 3, 3])], [_vi("y", [1, 6, 6, 6])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)


def test_ir3_model_stays_ir3_with_its_initializers_listed_as_inputs():
    src = _ir3_model()
    onnx.checker.check_model(src, full_check=True)
    result = sepify.rewrite(src, rank="full", allow_increase=True, form="native")
    out = result.model
    assert out.ir_version == 3
    new = [t.name for t in out.graph.initializer]
    assert new == ["conv/depthwise.weight", "conv/pointwise.weight"]
    assert [i.name for i in out.graph.input] == ["x", *new]  # w gone with its initializer
    assert [list(d.dim_value for d in i.type.tensor_type.shape.dim) for i in out.graph.input[1:]] == \
        [list(t.dims) for t in out.graph.initializer]
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(src, x)[0], rtol=1e-4, atol=1e-4)


def test_conv_inside_a_model_local_function_is_rewritten_in_the_inlined_model():
    rng = np.random.default_rng(7)
    w = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32)))
    fn = helper.make_function("local.fn", "Block", ["a"], ["o"],
                              [w, helper.make_node("Conv", ["a", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["o"])], [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("Block", ["x"], ["y"], name="block", domain="local.fn")], "fn",
                          [_vi("x", [1, 2, 6, 6])], [_vi("y", [1, 4, 6, 6])])
    src = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
                            ir_version=8, functions=[fn])
    result = sepify.rewrite(src, rank="full", allow_increase=True)
    assert len(result.layers) == 1
    assert any("inlined" in n for n in result.report["notes"])
    out = result.model
    assert not out.functions and [n.op_type for n in out.graph.node].count("Conv") > 1
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(src, x)[0], rtol=1e-4, atol=1e-4)


def test_nothing_rewritten_gives_the_model_as_it_was():
    src = _model()
    result = sepify.rewrite(src, rank=1, exclude=[".*"])
    assert not result.layers
    out = onnx.ModelProto()
    out.CopyFrom(result.model)
    del out.metadata_props[:]
    ref = onnx.ModelProto()
    ref.CopyFrom(src)
    del ref.metadata_props[:]
    assert out.SerializeToString() == ref.SerializeToString()


def test_nodes_out_of_order_are_sorted_in_the_rewritten_model():
    """Loading sorts a model whose nodes are out of order (onnxruntime runs it); the written
    model must pass the checker, which wants them sorted."""
    src = _ir3_model()
    src.ir_version, src.opset_import[0].version = 8, 17
    del src.graph.input[1:]
    nodes = list(src.graph.node)[::-1]  # relu before the conv it reads
    del src.graph.node[:]
    src.graph.node.extend(nodes)
    result = sepify.rewrite(src, rank=1)
    assert [n.name for n in result.model.graph.node] == ["conv/depthwise", "conv/pointwise", "relu"]
    assert any("topological order" in n for n in result.report["notes"])
    onnx.checker.check_model(result.model, full_check=True)


def test_weight_computed_by_dequantize_linear_goes_with_the_conv():
    """A weight computed from constants (DequantizeLinear of an int8 initializer, opset 13, which
    onnx's reference evaluator has no kernel for: onnxruntime evaluates it) is read and the
    nodes and initializers that only computed it are removed; a scale also read elsewhere stays."""
    rng = np.random.default_rng(0)
    wq = rng.integers(-100, 100, (6, 3, 3, 3)).astype(np.int8)
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "sc", "zp"], ["w"], name="dq"),
         helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu"),
         helper.make_node("Identity", ["sc"], ["sc_out"], name="keep_sc")], "dq",
        [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 6, 6, 6]), _vi("sc_out", [])],
        [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.float32(0.02).reshape(()), "sc"),
         numpy_helper.from_array(np.int8(0).reshape(()), "zp")])
    src = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    result = sepify.rewrite(src, rank="full", allow_increase=True, form="native")
    out = result.model
    assert [n.name for n in out.graph.node] == ["conv/depthwise", "conv/pointwise", "relu", "keep_sc"]
    assert [t.name for t in out.graph.initializer] == ["sc", "conv/depthwise.weight", "conv/pointwise.weight"]
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(src, x)[0], rtol=1e-4, atol=1e-4)


def test_ir3_model_that_does_not_list_its_initializers_gets_none_listed():
    """onnxruntime runs an IR 3 model whose initializers are not graph inputs: the rewritten one
    keeps that form (its new initializers are not listed either) and runs the same."""
    src = _ir3_model()
    del src.graph.input[1:]
    result = sepify.rewrite(src, rank="full", allow_increase=True, form="native")
    out = result.model
    assert out.ir_version == 3 and [i.name for i in out.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(src, x)[0], rtol=1e-4, atol=1e-4)
