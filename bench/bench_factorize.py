"""Timing of the data-aware factorization (sepify.rewrite.factorize): fit and output_error_curve.

    python bench/bench_factorize.py            # all cases
    python bench/bench_factorize.py --quick    # the 64-channel cases only

Statistics are synthetic (a random low-rank-plus-diagonal covariance: the cost does not depend
on the data, only on the layer's size). Prints one line per case: wall time (median of
``--repeat`` runs) and the predicted relative output error, next to the weight-only one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from sepify.rewrite.factorize import LayerStats, fit, output_error_curve


def synthetic_stats(rng, d: int, n: int = 16384) -> LayerStats:
    basis = rng.standard_normal((d, 64)) / 8.0
    cov = basis @ basis.T + 0.05 * np.eye(d)
    mean = 0.1 * rng.standard_normal(d)
    xx = n * (cov + np.outer(mean, mean))
    return LayerStats.from_same(n, (n * mean)[None], xx[None])


def timed(fn, repeat):
    """(median wall seconds, median process CPU seconds, result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f}")
    channels = [64] if args.quick else [64, 256]
    for c in channels:
        w = rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)
        stats = synthetic_stats(rng, c * 9)
        for orientation in ("dw-first", "pw-first"):
            for r in (1, 2, 4):
                for method, sweeps in (("refit", 0), ("als", 10)):
                    t, cpu, f = timed(lambda: fit(w, None, 1, orientation, r, stats, method=method,
                                             sweeps=sweeps, tol=0.0), args.repeat)
                    print(f"fit   M=N={c:4d} K=9 {orientation} r={r} {method:5s} "
                          f"sweeps={f.sweeps:2d}: {t:7.2f} s wall {cpu:7.2f} s CPU  error {f.error:.4f} "
                          f"(weight-only {f.weight_error:.4f})")
    for c in [64] if args.quick else [64, 512]:
        w = rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)
        stats = synthetic_stats(rng, c * 9)
        for orientation in ("dw-first", "pw-first"):
            t, cpu, curve = timed(lambda: output_error_curve(w, 1, orientation, stats), args.repeat)
            print(f"curve M=N={c:4d} K=9 {orientation} ranks 1..{len(curve)}: {t:7.2f} s wall {cpu:7.2f} s CPU  "
                  f"errors {np.round(curve, 3).tolist()}")


if __name__ == "__main__":
    main()
