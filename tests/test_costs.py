"""One test per cost rule, on one-node models, with the expected numbers worked out by hand in
the test from the formulas of docs/conventions.md (never from the code under test)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sepify
from conftest import Input, make_model, rand, single_node_model


def analyze_one(model, **kw):
    """Analyze a one-node model; return (the node's layer, the analysis)."""
    a = sepify.analyze(model, **kw)
    assert [layer.name for layer in a.layers] == ["node"]
    return a.layers[0], a


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(array, name)


# --- Conv -------------------------------------------------------------------------------------
def test_conv_strides_dilations_asymmetric_pads_bias():
    # X (2,4,17,20), W (6,4,3,3), strides (2,3), dilations (2,1), pads (top 1, left 0, bottom 2, right 3)
    m = single_node_model("Conv", [(2, 4, 17, 20), rand(6, 4, 3, 3), rand(6)],
                          strides=[2, 3], dilations=[2, 1], pads=[1, 0, 2, 3])
    layer, a = analyze_one(m)
    # effective kernel: H 2*(3-1)+1 = 5, W 1*(3-1)+1 = 3
    h_out = (17 + 1 + 2 - 5) // 2 + 1  # = 8
    w_out = (20 + 0 + 3 - 3) // 3 + 1  # = 7
    assert (h_out, w_out) == (8, 7)
    assert layer.output_shapes == [[2, 6, 8, 7]]
    macs = 2 * 6 * 8 * 7 * (4 * 3 * 3)  # N * C_out * out_spatial * C_in/g * k
    assert macs == 24_192
    assert layer.macs == macs
    # FLOPs: 2 per MAC, plus one add per output element for the bias
    assert layer.flops == 2 * 24_192 + 2 * 6 * 8 * 7 == 49_056
    assert layer.params == 6 * 4 * 3 * 3 + 6 == 222
    assert a.totals.macs == 24_192 and a.totals.unknown == 0


@pytest.mark.parametrize("auto_pad, expected_hw", [
    ("SAME_UPPER", (5, 6)),   # ceil(10/2), ceil(11/2)
    ("SAME_LOWER", (5, 6)),
    ("VALID", (4, 4)),        # floor((10-3)/2)+1, floor((11-4)/2)+1
])
def test_conv_auto_pad(auto_pad, expected_hw):
    m = single_node_model("Conv", [(1, 3, 10, 11), rand(8, 3, 3, 4)], strides=[2, 2], auto_pad=auto_pad)
    layer, _ = analyze_one(m)
    h, w = expected_hw
    assert layer.output_shapes == [[1, 8, h, w]]
    assert layer.macs == 1 * 8 * h * w * 3 * 3 * 4  # SAME: 8640, VALID: 4608
    assert layer.macs == {"SAME_UPPER": 8640, "SAME_LOWER": 8640, "VALID": 4608}[auto_pad]
    assert layer.flops == 2 * layer.macs  # no bias
    assert layer.params == 8 * 3 * 3 * 4 == 288


def test_conv_groups():
    # 8 -> 12 channels in 4 groups: each output channel sees 8/4 = 2 input channels
    m = single_node_model("Conv", [(1, 8, 9, 9), rand(12, 2, 3, 3)], group=4)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, 12, 7, 7]]
    assert layer.macs == 12 * 7 * 7 * 2 * 3 * 3 == 10_584  # ignoring groups would give 4x this
    assert layer.params == 12 * 2 * 3 * 3 == 216


@pytest.mark.parametrize("multiplier", [1, 2])
def test_conv_depthwise(multiplier):
    c = 16
    m = single_node_model("Conv", [(1, c, 10, 10), rand(c * multiplier, 1, 3, 3)], group=c, pads=[1, 1, 1, 1])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, c * multiplier, 10, 10]]
    assert layer.macs == c * multiplier * 10 * 10 * 1 * 3 * 3  # 14,400 or 28,800
    assert layer.macs == {1: 14_400, 2: 28_800}[multiplier]
    assert layer.params == c * multiplier * 9


def test_conv_1d():
    # X (3,4,50), W (5,4,7), stride 3, pads (2,1): L_out = floor((50+2+1-7)/3)+1 = 16
    m = single_node_model("Conv", [(3, 4, 50), rand(5, 4, 7), rand(5)], strides=[3], pads=[2, 1])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[3, 5, 16]]
    assert layer.macs == 3 * 5 * 16 * 4 * 7 == 6_720
    assert layer.flops == 2 * 6_720 + 3 * 5 * 16 == 13_680
    assert layer.params == 5 * 4 * 7 + 5 == 145


def test_conv_3d():
    m = single_node_model("Conv", [(1, 2, 6, 7, 8), rand(4, 2, 3, 3, 3)], pads=[1] * 6)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, 4, 6, 7, 8]]
    assert layer.macs == 4 * (6 * 7 * 8) * 2 * 27 == 72_576
    assert layer.params == 4 * 2 * 27 == 216


# --- ConvTranspose ----------------------------------------------------------------------------
def test_conv_transpose_stride2_counted_on_input_size():
    # X (2,4,5,6), W (C_in=4, C_out/g=3, 3, 3), stride 2: out = (5-1)*2+3 = 11, (6-1)*2+3 = 13
    m = single_node_model("ConvTranspose", [(2, 4, 5, 6), rand(4, 3, 3, 3), rand(3)], strides=[2, 2])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[2, 3, 11, 13]]
    macs = 4 * 3 * (3 * 3) * (5 * 6) * 2  # C_in * C_out/g * prod(k) * prod(in_spatial) * batch
    assert macs == 6_480
    assert layer.macs == macs
    wrong_on_output = 2 * 3 * 11 * 13 * 4 * 9  # what counters that use the output size report
    assert wrong_on_output == 30_888 and layer.macs < wrong_on_output
    assert layer.flops == 2 * 6_480 + 2 * 3 * 11 * 13 == 13_818  # + bias per output element
    assert layer.params == 4 * 3 * 9 + 3 == 111


def test_conv_transpose_groups():
    # group 2: W (4, 3, 3, 3) -> C_out = 3 * 2 = 6; each input channel feeds 3 output channels
    m = single_node_model("ConvTranspose", [(1, 4, 5, 6), rand(4, 3, 3, 3)], strides=[2, 2], group=2)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, 6, 11, 13]]
    assert layer.macs == 4 * (6 // 2) * 9 * 30 * 1 == 3_240


# --- Gemm -------------------------------------------------------------------------------------
def test_gemm_trans_a():
    # A (5,7) with transA -> (7,5); B (5,3): M=7, K=5, N=3
    layer, _ = analyze_one(single_node_model("Gemm", [(5, 7), rand(5, 3)], transA=1))
    assert layer.output_shapes == [[7, 3]]
    assert layer.macs == 7 * 5 * 3 == 105
    assert layer.flops == 210
    assert layer.params == 15


def test_gemm_trans_b_with_bias():
    # PyTorch Linear: A (4,6), B (9,6) with transB, C (9,): M=4, K=6, N=9
    layer, _ = analyze_one(single_node_model("Gemm", [(4, 6), rand(9, 6), rand(9)], transB=1))
    assert layer.output_shapes == [[4, 9]]
    assert layer.macs == 4 * 6 * 9 == 216
    assert layer.flops == 2 * 216 + 4 * 9 == 468  # the bias add is FLOPs, not MACs
    assert layer.params == 9 * 6 + 9 == 63


def test_gemm_both_transposed():
    layer, _ = analyze_one(single_node_model("Gemm", [(6, 4), rand(9, 6), rand(1, 9)], transA=1, transB=1))
    assert layer.output_shapes == [[4, 9]]
    assert layer.macs == 4 * 6 * 9 == 216
    assert layer.params == 54 + 9


# --- MatMul -----------------------------------------------------------------------------------
def test_matmul_2d_constant_weight():
    layer, _ = analyze_one(single_node_model("MatMul", [(4, 6), rand(6, 9)]))
    assert layer.macs == 4 * 6 * 9 == 216
    assert layer.flops == 432
    assert layer.params == 54  # a constant float MatMul operand is a weight


def test_matmul_batched():
    layer, _ = analyze_one(single_node_model("MatMul", [(8, 4, 5), (8, 5, 6)]))
    assert layer.output_shapes == [[8, 4, 6]]
    assert layer.macs == 8 * 4 * 5 * 6 == 960
    assert layer.params == 0  # both operands are activations


def test_matmul_broadcast():
    # (2,1,4,5) x (3,5,6): batch dims (2,1) and (3,) broadcast to (2,3)
    layer, _ = analyze_one(single_node_model("MatMul", [(2, 1, 4, 5), (3, 5, 6)]))
    assert layer.output_shapes == [[2, 3, 4, 6]]
    assert layer.macs == 2 * 3 * 4 * 5 * 6 == 720


@pytest.mark.parametrize("a, b, out, macs", [
    ((5,), (3, 5, 6), [3, 6], 3 * 5 * 6),     # vector x batched matrix: 90
    ((3, 4, 5), (5,), [3, 4], 3 * 4 * 5),     # batched matrix x vector: 60
    ((5,), (5,), [], 5),                      # dot product
])
def test_matmul_1d_operands(a, b, out, macs):
    layer, _ = analyze_one(single_node_model("MatMul", [a, b]))
    assert layer.output_shapes == [out]
    assert layer.macs == macs


# --- Einsum -----------------------------------------------------------------------------------
def test_einsum_batched_matmul():
    layer, _ = analyze_one(single_node_model("Einsum", [(2, 3, 4), (2, 4, 5)], equation="bij,bjk->bik"))
    assert layer.output_shapes == [[2, 3, 5]]
    assert layer.macs == 2 * 3 * 4 * 5 == 120  # product of the sizes of all distinct indices
    assert layer.flops == 240


@pytest.mark.parametrize("equation", ["ij,jk,kl->il", "ij,jk,kl"])
def test_einsum_three_operands_left_to_right(equation):
    # (ij,jk)->ik: 3*4*5 = 60, then (ik,kl)->il: 3*5*6 = 90
    layer, _ = analyze_one(single_node_model("Einsum", [(3, 4), (4, 5), (5, 6)], equation=equation))
    assert layer.output_shapes == [[3, 6]]
    assert layer.macs == 3 * 4 * 5 + 3 * 5 * 6 == 150


def test_einsum_ellipsis():
    layer, _ = analyze_one(single_node_model("Einsum", [(2, 3, 4, 5), (2, 3, 5, 6)], equation="...ij,...jk->...ik"))
    assert layer.output_shapes == [[2, 3, 4, 6]]
    assert layer.macs == (2 * 3) * 4 * 5 * 6 == 720


def test_einsum_single_operand_is_data_movement():
    layer, _ = analyze_one(single_node_model("Einsum", [(3, 4)], equation="ij->ji"))
    assert layer.macs == 0
    assert layer.flops == 12  # one op per input element


# --- quantized forms ------------------------------------------------------------------------
def test_conv_integer():
    m = single_node_model("ConvInteger", [Input((1, 3, 8, 8), TensorProto.UINT8), rand(4, 3, 3, 3, dtype=np.uint8)],
                          pads=[1, 1, 1, 1])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, 4, 8, 8]]
    assert layer.macs == 4 * 64 * 3 * 9 == 6_912
    assert layer.params == 4 * 3 * 9 == 108  # integer weights are still weights
    assert layer.output_bytes == 4 * 64 * 4  # int32 output


def test_qlinear_conv():
    m = single_node_model("QLinearConv", [
        Input((1, 3, 8, 8), TensorProto.UINT8), np.array(0.5, np.float32), np.array(0, np.uint8),
        rand(4, 3, 3, 3, dtype=np.int8), np.array(0.1, np.float32), np.array(0, np.int8),
        np.array(0.2, np.float32), np.array(0, np.uint8), rand(4, dtype=np.int32)], pads=[1, 1, 1, 1])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[1, 4, 8, 8]]
    assert layer.macs == 4 * 64 * 3 * 9 == 6_912
    assert layer.flops == 2 * 6_912 + 4 * 64  # + int32 bias per output element
    assert layer.params == 108 + 4  # int8 weight + int32 bias; scales and zero points are not
    assert layer.output_bytes == 4 * 64 * 1  # uint8


def test_matmul_integer():
    m = single_node_model("MatMulInteger", [Input((2, 4, 6), TensorProto.UINT8), rand(6, 5, dtype=np.uint8)])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[2, 4, 5]]
    assert layer.macs == 2 * 4 * 6 * 5 == 240
    assert layer.params == 30


def test_qlinear_matmul():
    m = single_node_model("QLinearMatMul", [
        Input((2, 4, 6), TensorProto.UINT8), np.array(0.5, np.float32), np.array(0, np.uint8),
        rand(6, 5, dtype=np.uint8), np.array(0.1, np.float32), np.array(0, np.uint8),
        np.array(0.2, np.float32), np.array(0, np.uint8)])
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[2, 4, 5]]
    assert layer.macs == 240
    assert layer.params == 30


# --- recurrent ------------------------------------------------------------------------------
# seq_len 5, batch 2, input size 3, hidden 4; MACs = seq * batch * dirs * gates * H * (I + H)
def test_rnn():
    m = single_node_model("RNN", [(5, 2, 3), rand(1, 4, 3), rand(1, 4, 4), rand(1, 8)], hidden_size=4, n_outputs=2)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[5, 1, 2, 4], [1, 2, 4]]
    assert layer.macs == 5 * 2 * 1 * 1 * 4 * (3 + 4) == 280
    assert layer.flops == 2 * 280 + 3 * 5 * 2 * 1 * 4  # element-wise: 3 per hidden unit per step
    assert layer.params == 12 + 16 + 8


def test_gru():
    m = single_node_model("GRU", [(5, 2, 3), rand(1, 12, 3), rand(1, 12, 4)], hidden_size=4, n_outputs=2)
    layer, _ = analyze_one(m)
    assert layer.macs == 5 * 2 * 1 * 3 * 4 * (3 + 4) == 840
    assert layer.flops == 2 * 840 + 12 * 5 * 2 * 1 * 4
    assert layer.params == 36 + 48


def test_lstm_bidirectional():
    m = single_node_model("LSTM", [(5, 2, 3), rand(2, 16, 3), rand(2, 16, 4), rand(2, 32)],
                          hidden_size=4, direction="bidirectional", n_outputs=3)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[5, 2, 2, 4], [2, 2, 4], [2, 2, 4]]
    assert layer.macs == 5 * 2 * 2 * 4 * 4 * (3 + 4) == 2_240
    assert layer.flops == 2 * 2_240 + 15 * 5 * 2 * 2 * 4
    assert layer.params == 2 * 16 * 3 + 2 * 16 * 4 + 2 * 32 == 288


def test_lstm_batch_first_layout():
    m = single_node_model("LSTM", [(2, 5, 3), rand(1, 16, 3), rand(1, 16, 4)], hidden_size=4, layout=1)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[2, 5, 1, 4]]
    assert layer.macs == 5 * 2 * 1 * 4 * 4 * (3 + 4) == 1_120


# --- attention ------------------------------------------------------------------------------
# MACs = batch * heads * q_len * kv_len * (qk_head_dim + v_head_dim)   (QK^T and PV)
# FLOPs = 2 * MACs + 5 per attention score (softmax)
def test_onnx_attention_4d():
    m = single_node_model("Attention", [(2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6)], opset=23)
    layer, _ = analyze_one(m)
    assert layer.output_shapes[0] == [2, 3, 5, 6]
    assert layer.macs == 2 * 3 * 5 * 7 * (8 + 6) == 2_940
    assert layer.flops == 2 * 2_940 + 5 * 2 * 3 * 5 * 7


def test_onnx_attention_3d_grouped_heads():
    # hidden 24 / 6 query heads = 4 per head; V hidden 8 / 2 kv heads = 4 per head
    m = single_node_model("Attention", [(2, 5, 24), (2, 7, 12), (2, 7, 8)], opset=23, q_num_heads=6, kv_num_heads=2)
    layer, _ = analyze_one(m)
    assert layer.output_shapes[0] == [2, 5, 24]
    assert layer.macs == 2 * 6 * 5 * 7 * (4 + 4) == 3_360


def test_ms_multihead_attention():
    # query (2,5,24), key (2,7,24), value (2,7,16), 4 heads: 6 per QK head, 4 per V head
    m = single_node_model("MultiHeadAttention", [(2, 5, 24), (2, 7, 24), (2, 7, 16)], domain="com.microsoft",
                          num_heads=4, out_rank=3)
    layer, a = analyze_one(m)
    assert layer.unknown is None
    assert layer.macs == 2 * 4 * 5 * 7 * (6 + 4) == 2_800
    assert a.totals.unknown == 0


def test_ms_attention_with_qkv_projection():
    # input (2,5,24) x packed QKV weight (24,72) + attention over 5 positions, 4 heads of 6
    m = single_node_model("Attention", [(2, 5, 24), rand(24, 72), rand(72)], domain="com.microsoft",
                          num_heads=4, out_rank=3)
    layer, _ = analyze_one(m)
    projection = 2 * 5 * 24 * 72
    core = 2 * 4 * 5 * 5 * (6 + 6)
    assert layer.macs == projection + core == 19_680
    assert layer.params == 24 * 72 + 72


# --- other ops: FLOPs only, per the table in docs/conventions.md ----------------------------
def test_batchnorm_flops_and_params():
    # 2 FLOPs per element (scale and shift, folded); no MACs. scale/bias params, mean/var buffers
    m = single_node_model("BatchNormalization", [(2, 3, 4, 5), rand(3), rand(3), rand(3), rand(3) + 5])
    layer, a = analyze_one(m)
    assert layer.macs == 0
    assert layer.flops == 2 * (2 * 3 * 4 * 5) == 240
    assert layer.params == 3 + 3
    assert layer.buffers == 3 + 3
    assert (a.totals.params, a.totals.buffers) == (6, 6)


def test_softmax_flops():
    layer, _ = analyze_one(single_node_model("Softmax", [(2, 10)], axis=1))
    assert layer.macs == 0
    assert layer.flops == 5 * 20  # max, subtract, exp, sum, divide


def test_relu_flops():
    layer, _ = analyze_one(single_node_model("Relu", [(1, 2, 8, 8)]))
    assert (layer.macs, layer.flops) == (0, 128)


@pytest.mark.parametrize("op, attrs, out_shape, flops", [
    # one op per kernel element per output element
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}, [1, 2, 3, 3], 2 * 3 * 3 * 9),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, [1, 2, 4, 4], 2 * 4 * 4 * 4),
    # global pooling: one op per input element
    ("GlobalAveragePool", {}, [1, 2, 1, 1], 2 * 8 * 8),
    ("GlobalMaxPool", {}, [1, 2, 1, 1], 2 * 8 * 8),
])
def test_pooling_flops(op, attrs, out_shape, flops):
    layer, _ = analyze_one(single_node_model(op, [(1, 2, 8, 8)], **attrs))
    assert layer.output_shapes == [out_shape]
    assert layer.macs == 0
    assert layer.flops == flops


def test_elementwise_binary_flops_from_output_size():
    layer, _ = analyze_one(single_node_model("Add", [(2, 3, 4), (4,)]))
    assert layer.flops == 2 * 3 * 4  # one per output element (after broadcasting)


@pytest.mark.parametrize("op, inputs, attrs", [
    ("Reshape", [(1, 2, 8, 8), np.array([2, 64], np.int64)], {}),
    ("Transpose", [(1, 2, 8, 8)], {"perm": [0, 2, 3, 1]}),
    ("Concat", [(1, 2, 8, 8), (1, 3, 8, 8)], {"axis": 1}),
    ("Slice", [(1, 2, 8, 8), np.array([0], np.int64), np.array([4], np.int64), np.array([2], np.int64)], {}),
    ("Gather", [(1, 2, 8, 8), np.array([0, 3], np.int64)], {"axis": 2}),
    ("Pad", [(1, 2, 8, 8), np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)], {}),
    ("Flatten", [(1, 2, 8, 8)], {"axis": 1}),
    ("Squeeze", [(1, 2, 8, 8), np.array([0], np.int64)], {}),
    ("Identity", [(1, 2, 8, 8)], {}),
    ("Expand", [(1, 2, 1, 8), np.array([1, 2, 8, 8], np.int64)], {}),
])
def test_data_movement_costs_nothing(op, inputs, attrs):
    layer, a = analyze_one(single_node_model(op, inputs, **attrs))
    assert layer.unknown is None
    assert (layer.macs, layer.flops) == (0, 0)
    assert layer.params == 0  # shape vectors, indices, pads are not parameters
    assert a.totals.unknown == 0


# --- unknown ops --------------------------------------------------------------------------------
def test_custom_domain_op_is_unknown_not_zero_and_no_crash():
    x = vi("x", [1, 4, 8, 8])
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv"),
        helper.make_node("MyOp", ["a"], ["b"], name="custom", domain="com.example"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    m = make_model(nodes, [x], ["y"], [init("W", rand(4, 4, 1, 1))], extra_opsets={"com.example": 1}, default_rank=4)
    a = sepify.analyze(m)
    rows = {layer.name: layer for layer in a.layers}
    assert rows["custom"].unknown and "MyOp" in rows["custom"].unknown
    assert rows["custom"].macs is None and rows["custom"].flops is None
    assert rows["conv"].macs == 4 * 64 * 4
    assert a.totals.unknown >= 1
    assert a.totals.unknown == sum(1 for layer in a.layers if layer.unknown)
    assert a.totals.macs == 4 * 64 * 4  # the known part
    assert any("unknown" in n for n in a.notes)
    d = a.to_dict()
    assert d["totals"]["unknown"] == a.totals.unknown
    assert next(r for r in d["layers"] if r["name"] == "custom")["unknown"]


def test_data_dependent_sizes_are_unknown_with_the_reason_and_the_totals_say_which_part():
    """NonZero's output length and TopK's with a k given at run time depend on the input
    values: the nodes after them are unknown with that reason (naming the op), and the totals'
    note and ``unknown_causes`` say how many nodes are unknown for which cause."""
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
        helper.make_node("Cast", ["nz"], ["nzf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["W", "nzf"], ["a"], name="after_nonzero"),          # (5, 2) x (2, ?)
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1),
        helper.make_node("MatMul", ["v", "V"], ["b"], name="after_topk"),               # (3, k) x (4, 2): runs with k = 4
        helper.make_node("MyOp", ["x"], ["c"], name="custom", domain="com.example"),
        helper.make_node("MatMul", ["x", "U"], ["d"], name="known"),                    # (3, 4) x (4, 6)
    ]
    m = make_model(nodes, [vi("x", [3, 4]), vi("k", [1], TensorProto.INT64)], ["a", "b", "c", "d", "i"],
                   [init("W", rand(5, 2)), init("V", rand(4, 2)), init("U", rand(4, 6))],
                   extra_opsets={"com.example": 1}, default_rank=2)
    a = sepify.analyze(m)
    rows = {layer.name: layer for layer in a.layers}
    assert "its size depends on the input values (NonZero 'nz')" in rows["after_nonzero"].unknown
    assert "its size depends on the input values (TopK 'topk')" in rows["after_topk"].unknown
    assert rows["topk"].flops == 3 * 4  # TopK itself: one op per input element, known
    assert rows["custom"].unknown == "no cost rule for com.example.MyOp"
    assert rows["known"].macs == 3 * 4 * 6 and a.totals.macs == 72  # the known part only
    assert a.totals.unknown == 3
    assert a.totals.unknown_causes == {"data-dependent size": 2, "no cost rule": 1}
    assert a.to_dict()["totals"]["unknown_causes"] == a.totals.unknown_causes
    assert ("3 node(s) of unknown cost are not included in the totals: 2 with a size that depends on the input "
            "values (after NonZero 'nz', TopK 'topk'); 1 of an op with no cost rule (com.example.MyOp)") in a.notes


def test_a_second_cost_rule_for_an_op_is_refused(monkeypatch):
    from sepify.cost import costs

    monkeypatch.setattr(costs, "RULES", dict(costs.RULES))  # (a rule that did get in goes with the test)
    cost_rule = costs.cost_rule
    with pytest.raises(ValueError, match="duplicate cost rule for Conv"):
        cost_rule("Conv")(lambda ctx: None)
    with pytest.raises(ValueError, match="duplicate cost rule for ai.onnx.ml.Scaler"):
        cost_rule("Scaler", domain="ai.onnx.ml")(lambda ctx: None)


# --- control flow -----------------------------------------------------------------------------
def _if_model():
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["t_out"], name="then_conv", pads=[1, 1, 1, 1])],
                               "then", [], [vi("t_out", None)])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e_out"], name="else_relu")],
                               "else", [], [vi("e_out", None)])
    node = helper.make_node("If", ["cond"], ["y"], name="node", then_branch=then_g, else_branch=else_g)
    return make_model([node], [vi("x", [1, 2, 6, 6]), vi("cond", [], TensorProto.BOOL)], ["y"],
                      [init("W", rand(4, 2, 3, 3))], default_rank=4)


def test_if_reports_costlier_branch():
    layer, a = analyze_one(_if_model())
    assert layer.unknown is None
    assert layer.macs == 4 * 6 * 6 * 2 * 9 == 2_592  # then-branch Conv; else is a Relu (0 MACs)
    assert layer.flops == 2 * 2_592
    assert "then_branch" in layer.note and "costlier" in layer.note
    assert layer.params == 4 * 2 * 9  # weights read inside the branch


def _loop_body():
    return helper.make_graph(
        [helper.make_node("Conv", ["h_in", "W"], ["h_out"], name="body_conv"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id")],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", [1, 3, 4, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", [1, 3, 4, 4])])


def test_loop_constant_trip_count():
    node = helper.make_node("Loop", ["trip", "", "x"], ["y"], name="node", body=_loop_body())
    m = make_model([node], [vi("x", [1, 3, 4, 4])], ["y"],
                   [init("W", rand(3, 3, 1, 1)), init("trip", np.array(5, np.int64))], default_rank=4)
    layer, _ = analyze_one(m)
    per_iteration = 3 * 16 * 3  # 1x1 conv 3->3 on 4x4
    assert layer.macs == 5 * per_iteration == 720
    assert "5" in layer.note
    assert layer.params == 9


def test_loop_variable_trip_count_is_per_iteration():
    node = helper.make_node("Loop", ["n", "", "x"], ["y"], name="node", body=_loop_body())
    m = make_model([node], [vi("x", [1, 3, 4, 4]), vi("n", [], TensorProto.INT64)], ["y"],
                   [init("W", rand(3, 3, 1, 1))], default_rank=4)
    layer, _ = analyze_one(m)
    assert layer.macs == 3 * 16 * 3 == 144
    assert "per iteration" in layer.note


def test_scan_body_times_sequence_length():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["p"], name="s_mm"),
         helper.make_node("Add", ["s_in", "p"], ["s_out"], name="s_add"),
         helper.make_node("Identity", ["s_out"], ["o"], name="s_id")],
        "sbody", [vi("s_in", [3]), vi("xt", [3])], [vi("s_out", [3]), vi("o", [3])])
    node = helper.make_node("Scan", ["s0", "seq"], ["sf", "outs"], name="node", body=body, num_scan_inputs=1)
    m = make_model([node], [vi("s0", [3]), vi("seq", [5, 3])], ["sf", "outs"], [init("W", rand(3, 3))])
    layer, _ = analyze_one(m)
    # per step: (3,) x (3,3) = 9 MACs, + 3 adds; 5 steps
    assert layer.macs == 5 * 9 == 45
    assert layer.flops == 5 * (2 * 9 + 3) == 105
    assert layer.output_shapes == [[3], [5, 3]]


# --- model-local functions --------------------------------------------------------------------
def test_model_local_function_is_inlined():
    fn = helper.make_function(
        "local.fn", "ConvRelu", ["X", "W"], ["Y"],
        [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    node = helper.make_node("ConvRelu", ["x", "W"], ["y"], name="fn", domain="local.fn")
    m = make_model([node], [vi("x", [1, 2, 5, 5])], ["y"], [init("W", rand(4, 2, 3, 3))],
                   extra_opsets={"local.fn": 1}, functions=[fn], default_rank=4)
    a = sepify.analyze(m)
    assert [layer.op_type for layer in a.layers] == ["Conv", "Relu"]
    assert a.totals.unknown == 0
    assert a.totals.macs == 4 * 25 * 2 * 9 == 1_800
    assert a.totals.flops == 2 * 1_800 + 4 * 25
    assert a.totals.params == 72
    assert any("inlined" in n for n in a.notes)


def test_function_nodes_have_the_same_names_in_analyze_and_rewrite():
    """A function called twice, its body nodes unnamed: analyze named the inlined copies by
    position (Conv_0, Relu_1, Conv_2, ...), rewrite ``<function>/<op>_<index>__<call>``; a diff
    of the two reports or a --exclude written from analyze's table matched nothing."""
    fn = helper.make_function(
        "local.fn", "Block", ["X", "W"], ["Y"],
        [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Block", ["x", "W1"], ["a"], name="block1", domain="local.fn"),
             helper.make_node("Block", ["a", "W2"], ["y"], name="block2", domain="local.fn")]
    m = make_model(nodes, [vi("x", [1, 4, 6, 6])], ["y"], [init("W1", rand(4, 4, 3, 3)), init("W2", rand(4, 4, 3, 3))],
                   extra_opsets={"local.fn": 1}, functions=[fn], default_rank=4)
    names = [layer.name for layer in sepify.analyze(m).layers]
    # the body's nodes named <function>/<op>_<index in the body>, each copy __<call number>
    assert names == ["Block/Conv_0__1", "Block/Relu_1__1", "Block/Conv_0__2", "Block/Relu_1__2"]
    r = sepify.rewrite(m, rank=1)
    assert [layer["name"] for layer in r.report["before"]["layers"]] == names
    assert [x.name for x in r.layers] == ["Block/Conv_0__1", "Block/Conv_0__2"]
    # and what analyze names is what rewrite's --exclude matches
    assert [x.name for x in sepify.rewrite(m, rank=1, exclude=[f"^{names[0]}$"]).layers] == ["Block/Conv_0__2"]


# --- symbolic dimensions ----------------------------------------------------------------------
def test_symbolic_batch_formula_and_numbers_at_1():
    m = single_node_model("Conv", [("batch", 3, 8, 8), rand(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    layer, a = analyze_one(m)
    per_image = 4 * 64 * 3 * 9  # 6,912
    assert layer.macs == per_image  # numbers at batch = 1
    assert a.totals.macs == per_image
    assert a.totals.macs_formula == "6.91K·batch"
    assert layer.macs_formula == "6.91K·batch"
    assert any("batch" in n and "1" in n for n in a.notes)  # the note names the unbound symbol
    assert a.symbols["batch"] == {"value": 1, "bound": False, "batch": True,  # N of N x C x H x W
                                  "affects": ["macs", "flops", "layer_macs", "activation_peak"]}
    assert a.to_dict()["totals"]["macs_formula"] == "6.91K·batch"


def test_symbolic_batch_bound_with_dims():
    m = single_node_model("Conv", [("batch", 3, 8, 8), rand(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    layer, a = analyze_one(m, dims={"batch": 8})
    assert layer.macs == 8 * 4 * 64 * 3 * 9 == 55_296
    assert layer.output_shapes == [[8, 4, 8, 8]]
    assert a.totals.macs_formula is None
    assert not any("unbound" in n for n in a.notes)
    assert a.symbols["batch"] == {"value": 8, "bound": True}


def test_output_dim_named_differently_from_the_input_symbol():
    # exporters often name output dims on their own ("Convy_dim_0"): still 6,912 x N
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="node", pads=[1, 1, 1, 1])
    m = make_model([node], [vi("x", ["N", 3, 8, 8])], [vi("y", ["Convy_dim_0", 4, 8, 8])], [init("W", rand(4, 3, 3, 3))])
    layer, a = analyze_one(m)
    assert layer.unknown is None
    assert a.totals.macs_formula == "6.91K·N"
    assert analyze_one(m, dims={"N": 2})[0].macs == 2 * 4 * 64 * 3 * 9


def test_two_symbols_give_a_polynomial():
    layer, a = analyze_one(single_node_model("MatMul", [("batch", "seq", 6), rand(6, 5)]))
    assert a.totals.macs_formula == "30·batch·seq"
    assert layer.macs == 30
    _, a8 = analyze_one(single_node_model("MatMul", [("batch", "seq", 6), rand(6, 5)]), dims={"batch": 2, "seq": 7})
    assert a8.totals.macs == 2 * 7 * 6 * 5


def test_symbolic_spatial_dims_fall_back_to_numbers():
    # shape inference cannot carry h, w through a Conv: numbers at h = w = 1, no formula, no unknown
    m = single_node_model("Conv", [("batch", 3, "h", "w"), rand(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    layer, a = analyze_one(m)
    assert layer.unknown is None
    assert layer.macs == 4 * 1 * 3 * 9 == 108
    assert a.totals.unknown == 0
    _, bound = analyze_one(m, dims={"batch": 2, "h": 8, "w": 8})
    assert bound.totals.macs == 2 * 4 * 64 * 3 * 9


# --- parameters -------------------------------------------------------------------------------
X4 = vi("x", [1, 4, 6, 6])
CONV_MACS = 4 * 36 * 4 * 9  # 1x4x6x6, 3x3 pads 1, 4 -> 4 channels: 5,184


def test_shared_weight_counted_once():
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], [init("W", rand(4, 4, 3, 3))]))
    assert a.totals.macs == 2 * CONV_MACS
    assert a.totals.params == 4 * 4 * 9 == 144


def test_weight_from_constant_node():
    nodes = [helper.make_node("Constant", [], ["Wc"], name="wconst", value=numpy_helper.from_array(rand(4, 4, 3, 3))),
             helper.make_node("Conv", ["x", "Wc"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    a = sepify.analyze(make_model(nodes, [X4], ["y"]))
    assert [layer.name for layer in a.layers] == ["c1"]  # the Constant is part of the weights
    assert a.totals.params == 144
    assert a.totals.macs == CONV_MACS


def test_weight_from_constant_of_shape():
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["Wc"], name="cos",
                              value=numpy_helper.from_array(np.array([0.01], np.float32))),
             helper.make_node("Conv", ["x", "Wc"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], [init("shp", np.array([4, 4, 3, 3], np.int64))]))
    assert a.totals.params == 144  # not 4 (the shape vector), not 0
    assert a.totals.macs == CONV_MACS


def test_weight_from_constant_of_shape_of_computed_shape():
    # the shape vector itself is computed (Concat of two Constant nodes): still a constant
    nodes = [helper.make_node("Constant", [], ["a"], name="ca", value=numpy_helper.from_array(np.array([4, 4], np.int64))),
             helper.make_node("Constant", [], ["b"], name="cb", value=numpy_helper.from_array(np.array([3, 3], np.int64))),
             helper.make_node("Concat", ["a", "b"], ["shp"], name="cat", axis=0),
             helper.make_node("ConstantOfShape", ["shp"], ["Wc"], name="cos",
                              value=numpy_helper.from_array(np.array([0.01], np.float32))),
             helper.make_node("Conv", ["x", "Wc"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], default_rank=4))
    assert [layer.name for layer in a.layers] == ["c1"]
    assert a.totals.unknown == 0
    assert a.totals.params == 144
    assert a.totals.macs == CONV_MACS


def test_weight_from_dequantize_linear_of_int8():
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd"], name="dq"),
             helper.make_node("Conv", ["x", "Wd"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    inits = [init("Wq", rand(4, 4, 3, 3, dtype=np.int8)), init("s", np.array(0.1, np.float32)),
             init("zp", np.array(0, np.int8))]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], inits))
    assert [layer.name for layer in a.layers] == ["c1"]
    assert a.totals.params == 144  # scale and zero point are not parameters
    assert a.totals.macs == CONV_MACS


def test_weight_dequantized_twice_counts_once():
    # quantizers that give every consumer its own DequantizeLinear ("dedicated QDQ pairs")
    # rebuild one stored int8 weight twice: it is one weight, counted once
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd1"], name="dq1"),
             helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd2"], name="dq2"),
             helper.make_node("Conv", ["x", "Wd1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "Wd2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    inits = [init("Wq", rand(4, 4, 3, 3, dtype=np.int8)), init("s", np.array(0.1, np.float32)),
             init("zp", np.array(0, np.int8))]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], inits))
    assert [layer.name for layer in a.layers] == ["c1", "c2"]
    assert [layer.params for layer in a.layers] == [144, 0]  # counted where first used
    assert a.totals.params == 144
    assert a.totals.macs == 2 * CONV_MACS
    # two different stored weights behind two DequantizeLinear still count twice
    inits.append(init("Wq2", rand(4, 4, 3, 3, dtype=np.int8)))
    nodes[1] = helper.make_node("DequantizeLinear", ["Wq2", "s", "zp"], ["Wd2"], name="dq2")
    assert sepify.analyze(make_model(nodes, [X4], ["y"], inits)).totals.params == 288


def test_weight_combined_from_two_stored_weights_counts_both():
    # weight normalization exported with its parameters: W = v * g (PyTorch's weight_norm has
    # v and g as parameters: 4*4*9 + 4); a second layer rebuilding W from v and its own g2
    # counts only g2
    nodes = [helper.make_node("Mul", ["v", "g"], ["W"], name="wn"),
             helper.make_node("Mul", ["v", "g2"], ["W2"], name="wn2"),
             helper.make_node("Conv", ["x", "W"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    inits = [init("v", rand(4, 4, 3, 3)), init("g", rand(4, 1, 1, 1)), init("g2", rand(4, 1, 1, 1))]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], inits))
    assert [layer.name for layer in a.layers] == ["c1", "c2"]
    assert [layer.params for layer in a.layers] == [144 + 4, 4]
    assert a.totals.param_bytes == 4 * (144 + 4 + 4)


def test_constant_mask_counts_what_it_is_made_from():
    # Swin's shifted-window attention mask as torch.onnx (dynamo) writes it: region ids
    # scattered into zeros (ConstantOfShape), differences of every window pair, then the two
    # masked_fill (Where) to 0 / -100: a 2x8x8 constant the model never stores. Its parameters are
    # what it is made from: the 4x4 zeros and the 2x4 stored region ids, not its 128 elements.
    def f32(name, v):
        return init(name, np.array(v, np.float32))

    def i64(name, v):
        return init(name, np.array(v, np.int64))

    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["zeros"], value=numpy_helper.from_array(np.array([0], np.float32))),
             helper.make_node("ScatterND", ["zeros", "rows", "ids"], ["img"]),
             helper.make_node("Reshape", ["img", "win_shape"], ["win"]),          # 2 windows of 8
             helper.make_node("Unsqueeze", ["win", "ax1"], ["w1"]),
             helper.make_node("Unsqueeze", ["win", "ax2"], ["w2"]),
             helper.make_node("Sub", ["w1", "w2"], ["diff"]),                      # 2x8x8
             helper.make_node("Equal", ["diff", "zero"], ["same"]),                # torch: diff.masked_fill(
             helper.make_node("Not", ["same"], ["other"]),                        #   diff != 0, -100)
             helper.make_node("Where", ["other", "minus100", "diff"], ["filled"]),  # .masked_fill(
             helper.make_node("Where", ["same", "zero", "filled"], ["mask"]),     #   diff == 0, 0)
             helper.make_node("Add", ["x", "mask"], ["y"], name="scores")]
    inits = [i64("shp", [4, 4]), i64("rows", [[2], [3]]), f32("ids", [[1, 1, 2, 2], [3, 3, 4, 4]]),
             i64("win_shape", [2, 8]), i64("ax1", [1]), i64("ax2", [2]), f32("zero", 0.0), f32("minus100", -100.0)]
    m = make_model(nodes, [vi("x", [2, 8, 8])], ["y"], inits)
    import onnxruntime as ort

    probe = make_model(nodes, [vi("x", [2, 8, 8])], ["y", "mask"], inits)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    mask = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["mask"], {"x": np.zeros((2, 8, 8), np.float32)})[0]
    assert mask.size == 128 and set(np.unique(mask)) == {-100.0, 0.0}
    a = sepify.analyze(m)
    assert [layer.name for layer in a.layers] == ["scores"]
    assert a.totals.params == 4 * 4 + 2 * 4  # the zeros and the stored ids; scalars are not
    assert a.totals.flops == 128  # the Add


def test_weight_through_transpose_of_constant():
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], name="t", perm=[1, 0, 2, 3]),
             helper.make_node("Conv", ["x", "W"], ["y"], name="c1", pads=[1, 1, 1, 1])]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], [init("Wt", rand(4, 4, 3, 3))]))
    assert a.totals.params == 144


def test_integer_shape_vectors_and_indices_are_not_parameters():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Gather", ["r", "idx"], ["y"], name="gather", axis=1)]
    inits = [init("shape", np.array([1, 144], np.int64)), init("idx", np.array([0, 5, 7], np.int64))]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], inits))
    assert a.totals.params == 0
    assert a.totals.buffers == 0


def test_embedding_table_is_a_parameter():
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="node", axis=0)
    layer, a = analyze_one(make_model([node], [vi("ids", [2, 7], TensorProto.INT64)], ["y"], [init("E", rand(10, 6))]))
    assert layer.params == 60
    assert layer.output_shapes == [[2, 7, 6]]


def test_batchnorm_mean_var_are_buffers():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    inits = [init("W", rand(4, 4, 3, 3)), init("scale", rand(4)), init("bias", rand(4)),
             init("mean", rand(4)), init("var", rand(4) + 5)]
    a = sepify.analyze(make_model(nodes, [X4], ["y"], inits))
    assert a.totals.macs == CONV_MACS  # BatchNorm adds no MACs
    assert a.totals.params == 144 + 4 + 4
    assert a.totals.buffers == 4 + 4


def test_ir3_initializers_listed_as_inputs():
    weights = [init("W", rand(4, 3, 3, 3)), init("B", rand(4)), init("shape", np.array([1, 64], np.int64)),
               init("F", rand(10, 64)), init("FB", rand(10))]
    inputs = [vi("x", [1, 3, 4, 4])] + [vi(t.name, list(t.dims), t.data_type) for t in weights]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("Gemm", ["r", "F", "FB"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "ir3", inputs, [vi("y", [1, 10])], initializer=weights)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    a = sepify.analyze(m)
    assert a.model["ir_version"] == 3
    assert [i["name"] for i in a.inputs] == ["x"]
    assert a.totals.unknown == 0
    assert a.totals.macs == 4 * 16 * 3 * 9 + 64 * 10 == 1_728 + 640
    assert a.totals.params == (4 * 27 + 4) + (640 + 10) == 762  # the int64 shape vector is not counted
    assert a.layer("reshape").output_shapes == [[1, 64]]  # data propagation read the shape constant


_BITS = [("INT2", 2), ("UINT2", 2), ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("FLOAT6E2M3", 6),
         ("FLOAT6E3M2", 6), ("FLOAT8E4M3FN", 8), ("FLOAT16", 16), ("FLOAT", 32), ("INT64", 64)]


@pytest.mark.parametrize("dtype, bits", [(d, b) for d, b in _BITS if hasattr(TensorProto, d)])  # (as onnx has them)
def test_item_sizes_of_packed_and_plain_types(dtype, bits):
    from sepify.model.graph import itemsize

    assert itemsize(getattr(TensorProto, dtype)) == bits / 8


# --- GridSample, RoiAlign -------------------------------------------------------------------
@pytest.mark.parametrize("mode, per_axis", [("bilinear", 3), ("nearest", 0), ("bicubic", 8)])
def test_grid_sample_interpolates_like_resize(mode, per_axis):
    # X (2,3,10,12) sampled at a (2,5,7,2) grid: Y (2,3,5,7); 2 spatial axes
    m = single_node_model("GridSample", [(2, 3, 10, 12), (2, 5, 7, 2)], mode=mode, opset=17)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[2, 3, 5, 7]]
    assert layer.macs == 0
    assert layer.flops == per_axis * 2 * (2 * 3 * 5 * 7)


def test_roi_align_with_a_fixed_sampling_ratio():
    # 6 boxes over X (1,8,20,20), 7x7 output, 2x2 samples per bin: Y (6,8,7,7)
    m = single_node_model("RoiAlign", [(1, 8, 20, 20), (6, 4), Input((6,), TensorProto.INT64)],
                          output_height=7, output_width=7, sampling_ratio=2)
    layer, _ = analyze_one(m)
    assert layer.output_shapes == [[6, 8, 7, 7]]
    assert layer.flops == 7 * 2 * 2 * (6 * 8 * 7 * 7)  # (2 axes x 3 + 1 to pool) per sample


def test_roi_align_with_an_adaptive_sampling_ratio_is_a_lower_bound_and_says_so():
    # sampling_ratio 0 (the default) follows each box's size at run time: at least 1 sample per bin
    m = single_node_model("RoiAlign", [(1, 8, 20, 20), (6, 4), Input((6,), TensorProto.INT64)],
                          output_height=7, output_width=7)
    layer, a = analyze_one(m)
    assert layer.flops == 7 * (6 * 8 * 7 * 7)
    assert "lower bound" in layer.note and layer.unknown is None and a.totals.unknown == 0
