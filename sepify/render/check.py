"""Output of ``sepify check``: table, JSON and Markdown renderers, JUnit XML, GitHub Actions.

Everything here works on the report's dict form (``CheckReport.to_dict()``, schema
``sepify.check/1``), so a saved JSON renders the same as a fresh check.

* JUnit: ``<testsuites>`` → one ``<testsuite>`` per model → one ``<testcase>`` per budget
  (``classname`` = model path, ``name`` = budget: ``max-macs``, ``max-growth:params``, ...), a
  ``<failure>`` when over budget; a model that could not be checked is one testcase ``check``
  with an ``<error>``.
* GitHub Actions (``GITHUB_ACTIONS=true``): one ``::error file=MODEL,title=...::message`` line
  per failed budget or model error, and the Markdown report appended to ``$GITHUB_STEP_SUMMARY``
  when that variable is set.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

from ..check.budgets import QUANTITIES, fmt_against, fmt_many, fmt_value
from ..fileio import write_bytes
from .common import md_escape

CHECK_FORMATS = ("table", "json", "markdown")
_STATUS = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}


# --- cells ------------------------------------------------------------------------------------
def budget_cells(b: dict) -> tuple[str, str, str, str, str]:
    """(quantity, limit, value, margin, result) as text for one budget dict."""
    q = b["quantity"]
    label = QUANTITIES[q][1]
    st = b.get("style") or "binary"
    if b["kind"] == "growth":
        label += " growth"
        val, lim, base = fmt_against(q, b["value"], b["limit"], b["baseline"], style=st)
        limit = f"{lim} (+{b['growth_limit'] * 100:.1f}% of {base})"
        if b["growth"] is not None:
            val = f"{val} ({b['growth'] * 100:+.1f}%)"
        elif b["value"] is not None and b["baseline"] == 0 and b["value"]:
            val = f"{val} (from 0)"
    else:
        limit, val = fmt_many(q, b["limit"], b["value"], style=st)
    m = b["margin"]
    if m is None:
        margin = "?"
    else:
        margin = ("+" if m > 0 else "-" if m < 0 else "") + fmt_value(q, abs(m), style=st)
        if b["margin_pct"] is not None and m:
            margin += f" ({b['margin_pct']:+.1f}%)"
    return label, limit, val, margin, "pass" if b["passed"] else "FAIL"


def summary_line(data: dict) -> str:
    s = data["summary"]
    parts = [f"{s['models']} model(s): {s['passed']} within budget"]
    if s["failed"]:
        parts.append(f"{s['failed']} over budget")
    if s["errors"]:
        parts.append(f"{s['errors']} error(s)")
    verdict = {0: "PASS", 1: "FAIL", 2: "ERROR"}[data["exit_code"]]
    return f"sepify check: {verdict} — " + ", ".join(parts)


# --- table / markdown / json ------------------------------------------------------------------
def check_table(data: dict, stream=None, messages_on_stderr: bool = False) -> None:
    """The table; ``messages_on_stderr``: the caller prints each model error and warning as one
    line on stderr (the terminal shows both streams: each message is printed once)."""
    from rich.table import Table

    from .common import _console

    stream = stream or sys.stdout
    console = _console(stream)
    for m in data["models"]:
        if m["status"] == "error":
            if messages_on_stderr:
                stream.write(f"{m['path']} — ERROR (the error is on stderr)\n")
            else:  # plain text: one line however long, as on stderr
                err = m["error"] or ""
                stream.write((f"ERROR: {err}" if m["path"] in err else f"{m['path']}: ERROR: {err}") + "\n")
            continue
        title = f"{m['path']} — {_STATUS[m['status']]}"
        if m.get("baseline"):
            title += f" (baseline {m['baseline']})"
        table = Table(title=title)
        for i, col in enumerate(("quantity", "limit", "value", "margin", "result")):
            table.add_column(col, justify="left" if i in (0, 4) else "right")
        for b in m["budgets"]:
            cells = budget_cells(b)
            style = None if b["passed"] else "bold red"
            table.add_row(*cells, style=style)
        console.print(table)
        for b in m["budgets"]:
            if not b["passed"]:
                console.print(f"  over budget: {b['message']}")
        for note in m.get("notes") or []:
            console.print(f"  note: {note}")
    if not messages_on_stderr:
        for w in data.get("warnings") or []:
            stream.write(f"warning: {w}\n")
    console.print(summary_line(data))


def check_markdown(data: dict) -> str:
    icon = {0: "✅", 1: "❌", 2: "⚠️"}[data["exit_code"]]
    out = [f"### {icon} {summary_line(data)}", ""]
    for w in data.get("warnings") or []:
        out += [f"> warning: {md_escape(w)}", ""]
    for m in data["models"]:
        out.append(f"#### `{md_escape(m['path'])}` — {_STATUS[m['status']]}")
        out.append("")
        if m["status"] == "error":
            out += [f"> {md_escape(m['error'])}", ""]
            continue
        if m.get("baseline"):
            out += [f"Baseline: `{md_escape(m['baseline'])}`", ""]
        out += ["| quantity | limit | value | margin | result |", "|---|---:|---:|---:|---|"]
        for b in m["budgets"]:
            q, lim, val, margin, res = budget_cells(b)
            res = "✅ pass" if b["passed"] else "❌ **FAIL**"
            out.append(f"| {md_escape(q)} | {md_escape(lim)} | {md_escape(val)} | {md_escape(margin)} | {res} |")
        out.append("")
        for note in m.get("notes") or []:
            out.append(f"- note: {md_escape(note)}")
        if m.get("notes"):
            out.append("")
    return "\n".join(out)


def render_check(data: dict, fmt: str = "table", stream=None, messages_on_stderr: bool = False) -> str | None:
    """Text for json/markdown; prints the table to ``stream`` and returns None for ``table``."""
    if fmt == "json":
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    if fmt == "markdown":
        return check_markdown(data) + "\n"
    check_table(data, stream, messages_on_stderr)
    return None


# --- JUnit ------------------------------------------------------------------------------------
def junit_xml(data: dict) -> bytes:
    """JUnit XML: one testsuite per model, one testcase per budget."""
    s = data["summary"]
    n_cases = sum(1 if m["status"] == "error" else len(m["budgets"]) for m in data["models"])
    root = ET.Element("testsuites", name="sepify check", tests=str(n_cases),
                      failures=str(s["budgets_failed"]), errors=str(s["errors"]),
                      time=f"{sum(m.get('seconds', 0) for m in data['models']):.3f}")
    for m in data["models"]:
        err = m["status"] == "error"
        failures = sum(1 for b in m["budgets"] if not b["passed"])
        suite = ET.SubElement(root, "testsuite", name=m["path"], tests=str(1 if err else len(m["budgets"])),
                              failures=str(failures), errors="1" if err else "0", skipped="0",
                              time=f"{m.get('seconds', 0):.3f}")
        if err:
            case = ET.SubElement(suite, "testcase", classname=m["path"], name="check", time=f"{m.get('seconds', 0):.3f}")
            e = ET.SubElement(case, "error", message=m["error"] or "error", type="SepifyError")
            e.text = m["error"]
            continue
        for b in m["budgets"]:
            case = ET.SubElement(suite, "testcase", classname=m["path"], name=b["name"], time="0")
            if not b["passed"]:
                f = ET.SubElement(case, "failure", message=b["message"], type="BudgetExceeded")
                q, lim, val, margin, _ = budget_cells(b)
                f.text = f"{b['message']}\nlimit: {lim}\nvalue: {val}\nmargin: {margin}" + (
                    f"\n{b['detail']}" if b["detail"] else "")
            else:
                out = ET.SubElement(case, "system-out")
                out.text = b["message"]
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(data: dict, path: str | os.PathLike, inputs=None) -> None:
    write_bytes(path, junit_xml(data), inputs)


# --- GitHub Actions ---------------------------------------------------------------------------
def in_github_actions(env=None) -> bool:
    return (env if env is not None else os.environ).get("GITHUB_ACTIONS") == "true"


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def _workspace_path(path: str, env) -> str:
    ws = env.get("GITHUB_WORKSPACE")
    if ws:
        try:
            rel = os.path.relpath(os.path.abspath(path), ws)
            if not rel.startswith(".."):
                return rel.replace(os.sep, "/")
        except ValueError:
            pass
    return path.replace(os.sep, "/")


def github_annotations(data: dict, env=None) -> list[str]:
    """``::error file=...,title=...::message`` lines for failed budgets and model errors, and a
    ``::warning`` line per settings warning."""
    env = env if env is not None else os.environ
    lines = []
    for m in data["models"]:
        f = _escape_prop(_workspace_path(m["path"], env))
        if m["status"] == "error":
            lines.append(f"::error file={f},title={_escape_prop('sepify check: error')}::{_escape_data(m['error'] or '')}")
            continue
        for b in m["budgets"]:
            if not b["passed"]:
                title = _escape_prop(f"sepify check: {b['name']} exceeded")
                lines.append(f"::error file={f},title={title}::{_escape_data(b['message'])}")
    for w in data.get("warnings") or []:  # settings that fail no model (a dims key no model has)
        lines.append(f"::warning title={_escape_prop('sepify check: warning')}::{_escape_data(w)}")
    return lines


def github_report(data: dict, stream=None, env=None) -> None:
    """Under ``GITHUB_ACTIONS=true``: annotations to ``stream`` and the Markdown report
    appended to ``$GITHUB_STEP_SUMMARY`` (if set). Does nothing elsewhere."""
    env = env if env is not None else os.environ
    if not in_github_actions(env):
        return
    stream = stream or sys.stdout
    for line in github_annotations(data, env):
        stream.write(line + "\n")
    stream.flush()
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(check_markdown(data) + "\n")
        except OSError as e:
            sys.stderr.write(f"sepify: warning: cannot append to $GITHUB_STEP_SUMMARY ({summary}): {e.strerror or e}\n")
