"""Tests for sepify.rewrite.factorize.

Expected values are computed independently of the module under test: singular values by a naive
per-slice ``np.linalg.svd`` loop, kernel equivalence from the grouped-Conv semantics (each factor
expanded to a dense block-diagonal kernel and composed by hand), Conv outputs by onnxruntime, MAC
counts from the factor shapes, and allocation optima by brute force over all (orientation, rank)
combinations.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import example
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sepify.errors import BudgetError, SepifyError
from sepify.rewrite.allocate import BudgetUnreachable, LayerChoice, allocate
from sepify.rewrite.factorize import (
    KEEP,
    ORIENTATIONS,
    Spectrum,
    original_macs,
    reconstruct,
    spectrum,
)

HYP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- independent references


def naive_slices(w: np.ndarray, group: int, orientation: str) -> list[np.ndarray]:
    n, mg = w.shape[:2]
    ng = n // group
    if orientation == "dw-first":  # one (N/g x K) matrix per input channel
        return [
            w[j * ng : (j + 1) * ng, ml].reshape(ng, -1) for j in range(group) for ml in range(mg)
        ]
    return [w[i].reshape(mg, -1) for i in range(n)]  # one (M/g x K) matrix per output channel


def naive_singular_values(w, group, orientation) -> list[np.ndarray]:
    slices = naive_slices(np.asarray(w, np.float64), group, orientation)
    return [np.linalg.svd(a, compute_uv=False) for a in slices]


def naive_rel_error(w, group, orientation, rank) -> float:
    w = np.asarray(w, np.float64)
    svals = naive_singular_values(w, group, orientation)
    dropped = sum(float(np.sum(s[rank:] ** 2)) for s in svals)
    total = float(np.sum(w * w))
    return 0.0 if total == 0.0 else math.sqrt(dropped / total)


def dense(weight: np.ndarray, group: int) -> np.ndarray:
    """A grouped Conv kernel (Cout, Cin/G, *k) as the equivalent ungrouped (Cout, Cin, *k)."""
    cout, cin_g = weight.shape[:2]
    out = np.zeros((cout, cin_g * group, *weight.shape[2:]))
    per_group = cout // group
    for o in range(cout):
        j = o // per_group  # ONNX: output o of group j reads inputs j*Cin/G .. (j+1)*Cin/G - 1
        out[o, j * cin_g : (j + 1) * cin_g] = weight[o]
    return out


def composed_dense(first, second, orientation, group, weight_shape) -> np.ndarray:
    """Dense kernel of Conv(first) followed by Conv(second), from the ONNX group semantics."""
    n, mg = weight_shape[:2]
    m = mg * group
    if orientation == "dw-first":
        a = dense(first, m)  # (T, M, *k)
        b = dense(second, group).reshape(n, -1)  # (N, T) 1x1
        return np.tensordot(b, a, axes=(1, 0))
    a = dense(first, group).reshape(first.shape[0], m)  # (T, M) 1x1
    b = dense(second, n)  # (N, T, *k)
    return np.moveaxis(np.tensordot(b, a, axes=(1, 0)), -1, 1)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (scale if scale else 1.0)


@st.composite
def conv_weights(draw):
    """(weight, group, orientation): 1-3-D kernels, groups, non-square, some low-rank / zero."""
    d = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    ng, mg = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kmax = {1: 6, 2: 4, 3: 3}[d]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (ng * group, mg, *kernel)
    kind = draw(st.sampled_from(["normal", "normal", "normal", "rank1", "zero", "float32"]))
    if kind == "zero":
        w = np.zeros(shape)
    elif kind == "rank1":  # every slice in both orientations has rank <= 1
        w = np.einsum("n,m,k->nmk", rng.standard_normal(shape[0]), rng.standard_normal(mg),
                      rng.standard_normal(math.prod(kernel))).reshape(shape)
    else:
        w = rng.standard_normal(shape)
        if kind == "float32":
            w = w.astype(np.float32)
    return w, group, draw(st.sampled_from(ORIENTATIONS))


def tol(w) -> float:
    return 2e-5 if w.dtype == np.float32 else 1e-10


# --------------------------------------------------------------------------- factors and errors


@HYP
@given(conv_weights())
def test_full_rank_reconstructs_weight(case):
    w, group, orientation = case
    spec = spectrum(w, group, orientation)
    n, mg = w.shape[:2]
    k = math.prod(w.shape[2:])
    assert spec.max_rank == (min(n // group, k) if orientation == "dw-first" else min(mg, k))
    first, second = spec.factors(spec.max_rank)
    assert first.dtype == second.dtype == w.dtype
    assert rel_diff(reconstruct(first, second, orientation, group, w.shape), w) < tol(w)
    # the factors, read with ONNX grouped-Conv semantics, compose to the original grouped kernel
    composed = composed_dense(first, second, orientation, group, w.shape)
    assert rel_diff(composed, dense(w, group)) < tol(w)


def at_random_rank(case, data):
    """Unpack a drawn case, factorize it, and draw a rank in 1..max_rank."""
    w, group, orientation = case
    spec = spectrum(w, group, orientation)
    return w, group, orientation, spec, data.draw(st.integers(1, spec.max_rank))


@HYP
@given(conv_weights(), st.data())
def test_truncated_error_matches_naive_svd(case, data):
    w, group, orientation, spec, rank = at_random_rank(case, data)
    first, second = spec.factors(rank)
    r, m, n = rank, w.shape[1] * group, w.shape[0]
    ones = (1,) * (w.ndim - 2)
    if orientation == "dw-first":
        assert first.shape == (m * r, 1, *w.shape[2:])
        assert second.shape == (n, w.shape[1] * r, *ones)
    else:
        assert first.shape == (n * r, w.shape[1], *ones) and second.shape == (n, r, *w.shape[2:])
    w_hat = reconstruct(first, second, orientation, group, w.shape)
    composed = composed_dense(first, second, orientation, group, w.shape)
    assert rel_diff(composed, dense(w_hat, group)) < tol(w)
    expected = naive_rel_error(w, group, orientation, rank)
    norm = float(np.linalg.norm(w.astype(np.float64)))
    actual = float(np.linalg.norm(w_hat.astype(np.float64) - w)) / norm if norm else 0.0
    assert spec.rel_error(rank) == pytest.approx(expected, abs=1e-9)
    assert actual == pytest.approx(expected, abs=50 * tol(w))
    # singular values agree with the naive loop (slice order: input channels / output channels)
    naive = np.array(naive_singular_values(w, group, orientation))
    np.testing.assert_allclose(spec.singular_values, naive, atol=1e-9 * max(1.0, norm))


@HYP
@given(conv_weights(), st.floats(0, 1), st.floats(0, 1.2))
def test_error_monotone_energy_and_rank_search(case, fraction, bound):
    w, group, orientation = case
    spec = spectrum(w, group, orientation)
    ranks = range(1, spec.max_rank + 1)
    rel = [spec.rel_error(r) for r in ranks]
    energy = [spec.energy(r) for r in ranks]
    assert all(a >= b for a, b in zip(rel, rel[1:]))
    assert all(a <= b for a, b in zip(energy, energy[1:]))
    for e, x in zip(energy, rel):
        assert 0.0 <= x <= 1.0 and e + x * x == pytest.approx(1.0, abs=1e-12)
    assert rel[-1] == 0.0 and energy[-1] == 1.0
    naive = [naive_rel_error(w, group, orientation, r) for r in ranks]
    np.testing.assert_allclose(rel, naive, atol=1e-9)
    # smallest rank meeting the target, by linear scan over the module's own values
    by_energy = next(r for r, e in zip(ranks, energy) if e >= fraction - 1e-12)
    by_error = next(r for r, x in zip(ranks, rel) if x <= bound + 1e-12)
    assert spec.rank_for_energy(fraction) == by_energy
    assert spec.rank_for_error(bound) == by_error


@HYP
@given(conv_weights(), st.data())
def test_factors_split_singular_values_evenly(case, data):
    """Each rank-one term sqrt(s_i) u_i (x) sqrt(s_i) v_i: both factors have norm sqrt(s_i)."""
    w, group, orientation, spec, rank = at_random_rank(case, data)
    first, second = (np.asarray(f, np.float64) for f in spec.factors(rank))
    roots = np.sqrt(np.array(naive_singular_values(w, group, orientation))[:, :rank])  # (slices, r)
    n, mg = w.shape[:2]
    ng = n // group
    if orientation == "dw-first":  # slice = input channel m = j*Mg + m_local
        spatial = np.linalg.norm(first.reshape(len(roots), rank, -1), axis=2)
        chan = np.array([
            [np.linalg.norm(second[j * ng : (j + 1) * ng, ml * rank + i]) for i in range(rank)]
            for j in range(group)
            for ml in range(mg)
        ])
    else:  # slice = output channel n
        chan = np.linalg.norm(first.reshape(n, rank, -1), axis=2)
        spatial = np.linalg.norm(second.reshape(n, rank, -1), axis=2)
    np.testing.assert_allclose(spatial, roots, atol=10 * tol(w))
    np.testing.assert_allclose(chan, roots, atol=10 * tol(w))


def test_rank_search_edges():
    rng = np.random.default_rng(1)
    spec = spectrum(rng.standard_normal((8, 4, 3, 3)), 2, "dw-first")
    assert spec.rank_for_energy(0.0) == 1 and spec.rank_for_error(1.0) == 1
    assert spec.rank_for_energy(1.0) == spec.max_rank and spec.rank_for_error(0.0) == spec.max_rank
    e3 = spec.energy(3)
    assert spec.rank_for_energy(e3) == 3 and spec.rank_for_error(spec.rel_error(3)) == 3
    assert spec.rank_for_energy(min(1.0, e3 + 1e-9)) == 4
    # the 1e-12 slack: a target just above a rank's energy / just below its error still picks it
    assert spec.rank_for_energy(e3 + 5e-13) == 3
    assert spec.rank_for_error(spec.rel_error(3) - 5e-13) == 3
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            spec.rank_for_energy(bad)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            spec.rank_for_error(bad)


def test_zero_weight_has_no_error():
    spec = spectrum(np.zeros((4, 2, 3)), 2, "pw-first")
    assert spec.norm_sq == 0.0
    assert spec.rel_error(1) == 0.0 and spec.energy(1) == 1.0
    assert spec.rank_for_energy(1.0) == 1 and spec.rank_for_error(0.0) == 1
    first, second = spec.factors(1)
    assert not first.any() and not second.any()


def test_known_singular_values_and_norm():
    s = np.array([4.0, 2.0, 1.0, 0.5])
    w = known_weight(s, n=6, kernel=(2, 3), seed=3)
    spec = spectrum(w)
    assert spec.max_rank == 6  # one 6 x 6 slice: two more singular values, both zero
    np.testing.assert_allclose(spec.singular_values[0], [*s, 0.0, 0.0], atol=1e-12)
    assert spec.norm_sq == pytest.approx(float(np.sum(s**2)))
    assert spec.rel_error(2) == pytest.approx(math.sqrt((1.0 + 0.25) / 21.25))
    assert spec.energy(1) == pytest.approx(16.0 / 21.25)


def test_spectrum_is_immutable_and_compares_by_identity():
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    a, b = spectrum(w), spectrum(w)
    assert a == a and a != b
    with pytest.raises(Exception):
        a.max_rank = 1
    with pytest.raises(ValueError):
        a.singular_values[0, 0] = 1.0
    first, _ = a.factors(1)
    first[...] = 0.0  # factors are fresh arrays
    assert a.factors(1)[0].any()


def test_integer_weight_gives_float64_factors():
    w = np.arange(24).reshape(4, 2, 3)
    first, second = spectrum(w).factors(2)
    assert first.dtype == second.dtype == np.float64
    assert rel_diff(reconstruct(first, second, "dw-first", 1, w.shape), w) < 1e-12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=np.zeros((6, 2, 3)), group=4), "does not divide"),
        (dict(weight=np.zeros((6, 2, 3)), group=0), "group"),
        (dict(weight=np.zeros((6, 2)), group=1), "3 to 5 dims"),
        (dict(weight=np.zeros((6, 2, 3, 3, 3, 3)), group=1), "3 to 5 dims"),
        (dict(weight=np.zeros((6, 0, 3)), group=1), ">= 1"),
        (dict(weight=np.zeros((6, 2, 3)), orientation="depthwise"), "orientation"),
        (dict(weight=np.full((2, 2, 3), np.nan)), "NaN"),
        (dict(weight=np.zeros((2, 2, 3), dtype=complex)), "real"),
    ],
)
def test_spectrum_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectrum(**kwargs)


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "2"])
def test_rank_validation(bad):
    spec = spectrum(np.ones((4, 2, 2, 2)), 1, "pw-first")  # slices 2 x 4: max rank 2
    assert spec.max_rank == 2
    for call in (spec.energy, spec.rel_error, spec.factors, lambda r: spec.macs(r, 1, 1)):
        with pytest.raises(ValueError, match="rank"):
            call(bad)
    assert spec.energy(np.int64(2)) == 1.0


def test_reconstruct_validation():
    spec = spectrum(np.ones((4, 2, 3)), 2, "dw-first")
    first, second = spec.factors(1)
    with pytest.raises(ValueError, match="orientation"):
        reconstruct(first, second, "both", 2, (4, 2, 3))
    with pytest.raises(ValueError, match="factor"):
        reconstruct(second, first, "dw-first", 2, (4, 2, 3))
    with pytest.raises(ValueError, match="factor"):
        reconstruct(first, second, "pw-first", 2, (4, 2, 3))


# --------------------------------------------------------------------------- MACs


def conv_macs(weight_shape, positions) -> int:
    """MACs of a (grouped) Conv: every output position of every output channel reads Cin/G * K."""
    return math.prod(weight_shape) * positions


def test_worked_example_macs():
    w = np.random.default_rng(0).standard_normal((256, 3, 5, 5)).astype(np.float32)
    spec = spectrum(w)
    assert spec.max_rank == 25
    first, second = spec.factors(1)
    assert first.shape == (3, 1, 5, 5) and second.shape == (256, 3, 1, 1)
    assert conv_macs(first.shape, 64) == 4_800 and conv_macs(second.shape, 64) == 49_152
    assert spec.macs(1, p_in=64, p_out=64) == 53_952
    assert original_macs(w.shape, 1, 64) == 1_228_800


@HYP
@given(conv_weights(), st.data(), st.integers(0, 500), st.integers(0, 500))
def test_macs_match_factor_shapes(case, data, p_in, p_out):
    w, group, orientation, spec, rank = at_random_rank(case, data)
    first, second = spec.factors(rank)
    if orientation == "dw-first":  # both Convs run at the output resolution
        expected = conv_macs(first.shape, p_out) + conv_macs(second.shape, p_out)
    else:  # the 1x1 runs at the input resolution
        expected = conv_macs(first.shape, p_in) + conv_macs(second.shape, p_out)
    assert spec.macs(rank, p_in, p_out) == expected
    assert original_macs(w.shape, group, p_out) == conv_macs(w.shape, p_out)


# --------------------------------------------------------------------------- onnxruntime runs


def conv_node(x, w, b, out, group, strides=None, pads=None, dilations=None):
    attrs = {"group": group}
    if strides:
        attrs.update(strides=list(strides), pads=list(pads), dilations=list(dilations))
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [out], **attrs)


def run_onnx(nodes, inits: dict, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * x.ndim) for o in outputs],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"X": x})


def factorized_nodes(orientation, m, n, group, strides, pads, dilations):
    if orientation == "dw-first":  # depthwise carries the geometry, pointwise the bias
        return [
            conv_node("X", "F1", None, "T", m, strides, pads, dilations),
            conv_node("T", "F2", "B", "Y", group),
        ]
    return [  # pointwise at input resolution, spatial Conv carries geometry and bias
        conv_node("X", "F1", None, "T", group),
        conv_node("T", "F2", "B", "Y", n, strides, pads, dilations),
    ]


CONV_CASES = [
    # orientation, N, M/g, g, kernel, strides, pads, dilations, input spatial
    ("dw-first", 8, 3, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (9, 11)),
    ("dw-first", 8, 3, 2, (3, 5), (2, 2), (0, 1, 2, 1), (1, 1), (10, 12)),
    ("dw-first", 8, 1, 4, (3, 3), (2, 1), (1, 1, 0, 0), (1, 2), (9, 9)),
    ("dw-first", 4, 2, 2, (2, 3, 3), (1, 2, 2), (0, 1, 1, 1, 0, 1), (1, 1, 1), (5, 7, 7)),
    ("pw-first", 6, 4, 2, (3, 3), (2, 1), (1, 0, 0, 2), (2, 1), (11, 9)),
    ("pw-first", 5, 3, 1, (4,), (2,), (2, 1), (1,), (13,)),
    ("pw-first", 4, 6, 2, (1, 3), (2, 2), (0, 1, 0, 0), (1, 1), (8, 9)),
    ("pw-first", 6, 2, 3, (2, 2, 2), (2, 1, 1), (1, 0, 0, 0, 1, 1), (1, 1, 2), (6, 5, 6)),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_factors_run_as_convs_in_onnxruntime(case):
    orientation, n, mg, group, kernel, strides, pads, dilations, spatial = case
    rng = np.random.default_rng(sum(map(ord, orientation)) + n * 100 + mg * 10 + group)
    m = mg * group
    w = rng.standard_normal((n, mg, *kernel)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((2, m, *spatial)).astype(np.float32)
    spec = spectrum(w, group, orientation)
    f1, f2 = spec.factors(spec.max_rank)
    nodes = [conv_node("X", "W", "B", "Yref", group, strides, pads, dilations)]
    nodes += factorized_nodes(orientation, m, n, group, strides, pads, dilations)
    y_ref, y, t = run_onnx(nodes, {"W": w, "B": b, "F1": f1, "F2": f2}, x, ["Yref", "Y", "T"])
    assert y.shape == y_ref.shape
    assert rel_diff(y, y_ref) < 1e-5
    # the MAC formula's resolutions: the first factor runs at P_out (dw) or P_in (pw)
    p_in, p_out = 2 * math.prod(spatial), math.prod(y_ref.shape[:1] + y_ref.shape[2:])
    assert math.prod(t.shape[2:]) * 2 == (p_out if orientation == "dw-first" else p_in)
    p_mid = math.prod(t.shape[:1] + t.shape[2:])
    expected = conv_macs(f1.shape, p_mid) + conv_macs(f2.shape, p_out)
    assert spec.macs(spec.max_rank, p_in, p_out) == expected


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[4]], ids=["dw-first", "pw-first"])
def test_truncated_factors_run_as_their_reconstruction(case):
    orientation, n, mg, group, kernel, strides, pads, dilations, spatial = case
    rng = np.random.default_rng(7)
    m = mg * group
    w = rng.standard_normal((n, mg, *kernel)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((1, m, *spatial)).astype(np.float32)
    spec = spectrum(w, group, orientation)
    f1, f2 = spec.factors(1)
    w1 = reconstruct(f1, f2, orientation, group, w.shape).astype(np.float32)
    nodes = [
        conv_node("X", "W", "B", "Yref", group, strides, pads, dilations),
        conv_node("X", "W1", "B", "Yrank", group, strides, pads, dilations),
    ]
    nodes += factorized_nodes(orientation, m, n, group, strides, pads, dilations)
    inits = {"W": w, "W1": w1, "B": b, "F1": f1, "F2": f2}
    y_ref, y_rank, y = run_onnx(nodes, inits, x, ["Yref", "Yrank", "Y"])
    assert rel_diff(y, y_rank) < 1e-5
    assert rel_diff(y, y_ref) > 1e-2  # rank 1 really is an approximation here


# --------------------------------------------------------------------------- allocation


def known_weight(svals, n, kernel, seed=0) -> np.ndarray:
    """(n, 1, *kernel) weight whose single dw-first slice (n x K) has singular values ``svals``."""
    rng = np.random.default_rng(seed)
    k, r = math.prod(kernel), len(svals)
    q1 = np.linalg.qr(rng.standard_normal((n, r)))[0]
    q2 = np.linalg.qr(rng.standard_normal((k, r)))[0]
    return (q1 @ np.diag(svals) @ q2.T).reshape(n, 1, *kernel)


def choice(name, w, group=1, orientations=ORIENTATIONS, p_in=100, p_out=100) -> LayerChoice:
    spectra = {o: spectrum(w, group, o) for o in orientations}
    return LayerChoice(name, spectra, p_in, p_out, float(np.sum(np.asarray(w, np.float64) ** 2)))


DW, PW = ("dw-first",), ("pw-first",)


def cost(layer: LayerChoice, o: str, r: int) -> int:
    return layer.spectra[o].macs(r, layer.p_in, layer.p_out)


def abs_err(layer: LayerChoice, o: str, r: int) -> float:
    """Absolute dropped energy: ||W||^2 * rel_error^2."""
    return layer.weight_norm_sq * layer.spectra[o].rel_error(r) ** 2


def original_cost(layer: LayerChoice) -> int:
    spec = next(iter(layer.spectra.values()))
    return original_macs(spec.weight_shape, spec.group, layer.p_out)


def brute_force_ranks(svals: list[np.ndarray], unit_costs, original, budget):
    """Optimal dw-first ranks for single-slice layers: min total dropped s^2 within budget
    (rank None: the layer keeps its original Conv, no error)."""
    best = None
    options = [
        [r for r in range(1, len(s) + 1) if c * r < orig] + [None]
        for s, c, orig in zip(svals, unit_costs, original)
    ]
    for ranks in itertools.product(*options):
        if sum(orig if r is None else c * r for c, r, orig in zip(unit_costs, ranks, original)) > budget:
            continue
        err = sum(0.0 if r is None else float(np.sum(s[r:] ** 2)) for s, r in zip(svals, ranks))
        if best is None or err < best[0] - 1e-12:
            best = (err, ranks)
    return best[1]


def test_allocate_gives_rank_where_it_buys_more_error():
    n, kernel, p = 16, (3, 3), 100
    flat = np.ones(9)
    steep = np.array([3.0, 0.5, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001])
    layers = [
        choice("steep", known_weight(steep, n, kernel, 1), orientations=DW, p_in=p, p_out=p),
        choice("flat", known_weight(flat, n, kernel, 2), orientations=DW, p_in=p, p_out=p),
    ]
    unit = (9 + 16) * p  # dw-first MACs per rank: (M*K + N*M/g) * P_out with M = 1
    original = 16 * 9 * p
    assert cost(layers[0], "dw-first", 1) == unit and original_macs((16, 1, 3, 3), 1, p) == original
    budget = 4 * unit  # two ranks beyond rank 1 everywhere
    ranks, total = allocate(layers, budget)
    assert ranks == {"steep": ("dw-first", 1), "flat": ("dw-first", 3)}
    assert total == 4 * unit
    optimum = brute_force_ranks([steep, flat], [unit, unit], [original] * 2, budget)
    assert (ranks["steep"][1], ranks["flat"][1]) == optimum
    # a factorization must be cheaper than the original Conv (25 r < 144  =>  r <= 5); with
    # room for one original, the layer whose low ranks lose the most keeps it (no error)
    budget = original + 5 * unit
    ranks, total = allocate(layers, budget)
    assert ranks == {"steep": ("dw-first", 5)} and total == original + 5 * unit
    assert brute_force_ranks([steep, flat], [unit, unit], [original] * 2, budget) == (5, None)
    # a budget for both originals keeps both: nothing to factorize
    assert allocate(layers, 10**9) == ({}, 2 * original)


def test_allocate_uses_absolute_not_relative_error():
    big = np.array([10.0, 1.0, 1e-3, 1e-3])  # rank 1 drops ~1% of its energy, but 1.0 absolute
    small = np.array([0.1, 0.1, 0.1, 0.1])  # rank 1 drops 75% of its energy, but 0.03 absolute
    layers = [
        choice("small", known_weight(small, 8, (2, 2), 4), orientations=("dw-first",)),
        choice("big", known_weight(big, 8, (2, 2), 5), orientations=("dw-first",)),
    ]
    assert layers[1].spectra["dw-first"].rel_error(1) < layers[0].spectra["dw-first"].rel_error(1)
    unit = (4 + 8) * 100
    ranks, total = allocate(layers, 3 * unit)
    assert ranks == {"small": ("dw-first", 1), "big": ("dw-first", 2)} and total == 3 * unit
    assert (1, 2) == brute_force_ranks([small, big], [unit, unit], [8 * 4 * 100] * 2, 3 * unit)


def brute_force_choice(layers, budget):
    """Minimum total dropped energy over every (orientation, rank) combination within budget."""
    options = []
    for layer in layers:
        orig = original_cost(layer)
        options.append([
            (o, r)
            for o, sp in layer.spectra.items()
            for r in range(1, sp.max_rank + 1)
            if cost(layer, o, r) < orig
        ] + [(KEEP, 1)])

    def c(layer, o, r):
        return original_cost(layer) if o == KEEP else cost(layer, o, r)

    def e(layer, o, r):
        return 0.0 if o == KEEP else abs_err(layer, o, r)

    best = None
    for combo in itertools.product(*options):
        if sum(c(layer, o, r) for layer, (o, r) in zip(layers, combo)) <= budget:
            err = sum(e(layer, o, r) for layer, (o, r) in zip(layers, combo))
            if best is None or err < best[0]:
                best = (err, combo)
    return {layer.name: oc for layer, oc in zip(layers, best[1]) if oc[0] != KEEP}


def test_allocate_can_trade_orientation_error_for_macs():
    """From the error-best start (a: rank 1, b: pw-first rank 1; 3,200 MACs) no error-reducing
    step fits 3,800 MACs, yet b in its cheaper dw-first orientation frees the MACs for a's
    rank 2, which drops far more energy (a greedy from the error-best start misses it)."""
    a = choice("a", known_weight(np.array([3.0, 2.5, 0.1, 0.05]), 8, (2, 2), 0), orientations=DW)
    b = choice("b", np.random.default_rng(0).standard_normal((4, 2, 3)))
    assert b.spectra["pw-first"].rel_error(1) < b.spectra["dw-first"].rel_error(1)
    assert cost(a, "dw-first", 1) + cost(b, "pw-first", 1) == 3_200
    expected = brute_force_choice([a, b], 3_800)
    assert expected == {"a": ("dw-first", 2), "b": ("dw-first", 1)}
    assert allocate([a, b], 3_800) == (expected, 3_800)


def test_allocate_keeps_error_best_start_when_it_wins():
    """The mirror case: a greedy from the cheapest start (dw-first everywhere) climbs to dw-first
    ranks 1 and 2, but pw-first rank 1 everywhere fits 14,400 MACs exactly and is better."""
    a = choice("a", np.random.default_rng([216, 0]).standard_normal((12, 2, 2, 2)), group=2)
    b = choice("b", np.random.default_rng([216, 1]).standard_normal((4, 2, 4, 4)))
    for layer in (a, b):
        assert cost(layer, "dw-first", 1) < cost(layer, "pw-first", 1)
        assert layer.spectra["pw-first"].rel_error(1) < layer.spectra["dw-first"].rel_error(1)
    expected = brute_force_choice([a, b], 14_400)
    assert expected == {"a": ("pw-first", 1), "b": ("pw-first", 1)}
    assert allocate([a, b], 14_400) == (expected, 14_400)


def test_allocate_rescores_after_a_step_that_frees_macs():
    """The error-best start (a pw-first 1, b dw-first 1) is 600 MACs over 11,600, so a drops to
    dw-first 1. Then b's pw-first rank 2 is both better and 600 MACs cheaper than its dw-first
    rank 1; the MACs it frees make a's switch back to pw-first 1 affordable."""
    a = choice("a", np.random.default_rng([428, 0]).standard_normal((4, 2, 4, 3)))
    b = choice("b", np.random.default_rng([428, 1]).standard_normal((2, 6, 3, 3)))
    assert cost(a, "pw-first", 1) + cost(b, "dw-first", 1) == 12_200
    assert cost(b, "pw-first", 2) == cost(b, "dw-first", 1) - 600
    assert b.spectra["pw-first"].rel_error(2) < b.spectra["dw-first"].rel_error(1)
    expected = brute_force_choice([a, b], 11_600)
    assert expected == {"a": ("pw-first", 1), "b": ("pw-first", 2)}
    assert allocate([a, b], 11_600) == (expected, 11_600)


def test_allocate_ties_give_the_earlier_layer_the_rank():
    w = known_weight(np.array([2.0, 1.0, 0.5]), 8, (3,), 0)
    a, b = choice("a", w, orientations=("dw-first",)), choice("b", w, orientations=("dw-first",))
    unit = cost(a, "dw-first", 1)
    assert allocate([a, b], 3 * unit)[0] == {"a": ("dw-first", 2), "b": ("dw-first", 1)}
    assert allocate([b, a], 3 * unit)[0] == {"a": ("dw-first", 1), "b": ("dw-first", 2)}


def min_rank1_macs(layers) -> int:
    total = 0
    for layer in layers:
        costs = [cost(layer, o, 1) for o in layer.spectra]
        total += min(c for c in costs if c < original_cost(layer))
    return total


def test_allocate_budget_unreachable():
    rng = np.random.default_rng(11)
    layers = [
        choice("c1", rng.standard_normal((32, 8, 3, 3)), p_in=400, p_out=100),
        choice("c2", rng.standard_normal((16, 4, 3, 3)), group=2, p_in=100, p_out=100),
        choice("c3", rng.standard_normal((24, 4, 5)), orientations=PW, p_in=60, p_out=30),
    ]
    minimum = min_rank1_macs(layers)
    with pytest.raises(BudgetUnreachable, match=f"{minimum:,}") as info:
        allocate(layers, minimum - 1)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, BudgetError)
    assert isinstance(err, SepifyError)
    assert err.minimum_macs == minimum and err.budget_macs == minimum - 1
    ranks, total = allocate(layers, minimum)
    assert total == minimum and all(r == 1 for _, r in ranks.values())
    with pytest.raises(BudgetUnreachable):
        allocate([], -1)
    assert allocate([], 0) == ({}, 0)


def test_allocate_falls_back_to_cheaper_orientation_when_budget_is_tight():
    w = np.random.default_rng(5).standard_normal((4, 2, 3, 3))
    layer = choice("c", w)
    dw, pw = layer.spectra["dw-first"], layer.spectra["pw-first"]
    # precondition of the scenario: pw-first is the better rank-1 choice but costs more
    dw_cost, pw_cost = cost(layer, "dw-first", 1), cost(layer, "pw-first", 1)
    assert pw.rel_error(1) < dw.rel_error(1) and pw_cost > dw_cost
    assert allocate([layer], dw_cost) == ({"c": ("dw-first", 1)}, dw_cost)
    assert allocate([layer], cost(layer, "pw-first", 1))[0] == {"c": ("pw-first", 1)}


@st.composite
def allocation_problems(draw):
    layers = []
    for i in range(draw(st.integers(1, 4))):
        group = draw(st.integers(1, 2))
        ng, mg = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        kernel = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 2))))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w = rng.standard_normal((ng * group, mg, *kernel))
        orients = draw(st.sampled_from([ORIENTATIONS, ("dw-first",), ("pw-first",)]))
        p_out = draw(st.integers(1, 50))
        p_in = p_out * draw(st.sampled_from([1, 4]))
        layer = choice(f"l{i}", w, group, orients, p_in=p_in, p_out=p_out)
        orig = original_macs(w.shape, group, p_out)
        if any(cost(layer, o, 1) < orig for o in orients):
            layers.append(layer)
    minimum = min_rank1_macs(layers)
    top = sum(original_cost(layer) for layer in layers)
    budget = draw(st.integers(minimum, max(minimum, top)))
    return layers, budget


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(allocation_problems())
def test_allocate_invariants(problem):
    layers, budget = problem
    ranks, total = allocate(layers, budget)
    assert set(ranks) <= {layer.name for layer in layers}  # a layer kept as it is is absent
    costs = {layer.name: cost(layer, *ranks[layer.name]) if layer.name in ranks else original_cost(layer)
             for layer in layers}
    assert total == sum(costs.values()) <= budget
    for layer in layers:
        orig = original_cost(layer)
        if layer.name not in ranks:
            continue  # kept: no error, nothing better
        o, r = ranks[layer.name]
        assert o in layer.spectra and 1 <= r <= layer.spectra[o].max_rank
        assert costs[layer.name] < orig
        # greedy stopped: no single improving step (rank + 1, any rank of the other orientation,
        # or keeping the original) still fits the budget (and, factorized, the original's cost)
        err = abs_err(layer, o, r)
        assert not (err > 0 and total - costs[layer.name] + orig <= budget), (layer.name, "keep")
        moves = [(o, r + 1)] if r < layer.spectra[o].max_rank else []
        moves += [
            (o2, r2)
            for o2 in layer.spectra
            if o2 != o
            for r2 in range(1, layer.spectra[o2].max_rank + 1)
        ]
        for o2, r2 in moves:
            c2 = cost(layer, o2, r2)
            better = abs_err(layer, o2, r2) < err
            fits = c2 < orig and total - costs[layer.name] + c2 <= budget
            assert not (better and fits), (layer.name, o2, r2)
    # optimal: the total error equals the brute-force minimum over every combination
    expected = brute_force_choice(layers, budget)
    def total_err(choice):
        return sum(abs_err(layer, *choice[layer.name]) for layer in layers if layer.name in choice)
    assert math.isclose(total_err(ranks), total_err(expected), rel_tol=1e-9, abs_tol=1e-12)
    # when the error-best rank-1 start (smallest rank-1 error among orientations cheaper than
    # the original) fits the budget, the result is no worse than it
    start = []
    for layer in layers:
        orig = original_cost(layer)
        ok = [o for o in ORIENTATIONS if o in layer.spectra and cost(layer, o, 1) < orig]
        best = min(ok, key=lambda o: (layer.spectra[o].rel_error(1), cost(layer, o, 1)))
        start.append((cost(layer, best, 1), abs_err(layer, best, 1)))
    if sum(c for c, _ in start) <= budget:
        final_err = sum(abs_err(layer, *ranks[layer.name]) for layer in layers if layer.name in ranks)
        assert final_err <= sum(e for _, e in start) * (1 + 1e-12)


def test_allocate_validation():
    w = np.random.default_rng(0).standard_normal((8, 2, 3, 3))
    good = choice("a", w)
    with pytest.raises(ValueError, match="unique"):
        allocate([good, choice("a", w)], 10**9)
    tiny = choice("tiny", np.ones((1, 1, 3)), orientations=("dw-first",))  # rank 1: 4 MACs/pos vs 3
    with pytest.raises(ValueError, match="not cheaper"):
        allocate([good, tiny], 10**9)
    mixed = LayerChoice("m", {"dw-first": spectrum(w, 1, "pw-first")}, 10, 10, 1.0)
    with pytest.raises(ValueError, match="pw-first spectrum"):
        allocate([mixed], 10**9)
    spectra = {"dw-first": spectrum(w), "pw-first": spectrum(w[:4], 1, "pw-first")}
    other = LayerChoice("o", spectra, 10, 10, 1.0)
    with pytest.raises(ValueError, match="different weights"):
        allocate([other], 10**9)
    with pytest.raises(ValueError, match="no spectra"):
        allocate([LayerChoice("e", {}, 10, 10, 1.0)], 10**9)


def test_docstring_example():
    import doctest

    import sepify.rewrite.factorize as module

    result = doctest.testmod(module)
    assert result.attempted >= 6 and result.failed == 0
    assert isinstance(spectrum(np.ones((2, 1, 3))), Spectrum)


# --------------------------------------------------------------------------- the knapsack solver
from sepify.rewrite.allocate import Option, solve  # noqa: E402


def brute_force_solve(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        c = sum(options[i][j].cost for i, j in enumerate(combo))
        if c > budget * (1 + 1e-12):  # solve's documented tolerance
            continue
        e = sum(options[i][j].error for i, j in enumerate(combo))
        if best is None or e < best[0] - 1e-12:
            best = (e, c)
    return best


@st.composite
def knapsacks(draw):
    layers = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 5))
        costs = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=n, max_size=n))
        errors = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n))
        layers.append([Option(j, c, e) for j, (c, e) in enumerate(zip(costs, errors))])
    budget = draw(st.floats(0, 300, allow_nan=False))
    return layers, budget


@settings(max_examples=300, deadline=None)
@given(knapsacks())
@example(([[Option(0, 1.0, 0.0), Option(1, 1.25e-14, 0.0)], [Option(0, 0.0, 0.0)], [Option(0, 1.0, 0.0)]], 1.0))
def test_solve_matches_brute_force_on_real_costs(problem):
    options, budget = problem
    picks = solve(options, budget)
    best = brute_force_solve(options, budget)
    if best is None:
        assert picks is None
        return
    cost = sum(options[i][j].cost for i, j in enumerate(picks))
    err = sum(options[i][j].error for i, j in enumerate(picks))
    assert cost <= budget * (1 + 1e-9) + 1e-9
    assert err <= best[0] + 1e-9 * (1 + best[0])


def test_solve_thinned_front_stays_feasible_and_near_optimal():
    rng = np.random.default_rng(3)
    options = [[Option(j, float(c), float(e)) for j, (c, e) in enumerate(zip(rng.uniform(1, 50, 6), rng.uniform(0, 5, 6)))]
               for _ in range(7)]
    budget = 150.0
    exact = solve(options, budget)
    thin = solve(options, budget, max_front=8)
    def total(p, attr):
        return sum(getattr(options[i][j], attr) for i, j in enumerate(p))
    assert total(exact, "error") == pytest.approx(brute_force_solve(options, budget)[0])
    assert total(thin, "cost") <= budget and total(thin, "error") >= total(exact, "error") - 1e-12
    assert solve(options, 1.0) is None  # every option costs at least 1 per layer, 7 layers
