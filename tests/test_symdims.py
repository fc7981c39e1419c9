"""Derived symbolic dimensions (sepify.model.symdims, sepify.cost.symbolic.floordiv): formulas
through strided Conv, pools, Resize, Pad, Slice, Reshape of computed shapes... checked against
the shapes onnxruntime actually produces, and costs against hand formulas."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto as T, helper as h, numpy_helper as nh

from sepify.cost.analysis import _Bytes, _Walker, analyze
from sepify.cost.symbolic import Poly, dim_poly, evaluate, floordiv
from sepify.model.graph import GraphView
from sepify.model.loading import load

rng = np.random.default_rng(0)


def _w(shape, name):
    return nh.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _i64(values, name):
    return nh.from_array(np.array(values, dtype=np.int64), name)


def _model(nodes, inits, inputs, output, rank, opset=17):
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info(output, T.FLOAT, [None] * rank)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def _ort_shapes(model: onnx.ModelProto, feeds: dict) -> dict[str, tuple]:
    """Every node output's shape as onnxruntime computes it."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o for n in m.graph.node for o in n.output if o and o not in {x.name for x in m.graph.output}]
    for name in names:
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    return {o.name: tuple(v.shape) for o, v in zip(sess.get_outputs(), outs)}


def _derived_shapes(path) -> dict[str, tuple]:
    loaded = load(path)
    out = {}
    for vi in (*loaded.model.graph.value_info, *loaded.model.graph.output):
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.dim_param in loaded.symbols:
                dims.append(Poly.symbol(d.dim_param))
            else:
                dims.append(dim_poly(d.dim_param))  # None: still lost
        out[vi.name] = tuple(dims)
    return out


def _check_against_ort(tmp_path, model, values: dict, feeds: dict):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    derived = _derived_shapes(path)
    actual = _ort_shapes(model, feeds)
    assert actual
    for name, shape in actual.items():
        got = derived.get(name)
        assert got is not None and None not in got, (name, got)
        assert tuple(evaluate(d, values) if not isinstance(d, int) else d for d in got) == shape, (name, got, shape)


def _resnet_stem():
    """conv 7x7/2 p3 -> relu -> maxpool 3x3/2 p1 -> conv 3x3 p1 (+ residual) -> conv 1x1/2 -> GAP -> Gemm"""
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4, name="conv1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu"),
        h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4, name="pool"),
        h.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4, name="conv2"),
        h.make_node("Add", ["c2", "p1"], ["a"], name="add"),
        h.make_node("Conv", ["a", "w3"], ["c3"], kernel_shape=[1, 1], strides=[2, 2], name="conv3"),
        h.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["f"], name="flatten"),
        h.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc"),
    ]
    inits = [_w((8, 3, 7, 7), "w1"), _w((8, 8, 3, 3), "w2"), _w((16, 8, 1, 1), "w3"), _w((10, 16), "fc")]
    return _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])], "y", 2)


def test_resnet_stem_formula_is_exact(tmp_path):
    path = tmp_path / "stem.onnx"
    onnx.save(_resnet_stem(), path)
    a = analyze(path)
    assert a.totals.unknown == 0
    shapes = {layer.name: layer.output_shapes[0] for layer in a.layers}
    # by hand: 7x7/2 p3 and 3x3/2 p1 give ceil(x/2); two of them ceil(x/4); then 1x1/2 ceil(x/8)
    assert shapes["conv1"] == ["N", 8, "⌈H/2⌉", "⌈W/2⌉"]
    assert shapes["pool"] == ["N", 8, "⌈H/4⌉", "⌈W/4⌉"]
    assert shapes["conv3"] == ["N", 16, "⌈H/8⌉", "⌈W/8⌉"]
    # MACs: 7·7·3·8 = 1176 per conv1 output pixel, 3·3·8·8 = 576, 8·16 = 128, Gemm 16·10 = 160
    assert a.totals.macs_formula == ("1.18K·N·⌈H/2⌉·⌈W/2⌉ + 576·N·⌈H/4⌉·⌈W/4⌉ + 128·N·⌈H/8⌉·⌈W/8⌉ + 160·N")
    assert a.layer("conv2").macs_formula == "576·N·⌈H/4⌉·⌈W/4⌉"
    # numbers at the stand-in 1: every derived dim is 1
    assert a.totals.macs == 1176 + 576 + 128 + 160
    assert not any("not polynomial" in (n or "") for n in a.notes)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), hh=st.integers(9, 70), ww=st.integers(9, 70))
def test_resnet_stem_costs_match_onnxruntime_shapes(tmp_path_factory, n, hh, ww):
    tmp = tmp_path_factory.mktemp("stem")
    model = _resnet_stem()
    values = {"N": n, "H": hh, "W": ww}
    _check_against_ort(tmp, model, values, {"x": np.zeros((n, 3, hh, ww), np.float32)})
    # the symbolic per-layer MACs, evaluated, against K²·Cin·Cout·Ho·Wo from onnxruntime's shapes
    path = tmp / "m.onnx"
    loaded = load(path)
    view = GraphView(loaded.model.graph, symbols=loaded.symbols, lost=loaded.lost)
    rows = _Walker().walk(view, _Bytes(view, {}))
    actual = _ort_shapes(model, {"x": np.zeros((n, 3, hh, ww), np.float32)})
    macs = {r[0]: evaluate(r[3].macs, values) for r in rows}
    k2cc = {"conv1": 49 * 3 * 8, "conv2": 9 * 8 * 8, "conv3": 8 * 16}
    out = {"conv1": "c1", "conv2": "c2", "conv3": "c3"}
    for name, k in k2cc.items():
        s = actual[out[name]]
        assert macs[name] == k * s[0] * s[2] * s[3]
    assert macs["fc"] == 160 * n
    # and the same total as analysing the model with the dims bound
    bound = analyze(path, dims=values)
    assert sum(macs.values()) == bound.totals.macs


def _fpn_like():
    """Ops whose dims are arithmetic: Pad, ConvTranspose, Resize x2, Concat on H, Slice, SAME and
    ceil-mode pools, a Reshape whose shape is computed from Shape, Split, DepthToSpace."""
    nodes = [
        h.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
        h.make_node("Conv", ["xp", "w1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], name="conv_valid"),
        h.make_node("AveragePool", ["c1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                    name="pool_same"),
        h.make_node("MaxPool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="pool_ceil"),
        h.make_node("ConvTranspose", ["p2", "wt"], ["up1"], kernel_shape=[4, 4], strides=[2, 2], pads=[1] * 4,
                    name="deconv"),
        h.make_node("Resize", ["up1", "", "scales"], ["up2"], mode="nearest", name="resize"),
        h.make_node("Concat", ["up2", "up2"], ["cat"], axis=2, name="concat_h"),
        h.make_node("Slice", ["cat", "s_start", "s_end", "s_axes"], ["sl"], name="slice"),
        h.make_node("Shape", ["sl"], ["shp"], name="shape"),
        h.make_node("Gather", ["shp", "i0"], ["n0"], axis=0, name="g0"),
        h.make_node("Gather", ["shp", "i1"], ["c"], axis=0, name="g1"),
        h.make_node("Concat", ["n0", "c", "minus1"], ["target"], axis=0, name="target"),
        h.make_node("Reshape", ["sl", "target"], ["flat"], name="reshape"),
        h.make_node("Split", ["flat", "split"], ["s1", "s2"], axis=1, name="split"),
        h.make_node("Concat", ["s1", "s2"], ["back"], axis=1, name="concat_c"),
        h.make_node("Transpose", ["back"], ["y"], perm=[0, 2, 1], name="transpose"),
    ]
    inits = [_i64([0, 0, 1, 2, 0, 0, 1, 1], "pads"), _w((4, 3, 3, 3), "w1"), _w((4, 2, 4, 4), "wt"),
             nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             _i64([1], "s_start"), _i64([1 << 62], "s_end"), _i64([2], "s_axes"), _i64([0], "i0"), _i64([1], "i1"),
             _i64([-1], "minus1"), _i64([1, 1], "split")]
    return _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])], "y", 3)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 2), hh=st.integers(12, 60), ww=st.integers(12, 60))
def test_arithmetic_ops_match_onnxruntime_shapes(tmp_path_factory, n, hh, ww):
    model = _fpn_like()
    _check_against_ort(tmp_path_factory.mktemp("fpn"), model, {"N": n, "H": hh, "W": ww},
                       {"x": np.zeros((n, 3, hh, ww), np.float32)})


def test_reshape_of_computed_shape_is_a_formula(tmp_path):
    model = _fpn_like()
    path = tmp_path / "fpn.onnx"
    onnx.save(model, path)
    a = analyze(path)
    assert a.totals.unknown == 0
    assert not any("not polynomial" in (n or "") for n in a.notes)
    shapes = {layer.name: layer.output_shapes[0] for layer in a.layers}
    # by hand. Pad: H+2, W+3. Valid 3x3/2: floor((H+2-3)/2)+1 = ⌈H/2⌉, floor(W/2)+1.
    assert shapes["conv_valid"] == ["N", 4, "⌈H/2⌉", "⌊W/2⌋+1"]
    # SAME 3x3/2: ceil(x/2); ceil(⌈H/2⌉/2) = ⌈H/4⌉, ceil((⌊W/2⌋+1)/2) = floor((W+4)/4) = ⌊W/4⌋+1
    assert shapes["pool_same"] == ["N", 4, "⌈H/4⌉", "⌊W/4⌋+1"]
    # ceil mode 2x2/2, no pads: ceil((x-2)/2)+1 = floor((x+1)/2)
    assert shapes["pool_ceil"] == ["N", 4, "⌈H/8⌉", "⌊W/8⌋+1"]
    # deconv 4x4/2 p1: 2·(x-1) + 3 + 1 - 2 = 2·x;  resize x2: 4·x;  concat on H: 8·x;  slice from 1: -1
    assert shapes["deconv"] == ["N", 2, "2·⌈H/8⌉", "2·⌊W/8⌋+2"]
    assert shapes["resize"] == ["N", 2, "4·⌈H/8⌉", "4·⌊W/8⌋+4"]
    assert shapes["slice"] == ["N", 2, "8·⌈H/8⌉-1", "4·⌊W/8⌋+4"]
    # the computed Reshape target [N, C, -1]: -1 = (8·⌈H/8⌉ - 1)·(4·⌊W/8⌋ + 4), by cancelling N and C
    assert shapes["reshape"] == ["N", 2, "32·⌈H/8⌉·⌊W/8⌋+32·⌈H/8⌉-4·⌊W/8⌋-4"]


@settings(max_examples=200, deadline=None)
@given(a=st.integers(1, 6), c=st.integers(-20, 20), d=st.integers(1, 9), e=st.integers(1, 5), k=st.integers(-9, 9),
       x=st.integers(0, 500))
def test_floordiv_is_floor(a, c, d, e, k, x):
    H = Poly.symbol("H")
    inner = floordiv(a * H + c, d)
    assert evaluate(inner, {"H": x}) == (a * x + c) // d
    outer = floordiv(inner + k, e)  # (nested quotients collapse: still exact)
    assert evaluate(outer, {"H": x}) == ((a * x + c) // d + k) // e
    neg = floordiv(-a * H + c, d)  # (turned around)
    assert evaluate(neg, {"H": x}) == (-a * x + c) // d
    mixed = floordiv(inner * (k * e) - H + c, e)  # (a multiple of e comes out)
    assert evaluate(mixed, {"H": x}) == (((a * x + c) // d) * k * e - x + c) // e


def test_swin_pad_is_the_padded_size():
    """(7 - H mod 7) mod 7, as the legacy Swin export computes its pad: H + pad == 7·⌈H/7⌉."""
    from sepify.model.symdims import _mod

    H = Poly.symbol("H")
    pad = _mod(7 - _mod(H, 7), 7)
    assert H + pad == 7 * floordiv(H + 6, 7)
    assert [evaluate(H + pad, {"H": x}) for x in (56, 57, 62, 63)] == [56, 63, 63, 63]


def test_floordiv_canonical_names():
    H = Poly.symbol("H")
    assert floordiv(H - 1, 2) + 1 == floordiv(H + 1, 2)  # 3x3/2 p1 is ceil(H/2)
    assert str(floordiv(H + 1, 2)) == "Poly(⌈H/2⌉)"
    assert floordiv(floordiv(H + 1, 2) + 1, 2) == floordiv(H + 3, 4)  # ceil(ceil(H/2)/2) == ceil(H/4)
    assert floordiv(2 * H + 1, 2) == H
    assert floordiv(H, 1) == H
    assert floordiv(7, 2) == 3


def test_check_names_the_dims_a_strided_conv_depends_on(tmp_path):
    from click.testing import CliRunner
    from sepify.cli import main

    path = tmp_path / "stem.onnx"
    onnx.save(_resnet_stem(), path)
    cfg = tmp_path / "b.toml"
    cfg.write_text('[tool.sepify]\nmax-macs = "1M"\n')
    r = CliRunner().invoke(main, ["check", str(path), "--config", str(cfg)])
    assert r.exit_code == 2
    assert "H, W" in r.output or "H, W" in (r.stderr if r.stderr_bytes is not None else "")
    r = CliRunner().invoke(main, ["check", str(path), "--config", str(cfg), "--dim", "N=1", "--dim", "H=64",
                                  "--dim", "W=64"])
    # by hand at 64x64: 1176·32·32 + 576·16·16 + 128·8·8 + 160 = 1,360,032 > 1M
    assert r.exit_code == 1
    assert analyze(path, dims={"N": 1, "H": 64, "W": 64}).totals.macs == 1176 * 1024 + 576 * 256 + 128 * 64 + 160


def test_rewrite_of_a_symbolic_height_model_reports_formulas(tmp_path):
    from sepify.rewrite import rewrite

    path = tmp_path / "stem.onnx"
    onnx.save(_resnet_stem(), path)
    result = rewrite(path)
    layers = {r.name: r for r in result.layers}
    assert set(layers) == {"conv1", "conv2"}  # conv3 is 1x1
    # rank 1, dw-first: (M·K + N·M)·positions. conv1 8x3x7x7: 3·49 + 8·3 = 171; conv2 8x8x3x3: 72 + 64 = 136
    assert layers["conv1"].macs_before_formula == "1.18K·N·⌈H/2⌉·⌈W/2⌉"
    assert layers["conv1"].macs_after_formula == "171·N·⌈H/2⌉·⌈W/2⌉"
    assert layers["conv2"].macs_after_formula == "136·N·⌈H/4⌉·⌈W/4⌉"
    totals = result.report["totals"]
    assert totals["after"]["macs_formula"] == "171·N·⌈H/2⌉·⌈W/2⌉ + 136·N·⌈H/4⌉·⌈W/4⌉ + 128·N·⌈H/8⌉·⌈W/8⌉ + 160·N"
    # no second load at the stand-in values was needed to plan the layers after the strided conv
    assert not any("unbound" in s.reason for s in result.skipped)


def test_reshape_target_from_gathers_of_a_derived_shape(tmp_path):
    """A CRNN head (ddddocr's): Reshape(x, Concat(Gather(Shape(x), 0) * Gather(Shape(x), 1),
    Gather(Shape(x), 2))) after a stride-2 conv over a symbolic width. The second Gather is the
    constant 1: it must still count in the product."""
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3], strides=[2], pads=[1, 1], name="conv"),
        h.make_node("Transpose", ["c"], ["t"], perm=[2, 0, 1], name="t"),  # (⌈L/2⌉, N, 4)
        h.make_node("Shape", ["t"], ["s"], name="shape"),
        h.make_node("Gather", ["s", "i0"], ["a"], axis=0, name="ga"),
        h.make_node("Gather", ["s", "i1"], ["b"], axis=0, name="gb"),
        h.make_node("Gather", ["s", "i2"], ["c2"], axis=0, name="gc"),
        h.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
        h.make_node("Unsqueeze", ["ab", "ax0"], ["ab1"], name="u1"),
        h.make_node("Unsqueeze", ["c2", "ax0"], ["c21"], name="u2"),
        h.make_node("Concat", ["ab1", "c21"], ["target"], axis=0, name="target"),
        h.make_node("Reshape", ["t", "target"], ["r"], name="reshape"),
        h.make_node("Gemm", ["r", "fc"], ["y"], transB=1, name="fc"),
    ]
    inits = [_w((4, 1, 3), "w"), _i64(0, "i0"), _i64(1, "i1"), _i64(2, "i2"), _i64([0], "ax0"), _w((5, 4), "fc")]
    model = _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, [1, 1, "L"])], "y", 2)
    path = tmp_path / "crnn.onnx"
    onnx.save(model, path)
    a = analyze(path)
    assert a.layer("reshape").output_shapes[0] == ["⌈L/2⌉", 4]
    # by hand: conv 3·4 per position, Gemm 4·5 per row, ⌈L/2⌉ positions and rows
    assert a.totals.macs_formula == "32·⌈L/2⌉"
    for length in (7, 64, 171):
        assert analyze(path, dims={"L": length}).totals.macs == 32 * (-(-length // 2))
        got = _ort_shapes(model, {"x": np.zeros((1, 1, length), np.float32)})
        assert got["r"] == (-(-length // 2), 4)


def test_rewrite_decides_savings_at_real_sizes_not_the_stand_in(tmp_path):
    """A 4x4 stride-4 patch embedding over a free H x W has ⌊H/4⌋·⌊W/4⌋ = 0 positions at the
    stand-in H = W = 1: its saving is judged on the formulas, so it is rewritten."""
    from sepify.rewrite import rewrite

    nodes = [h.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[4, 4], strides=[4, 4], name="patch")]
    model = _model(nodes, [_w((32, 3, 4, 4), "w")], [h.make_tensor_value_info("x", T.FLOAT, [1, 3, "H", "W"])], "y", 4)
    path = tmp_path / "patch.onnx"
    onnx.save(model, path)
    result = rewrite(path)
    assert [r.name for r in result.layers] == ["patch"], result.skipped
    # rank 1, dw-first: 3·16 + 32·3 = 144 per position, against 32·3·16 = 1536
    assert result.layers[0].macs_after_formula == "144·⌊H/4⌋·⌊W/4⌋"
    assert result.layers[0].macs_before_formula == "1.54K·⌊H/4⌋·⌊W/4⌋"


def test_a_mac_budget_over_free_spatial_dims_is_refused_until_bound(tmp_path):
    from click.testing import CliRunner
    from sepify.cli import main

    path = tmp_path / "stem.onnx"
    onnx.save(_resnet_stem(), path)
    r = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--target-ratio", "0.5"])
    assert r.exit_code == 2
    assert "H, W" in r.output and "--dim H=VALUE --dim W=VALUE" in r.output
    r = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--target-ratio", "0.5", "--dim", "H=64",
                                  "--dim", "W=64", "--format", "json"])
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads(r.output)
    # bound at 64x64 (N free: a batch): conv MACs 1176·32·32 + 576·16·16 + 128·8·8 + 160 before
    assert rep["totals"]["before"]["macs"] == 1176 * 1024 + 576 * 256 + 128 * 64 + 160
    assert rep["totals"]["after"]["macs"] <= rep["totals"]["before"]["macs"] * 0.5


@settings(max_examples=6, deadline=None)
@given(hh=st.integers(5, 40), ww=st.integers(5, 40))
def test_ceil_mode_pool_with_pads_matches_onnxruntime(tmp_path_factory, hh, ww):
    """GoogLeNet's inception pools: 3x3 stride 1 pad 1, ceil mode; and 3x3 stride 2 pad 0."""
    nodes = [h.make_node("MaxPool", ["x"], ["p1"], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4, ceil_mode=1),
             h.make_node("MaxPool", ["p1"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]
    model = _model(nodes, [], [h.make_tensor_value_info("x", T.FLOAT, [1, 2, "H", "W"])], "y", 4)
    _check_against_ort(tmp_path_factory.mktemp("ceil"), model, {"H": hh, "W": ww},
                       {"x": np.zeros((1, 2, hh, ww), np.float32)})


def test_stem_that_cannot_run_at_1_keeps_its_formula(tmp_path):
    """SqueezeNet's stem: 7x7 stride 2, no padding, over a free H x W: ⌈H/2⌉ - 3, negative at
    the stand-in 1. The formula is kept; the numbers take the smallest power of two where every
    size is positive: (H - 7)//2 + 1 >= 1 needs H >= 7, so 8."""
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[7, 7], strides=[2, 2], name="stem")]
    model = _model(nodes, [_w((4, 3, 7, 7), "w")], [h.make_tensor_value_info("x", T.FLOAT, [1, 3, "H", "W"])], "y", 4)
    path = tmp_path / "stem7.onnx"
    onnx.save(model, path)
    a = analyze(path)
    assert a.layer("stem").output_shapes[0] == [1, 4, "⌈H/2⌉-3", "⌈W/2⌉-3"]
    assert a.symbols["H"]["value"] == 8 and any("set to 8 for the numbers" in n for n in a.notes)
    # 7·7·3·4 = 588 MACs per output position; at 8 x 8 one position
    assert a.totals.macs == 588
    for hh, ww in ((224, 224), (65, 40)):
        shape = _ort_shapes(model, {"x": np.zeros((1, 3, hh, ww), np.float32)})["y"]
        assert analyze(path, dims={"H": hh, "W": ww}).totals.macs == 588 * shape[2] * shape[3]


def test_model_invalid_at_1_with_a_lost_dim_is_analysed_at_a_valid_size(tmp_path):
    """An STFT-like Conv (kernel 64, stride 32) over a free length L, after a Reshape whose target
    is computed in float arithmetic (no symbolic rule follows it; with L bound it folds): at L = 1
    the Conv input is shorter than its kernel. The numbers are given at the smallest power of two
    where the model is valid (64), not refused."""
    nodes = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "i2"], ["l"], axis=0),
             h.make_node("Cast", ["l"], ["lf"], to=T.FLOAT), h.make_node("Mul", ["lf", "one_f"], ["lf1"]),
             h.make_node("Cast", ["lf1"], ["l1"], to=T.INT64), h.make_node("Concat", ["ones", "l1"], ["target"], axis=0),
             h.make_node("Reshape", ["x", "target"], ["xr"], name="reshape"),
             h.make_node("Conv", ["xr", "w"], ["y"], kernel_shape=[64], strides=[32], name="stft")]
    inits = [_i64([2], "i2"), nh.from_array(np.array([1.0], np.float32), "one_f"), _i64([1, 1], "ones"),
             _w((8, 1, 64), "w")]
    model = _model(nodes, inits, [h.make_tensor_value_info("x", T.FLOAT, [1, 1, "L"])], "y", 3)
    path = tmp_path / "stft.onnx"
    onnx.save(model, path)
    a = analyze(path)
    assert a.symbols["L"]["value"] == 64
    # at L = 64: one window, 64·8 MACs
    assert a.layer("stft").macs == 64 * 8
    assert any("set to 64 for the numbers" in n for n in a.notes)
    got = _ort_shapes(model, {"x": np.zeros((1, 1, 64), np.float32)})["y"]
    assert got == (1, 8, 1)
