"""Renderers: the same report as a rich table (people), JSON and CSV (machines), Markdown (PR
comments). Renderers take the report's ``to_dict()`` form, so a saved JSON renders the same
as a fresh analysis."""

from __future__ import annotations

import csv
import io
import os
import sys

from ..units import human, human_bytes
from .common import Column, dumps_json, md_escape, md_text, print_table, shorten_op

FORMATS = ("table", "json", "csv", "markdown")


def _shape(shapes) -> str:
    if not shapes:
        return ""
    return ", ".join([_dims(s) for s in shapes]) if len(shapes) > 1 else _dims(shapes[0])


def _dims(s) -> str:
    if s is None:
        return "?"
    if None in s:
        return "x".join(["?" if d is None else str(d) for d in s])
    return "x".join(map(str, s))


SORT_KEYS = ("graph", "macs", "flops", "params", "output_bytes", "name")


def select_layers(layers: list[dict], sort: str = "graph", top: int | None = None) -> list[dict]:
    """Order rows (graph order unless ``sort``) and keep the ``top`` first; deterministic."""
    rows = list(layers)
    if top and sort == "graph":
        sort = "macs"
    if sort == "name":
        rows.sort(key=lambda r: (r["name"], r["index"]))
    elif sort != "graph":
        rows.sort(key=lambda r: (-(r.get(sort) or 0), r["index"]))
    return rows[:top] if top else rows


#: the orders of ``--by-op`` rows (``graph`` and ``output_bytes`` have none there: MACs)
GROUP_SORT_KEYS = ("macs", "flops", "params", "name")


def select_groups(by_op: dict, sort: str = "graph", top: int | None = None) -> list[tuple[str, dict]]:
    """The ``--by-op`` rows: heaviest first by ``sort`` (MACs unless flops/params), or by op
    name; the ``top`` first. Deterministic."""
    key = group_sort_key(sort)
    if key == "name":
        groups = sorted(by_op.items())
    else:
        groups = sorted(by_op.items(), key=lambda kv: (-kv[1][key], -kv[1]["macs"], -kv[1]["flops"], kv[0]))
    return groups[:top] if top else groups


def group_sort_key(sort: str) -> str:
    return sort if sort in GROUP_SORT_KEYS else "macs"


# --- analysis ---------------------------------------------------------------------------------
def analysis_table(data: dict, stream=None, sort: str = "graph", top: int | None = None, by_op: bool = False,
                   width: int | None = None) -> None:
    """The table, fitted to ``width`` (default: the terminal's, see ``table_width``): at 80
    columns layer names are shortened in the middle, FLOPs then out bytes then output shapes
    are left out before a number would be cut, and an empty note column is not shown."""
    stream = stream or sys.stdout
    t = data["totals"]
    title = data["model"].get("path") or data["model"].get("graph") or "model"
    if by_op:
        columns = [Column("op type", "left", flex=12), Column("count"), Column("MACs"), Column("FLOPs", drop=1),
                   Column("params"), Column("unknown", drop=2)]
        shown = select_groups(data["by_op"], sort, top)
        hidden, what = len(data["by_op"]) - len(shown), "op types"
        rows = [(op, str(g["count"]), human(g["macs"]), human(g["flops"]), human(g["params"]),
                 str(g["unknown"]) if g["unknown"] else "") for op, g in shown]
        total = ("total", str(len(data["layers"])), human(t["macs"]), human(t["flops"]), human(t["params"]),
                 str(t["unknown"]) if t["unknown"] else "")
        title = f"{title} — by op type"
    else:
        columns = [Column("#"), Column("name", "left", flex=16), Column("op", "left", flex=9, shorten=shorten_op),
                   Column("output", "left", drop=1), Column("MACs"), Column("FLOPs", drop=3), Column("params"),
                   Column("out bytes", short="out B", drop=2), Column("note", "left", fold=True)]
        layers = select_layers(data["layers"], sort, top)
        hidden, what = len(data["layers"]) - len(layers), "layers"
        notes = [f"unknown: {r['unknown']}" if r["unknown"] else r["note"] for r in layers]
        marks = _note_marks(notes)
        rows = [(str(r["index"]), r["name"], r["op_type"], _shape(r["output_shapes"]), human(r["macs"]),
                 human(r["flops"]), human(r["params"]) if r["params"] else "", human_bytes(r["output_bytes"]),
                 marks.get(note, note))
                for r, note in zip(layers, notes)]
        total = ("", "total", "", "", human(t["macs"]), human(t["flops"]), human(t["params"]),
                 human_bytes(t["activation_peak_bytes"]) + " peak", "")
    print_table(stream, title, columns, rows, total, width, compact=True)
    lines = [summary_line(data)]
    if not by_op:
        lines += [f"{mark}: {note} ({sum(1 for n in notes if n == note)} layers)" for note, mark in marks.items()]
    if hidden:
        key = group_sort_key(sort) if by_op else "macs" if sort == "graph" else sort
        order = "the first by name" if key == "name" else f"the heaviest by {_KEY_WORDS.get(key, key)}"
        lines.insert(0, f"{hidden} more {what} not shown (--top {top}: {order}; the total row counts them all)")
    # plain text (rich would read "[...]" in a tensor name as markup, and wrap long notes)
    stream.write("\n".join([*lines, *(f"note: {note}" for note in data.get("notes", []))]) + "\n")


_KEY_WORDS = {"macs": "MACs", "flops": "FLOPs", "output_bytes": "output bytes"}


def _note_marks(notes: list[str]) -> dict[str, str]:
    """A note that three rows or more share is shown as a mark (``[1]``) in the table and once
    below it: the table stays one line per layer."""
    counts: dict[str, int] = {}
    for n in notes:
        if n:
            counts[n] = counts.get(n, 0) + 1
    shared = [n for n, c in counts.items() if c >= 3]
    return {n: f"[{i}]" for i, n in enumerate(shared, 1)}


def summary_line(data: dict) -> str:
    t = data["totals"]
    parts = [f"MACs {human(t['macs'])} ({t['macs']:,})"]
    if t.get("macs_formula"):
        parts[-1] += f" = {t['macs_formula']}"
    parts.append(f"FLOPs {human(t['flops'])}")
    parts.append(f"params {human(t['params'])} ({t['params']:,})")
    if t["buffers"]:
        parts.append(f"buffers {t['buffers']:,}")
    parts.append(f"activation peak {human_bytes(t['activation_peak_bytes'])}")
    parts.append(f"unknown {t['unknown']}")
    return "totals: " + ", ".join(parts)


CSV_COLUMNS = ("index", "name", "op_type", "domain", "macs", "flops", "params", "buffers",
               "output_shapes", "output_bytes", "unknown", "note")


BY_OP_CSV_COLUMNS = ("op_type", "count", "macs", "flops", "params", "unknown")


def analysis_csv(data: dict, sort: str = "graph", top: int | None = None, by_op: bool = False) -> str:
    """One row per layer (``CSV_COLUMNS``), or with ``by_op`` one per op type (``BY_OP_CSV_COLUMNS``,
    in :func:`select_groups` order, as the table)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if by_op:
        w.writerow(BY_OP_CSV_COLUMNS)
        for op, g in select_groups(data["by_op"], sort, top):
            w.writerow([op, *(g[c] for c in BY_OP_CSV_COLUMNS[1:])])
        return buf.getvalue()
    w.writerow(CSV_COLUMNS)
    for r in select_layers(data["layers"], sort, top):
        w.writerow(["" if r[c] is None else (_shape(r[c]) if c == "output_shapes" else r[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def analysis_markdown(data: dict, sort: str = "graph", top: int | None = None, by_op: bool = False) -> str:
    t = data["totals"]
    name = os.path.basename(data["model"].get("path") or "") or data["model"].get("graph") or "model"
    out = [f"### sepify analyze: `{md_escape(name)}`", "",
           "| MACs | FLOPs | params | buffers | activation peak | unknown nodes |",
           "|---:|---:|---:|---:|---:|---:|",
           f"| {human(t['macs'])} | {human(t['flops'])} | {human(t['params'])} | {human(t['buffers'])} "
           f"| {human_bytes(t['activation_peak_bytes'])} | {t['unknown']} |", ""]
    if t.get("macs_formula"):
        out += [f"MACs as a formula of the free dimensions: `{t['macs_formula']}`", ""]
    if by_op:
        out += ["| op type | count | MACs | FLOPs | params |", "|---|---:|---:|---:|---:|"]
        for op, g in select_groups(data["by_op"], sort, top):
            out.append(f"| {md_text(op)} | {g['count']} | {human(g['macs'])} | {human(g['flops'])} | {human(g['params'])} |")
    else:
        rows = select_layers(data["layers"], sort, top)
        out += ["<details><summary>layers" + (f" (top {top} by {sort if sort != 'graph' else 'macs'})" if top else "")
                + "</summary>", "",
                "| # | name | op | output | MACs | params | note |", "|---:|---|---|---|---:|---:|---|"]
        for r in rows:
            note = f"unknown: {r['unknown']}" if r["unknown"] else r["note"]
            out.append(f"| {r['index']} | {md_text(r['name'])} | {md_text(r['op_type'])} | {_shape(r['output_shapes'])} "
                       f"| {human(r['macs'])} | {human(r['params']) if r['params'] else ''} | {md_escape(note)} |")
        out += ["", "</details>", ""]  # (a blank line ends the HTML block: the notes below are Markdown again)
    for note in data.get("notes", []):
        out.append(f"- {md_escape(note)}")
    return "\n".join(out) + "\n"


def render_analysis(data: dict, fmt: str, stream=None, sort: str = "graph", top: int | None = None,
                    by_op: bool = False) -> str | None:
    """Render to text (json/csv/markdown) or print a table to ``stream`` (returns None)."""
    if fmt == "json":
        return dumps_json(data)
    if fmt == "csv":
        return analysis_csv(data, sort, top, by_op)
    if fmt == "markdown":
        return analysis_markdown(data, sort, top, by_op)
    analysis_table(data, stream, sort, top, by_op)
    return None
