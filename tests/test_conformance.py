"""Every model that the installed ``onnx`` package ships under ``onnx/backend/test/data/`` is
analyzed without a crash; the ``pytorch-converted/test_Conv*`` models' MACs are checked against
a hand formula from their declared shapes and attributes.

All of them are valid models, so all must succeed. (Several are IR version 3 models that list
their initializers as graph inputs, which the loader must handle; the ``light/`` models carry
all their weights as ``ConstantOfShape`` nodes.) ``INVALID`` lists models that are expected to
be rejected with a ``ModelError`` -- none at the moment.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

import sepify
from conftest import onnx_backend_data_dir
from sepify.errors import ModelError

DATA = onnx_backend_data_dir()
MODELS = sorted(DATA.rglob("*.onnx"))
INVALID: dict[str, str] = {}  # relative path -> why the model is genuinely invalid


def _id(path: Path) -> str:
    return str(path.relative_to(DATA))


def test_backend_models_exist():
    assert len(MODELS) > 100, f"only {len(MODELS)} models under {DATA}"


@pytest.mark.parametrize("path", MODELS, ids=_id)
def test_backend_model_analyzes(path):
    rel = _id(path)
    if rel in INVALID:
        with pytest.raises(ModelError) as e:
            sepify.analyze(path)
        assert rel.split("/")[-1] in str(e.value) or str(path) in str(e.value)
        return
    a = sepify.analyze(path)
    d = a.to_dict()
    assert d["totals"]["unknown"] == sum(1 for r in d["layers"] if r["unknown"])
    assert d["totals"]["macs"] >= 0 and d["totals"]["params"] >= 0
    for row in d["layers"]:
        # unknown means "no rule" or "shape unknown", never a rule tripping over a malformed node
        assert not (row["unknown"] or "").startswith("malformed"), (row["name"], row["unknown"])
        assert (row["macs"] is None) == bool(row["unknown"])


def _conv_models():
    return sorted(p for p in (DATA / "pytorch-converted").glob("test_Conv*/model.onnx"))


def _declared(model: onnx.ModelProto):
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    return shapes


def _reference_output_shape(path: Path):
    """The shape of the reference output stored next to the model (test_data_set_0/output_0.pb)."""
    t = onnx.TensorProto()
    t.ParseFromString((path.parent / "test_data_set_0" / "output_0.pb").read_bytes())
    return list(numpy_helper.to_array(t).shape)


def test_conv_models_found():
    names = {p.parent.name for p in _conv_models()}
    assert {"test_Conv1d", "test_Conv2d_depthwise_with_multiplier", "test_Conv3d_dilated_strided",
            "test_ConvTranspose2d"} <= names


@pytest.mark.parametrize("path", _conv_models(), ids=lambda p: p.parent.name)
def test_pytorch_conv_macs_by_hand(path):
    model = onnx.load(str(path))
    (node,) = model.graph.node
    shapes = _declared(model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x, w = shapes[node.input[0]], shapes[node.input[1]]
    batch, c_in, in_spatial = x[0], x[1], x[2:]
    kernel = w[2:]
    group = attrs.get("group", 1)
    nd = len(kernel)
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    pads = attrs.get("pads", [0] * (2 * nd))
    assert "auto_pad" not in attrs or attrs["auto_pad"] in (b"NOTSET", "NOTSET")
    if node.op_type == "Conv":
        c_out = w[0]
        assert w[1] == c_in // group
        out_spatial = [(i + pads[a] + pads[a + nd] - dilations[a] * (k - 1) - 1) // strides[a] + 1
                       for a, (i, k) in enumerate(zip(in_spatial, kernel))]
        expected = batch * c_out * math.prod(out_spatial) * (c_in // group) * math.prod(kernel)
    else:  # ConvTranspose, counted on the input size
        assert node.op_type == "ConvTranspose"
        c_out = w[1] * group
        out_pad = attrs.get("output_padding", [0] * nd)
        out_spatial = [strides[a] * (i - 1) + out_pad[a] + (k - 1) * dilations[a] + 1 - pads[a] - pads[a + nd]
                       for a, (i, k) in enumerate(zip(in_spatial, kernel))]
        expected = batch * c_in * (c_out // group) * math.prod(kernel) * math.prod(in_spatial)
    # the shapes we derived agree with the model's declared output and its reference data
    declared_out = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert declared_out == [batch, c_out, *out_spatial]
    assert _reference_output_shape(path) == declared_out

    a = sepify.analyze(path)
    (layer,) = a.layers
    assert layer.output_shapes == [declared_out]
    assert layer.macs == expected
    assert a.totals.macs == expected
    n_bias = c_out if len(node.input) > 2 and node.input[2] else 0
    assert layer.params == math.prod(w) + n_bias
    assert a.totals.unknown == 0


# Published figures of the same architectures in torchvision's weights metadata
# (``num_params`` and ``_ops``, the table's "GFLOPS", which counts multiply-accumulates; params
# are sum(p.numel()), BatchNorm scale/bias included, running statistics not). The
# ``light/`` models carry every weight as a ConstantOfShape node, so this also checks that
# parameters produced by ConstantOfShape are counted exactly.
TORCHVISION = {
    "light/light_resnet50.onnx": (25_557_032, 4.089),
    "light/light_vgg19.onnx": (143_667_240, 19.632),
    "light/light_squeezenet.onnx": (1_235_496, 0.349),  # squeezenet1_1
}


@pytest.mark.parametrize("rel", sorted(TORCHVISION))
def test_light_models_match_torchvision(rel):
    params, gmacs = TORCHVISION[rel]
    a = sepify.analyze(DATA / rel)
    assert a.totals.unknown == 0
    assert a.totals.params == params
    assert round(a.totals.macs / 1e9, 3) == gmacs
    assert any("IR version 3" in n for n in a.notes)
