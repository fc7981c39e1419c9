"""Renderers of the ``sepify rewrite`` report (table, json, markdown)."""

from __future__ import annotations

import os
import sys

from .common import _console, dumps_json, md_escape
from ..units import human


def _pct(a, b) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _g(x, spec=".4g") -> str:
    return "-" if x is None else format(x, spec)


def _measures(o: dict) -> str:
    """The numbers of one compared tensor, with its flags, in one line."""
    if o.get("exact_match") is not None:
        return f"exact match {o['exact_match']:.4f}"
    if o.get("near_zero_reference"):
        text = (f"reference near zero (RMS {o['rms_reference']:.3g}): relative error not meaningful; "
                f"RMS error / scale {o['scaled_error']:.4g}, max abs {o['max_abs_error']:.4g}")
    else:
        text = f"rel L2 {o['rel_l2_error']:.4g}, max abs {o['max_abs_error']:.4g}, cosine {o['cosine']:.6f}"
    if o.get("top1_agreement") is not None:
        text += f", top-1 {o['top1_agreement']:.3f}"
        if o.get("top5_agreement") is not None:
            text += f", top-5 {o['top5_agreement']:.3f}"
        text += f" ({o['rows']} row{'s' if o['rows'] != 1 else ''})"
        if o.get("sample_top1_agreement") is not None:
            text += f", all rows of a sample {o['sample_top1_agreement']:.3f}"
    if o.get("nonfinite_rewritten") or o.get("nonfinite_reference"):
        text += f"; NON-FINITE values: {o.get('nonfinite_reference', 0)} original, {o.get('nonfinite_rewritten', 0)} rewritten"
    return text


def _verification_lines(ver: dict | None) -> list[str]:
    if not ver:
        return [("verification: not run (--verify; give data with --inputs or --calibration: random inputs are only "
                 "a wiring smoke test)")]
    n = ver.get("samples", 1)
    if ver.get("smoke_test"):
        out = [f"verification: {ver['note']} ({ver['inputs']}, {n} sample{'s' if n != 1 else ''}):"]
    else:
        out = [f"verification on {ver['inputs']}, {n} sample{'s' if n != 1 else ''}:"]
    for name, o in ver["outputs"].items():
        out.append(f"  {name} {o.get('shape')}: {_measures(o)}")
        pre = o.get("before_saturation")
        if pre:
            line = f"    before {pre['op']} ({pre['tensor']}): {_measures(pre)}"
            if o.get("saturated_share") is not None and o["saturated_share"] >= 0.5:
                line += f"; {pre['op']} saturated in {o['saturated_share']:.0%} (its output hides errors)"
            out.append(line)
    for note in ver.get("notes") or []:
        out.append(f"  note: {note}")
    err = ver.get("checked_error")
    checked = f"  checked error {_g(err) if err is not None else 'non-finite'} (max relative L2 over outputs and pre-saturation tensors)"
    if ver.get("tolerance") is None:
        out.append(checked + "; no --tolerance: not judged")
    else:
        out.append(checked + f"; tolerance {ver['tolerance']:g}: {'passed' if ver['passed'] else 'FAILED'}")
    return out


def _layer_rows(ver: dict | None) -> list[tuple[str, ...]]:
    rows = []
    for r in (ver or {}).get("layers") or []:
        rel = "~0 ref" if r.get("near_zero_reference") else _g(r.get("rel_l2_error"))
        rows.append((r["name"], r["tensor"], rel, _g(r.get("max_abs_error")), _g(r.get("cosine"), ".6f")))
    return rows


_LAYER_COLUMNS = [("layer", "left"), ("tensor", "left"), ("rel L2", "right"), ("max abs", "right"), ("cosine", "right")]
_LAYER_TITLE = "error after each rewritten layer (end to end)"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _latency_lines(report: dict) -> list[str]:
    lat = report.get("latency")
    if not lat:
        return []
    load = lat.get("load_average")
    out = [f"latency ({lat['runtime']}, {lat['provider']}, {lat['graph_optimization']}; {lat['threads_note']}; "
           f"CPU {lat['cpu']}" + (f"; load average {load[0]:.2f}" if load else "") + "):"]
    if lat.get("clock"):
        out.append(f"  clock: {lat['clock']}")
    tot = lat.get("layers_total") or {}
    if tot:
        out.append(f"  measured layers (one-layer models, sum of medians): {_ms(tot['before_s'])} → {_ms(tot['after_s'])}"
                   f" ({tot['rewritten']} rewritten)")
    if lat.get("target_speedup") is not None:
        out.append(f"  target speed-up {lat['target_speedup']:g}: whole model {_ms(lat.get('model_before_s'))}, "
                   f"predicted {_ms(lat.get('predicted_s'))}")
    e2e = lat.get("end_to_end")
    if e2e:
        b, a = e2e["before"], e2e["after"]
        out.append(f"  end-to-end: {_ms(b['median_s'])} [{_ms(b['q1_s'])}–{_ms(b['q3_s'])}] → {_ms(a['median_s'])} "
                   f"[{_ms(a['q1_s'])}–{_ms(a['q3_s'])}]: {e2e['speedup']:.3f}x speed-up (median of {b['rounds']} "
                   f"interleaved rounds, quartiles in brackets; {e2e['inputs']})")
    else:
        out.append("  end-to-end: not measured")
    m = lat.get("measuring") or {}
    if m:
        out.append(f"  measuring: {m['variants_timed']} variants timed, {m['cache_hits']} cache hits, "
                   f"{m['distinct_layer_shapes']} layer shapes, {m['seconds']:.1f} s ({m['bound']})")
    return out


def _calibration_lines(report: dict) -> list[str]:
    cal = report.get("calibration")
    if not cal:
        return []
    secs = sum(cal.get("seconds", {}).values())
    out = [f"calibration: {cal['samples']} samples from {cal['source']} ({cal['fit_samples']} fit, "
           f"{cal['holdout_samples']} held out), ≤{cal['rows_per_layer']:,} patch rows per layer, "
           f"{cal['method']}{', sequential' if cal.get('sequential') else ''}; {secs:.1f} s"]
    if cal.get("dims_bound_from_data"):
        out.append("  dims bound from the data: " + ", ".join(f"{k}={v}" for k, v in cal["dims_bound_from_data"].items()))
    rows = [r for r in report["layers"] if r.get("output_error_predicted") is not None]
    if rows:
        out.append("  relative output error per layer (predicted on the fit set / measured on the holdout):")
        for r in rows:
            meas = r.get("output_error_measured")
            out.append(f"    {r['name']}: {r['orientation']} rank {r['rank']}: {r['output_error_predicted']:.4g} / "
                       f"{'-' if meas is None else f'{meas:.4g}'}")
    return out


def rewrite_table(report: dict, stream=None) -> None:
    from .diff import diff_table

    stream = stream or sys.stdout
    console = _console(stream)
    console.print(f"sepify rewrite: {report.get('model') or 'model'} ({_criterion(report)})")
    diff_table(report["diff"], stream)
    t = report["totals"]
    b, a = t["before"], t["after"]
    console.print(f"rewritten {t['rewritten']} Conv(s); MACs {human(b['macs'])} → {human(a['macs'])} "
                  f"({_pct(a['macs'], b['macs'])}), params {human(b['params'])} → {human(a['params'])} "
                  f"({_pct(a['params'], b['params'])})")
    for line in _calibration_lines(report):
        console.print(line)
    folded = [r for r in report["layers"] if r.get("folded_batchnorm")]
    for r in folded:
        console.print(f"folded BatchNormalization {r['folded_batchnorm']} into {r['name']} before factorizing")
    if report["skipped"]:
        console.print("not rewritten:")
        for s in report["skipped"]:
            console.print(f"  {s['name']}: {s['reason']}")
    for line in _latency_lines(report):
        console.print(line, markup=False)
    for line in _verification_lines(report.get("verification")):
        console.print(line)
    rows = _layer_rows(report.get("verification"))
    if rows:
        from .common import print_table

        print_table(stream, _LAYER_TITLE, _LAYER_COLUMNS, rows, None)
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    if report.get("output"):
        console.print(f"wrote {report['output']}")


def _criterion(report: dict) -> str:
    s = report["settings"]
    for key in ("energy", "max_error", "target_macs", "target_ratio"):
        if s.get(key) is not None:
            return f"{key.replace('_', '-')} {s[key]}, {s['orientation']}" + _objective(s)
    if s.get("target_speedup") is not None:
        return f"target-speedup {s['target_speedup']}, {s['orientation']}" + _objective(s)
    return f"rank {s.get('rank') or 1}, {s['orientation']}" + _objective(s)


def _objective(s: dict) -> str:
    out = ", objective latency" if s.get("objective") == "latency" else ""
    if s.get("form") not in (None, "native"):
        out += f", form {s['form']}"
    return out


def rewrite_markdown(report: dict) -> str:
    from .diff import diff_markdown

    name = os.path.basename(report.get("model") or "") or "model"
    out = [f"## sepify rewrite: `{md_escape(name)}` ({md_escape(_criterion(report))})", "",
           diff_markdown(report["diff"]).rstrip("\n")]
    if any(r.get("folded_batchnorm") for r in report["layers"]):
        out.append("")  # a list right after "</details>" would be swallowed by the HTML block
    for r in report["layers"]:
        if r.get("folded_batchnorm"):
            out.append(f"- folded BatchNormalization `{md_escape(r['folded_batchnorm'])}` into `{md_escape(r['name'])}`")
    if report["skipped"]:
        out += ["", "<details><summary>not rewritten</summary>", ""]
        out += [f"- `{md_escape(s['name'])}`: {md_escape(s['reason'])}" for s in report["skipped"]]
        out += ["", "</details>"]
    cal = _calibration_lines(report)
    if cal:
        out += [""] + [md_escape(line.strip()) + "  " for line in cal]
    lat = _latency_lines(report)
    if lat:
        out += [""] + [f"{md_escape(line)}  " for line in lat]
    out += [""] + [f"{md_escape(line)}  " for line in _verification_lines(report.get("verification"))]
    rows = _layer_rows(report.get("verification"))
    if rows:
        out += ["", f"**{_LAYER_TITLE}**", "", "| " + " | ".join(h for h, _ in _LAYER_COLUMNS) + " |",
                "|" + "|".join("---" if j == "left" else "---:" for _, j in _LAYER_COLUMNS) + "|"]
        out += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def render_rewrite(report: dict, fmt: str, stream=None) -> str | None:
    if fmt == "json":
        return dumps_json(report)
    if fmt == "markdown":
        return rewrite_markdown(report)
    rewrite_table(report, stream)
    return None
