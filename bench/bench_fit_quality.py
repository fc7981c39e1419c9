"""Benchmark: which fit choices help at high compression, per layer and on the task.

On ddddocr's captcha recognizer and bench_accuracy.py's broad captcha task (calibration seed 1,
test seed 2), one conv-MAC budget (default 0.3x), calibrated rewrites in several variants:

* ``dw-first`` / ``pw-first`` / ``auto`` orientation (``--orientation``),
* ``als`` vs ``refit`` (``--calib-method``: ALS sweeps, or only the closed-form second factor),
* the refit of kept convs on / off (``--no-refit-kept``), sensitivity ``measured`` / ``none``.

For each variant: the task score (exact match, char accuracy), the agreement with the original
model's strings, and per layer the (orientation, rank) chosen and the relative output error
predicted on the fit samples / measured on the held-out samples. Figures printed, nothing asserted.

    python bench/bench_fit_quality.py --model /tmp/pkgs/x/ddddocr/common.onnx --ratio 0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "default (dw-first, als, refit kept, measured)": {},
    "refit only (no ALS)": {"calib_method": "refit"},
    "pw-first": {"orientation": "pw-first"},
    "auto orientation": {"orientation": "auto"},
    "no refit of kept convs": {"refit_kept": False},
    "sensitivity none": {"sensitivity": "none"},
    "as before (sensitivity none, no refit of kept convs)": {"sensitivity": "none", "refit_kept": False},
}


def main(argv=None) -> int:
    import bench_accuracy as B

    import sepify

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--variants", help="comma-separated indices into the list above (default all)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    task, x_cal, x_test, y_test = B.broad_captcha(args.model, args.cache_dir, args.n_calib, args.n_test)
    before = sepify.analyze(str(task.model), dims=task.dims).to_dict()
    total, conv = before["totals"]["macs"], B.conv_macs(before)
    ref = task.predict(B.session(task.model, 1), x_test)
    base = task.score(ref, y_test)
    print(f"original: exact match {base['exact match']['value']:.1%}, char accuracy {base['char accuracy']['value']:.1%}")
    names = list(VARIANTS)
    pick = [names[int(i)] for i in args.variants.split(",")] if args.variants else names
    out = {"original": base, "ratio": args.ratio, "variants": {}}
    for name in pick:
        t = time.perf_counter()
        res = sepify.rewrite(str(task.model), sepify.RewriteOptions(target_macs=int(total - (1 - args.ratio) * conv),
                                                                      **VARIANTS[name]),
                             dims=task.dims, calibration={task.input_name: x_cal})
        secs = time.perf_counter() - t
        preds = task.predict(B.session(res.model, 1), x_test)
        sc = task.score(preds, y_test)
        agree = sum(task.same(a, b) for a, b in zip(preds, ref)) / len(ref)
        layers = {r.name: {"o": r.orientation, "r": r.rank, "pred": r.output_error_predicted,
                           "meas": r.output_error_measured} for r in res.layers}
        for f in res.report.get("refitted") or []:
            layers[f["name"]] = {"o": "kept", "r": None, "pred": f["output_error_predicted"],
                                 "meas": f["output_error_measured"], "before": f["output_error_before"]}
        out["variants"][name] = {"score": sc, "agree": agree, "seconds": secs, "layers": layers,
                                 "macs_ratio": res.report["totals"]["macs_ratio"]}
        print(f"{name}: exact match {sc['exact match']['value']:.1%} (Δ {sc['exact match']['value'] - base['exact match']['value']:+.1%}), "
              f"char {sc['char accuracy']['value']:.1%}, same string as the original {agree:.1%}, {secs:.0f} s", flush=True)
        for n, l in layers.items():
            meas = "-" if l["meas"] is None else f"{l['meas']:.3f}"
            what = "kept, refitted" if l["o"] == "kept" else f"{l['o']} r{l['r']}"
            print(f"    {n:>8} {what:>16}: predicted {l['pred']:.3f} / measured {meas}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
