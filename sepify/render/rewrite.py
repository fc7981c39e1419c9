"""Renderers of the ``sepify rewrite`` report (table, json, markdown)."""

from __future__ import annotations

import os
import sys

from .common import _console, dumps_json, md_escape
from ..units import human


def _pct(a, b) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _verification_lines(ver: dict | None) -> list[str]:
    if not ver:
        return ["verification: not run (use --verify; random inputs are a smoke test, not an accuracy measurement)"]
    out = [f"verification ({ver['inputs']}):"]
    for name, o in ver["outputs"].items():
        top1 = f", top-1 agreement {o['top1_agreement']:.3f}" if o.get("top1_agreement") is not None else ""
        out.append(f"  {name}: rel L2 error {o['rel_l2_error']:.4g}, max abs error {o['max_abs_error']:.4g}, "
                   f"cosine {o['cosine']:.6f}{top1}")
    if ver.get("tolerance") is not None:
        out.append(f"  tolerance {ver['tolerance']:g}: {'passed' if ver['passed'] else 'FAILED'}")
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
    folded = [r for r in report["layers"] if r.get("folded_batchnorm")]
    for r in folded:
        console.print(f"folded BatchNormalization {r['folded_batchnorm']} into {r['name']} before factorizing")
    if report["skipped"]:
        console.print("not rewritten:")
        for s in report["skipped"]:
            console.print(f"  {s['name']}: {s['reason']}")
    for line in _verification_lines(report.get("verification")):
        console.print(line)
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    if report.get("output"):
        console.print(f"wrote {report['output']}")


def _criterion(report: dict) -> str:
    s = report["settings"]
    for key in ("energy", "max_error", "target_macs", "target_ratio"):
        if s.get(key) is not None:
            return f"{key.replace('_', '-')} {s[key]}, {s['orientation']}"
    return f"rank {s.get('rank') or 1}, {s['orientation']}"


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
    out += [""] + [f"{line}  " for line in _verification_lines(report.get("verification"))]
    return "\n".join(out) + "\n"


def render_rewrite(report: dict, fmt: str, stream=None) -> str | None:
    if fmt == "json":
        return dumps_json(report)
    if fmt == "markdown":
        return rewrite_markdown(report)
    rewrite_table(report, stream)
    return None
