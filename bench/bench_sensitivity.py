"""Benchmark: how well the measured sensitivities (sepify.rewrite.sensitivity) predict what a
calibrated rewrite does to the model's outputs, on ddddocr's captcha recognizer and the broad
captcha task of bench_accuracy.py (calibration and test sets from different seeds).

Three checks, figures printed (nothing asserted):

1. **Interpolation between measured ranks.** The rewrite measures each layer's output distortion
   ``D_l(r)`` at ranks {1, 3} and interpolates the amplification ``a_l(r) = D_l(r) / eps_l(r)^2``
   in between. Here the same rewrite is also measured at ranks 1..5 directly: for ranks 2, 4 and 5
   the interpolated ``a_l(r) * eps_l(r)^2`` is compared with the measured ``D_l(r)``.
2. **Additivity.** For the allocation a budget chose, the sum of the layers' predicted
   distortions (``layers[].distortion_predicted``) against the distortion of the whole rewritten
   model measured on the test set (KL of the CTC logits, the same measure). The sequential fit and
   the refit of kept convs lower the real figure below the sum: the ratio says by how much.
3. **Rank of layers by amplification**, to see which layers the network amplifies.

    python bench/bench_sensitivity.py --model /tmp/pkgs/x/ddddocr/common.onnx --ratios 0.5,0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    import bench_accuracy as B

    import sepify
    from sepify.rewrite import sensitivity as S

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--ratios", default="0.5,0.3")
    ap.add_argument("--cache-dir")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    task, x_cal, x_test, y_test = B.broad_captcha(args.model, args.cache_dir, args.n_calib, args.n_test)
    dims = task.dims
    before = sepify.analyze(str(task.model), dims=dims).to_dict()
    total, conv = before["totals"]["macs"], B.conv_macs(before)
    out: dict = {"n_calib": args.n_calib, "n_test": args.n_test, "ratios": {}}
    calib = {task.input_name: x_cal}

    def rewrite(ratio, **kw):
        t = time.perf_counter()
        res = sepify.rewrite(str(task.model), sepify.RewriteOptions(target_macs=int(total - (1 - ratio) * conv),
                                                                      cache=False, **kw),
                             dims=dims, calibration=calib)
        return res, time.perf_counter() - t

    # 1. interpolation
    ratio0 = float(args.ratios.split(",")[0])
    base, secs = rewrite(ratio0)
    table = base.report["calibration"]["sensitivity"]["layers"]
    saved = S.DEFAULT_RANKS
    S.DEFAULT_RANKS = (1, 2, 3, 4, 5)
    try:
        full, secs_full = rewrite(ratio0)
    finally:
        S.DEFAULT_RANKS = saved
    dense = full.report["calibration"]["sensitivity"]["layers"]
    rows = []
    for name, t in table.items():
        sens = S.LayerSensitivity.from_dict(name, t)
        d = dense[name]
        for r in (2, 4, 5):
            if r not in d["ranks"]:
                continue
            j = d["ranks"].index(r)
            pred = sens.factor(r) * d["rel_error"][j] ** 2
            rows.append({"layer": name, "rank": r, "measured": d["distortion"][j], "interpolated": pred,
                         "ratio": pred / d["distortion"][j] if d["distortion"][j] else None})
    out["interpolation"] = rows
    print(f"1. interpolation ({len(rows)} points; sensitivity pass {secs:.0f} s at ranks 1,3 vs "
          f"{secs_full:.0f} s at 1..5):")
    for r in rows:
        print(f"   {r['layer']:>8} rank {r['rank']}: measured {r['measured']:.4g}, interpolated {r['interpolated']:.4g} "
              f"(x{r['ratio']:.2f})")
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    if ratios:
        print(f"   interpolated / measured: median {np.median(ratios):.2f}, range {min(ratios):.2f}..{max(ratios):.2f}")

    # 2. additivity, per budget
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(task.model), so, providers=["CPUExecutionProvider"])
    ref_out = [ref.run(None, {task.input_name: x})[0] for x in x_test]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        entry = {}
        for mode in ("measured", "none"):
            res, secs = (base, None) if (mode == "measured" and ratio == ratio0) else rewrite(ratio, sensitivity=mode)
            sess = ort.InferenceSession(res.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            acc = S._Acc("logits")
            for x, y in zip(x_test, ref_out):
                acc.add(y, sess.run(None, {task.input_name: x})[0], None)
            predicted = sum(r.distortion_predicted or 0.0 for r in res.layers) if mode == "measured" else None
            entry[mode] = {"measured_kl": acc.value(None), "predicted_sum": predicted,
                           "ranks": {r.name: [r.orientation, r.rank] for r in res.layers},
                           "refitted": len(res.report.get("refitted") or [])}
        out["ratios"][ratio] = entry
        m = entry["measured"]
        print(f"2. ratio {ratio}: whole-model KL on {len(x_test)} test captchas: measured allocation "
              f"{m['measured_kl']:.4g} (sum of per-layer predictions {m['predicted_sum']:.4g}), equal weighting "
              f"{entry['none']['measured_kl']:.4g}")
    amp = sorted(((float(np.mean(t["amplification"])), n) for n, t in table.items()), reverse=True)
    out["amplification"] = {n: a for a, n in amp}
    print("3. mean amplification per layer (largest first): " + ", ".join(f"{n} {a:.3g}" for a, n in amp))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
