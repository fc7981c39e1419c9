"""Benchmark: latency of a dense 3x3 Conv vs its rank-r depthwise + pointwise pair in each graph
form (native multiplier-r depthwise, split = r multiplier-1 depthwise convs + Concat, tiled = input
repeated r times + one multiplier-1 depthwise conv), in onnxruntime's CPU provider.

Per layer shape (C -> C channels, H x W input, 3x3, pad 1, batch 1) one interleaved measurement of
the dense conv and every (rank, form), with sepify's own timer (sepify.rewrite.measure.OrtTimer:
warm-up, interleaved rounds, medians, ORT_ENABLE_ALL). Printed: milliseconds per run (median)
and the speed-up over the dense conv (median of per-round ratios), the fastest form marked.
Nothing is asserted.

    python bench/bench_latency.py [--threads 1] [--rounds 9] [--orientation dw-first] [--ranks 1-6] [--context relu]

``--context relu`` times every variant as ``--objective latency`` does (sepify.rewrite.measure.Context):
a 1x1 depthwise conv before and after it (an NCHWc producer and consumer) and a Relu after it, so
that a form that leaves onnxruntime's NCHWc layout or loses the Conv + Relu fusion pays for it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sepify.rewrite import measure
from sepify.rewrite.emit import FORMS

SHAPES = [(32, 56), (64, 56), (128, 56), (64, 28), (128, 28), (256, 28), (128, 14), (256, 14), (256, 7), (512, 7)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--orientation", default="dw-first", choices=["dw-first", "pw-first"])
    ap.add_argument("--ranks", default="1-6")
    ap.add_argument("--shapes", default=None, help="e.g. 64x56,128x28 (channels x spatial)")
    ap.add_argument("--context", default="none", choices=["none", "relu"],
                    help="relu: each variant between NCHWc stand-ins, followed by a Relu (as --objective latency times)")
    ap.add_argument("--clock", default="wall", choices=["wall", "process"],
                    help="wall: elapsed time; process: CPU time of this process (with --threads 1, the latency "
                         "without the time a shared machine gave to other processes)")
    args = ap.parse_args()
    lo, _, hi = args.ranks.partition("-")
    ranks = list(range(int(lo), int(hi or lo) + 1))
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    timer = measure.OrtTimer(threads=args.threads or None, rounds=args.rounds, clock=args.clock)
    info = measure.runtime_info(args.threads or None, args.clock)
    print(f"# {info['runtime']}, {info['provider']}, {info['graph_optimization']}, {info['threads_note']}, "
          f"CPU {info['cpu']}, load average {os.getloadavg()[0]:.2f}")
    print(f"# clock: {args.clock}; context: {args.context}; {args.orientation}, 3x3 pad 1, batch 1; ms = median per run; (x) = speed-up vs dense "
          f"(median of per-round ratios); * = fastest form at that rank")
    header = ["layer", "dense ms"] + [f"r={r}" for r in ranks]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    split_never_slower = True
    t_start = time.perf_counter()
    counts = {f: 0 for f in FORMS}
    for c, hw in shapes:
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
        spec = measure.layer_spec([1, c, hw, hw], np.zeros((c, c, 3, 3), np.float32), True, attrs, 17)
        cands = [(args.orientation, r, f) for r in ranks for f in measure.forms_for("auto", r)]
        ctx = None
        if args.context == "relu":
            from onnx import helper

            relu = helper.make_node("Relu", ["y"], ["t0"], name="chain0").SerializeToString()
            ctx = measure.Context((relu,), (), (), (("t0", True),), True, "Relu")
        feeds = measure.layer_feeds(spec, ctx)
        variants = [measure.Variant("layer", "original", measure.original_model(spec, ctx=ctx), feeds, spec, ctx)]
        variants += [measure.Variant("layer", k, measure.pair_model(spec, *k, ctx=ctx), feeds, spec, ctx) for k in cands]
        timings = timer(variants)
        dense = timings[0]
        by = {k: t for k, t in zip(cands, timings[1:])}
        cells = [f"{c}->{c} @{hw}x{hw}", f"{dense.median * 1e3:.3f}"]
        for r in ranks:
            forms = [f for f in measure.forms_for("auto", r)]
            best = min(forms, key=lambda f: by[(args.orientation, r, f)].median)
            if r > 1:
                counts[best] += 1
                if by[(args.orientation, r, "split")].median > by[(args.orientation, r, "native")].median:
                    split_never_slower = False
            parts = []
            for f in forms:
                t = by[(args.orientation, r, f)]
                sp = 1.0 / measure.paired_ratio(t, dense)
                label = "" if r == 1 else f[0]
                parts.append(f"{label}{t.median * 1e3:.3f} ({sp:.2f}x){'*' if f == best and r > 1 else ''}")
            cells.append("<br>".join(parts) if r > 1 else parts[0])
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n# forms: n = native, s = split, t = tiled. Fastest form over all (shape, rank > 1): "
          f"{', '.join(f'{f} {n}' for f, n in counts.items())}; split never slower than native: {split_never_slower}; "
          f"{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
