"""Renderers of the ``sepify rewrite`` report (table, json, markdown)."""

from __future__ import annotations

import os
import sys

from .common import Column, _console, dumps_json, md_escape
from ..units import human


def _pct(a, b) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _g(x, spec=".4g") -> str:
    return "-" if x is None else format(x, spec)


def _cells(label: str, o: dict, extra: list[str] | None = None) -> tuple[str, ...]:
    """One row of the verification table: the numbers of a compared tensor and its flags."""
    notes = list(extra or [])
    if o.get("exact_match") is not None:
        rel, notes = "-", [f"integer output: exact match {o['exact_match']:.4f}"] + notes
    elif o.get("near_zero_reference"):
        rel = "n/a"
        notes.insert(0, f"reference ~0 (RMS {o['rms_reference']:.2g}): RMS error / scale {o['scaled_error']:.3g}")
    else:
        rel = _g(o.get("rel_l2_error"))
    if o.get("top1_agreement") is not None:
        notes.append(f"{o['rows']} row{'s' if o['rows'] != 1 else ''}")
        if o.get("sample_top1_agreement") is not None:
            notes.append(f"all rows of a sample {o['sample_top1_agreement']:.3f}")
    if o.get("nonfinite_rewritten") or o.get("nonfinite_reference"):
        notes.append(f"NON-FINITE values: {o.get('nonfinite_reference', 0)} original, "
                     f"{o.get('nonfinite_rewritten', 0)} rewritten")
    return (label, rel, _g(o.get("max_abs_error")), _g(o.get("cosine"), ".5f"), _g(o.get("top1_agreement"), ".3f"),
            _g(o.get("top5_agreement"), ".3f"), "; ".join(notes))


#: the verification tables fit the terminal as the layer tables do: long tensor names are
#: shortened in the middle, notes wrapped, top-5 left out last
_OUTPUT_COLUMNS = [Column("output", "left", flex=12), Column("rel L2"), Column("max abs"), Column("cosine"),
                   Column("top-1"), Column("top-5", drop=1), Column("note", "left", fold=True)]


def _output_rows(ver: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, o in ver["outputs"].items():
        rows.append(_cells(name, o))
        pre = o.get("before_saturation")
        if pre:
            extra = []
            if o.get("saturated_share") is not None and o["saturated_share"] >= 0.5:
                extra.append(f"{pre['op']} saturated in {o['saturated_share']:.0%}: its output hides errors")
            rows.append(_cells(f"↳ before {pre['op']}: {pre['tensor']}", pre, extra))
    return rows


def _verification_head(ver: dict | None) -> str:
    if not ver:
        return ("verification: not run (--verify; give data with --inputs or --calibration: random inputs are only "
                "a wiring smoke test)")
    n = ver.get("samples", 1)
    if ver.get("smoke_test"):
        return f"verification: {ver['note']}\n  ({ver['inputs']}, {n} sample{'s' if n != 1 else ''})"
    return f"verification on {ver['inputs']}, {n} sample{'s' if n != 1 else ''}"


def _verification_tail(ver: dict) -> list[str]:
    out = [f"note: {note}" for note in ver.get("notes") or []]
    err = ver.get("checked_error")
    checked = (f"checked error {_g(err) if err is not None else 'non-finite'} "
               "(max rel L2 of outputs and pre-saturation tensors)")
    if ver.get("tolerance") is None:
        out.append(checked + "; no --tolerance: not judged")
    else:
        out.append(checked + f"; tolerance {ver['tolerance']:g}: {'passed' if ver['passed'] else 'FAILED'}")
    return out


def _layer_rows(ver: dict | None) -> list[tuple[str, ...]]:
    rows = []
    for r in (ver or {}).get("layers") or []:
        rel = "n/a (ref ~0)" if r.get("near_zero_reference") else _g(r.get("rel_l2_error"))
        rows.append((r["name"], r["tensor"], rel, _g(r.get("max_abs_error")), _g(r.get("cosine"), ".5f")))
    return rows


_LAYER_COLUMNS = [Column("layer", "left", flex=12), Column("tensor", "left", flex=12), Column("rel L2"),
                  Column("max abs"), Column("cosine")]
_LAYER_TITLE = "error after each rewritten layer (end to end)"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _speedup(e2e: dict) -> str:
    spread = (f" [{e2e['speedup_q1']:.3f}–{e2e['speedup_q3']:.3f}]" if e2e.get("speedup_q1") is not None else "")
    return f"{e2e['speedup']:.3f}x{spread}"


def _changes(changes: list[dict], limit: int = 6) -> str:
    parts = [f"{c['layer']} {c['from']} → {c['to']}" for c in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"… {len(changes) - limit} more")
    return "; ".join(parts) if parts else "none"


def _pass_lines(lat: dict) -> list[str]:
    passes = lat.get("passes") or []
    if not passes:
        return []
    out = [f"  passes (at most --latency-passes {lat.get('latency_passes')}; each: allocate, then the whole rewritten "
           f"model with weight-SVD factors timed against the original, speed-up quartiles over rounds in brackets):"]
    for p in passes:
        asked = ("the fastest options" if p.get("fastest_options") else
                 f"save {_ms(p.get('saving_asked_s'))}")
        line = (f"    pass {p['pass']}: {asked}; predicted {p['predicted_speedup']:.3f}x, {p['rewritten']} rewritten; "
                f"measured {_speedup(p['end_to_end']) if p.get('end_to_end') else 'not timed'}")
        if "target_met" in p:
            line += " (target met)" if p["target_met"] else " (missed)"
        if p.get("realized_fraction") is not None:
            line += f"; {p['realized_fraction']:.2f} of the predicted saving measured"
        out.append(line)
        if p["pass"] > 1:
            out.append(f"      changes: {_changes(p.get('changes') or [])}")
        if p.get("stopped"):
            out.append(f"      stopped: {p['stopped']}")
    return out


def _graph_line(g: dict) -> str:
    return (f"{g['nchwc_convs']} NCHWc convs ({g['fused_activation']} with the activation fused, {g['fused_sum']} with "
            f"an Add fused), {g['plain_convs']} NCHW convs, {g['reorders']} layout reorders")


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
        out.append(f"  measured layers (each in its context, sum of medians): {_ms(tot['before_s'])} → {_ms(tot['after_s'])}"
                   f" ({tot['rewritten']} rewritten)")
    if lat.get("target_speedup") is not None:
        out.append(f"  target speed-up {lat['target_speedup']:g}: whole model {_ms(lat.get('model_before_s'))}, "
                   f"predicted {_ms(lat.get('predicted_s'))}")
    out += _pass_lines(lat)
    e2e = lat.get("end_to_end")
    if e2e:
        b, a = e2e["before"], e2e["after"]
        src = f"; pass {e2e['pass']}'s timing: the model written" if e2e.get("pass") else ""
        out.append(f"  end-to-end: {_ms(b['median_s'])} [{_ms(b['q1_s'])}–{_ms(b['q3_s'])}] → {_ms(a['median_s'])} "
                   f"[{_ms(a['q1_s'])}–{_ms(a['q3_s'])}]: {_speedup(e2e)} speed-up (median of {b['rounds']} "
                   f"interleaved rounds, quartiles in brackets; {e2e['inputs']}{src})")
    else:
        out.append("  end-to-end: not measured")
    if lat.get("target_met") is not None:
        out.append(f"  target {lat['target_speedup']:g}x: {'met' if lat['target_met'] else 'NOT MET'} (measured end to end)")
    g = lat.get("optimized_graph") or {}
    if g.get("before") and g.get("after"):
        out.append(f"  onnxruntime's optimized graph: {_graph_line(g['before'])} → {_graph_line(g['after'])}")
    m = lat.get("measuring") or {}
    if m:
        out.append(f"  measuring: {m['variants_timed']} variants timed, {m['cache_hits']} cache hits, "
                   f"{m['distinct_layer_contexts']} layer shapes in context, {m['seconds']:.1f} s ({m['bound']})")
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
    if cal.get("seconds"):
        out.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in cal["seconds"].items()))
    cache = cal.get("cache") or {}
    if cache.get("waves"):
        out.append(f"  phase 2: {cache['waves']} wave(s), {cache['working_nodes_run']:,} of "
                   f"{cache['working_nodes_full_prefix']:,} working-model nodes run per sample (incremental), "
                   f"{cache['original_inputs_held']} original input(s) held, {cache['original_inputs_rerun']} re-run; "
                   f"cache peak {cache['peak_mb']:,.1f} of {cache['limit_mb']:,.0f} MiB")
    rows = [r for r in report["layers"] if r.get("output_error_predicted") is not None]
    if rows:
        out.append("  relative output error per layer (predicted on the fit set / measured on the holdout):")
        for r in rows:
            meas = r.get("output_error_measured")
            at = f" (of {r['output_error_at']}'s output)" if r.get("output_error_at") else ""
            out.append(f"    {r['name']}: {r['orientation']} rank {r['rank']}: {r['output_error_predicted']:.4g} / "
                       f"{'-' if meas is None else f'{meas:.4g}'}{at}")
    for f in report.get("refitted") or []:
        meas = f.get("output_error_measured")
        what = "input projection refitted" if f.get("what") == "input projection" else "kept, refitted"
        at = f" (of {f['output_error_at']}'s output)" if f.get("output_error_at") else ""
        out.append(f"    {f['name']}: {what}: {f['output_error_before']:.4g} -> {f['output_error_predicted']:.4g} / "
                   f"{'-' if meas is None else f'{meas:.4g}'}{at}")
    sens = cal.get("sensitivity") or {}
    if sens.get("layers"):
        kinds = ", ".join(f"{k}: {'KL' if v != 'rel' else 'rel. error'}" for k, v in sens.get("outputs", {}).items())
        cache = sens.get("cache") or {}
        out.append(f"  sensitivity measured on {sens['samples']} {sens['from']} samples ({kinds})"
                   f"{'; from the cache' if cache.get('hit') else ''}; amplification of each layer's error at the "
                   f"outputs (ranks {'/'.join(str(r) for r in next(iter(sens['layers'].values()))['ranks'])}):")
        for name, t in sens["layers"].items():
            out.append(f"    {name}: " + " ".join(f"{a:.3g}" for a in t["amplification"]))
    return out


def _print_verification(ver: dict | None, console, stream) -> None:
    from .common import print_table

    console.print(_verification_head(ver))
    if not ver:
        return
    print_table(stream, "", _OUTPUT_COLUMNS, _output_rows(ver), None)
    for line in _verification_tail(ver):
        console.print(line)
    rows = _layer_rows(ver)
    if rows:
        print_table(stream, _LAYER_TITLE, _LAYER_COLUMNS, rows, None)


def _md_table(columns, rows) -> list[str]:
    out = ["| " + " | ".join(c.header for c in columns) + " |",
           "|" + "|".join("---" if c.justify == "left" else "---:" for c in columns) + "|"]
    return out + ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows]


def _verification_markdown(ver: dict | None) -> list[str]:
    out = ["", md_escape(_verification_head(ver).replace("\n  ", " "))]
    if not ver:
        return out
    out += [""] + _md_table(_OUTPUT_COLUMNS, _output_rows(ver)) + [""]
    out += [f"{md_escape(line)}  " for line in _verification_tail(ver)]
    rows = _layer_rows(ver)
    if rows:
        out += ["", f"**{_LAYER_TITLE}**", ""] + _md_table(_LAYER_COLUMNS, rows)
    return out


def rewrite_table(report: dict, stream=None) -> None:
    from .diff import diff_table

    stream = stream or sys.stdout
    console = _console(stream)
    out = report.get("output") or "not written"
    diff_table(report["diff"], stream, title=f"sepify rewrite: {report.get('model') or 'model'} → {out} "
                                             f"({_criterion(report)})")
    t = report["totals"]
    b, a = t["before"], t["after"]
    console.print(f"rewritten {t['rewritten']} Conv(s); MACs {human(b['macs'])} → {human(a['macs'])} "
                  f"({_pct(a['macs'], b['macs'])}), params {human(b['params'])} → {human(a['params'])} "
                  f"({_pct(a['params'], b['params'])})")
    if b.get("macs_formula") or a.get("macs_formula"):
        console.print(f"MACs as formulas of the unbound dims: {b.get('macs_formula') or human(b['macs'])} → "
                      f"{a.get('macs_formula') or human(a['macs'])}")
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
    _print_verification(report.get("verification"), console, stream)
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
    if s.get("form") not in (None, "fast"):  # "fast" is the default
        out += f", form {s['form']}"
    return out


def rewrite_markdown(report: dict) -> str:
    from .diff import diff_markdown

    name = os.path.basename(report.get("model") or "") or "model"
    written = f" → `{md_escape(os.path.basename(report['output']))}`" if report.get("output") else ""
    out = [f"## sepify rewrite: `{md_escape(name)}`{written} ({md_escape(_criterion(report))})", "",
           diff_markdown(report["diff"], title="cost before → after").rstrip("\n")]
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
    out += _verification_markdown(report.get("verification"))
    return "\n".join(out) + "\n"


def render_rewrite(report: dict, fmt: str, stream=None) -> str | None:
    if fmt == "json":
        return dumps_json(report)
    if fmt == "markdown":
        return rewrite_markdown(report)
    rewrite_table(report, stream)
    return None
