"""The ``ai.onnx.ml`` operators (scikit-learn models converted by skl2onnx and the like): one
small model per rule, built here with onnx.helper, the expected numbers worked out by hand from
the formulas of docs/conventions.md ("Classical ML operators"). Each model also runs in
onnxruntime, so the attributes are ones a runtime accepts, and where sepify gives an output a
shape (the ops ONNX has no shape inference for) it is the shape onnxruntime returns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify

ML = "ai.onnx.ml"


def ml_model(nodes, inputs, outputs, inits=(), ml_opset=3, opset=17):
    """``inputs``/``outputs``: (name, elem type, shape) or ValueInfoProto; shape None: rank unknown."""
    def vi(spec):
        return spec if isinstance(spec, onnx.ValueInfoProto) else helper.make_tensor_value_info(*spec)

    graph = helper.make_graph(nodes, "ml", [vi(i) for i in inputs], [vi(o) for o in outputs], initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ML, ml_opset)],
                             ir_version=10 if ml_opset >= 5 else 8)


def ort_run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def x(n, c, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c)).astype(np.float32)


# --- a skl2onnx MLP: Scaler, then a Cast and MatMuls whose shapes ONNX inference lost --------
def test_scaler_mlp_is_costed_through_the_scaler():
    """skl2onnx's MLPRegressor: Scaler -> Cast -> MatMul -> Add -> Relu -> MatMul -> Add over
    X [N, 4]. ONNX has no shape inference for Scaler: every node after it was unknown (9 of
    the 11 nodes of the surfaces-onnx-files models)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal((1, 8)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Scaler", ["x"], ["s"], name="scaler", domain=ML, offset=[1.0] * 4, scale=[0.5] * 4),
             helper.make_node("Cast", ["s"], ["c"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["c", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    m = ml_model(nodes, [("x", TensorProto.FLOAT, ["N", 4])], [("y", TensorProto.FLOAT, ["N", 1])], [w1, b1, w2])
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.layer("scaler").flops == 2 * 4  # (x - offset) * scale, per element (N = 1)
    assert a.layer("scaler").output_shapes == [["N", 4]]
    assert a.layer("mm1").macs == 4 * 8 and a.layer("mm2").macs == 8
    assert a.totals.macs == 40 and a.totals.macs_formula == "40·N"
    b = sepify.analyze(m, dims={"N": 3})
    assert b.totals.macs == 3 * 40
    assert b.layer("relu").output_shapes == [[3, 8]]
    assert ort_run(m, {"x": x(3, 4)})[0].shape == (3, 1)


# --- linear models ----------------------------------------------------------------------------
def test_linear_regressor():
    # 2 targets over C = 3 features: coefficients 2 x 3; intercepts; X [5, 3]
    node = helper.make_node("LinearRegressor", ["x"], ["y"], name="lin", domain=ML, targets=2,
                            coefficients=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], intercepts=[1.0, -1.0])
    m = ml_model([node], [("x", TensorProto.FLOAT, [5, 3])], [("y", TensorProto.FLOAT, [None, None])])
    a = sepify.analyze(m)
    lin = a.layer("lin")
    assert lin.macs == 5 * 6 == 30  # N x targets x C
    assert lin.flops == 2 * 30 + 5 * 2 == 70  # + one intercept add per target per sample
    assert lin.output_shapes == [list(ort_run(m, {"x": x(5, 3)})[0].shape)] == [[5, 2]]


def test_linear_classifier_softmax():
    # 3 classes over C = 4: coefficients 3 x 4, intercepts, SOFTMAX; X [2, 4]
    node = helper.make_node("LinearClassifier", ["x"], ["label", "scores"], name="lin", domain=ML,
                            coefficients=[float(i) / 10 for i in range(12)], intercepts=[0.1, 0.2, 0.3],
                            classlabels_ints=[0, 1, 2], post_transform="SOFTMAX")
    m = ml_model([node], [("x", TensorProto.FLOAT, [2, 4])],
                 [("label", TensorProto.INT64, [2]), ("scores", TensorProto.FLOAT, [2, 3])])
    lin = sepify.analyze(m).layer("lin")
    assert lin.macs == 2 * 12 == 24
    # 2 x MACs, intercepts 2 x 3, softmax 5 per score, the label's arg max 1 per score
    assert lin.flops == 48 + 6 + 5 * 6 + 6 == 90
    assert [list(o.shape) for o in ort_run(m, {"x": x(2, 4)})] == [[2], [2, 3]]


# --- trees ------------------------------------------------------------------------------------
# tree 0: node 0 (x0 <= 0) -> leaf 1 | node 2 (x1 <= 0) -> leaves 3, 4   (deepest path: 2 tests)
# tree 1: node 0 (x1 <= 0.5) -> leaves 1, 2                               (1 test)
TWO_TREES = dict(
    nodes_treeids=[0, 0, 0, 0, 0, 1, 1, 1], nodes_nodeids=[0, 1, 2, 3, 4, 0, 1, 2],
    nodes_featureids=[0, 0, 1, 0, 0, 1, 0, 0], nodes_values=[0.0, 0, 0.0, 0, 0, 0.5, 0, 0],
    nodes_modes=["BRANCH_LEQ", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF"],
    nodes_truenodeids=[1, 0, 3, 0, 0, 1, 0, 0], nodes_falsenodeids=[2, 0, 4, 0, 0, 2, 0, 0])


@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE"])
def test_tree_ensemble_regressor(aggregate):
    node = helper.make_node("TreeEnsembleRegressor", ["x"], ["y"], name="trees", domain=ML, **TWO_TREES,
                            target_treeids=[0, 0, 0, 1, 1], target_nodeids=[1, 3, 4, 1, 2], target_ids=[0] * 5,
                            target_weights=[1.0, 2.0, 3.0, 4.0, 5.0], n_targets=1, base_values=[0.5],
                            aggregate_function=aggregate)
    m = ml_model([node], [("x", TensorProto.FLOAT, [3, 2])], [("y", TensorProto.FLOAT, [3, 1])])
    trees = sepify.analyze(m).layer("trees")
    # per sample: tests on the deepest paths 2 + 1, one leaf weight added per tree (2), the base
    # value 1, and for AVERAGE one division
    per_sample = 2 + 1 + 2 + 1 + (1 if aggregate == "AVERAGE" else 0)
    assert trees.macs == 0  # comparisons are not multiply-accumulates
    assert trees.flops == 3 * per_sample == {"SUM": 18, "AVERAGE": 21}[aggregate]
    assert "upper bound" in trees.note
    assert ort_run(m, {"x": x(3, 2)})[0].shape == (3, 1)


def test_tree_ensemble_classifier_and_zipmap():
    # one tree (node 0 -> leaf 1 | node 2 -> leaves 3, 4), each leaf a weight for both classes
    tree = {k: v[:5] for k, v in TWO_TREES.items()}
    node = helper.make_node("TreeEnsembleClassifier", ["x"], ["label", "probabilities"], name="trees", domain=ML,
                            **tree, class_treeids=[0] * 6, class_nodeids=[1, 1, 3, 3, 4, 4], class_ids=[0, 1] * 3,
                            class_weights=[0.9, 0.1, 0.2, 0.8, 0.5, 0.5], classlabels_int64s=[0, 1])
    zipmap = helper.make_node("ZipMap", ["probabilities"], ["zipped"], name="zipmap", domain=ML, classlabels_int64s=[0, 1])
    seq = helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64,
                                                                     helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    m = ml_model([node, zipmap], [("x", TensorProto.FLOAT, ["N", 2])],
                 [("label", TensorProto.INT64, ["N"]), helper.make_value_info("zipped", seq)])
    a = sepify.analyze(m, dims={"N": 4})
    assert a.totals.unknown == 0
    # per sample: 2 tests (deepest path), 2 weights added (a leaf holds one per class), arg max
    # over the 2 classes
    assert a.layer("trees").flops == 4 * (2 + 2 + 2) == 24
    assert (a.layer("zipmap").macs, a.layer("zipmap").flops) == (0, 0)
    labels, zipped = ort_run(m, {"x": x(4, 2)})
    assert labels.shape == (4,) and len(zipped) == 4


def test_tree_ensemble_opset5_with_a_set_membership_node():
    """ai.onnx.ml 5 ``TreeEnsemble``: tree 0 = node 0 (x0 <= 0) -> node 1 (x1 in {1, 2, 3}) ->
    leaves 0, 1 | leaf 2; tree 1 = node 2 (x1 <= 0.5) -> leaves 3, 4."""
    node = helper.make_node(
        "TreeEnsemble", ["x"], ["y"], name="trees", domain=ML,
        tree_roots=[0, 2], nodes_featureids=[0, 1, 1],
        nodes_modes=numpy_helper.from_array(np.array([0, 6, 0], np.uint8), "modes"),
        nodes_splits=numpy_helper.from_array(np.array([0.0, 0.0, 0.5], np.float32), "splits"),
        membership_values=numpy_helper.from_array(np.array([1, 2, 3, np.nan], np.float32), "members"),
        nodes_truenodeids=[1, 0, 3], nodes_trueleafs=[0, 1, 1], nodes_falsenodeids=[2, 1, 4], nodes_falseleafs=[1, 1, 1],
        leaf_targetids=[0] * 5, leaf_weights=numpy_helper.from_array(np.arange(5, dtype=np.float32), "w"),
        n_targets=1, aggregate_function=1, post_transform=0)
    m = ml_model([node], [("x", TensorProto.FLOAT, [2, 2])], [("y", TensorProto.FLOAT, [2, 1])], ml_opset=5,
                 opset=21)
    trees = sepify.analyze(m).layer("trees")
    # per sample: tree 0's deepest path tests x0 (1) then membership in a 3-element set (3);
    # tree 1 one test; one leaf weight added per tree (2)
    assert trees.flops == 2 * (1 + 3 + 1 + 2) == 14
    assert ort_run(m, {"x": x(2, 2)})[0].shape == (2, 1)


@pytest.mark.parametrize("true_ids, why", [
    ([1, 0, 2, 0, 0, 1, 0, 0], "cycle"),  # node 2 -> node 2
    ([1, 0, 0, 0, 0, 1, 0, 0], "cycle"),  # node 0 -> node 2 -> node 0: only the orphaned leaf 3 is a root
])
def test_tree_ensemble_with_a_cycle_is_unknown_not_a_hang(true_ids, why):
    bad = dict(TWO_TREES, nodes_truenodeids=true_ids)
    node = helper.make_node("TreeEnsembleRegressor", ["x"], ["y"], name="trees", domain=ML, **bad,
                            target_treeids=[0], target_nodeids=[1], target_ids=[0], target_weights=[1.0], n_targets=1)
    m = ml_model([node], [("x", TensorProto.FLOAT, [3, 2])], [("y", TensorProto.FLOAT, [3, 1])])
    trees = sepify.analyze(m).layer("trees")
    assert trees.flops is None and "tree ensemble" in trees.unknown and why in trees.unknown


# --- SVMs -------------------------------------------------------------------------------------
def test_svm_regressor_rbf():
    # 3 support vectors over C = 2; X [4, 2]
    node = helper.make_node("SVMRegressor", ["x"], ["y"], name="svm", domain=ML, kernel_type="RBF",
                            kernel_params=[0.5, 0.0, 3.0], n_supports=3, support_vectors=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                            coefficients=[1.0, -1.0, 0.5], rho=[0.1])
    m = ml_model([node], [("x", TensorProto.FLOAT, [4, 2])], [("y", TensorProto.FLOAT, [None, None])])
    svm = sepify.analyze(m).layer("svm")
    kernel = 4 * 3 * 2  # squared distances: a MAC per feature per (sample, support vector)
    dual = 4 * 3  # the kernel values times the coefficients
    assert svm.macs == kernel + dual == 36
    # 2 x MACs; RBF: the C subtractions of each distance (24) and gamma, exp per value (2 x 12);
    # rho 1 per sample
    assert svm.flops == 2 * 36 + 24 + 2 * 12 + 4 == 124
    assert svm.output_shapes == [list(ort_run(m, {"x": x(4, 2)})[0].shape)] == [[4, 1]]


def test_svm_classifier_one_vs_one():
    # 3 classes with 1, 2, 1 support vectors (4) over C = 2, a linear kernel; X [1, 2]
    node = helper.make_node("SVMClassifier", ["x"], ["label", "scores"], name="svm", domain=ML, kernel_type="LINEAR",
                            kernel_params=[0.0, 0.0, 1.0],
                            vectors_per_class=[1, 2, 1], support_vectors=[0.1 * i for i in range(8)],
                            coefficients=[0.5, -0.5, 0.25, 1.0, -1.0, 0.5, 0.75, -0.25], rho=[0.1, 0.2, 0.3],
                            classlabels_ints=[0, 1, 2])
    m = ml_model([node], [("x", TensorProto.FLOAT, [1, 2])],
                 [("label", TensorProto.INT64, [None]), ("scores", TensorProto.FLOAT, [None, None])])
    svm = sepify.analyze(m).layer("svm")
    # kernel values 4 x 2, then a decision per pair of classes over both classes' vectors:
    # (1+2) + (1+1) + (2+1) = (K-1) x n_sv = 8
    assert svm.macs == 8 + 8 == 16
    assert svm.flops == 2 * 16 + 3 * 2 == 38  # + rho and a vote per pair (3 pairs)
    label, _ = ort_run(m, {"x": x(1, 2)})
    assert label.shape == (1,)


# --- element-wise ones ------------------------------------------------------------------------
@pytest.mark.parametrize("norm, per_element, per_row", [("MAX", 2, 0), ("L1", 3, 0), ("L2", 3, 1)])
def test_normalizer(norm, per_element, per_row):
    node = helper.make_node("Normalizer", ["x"], ["y"], name="norm", domain=ML, norm=norm)
    m = ml_model([node], [("x", TensorProto.FLOAT, [2, 3])], [("y", TensorProto.FLOAT, [None, None])])
    layer_ = sepify.analyze(m).layer("norm")
    assert layer_.flops == per_element * 6 + per_row * 2  # L2: a square root per row
    assert layer_.output_shapes == [list(ort_run(m, {"x": x(2, 3)})[0].shape)] == [[2, 3]]


def test_binarizer_and_imputer():
    nodes = [helper.make_node("Imputer", ["x"], ["i"], name="imputer", domain=ML, imputed_value_floats=[0.0] * 3,
                              replaced_value_float=np.nan),
             helper.make_node("Binarizer", ["i"], ["y"], name="binarizer", domain=ML, threshold=0.0)]
    m = ml_model(nodes, [("x", TensorProto.FLOAT, [2, 3])], [("y", TensorProto.FLOAT, [None, None])])
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.layer("imputer").flops == a.layer("binarizer").flops == 6  # one comparison per element
    assert a.layer("binarizer").output_shapes == [list(ort_run(m, {"x": x(2, 3)})[0].shape)] == [[2, 3]]


def test_feature_vectorizer_then_a_linear_model():
    """skl2onnx's ColumnTransformer output: FeatureVectorizer joins [N, 2] and [N, 3] into
    [N, 5] (no shape inference in ONNX), a LinearRegressor reads it."""
    nodes = [helper.make_node("FeatureVectorizer", ["a", "b"], ["f"], name="join", domain=ML, inputdimensions=[2, 3]),
             helper.make_node("Scaler", ["f"], ["s"], name="scaler", domain=ML, offset=[0.0] * 5, scale=[1.0] * 5),
             helper.make_node("LinearRegressor", ["s"], ["y"], name="lin", domain=ML, coefficients=[0.5] * 5)]
    m = ml_model(nodes, [("a", TensorProto.FLOAT, ["N", 2]), ("b", TensorProto.FLOAT, ["N", 3])],
                 [("y", TensorProto.FLOAT, [None, None])])
    a = sepify.analyze(m)
    assert a.totals.unknown == 0
    assert a.layer("join").output_shapes == [["N", 5]] and a.layer("join").flops == 0
    assert a.layer("scaler").flops == 2 * 5
    assert a.layer("lin").macs == 5 and a.totals.macs_formula == "5·N"
    assert ort_run(m, {"a": x(3, 2), "b": x(3, 3)})[0].shape == (3, 1)
