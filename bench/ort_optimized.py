"""Report: sepify on onnxruntime-optimized and dynamically quantized copies of real exports.

onnxruntime's graph optimizer (``SessionOptions.optimized_model_filepath``) writes models full of
com.microsoft contrib ops (FusedConv, FusedMatMul, QuickGelu, Gelu, ...) and
``onnxruntime.quantization.quantize_dynamic`` + the optimizer gives DynamicQuantizeLSTM and
DynamicQuantizeMatMul. ONNX shape inference knows none of them. For each model of a folder this
writes, into an output folder (outside the repo), ``NAME.ext.onnx`` (ORT_ENABLE_EXTENDED) and
``NAME.dq.ext.onnx`` (quantize_dynamic, then the optimizer), and prints sepify's MACs, params and
nodes of unknown cost for the original and each copy. An optimized model computes what the
original does, so its MACs should be the same (params may drop: BatchNorm folded into Conv). A
report, not a test: nothing is asserted.

    python bench/ort_optimized.py /work/scratch/models/flat /work/scratch/ort_opt \\
        --bind 'det:x=1x3x640x640' --bind 'rec:x=1x3x48x320' --bind 'cls:x=1x3x48x192' ...

``--bind [SUBSTRING:]NAME=SHAPE`` (repeatable): ``--input-shape`` for the models whose file name
contains SUBSTRING (every model with that input when there is no SUBSTRING).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _optimize(src: Path, dst: Path) -> str | None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a report: say what failed
        return f"{type(e).__name__}: {str(e)[:60]}"
    return None


def _figures(path: Path, shapes) -> str:
    import sepify

    try:
        a = sepify.analyze(str(path), input_shapes=shapes or None)
    except sepify.SepifyError as e:
        return f"error: {str(e).split(': ', 1)[-1][:50]}"
    t = a.totals
    return f"{t.macs:>15,} {t.params:>11,} {t.unknown:>4}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path, help="where the optimized copies are written")
    ap.add_argument("--bind", action="append", default=[], metavar="[SUBSTRING:]NAME=SHAPE")
    args = ap.parse_args()

    import logging

    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from sepify.units import parse_input_shape

    logging.disable(logging.WARNING)  # (quantize_dynamic's advice to pre-process the model)
    binds = []
    for b in args.bind:
        where, _, spec = b.rpartition(":") if ":" in b.split("=", 1)[0] else ("", "", b)
        binds.append((where, *parse_input_shape(spec)))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'model':52} {'variant':8} {'MACs':>15} {'params':>11} {'unk':>4}")
    for src in sorted(args.folder.glob("*.onnx")):
        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
        shapes = {n: s for where, n, s in binds if n in names and where in src.name}
        variants = [("original", src, None)]
        ext = args.out / f"{src.stem}.ext.onnx"
        variants.append(("ext", ext, _optimize(src, ext)))
        dq, dq_ext = args.out / f"{src.stem}.dq.onnx", args.out / f"{src.stem}.dq.ext.onnx"
        try:
            quantize_dynamic(str(src), str(dq))
            variants.append(("dq+ext", dq_ext, _optimize(dq, dq_ext)))
        except Exception as e:  # noqa: BLE001
            variants.append(("dq+ext", dq_ext, f"quantize_dynamic: {type(e).__name__}"))
        for label, path, failed in variants:
            row = f"not made ({failed})" if failed else _figures(path, shapes)
            print(f"{src.name[:52]:52} {label:8} {row}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
