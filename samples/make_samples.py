#!/usr/bin/env python3
"""Build the sample ONNX models used by sepify's tests, docs and benchmarks.

Every builder is deterministic (fixed-seed ``numpy.random.default_rng``), uses
float32 tensors, opset 17 and IR version 8, names every node and calls the graph
input ``input`` (NCHW) and the graph output ``output``.  Models are built with
``onnx.helper`` / ``onnx.numpy_helper`` only.

Usage::

    python samples/make_samples.py            # small committed samples, next to this file
    python samples/make_samples.py --large    # ... plus large ones in samples/large/ (git-ignored)
    python samples/make_samples.py --out DIR  # write somewhere else

The module is importable (``sys.path.insert(0, "samples"); import make_samples``)
so tests can build models in memory.  See ``samples/README.md`` for the expected
MAC and parameter counts of each model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "sepify-samples"

#: MobileNet v1 (Howard et al. 2017, Table 1): (pointwise output channels, depthwise stride)
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)

#: Small committed samples: file name -> builder (no arguments).
SMALL_SAMPLES = {
    "worked_example.onnx": lambda: worked_example(separable=False),
    "worked_example_separable.onnx": lambda: worked_example(separable=True),
    "tiny_cnn.onnx": lambda: tiny_cnn(),
}

#: Large samples written to ``DIR/large/`` with ``--large`` (git-ignored).
LARGE_SAMPLES = {
    "mobilenet_v1.onnx": lambda: mobilenet_v1(),
    "mobilenet_v1_bn.onnx": lambda: mobilenet_v1(batchnorm=True),
    "conv_mobilenet.onnx": lambda: mobilenet_v1(conv_only=True),
    "conv_chain_50k.onnx": lambda: conv_chain(25_000),
    # ~1.9 MB (the 256x1000 FC alone is 1 MB), too big to commit: lives here instead.
    "mobilenet_v1_w025_128.onnx": lambda: mobilenet_v1(resolution=128, width=0.25),
}


# --------------------------------------------------------------------------- helpers


class _Builder:
    """Accumulates nodes and initializers for one graph; names must be unique."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, name: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        if name in self._names:
            raise ValueError(f"duplicate node name {name!r}")
        self._names.add(name)
        out = output if output is not None else f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def he_normal(self, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32)

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        kernel: tuple[int, int],
        *,
        stride: int = 1,
        pads: Sequence[int] = (0, 0, 0, 0),
        group: int = 1,
        bias: bool = False,
        output: str | None = None,
    ) -> str:
        kh, kw = kernel
        fan_in = (cin // group) * kh * kw
        w = self._init(f"{name}.weight", self.he_normal((cout, cin // group, kh, kw), fan_in))
        inputs = [x, w]
        if bias:
            inputs.append(self._init(f"{name}.bias", (self.rng.standard_normal(cout) * 0.01).astype(np.float32)))
        return self.node(
            "Conv",
            name,
            inputs,
            output,
            kernel_shape=[kh, kw],
            strides=[stride, stride],
            pads=list(pads),
            dilations=[1, 1],
            group=group,
        )

    def batchnorm(self, name: str, x: str, c: int) -> str:
        rng = self.rng
        scale = self._init(f"{name}.scale", rng.uniform(0.8, 1.2, c))
        bias = self._init(f"{name}.bias", rng.normal(0.0, 0.05, c))
        mean = self._init(f"{name}.mean", rng.normal(0.0, 0.05, c))
        var = self._init(f"{name}.var", rng.uniform(0.5, 1.5, c))  # strictly positive
        return self.node("BatchNormalization", name, [x, scale, bias, mean, var], epsilon=1e-5)

    def gemm(self, name: str, x: str, cin: int, cout: int, output: str | None = None) -> str:
        # PyTorch convention: weight is (out, in) and transB=1.
        w = self._init(f"{name}.weight", self.he_normal((cout, cin), cin, gain=1.0))
        b = self._init(f"{name}.bias", (self.rng.standard_normal(cout) * 0.01).astype(np.float32))
        return self.node("Gemm", name, [x, w, b], output, alpha=1.0, beta=1.0, transB=1)

    def model(
        self,
        graph_name: str,
        input_shape: Sequence[int | str],
        output_shape: Sequence[int | str],
        doc: str = "",
    ) -> onnx.ModelProto:
        return _make_model(graph_name, self.nodes, self.inits, input_shape, output_shape, doc)


def _make_model(
    graph_name: str,
    nodes: Sequence[onnx.NodeProto],
    inits: Sequence[onnx.TensorProto],
    input_shape: Sequence[int | str],
    output_shape: Sequence[int | str],
    doc: str = "",
) -> onnx.ModelProto:
    """One float input ``input``, one float output ``output``; opset, IR version and producer
    the same for every sample."""
    graph = helper.make_graph(
        list(nodes),
        graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(output_shape))],
        initializer=list(inits),
        doc_string=doc,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
    )


def _same_pad(k: int) -> list[int]:
    p = k // 2
    return [p, p, p, p]


# --------------------------------------------------------------------------- builders


def worked_example(separable: bool = False) -> onnx.ModelProto:
    """The README worked example on a 1x3x8x8 input, 5x5 'same' conv to 256 channels.

    Standard: one Conv 3->256, 5x5, pads 2, no bias:
    8*8*256*3*5*5 = 1,228,800 MACs, 19,200 weights.

    Separable: depthwise Conv (group 3, 5x5, pads 2) + pointwise 1x1 Conv 3->256:
    8*8*3*5*5 = 4,800 + 8*8*3*256 = 49,152 MACs; 75 + 768 weights.
    """
    b = _Builder(seed=1)
    if separable:
        h = b.conv("dw", "input", 3, 3, (5, 5), pads=_same_pad(5), group=3)
        b.conv("pw", h, 3, 256, (1, 1), output="output")
    else:
        b.conv("conv", "input", 3, 256, (5, 5), pads=_same_pad(5), output="output")
    name = "worked_example_separable" if separable else "worked_example"
    return b.model(name, [1, 3, 8, 8], [1, 256, 8, 8], doc=worked_example.__doc__ or "")


def tiny_cnn() -> onnx.ModelProto:
    """A small but varied CNN on 1x3x32x32 (see samples/README.md for the cost table).

    conv1 3->16 3x3 p1 +bias (32x32) -> bn1 -> relu1
    conv2 16->32 3x3 s2 p0 +bias (15x15) -> relu2
    block3.dw 32 3x3 group 32 p0 (13x13) -> block3.pw 1x1 32->32 -> block3.relu
    pool MaxPool 2x2 s2 (6x6)
    conv4 32->32 5x3 pads [2,1,2,1] (6x6) -> relu4
    gap -> flatten -> fc Gemm 32->10 +bias -> softmax
    """
    b = _Builder(seed=2)
    h = b.conv("conv1", "input", 3, 16, (3, 3), pads=[1, 1, 1, 1], bias=True)
    h = b.batchnorm("bn1", h, 16)
    h = b.node("Relu", "relu1", [h])
    h = b.conv("conv2", h, 16, 32, (3, 3), stride=2, bias=True)
    h = b.node("Relu", "relu2", [h])
    h = b.conv("block3.dw", h, 32, 32, (3, 3), group=32)
    h = b.conv("block3.pw", h, 32, 32, (1, 1))
    h = b.node("Relu", "block3.relu", [h])
    h = b.node("MaxPool", "pool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.conv("conv4", h, 32, 32, (5, 3), pads=[2, 1, 2, 1])
    h = b.node("Relu", "relu4", [h])
    h = b.node("GlobalAveragePool", "gap", [h])
    h = b.node("Flatten", "flatten", [h], axis=1)
    h = b.gemm("fc", h, 32, 10)
    b.node("Softmax", "softmax", [h], "output", axis=1)
    return b.model("tiny_cnn", [1, 3, 32, 32], [1, 10], doc=tiny_cnn.__doc__ or "")


def mobilenet_v1(
    resolution: int = 224,
    width: float = 1.0,
    batchnorm: bool = False,
    conv_only: bool = False,
    batch: int | str = 1,
) -> onnx.ModelProto:
    """MobileNet v1 (Howard et al. 2017, Table 1) with random weights.

    conv1 3x3 s2 3->32 (pads 1), then 13 blocks of depthwise 3x3 (pads 1, the block's
    stride) + Relu + pointwise 1x1 + Relu, GlobalAveragePool, Flatten, Gemm ->1000
    (+bias), Softmax.  Convs have no bias.  Channel counts are ``int(c * width)``.

    ``batchnorm``: a BatchNormalization after every Conv (before its Relu).
    ``conv_only``: the paper's "Conv MobileNet": each block's depthwise + pointwise pair
    is one standard 3x3 Conv (node ``blockK.conv``) with the block's stride, pads 1.
    ``batch``: an int, or a string to make the batch dimension symbolic (dim_param).

    At 224 / width 1.0: 568,740,352 MACs and 4,210,088 parameters; conv_only:
    4,867,293,184 MACs and 29,282,120 parameters (conv weights + FC weight + FC bias).
    """

    def ch(c: int) -> int:
        return max(1, int(c * width))

    def after_conv(name: str, h: str, c: int, relu_name: str) -> str:
        if batchnorm:
            h = b.batchnorm(f"{name}.bn", h, c)
        return b.node("Relu", relu_name, [h])

    b = _Builder(seed=3)
    c = ch(32)
    h = b.conv("conv1", "input", 3, c, (3, 3), stride=2, pads=[1, 1, 1, 1])
    h = after_conv("conv1", h, c, "conv1.relu")
    for k, (out, stride) in enumerate(MOBILENET_V1_BLOCKS, start=1):
        cout = ch(out)
        if conv_only:
            name = f"block{k}.conv"
            h = b.conv(name, h, c, cout, (3, 3), stride=stride, pads=[1, 1, 1, 1])
            h = after_conv(name, h, cout, f"block{k}.relu")
        else:
            name = f"block{k}.dw"
            h = b.conv(name, h, c, c, (3, 3), stride=stride, pads=[1, 1, 1, 1], group=c)
            h = after_conv(name, h, c, f"{name}.relu")
            name = f"block{k}.pw"
            h = b.conv(name, h, c, cout, (1, 1))
            h = after_conv(name, h, cout, f"{name}.relu")
        c = cout
    h = b.node("GlobalAveragePool", "pool", [h])
    h = b.node("Flatten", "flatten", [h], axis=1)
    h = b.gemm("fc", h, c, 1000)
    b.node("Softmax", "softmax", [h], "output", axis=1)

    name = "conv_mobilenet_v1" if conv_only else "mobilenet_v1"
    name += f"_w{width:g}_{resolution}" + ("_bn" if batchnorm else "")
    return b.model(name, [batch, 3, resolution, resolution], [batch, 1000], doc=mobilenet_v1.__doc__ or "")


def conv_chain(n_pairs: int, channels: int = 8, spatial: int = 8) -> onnx.ModelProto:
    """A chain of ``n_pairs`` x (1x1 Conv channels->channels with bias, Relu).

    2 * n_pairs nodes; n_pairs * spatial^2 * channels^2 MACs and
    n_pairs * (channels^2 + channels) parameters.  Weights are identity plus small
    noise so that activations stay bounded even through 25,000 layers.
    """
    if n_pairs < 1:
        raise ValueError("n_pairs must be >= 1")
    rng = np.random.default_rng(4)
    eye = np.eye(channels, dtype=np.float32)
    weights = (eye + rng.standard_normal((n_pairs, channels, channels)) * (0.01 / np.sqrt(channels))).astype(
        np.float32
    )
    weights = weights.reshape(n_pairs, channels, channels, 1, 1)
    biases = (rng.standard_normal((n_pairs, channels)) * 0.001).astype(np.float32)

    make_node = helper.make_node
    from_array = numpy_helper.from_array
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "input"
    last = n_pairs
    for i in range(1, n_pairs + 1):
        conv, relu = f"conv{i}", f"relu{i}"
        w, bias = f"{conv}.weight", f"{conv}.bias"
        inits.append(from_array(weights[i - 1], w))
        inits.append(from_array(biases[i - 1], bias))
        nodes.append(
            make_node("Conv", [x, w, bias], [f"{conv}_out"], name=conv, kernel_shape=[1, 1], strides=[1, 1],
                      pads=[0, 0, 0, 0])
        )
        x = "output" if i == last else f"{relu}_out"
        nodes.append(make_node("Relu", [f"{conv}_out"], [x], name=relu))
    shape = [1, channels, spatial, spatial]
    return _make_model(f"conv_chain_{n_pairs}", nodes, inits, shape, shape)


# --------------------------------------------------------------------------- CLI


def _write(model: onnx.ModelProto, path: Path) -> int:
    data = model.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``make_samples.py [--out DIR] [--large]``; returns the exit code (0)."""
    parser = argparse.ArgumentParser(description="Generate sepify's sample ONNX models.")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output directory (default: the directory of this script)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also write the large models into OUT/large/ (git-ignored)",
    )
    args = parser.parse_args(argv)

    jobs = [(args.out / name, build) for name, build in SMALL_SAMPLES.items()]
    if args.large:
        jobs += [(args.out / "large" / name, build) for name, build in LARGE_SAMPLES.items()]
    for path, build in jobs:
        size = _write(build(), path)
        print(f"{path}  {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
