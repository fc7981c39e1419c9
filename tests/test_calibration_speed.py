"""Calibration's fast paths (issue 18): held activations, incremental and wave passes, float32
moment products, execution providers. Each fast path is checked against the straightforward
computation, done independently here (full-prefix onnxruntime runs, float64 moments)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main
from sepify.errors import UsageError
from sepify.rewrite import calibrate as cal
from sepify.rewrite.factorize import LayerStats

ROWS = 1024


def branchy(seed: int = 0) -> onnx.ModelProto:
    """conv_a -> relu -> {conv_b -> relu, conv_c -> relu} -> add -> conv_d -> relu -> conv_e -> pool:
    conv_b and conv_c are independent (one wave), conv_d and conv_e depend on all before."""
    rng = np.random.default_rng(seed)

    def w(n, m):
        return (rng.standard_normal((n, m, 3, 3)) / np.sqrt(m * 9)).astype(np.float32)

    inits = [numpy_helper.from_array(w(8, 4), "wa"), numpy_helper.from_array(w(8, 8), "wb"),
             numpy_helper.from_array(w(8, 8), "wc"), numpy_helper.from_array(w(8, 8), "wd"),
             numpy_helper.from_array(w(6, 8), "we"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), "bb")]
    p = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=p),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], name="conv_b", pads=p),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["ra", "wc"], ["c"], name="conv_c", pads=p, strides=[1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
        helper.make_node("Add", ["rb", "rc"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wd"], ["d"], name="conv_d", pads=p),
        helper.make_node("Relu", ["d"], ["rd"], name="relu_d"),
        helper.make_node("Add", ["rd", "s"], ["s2"], name="skip"),
        helper.make_node("Conv", ["s2", "we"], ["e"], name="conv_e", pads=p),
        helper.make_node("GlobalAveragePool", ["e"], ["y"], name="pool"),
    ]
    g = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 1, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.kron(rng.standard_normal((n, 4, 4, 4)), np.ones((1, 1, 2, 2)))
    return (z + 0.1 * rng.standard_normal((n, 4, 8, 8)) + 0.5)[:, None].astype(np.float32)


def record_fits(monkeypatch):
    """Wrap calibrate.layer_fit: [(candidate, orientation, stats, (first, second, bias, err))] in call order."""
    seen = []
    real = cal.layer_fit

    def spy(c, orientation, rank, stats, method):
        got = real(c, orientation, rank, stats, method)
        seen.append((c, orientation, stats, got))
        return got

    monkeypatch.setattr(cal, "layer_fit", spy)
    return seen


def straightforward_stats(model, fits, feeds, rows, seed):
    """The paired statistics of every fitted layer, computed the plain way: the working model
    with the layers fitted before it spliced in, the full prefixes of both models run per layer,
    float64 moments of the patches at the calibration's positions."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    per = cal._rows_per_sample(rows, len(feeds))
    out = {}
    for c, orientation, _, (first, second, bias, _) in fits:
        layer = cal.Calibrator.layer(c)
        s_orig = cal.session(cal.prefix(model, [layer.input]))
        s_work = cal.session(cal.prefix(working, [layer.input]))
        xs, ts = [], []
        for s, feed in enumerate(feeds):
            (t,) = s_orig.run([layer.input], feed)
            (x,) = s_work.run([layer.input], feed)
            flat, geo = cal._sample_rows(layer, t, seed, s, per)
            xs.append(cal.gather_patches(x, geo, flat))
            ts.append(cal.gather_patches(t, geo, flat))
        out[c.node.name] = LayerStats.from_rows(np.concatenate(xs), np.concatenate(ts))
        cal.splice(working, layer, orientation, first, second, bias, drop=[c.bn.name] if c.bn is not None else [])
    return out


def assert_stats_close(a: LayerStats, b: LayerStats, rtol=1e-5):
    assert a.n == b.n
    ma, mb = a.centered(), b.centered()
    for f in ("mean_x", "mean_t"):
        np.testing.assert_allclose(getattr(ma, f), getattr(mb, f), rtol=rtol, atol=1e-6)
    for f in ("cxx", "ctx", "ctt"):
        x, y = getattr(ma, f), getattr(mb, f)
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (f, np.linalg.norm(x - y) / np.linalg.norm(y))


def assert_fit_inputs_close(weight, fast, ref: LayerStats, rtol=1e-5):
    """What the fit reads of two statistics (the moments of x~, W Cov(x, x~), tr(W Cov(x) W^T),
    W E[x]) agree: ``fast`` may be an OutputStats, ``ref`` the full LayerStats."""
    from sepify.rewrite.factorize import _problem

    assert fast.n == ref.n
    pa, _, _ = _problem(weight, 1, fast, None)
    pb, _, _ = _problem(weight, 1, ref, None)
    for f in ("cp", "w_ctx", "tt", "wmean"):
        x, y = getattr(pa, f), getattr(pb, f)
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (f, np.linalg.norm(x - y) / np.linalg.norm(y))
    np.testing.assert_allclose(pa.mom.mean_x, pb.mom.mean_x, rtol=rtol, atol=1e-6)


# --- the fast path against the straightforward one --------------------------------------------
@pytest.mark.parametrize("cache_mb", [2048, 0])
def test_phase_2_statistics_equal_the_straightforward_computation(monkeypatch, cache_mb):
    """Waves, held original inputs and incremental working-model runs (or, with no cache, the
    full prefixes) give the statistics of the plain per-layer computation in topological order."""
    model, x = branchy(), data(24, 1)
    fits = record_fits(monkeypatch)
    r = sepify.rewrite(model, rank=2, calibration={"x": x}, calib_rows=ROWS, holdout=4, calib_cache_mb=cache_mb)
    feeds = list(r.calibration.fit)
    assert [c.node.name for c, *_ in fits] == ["conv_a", "conv_b", "conv_c", "conv_d", "conv_e"]
    ref = straightforward_stats(model, fits, feeds, ROWS, 0)
    for c, _, stats, _ in fits:
        assert_fit_inputs_close(c.weight, stats, ref[c.node.name])
    cal_report = r.report["calibration"]
    assert cal_report["passes"]["phase2"] == 3  # waves {b, c}, {d}, {e}: b and c in one pass
    cache = cal_report["cache"]
    assert cache["waves"] == 3
    if cache_mb:
        assert cache["original_inputs_held"] == 4 and cache["original_inputs_rerun"] == 0
        assert cache["incremental_waves"] == 2  # waves 2 and 3 start from held tensors
        assert cache["working_nodes_run"] < cache["working_nodes_full_prefix"]
    else:
        assert cache["peak_mb"] == 0 and cache["original_inputs_held"] == 0 and cache["original_inputs_rerun"] == 4
        assert cache["incremental_waves"] == 0 and cache["working_nodes_run"] == cache["working_nodes_full_prefix"]


def test_no_cache_and_a_tight_cache_give_the_cached_result(monkeypatch):
    """The bound changes what is recomputed, never the result: the rewritten weights with a
    cache of 0 and of a few KiB match the default's (float noise), and the bytes held never
    exceed the bound."""
    model, x = branchy(), data(24, 2)
    got = {}
    for mb in (2048, 0, 0.1):
        r = sepify.rewrite(model, rank=2, calibration={"x": x}, calib_rows=ROWS, holdout=4, calib_cache_mb=mb)
        got[mb] = ({t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}, r.report["calibration"]["cache"])
        assert r.report["calibration"]["cache"]["peak_mb"] <= mb
    tight = got[0.1][1]
    assert 0 < tight["peak_mb"] and (tight["original_inputs_rerun"] > 0 or tight["incremental_waves"] < 2)
    for mb in (0, 0.1):
        assert got[mb][0].keys() == got[2048][0].keys()
        for k, v in got[2048][0].items():
            np.testing.assert_allclose(got[mb][0][k], v, rtol=1e-4, atol=1e-6)


def test_budget_refuses_past_its_limit():
    b = cal.Budget(1 / 1024)  # 1 KiB
    assert b.take(1000) and not b.take(100) and b.used == 1000
    b.give(1000)
    assert b.take(1024) and b.peak == 1024 and not b.take(1)


# --- float32 products of shifted rows --------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_moments_equal_float64_moments_even_far_from_zero(offset):
    """The float32 GEMMs of rows shifted by the first batch's mean, summed in float64, equal the
    float64 moments to float32 noise, also for inputs whose mean is 1000x their spread (unshifted
    float32 products would lose ~6 digits to the cancellation there)."""
    rng = np.random.default_rng(5)
    geo = cal.ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    mix = rng.standard_normal((36, 36))
    rows = [(rng.standard_normal((97, 1, 36)) @ mix + offset).astype(np.float32) for _ in range(60)]
    trows = [(r + 0.1 * rng.standard_normal(r.shape)).astype(np.float32) for r in rows]
    w = rng.standard_normal((5, 4, 3, 3))
    acc = cal._Rows(geo, 4, paired=True, weight=w)
    for a, b in zip(rows, trows):
        acc.add(a, (b[:, 0] @ w.reshape(5, 36).T)[:, None])
    assert_fit_inputs_close(w, acc.result(), LayerStats.from_rows(np.concatenate(rows), np.concatenate(trows)))
    same = cal._Rows(geo, 4, paired=False)
    for a in rows:
        same.add(a)
    assert_stats_close(same.result(), LayerStats.from_rows(np.concatenate(rows)), rtol=1e-5)


def test_folder_thread_gives_the_same_moments_bit_for_bit():
    """Batches folded in the Folder's thread: the same sums in the same order as folded inline
    (bitwise equal), the float64 moments to float32 noise, and the batches really are folded
    in another thread."""
    import threading

    rng = np.random.default_rng(7)
    geo = cal.ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    w = rng.standard_normal((5, 4, 3, 3))
    rows = [(rng.standard_normal((300, 1, 36)) + 2.0).astype(np.float32) for _ in range(30)]
    ys = [(r[:, 0] @ w.reshape(5, 36).T).astype(np.float32)[:, None] for r in rows]
    inline = cal._Rows(geo, 4, paired=True, weight=w)
    seen = set()
    fold = cal._Rows._fold

    def spy(self, xs, ys_):
        seen.add(threading.get_ident())
        return fold(self, xs, ys_)

    with cal.Folder(depth=2) as folder:
        threaded = cal._Rows(geo, 4, paired=True, weight=w, folder=folder)
        for r, y in zip(rows, ys):
            inline.add(r, y)
        cal._Rows._fold = spy
        try:
            for r, y in zip(rows, ys):
                threaded.add(r, y)
            b = threaded.result()
        finally:
            cal._Rows._fold = fold
    a = inline.result()
    assert seen and threading.get_ident() not in seen
    assert len(rows) * 300 // cal._BATCH_ROWS >= 4  # several batches went through the bounded queue
    for f in ("n", "sum_x", "xx", "sum_y", "yx", "yy"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert_fit_inputs_close(w, b, LayerStats.from_rows(np.concatenate(rows)))


def test_folder_reraises_a_fold_error_at_the_result():
    from sepify.errors import ModelError

    geo = cal.ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0), 1)
    with cal.Folder() as folder:
        acc = cal._Rows(geo, 3, paired=False, folder=folder)
        acc.add(np.array([[[1.0, np.inf, 2.0]]], np.float32))
        with pytest.raises(ModelError, match="NaN or infinite"):
            acc.result()


def test_nonfinite_layer_input_is_a_model_error():
    from sepify.errors import ModelError

    geo = cal.ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0), 1)
    acc = cal._Rows(geo, 3, paired=False)
    acc.add(np.array([[[1.0, np.nan, 2.0]]], np.float32))
    with pytest.raises(ModelError, match="NaN or infinite"):
        acc.result()


# --- overlapped passes -----------------------------------------------------------------------
def test_ahead_yields_in_order_and_reraises():
    assert list(cal.ahead(lambda i: i * i, 7)) == [i * i for i in range(7)]

    def bad(i):
        if i == 3:
            raise ValueError("sample 3")
        return i

    got = []
    with pytest.raises(ValueError, match="sample 3"):
        for v in cal.ahead(bad, 10):
            got.append(v)
    assert got == [0, 1, 2]
    it = cal.ahead(lambda i: i, 100)  # leaving early stops the producer
    assert next(it) == 0
    it.close()


# --- execution providers ---------------------------------------------------------------------
def test_providers_resolve_short_names_and_refuse_missing_ones():
    import onnxruntime as ort

    assert cal.providers_for(None) == ["CPUExecutionProvider"]
    assert cal.providers_for(["cpu", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    missing = next(p for p in ("CUDA", "TensorRT", "ROCM", "OpenVINO") if f"{p}ExecutionProvider" not in ort.get_available_providers())
    with pytest.raises(UsageError, match=f"'{missing}' is not available"):
        cal.providers_for([missing, "CPU"])


def test_cli_providers_missing_is_exit_2_and_cpu_is_reported(tmp_path):
    import json

    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    onnx.save(branchy(), path)
    np.savez(tmp_path / "c.npz", x=data(12, 3))
    missing = next(p for p in ("CUDA", "TensorRT", "ROCM") if f"{p}ExecutionProvider" not in ort.get_available_providers())
    r = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--calibration", str(tmp_path / "c.npz"),
                                  "--providers", f"{missing},CPU"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [f"sepify: error: --providers: '{missing}' is not available in this "
                                             f"onnxruntime ({ort.__version__}); available: "
                                             f"{', '.join(ort.get_available_providers())}"]
    r = CliRunner().invoke(main, ["rewrite", str(path), "--dry-run", "--calibration", str(tmp_path / "c.npz"),
                                  "--providers", "cpu", "--calib-cache-mb", "1", "--rank", "2", "--verify",
                                  "--format", "json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.output)
    assert rep["calibration"]["providers"] == ["CPUExecutionProvider"]
    assert rep["calibration"]["cache"]["limit_mb"] == 1.0 and rep["calibration"]["cache"]["peak_mb"] <= 1.0
    assert rep["verification"]["samples"] == 2


def test_positions_are_the_seeded_draw_and_are_remembered():
    """The sampled positions are numpy's seeded draw without replacement (sorted), all positions
    when fewer than asked; a second call returns the remembered (read-only) array."""
    want = np.sort(np.random.default_rng((3, 7, 11)).choice(500, size=40, replace=False))
    got = cal.positions((3, 7, 11), 500, 40)
    assert np.array_equal(got, want) and len(set(got.tolist())) == 40
    assert cal.positions((3, 7, 11), 500, 40) is got and not got.flags.writeable
    assert np.array_equal(cal.positions((3, 7, 12), 30, 40), np.arange(30))
