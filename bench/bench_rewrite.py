"""Benchmark: rewriting a VGG-16-sized model (138M parameters) at rank 1.

Builds VGG-16 (13 3x3 convs + 3 FC, 224x224, float32 random weights) with onnx.helper, saves
it, and measures in one run:
  * onnx.load + onnx.save of the model (the floor: reading and writing ~550 MB);
  * ``sepify.rewrite`` (load, shape inference, SVD of every eligible conv, graph edit, checker,
    analysis before/after) + ``RewriteResult.save``.
Figures are printed; nothing is asserted.

    python bench/bench_rewrite.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x, c, k = "input", 3, 0
    for item in CFG:
        if item == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{k}"], kernel_shape=[2, 2], strides=[2, 2], name=f"pool{k}"))
            x = f"pool{k}"
            continue
        k += 1
        w = (rng.standard_normal((item, c, 3, 3), dtype=np.float32) * np.sqrt(2 / (9 * c))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{k}.w"), numpy_helper.from_array(np.zeros(item, np.float32), f"conv{k}.b")]
        nodes.append(helper.make_node("Conv", [x, f"conv{k}.w", f"conv{k}.b"], [f"conv{k}"], pads=[1, 1, 1, 1], name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}"))
        x, c = f"relu{k}", item
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten"))
    x, width = "flat", 512 * 7 * 7
    for j, out in enumerate((4096, 4096, 1000), 1):
        w = (rng.standard_normal((out, width), dtype=np.float32) * np.sqrt(1 / width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{j}.w"), numpy_helper.from_array(np.zeros(out, np.float32), f"fc{j}.b")]
        nodes.append(helper.make_node("Gemm", [x, f"fc{j}.w", f"fc{j}.b"], [f"fc{j}"], transB=1, name=f"fc{j}"))
        x, width = f"fc{j}", out
    g = helper.make_graph(nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1000])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    import sepify

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "vgg16.onnx", Path(tmp) / "vgg16.sep.onnx"
        t = time.perf_counter()
        onnx.save(vgg16(), str(src))
        print(f"built and saved VGG-16: {src.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s")
        floor = mid = total = float("inf")
        for _ in range(3):  # best of 3: the figures are dominated by memory and disk traffic
            t = time.perf_counter()
            onnx.save(onnx.load(str(src)), str(Path(tmp) / "copy.onnx"))
            floor = min(floor, time.perf_counter() - t)
            t = time.perf_counter()
            result = sepify.rewrite(str(src), rank=1)
            mid = min(mid, time.perf_counter() - t)
            result.save(out)
            total = min(total, time.perf_counter() - t)
        print(f"onnx.load + onnx.save:            {floor:6.2f} s   (best of 3)")
        print(f"sepify.rewrite (in memory):       {mid:6.2f} s")
        print(f"sepify.rewrite + save:            {total:6.2f} s   ({total - floor:+.2f} s beyond load + save)")
        tb, ta = result.report["totals"]["before"], result.report["totals"]["after"]
        print(f"rewrote {len(result.layers)} convs: MACs {tb['macs']:,} -> {ta['macs']:,}, params {tb['params']:,} -> {ta['params']:,}")


if __name__ == "__main__":
    main()
