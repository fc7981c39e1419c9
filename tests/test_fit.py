"""Tests for the data-aware factorization in sepify.rewrite.factorize (LayerStats, patches, fit,
output_error_curve).

Expected values are computed independently of the module under test: Conv outputs by
onnxruntime, moments by np.cov / explicit sums over the rows, the closed-form optimum of a
single-input-channel layer from an eigendecomposition and an SVD done here, and output errors by
applying the factors (composed by hand from the ONNX group semantics) to rows and comparing with
the original layer's outputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sepify.rewrite.factorize import (
    ORIENTATIONS,
    LayerStats,
    conv_output_spatial,
    fit,
    output_error_curve,
    patches,
    reconstruct,
    spectrum,
)

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- independent helpers


def ort_conv(x, w, group, strides, pads, dilations):
    """The Conv output of onnxruntime (float32) for NCHW ``x``."""
    d = w.ndim - 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=list(strides),
                            pads=list(pads), dilations=list(dilations),
                            kernel_shape=list(w.shape[2:]))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert d in (1, 2, 3)
    return sess.run(None, {"x": x.astype(np.float32)})[0]


def group_matrices(w, group):
    """W_j = W[j*Ng:(j+1)*Ng].reshape(Ng, Mg*K) for every group j: (g, Ng, Mg*K)."""
    n = w.shape[0]
    return np.stack([w[j * (n // group):(j + 1) * (n // group)].reshape(n // group, -1)
                     for j in range(group)])


def dense_factor_kernel(f, orientation, group, shape):
    """Dense kernel of the two factor Convs, composed by hand from the ONNX group semantics."""
    n, mg = shape[:2]
    m, k = mg * group, math.prod(shape[2:])
    out = np.zeros((n, mg, k))
    first, second = np.asarray(f.first, np.float64), np.asarray(f.second, np.float64)
    if orientation == "dw-first":
        r = first.shape[0] // m
        for o in range(n):
            j = o // (n // group)
            for ml in range(mg):
                for i in range(r):  # pointwise input ml*r+i of group j is dw output (j*mg+ml)*r+i
                    out[o, ml] += second[o, ml * r + i].item() * first[(j * mg + ml) * r + i, 0].reshape(-1)
    else:
        r = first.shape[0] // n
        for o in range(n):
            for i in range(r):  # spatial conv group o reads pointwise outputs o*r .. o*r+r-1
                out[o] += np.outer(first[o * r + i].reshape(-1), second[o, i].reshape(-1))
    return out.reshape(shape)


def apply_layer(w, b, group, rows):
    """y[p, n] for rows (P, g, Mg*K): the grouped layer W x + b."""
    y = np.einsum("jnd,pjd->pjn", group_matrices(np.asarray(w, np.float64), group), rows)
    return y.reshape(rows.shape[0], -1) + b


def measured_rel_error(w, b, f, orientation, group, t_rows, x_rows):
    """sqrt(sum ||y - yhat||^2 / sum ||y - mean y||^2) with y on t_rows, yhat on x_rows."""
    y = apply_layer(w, b, group, t_rows)
    yhat = apply_layer(dense_factor_kernel(f, orientation, group, w.shape), f.bias, group, x_rows)
    return math.sqrt(np.sum((y - yhat) ** 2) / np.sum((y - y.mean(0)) ** 2))


def correlated_rows(rng, rows, group, d, mean=0.3, decay=0.7):
    """Gaussian rows with a random covariance whose spectrum decays geometrically."""
    out = np.empty((rows, group, d))
    for j in range(group):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        scale = decay ** np.arange(d)
        out[:, j] = (rng.standard_normal((rows, d)) * scale) @ q.T + mean
    return out


def truncated_kernel(w, group, orientation, rank):
    spec = spectrum(w, group, orientation)
    return reconstruct(*spec.factors(rank), orientation, group, w.shape)


# --------------------------------------------------------------------------- patches


PATCH_CASES = [
    # (input shape, weight shape, group, strides, pads, dilations)
    ((2, 4, 7, 6), (6, 4, 3, 3), 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 4, 9, 8), (6, 2, 3, 2), 2, (2, 3), (1, 0, 2, 1), (1, 1)),  # strided, asym pads, grouped
    ((2, 3, 9, 9), (4, 3, 3, 3), 1, (2, 1), (2, 1, 2, 1), (2, 3)),  # dilated
    ((3, 6, 11), (6, 2, 3), 3, (2,), (1, 2), (2,)),  # 1-D grouped
    ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), 1, (1, 2, 1), (1, 0, 1, 0, 1, 1), (2, 1, 1)),  # 3-D
    ((1, 4, 6, 6), (4, 1, 3, 3), 4, (1, 1), (1, 1, 1, 1), (1, 1)),  # depthwise
]


@pytest.mark.parametrize("xs, ws, group, strides, pads, dil", PATCH_CASES)
def test_patches_match_onnxruntime_conv(xs, ws, group, strides, pads, dil):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    ref = ort_conv(x, w, group, strides, pads, dil)  # (B, N, o1..od)
    out = conv_output_spatial(xs[2:], ws[2:], strides, pads, dil)
    assert ref.shape[2:] == out
    cols = patches(x, ws[2:], strides, pads, dil, group)
    assert cols.shape == (xs[0] * math.prod(out), group, ws[1] * math.prod(ws[2:]))
    y = np.einsum("jnd,pjd->pjn", group_matrices(w.astype(np.float64), group), cols)
    y = y.reshape(xs[0], *out, ws[0])  # rows are C order over (B, o1..od)
    expect = np.moveaxis(ref, 1, -1)
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-4)
    # sampled positions are the same rows
    pos = rng.choice(cols.shape[0], size=min(7, cols.shape[0]), replace=False)
    np.testing.assert_array_equal(patches(x, ws[2:], strides, pads, dil, group, positions=pos),
                                  cols[pos])


def test_patches_reject_bad_geometry():
    x = np.zeros((1, 4, 5, 5))
    with pytest.raises(ValueError, match="divide"):
        patches(x, (3, 3), group=3)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        patches(x, (3, 3), dilations=(3, 3))
    with pytest.raises(ValueError, match="pads"):
        patches(x, (3, 3), pads=(1, 1))
    with pytest.raises(ValueError, match="positions"):
        patches(x, (3, 3), positions=np.array([9]))


# --------------------------------------------------------------------------- statistics


def test_layer_stats_match_direct_moments():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((2600, 2, 5)) + 1.0  # > one accumulation chunk
    x = t + 0.3 * rng.standard_normal(t.shape)
    stats = LayerStats.zeros(2, 5, same=False)
    stats.accumulate(x[:1000], t[:1000]).accumulate(x[1000:], t[1000:])
    assert stats.n == 2600
    mom = stats.centered()
    for j in range(2):
        joint = np.cov(np.concatenate([t[:, j], x[:, j]], axis=1).T, bias=True)
        np.testing.assert_allclose(mom.ctt[j], joint[:5, :5], atol=1e-12)
        np.testing.assert_allclose(mom.ctx[j], joint[:5, 5:], atol=1e-12)
        np.testing.assert_allclose(mom.cxx[j], joint[5:, 5:], atol=1e-12)
        np.testing.assert_allclose(mom.mean_x[j], x[:, j].mean(0), atol=1e-12)
        np.testing.assert_allclose(mom.mean_t[j], t[:, j].mean(0), atol=1e-12)
    # merge == accumulating everything at once; inputs unchanged
    a, b = LayerStats.from_rows(x[:700], t[:700]), LayerStats.from_rows(x[700:], t[700:])
    a_xx = a.xx.copy()
    merged = a.merge(b)
    np.testing.assert_array_equal(a.xx, a_xx)
    np.testing.assert_allclose(merged.tx, np.einsum("pjd,pje->jde", t, x), rtol=1e-12)
    np.testing.assert_allclose(merged.sum_t, t.sum(0), rtol=1e-12)


def test_layer_stats_same_shares_and_unshares():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 1, 3))
    s = LayerStats.from_rows(x)
    assert s.same and s.tx is s.xx
    np.testing.assert_allclose(s.xx[0], x[:, 0].T @ x[:, 0], rtol=1e-12)
    t = x + 1.0
    s.accumulate(x, t)  # distinct original input: the arrays are split, history kept
    assert not s.same
    np.testing.assert_allclose(s.tt[0], x[:, 0].T @ x[:, 0] + t[:, 0].T @ t[:, 0], rtol=1e-12)
    np.testing.assert_allclose(s.xx[0], 2 * x[:, 0].T @ x[:, 0], rtol=1e-12)
    f = LayerStats.from_same(3, np.ones((1, 2)), np.eye(2)[None])
    mom = f.centered()
    assert f.same and mom.ctt is mom.cxx and mom.ctx is mom.cxx
    np.testing.assert_allclose(mom.ctx[0], np.eye(2) / 3 - 1 / 9)
    with pytest.raises(ValueError, match="x_rows"):
        s.accumulate(np.zeros((4, 2, 3)))


# --------------------------------------------------------------------------- exactness


@st.composite
def layer_cases(draw):
    d = draw(st.integers(1, 3))
    group = draw(st.integers(1, 2))
    ng, mg = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, {1: 4, 2: 3, 3: 2}[d])) for _ in range(d))
    seed = draw(st.integers(0, 2**32 - 1))
    rows = draw(st.sampled_from([3, 40, 400]))  # 3 rows: singular covariance
    return (ng * group, mg, *kernel), group, seed, rows, draw(st.sampled_from(ORIENTATIONS))


@HYP
@given(layer_cases(), st.sampled_from(["refit", "als"]))
def test_full_rank_same_input_is_exact(case, method):
    shape, group, seed, rows, orientation = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    b = rng.standard_normal(shape[0])
    x = correlated_rows(rng, rows, group, shape[1] * math.prod(shape[2:]))
    stats = LayerStats.from_rows(x)
    full = spectrum(w, group, orientation).max_rank
    f = fit(w, b, group, orientation, full, stats, method=method, sweeps=3)
    kernel = dense_factor_kernel(f, orientation, group, shape)
    assert np.linalg.norm(kernel - w) <= 1e-6 * np.linalg.norm(w)
    np.testing.assert_allclose(f.bias, b, atol=1e-6 * (1 + np.abs(w).sum()))
    assert f.error <= 1e-6
    assert f.first.shape == spectrum(w, group, orientation).factors(full)[0].shape


def test_reachable_layer_is_recovered_exactly():
    """W of rank r per slice is reachable at rank r: zero error on any data covariance."""
    rng = np.random.default_rng(3)
    for orientation, shape, group, r in [("dw-first", (8, 3, 3, 3), 1, 2),
                                         ("dw-first", (6, 2, 3), 2, 1),
                                         ("pw-first", (5, 4, 3, 3), 1, 2)]:
        n, mg, k = shape[0], shape[1], math.prod(shape[2:])
        if orientation == "dw-first":  # every (input channel) slice W[:, m] = U_m V_m, rank r
            u = rng.standard_normal((mg * group, n // group, r))
            v = rng.standard_normal((mg * group, r, k))
            w = np.zeros((n, mg, k))
            for j in range(group):
                for ml in range(mg):
                    w[j * (n // group):(j + 1) * (n // group), ml] = u[j * mg + ml] @ v[j * mg + ml]
        else:  # every output channel W[n] = U_n V_n, rank r
            w = np.einsum("nmi,nik->nmk", rng.standard_normal((n, mg, r)),
                          rng.standard_normal((n, r, k)))
        w = w.reshape(shape)
        x = correlated_rows(rng, 500, group, mg * k, decay=0.5)
        for method in ("refit", "als"):
            f = fit(w, None, group, orientation, r, LayerStats.from_rows(x), method=method)
            assert f.error < 1e-6
            kernel = dense_factor_kernel(f, orientation, group, shape)
            assert np.linalg.norm(kernel - w) <= 1e-6 * np.linalg.norm(w)
            fresh = correlated_rows(np.random.default_rng(9), 200, group, mg * k)
            assert measured_rel_error(w, 0.0, f, orientation, group, fresh, fresh) < 1e-6


def test_asymmetric_target_reachable_through_weight_null_space():
    """x = x~ + noise in the null space of W: the original output W x is reachable from x~."""
    rng = np.random.default_rng(4)
    shape, r = (3, 2, 3, 3), 3  # dw-first max rank 3: W itself is reachable, d = 18 > N = 3
    w = rng.standard_normal(shape)
    wm = w.reshape(3, 18)
    null = np.linalg.svd(wm)[2][3:].T  # (18, 15), W @ null == 0
    x = correlated_rows(rng, 2000, 1, 18)
    t = x + (rng.standard_normal((2000, 15)) @ null.T)[:, None, :] * 3.0
    stats = LayerStats.from_rows(x, t)
    f = fit(w, None, 1, "dw-first", r, stats, method="refit")
    assert f.error < 1e-6
    assert measured_rel_error(w, 0.0, f, "dw-first", 1, t, x) < 1e-6


# --------------------------------------------------------------------------- optimality


def test_single_input_channel_reaches_whitened_svd_optimum():
    """M = 1: A* = [W C^1/2]_r C^-1/2 minimises tr((W - A) C (W - A)^T) over rank-r A."""
    rng = np.random.default_rng(5)
    ng, k = 6, 9
    w = rng.standard_normal((ng, 1, 3, 3))
    x = (rng.standard_normal((5000, k)) @ rng.standard_normal((k, k)).T)[:, None, :] + 0.5
    stats = LayerStats.from_rows(x)
    xc = x[:, 0] - x[:, 0].mean(0)
    c = xc.T @ xc / len(xc)
    ev, vec = np.linalg.eigh(c)
    c_half, c_inv_half = (vec * np.sqrt(ev)) @ vec.T, (vec / np.sqrt(ev)) @ vec.T
    wm = w.reshape(ng, k)
    tt = np.trace(wm @ c @ wm.T)
    for r in (1, 2, 4):
        u, s, vt = np.linalg.svd(wm @ c_half)
        a_opt = (u[:, :r] * s[:r]) @ vt[:r] @ c_inv_half
        e_opt = np.trace((wm - a_opt) @ c @ (wm - a_opt).T)
        u, s, vt = np.linalg.svd(wm)
        a_w = (u[:, :r] * s[:r]) @ vt[:r]
        e_w = np.trace((wm - a_w) @ c @ (wm - a_w).T)
        margin = math.sqrt(e_w / tt) - math.sqrt(e_opt / tt)
        assert margin > 0.02  # the weight-only SVD is measurably worse on this data
        # the default refit (init="auto": one input channel, so the whitened start is tried)
        f = fit(w, None, 1, "dw-first", r, stats, method="refit", lam=0.0)
        assert abs(f.error**2 * tt / e_opt - 1.0) < 1e-6
        assert fit(w, None, 1, "dw-first", r, stats, method="refit", lam=0.0,
                   init="svd").error > f.error + 1e-3
        for kw in (dict(init="whitened"), dict(sweeps=100, init="svd")):
            f = fit(w, None, 1, "dw-first", r, stats, method="als", lam=0.0, **kw)
            assert abs(f.error**2 * tt / e_opt - 1.0) < 1e-6, (r, kw)
            assert f.weight_error == pytest.approx(math.sqrt(e_w / tt), rel=1e-9)
            assert f.weight_error - f.error == pytest.approx(margin, rel=1e-5)
        # the default ridge costs little: within 1e-4 of the optimum
        f = fit(w, None, 1, "dw-first", r, stats, method="als", init="whitened")
        assert f.error**2 * tt / e_opt - 1.0 < 1e-4


def smooth_images(rng, count, channels, size=10, mix=None):
    """Spatially smooth, channel-correlated NCHW images (3x3 box-blurred noise, mixed)."""
    z = rng.standard_normal((count, channels, size + 2, size + 2))
    img = sum(z[:, :, a:a + size, b:b + size] for a in range(3) for b in range(3)) / 3.0
    mix = rng.standard_normal((channels, channels)) if mix is None else mix
    return np.einsum("cm,bmhw->bchw", mix, img) + 0.2, mix


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_calibrated_beats_weight_only_on_fresh_samples(orientation):
    rng = np.random.default_rng(6)
    m, n = 6, 12
    w = rng.standard_normal((n, m, 3, 3))
    b = rng.standard_normal(n)
    train, mix = smooth_images(rng, 40, m)
    test, _ = smooth_images(rng, 40, m, mix=mix)
    stats = LayerStats.from_rows(patches(train, (3, 3), pads=(1, 1, 1, 1)))
    fresh = patches(test, (3, 3), pads=(1, 1, 1, 1))
    y = apply_layer(w, b, 1, fresh)
    for r in (1, 2):
        kernel_w = truncated_kernel(w, 1, orientation, r)
        yw = apply_layer(kernel_w, b, 1, fresh)  # the weight-only rewrite (bias unchanged)
        err_w = math.sqrt(np.sum((y - yw) ** 2) / np.sum((y - y.mean(0)) ** 2))
        for method in ("refit", "als"):
            f = fit(w, b, 1, orientation, r, stats, method=method)
            err = measured_rel_error(w, b, f, orientation, 1, fresh, fresh)
            assert err < {"refit": 0.9, "als": 0.75}[method] * err_w, (r, method, err, err_w)
            assert f.error < f.weight_error


def test_asymmetric_fit_beats_fitting_the_distorted_input():
    """x~ = x + distortion correlated with x: fitting to the ORIGINAL output (tx) wins."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 4, 3, 3))
    b = rng.standard_normal(8)
    d = 36
    mix = rng.standard_normal((d, d)) * 0.8 ** np.arange(d)  # correlated original inputs
    distort = 0.3 * rng.standard_normal((d, d)) / math.sqrt(d)  # what earlier rewrites did

    def draw(count):
        t = (rng.standard_normal((count, d)) @ mix.T)[:, None, :] + 0.3
        return t, t + t @ distort.T + 0.05 * rng.standard_normal(t.shape)

    t_fit, x_fit = draw(4000)
    t_new, x_new = draw(4000)
    for r in (2, 4):
        asym = fit(w, b, 1, "dw-first", r, LayerStats.from_rows(x_fit, t_fit), method="refit")
        naive = fit(w, b, 1, "dw-first", r, LayerStats.from_rows(x_fit), method="refit")
        e_asym = measured_rel_error(w, b, asym, "dw-first", 1, t_new, x_new)
        e_naive = measured_rel_error(w, b, naive, "dw-first", 1, t_new, x_new)
        assert e_asym < 0.9 * e_naive, (r, e_asym, e_naive)
        assert asym.error == pytest.approx(e_asym, rel=0.05)


# --------------------------------------------------------------------------- predicted error


@pytest.mark.parametrize("orientation, method", [("dw-first", "refit"), ("dw-first", "als"),
                                                 ("pw-first", "refit"), ("pw-first", "als")])
def test_predicted_error_equals_measured(orientation, method):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 3, 3, 3))
    b = rng.standard_normal(6)
    d, r = 27, 2
    mix = rng.standard_normal((d, d)) * 0.8 ** np.arange(d)
    rows = lambda count: (rng.standard_normal((count, d)) @ mix.T)[:, None, :] + 0.5  # noqa: E731
    t_fit = rows(20000)
    x_fit = t_fit + 0.2 * rng.standard_normal(t_fit.shape)
    f = fit(w, b, 1, orientation, r, LayerStats.from_rows(x_fit, t_fit), method=method)
    # on the fit rows: the same quantity, computed from the rows instead of the moments
    assert measured_rel_error(w, b, f, orientation, 1, t_fit, x_fit) == pytest.approx(f.error,
                                                                                      rel=1e-9)
    # on held-out rows of the same distribution: equal within the sampling error of the ratio,
    # estimated here from the held-out rows themselves (delta method, 4 sigma), plus the
    # in-sample optimism of a least-squares fit, about (#parameters / rows) relative
    t_new = rows(20000)
    x_new = t_new + 0.2 * rng.standard_normal(t_new.shape)
    y = apply_layer(w, b, 1, t_new)
    yhat = apply_layer(dense_factor_kernel(f, orientation, 1, w.shape), f.bias, 1, x_new)
    e = np.sum((y - yhat) ** 2, axis=1)
    v = np.sum((y - y.mean(0)) ** 2, axis=1)
    ratio = e.sum() / v.sum()
    grad = np.array([1 / v.mean(), -e.mean() / v.mean() ** 2])
    sd = math.sqrt(grad @ np.cov(np.stack([e, v])) @ grad / len(e))
    params = f.first.size + f.second.size + f.bias.size
    tol = 4 * sd + ratio * params / len(e)
    assert abs(ratio - f.error**2) < tol, (ratio, f.error**2, tol)
    assert tol < 0.1 * ratio  # the check is not vacuous


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_error_curve_equals_refit_errors(orientation):
    rng = np.random.default_rng(10)
    for shape, group in [((8, 3, 3, 3), 1), ((6, 2, 5), 2)]:
        w = rng.standard_normal(shape)
        d = shape[1] * math.prod(shape[2:])
        x = correlated_rows(rng, 300, group, d)
        stats = LayerStats.from_rows(x, x + 0.1 * rng.standard_normal(x.shape))
        full = spectrum(w, group, orientation).max_rank
        curve = output_error_curve(w, group, orientation, stats)
        expect = [fit(w, None, group, orientation, r, stats, method="refit").error
                  for r in range(1, full + 1)]
        np.testing.assert_allclose(curve, expect, rtol=1e-7, atol=1e-9)
        assert np.all(np.diff(curve) <= 1e-12)  # more rank never hurts a refit
        sub = output_error_curve(w, group, orientation, stats, ranks=[2, 1])
        np.testing.assert_allclose(sub, [expect[1], expect[0]], rtol=1e-7, atol=1e-9)
    # an all-zero weight slice and x~ == x (shared moments), with and without the ridge
    w = rng.standard_normal((8, 3, 3, 3))
    w[:, 0] = 0.0
    stats = LayerStats.from_rows(rng.standard_normal((300, 1, 27)))
    for lam in (0.0, None):
        curve = output_error_curve(w, 1, orientation, stats, lam=lam)
        expect = [fit(w, None, 1, orientation, r, stats, method="refit", lam=lam).error
                  for r in range(1, len(curve) + 1)]
        np.testing.assert_allclose(curve, expect, rtol=1e-7, atol=1e-7)


def test_unexcited_channel_keeps_weight_only_factors():
    """An input channel the data never excites keeps the weight-only SVD block (not zero)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((8, 3, 3, 3))
    x = correlated_rows(rng, 400, 1, 27)
    x[:, :, :9] = 0.0  # channel 0 is always zero
    for method in ("refit", "als"):
        f = fit(w, None, 1, "dw-first", 2, LayerStats.from_rows(x), method=method)
        kernel = dense_factor_kernel(f, "dw-first", 1, w.shape)
        np.testing.assert_allclose(kernel[:, 0], truncated_kernel(w, 1, "dw-first", 2)[:, 0],
                                   atol=1e-8)


def test_als_improves_on_refit_and_float32_factors():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    imgs, _ = smooth_images(rng, 8, 8)
    stats = LayerStats.from_rows(patches(imgs.astype(np.float32), (3, 3)))
    for orientation in ORIENTATIONS:
        refit = fit(w, None, 1, orientation, 2, stats, method="refit")
        als = fit(w, None, 1, orientation, 2, stats, method="als")
        assert als.error < refit.error < refit.weight_error
        assert als.first.dtype == np.float32 and als.bias.dtype == np.float32


def test_fit_rejects_bad_arguments():
    w = np.ones((4, 2, 3))
    stats = LayerStats.zeros(1, 6).accumulate(np.random.default_rng(0).standard_normal((9, 1, 6)))
    with pytest.raises(ValueError, match="statistics are for"):
        fit(w, None, 2, "dw-first", 1, stats)
    with pytest.raises(ValueError, match="rank must be in"):
        fit(w, None, 1, "dw-first", 4, stats)
    with pytest.raises(ValueError, match="method"):
        fit(w, None, 1, "dw-first", 1, stats, method="sgd")
    with pytest.raises(ValueError, match="lam"):
        fit(w, None, 1, "dw-first", 1, stats, lam=-1)
    with pytest.raises(ValueError, match="no rows"):
        fit(w, None, 1, "dw-first", 1, LayerStats.zeros(1, 6))


def test_default_ridge_grows_when_rows_are_few():
    """With few rows for the patch size, the default (0.3 * d / rows) beats a tiny fixed ridge
    on fresh rows; with many rows it falls back to 1e-3."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((16, 8, 3, 3))
    imgs, mix = smooth_images(rng, 2, 8, size=6)
    few = patches(imgs, (3, 3), pads=(1, 1, 1, 1))  # 72 rows for d = 72
    fresh = patches(smooth_images(rng, 40, 8, size=6, mix=mix)[0], (3, 3), pads=(1, 1, 1, 1))
    stats = LayerStats.from_rows(few)
    default = fit(w, None, 1, "dw-first", 2, stats, method="refit")
    assert few.shape[0] == 72 and default.lam == pytest.approx(0.3 * 72 / 72)
    tiny = fit(w, None, 1, "dw-first", 2, stats, method="refit", lam=1e-3)
    e_default = measured_rel_error(w, 0.0, default, "dw-first", 1, fresh, fresh)
    e_tiny = measured_rel_error(w, 0.0, tiny, "dw-first", 1, fresh, fresh)
    assert e_default < 0.95 * e_tiny, (e_default, e_tiny)  # measured: 0.677 vs 0.751
    many = LayerStats.from_rows(fresh)  # 1440 rows: 0.3 * 72 / 1440 = 0.015
    assert fit(w, None, 1, "dw-first", 2, many, method="refit").lam == pytest.approx(0.015)


def test_pw_first_cg_q_step_matches_direct_solves():
    """The conjugate-gradient Q step solves the same system as the direct one."""
    import sepify.rewrite.factorize as fz

    rng = np.random.default_rng(14)
    w = rng.standard_normal((6, 5, 3, 3))
    stats = LayerStats.from_rows(correlated_rows(rng, 600, 1, 45, decay=0.9))
    prob, _, _ = fz._problem(w, 1, stats, None)
    s = rng.standard_normal((6, 3, 9))
    q0 = rng.standard_normal((6, 3, 5))
    direct = fz._pw_qstep(prob, s)
    cg = fz._pw_qstep_cg(prob, s, q0, iters=100, tol=1e-28)
    np.testing.assert_allclose(cg, direct, rtol=1e-6, atol=1e-8)


def _pw_exact_als(fz, prob, q, sweeps):
    """pw-first ALS with exact block steps (direct Q solves, direct S solves): the reference."""
    s, _, _ = fz._pw_sfit(prob, q)
    for _ in range(sweeps):
        q = fz._pw_qstep(prob, s)
        s, _, _ = fz._pw_sfit(prob, q)
    return q, s


def _pw_objective(fz, prob, q, s):
    """J(A) = tr(A Cp A^T) - 2 tr(W Cp' A^T), from the kernel itself."""
    a = fz._pw_kernel(q, s, prob.group)
    return float(np.sum(np.matmul(a, prob.cp) * a) - 2 * np.sum(prob.wcp * a))


def test_kronecker_preconditioner_solves_kronecker_systems_in_one_iteration():
    """With Cov(x) = Cm (x) Ck exactly (and no ridge) the preconditioner IS the inverse of each
    channel's normal matrix: one PCG iteration of either half-step lands on the direct solve."""
    import sepify.rewrite.factorize as fz

    rng = np.random.default_rng(21)
    mg, k, n, r = 5, 9, 6, 3
    a, b = rng.standard_normal((mg, mg)), rng.standard_normal((k, k))
    cm, ck = a @ a.T + mg * np.eye(mg), b @ b.T + k * np.eye(k)
    cov = np.einsum("ab,kl->akbl", cm, ck).reshape(1, mg * k, mg * k)
    stats = LayerStats.from_same(1000, np.zeros((1, mg * k)), 1000 * cov)
    w = rng.standard_normal((n, mg, 3, 3))
    prob, _, _ = fz._problem(w, 1, stats, lam=0.0)
    q0, s = rng.standard_normal((n, r, mg)), rng.standard_normal((n, r, k))
    np.testing.assert_allclose(fz._pw_qstep_cg(prob, s, q0, iters=1, tol=0.0), fz._pw_qstep(prob, s),
                               rtol=1e-7, atol=1e-9)
    kron = fz._pw_kron(prob)
    s0 = rng.standard_normal((n, r, k))
    got, _, _ = fz._pw_s_pcg(prob, q0, s0, fz._pw_acp(prob, q0, s0), kron, 1, 0.0)
    exact, _, _ = fz._pw_sfit(prob, q0)
    np.testing.assert_allclose(got, exact, rtol=1e-7, atol=1e-9)


def test_pw_first_pcg_als_tracks_its_objective_and_ends_near_exact_als():
    """The PCG half-steps carry A Cp and the objective along: both equal what the kernel gives
    when recomputed; every half-step lowers the objective; the ALS result is within 1% of ALS
    with exact block steps and beats the refit."""
    import sepify.rewrite.factorize as fz

    rng = np.random.default_rng(22)
    w = rng.standard_normal((8, 6, 3, 3))
    stats = LayerStats.from_rows(correlated_rows(rng, 900, 1, 54, decay=0.9))
    prob, _, _ = fz._problem(w, 1, stats, None)
    r = 3
    q = spectrum(w, 1, "pw-first").factors(r)[0].reshape(8, r, 6).astype(np.float64)
    s, acp, _ = fz._pw_sfit(prob, q)
    acp = acp.reshape(8, 6, 9)
    kron = fz._pw_kron(prob)
    last = _pw_objective(fz, prob, q, s)
    for _ in range(4):
        q, acp, jq = fz._pw_q_pcg(prob, s, q, acp, kron, 3, 1e-4)
        assert jq == pytest.approx(_pw_objective(fz, prob, q, s), rel=1e-9) and jq <= last + 1e-12 * abs(last)
        s, acp, js = fz._pw_s_pcg(prob, q, s, acp, kron, 2, 1e-4)
        assert js == pytest.approx(_pw_objective(fz, prob, q, s), rel=1e-9) and js <= jq + 1e-12 * abs(jq)
        np.testing.assert_allclose(acp, fz._pw_acp(prob, q, s), rtol=1e-8, atol=1e-10)
        last = js
    # small systems (Mg*r <= _PW_DIRECT_MAX) take the exact steps: the reference itself
    qe, se = _pw_exact_als(fz, prob, spectrum(w, 1, "pw-first").factors(r)[0].reshape(8, r, 6).astype(np.float64), 10)
    exact = fz._rel(prob.data_error(fz._pw_kernel(qe, se, 1)), prob.tt)
    assert 6 * r <= fz._PW_DIRECT_MAX
    assert fit(w, None, 1, "pw-first", r, stats, method="als", sweeps=10, tol=0.0).error == pytest.approx(exact, rel=1e-9)


def test_pw_first_pcg_als_ends_near_exact_als_on_image_like_inputs(monkeypatch):
    """On inputs whose channel and spatial correlations roughly separate (smooth, mixed
    images: what the Kronecker preconditioner assumes), ALS with the PCG half-steps ends within
    0.02% of ALS with exact block steps, and beats the refit."""
    import sepify.rewrite.factorize as fz

    rng = np.random.default_rng(23)
    m, n, r = 12, 16, 3
    w = rng.standard_normal((n, m, 3, 3))
    imgs, _ = smooth_images(rng, 30, m)
    stats = LayerStats.from_rows(patches(imgs, (3, 3), pads=(1, 1, 1, 1)))
    prob, _, _ = fz._problem(w, 1, stats, None)
    q0 = spectrum(w, 1, "pw-first").factors(r)[0].reshape(n, r, m).astype(np.float64)
    qe, se = _pw_exact_als(fz, prob, q0, 10)
    exact = fz._rel(prob.data_error(fz._pw_kernel(qe, se, 1)), prob.tt)
    monkeypatch.setattr(fz, "_PW_DIRECT_MAX", 0)  # force the PCG steps
    f = fit(w, None, 1, "pw-first", r, stats, method="als", sweeps=10, tol=0.0)
    assert f.error == pytest.approx(exact, rel=2e-4), (f.error, exact)  # measured: 1e-5 (one iteration each: 6e-4)
    assert f.error < fit(w, None, 1, "pw-first", r, stats, method="refit").error


def test_dw_first_gauss_seidel_d_step_converges_to_joint_solve(monkeypatch):
    """Block Gauss-Seidel over channel chunks (wide layers): each sweep lowers the objective,
    and repeated sweeps reach the joint normal-equation solution."""
    import sepify.rewrite.factorize as fz

    rng = np.random.default_rng(15)
    w = rng.standard_normal((6, 5, 3, 3))
    stats = LayerStats.from_rows(correlated_rows(rng, 400, 1, 45, decay=0.9))
    prob, _, _ = fz._problem(w, 1, stats, None)
    r = 2
    d0 = rng.standard_normal((1, 5, r, 9))
    p, _ = fz._dw_pstep(prob, d0)
    joint = fz._dw_dstep(prob, p, d0)  # 5*2*9 = 90 <= 768: one joint solve

    def objective(d):  # J(A) up to a constant: tr(A Cp A^T) - 2 tr(W Cp' A^T)
        a = fz._dw_kernel(p, d)
        return float(np.sum(np.matmul(a, prob.cp) * a) - 2 * np.sum(prob.wcp * a))

    monkeypatch.setattr(fz, "_GS_BLOCK", 2 * 9)  # one channel per block
    d, last = d0, objective(d0)
    for _ in range(300):
        d = fz._dw_dstep(prob, p, d)
        now = objective(d)
        assert now <= last + 1e-9 * abs(last)
        last = now
    np.testing.assert_allclose(d, joint, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("method", ["refit", "als"])
def test_output_stats_give_the_fits_of_the_full_paired_stats(orientation, method):
    """OutputStats keep of the original side only y = W x (sum y, sum y x~^T, sum ||y||^2): the
    same refit/ALS factors, bias and errors as the full LayerStats of the same rows; another
    weight than the one projected on is refused."""
    from sepify.rewrite.factorize import OutputStats, output_error_curve

    rng = np.random.default_rng(31)
    w = rng.standard_normal((8, 3, 3, 3))  # group 1 and group... see below
    b = rng.standard_normal(8)
    t = correlated_rows(rng, 500, 1, 27, decay=0.85)
    x = t + 0.3 * correlated_rows(rng, 500, 1, 27, decay=0.9)  # the rewritten model's input differs
    full, proj = LayerStats.from_rows(x, t), OutputStats.from_rows(x, t, w)
    f1 = fit(w, b, 1, orientation, 2, full, method=method)
    f2 = fit(w, b, 1, orientation, 2, proj, method=method)
    for a, c in ((f1.first, f2.first), (f1.second, f2.second), (f1.bias, f2.bias)):
        np.testing.assert_allclose(c, a, rtol=1e-7, atol=1e-9)
    assert f2.error == pytest.approx(f1.error, rel=1e-9) and f2.weight_error == pytest.approx(f1.weight_error, rel=1e-9)
    np.testing.assert_allclose(output_error_curve(w, 1, orientation, proj), output_error_curve(w, 1, orientation, full),
                               rtol=1e-9)
    with pytest.raises(ValueError, match="another weight"):
        fit(w + 1e-3, b, 1, orientation, 2, proj)
    # grouped: 2 groups of 4 output / 3 input channels
    wg = rng.standard_normal((8, 3, 3, 3))
    tg = correlated_rows(rng, 400, 2, 27, decay=0.85)
    xg = tg + 0.2 * correlated_rows(rng, 400, 2, 27, decay=0.9)
    g1 = fit(wg, None, 2, orientation, 2, LayerStats.from_rows(xg, tg), method=method)
    g2 = fit(wg, None, 2, orientation, 2, OutputStats.from_rows(xg, tg, wg), method=method)
    assert g2.error == pytest.approx(g1.error, rel=1e-9)
    np.testing.assert_allclose(g2.bias, g1.bias, rtol=1e-7, atol=1e-9)
