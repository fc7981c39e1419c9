"""Calibrated rewrite: calibration data (formats, validation, the split), the statistics
plumbing, and end-to-end accuracy measured with onnxruntime on held-out samples.

Every expected value is computed here independently: onnxruntime outputs of the original
model, numpy from the Conv definition, or a comparison of two rewrites measured the same way.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main
from sepify.errors import UsageError
from sepify.rewrite.calibrate import gather_patches, geometry, out_spatial
from sepify.rewrite.data import MIN_FIT_SAMPLES, load_calibration

SHAPE = (1, 6, 10, 10)
ROWS = 2048  # patch rows per layer: small, the tests stay fast


def cnn(input_shape=SHAPE, seed: int = 0) -> onnx.ModelProto:
    """conv0 (3x3, bias) -> BN -> Relu -> conv1 (3x3, SAME_UPPER, stride 2) -> Relu -> conv2 (3x3)
    -> GlobalAveragePool -> Flatten: random weights, a structure like a small trained CNN."""
    rng = np.random.default_rng(seed)

    def w(n, m):
        return (rng.standard_normal((n, m, 3, 3)) / np.sqrt(m * 9)).astype(np.float32)

    inits = [numpy_helper.from_array(w(12, 6), "w0"), numpy_helper.from_array(rng.standard_normal(12).astype(np.float32) * 0.1, "b0"),
             numpy_helper.from_array(w(12, 12), "w1"), numpy_helper.from_array(w(8, 12), "w2")]
    bn = {"scale": 1 + 0.1 * rng.standard_normal(12), "B": 0.1 * rng.standard_normal(12),
          "mean": 0.1 * rng.standard_normal(12), "var": 1 + 0.1 * rng.random(12)}
    inits += [numpy_helper.from_array(v.astype(np.float32), f"bn_{k}") for k, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["n0"], name="bn0"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["y"], name="flatten"),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [input_shape[0], 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def correlated(n: int, seed: int) -> np.ndarray:
    """[n, 1, 6, 10, 10] inputs living near a 2-dim channel subspace, spatially smooth."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).standard_normal((6, 2))
    z = np.kron(rng.standard_normal((n, 2, 5, 5)), np.ones((1, 1, 2, 2)))
    x = np.einsum("cd,ndhw->nchw", mix, z) + 0.05 * rng.standard_normal((n, 6, 10, 10))
    return x[:, None].astype(np.float32)


def sess(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def outputs(model: onnx.ModelProto, xs: np.ndarray, names=None) -> list[np.ndarray]:
    s = sess(model)
    runs = [s.run(names, {"x": x}) for x in xs]
    return [np.stack([r[i] for r in runs]) for i in range(len(runs[0]))]


def rel(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()))


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return m


# --- end to end ------------------------------------------------------------------------------
def test_calibrated_rewrite_beats_weight_only_on_held_out_final_output():
    model, cal, test = cnn(), correlated(32, 1), correlated(16, 2)
    ref = outputs(model, test)[0]
    plain = sepify.rewrite(model, rank=1)
    calibrated = sepify.rewrite(model, rank=1, calibration={"x": cal}, calib_rows=ROWS)
    e_plain, e_cal = rel(ref, outputs(plain.model, test)[0]), rel(ref, outputs(calibrated.model, test)[0])
    assert e_cal < 0.5 * e_plain, (e_cal, e_plain)
    assert [r.rank for r in calibrated.layers] == [1, 1, 1]
    onnx.checker.check_model(calibrated.model, full_check=True)
    # the report: per layer predicted and measured output errors, and the calibration settings
    rep = calibrated.report
    assert rep["calibration"]["fit_samples"] + rep["calibration"]["holdout_samples"] == 32
    assert rep["calibration"]["rows_per_layer"] == ROWS
    for layer in rep["layers"]:
        assert layer["output_error_predicted"] is not None and layer["output_error_measured"] is not None


def test_full_rank_with_calibration_stays_exact():
    model, cal, test = cnn(), correlated(16, 1), correlated(4, 2)
    result = sepify.rewrite(model, rank="full", allow_increase=True, calibration={"x": cal}, calib_rows=ROWS)
    onnx.checker.check_model(result.model, full_check=True)
    assert len(result.layers) == 3
    ref, got = outputs(model, test)[0], outputs(result.model, test)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    for layer in result.layers:
        assert layer.output_error_predicted < 1e-4 and layer.output_error_measured < 1e-4


def test_measured_layer_errors_match_an_independent_onnxruntime_run():
    model, cal = cnn(), correlated(20, 3)
    result = sepify.rewrite(model, rank=2, calibration={"x": cal}, calib_rows=ROWS, holdout=5)
    held = cal[result.report["calibration"]["holdout_indices"]]
    assert len(held) == 5
    tensors = ["n0", "c1", "c2"]  # conv0's output is the folded BN's
    a = outputs(with_outputs(model, tensors), held, tensors)
    b = outputs(with_outputs(result.model, tensors), held, tensors)
    for layer, t, ya, yb in zip(result.layers, tensors, a, b):
        ya, yb = ya.astype(np.float64), yb.astype(np.float64)
        centred = ya - ya.mean(axis=(0, 1, 3, 4), keepdims=True)  # per channel, over samples and positions
        expected = np.linalg.norm(yb - ya) / np.linalg.norm(centred)
        assert layer.output_error_measured == pytest.approx(expected, rel=1e-6)


def test_holdout_samples_are_never_used_to_fit():
    model, cal = cnn(), correlated(20, 4)
    first = sepify.rewrite(model, rank=1, calibration={"x": cal}, calib_rows=ROWS)
    hold = first.report["calibration"]["holdout_indices"]
    assert len(hold) == 4  # round(0.2 * 20)
    other = cal.copy()
    other[hold] = np.random.default_rng(9).standard_normal(other[hold].shape).astype(np.float32) * 3
    second = sepify.rewrite(model, rank=1, calibration={"x": other}, calib_rows=ROWS)
    assert second.report["calibration"]["holdout_indices"] == hold
    w1, w2 = weights(first.model), weights(second.model)
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_array_equal(w1[k], w2[k])
    # ... while the measurement did use them
    assert first.layers[0].output_error_measured != second.layers[0].output_error_measured


def test_target_ratio_with_calibration_meets_the_budget_and_beats_weight_only():
    model, cal, test = cnn(), correlated(24, 5), correlated(12, 6)
    ref = outputs(model, test)[0]
    cal_r = sepify.rewrite(model, target_ratio=0.5, calibration={"x": cal}, calib_rows=ROWS)
    plain = sepify.rewrite(model, target_ratio=0.5)
    for r in (cal_r, plain):
        assert r.report["totals"]["after"]["macs"] <= 0.5 * r.report["totals"]["before"]["macs"]
    assert rel(ref, outputs(cal_r.model, test)[0]) < rel(ref, outputs(plain.model, test)[0])


# --- calibration data formats ----------------------------------------------------------------
def test_file_folder_iterable_and_mapping_forms_give_the_same_rewrite(tmp_path):
    model, cal = cnn(), correlated(12, 7)
    np.savez(tmp_path / "cal.npz", x=cal)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, x in enumerate(cal):  # alternately [1, *shape] and the plain input shape
        np.savez(folder / f"{i:03d}.npz", x=x[None] if i % 2 else x)
    sources = [str(tmp_path / "cal.npz"), str(folder), [{"x": x} for x in cal], {"x": cal}]
    results = [sepify.rewrite(model, rank=1, calibration=s, calib_rows=512) for s in sources]
    ref = weights(results[0].model)
    for r in results[1:]:
        got = weights(r.model)
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])
    assert results[0].report["calibration"]["samples"] == 12


def test_symbolic_dims_are_bound_from_the_data_and_reported():
    dynamic = cnn(input_shape=(1, 6, "H", "W"))
    result = sepify.rewrite(dynamic, rank=1, calibration={"x": correlated(12, 8)}, calib_rows=512)
    assert result.report["calibration"]["dims_bound_from_data"] == {"H": 10, "W": 10}
    static = sepify.rewrite(cnn(), rank=1)
    assert result.report["totals"]["before"]["macs"] == static.report["totals"]["before"]["macs"]


def test_folder_is_read_lazily(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    folder.mkdir()
    cal = correlated(10, 9)
    for i, x in enumerate(cal):
        np.savez(folder / f"{i}.npz", x=x)
    import sepify.rewrite.data as data

    reads = []
    real = data.read_npz
    monkeypatch.setattr(data, "read_npz", lambda p, label: reads.append(p) or real(p, label))
    cs = load_calibration(str(folder), cnn())
    assert reads == []  # validation reads the .npy headers only
    np.testing.assert_array_equal(cs.fit[0]["x"], cal[cs.fit.indices[0]])
    assert len(reads) == 1


def _bad(tmp_path, kind):
    n = MIN_FIT_SAMPLES + 4
    x = correlated(n, 0)
    if kind == "name":
        np.savez(tmp_path / "c.npz", image=x)
        return tmp_path / "c.npz", "array 'image' is not a graph input (graph inputs: x)"
    if kind == "shape":
        np.savez(tmp_path / "c.npz", x=x[:, :, :4])
        return tmp_path / "c.npz", "the model's input 'x' is [1, 6, 10, 10] (dim 1: 4 != 6)"
    if kind == "no sample axis":
        np.savez(tmp_path / "c.npz", x=x[:, 0])
        return tmp_path / "c.npz", "stacked on a new leading axis: [S, 1, 6, 10, 10] (x[:, None] adds it)"
    if kind == "dtype":
        np.savez(tmp_path / "c.npz", x=x.astype(np.float64))
        return tmp_path / "c.npz", "'x' is float64, the model's input 'x' is float32"
    if kind == "few":
        np.savez(tmp_path / "c.npz", x=x[:MIN_FIT_SAMPLES])
        return tmp_path / "c.npz", f"too few calibration samples: {MIN_FIT_SAMPLES} given, 2 held out"
    if kind == "nan":
        x[3, 0, 0, 0, 0] = np.nan
        np.savez(tmp_path / "c.npz", x=x)
        return tmp_path / "c.npz", "contains NaN or infinite values"
    if kind == "empty folder":
        (tmp_path / "d").mkdir()
        return tmp_path / "d", "the folder has no .npz files"
    if kind == "folder shape":
        (tmp_path / "d").mkdir()
        for i in range(n):
            np.savez(tmp_path / "d" / f"{i:02d}.npz", x=x[i][..., :9] if i == 5 else x[i])
        return tmp_path / "d", "05.npz 'x' has shape [1, 6, 10, 9]"
    if kind == "not npz":
        (tmp_path / "c.npz").write_bytes(b"not a zip")
        return tmp_path / "c.npz", "not an .npz file: not a zip archive"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["name", "shape", "no sample axis", "dtype", "few", "nan", "empty folder", "folder shape", "not npz"])
def test_bad_calibration_data_is_one_line_and_exit_2(tmp_path, kind):
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    cal, message = _bad(tmp_path, kind)
    result = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--calibration", str(cal)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sepify: error: --calibration"), result.stderr
    assert message in lines[0]


def test_iterable_api_errors_are_usage_errors():
    model, x = cnn(), correlated(12, 0)
    with pytest.raises(UsageError, match="sample 2: no array for graph input 'x'"):
        load_calibration([{"x": x[0]}, {"x": x[1]}, {}], model)
    with pytest.raises(UsageError, match="sample 0 'x' has shape \\[6, 10, 10\\]"):
        load_calibration([{"x": v[0]} for v in x], model)
    with pytest.raises(UsageError, match="--holdout must be"):
        load_calibration({"x": x}, model, holdout=-0.1)


def test_calibration_options_need_calibration(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    result = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--holdout", "0.3"])
    assert result.exit_code == 2 and "need --calibration" in result.stderr


def test_cli_calibrated_rewrite_writes_a_checked_model_and_reports_errors(tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "m.sep.onnx"
    onnx.save(cnn(), path)
    np.savez(tmp_path / "c.npz", x=correlated(12, 1))
    result = CliRunner().invoke(main, ["rewrite", str(path), "-o", str(out), "--calibration", str(tmp_path / "c.npz"),
                                       "--calib-rows", "512", "--target-ratio", "0.6"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "calibration: 12 samples" in result.output and "predicted on the fit set / measured on the holdout" in result.output
    onnx.checker.check_model(str(out), full_check=True)
    xs = correlated(3, 2)
    assert outputs(onnx.load(out), xs)[0].shape == (3, 1, 8)


# --- patches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs", [{"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]},
                                   {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                   {"auto_pad": "SAME_LOWER", "strides": [3, 2]},
                                   {"auto_pad": "VALID"}])
@pytest.mark.parametrize("group", [1, 2])
def test_patches_times_weight_is_the_onnxruntime_conv(attrs, group):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 9, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((2, 6, 9, 10)).astype(np.float32)
    y = sess(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])).run(None, {"x": x})[0]
    geo = geometry(node, w.shape, x.shape[2:])
    assert out_spatial(geo, x.shape[2:]) == y.shape[2:]
    flat = np.array([0, 3, 7, y.shape[2] * y.shape[3] + 1, y.size // 4 - 1])  # some positions, both batch items
    rows = gather_patches(x, geo, flat)  # (rows, g, Mg*K)
    got = np.einsum("pjf,jnf->pjn", rows.astype(np.float64), w.reshape(group, 4 // group, -1)).reshape(len(flat), 4)
    want = y.transpose(0, 2, 3, 1).reshape(-1, 4)[flat]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_verify_with_calibration_runs_on_the_held_out_samples(tmp_path):
    import json

    path = tmp_path / "m.onnx"
    onnx.save(cnn(), path)
    cal = correlated(15, 1)
    np.savez(tmp_path / "c.npz", x=cal)
    result = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--calibration", str(tmp_path / "c.npz"),
                                       "--calib-rows", "512", "--holdout", "4", "--verify", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.output)
    ver, hold = report["verification"], report["calibration"]["holdout_indices"]
    assert ver["samples"] == 4 and ver["inputs"].startswith("calibration holdout") and len(hold) == 4
    assert report["calibration"]["fit_samples"] == 11


def test_unreachable_budget_fails_before_any_onnxruntime_pass(monkeypatch):
    import sepify.rewrite.calibrate as calibrate
    from sepify.errors import BudgetError

    def no_pass(*a, **k):
        raise AssertionError("an onnxruntime pass ran")

    monkeypatch.setattr(calibrate, "collect_same", no_pass)
    with pytest.raises(BudgetError, match="cannot be reached"):
        sepify.rewrite(cnn(), target_macs=1000, calibration={"x": correlated(12, 0)})


def test_paired_statistics_reusing_phase_1_equal_the_direct_ones():
    """Phase 2 takes sum_t / tt from phase 1 (the same samples and positions): the result must
    equal the statistics accumulated directly from both models' patches."""
    from sepify.rewrite import calibrate as cal

    model, data = cnn(), correlated(12, 3)
    feeds = [{"x": x} for x in data]
    c1 = next(n for n in model.graph.node if n.name == "conv1")
    layer = cal.Layer("conv1", "r0", "c1", c1, (12, 12, 3, 3), 3)
    same = cal.collect_same(model, [layer], feeds, rows=300, seed=1)["conv1"]
    working = onnx.ModelProto()
    working.CopyFrom(model)
    working.graph.node[2].op_type = "Sigmoid"  # relu0 -> sigmoid: a different x~ for conv1
    orig = cal.session(cal.prefix(model, ["r0"]))
    reused = cal.collect_paired(orig, working, layer, feeds, rows=300, seed=1, known=same)
    direct = cal.collect_paired(orig, working, layer, feeds, rows=300, seed=1)
    assert reused.n == direct.n == 12 * 25  # ceil(300 / 12) positions of each sample's 5x5 output
    for f in ("sum_x", "xx", "tx"):  # both float64 products of the same patches
        np.testing.assert_allclose(getattr(reused, f), getattr(direct, f), rtol=1e-10, atol=1e-8)
    for f in ("sum_t", "tt"):  # phase 1's moments: float32 products of shifted rows (calibrate._Rows)
        a, b = getattr(reused, f), getattr(direct, f)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    assert not np.allclose(direct.xx, direct.tt)  # x~ really differs from x


def test_sequential_and_als_each_lower_the_held_out_error():
    """Sequential (asymmetric) fitting beats fitting each layer on the original inputs, and ALS
    beats the pointwise refit alone: measured on held-out final outputs with onnxruntime."""
    model, cal, test = cnn(), correlated(32, 1), correlated(16, 2)
    ref = outputs(model, test)[0]
    err, passes, lines = {}, {}, []
    for seq, method in ((True, "als"), (False, "als"), (True, "refit")):
        r = sepify.rewrite(model, rank=1, calibration={"x": cal}, calib_rows=ROWS, sequential=seq,
                           calib_method=method, progress=lines.append)
        err[seq, method] = rel(ref, outputs(r.model, test)[0])
        passes[seq, method] = r.report["calibration"]["passes"]
    assert err[True, "als"] < err[False, "als"] and err[True, "als"] < err[True, "refit"], err
    assert passes[False, "als"] == {"phase1": 1, "phase2": 0, "holdout": 1}  # one statistics pass only
    assert passes[True, "als"] == {"phase1": 1, "phase2": 2, "holdout": 1}  # conv1, conv2 on rewritten inputs
    assert lines[:2] == ["calibration: input statistics of 1 conv(s) on 26 samples",
                         "calibration: fitting conv0 (1/3, dw-first rank 1)"]
