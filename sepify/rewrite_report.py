"""Renderers of the ``sepify rewrite`` report (table, json, markdown)."""

from __future__ import annotations

import os
import sys

from .report import _console, _md_escape, dumps_json
from .units import human


def _pct(a, b) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _rows(report: dict):
    for r in report["layers"]:
        yield (r["name"], r["orientation"], f"{r['rank']}/{r['max_rank']}", f"{r['energy']:.3f}", f"{r['rel_error']:.4f}",
               f"{human(r['macs_before'])} → {human(r['macs_after'])}", f"{human(r['params_before'])} → {human(r['params_after'])}",
               f"folded {r['folded_batchnorm']}" if r.get("folded_batchnorm") else "")


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
    from rich.table import Table

    console = _console(stream or sys.stdout)
    t = report["totals"]
    table = Table(title=f"sepify rewrite: {report.get('model') or 'model'} ({_criterion(report)})")
    for col, just in (("layer", "left"), ("orientation", "left"), ("rank", "right"), ("energy kept", "right"),
                      ("rel. weight error", "right"), ("MACs", "right"), ("params", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    for row in _rows(report):
        table.add_row(*row)
    console.print(table)
    b, a = t["before"], t["after"]
    console.print(f"totals: MACs {human(b['macs'])} → {human(a['macs'])} ({_pct(a['macs'], b['macs'])}), "
                  f"params {human(b['params'])} → {human(a['params'])} ({_pct(a['params'], b['params'])}), "
                  f"{t['rewritten']} rewritten, {t['skipped']} not rewritten")
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
    t = report["totals"]
    b, a = t["before"], t["after"]
    name = os.path.basename(report.get("model") or "") or "model"
    out = [f"### sepify rewrite: `{_md_escape(name)}` ({_md_escape(_criterion(report))})", "",
           "| | before | after | ratio |", "|---|---:|---:|---:|",
           f"| MACs | {human(b['macs'])} | {human(a['macs'])} | {_pct(a['macs'], b['macs'])} |",
           f"| params | {human(b['params'])} | {human(a['params'])} | {_pct(a['params'], b['params'])} |", "",
           "| layer | orientation | rank | energy kept | rel. weight error | MACs | params | note |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in _rows(report):
        out.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    if report["skipped"]:
        out += ["", "<details><summary>not rewritten</summary>", ""]
        out += [f"- `{_md_escape(s['name'])}`: {_md_escape(s['reason'])}" for s in report["skipped"]]
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
