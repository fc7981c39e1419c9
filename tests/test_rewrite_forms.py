"""Graph forms of a rank-r pair (native / split / tiled, sepify.rewrite.emit).

Expected values are onnxruntime's outputs of the ORIGINAL conv (full rank: every form is exact)
and of the native form (any rank: the forms are permutations of the same function). The
structure checked is the point of the forms: every depthwise conv of split/tiled has one input
and one output channel per group (onnxruntime's NCHWc depthwise kernel takes only those).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sepify.errors import UsageError
from sepify.rewrite.pipeline import rewrite
from test_rewrite import build_case, conv_cases, conv_nodes, property_settings, rel_l2, run


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _check_structure(model, case, orientation: str, form: str, rank: int) -> None:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    convs = conv_nodes(model)
    spatial = [c for c in convs if math.prod(inits[c.input[1]][2:]) > 1 or c.name.endswith(("depthwise", "spatial"))
               or "/depthwise_" in c.name or "/spatial_" in c.name]
    m, n, g = case["m"], case["n"], case["group"]
    if form == "native" or rank == 1:
        assert len(convs) == 2
        return
    if orientation == "dw-first":
        expected = rank if form == "split" else 1
        channels = m if form == "split" else m * rank
    else:
        expected = rank if form == "split" else 1
        channels = n if form == "split" else n * rank
    pointwise = rank if (orientation, form) == ("pw-first", "split") else 1
    assert len(spatial) == expected and len(convs) == expected + pointwise
    for c in spatial:  # multiplier 1: one input and one output channel per group
        w = inits[c.input[1]]
        assert _group(c) == channels and w[0] == channels and w[1] == 1
    ops = [nd.op_type for nd in model.graph.node]
    if orientation == "dw-first":
        assert ops.count("Concat") == 1 and ops.count("Split") == (rank if form == "split" else 1) * (g > 1)
    elif form == "split":  # no Split (onnxruntime's NCHWc layout has none): r - 1 binary Adds
        assert ops.count("Add") == rank - 1 and "Split" not in ops and "Sum" not in ops
    else:
        assert "Sum" in ops


@property_settings(25)
@given(conv_cases(), st.sampled_from(["dw-first", "pw-first"]), st.sampled_from(["split", "tiled"]))
def test_every_form_is_exact_at_full_rank(case, orientation, form):
    model, x, _ = build_case(case)
    (expected,) = run(model, {"x": x})
    result = rewrite(model, rank="full", allow_increase=True, orientation=orientation, form=form)
    (layer,) = result.layers
    n, mg, k = case["n"], case["m"] // case["group"], math.prod(case["kernel"])
    rank = min(n // case["group"] if orientation == "dw-first" else mg, k)
    assert layer.rank == rank and layer.form == (form if rank > 1 else "native")
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    onnx.shape_inference.infer_shapes(new, check_type=True, strict_mode=True, data_prop=True)
    _check_structure(new, case, orientation, form, rank)
    (got,) = run(new, {"x": x})
    assert got.shape == expected.shape
    assert rel_l2(expected, got) < 1e-5, (orientation, form, case)


@property_settings(12)
@given(conv_cases(), st.sampled_from(["dw-first", "pw-first"]))
def test_forms_compute_the_same_function_at_a_truncated_rank(case, orientation):
    model, x, _ = build_case(case)
    outs = {}
    for form in ("native", "split", "tiled"):
        result = rewrite(model, rank=2, allow_increase=True, orientation=orientation, form=form)
        (outs[form],) = run(result.model, {"x": x})
    ref = outs["native"]
    for form in ("split", "tiled"):
        assert np.abs(outs[form] - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max())), form


def test_forms_at_a_known_layer_shape():
    # 2 groups, 8 -> 6 channels, 3x3: dw-first at rank 2 (max rank min(Ng=3, K=9) = 3)
    case = {"nd": 2, "group": 2, "m": 8, "n": 6, "kernel": [3, 3], "spatial": [7, 6], "batch": 1, "bias": True,
            "attrs": {"kernel_shape": [3, 3], "group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1]}, "seed": 3}
    model, x, _ = build_case(case)
    split = rewrite(model, rank=2, form="split").model
    ops = [nd.op_type for nd in split.graph.node]
    # two multiplier-1 depthwise convs over the 8 channels, each split into its 2 groups, one
    # Concat in (group, filter, channel) order, then the 1x1 conv with group 2 over 16 channels
    assert sorted(ops) == ["Concat", "Conv", "Conv", "Conv", "Split", "Split"] and ops[-2:] == ["Concat", "Conv"]
    inits = {i.name: tuple(i.dims) for i in split.graph.initializer}
    assert [inits[c.input[1]] for c in conv_nodes(split)] == [(8, 1, 3, 3), (8, 1, 3, 3), (6, 8, 1, 1)]
    assert [_group(c) for c in conv_nodes(split)] == [8, 8, 2]
    tiled = rewrite(model, rank=2, form="tiled").model
    assert [nd.op_type for nd in tiled.graph.node] == ["Split", "Concat", "Conv", "Conv"]  # a chain: one order
    conv = conv_nodes(tiled)[0]
    assert _group(conv) == 16 and {i.name: tuple(i.dims) for i in tiled.graph.initializer}[conv.input[1]] == (16, 1, 3, 3)
    native = rewrite(model, rank=2).model
    (a,), (b,), (c,) = run(native, {"x": x}), run(split, {"x": x}), run(tiled, {"x": x})
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


def test_bad_form_is_a_usage_error():
    model, _, _ = build_case({"nd": 1, "group": 1, "m": 2, "n": 2, "kernel": [3], "spatial": [5], "batch": 1,
                              "bias": False, "attrs": {"kernel_shape": [3]}, "seed": 0})
    with pytest.raises(UsageError, match="--form"):
        rewrite(model, form="fastest")


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_split_nodes_follow_the_opset(opset):
    # Split takes "split" as an attribute before 13, as an input from 13, and needs num_outputs from 18
    case = {"nd": 2, "group": 2, "m": 4, "n": 4, "kernel": [3, 3], "spatial": [5, 5], "batch": 1, "bias": True,
            "attrs": {"kernel_shape": [3, 3], "group": 2, "pads": [1, 1, 1, 1]}, "seed": 4}
    model, x, _ = build_case(case)
    model.opset_import[0].version = opset
    onnx.checker.check_model(model, full_check=True)
    (expected,) = run(model, {"x": x})
    for orientation in ("dw-first", "pw-first"):
        for form in ("split", "tiled"):
            new = rewrite(model, rank="full", orientation=orientation, form=form, allow_increase=True).model
            onnx.checker.check_model(new, full_check=True)
            assert [o.version for o in new.opset_import] == [opset]
            assert rel_l2(expected, run(new, {"x": x})[0]) < 1e-5
