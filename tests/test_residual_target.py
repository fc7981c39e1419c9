"""Residual targets (sepify.rewrite.calibrate, "Residual targets"): a conv whose output is read
only by an Add whose other branch drifts is fitted to the original SUM minus the drifted branch.

Every expected value is computed independently: onnxruntime runs of the original and rewritten
models give the tensors, numpy the ridge least-squares solution and the relative errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.rewrite import calibrate
from sepify.rewrite.factorize import default_lam

from test_sensitivity import _conv, chain_with_head, data


def _sess(model, outputs=()):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _tensors(model, names, feeds):
    s = _sess(model, names)
    runs = [s.run(names, f) for f in feeds]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def _rows(t):  # (B, C, H, W) -> (B*H*W, C) float64
    return t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1]).astype(np.float64)


def _rel(ref, got):
    """The measured relative output error of docs/rewrite.md: per-channel centred."""
    ref, got = _rows(ref), _rows(got)
    return float(np.sqrt(np.sum((got - ref) ** 2) / np.sum((ref - ref.mean(0)) ** 2)))


def _init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _conv_weights(model, node_name):
    n = next(n for n in model.graph.node if n.name == node_name)
    return _init(model, n.input[1]), _init(model, n.input[2])


def test_a_kept_conv_before_a_skip_add_is_fitted_to_the_sum_minus_the_drifted_skip(monkeypatch):
    """chain_with_head: conv1, conv2 rewritten at rank 1; conv3 (1x1, kept) feeds
    ``sum = conv3(r2) + r2`` with the drifted r2 as the other branch. Its refit is the ridge
    least-squares solution of target ``c3 + r2 - r2~`` on ``r2~`` (onnxruntime's tensors of the
    original and the rewritten model on the fit samples), and the Add's output is closer to the
    original's than with the plain target, on held-out data."""
    monkeypatch.setattr(calibrate, "REFIT_GAIN", 0.0)
    model = chain_with_head()
    xs = data(40)
    kw = dict(rank=1, calibration={"x": xs}, calib_rows=1 << 16, holdout=0, cache=False)
    res = sepify.rewrite(model, **kw)
    (f,) = res.report["refitted"]
    assert f["name"] == "conv3" and f["output_error_at"] == "skip"
    feeds = [{"x": x} for x in xs]
    c3, r2 = _tensors(model, ["c3", "r2"], feeds)
    (r2t,) = _tensors(res.model, ["r2"], feeds)  # conv3's refit does not change its own input
    x = _rows(r2t)
    y = _rows(c3) - _init(model, "conv3.b") + _rows(r2) - x  # the target, without the bias
    w = _init(model, "conv3.w").reshape(12, 12).astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx = xc.T @ xc / len(x)
    lam = default_lam(12, len(x)) * np.trace(cxx) / 12
    a = np.linalg.solve(cxx + lam * np.eye(12), xc.T @ yc / len(x) + lam * w.T).T
    bias = y.mean(0) + _init(model, "conv3.b") - a @ x.mean(0)
    got_w, got_b = _conv_weights(res.model, "conv3")
    np.testing.assert_allclose(got_w.reshape(12, 12), a, rtol=2e-4, atol=2e-5 * np.abs(a).max())
    np.testing.assert_allclose(got_b, bias, rtol=2e-4, atol=2e-5 * np.abs(bias).max())
    # the predicted error is the Add output's relative error on the fit rows
    ref_sum = _rows(c3) + _rows(r2)
    pred = np.sqrt(np.sum((xc @ a.T - yc) ** 2) / np.sum((ref_sum - ref_sum.mean(0)) ** 2))
    assert f["output_error_predicted"] == pytest.approx(pred, rel=1e-3)

    # held out: the sum is closer to the original's than with the plain target (and than without the refit)
    test = [{"x": x} for x in data(24, seed=9)]
    (orig,) = _tensors(model, ["sum"], test)
    plain = sepify.rewrite(model, residual_target=False, **kw)
    assert plain.report["refitted"][0]["output_error_at"] is None
    none = sepify.rewrite(model, refit_kept=False, **kw)
    errs = {k: _rel(orig, _tensors(m.model, ["sum"], test)[0]) for k, m in
            (("residual", res), ("plain", plain), ("none", none))}
    assert errs["residual"] < errs["plain"] < errs["none"], errs


def _residual_pair_model(seed=0):
    """x -> conv1 (3x3) -> Relu -> r1; conv2 (3x3, a candidate) on r1; out = conv2 + r1."""
    rng = np.random.default_rng(seed)
    n1, i1 = _conv("conv1", "x", "c1", 6, 12, rng, scale=2.0)
    n2, i2 = _conv("conv2", "r1", "c2", 12, 12, rng, scale=2.0)
    nodes = [n1, helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), n2,
             helper.make_node("Add", ["c2", "r1"], ["out"], name="skip")]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 12, 8, 8])], i1 + i2)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_rewritten_layer_before_a_skip_add_reports_the_add_outputs_error():
    """conv2 (rewritten) feeds ``out = conv2 + r1`` and r1 drifts (conv1 is rewritten): conv2's
    errors are of the Add's output, and the measured one equals the relative error of ``out``
    between the original and the rewritten model on the held-out samples (onnxruntime)."""
    model = _residual_pair_model()
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((40, 1, 6, 8, 8)).astype(np.float32)
    res = sepify.rewrite(model, rank=1, calibration={"x": xs}, calib_rows=4096, cache=False)
    by = {r.name: r for r in res.layers}
    assert by["conv2"].output_error_at == "skip" and by["conv1"].output_error_at is None
    hold = list(res.calibration.holdout)
    (a,), (b,) = _tensors(model, ["out"], hold), _tensors(res.model, ["out"], hold)
    assert by["conv2"].output_error_measured == pytest.approx(_rel(a, b), rel=1e-4)
    (a1,), (b1,) = _tensors(model, ["c1"], hold), _tensors(res.model, ["c1"], hold)
    assert by["conv1"].output_error_measured == pytest.approx(_rel(a1, b1), rel=1e-4)
    # the Add's output is closer to the original's than with the plain target
    plain = sepify.rewrite(model, rank=1, calibration={"x": xs}, calib_rows=4096, cache=False, residual_target=False)
    assert {r.name: r.output_error_at for r in plain.layers} == {"conv1": None, "conv2": None}
    (c,) = _tensors(plain.model, ["out"], hold)
    assert _rel(a, b) < _rel(a, c)


def test_full_rank_upstream_leaves_the_kept_conv_and_the_outputs_as_they_were():
    model = chain_with_head()
    xs = data(24)
    res = sepify.rewrite(model, rank="full", allow_increase=True, calibration={"x": xs}, calib_rows=4096, cache=False)
    assert res.report["refitted"] == []
    feeds = [{"x": x} for x in data(8, seed=4)]
    (a,), (b,) = _tensors(model, ["logits"], feeds), _tensors(res.model, ["logits"], feeds)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    for layer in res.layers:
        assert layer.output_error_predicted < 1e-4


def test_a_broadcasting_add_keeps_the_plain_target(monkeypatch):
    """conv3's output + a per-channel vector (GlobalAveragePool of the drifted r2): not one value
    per output position, so conv3 is refitted to its own output (no residual target)."""
    monkeypatch.setattr(calibrate, "REFIT_GAIN", 0.0)
    m = chain_with_head()
    g = m.graph
    add = next(n for n in g.node if n.name == "skip")
    g.node.insert(list(g.node).index(add), helper.make_node("GlobalAveragePool", ["r2"], ["r2m"], name="mean"))
    add.input[1] = "r2m"
    res = sepify.rewrite(m, rank=1, calibration={"x": data(32)}, calib_rows=4096, cache=False)
    (f,) = res.report["refitted"]
    assert f["name"] == "conv3" and f["output_error_at"] is None
    onnx.checker.check_model(res.model, full_check=True)


def test_the_table_says_which_adds_output_the_errors_are_of(tmp_path):
    from click.testing import CliRunner

    from sepify.cli import main

    m = tmp_path / "m.onnx"
    onnx.save(_residual_pair_model(), m)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(2).standard_normal((40, 1, 6, 8, 8)).astype(np.float32))
    r = CliRunner().invoke(main, ["rewrite", str(m), "-o", str(tmp_path / "o.onnx"), "--calibration",
                                  str(tmp_path / "cal.npz"), "--rank", "1", "--no-cache"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith("conv2: dw-first rank 1:"))
    assert line.endswith("(of skip's output)")
