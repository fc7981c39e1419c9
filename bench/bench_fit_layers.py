"""Held-out output error of the data-aware factorization on a trained model's 3x3 convs.

    python bench/bench_fit_layers.py MODEL.onnx [--train 48 --test 24 --rows 16384]

For a single-channel text-line model (e.g. ddddocr's ``common.onnx``: input ``[1, 1, 64, W]``):
inputs are captcha-like text lines rendered with Pillow (random strings, jitter, noise lines);
calibration and test images come from different seeds. Each 3x3 Conv's input is recorded with
onnxruntime (non-sequential: every layer sees the original model's activations), the factors
are fitted on the calibration rows and the relative output error is measured on ALL output
positions of the test images, for weight-only SVD, refit and ALS, several ridge strengths
``lam`` and both initialisations. Needs Pillow (not a sepify dependency).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from sepify.rewrite.factorize import LayerStats, fit, patches, reconstruct, spectrum

CHARS = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def render(rng, width=160, height=64):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (width, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(img)
    text = "".join(rng.choice(list(CHARS), size=int(rng.integers(4, 7))))
    x = int(rng.integers(2, 20))
    for ch in text:
        size = int(rng.integers(28, 44))
        font = ImageFont.load_default(size=size)
        draw.text((x, int(rng.integers(0, max(1, height - size)))), ch,
                  fill=int(rng.integers(0, 90)), font=font)
        x += int(size * rng.uniform(0.5, 0.8))
    for _ in range(int(rng.integers(1, 4))):
        pts = [tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height)))
               for _ in range(2)]
        draw.line(pts, fill=int(rng.integers(0, 150)), width=int(rng.integers(1, 3)))
    arr = np.asarray(img, np.float32) / 255.0
    arr = arr + rng.normal(0, 0.03, arr.shape).astype(np.float32)
    return arr[None, None]


def conv_nodes(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits[node.input[1]]
        if w.shape[2:] != (3, 3) or attrs.get("group", 1) != 1:
            continue
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue  # the bench only resolves explicit pads
        b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out.append((node.name, node.input[0], w.astype(np.float64),
                    None if b is None else b.astype(np.float64), attrs))
    return out


def activations(model, names, images):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    outs = [sess.run(None, {feed: img}) for img in images]
    return {n: np.concatenate([o[i] for o in outs]) for i, n in enumerate(names)}


def rel_err(y, yhat):
    return math.sqrt(np.sum((y - yhat) ** 2) / np.sum((y - y.mean(0)) ** 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--test", type=int, default=24)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--layers", type=int, default=4, help="how many 3x3 convs (spread out)")
    args = ap.parse_args()
    model = onnx.load(args.model)
    convs = conv_nodes(model)
    pick = np.unique(np.linspace(0, len(convs) - 1, args.layers).round().astype(int))
    convs = [convs[i] for i in pick]
    train = [render(np.random.default_rng(1000 + i)) for i in range(args.train)]
    test = [render(np.random.default_rng(9000 + i)) for i in range(args.test)]
    names = sorted({c[1] for c in convs})
    act_tr, act_te = activations(model, names, train), activations(model, names, test)
    ranks = [int(r) for r in args.ranks.split(",")]
    for name, inp, w, b, attrs in convs:
        b = np.zeros(w.shape[0]) if b is None else b
        geo = dict(kernel_shape=w.shape[2:], strides=attrs.get("strides"),
                   pads=attrs.get("pads"), dilations=attrs.get("dilations"))
        xtr = patches(act_tr[inp], **geo)
        rng = np.random.default_rng(0)
        if xtr.shape[0] > args.rows:
            xtr = xtr[np.sort(rng.choice(xtr.shape[0], args.rows, replace=False))]
        xte = patches(act_te[inp], **geo).astype(np.float64)
        stats = LayerStats.from_rows(xtr)
        wm = w.reshape(w.shape[0], -1)
        y = xte[:, 0] @ wm.T + b
        print(f"\n{name}: W {w.shape}, d = {wm.shape[1]}, calibration rows {xtr.shape[0]}, "
              f"test rows {xte.shape[0]}")
        for r in ranks:
            for orientation in ("dw-first", "pw-first"):
                spec = spectrum(w, 1, orientation)
                if r > spec.max_rank:
                    continue
                a0 = reconstruct(*spec.factors(r), orientation, 1, w.shape).reshape(wm.shape)
                line = [f"  r={r} {orientation}: weight-only {rel_err(y, xte[:, 0] @ a0.T + b):.4f}"]
                for method, init, lam in [("refit", "svd", 0.0), ("refit", "svd", 1e-4),
                                          ("refit", "svd", 1e-3), ("refit", "svd", 1e-2),
                                          ("refit", "svd", 1e-1), ("refit", "whitened", 1e-3),
                                          ("als", "svd", 1e-3), ("als", "whitened", 1e-3),
                                          ("als", "svd", 1e-2)]:
                    if init == "whitened" and orientation == "pw-first":
                        continue
                    t0 = time.process_time()
                    f = fit(w, b, 1, orientation, r, stats, method=method, lam=lam, init=init)
                    cpu = time.process_time() - t0
                    a = reconstruct(f.first, f.second, orientation, 1, w.shape).reshape(wm.shape)
                    test_err = rel_err(y, xte[:, 0] @ a.T + f.bias)
                    line.append(f"{method}/{init}/lam={lam:g}: fit {f.error:.4f} "
                                f"test {test_err:.4f} ({cpu:.1f}s)")
                print("\n      ".join(line))


if __name__ == "__main__":
    main()
