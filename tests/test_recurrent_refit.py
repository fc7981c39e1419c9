"""The refit of a recurrent node's input projection (plan.kept_recurrent, calibrate.Calibrator.fit):
an LSTM / GRU after rewritten convs gets W (and Wb) refitted so that ``W~ x~_t + Wb~`` matches
the original ``W x_t + Wb`` on the calibration data; the recurrence is untouched.

Expected values are computed independently: onnxruntime's tensors of the original and rewritten
models, numpy's ridge least-squares solve and relative errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.rewrite import calibrate
from sepify.rewrite.factorize import default_lam

from test_residual_target import _init, _sess

T, I, H = 16, 8, 6


def _tensor(model, name, feeds):
    s = _sess(model, [name])
    return np.concatenate([s.run([name], f)[0].reshape(-1, s.run([name], f)[0].shape[-1]) for f in feeds])


def seq_model(op="LSTM", with_bias=True, seed=0) -> onnx.ModelProto:
    """x (1, 3, 1, T) -> conv (3x3, 3->8) -> Relu -> (T, 1, 8) -> bidirectional ``op`` (hidden H)."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3}[op]
    w = (rng.standard_normal((I, 3, 3, 3)) / np.sqrt(27) * 2).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv.w"), numpy_helper.from_array(np.zeros(I, np.float32), "conv.b"),
             numpy_helper.from_array(np.array([1, I, T], np.int64), "shape"),
             numpy_helper.from_array((rng.standard_normal((2, gates * H, I)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((2, gates * H, H)) * 0.3).astype(np.float32), "R")]
    rnn_inputs = ["seq", "W", "R"]
    if with_bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((2, 2 * gates * H)) * 0.1).astype(np.float32), "B"))
        rnn_inputs.append("B")
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape"),
             helper.make_node("Transpose", ["flat"], ["seq"], name="transpose", perm=[2, 0, 1]),
             helper.make_node(op, rnn_inputs, ["y"], name="rnn", hidden_size=H, direction="bidirectional")]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1, T])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 2, 1, H])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(n, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1, 3, 1, T)).astype(np.float32)
    return base + 0.7 * np.roll(base, 1, axis=2)  # channels correlated: rank 1 leaves a real drift


def test_the_lstm_input_projection_is_the_ridge_least_squares_refit(monkeypatch):
    monkeypatch.setattr(calibrate, "REFIT_GAIN", 0.0)
    model, xs = seq_model(), data(40, 1)
    res = sepify.rewrite(model, rank=1, calibration={"x": xs}, calib_rows=1 << 16, holdout=0, cache=False)
    assert [r.name for r in res.layers] == ["conv"]
    (f,) = res.report["refitted"]
    assert (f["name"], f["op_type"], f["what"]) == ("rnn", "LSTM", "input projection")
    onnx.checker.check_model(res.model, full_check=True)
    feeds = [{"x": x} for x in xs]
    x, xt = _tensor(model, "seq", feeds).astype(np.float64), _tensor(res.model, "seq", feeds).astype(np.float64)
    w = _init(model, "W").reshape(-1, I).astype(np.float64)
    b = _init(model, "B").astype(np.float64)
    y = (x - x.mean(0)) @ w.T
    xc = xt - xt.mean(0)
    cxx = xc.T @ xc / len(xc)
    lam = default_lam(I, len(xc)) * np.trace(cxx) / I
    a = np.linalg.solve(cxx + lam * np.eye(I), xc.T @ y / len(xc) + lam * w.T).T
    wb = w @ x.mean(0) + b[:, :4 * H].reshape(-1) - a @ xt.mean(0)
    rnn = next(n for n in res.model.graph.node if n.name == "rnn")
    got_w, got_b = _init(res.model, rnn.input[1]), _init(res.model, rnn.input[3])
    np.testing.assert_allclose(got_w.reshape(-1, I), a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(got_b[:, :4 * H].reshape(-1), wb, rtol=1e-4, atol=1e-5 * np.abs(wb).max())
    np.testing.assert_array_equal(got_b[:, 4 * H:], _init(model, "B")[:, 4 * H:])  # Rb untouched
    assert rnn.input[2] == "R"
    pred = np.sqrt(np.sum((xc @ a.T - y) ** 2) / np.sum(y ** 2))
    assert f["output_error_predicted"] == pytest.approx(pred, rel=1e-3)
    assert f["output_error_before"] > f["output_error_predicted"]


def test_the_refit_is_measured_on_the_holdout_and_the_output_gets_closer(monkeypatch):
    monkeypatch.setattr(calibrate, "REFIT_GAIN", 0.0)
    model, xs = seq_model(), data(40, 1)
    kw = dict(rank=1, calibration={"x": xs}, calib_rows=1 << 16, cache=False)
    on, off = sepify.rewrite(model, **kw), sepify.rewrite(model, refit_kept=False, **kw)
    (f,) = on.report["refitted"]
    hold = list(on.calibration.holdout)
    x, xt = _tensor(model, "seq", hold).astype(np.float64), _tensor(on.model, "seq", hold).astype(np.float64)
    rnn = next(n for n in on.model.graph.node if n.name == "rnn")
    w, b = _init(model, "W").reshape(-1, I), _init(model, "B")[:, :4 * H].reshape(-1)
    w2, b2 = _init(on.model, rnn.input[1]).reshape(-1, I), _init(on.model, rnn.input[3])[:, :4 * H].reshape(-1)
    ref, got = x @ w.T + b, xt @ w2.astype(np.float64).T + b2
    meas = np.sqrt(np.sum((got - ref) ** 2) / np.sum((ref - ref.mean(0)) ** 2))
    assert f["output_error_measured"] == pytest.approx(meas, rel=1e-4)
    test = [{"x": v} for v in data(24, 5)]
    y0 = _tensor(model, "y", test)

    def err(m):
        y = _tensor(m.model, "y", test)
        return np.sum((y - y0) ** 2) / np.sum(y0 ** 2)

    assert err(on) < err(off)


def test_a_gru_without_b_gets_one():
    model, xs = seq_model("GRU", with_bias=False), data(40, 1)
    res = sepify.rewrite(model, rank=1, calibration={"x": xs}, calib_rows=1 << 16, cache=False)
    (f,) = res.report["refitted"]
    assert f["op_type"] == "GRU"
    rnn = next(n for n in res.model.graph.node if n.name == "rnn")
    assert len(rnn.input) >= 4 and rnn.input[3]
    b = _init(res.model, rnn.input[3])
    assert b.shape == (2, 6 * H) and np.all(b[:, 3 * H:] == 0)  # Rb: zeros, as without B
    onnx.checker.check_model(res.model, full_check=True)
    _sess(res.model).run(None, {"x": data(1, 9)[0]})


def test_excluded_or_full_rank_leave_the_lstm_alone():
    model, xs = seq_model(), data(24, 1)
    res = sepify.rewrite(model, rank=1, calibration={"x": xs}, calib_rows=4096, cache=False, exclude=["^rnn$"])
    assert res.report["refitted"] == []
    full = sepify.rewrite(model, rank="full", allow_increase=True, calibration={"x": xs}, calib_rows=4096, cache=False)
    assert full.report["refitted"] == []


def test_the_table_names_the_input_projection_and_the_note_counts_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sepify.cli import main

    monkeypatch.setattr(calibrate, "REFIT_GAIN", 0.0)
    m = tmp_path / "m.onnx"
    onnx.save(seq_model(), m)
    np.savez(tmp_path / "cal.npz", x=data(40, 1))
    r = CliRunner().invoke(main, ["rewrite", str(m), "-o", str(tmp_path / "o.onnx"), "--calibration",
                                  str(tmp_path / "cal.npz"), "--rank", "1", "--no-cache"])
    assert r.exit_code == 0, r.output
    assert "rnn: input projection refitted:" in r.output
    assert "the input projection of 1 recurrent node(s) were refitted" in r.output
