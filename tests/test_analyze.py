"""Whole-model analysis against published and hand-computed figures (Howard et al. 2017,
"MobileNets", arXiv 1704.04861), the JSON schema, determinism and the Python API."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from conftest import make_model, rand

# MobileNet v1, Table 1 of the paper: (depthwise input channels, pointwise output channels, stride)
# for the 13 depthwise-separable blocks, after conv1 (3x3 s2, 3 -> 32) at 224x224.
BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
          (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
          (1024, 1024, 1)]


# --- the worked example: 8x8x3 input, 5x5 kernels, 256 outputs, 'same' padding ---------------
def test_worked_example_standard(make_samples):
    a = sepify.analyze(make_samples.worked_example(separable=False))
    assert a.totals.macs == 8 * 8 * 5 * 5 * 3 * 256 == 1_228_800
    assert a.totals.params == 5 * 5 * 3 * 256 == 19_200


def test_worked_example_separable(make_samples):
    a = sepify.analyze(make_samples.worked_example(separable=True))
    assert a.layer("dw").macs == 8 * 8 * 5 * 5 * 3 == 4_800
    assert a.layer("pw").macs == 8 * 8 * 3 * 256 == 49_152
    assert a.totals.macs == 4_800 + 49_152 == 53_952
    ratio = 1_228_800 / a.totals.macs
    assert round(ratio, 1) == 22.8
    # cost ratio separable / standard = 1/N + 1/K^2 (N = 256 outputs, K = 5), exactly here
    assert a.totals.macs == 1_228_800 * (1 / 256 + 1 / 25)


def test_committed_samples_match_builders(samples_dir):
    assert sepify.analyze(samples_dir / "worked_example.onnx").totals.macs == 1_228_800
    assert sepify.analyze(samples_dir / "worked_example_separable.onnx").totals.macs == 53_952


def test_paper_table3_single_layer():
    """Table 3: a 14x14x512 -> 512 3x3 layer: 462M -> 52.3M mult-adds, 2.36M -> 0.27M params."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512, 14, 14])
    std = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], [x], ["y"],
                     [numpy_helper.from_array(np.zeros((512, 512, 3, 3), np.float32), "W")])
    sep = make_model([helper.make_node("Conv", ["x", "D"], ["d"], name="dw", pads=[1, 1, 1, 1], group=512),
                      helper.make_node("Conv", ["d", "P"], ["y"], name="pw")], [x], ["y"],
                     [numpy_helper.from_array(np.zeros((512, 1, 3, 3), np.float32), "D"),
                      numpy_helper.from_array(np.zeros((512, 512, 1, 1), np.float32), "P")])
    a, b = sepify.analyze(std), sepify.analyze(sep)
    assert a.totals.macs == 14 * 14 * 512 * 512 * 9 == 462_422_016
    assert b.totals.macs == 14 * 14 * 512 * 9 + 14 * 14 * 512 * 512 == 52_283_392
    assert round(a.totals.macs / 1e6) == 462 and round(b.totals.macs / 1e6, 1) == 52.3
    assert a.totals.params == 512 * 512 * 9 == 2_359_296 and round(a.totals.params / 1e6, 2) == 2.36
    assert b.totals.params == 512 * 9 + 512 * 512 == 266_752 and round(b.totals.params / 1e6, 2) == 0.27


# --- MobileNet v1 and Conv MobileNet (Table 4) ------------------------------------------------
def _hand_count(conv_only: bool) -> tuple[int, int]:
    """MACs and params of Table 1, from the architecture (no BatchNorm, FC with bias)."""
    side = 112
    macs = side * side * 32 * 3 * 9          # conv1, 3x3 stride 2
    params = 32 * 3 * 9
    for cin, cout, stride in BLOCKS:
        side //= stride
        if conv_only:
            macs += side * side * cout * cin * 9
            params += cout * cin * 9
        else:
            macs += side * side * cin * 9 + side * side * cin * cout
            params += cin * 9 + cin * cout
    macs += 1024 * 1000                      # FC
    params += 1024 * 1000 + 1000
    return macs, params


def test_hand_count_of_table1():
    assert _hand_count(False) == (568_740_352, 4_210_088)
    assert _hand_count(True) == (4_867_293_184, 29_282_120)


def test_mobilenet_v1(make_samples):
    a = sepify.analyze(make_samples.mobilenet_v1())
    assert a.totals.macs == 568_740_352
    assert a.totals.params == 4_210_088
    assert a.totals.buffers == 0
    assert a.totals.unknown == 0
    # the paper's Table 4: 569M mult-adds, 4.2M parameters
    assert round(a.totals.macs / 1e6) == 569
    assert round(a.totals.params / 1e6, 1) == 4.2
    # FLOPs: 2 per MAC plus the Relus, pooling and softmax: more than 2x MACs, less than 2.1x
    assert 2 * a.totals.macs < a.totals.flops < 2.1 * a.totals.macs


def test_conv_mobilenet(make_samples):
    a = sepify.analyze(make_samples.mobilenet_v1(conv_only=True))
    assert a.totals.macs == 4_867_293_184
    assert a.totals.params == 29_282_120
    # Table 4: 4866M mult-adds (ours 4867.3M: 0.03% apart), 29.3M parameters
    assert abs(a.totals.macs / 1e6 - 4866) / 4866 < 1e-3
    assert round(a.totals.params / 1e6, 1) == 29.3


@pytest.mark.parametrize("width, macs_m, params_m", [(0.75, 325, 2.6), (0.5, 149, 1.3), (0.25, 41, 0.5)])
def test_mobilenet_width_multiplier_table6(make_samples, width, macs_m, params_m):
    a = sepify.analyze(make_samples.mobilenet_v1(width=width))
    assert abs(a.totals.macs / 1e6 - macs_m) <= 1
    assert round(a.totals.params / 1e6, 1) == params_m


@pytest.mark.parametrize("resolution, macs_m", [(192, 418), (160, 290), (128, 186)])
def test_mobilenet_resolution_table7(make_samples, resolution, macs_m):
    a = sepify.analyze(make_samples.mobilenet_v1(resolution=resolution))
    assert abs(a.totals.macs / 1e6 - macs_m) <= 1
    assert a.totals.params == 4_210_088  # resolution does not change the weights


def test_mobilenet_with_batchnorm(make_samples):
    a = sepify.analyze(make_samples.mobilenet_v1(batchnorm=True))
    assert a.totals.macs == 568_740_352  # BatchNorm adds no MACs
    # one BN per conv: conv1 (32) + every depthwise (C_in) + every pointwise (C_out)
    sum_c = 32 + sum(cin for cin, _, _ in BLOCKS) + sum(cout for _, cout, _ in BLOCKS)
    assert sum_c == 32 + 4_960 + 5_952 == 10_944
    assert a.totals.params == 4_210_088 + 2 * sum_c  # scale + bias
    assert a.totals.buffers == 2 * sum_c              # running mean + var
    bn = [layer for layer in a.layers if layer.op_type == "BatchNormalization"]
    assert len(bn) == 27
    assert all(layer.macs == 0 for layer in bn)


def test_mobilenet_symbolic_batch(make_samples):
    a = sepify.analyze(make_samples.mobilenet_v1(batch="batch"))
    assert a.totals.macs == 568_740_352
    assert a.totals.macs_formula == "569M·batch"
    assert any("batch" in n for n in a.notes)
    a8 = sepify.analyze(make_samples.mobilenet_v1(batch="batch"), dims={"batch": 8})
    assert a8.totals.macs == 8 * 568_740_352
    assert a8.totals.params == 4_210_088
    assert a8.totals.activation_peak_bytes == 8 * a.totals.activation_peak_bytes


def test_mobilenet_activation_peak(make_samples):
    # the largest live pair: block1.pw output and its Relu output, each 112*112*64 float32
    a = sepify.analyze(make_samples.mobilenet_v1())
    assert a.totals.activation_peak_bytes == 2 * 112 * 112 * 64 * 4 == 6_422_528


# --- activations ------------------------------------------------------------------------------
def test_activation_peak_on_a_chain():
    # x (1,4,8,8) 1,024 B -> conv1 8ch (2,048 B) -> relu (2,048 B) -> conv2 2ch (512 B)
    # live: x+a = 3,072; after x is freed, a+b = 4,096; after a is freed, b+y = 2,560
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "W2"], ["y"], name="c2")]
    m = make_model(nodes, [x], ["y"], [numpy_helper.from_array(rand(8, 4, 1, 1), "W1"),
                                       numpy_helper.from_array(rand(2, 8, 1, 1), "W2")])
    a = sepify.analyze(m)
    assert [layer.output_bytes for layer in a.layers] == [2048, 2048, 512]
    assert a.totals.activation_peak_bytes == 4096
    assert a.totals.activation_bytes == 2048 + 2048 + 512


def test_activation_peak_with_a_branch():
    # x (1,024 B) feeds two convs; x stays live until the second one
    # x + a = 3,072; x + a + b = 5,120; a + b (x freed) = 4,096; a + b + y = 6,144
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
             helper.make_node("Conv", ["x", "W2"], ["b"], name="c2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    m = make_model(nodes, [x], ["y"], [numpy_helper.from_array(rand(8, 4, 1, 1), "W1"),
                                       numpy_helper.from_array(rand(8, 4, 1, 1), "W2")])
    a = sepify.analyze(m)
    assert a.totals.activation_peak_bytes == 6144
    # live bytes per node, as in the comment above; the peak at "add": a, b and y are live
    assert [layer.live_bytes for layer in a.layers] == [3072, 5120, 6144]
    peak = a.to_dict()["activation_peak"]
    assert (peak["layer"], peak["index"], peak["bytes"]) == ("add", 2, 6144)
    assert sorted((t["name"], t["bytes"], t["producer"]) for t in peak["tensors"]) == [
        ("a", 2048, "c1"), ("b", 2048, "c2"), ("y", 2048, "add")]


def test_tensors_live_at_the_peak_include_inputs_and_outputs_nobody_reads():
    # x (1,024 B) -> c1 Conv -> a (2,048 B, read by c3); c2 splits x into b (512 B, a graph
    # output) and d (512 B, read by nobody: live only while c2 runs); c3 Conv a -> y (512 B).
    # live: c1 x+a = 3,072; c2 x+a+b+d = 4,096 (the peak), then x and d are freed;
    # c3 a+b+y = 3,072
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
             helper.make_node("Split", ["x"], ["b", "d"], name="c2", axis=1, num_outputs=2),
             helper.make_node("Conv", ["a", "W3"], ["y"], name="c3")]
    m = make_model(nodes, [x], ["b", "y"], [numpy_helper.from_array(rand(8, 4, 1, 1), "W1"),
                                            numpy_helper.from_array(rand(2, 8, 1, 1), "W3")], opset=18)
    a = sepify.analyze(m)
    assert [layer.output_bytes for layer in a.layers] == [2048, 1024, 512]
    assert [layer.live_bytes for layer in a.layers] == [3072, 4096, 3072]
    assert a.totals.activation_peak_bytes == 4096
    peak = a.to_dict()["activation_peak"]
    assert (peak["layer"], peak["index"]) == ("c2", 1)
    assert sorted((t["name"], t["bytes"], t["producer"]) for t in peak["tensors"]) == [
        ("a", 2048, "c1"), ("b", 512, "c2"), ("d", 512, "c2"), ("x", 1024, None)]
    assert sum(t["bytes"] for t in peak["tensors"]) == peak["bytes"]


def test_unnamed_and_duplicate_nodes_get_derived_unique_names():
    # node 0 unnamed -> Relu_0; node 1 "r"; node 2 "r" again -> r_2, but node 3 is named
    # "r_2" (a name any node has is never given away) -> r_2_2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Relu", ["b"], ["c"], name="r"),
             helper.make_node("Relu", ["c"], ["y"], name="r_2")]
    m = make_model(nodes, [x], ["y"])
    d = sepify.analyze(m).to_dict()
    assert [r["name"] for r in d["layers"]] == ["Relu_0", "r", "r_2_2", "r_2"]
    assert [r.get("onnx_name") for r in d["layers"]] == ["", None, "r", None]
    assert [r["node_index"] for r in d["layers"]] == [0, 1, 2, 3]
    assert "2 unnamed or duplicate-named node(s) are shown under derived names" in " ".join(d["notes"])
    # the rewriter names the nodes of the model it writes the same way
    from sepify.rewrite.plan import _name_nodes

    renamed = copy.deepcopy(m)
    _name_nodes(renamed)
    assert [n.name for n in renamed.graph.node] == [r["name"] for r in d["layers"]]


# --- JSON, determinism, API -------------------------------------------------------------------
def test_json_documented_keys(samples_dir):
    d = json.loads(json.dumps(sepify.analyze(samples_dir / "tiny_cnn.onnx").to_dict()))
    assert d["schema"].startswith("sepify.analysis/")
    for key in ("macs", "flops", "params", "buffers", "activation_peak_bytes", "unknown"):
        assert isinstance(d["totals"][key], int), key
    assert d["totals"]["macs"] == 2_254_176  # samples/README.md: the tiny CNN's hand count
    assert len(d["layers"]) == 15
    for row in d["layers"]:
        for key in ("name", "op_type", "macs", "flops", "params", "output_shapes", "output_bytes"):
            assert key in row, key
    fc = next(r for r in d["layers"] if r["name"] == "fc")
    assert (fc["op_type"], fc["macs"], fc["flops"], fc["params"]) == ("Gemm", 320, 2 * 320 + 10, 330)
    assert fc["output_shapes"] == [[1, 10]] and fc["output_bytes"] == 40
    # the tiny CNN (samples/README.md): 22,090 conv/fc weights + 32 BatchNorm scale/bias
    assert d["totals"]["params"] == 22_090 + 32
    assert d["totals"]["buffers"] == 32


def test_layer_order_is_graph_order(samples_dir):
    a = sepify.analyze(samples_dir / "tiny_cnn.onnx")
    model = onnx.load(str(samples_dir / "tiny_cnn.onnx"))
    assert [layer.name for layer in a.layers] == [n.name for n in model.graph.node]


def test_deterministic_output(samples_dir, make_samples):
    path = samples_dir / "tiny_cnn.onnx"
    assert json.dumps(sepify.analyze(path).to_dict()) == json.dumps(sepify.analyze(path).to_dict())
    m = make_samples.mobilenet_v1(batchnorm=True, batch="N")
    assert sepify.analyze(m).to_dict() == sepify.analyze(m).to_dict()


def test_api_accepts_path_str_and_model_proto(samples_dir):
    path = samples_dir / "tiny_cnn.onnx"
    from_path = sepify.analyze(path).to_dict()
    from_str = sepify.analyze(str(path)).to_dict()
    from_proto = sepify.analyze(onnx.load(str(path))).to_dict()
    assert from_path == from_str
    assert from_path["totals"] == from_proto["totals"]
    assert from_path["layers"] == from_proto["layers"]
    assert from_path["model"]["path"] == str(path) and from_proto["model"]["path"] is None


def test_api_does_not_mutate_the_model(make_samples):
    m = make_samples.mobilenet_v1(batch="batch")
    m.graph.input[0].type.tensor_type.shape.dim[2].Clear()  # an anonymous dim the loader would name
    before = m.SerializeToString()
    snapshot = copy.deepcopy(m)
    sepify.analyze(m, input_shapes={"input": [2, 3, 224, 224]})
    sepify.analyze(m, dims={"batch": 4}, input_shapes={"input": ["batch", 3, 160, 160]})
    sepify.analyze(m)
    assert m.SerializeToString() == before
    assert m == snapshot


def test_input_shape_override(make_samples):
    a = sepify.analyze(make_samples.tiny_cnn(), input_shapes={"input": [2, 3, 32, 32]})
    assert a.totals.macs == 2 * 2_254_176
    assert a.layer("softmax").output_shapes == [[2, 10]]


def test_external_data_model_analyzed_from_another_folder(make_samples, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(make_samples.tiny_cnn(), str(folder / "tiny.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="tiny.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a = sepify.analyze(folder / "tiny.onnx")
    assert a.totals.macs == 2_254_176
    assert a.totals.params == 22_090 + 32
    assert a.totals.unknown == 0
