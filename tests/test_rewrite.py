"""Tests for ``sepify.rewrite`` (the Python API of ``sepify rewrite``).

Expected values never come from the code under test:
- numerical behaviour from onnxruntime outputs of the *original* model (or the reference outputs
  shipped with the ONNX package's conformance models);
- singular values / energies from a per-slice ``np.linalg.svd`` loop written here;
- MAC and parameter counts from hand arithmetic written out in the tests, or from the
  MobileNet paper (Howard et al. 2017, Table 4) via the hand count in ``../shared/reference.md``.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sepify import __version__
from sepify.errors import BudgetError
from sepify.rewrite.pipeline import RewriteOptions, rewrite

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "samples") not in sys.path:
    sys.path.insert(0, str(ROOT / "samples"))
import make_samples  # noqa: E402

OPSET = 17
N_EXAMPLES = int(os.environ.get("SEPIFY_HYPOTHESIS_EXAMPLES", "0")) or None


def property_settings(n: int) -> settings:
    """~n examples (SEPIFY_HYPOTHESIS_EXAMPLES overrides, for a longer local run)."""
    return settings(max_examples=N_EXAMPLES or n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers (independent)


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    """||ref - got|| / ||ref|| (0 when both are all zeros, e.g. an output that only sees padding)."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    diff, norm = float(np.linalg.norm(ref64 - got64)), float(np.linalg.norm(ref64))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def conv_model(
    x_shape,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    weight_as_input: bool = False,
    metadata: dict | None = None,
    node_name: str = "conv",
    **attrs,
) -> onnx.ModelProto:
    """A model with one Conv ``node_name``: input ``x`` -> output ``y``, weight ``W`` (and ``B``)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    inits = []
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weight.shape)))
    else:
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "W"))
    names = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        names.append("B")
    node = helper.make_node("Conv", names, ["y"], name=node_name, **attrs)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))
    graph = helper.make_graph([node], "one_conv", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def naive_slices(w: np.ndarray, group: int, orientation: str) -> list[np.ndarray]:
    """The matrices the spec factorizes: per input channel (dw-first), per output channel (pw-first)."""
    n, mg = w.shape[:2]
    ng = n // group
    if orientation == "dw-first":
        return [w[j * ng:(j + 1) * ng, ml].reshape(ng, -1) for j in range(group) for ml in range(mg)]
    return [w[i].reshape(mg, -1) for i in range(n)]


def naive_energy(w: np.ndarray, group: int, orientation: str, rank: int) -> float:
    """Fraction of ||W||_F^2 kept by the rank-``rank`` truncation of every slice."""
    w = np.asarray(w, np.float64)
    kept = sum(float(np.sum(np.linalg.svd(a, compute_uv=False)[:rank] ** 2))
               for a in naive_slices(w, group, orientation))
    return kept / float(np.sum(w * w))


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


# --------------------------------------------------------------------------- 1. exactness (hypothesis)


@st.composite
def conv_cases(draw):
    """A random standard Conv (1D/2D/3D, groups, non-square kernels, strides, dilations, pads)."""
    nd = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    mg = draw(st.integers(2, 4))  # Mg >= 2: never depthwise (and never a 1-input-channel conv)
    ng = draw(st.integers(1, 4))
    max_k = 3 if nd == 3 else 4
    kernel = draw(st.lists(st.integers(1, max_k), min_size=nd, max_size=nd))
    if math.prod(kernel) == 1:  # a 1x1 conv is not eligible: make one dimension wider
        kernel[draw(st.integers(0, nd - 1))] = draw(st.integers(2, max_k))
    strides = draw(st.lists(st.integers(1, 3 if nd < 3 else 2), min_size=nd, max_size=nd))
    dilations = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    pad_mode = draw(st.sampled_from(["explicit", "explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "group": group}
    if pad_mode == "explicit":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    else:
        attrs["auto_pad"] = pad_mode
        if pad_mode != "VALID":  # onnxruntime: "Dilation not supported for AutoPadType::SAME_*"
            attrs["dilations"] = dilations = [1] * nd
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    spatial = [e + draw(st.integers(0, 4 if nd < 3 else 2)) for e in extent]
    batch = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return {"nd": nd, "group": group, "m": mg * group, "n": ng * group, "kernel": kernel,
            "spatial": spatial, "batch": batch, "bias": bias, "attrs": attrs, "seed": seed}


def build_case(case, metadata=None):
    rng = np.random.default_rng(case["seed"])
    w = rng.standard_normal((case["n"], case["m"] // case["group"], *case["kernel"])).astype(np.float32)
    b = rng.standard_normal(case["n"]).astype(np.float32) if case["bias"] else None
    x_shape = [case["batch"], case["m"], *case["spatial"]]
    x = rng.standard_normal(x_shape).astype(np.float32)
    return conv_model(x_shape, w, b, metadata=metadata, **case["attrs"]), x, w


@property_settings(30)
@given(conv_cases())
def test_full_rank_is_exact_in_both_orientations(case):
    metadata = {"author": "tests", "training_run": "42"}
    model, x, w = build_case(case, metadata)
    (expected,) = run(model, {"x": x})
    for orientation in ("dw-first", "pw-first"):
        result = rewrite(model, rank="full", allow_increase=True, orientation=orientation, form="native")
        new = result.model
        # the single Conv became two Convs, in the requested orientation, at the exact rank
        assert [layer.name for layer in result.layers] == ["conv"]
        layer = result.layers[0]
        assert layer.orientation == orientation
        n, mg, k = case["n"], case["m"] // case["group"], math.prod(case["kernel"])
        rows = n // case["group"] if orientation == "dw-first" else mg
        assert layer.rank == min(rows, k)
        assert layer.rel_error < 1e-6
        convs = conv_nodes(new)
        assert len(convs) == 2 and len(new.graph.node) == 2
        groups = [next((a.i for a in c.attribute if a.name == "group"), 1) for c in convs]
        if orientation == "dw-first":
            assert groups == [case["m"], case["group"]]
        else:
            assert groups == [case["group"], case["n"]]
        # numerically the same conv
        (got,) = run(new, {"x": x})
        assert got.shape == expected.shape
        assert rel_l2(expected, got) < 1e-5, (orientation, case)
        # output-model guarantees
        onnx.checker.check_model(new, full_check=True)
        assert [i.name for i in new.graph.input] == ["x"]
        assert [o.name for o in new.graph.output] == ["y"]
        assert [(o.domain, o.version) for o in new.opset_import] == [("", OPSET)]
        assert new.ir_version == model.ir_version
        props = {p.key: p.value for p in new.metadata_props}
        assert props["author"] == "tests" and props["training_run"] == "42"
        assert props["sepify.version"] == __version__
        # the source model object is untouched
        assert len(model.graph.node) == 1 and model.graph.node[0].op_type == "Conv"


@st.composite
def non_eligible_cases(draw):
    """Depthwise convs (group == C_in, any channel multiplier) and 1x1 convs."""
    nd = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["depthwise", "pointwise"]))
    if kind == "depthwise":
        m = draw(st.integers(2, 4))
        group, n = m, m * draw(st.integers(1, 3))
        kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
        kernel[0] = max(kernel[0], 2)
    else:
        group = draw(st.sampled_from([1, 2]))
        m, n = group * draw(st.integers(2, 3)), group * draw(st.integers(1, 3))
        kernel = [1] * nd
    spatial = [draw(st.integers(3, 5)) for _ in range(nd)]
    return kind, {"nd": nd, "group": group, "m": m, "n": n, "kernel": kernel, "spatial": spatial, "batch": 1,
                  "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
                  "attrs": {"kernel_shape": kernel, "group": group, "pads": [1 if k > 1 else 0 for k in kernel] * 2}}


@property_settings(8)
@given(non_eligible_cases())
def test_depthwise_and_pointwise_convs_are_skipped_with_a_reason(kind_case):
    kind, case = kind_case
    model, x, _ = build_case(case)
    result = rewrite(model, rank="full", allow_increase=True, orientation="auto")
    assert result.layers == []
    expected_reason = "already depthwise" if kind == "depthwise" else "1x1"
    assert [s["name"] for s in result.report["skipped"]] == ["conv"]
    assert expected_reason in result.report["skipped"][0]["reason"]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 2. ONNX conformance models

CONFORMANCE_DIR = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "pytorch-converted"
CONFORMANCE = sorted(p for p in glob.glob(str(CONFORMANCE_DIR / "test_Conv*")) if "Transpose" not in os.path.basename(p))


def test_conformance_models_are_present():
    # guards the parametrization below against an empty glob (e.g. an onnx wheel without test data)
    names = {os.path.basename(p) for p in CONFORMANCE}
    assert {"test_Conv1d", "test_Conv2d_groups", "test_Conv3d_dilated_strided", "test_Conv2d_depthwise"} <= names
    assert len(CONFORMANCE) >= 20


@pytest.mark.parametrize("case_dir", CONFORMANCE, ids=[os.path.basename(p) for p in CONFORMANCE])
def test_conformance_conv_models_reproduce_reference_outputs(case_dir):
    model_path = os.path.join(case_dir, "model.onnx")
    x = numpy_helper.to_array(onnx.load_tensor(os.path.join(case_dir, "test_data_set_0", "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(os.path.join(case_dir, "test_data_set_0", "output_0.pb")))
    original = onnx.load(model_path)
    n_convs = len(conv_nodes(original))
    assert n_convs == 1

    result = rewrite(model_path, rank="full", allow_increase=True)
    new = result.model
    if "depthwise" in os.path.basename(case_dir):
        assert result.layers == []
        assert len(result.report["skipped"]) == 1
        assert "already depthwise" in result.report["skipped"][0]["reason"]
        assert len(conv_nodes(new)) == 1
    else:
        assert len(result.layers) == 1 and result.skipped == []
        assert result.layers[0].rel_error < 1e-6
        # the default "fast" form of a dw-first rank-r pair: r multiplier-1 depthwise convs + pointwise
        r = result.layers[0].rank
        assert len(conv_nodes(new)) == (r + 1 if r > 1 else 2)
        assert result.layers[0].form == ("split" if r > 1 else "native")
    onnx.checker.check_model(new, full_check=True)
    sess = session(new)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    assert rel_l2(expected, got) < 1e-5


# --------------------------------------------------------------------------- 3. Conv MobileNet -> MobileNet


@pytest.fixture(scope="module")
def conv_mobilenet():
    return make_samples.mobilenet_v1(conv_only=True)


def test_conv_mobilenet_at_rank_1_costs_exactly_mobilenet_v1(conv_mobilenet):
    result = rewrite(conv_mobilenet, rank=1, exclude=["^conv1$"])
    totals = result.report["totals"]
    # Conv MobileNet (Howard et al. 2017, Table 4: 4866M mult-adds, 29.3M params), hand count
    assert totals["before"]["macs"] == 4_867_293_184
    assert totals["before"]["params"] == 29_282_120
    # MobileNet (Table 4: 569M mult-adds, 4.2M params), hand count of Table 1
    assert totals["after"]["macs"] == 568_740_352
    assert totals["after"]["params"] == 4_210_088
    assert round(totals["after"]["macs"] / 1e6) == 569 and round(totals["after"]["params"] / 1e5) == 42
    assert [layer.name for layer in result.layers] == [f"block{k}.conv" for k in range(1, 14)]
    assert all(layer.rank == 1 and layer.orientation == "dw-first" for layer in result.layers)
    assert [(s.name, s.reason) for s in result.skipped] == [("conv1", "excluded by --exclude")]
    # every block is now a depthwise 3x3 (group = C_in) followed by a 1x1 (group 1), as in Table 1
    convs = conv_nodes(result.model)
    assert len(convs) == 1 + 2 * 13
    groups = [next((a.i for a in c.attribute if a.name == "group"), 1) for c in convs]
    c_in = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024]
    assert groups == [1] + [g for c in c_in for g in (c, 1)]


def test_conv_mobilenet_with_every_eligible_conv_at_rank_1(conv_mobilenet):
    result = rewrite(conv_mobilenet, rank=1)
    # conv1 (3 -> 32, 3x3, stride 2, 112x112 outputs) also becomes a rank-1 pair:
    conv1_before = 112 * 112 * 32 * 3 * 9  # 10,838,016
    conv1_after = 112 * 112 * (3 * 1 * 9 + 32 * 3 * 1)  # depthwise 3x9 + pointwise 32x3 per position: 1,542,912
    assert (conv1_before, conv1_after) == (10_838_016, 1_542_912)
    assert result.report["totals"]["after"]["macs"] == 568_740_352 - 10_838_016 + 1_542_912 == 559_445_248
    assert result.report["totals"]["after"]["params"] == 4_210_088 - 864 + (27 + 96)
    assert result.skipped == []


# --------------------------------------------------------------------------- 4. worked example


def test_worked_example_at_rank_1():
    result = rewrite(make_samples.worked_example(separable=False), rank=1)
    totals = result.report["totals"]
    assert totals["before"]["macs"] == 8 * 8 * 256 * 3 * 5 * 5 == 1_228_800
    assert totals["after"]["macs"] == 8 * 8 * 3 * 5 * 5 + 8 * 8 * 3 * 256 == 4_800 + 49_152 == 53_952
    assert totals["before"]["params"] == 19_200 and totals["after"]["params"] == 75 + 768
    (layer,) = result.layers
    assert (layer.macs_before, layer.macs_after, layer.rank, layer.max_rank) == (1_228_800, 53_952, 1, 25)
    # the same structure as the hand-built separable sample
    weights = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    dw, pw = conv_nodes(result.model)
    assert weights[dw.input[1]] == (3, 1, 5, 5) and weights[pw.input[1]] == (256, 3, 1, 1)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dw.attribute}["group"] == 3
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dw.attribute}["pads"] == [2, 2, 2, 2]
    # energy / error of the layer agree with a direct SVD of the three 256x25 slices
    w = numpy_helper.to_array(make_samples.worked_example(separable=False).graph.initializer[0])
    energy = naive_energy(w, 1, "dw-first", 1)
    assert layer.energy == pytest.approx(energy, abs=1e-9)
    assert layer.rel_error == pytest.approx(math.sqrt(1 - energy), abs=1e-9)


def test_mobilenet_paper_table_3_layer():
    # Howard et al. 2017, Table 3: a 14x14x512 -> 512, 3x3 layer: 462M -> 52.3M mult-adds, 2.36M -> 0.27M params
    w = np.random.default_rng(0).standard_normal((512, 512, 3, 3)).astype(np.float32)
    result = rewrite(conv_model([1, 512, 14, 14], w, kernel_shape=[3, 3], pads=[1, 1, 1, 1]), rank=1)
    (layer,) = result.layers
    assert layer.macs_before == 14 * 14 * 512 * 512 * 9 == 462_422_016
    assert layer.macs_after == 14 * 14 * (512 * 9 + 512 * 512) == 52_283_392
    assert (layer.params_before, layer.params_after) == (2_359_296, 512 * 9 + 512 * 512)
    assert round(layer.macs_after / 1e5) == 523 and round(layer.params_after / 1e4) == 27


# --------------------------------------------------------------------------- 5. rank selection

# tiny_cnn's eligible convs, by hand (samples/README.md): N, M, K = prod(kernel), P_out
TINY = {
    "conv1": dict(n=16, m=3, k=9, p_out=32 * 32),
    "conv2": dict(n=32, m=16, k=9, p_out=15 * 15),
    "conv4": dict(n=32, m=32, k=15, p_out=6 * 6),
}
TINY_TOTAL = 2_254_176
TINY_NOT_REWRITTEN = 48_672 + 173_056 + 320  # block3.dw + block3.pw + fc
# dw-first MACs per unit of rank: (M*K + N*M) * P_out (groups are 1)
TINY_STEP = {name: (g["m"] * g["k"] + g["n"] * g["m"]) * g["p_out"] for name, g in TINY.items()}
TINY_ORIGINAL = {name: g["n"] * g["m"] * g["k"] * g["p_out"] for name, g in TINY.items()}
TINY_MAX_RANK = {name: min(g["n"], g["k"]) for name, g in TINY.items()}


def test_tiny_cnn_hand_counts():
    assert TINY_STEP == {"conv1": 75 * 1024, "conv2": 656 * 225, "conv4": 1504 * 36}
    assert TINY_ORIGINAL == {"conv1": 442_368, "conv2": 1_036_800, "conv4": 552_960}
    assert TINY_NOT_REWRITTEN + sum(TINY_ORIGINAL.values()) == TINY_TOTAL


RANK1_EVERYWHERE = TINY_NOT_REWRITTEN + sum(TINY_STEP.values())  # 222,048 + 278,544 = 500,592


@pytest.mark.parametrize("budget", [RANK1_EVERYWHERE, 650_000, 1_200_000, 1_800_000, TINY_TOTAL - 1])
def test_target_macs_reaches_the_budget_within_one_rank_step(budget):
    assert RANK1_EVERYWHERE == 500_592
    result = rewrite(make_samples.tiny_cnn(), target_macs=budget)
    after = result.report["totals"]["after"]["macs"]
    assert after <= budget
    rewritten = {layer.name for layer in result.layers}
    kept = set(TINY) - rewritten  # a conv the budget lets keep its original cost (no error)
    assert rewritten <= set(TINY)
    assert all(skipped(result)[name] == "kept: the budget is met without rewriting it" for name in kept)
    for layer in result.layers:
        assert layer.orientation == "dw-first"
        assert layer.macs_after == layer.rank * TINY_STEP[layer.name]
        next_cost = (layer.rank + 1) * TINY_STEP[layer.name]
        at_max = layer.rank == TINY_MAX_RANK[layer.name] or next_cost >= TINY_ORIGINAL[layer.name]
        assert at_max or after + TINY_STEP[layer.name] > budget, (layer.name, layer.rank, after, budget)
        # nor could it keep its original Conv (rank < max: its factorization loses something)
        if layer.rank < TINY_MAX_RANK[layer.name]:
            assert after - layer.macs_after + TINY_ORIGINAL[layer.name] > budget, (layer.name, after, budget)
    assert after == (TINY_NOT_REWRITTEN + sum(layer.macs_after for layer in result.layers)
                     + sum(TINY_ORIGINAL[name] for name in kept))
    if budget < RANK1_EVERYWHERE + min(TINY_ORIGINAL[n] - TINY_STEP[n] for n in TINY):
        assert not kept  # no original fits beside the others at rank 1
    if budget >= TINY_TOTAL - TINY_ORIGINAL["conv2"] + TINY_STEP["conv2"]:
        assert kept  # room for at least one original


def test_target_ratio_is_a_fraction_of_the_original_total():
    result = rewrite(make_samples.tiny_cnn(), target_ratio=0.5)
    after = result.report["totals"]["after"]["macs"]
    assert after <= TINY_TOTAL * 0.5
    for layer in result.layers:
        next_cost = (layer.rank + 1) * TINY_STEP[layer.name]
        at_max = layer.rank == TINY_MAX_RANK[layer.name] or next_cost >= TINY_ORIGINAL[layer.name]
        assert at_max or after + TINY_STEP[layer.name] > TINY_TOTAL * 0.5


@pytest.mark.parametrize("options", [{"target_macs": TINY_TOTAL}, {"target_macs": 10**9}, {"target_ratio": 1.0}])
def test_budget_the_original_already_meets_rewrites_nothing(options):
    # keeping a conv costs no weight error; rewriting it would only lose accuracy
    result = rewrite(make_samples.tiny_cnn(), **options)
    assert result.layers == []
    assert result.report["totals"]["after"]["macs"] == TINY_TOTAL
    reasons = skipped(result)
    assert all(reasons[name] == "kept: the budget is met without rewriting it" for name in TINY)


@pytest.mark.parametrize("budget", [RANK1_EVERYWHERE - 1, 300_000, 100_000])
def test_unreachable_budget_raises_budget_error(budget):
    with pytest.raises(BudgetError, match=r"cannot be reached") as info:
        rewrite(make_samples.tiny_cnn(), target_macs=budget)
    assert f"{budget:,}" in str(info.value)
    if budget >= TINY_NOT_REWRITTEN:
        assert "500,592" in str(info.value)  # the least the model can cost


def folded_tiny_weights() -> dict[str, tuple[np.ndarray, int]]:
    """tiny_cnn's conv weights; conv1 with bn1 folded in by hand: W * gamma / sqrt(var + eps)."""
    model = make_samples.tiny_cnn()
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    s = init["bn1.scale"] / np.sqrt(init["bn1.var"] + 1e-5)
    return {"conv1": init["conv1.weight"] * s[:, None, None, None],
            "conv2": init["conv2.weight"], "conv4": init["conv4.weight"]}


@pytest.mark.parametrize("orientation", ["dw-first", "pw-first", "auto"])
def test_energy_picks_the_smallest_rank_keeping_the_fraction(orientation):
    weights = folded_tiny_weights()
    result = rewrite(make_samples.tiny_cnn(), energy=0.9, orientation=orientation, allow_increase=True)
    assert sorted(layer.name for layer in result.layers) == sorted(weights)
    for layer in result.layers:
        w = weights[layer.name]
        kept = naive_energy(w, 1, layer.orientation, layer.rank)
        assert kept >= 0.9 - 1e-12
        assert layer.energy == pytest.approx(kept, abs=1e-6)  # conv1's folded kernel is float32
        if layer.rank > 1:
            assert naive_energy(w, 1, layer.orientation, layer.rank - 1) < 0.9
        if orientation != "auto":
            assert layer.orientation == orientation


@pytest.mark.parametrize("orientation", ["dw-first", "pw-first", "auto"])
def test_max_error_picks_the_smallest_rank_within_the_bound(orientation):
    weights = folded_tiny_weights()
    bound = 0.3
    result = rewrite(make_samples.tiny_cnn(), max_error=bound, orientation=orientation, allow_increase=True)
    assert sorted(layer.name for layer in result.layers) == sorted(weights)
    for layer in result.layers:
        w = weights[layer.name]
        err = math.sqrt(max(0.0, 1 - naive_energy(w, 1, layer.orientation, layer.rank)))
        assert err <= bound + 1e-12
        assert layer.rel_error == pytest.approx(err, abs=1e-6)
        if layer.rank > 1:
            assert math.sqrt(1 - naive_energy(w, 1, layer.orientation, layer.rank - 1)) > bound


def _rank1_per_output_channel_conv(n: int, m: int):
    """A 3x3 Conv m -> n whose kernel W[o] is rank 1 (an outer product) for every output o."""
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal((n, m)), rng.standard_normal((n, 9))
    w = np.einsum("nm,nk->nmk", u, v).reshape(n, m, 3, 3)
    return w, conv_model([1, m, 8, 8], w, pads=[1, 1, 1, 1], kernel_shape=[3, 3])


def test_auto_orientation_reports_the_one_it_chose():
    # a kernel that is exactly rank 1 per output channel (pw-first) but not per input channel
    # (dw-first). With N=5 < M=6, rank-1 pw-first costs N·M + N·9 = 75 MACs per position and
    # dw-first M·9 + N·M = 84, so pw-first is both within the budget and exact.
    rng = np.random.default_rng(3)
    n, m = 5, 6
    w, model = _rank1_per_output_channel_conv(n, m)
    result = rewrite(model, rank=1, orientation="auto")
    (layer,) = result.layers
    assert layer.orientation == "pw-first"
    assert layer.rel_error < 1e-6
    assert naive_energy(w, 1, "dw-first", 1) < 0.99  # dw-first would lose energy
    x = rng.standard_normal((1, m, 8, 8)).astype(np.float32)
    assert rel_l2(run(model, {"x": x})[0], run(result.model, {"x": x})[0]) < 1e-5
    assert result.report["layers"][0]["orientation"] == "pw-first"


# --------------------------------------------------------------------------- 6. BatchNormalization folding


def conv_bn_model(constant_stats: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 6), rng.normal(0, 0.5, 6)
    mean, var = rng.normal(0, 0.5, 6), rng.uniform(0.2, 2, 6)
    stats = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 7])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    for name, value in stats.items():
        if name == "mean" and not constant_stats:
            inputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [6]))
        else:
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[1, 2]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "conv_bn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_batchnorm_is_folded_and_full_rank_is_exact():
    model = conv_bn_model()
    x = np.random.default_rng(0).standard_normal((2, 4, 9, 7)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    for orientation in ("dw-first", "pw-first"):
        result = rewrite(model, rank="full", allow_increase=True, form="native", orientation=orientation)
        assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "Relu"]
        (layer,) = result.report["layers"]
        assert layer["name"] == "conv" and layer["folded_batchnorm"] == "bn"
        assert rel_l2(expected, run(result.model, {"x": x})[0]) < 1e-5
        onnx.checker.check_model(result.model, full_check=True)


def test_rank_1_factorizes_the_folded_kernel():
    model = conv_bn_model()
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    folded = init["W"] * (init["gamma"] / np.sqrt(init["var"] + 1e-3))[:, None, None, None]
    result = rewrite(model, rank=1)
    (layer,) = result.layers
    assert layer.folded_batchnorm == "bn"
    # the folded kernel is stored in float32, hence 1e-6
    assert layer.energy == pytest.approx(naive_energy(folded, 1, "dw-first", 1), abs=1e-6)
    assert layer.energy != pytest.approx(naive_energy(init["W"], 1, "dw-first", 1), abs=1e-3)


def test_batchnorm_with_non_constant_statistics_is_kept():
    model = conv_bn_model(constant_stats=False)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 4, 9, 7)).astype(np.float32), "mean": rng.standard_normal(6).astype(np.float32)}
    result = rewrite(model, rank="full", allow_increase=True, form="native")
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "BatchNormalization", "Relu"]
    assert result.layers[0].folded_batchnorm is None
    assert rel_l2(run(model, feeds)[0], run(result.model, feeds)[0]) < 1e-5


def test_no_fold_batchnorm_option_keeps_the_batchnorm():
    result = rewrite(conv_bn_model(), rank=1, fold_batchnorm=False)
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
    assert result.layers[0].folded_batchnorm is None


# --------------------------------------------------------------------------- 7. eligibility reasons


def skipped(result) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in result.report["skipped"]}


def test_weight_that_is_a_graph_input_is_skipped():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = conv_model([1, 3, 8, 8], w, weight_as_input=True, kernel_shape=[3, 3])
    result = rewrite(model, rank=1)
    assert result.layers == []
    assert skipped(result) == {"conv": "weight is not a constant"}
    assert [i.name for i in result.model.graph.input] == ["x", "W"]


def test_include_and_exclude_patterns():
    tiny = make_samples.tiny_cnn()
    result = rewrite(tiny, rank=1, include=[r"^conv[12]$"], exclude=["conv1"])
    assert [layer.name for layer in result.layers] == ["conv2"]
    reasons = skipped(result)
    assert reasons["conv1"] == "excluded by --exclude"
    assert reasons["conv4"] == "not matched by --include"
    # include is checked first: the depthwise/1x1 convs are reported as not included
    assert reasons["block3.dw"] == "not matched by --include"
    assert set(reasons) == {"conv1", "conv4", "block3.dw", "block3.pw"}
    assert result.report["totals"]["rewritten"] == 1 and result.report["totals"]["skipped"] == 4


def test_no_saving_without_allow_increase():
    # 8 -> 8, 3x3: the exact dw-first rank is min(8, 9) = 8, costing (8*8*9 + 8*8*8) = 1088 MACs per
    # position against 8*8*9 = 576 for the original conv.
    w = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32)
    model = conv_model([1, 8, 6, 6], w, kernel_shape=[3, 3])  # 4x4 outputs
    result = rewrite(model, rank="full")
    assert result.layers == []
    reason = skipped(result)["conv"]
    assert reason.startswith("no saving at rank 8") and "--allow-increase" in reason
    assert f"{1088 * 16:,}" in reason and f"{576 * 16:,}" in reason
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.report["totals"]["after"]["macs"] == 576 * 16

    forced = rewrite(model, rank="full", allow_increase=True)
    assert forced.report["totals"]["after"]["macs"] == 1088 * 16
    # rank 4 saves: (8*4*9 + 8*8*4) = 544 < 576
    assert rewrite(model, rank=4).report["totals"]["after"]["macs"] == 544 * 16
    assert "no saving at rank 5" in skipped(rewrite(model, rank=5))["conv"]  # 680 > 576


def test_options_object_and_bad_options():
    from sepify.errors import UsageError

    tiny = make_samples.tiny_cnn()
    result = rewrite(tiny, RewriteOptions(rank=2, orientation="pw-first"))
    assert {layer.rank for layer in result.layers} == {2}
    with pytest.raises(UsageError):
        rewrite(tiny, rank=1, energy=0.9)
    with pytest.raises(UsageError):
        rewrite(tiny, rank=0)
    with pytest.raises(UsageError):
        rewrite(tiny, exclude=["("])


def test_node_names_are_unique_and_derived_from_the_original():
    # two Convs with the same (legal but unhelpful) name, and an unnamed one
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (4, 3, 3, 3)), ("W2", (5, 4, 3, 3)), ("W3", (6, 5, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h1"], name="c", pads=[1] * 4),
             helper.make_node("Conv", ["h1", "W2"], ["h2"], name="c", pads=[1] * 4),
             helper.make_node("Conv", ["h2", "W3"], ["y"], pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    result = rewrite(model, rank="full", allow_increase=True, form="native")
    assert len(result.layers) == 3
    names = [n.name for n in result.model.graph.node]
    assert len(set(names)) == 6 and names[:2] == ["c/depthwise", "c/pointwise"]
    inits_out = [i.name for i in result.model.graph.initializer]
    assert len(set(inits_out)) == len(inits_out)
    # the result runs (onnxruntime refuses duplicate node names, so give the reference unique ones)
    model.graph.node[1].name = "c_second"
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert rel_l2(run(model, {"x": x})[0], run(result.model, {"x": x})[0]) < 1e-5


# --------------------------------------------------------------------------- 9. external data


def test_external_data_model_stays_external(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    model = conv_model([1, 8, 10, 10], w, b, kernel_shape=[3, 3], pads=[1, 1, 1, 1], metadata={"k": "v"})
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "model.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    (expected,) = run(src, {"x": x})

    result = rewrite(src, rank="full", allow_increase=True)
    assert result.external_data
    out = tmp_path / "out" / "model.sep.onnx"
    out.parent.mkdir()
    result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.sep.onnx", "model.sep.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    assert {p.key: p.value for p in header.metadata_props}["k"] == "v"
    assert rel_l2(expected, run(out, {"x": x})[0]) < 1e-5
    # the source files are untouched
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before
    with pytest.raises(Exception, match="refusing to overwrite"):
        result.save(src)
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before


def _two_conv_external_model(tmp_path, rng):
    """``a`` (3x3, 16 -> 512, rewritable) then ``b`` (1x1, 512 -> 512: a 1 MiB weight), saved
    with every tensor in ``src/m.onnx.data``. Returns (path, b's weight)."""
    wa = rng.standard_normal((512, 16, 3, 3)).astype(np.float32) / 12
    wb = rng.standard_normal((512, 512, 1, 1)).astype(np.float32) / 23
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wa"], ["h"], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["h", "Wb"], ["y"], name="b", kernel_shape=[1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512, 6, 6])],
        [numpy_helper.from_array(wa, "Wa"), numpy_helper.from_array(wb, "Wb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "m.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return src, wb


def test_external_data_left_untouched_is_streamed_not_loaded(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    src, wb = _two_conv_external_model(tmp_path, rng)
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    (expected,) = run(src, {"x": x})
    result = rewrite(src, include=["^a$"], rank="full", allow_increase=True)
    assert [layer.name for layer in result.layers] == ["a"]
    # the untouched weight still references the source's data file: its bytes were never read
    kept = next(t for t in result.model.graph.initializer if t.name == "Wb")
    assert kept.data_location == TensorProto.EXTERNAL and not kept.HasField("raw_data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    for _ in range(2):  # twice over the same output, from its folder (onnx.save_model refused: "file exists")
        result.save("m.sep.onnx")
    header = onnx.load("m.sep.onnx", load_external_data=False)
    b = next(t for t in header.graph.initializer if t.name == "Wb")
    info = {e.key: e.value for e in b.external_data}
    # the data file names alternate between saves (m.sep.onnx.data, m.sep.onnx.alt.data) so that a
    # save never overwrites the data the previous model reads; the previous one is removed
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["m.sep.onnx", info["location"]])
    assert info["location"] in ("m.sep.onnx.data", "m.sep.onnx.alt.data")
    assert int(info["offset"]) % 65536 == 0  # 1 MiB: aligned
    with open(info["location"], "rb") as f:
        f.seek(int(info["offset"]))
        assert f.read(int(info["length"])) == wb.tobytes()
    onnx.checker.check_model("m.sep.onnx", full_check=True)
    assert rel_l2(expected, run(out_dir / "m.sep.onnx", {"x": x})[0]) < 1e-5
    # save() left the in-memory model as it was
    assert kept.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in kept.external_data}["location"] == "m.onnx.data"
    assert all(t.HasField("raw_data") for t in result.model.graph.initializer if t.name != "Wb")


def test_external_references_of_an_in_memory_model_cannot_be_saved(tmp_path, monkeypatch):
    from sepify.errors import UsageError

    src, _ = _two_conv_external_model(tmp_path, np.random.default_rng(8))
    header = onnx.load(str(src), load_external_data=False)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    result = rewrite(header, rank=1)
    with pytest.raises(UsageError, match="not read from a file"):
        result.save(tmp_path / "out" / "o.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_save_model_copies_external_attribute_tensors(tmp_path):
    from sepify.fileio import save_model

    value = np.arange(600, dtype=np.float32).reshape(20, 30)
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(value, "c"))
    graph = helper.make_graph([const, helper.make_node("Add", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20, 30])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [20, 30])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    (tmp_path / "src").mkdir()
    onnx.save_model(model, str(tmp_path / "src" / "c.onnx"), save_as_external_data=True, location="c.bin",
                    size_threshold=0, convert_attribute=True)
    header = onnx.load(str(tmp_path / "src" / "c.onnx"), load_external_data=False)
    assert header.graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    assert save_model(header, tmp_path / "c2.onnx", source=tmp_path / "src" / "c.onnx")  # external: detected
    saved = onnx.load(str(tmp_path / "c2.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(saved.graph.node[0].attribute[0].t), value)


def test_save_is_atomic_and_refuses_the_input(tmp_path):
    src = tmp_path / "tiny.onnx"
    src.write_bytes(make_samples.tiny_cnn().SerializeToString())
    data = src.read_bytes()
    result = rewrite(src, rank=1)
    with pytest.raises(Exception, match="refusing to overwrite"):
        result.save(tmp_path / "." / "tiny.onnx")
    assert src.read_bytes() == data
    result.save(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "tiny.onnx"]
    assert src.read_bytes() == data
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_auto_orientation_never_costs_more_than_the_cheaper_fixed_orientation():
    # N=6 > M=5: rank-1 pw-first (exact here) costs 6·5 + 6·9 = 84 MACs per position, dw-first
    # 5·9 + 6·5 = 75. auto keeps the layer within 75 per position, so it takes dw-first.
    n, m = 6, 5
    w, model = _rank1_per_output_channel_conv(n, m)
    result = rewrite(model, rank=1, orientation="auto")
    (layer,) = result.layers
    assert layer.orientation == "dw-first"
    assert layer.macs_after == (m * 9 + n * m) * 64
    assert layer.rel_error == pytest.approx(math.sqrt(max(0.0, 1 - naive_energy(w, 1, "dw-first", 1))), abs=1e-6)


def test_top_level_api_is_the_rewrite_function():
    import sepify

    result = sepify.rewrite(make_samples.worked_example(), rank=1)
    assert isinstance(result.model, onnx.ModelProto)
    # 8·8·5·5·3 depthwise + 8·8·3·256 pointwise
    assert result.report["totals"]["after"]["macs"] == 8 * 8 * 5 * 5 * 3 + 8 * 8 * 3 * 256
