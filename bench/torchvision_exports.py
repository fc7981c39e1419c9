"""Report: sepify on torchvision models exported to ONNX, compared with PyTorch's own counts.

For each torchvision model (random weights, ``weights=None``, eval mode) and each exporter of the
installed torch (``dynamo=False``: the TorchScript exporter; ``dynamo=True``: torch.export +
onnxscript), three exports: static 1x3x224x224, a dynamic batch, and dynamic H/W. Each is
analyzed with ``sepify.analyze`` and compared with:

* params: ``sum(p.numel() for p in model.parameters())``. The TorchScript exporter folds every
  BatchNorm that follows a Conv into the Conv (weights rescaled, a bias added), so for it the
  reference is the same sum over ``torch.fx.experimental.optimization.fuse(model)`` (the same
  fold done in PyTorch); the dynamo exporter keeps BatchNormalization, so the plain sum is the
  reference there. Buffers: the float buffers (BatchNorm running mean and variance;
  ``num_batches_tracked`` is an integer counter no exporter writes).
* MACs: ``torch.utils.flop_counter.FlopCounterMode`` on the same 1x3x224x224 input, FLOPs / 2.
  PyTorch counts only convolutions, mm/addmm/bmm/baddbmm/matmul and scaled-dot-product
  attention (no bias adds, pools, norms or element-wise ops), which is exactly what sepify counts
  as MACs (docs/conventions.md), so the totals are compared directly.
* published figures where known (docs/benchmarks.md cites them).

A dynamic export is analyzed twice: unbound (the unknown-node count and the MAC formula sepify
reports, or its error) and with its symbols bound to 1 / 224 / 224 (the numbers must equal the
static export's). Optionally (``--rewrite``) ``sepify rewrite --verify`` (rank 1, ``--target-ratio 0.5`` and
``--rank full --allow-increase``, the exactness check) on the static exports of the CNNs,
checking the written model with ``onnx.checker``; and the full-rank rewrite of the dynamic-H/W
exports (bound to 224 for ``--verify``), run at 160x192 against the original: the rewritten
model must keep its dynamic dims.

Needs torch + torchvision (NOT dependencies of sepify): a scratch venv, e.g.

    python -m venv --system-site-packages /work/scratch/torchvenv
    /work/scratch/torchvenv/bin/pip install torch torchvision onnxscript
    PYTHONPATH=$PWD /work/scratch/torchvenv/bin/python bench/torchvision_exports.py \\
        --out /work/scratch/tvexports [--models resnet18,vit_b_16] [--rewrite] [--markdown FILE]

Exports are cached in ``--out`` (delete a file to re-export). A report, not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0",
    "squeezenet1_0", "densenet121", "googlenet", "mnasnet1_0", "efficientnet_b0",
    "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t",
]
# the CNNs `--rewrite` rewrites (transformers have only the patch-embedding conv)
CNNS = {"resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0",
        "squeezenet1_0", "densenet121", "googlenet", "mnasnet1_0", "efficientnet_b0",
        "regnet_y_400mf", "convnext_tiny"}
# published figures: (MACs, params); torchvision's model table ("GFLOPS" there are GMACs) and the
# papers (reference.md)
PUBLISHED = {
    "resnet50": (4.09e9, 25_557_032), "mobilenet_v2": (300e6, 3_504_872),
    "shufflenet_v2_x1_0": (146e6, 2_278_604), "vit_b_16": (17.56e9, 86_567_656),
    "resnet18": (1.81e9, 11_689_512), "mobilenet_v3_small": (0.06e9, 2_542_856),
    "efficientnet_b0": (0.39e9, 5_288_548), "densenet121": (2.83e9, 7_978_856),
    "googlenet": (1.50e9, 6_624_904), "squeezenet1_0": (0.82e9, 1_248_424),
    "mnasnet1_0": (0.31e9, 4_383_312), "regnet_y_400mf": (0.40e9, 4_344_144),
    "convnext_tiny": (4.46e9, 28_589_128), "swin_t": (4.49e9, 28_288_354),
    "maxvit_t": (5.56e9, 30_919_624),
}
VARIANTS = ("static", "batch", "hw")
AXES = {"static": {}, "batch": {0: "batch"}, "hw": {2: "height", 3: "width"}}
BOUND = {0: 1, 2: 224, 3: 224}


def _torchvision():
    """Import torchvision even when its C++ ops do not load (a CPU torch with a torchvision
    wheel built for CUDA): its models need none of them, but its fake-op registration needs
    the schemas of ``nms``/``qnms`` to exist."""
    import torch

    try:
        import torchvision
    except RuntimeError:
        for m in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[m]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision.lib = lib  # keep the library alive
        import torchvision
    return torchvision


def _perturb(model) -> None:
    """Make every parameter and buffer distinct: random init leaves many tensors identical
    (BatchNorm's ones and zeros, hence identical folded Conv biases; LayerNorm's; zero biases),
    and both exporters store identical constants once (the TorchScript exporter through
    ``Identity`` nodes), which a trained model would not have. Running variances stay positive."""
    import torch

    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.uniform_(0.5, 1.5)
                else:
                    t.add_(torch.randn_like(t), alpha=0.02)


def torch_reference(name: str) -> tuple[object, dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tv = _torchvision()
    torch.manual_seed(0)
    # GoogLeNet: without its auxiliary classifiers, which eval mode never runs (as torchvision's
    # published weights and parameter count)
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = tv.models.get_model(name, weights=None, **kw).eval()
    _perturb(model)
    ref = {
        "bn": sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "params": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers() if b.is_floating_point()),
    }
    try:
        import copy

        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
        ref["params_bn_folded"] = sum(p.numel() for p in fused.parameters())
        ref["buffers_bn_folded"] = sum(b.numel() for b in fused.buffers() if b.is_floating_point())
        ref["bn_left_by_fuse"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    except Exception as e:  # noqa: BLE001 - a model fx cannot trace: say so
        ref["params_bn_folded"] = None
        ref["fuse_error"] = f"{type(e).__name__}"
    x = torch.randn(1, 3, 224, 224)
    # with autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path
    # (aten._native_multi_head_attention), which FlopCounterMode does not count (ViT: 11.27G
    # instead of 17.56G) and the TorchScript exporter cannot export
    # and with the math attention backend: on CPU scaled_dot_product_attention runs as
    # aten._scaled_dot_product_flash_attention_for_cpu, which has no FlopCounterMode rule (ViT's
    # 0.715G attention MACs would be missing); the math backend runs it as bmm, which is counted
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x)
    ref["macs"] = fc.get_total_flops() // 2
    ref["macs_by_op"] = {str(k): v // 2 for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return model, ref


def export(model, path: Path, dynamo: bool, variant: str) -> str | None:
    """Export ``model``; returns an error line or None."""
    import torch

    if path.exists():
        return None
    x = torch.randn(1 if variant != "batch" else 2, 3, 224, 224)
    axes = AXES[variant]
    tmp = path.with_suffix(".tmp.onnx")
    try:
        with warnings.catch_warnings():  # (autograd on: see torch_reference)
            warnings.simplefilter("ignore")
            if dynamo:
                ds = None
                if axes:
                    ds = ({a: torch.export.Dim(n, min=2 if a == 0 else 32, max=4096) for a, n in axes.items()},)
                try:
                    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                             dynamic_shapes=ds, verbose=False)
                except Exception:
                    if not axes:
                        raise
                    # torch.export refuses a named Dim whose range it cannot prove (ceil-mode
                    # pools: "Expected op to be '==', got <"); Dim.DYNAMIC lets it add the guards
                    ds = ({a: torch.export.Dim.DYNAMIC for a in axes},)
                    prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                             dynamic_shapes=ds, verbose=False)
                prog.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": axes} if axes else None)
        tmp.replace(path)
    except Exception as e:  # noqa: BLE001 - a report: the exporter's failure is a result
        for f in path.parent.glob(tmp.name + "*"):
            f.unlink()
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0][:90] if msg else ''}"
    return None


def _symbols(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for inp in m.graph.input:
        for ax, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.dim_param and ax in BOUND:
                out[d.dim_param] = BOUND[ax]
    return out


def analyze(path: Path, dims=None) -> dict:
    import sepify

    t = time.perf_counter()
    try:
        a = sepify.analyze(str(path), dims=dims)
    except sepify.SepifyError as e:
        return {"error": str(e).split(": ", 1)[-1][:160], "time": time.perf_counter() - t}
    dt = time.perf_counter() - t
    by_op = {k: v["macs"] for k, v in a.by_op().items() if v["macs"]}
    unknown_ops = sorted({f"{x.op_type}" for x in a.layers if x.unknown})
    return {"macs": a.totals.macs, "params": a.totals.params, "buffers": a.totals.buffers,
            "unknown": a.totals.unknown, "unknown_ops": unknown_ops, "nodes": a.totals.nodes,
            "formula": a.totals.macs_formula, "time": dt, "by_op": by_op,
            "unbound": sorted(k for k, v in a.symbols.items() if not v["bound"])}


def rewrite(path: Path, out: Path, extra: list[str]) -> str:
    cmd = [sys.executable, "-m", "sepify", "rewrite", str(path), "-o", str(out), "--verify", *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t
    status = f"exit {p.returncode}"
    if p.returncode in (0, 1) and out.exists():
        import onnx

        try:
            onnx.checker.check_model(str(out), full_check=True)
            status += ", checker ok"
        except Exception as e:  # noqa: BLE001
            status += f", CHECKER: {str(e).splitlines()[0][:60]}"
        import re

        for ln in p.stdout.splitlines():
            m = re.match(r"rewritten (\d+) Conv.*MACs \S+ → \S+ \(([\d.]+)x\)", ln)
            if m:
                status += f", {m[1]} Convs, MACs {m[2]}x"
            m = re.match(r"checked error ([\d.e+-]+)", ln)
            if m:
                status += f", error {m[1]}"
    else:
        status += ": " + (p.stderr.strip().splitlines() or [""])[-1][:160]
    return f"{status} ({dt:.0f} s)"


def rewrite_dynamic(path: Path, out: Path, symbols: dict[str, int]) -> str:
    """``rewrite --rank full --allow-increase --verify`` of a dynamic-H/W export (bound to 224
    for the verification), then both models run in onnxruntime at another size (160x192): the
    written model must keep its dynamic dims and compute the same function there."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    binds = [a for k, v in symbols.items() for a in ("--dim", f"{k}={v}")]
    status = rewrite(path, out, ["--rank", "full", "--allow-increase", *binds])
    if not out.exists():
        return status
    m = onnx.load(str(out), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 192)).astype(np.float32)
    ya = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    yb = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))
    return f"{status}; input {dims}, at 160x192 rel err {err:.2g}"


def _g(n):
    if n is None:
        return "—"
    for unit, s in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.3f}{s}" if s == "G" else f"{n / unit:.2f}{s}"
    return str(n)


def _delta(a, b):
    if a is None or b is None:
        return "—" if a is None else f"{a:,} (no ref.)"
    if a == b:
        return "="
    return f"{a - b:+,}" if abs(a - b) < 10_000_000 else f"{(a - b) / b:+.2%}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/tvexports"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--exporters", default="legacy,dynamo")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rewrite", action="store_true", help="also sepify rewrite --verify the static CNN exports")
    ap.add_argument("--markdown", type=Path, help="write the tables here too")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import logging

    import onnx
    import onnxruntime
    import torch

    # torch.export logs sympy tracebacks when it cannot simplify a guard (not an error)
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)

    tv = _torchvision()
    versions = (f"torch {torch.__version__}, torchvision {tv.__version__}, onnx {onnx.__version__}, "
                f"onnxruntime {onnxruntime.__version__}")
    try:
        import onnxscript

        versions += f", onnxscript {onnxscript.__version__}"
    except ImportError:
        pass
    print(versions, flush=True)
    results = []
    for name in args.models.split(","):
        model, ref = torch_reference(name)
        print(f"{name}: torch params {ref['params']:,} (BN folded {ref['params_bn_folded']}), "
              f"MACs {ref['macs']:,} {ref['macs_by_op']}", flush=True)
        for exp in args.exporters.split(","):
            for var in args.variants.split(","):
                path = args.out / f"{name}.{exp}.{var}.onnx"
                t = time.perf_counter()
                err = export(model, path, exp == "dynamo", var)
                row = {"model": name, "exporter": exp, "variant": var, "ref": ref,
                       "export_error": err, "export_time": time.perf_counter() - t}
                if err is None:
                    m = onnx.load(str(path), load_external_data=False)
                    row["opset"] = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
                    row["onnx_bn"] = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
                    del m
                    row["free"] = analyze(path)
                    if var != "static":
                        syms = _symbols(path)
                        row["symbols"] = syms
                        row["bound"] = analyze(path, dims=syms)
                    if args.rewrite and var == "hw" and name in CNNS and len(row["symbols"]) == 2:
                        row["rewrite_hw"] = rewrite_dynamic(path, args.out / f"{path.stem}.sepfull.onnx", row["symbols"])
                    if args.rewrite and var == "static" and name in CNNS:
                        row["rewrite"] = {
                            "rank1": rewrite(path, args.out / f"{path.stem}.sep.onnx", []),
                            "ratio0.5": rewrite(path, args.out / f"{path.stem}.sep05.onnx", ["--target-ratio", "0.5"]),
                            "full": rewrite(path, args.out / f"{path.stem}.sepfull.onnx", ["--rank", "full", "--allow-increase"]),
                        }
                print(json.dumps({k: v for k, v in row.items() if k != "ref"}, default=str), flush=True)
                results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    md = tables(results, versions)
    print(md)
    if args.markdown:
        args.markdown.write_text(md)


def tables(results: list[dict], versions: str) -> str:
    lines = [f"Measured with {versions}.", "",
             "| model | exporter | export | opset | params (sepify) | params (PyTorch) | Δ | buffers Δ | "
             "MACs (sepify) | MACs (PyTorch) | Δ | unknown | time s | published MACs / params |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    dyn = ["| model | exporter | variant | unbound: unknown, MACs formula (or error) | bound to 1/224/224: "
           "MACs, params, unknown | = static? |", "|---|---|---|---|---|---|"]
    rw = ["| model | exporter | rewrite (rank 1) --verify | --target-ratio 0.5 --verify | --rank full --allow-increase --verify |",
          "|---|---|---|---|---|"]
    rwd = ["| model | exporter | dynamic H/W: rewrite --rank full --allow-increase --verify --dim …=224, then run at 160x192 |",
           "|---|---|---|"]
    static = {}
    for r in results:
        ref, name, exp = r["ref"], r["model"], r["exporter"]
        pub = PUBLISHED.get(name)
        pubs = f"{_g(pub[0])} / {pub[1] / 1e6:.3f}M" if pub else ""
        if r["variant"] == "static":
            if r["export_error"]:
                lines.append(f"| {name} | {exp} | {r['export_error']} | | | | | | | | | | | {pubs} |")
                continue
            a = r["free"]
            if "error" in a:
                lines.append(f"| {name} | {exp} | ok | {r['opset']} | error: {a['error']} | | | | | | | | | {pubs} |")
                continue
            static[(name, exp)] = a
            # the exporter folded the BatchNorms after Convs (as fx's fuse does) or kept them all
            folded = r["onnx_bn"] < ref["bn"]
            pref, bref = (ref["params"], ref["buffers"]) if not folded else (
                ref.get("params_bn_folded"), ref.get("buffers_bn_folded"))
            note = f" ({ref['bn'] - r['onnx_bn']} BN folded)" if folded else ""
            if folded and ref.get("bn_left_by_fuse") != r["onnx_bn"]:
                note += f" (fx fuse leaves {ref.get('bn_left_by_fuse')} BN, the export {r['onnx_bn']})"
            lines.append(
                f"| {name} | {exp} | ok | {r['opset']} | {a['params']:,} | {'—' if pref is None else format(pref, ',')}{note} | {_delta(a['params'], pref)} | "
                f"{_delta(a['buffers'], bref)} | {a['macs']:,} | {ref['macs']:,} | "
                f"{_delta(a['macs'], ref['macs'])} | {a['unknown']}{' ' + ','.join(a['unknown_ops']) if a['unknown_ops'] else ''} | "
                f"{a['time']:.2f} | {pubs} |")
            if "rewrite" in r:
                rw.append(f"| {name} | {exp} | {r['rewrite']['rank1']} | {r['rewrite']['ratio0.5']} | {r['rewrite']['full']} |")
        else:
            if r["export_error"]:
                dyn.append(f"| {name} | {exp} | {r['variant']} | export failed: {r['export_error']} | | |")
                continue
            f, b = r["free"], r["bound"]
            fs = (f"error: {f['error']}" if "error" in f else
                  f"{f['unknown']} unknown, `{f['formula'] or '(no formula)'}`")
            wanted = set(AXES[r["variant"]].values())
            if len(r.get("symbols", {})) < len(wanted):
                fs += f" (the export has only {len(r.get('symbols', {}))} of the {len(wanted)} dynamic dims: torch.export specialized the rest)"
            bs = "error: " + b["error"] if "error" in b else f"{b['macs']:,}, {b['params']:,}, {b['unknown']}"
            s = static.get((name, exp))
            same = "—" if s is None or "error" in b else (
                "yes" if (b["macs"], b["params"], b["unknown"]) == (s["macs"], s["params"], s["unknown"]) else "**no**")
            dyn.append(f"| {name} | {exp} | {r['variant']} | {fs} | {bs} | {same} |")
            if "rewrite_hw" in r:
                rwd.append(f"| {name} | {exp} | {r['rewrite_hw']} |")
    out = "\n".join(lines) + "\n\nDynamic exports:\n\n" + "\n".join(dyn) + "\n"
    if len(rw) > 2:
        out += "\nRewrite of the static exports:\n\n" + "\n".join(rw) + "\n"
    if len(rwd) > 2:
        out += "\nRewrite of the dynamic-H/W exports:\n\n" + "\n".join(rwd) + "\n"
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
