"""Benchmark: analysis time against the cost of loading + shape inference.

Generates a chain of 1x1 Conv + Relu (default 50,000 nodes), then measures in one run:
  * baseline: ``onnx.load`` + ``onnx.shape_inference.infer_shapes`` on the file;
  * ``sepify.analyze(path)`` in-process (load, checker, shape inference with data propagation,
    cost walk, activation peak);
  * ``sepify.check`` in-process (the same analysis, then the budgets: here one MAC limit);
  * ``sepify.analyze`` on the same chain with a symbolic batch dimension (costs as polynomials);
  * the CLI end to end (``sepify analyze --format json``, the default table, ``sepify check``)
    against the baseline run in a fresh interpreter (both include start-up and ``import onnx``);
  * start-up of ``sepify --help`` and of analyzing a tiny sample.
Figures are printed; nothing is asserted (this is not a test).

    python bench/bench_analyze.py [--nodes 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import onnx

    import make_samples
    import sepify

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.onnx"
        onnx.save(make_samples.conv_chain(args.nodes // 2), str(path))
        print(f"model: {args.nodes:,}-node Conv+Relu chain, {path.stat().st_size / 1e6:.1f} MB")

        def baseline():
            m = onnx.load(str(path))
            onnx.shape_inference.infer_shapes(m)

        def analyze():
            sepify.analyze(str(path))

        from sepify.check import check

        def check_():
            report = check([str(path)], limits={"macs": 10**12}, discover=False)
            assert report.exit_code == 0, report.to_dict()

        # interleaved: this VM's timings drift by +-30% from one second to the next, so each
        # step is timed right after its baseline; reported: the best time of each, and the
        # median of the per-round ratios (each round's own baseline)
        times: dict[str, list[float]] = {"baseline": [], "analyze": [], "check": []}
        for _ in range(args.repeat):
            times["baseline"].append(best_of(baseline, 1))
            times["analyze"].append(best_of(analyze, 1))
            times["check"].append(best_of(check_, 1))
        b = min(times["baseline"])
        print(f"onnx.load + infer_shapes:      {b:7.3f} s")
        for label, key in (("sepify.analyze (in-process):", "analyze"), ("sepify.check (in-process):  ", "check")):
            t = min(times[key])
            ratios = sorted(x / y for x, y in zip(times[key], times["baseline"]))
            print(f"{label}   {t:7.3f} s   ratio of best times {t / b:.2f}x, median of rounds "
                  f"{statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f})")

        # the same chain with a symbolic batch dimension: costs are polynomials (``102M·batch``)
        sym = Path(tmp) / "chain_batch.onnx"
        m = make_samples.conv_chain(args.nodes // 2)
        for vi in (*m.graph.input, *m.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_param = "batch"
        onnx.save(m, str(sym))
        del m

        def sym_baseline():
            onnx.shape_inference.infer_shapes(onnx.load(str(sym)))

        pairs = [(best_of(sym_baseline, 1), best_of(lambda: sepify.analyze(str(sym)), 1)) for _ in range(args.repeat)]
        sb, sa = min(p[0] for p in pairs), min(p[1] for p in pairs)
        ratios = sorted(a / b for b, a in pairs)
        print(f"symbolic batch: baseline {sb:.3f} s, sepify.analyze {sa:.3f} s   ratio of best times {sa / sb:.2f}x, "
              f"median of rounds {statistics.median(ratios):.2f}x")

        # the CLI against the same baseline run in a fresh interpreter (both pay start-up and
        # `import onnx`), interleaved
        base_script = ("import sys, onnx; m = onnx.load(sys.argv[1]); "
                       "onnx.shape_inference.infer_shapes(m)")

        def cli_base():
            subprocess.run([sys.executable, "-c", base_script, str(path)], check=True)

        def cli(*extra):
            subprocess.run([sys.executable, "-m", "sepify", *extra], check=True, stdout=subprocess.DEVNULL)

        runs = {
            "analyze --format json": ("analyze", str(path), "--format", "json"),
            "analyze (table)": ("analyze", str(path)),
            "check --max-macs 1T": ("check", str(path), "--max-macs", "1T", "--no-config"),
        }
        cli_times: dict[str, list[float]] = {"baseline": [], **{label: [] for label in runs}}
        for _ in range(max(3, args.repeat // 2)):
            cli_times["baseline"].append(best_of(cli_base, 1))
            for label, argv in runs.items():
                cli_times[label].append(best_of(lambda: cli(*argv), 1))
        cb = min(cli_times["baseline"])
        print(f"baseline in a fresh interpreter: {cb:7.3f} s")
        for label in runs:
            t = min(cli_times[label])
            ratios = sorted(x / y for x, y in zip(cli_times[label], cli_times["baseline"]))
            print(f"CLI sepify {label:24s} {t:7.3f} s   ratio of best times {t / cb:.2f}x, "
                  f"median of rounds {statistics.median(ratios):.2f}x")

    def help_():
        subprocess.run([sys.executable, "-m", "sepify", "--help"], check=True, stdout=subprocess.DEVNULL)

    def small():
        subprocess.run([sys.executable, "-m", "sepify", "analyze", str(ROOT / "samples" / "tiny_cnn.onnx")],
                       check=True, stdout=subprocess.DEVNULL)

    print(f"sepify --help start-up:        {best_of(help_, args.repeat):7.3f} s")
    print(f"sepify analyze tiny_cnn.onnx:  {best_of(small, args.repeat):7.3f} s")
    heavy = [m for m in ("onnxruntime", "networkx") if m in sys.modules]
    print(f"heavy modules imported by analyze in-process: {heavy or 'none'}")


if __name__ == "__main__":
    main()
