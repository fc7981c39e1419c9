"""Benchmark: the time and memory of a calibrated rewrite (``sepify rewrite --calibration``).

Generates S smooth random inputs for the model's (single, float) input — low-resolution noise
upsampled, plus a per-sample offset and fine noise, so neighbouring pixels are correlated as in
images — and runs ``sepify.rewrite(model, calibration=..., <criterion>)``, then prints the
per-stage seconds and onnxruntime passes from the report, the per-layer predicted and measured
(holdout) relative output errors, the peak RSS and the load average. Timing, not accuracy:
the data are not the model's real inputs (see bench/bench_accuracy.py for task accuracy).

    python bench/bench_calibrate.py MODEL.onnx [--samples 256] [--target-ratio 0.5] [--rank R]
        [--calib-rows 16384] [--method als|refit] [--input-shape 1x224x224x3]
    python bench/bench_calibrate.py --prune-check   # does onnxruntime skip nodes no fetched output needs?

Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import onnx


def smooth_inputs(shape: list[int], n: int, seed: int = 0) -> np.ndarray:
    """[n, *shape] float32: blocky low-frequency noise (8x8 blocks over the two largest axes)."""
    rng = np.random.default_rng(seed)
    axes = sorted(range(len(shape)), key=lambda i: shape[i])[-2:]  # the spatial axes
    low_shape = [max(1, s // 8) if i in axes else s for i, s in enumerate(shape)]
    x = rng.standard_normal((n, *low_shape))
    for i in axes:
        x = np.repeat(x, -(-shape[i] // low_shape[i]), axis=i + 1)
    x = x[(slice(None),) + tuple(slice(0, s) for s in shape)]
    x = 0.8 * x + 0.2 * rng.standard_normal((n, *shape))
    return x.astype(np.float32)


def prune_check() -> None:
    """A graph with a cheap output (Relu of the input) and an expensive branch (6 3x3 convs,
    64 channels, 64x64): time fetching only the cheap one against fetching the branch."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [helper.make_node("Relu", ["x"], ["cheap"])], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"b{i}"], pads=[1, 1, 1, 1]))
        prev = f"b{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 64])],
                          [onnx.ValueInfoProto(name="cheap"), onnx.ValueInfoProto(name=prev)], inits)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((1, 64, 64, 64)).astype(np.float32)}
    times = {"cheap": [], prev: []}
    for _ in range(7):  # interleaved
        for name in times:
            t = time.perf_counter()
            s.run([name], x)
            times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"onnxruntime {ort.__version__}: fetching only the cheap output {med['cheap']:.2f} ms, the 6-conv branch "
          f"{med[prev]:.2f} ms (median of 7) -> {'pruned' if med['cheap'] < 0.2 * med[prev] else 'NOT pruned'}")


def main() -> None:
    import sys

    if "--prune-check" in sys.argv:
        prune_check()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--target-ratio", type=float)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--calib-rows", type=int, default=16384)
    ap.add_argument("--method", default="als")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the inputs (e.g. 60 for 0..255-like data)")
    ap.add_argument("--input-shape", help="e.g. 1x224x224x3 (default: the model's, symbols bound to 1)")
    args = ap.parse_args()

    import sepify

    model = onnx.load(args.model, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    if args.input_shape:
        shape = [int(d) for d in args.input_shape.split("x")]
    else:
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    data = {inp.name: smooth_inputs(shape, args.samples) * args.scale}
    crit = {"rank": args.rank} if args.rank else {"target_ratio": args.target_ratio or 0.5}
    t0 = time.perf_counter()
    result = sepify.rewrite(args.model, calibration=data, calib_rows=args.calib_rows, calib_method=args.method,
                            **crit)
    wall = time.perf_counter() - t0
    cal = result.report["calibration"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {os.path.basename(args.model)}: {len(result.layers)} convs rewritten ({crit}), "
          f"MACs ratio {result.report['totals']['macs_ratio']:.3f}")
    print(f"calibration: {cal['samples']} samples ({cal['fit_samples']} fit, {cal['holdout_samples']} holdout), "
          f"{cal['rows_per_layer']} rows/layer, {cal['method']}, sequential={cal['sequential']}")
    print(f"wall {wall:.1f} s (whole rewrite); stages {json.dumps(cal['seconds'])}; passes {json.dumps(cal['passes'])}")
    print(f"peak RSS {rss:.0f} MiB; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for r in result.layers:
        print(f"  {r.name}: {r.orientation} rank {r.rank}/{r.max_rank}: predicted {r.output_error_predicted:.4f}, "
              f"measured {r.output_error_measured if r.output_error_measured is None else round(r.output_error_measured, 4)}")


if __name__ == "__main__":
    main()
