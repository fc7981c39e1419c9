"""Renderers of ``sepify diff`` (``Diff.to_dict()``, schema ``sepify.diff/1``): table, JSON,
Markdown. ``sepify rewrite`` prints its per-layer table through :func:`diff_table` too."""

from __future__ import annotations

import json
import re
import sys

from ..diff import _BYTES
from ..errors import UsageError
from ..units import human, human_bytes
from .common import Column, md_escape, shorten_middle, shorten_op


# --- rendering --------------------------------------------------------------------------------
DIFF_FORMATS = ("table", "json", "markdown")
_MARK = {"changed": "~", "added": "+", "removed": "-", "unchanged": "="}
_TOTAL_LABELS = {"macs": "MACs", "flops": "FLOPs", "params": "params", "buffers": "buffers",
                 "param_bytes": "param bytes", "activation_peak_bytes": "activation peak",
                 "activation_bytes": "activation bytes", "unknown": "unknown nodes", "nodes": "nodes",
                 "layers": "layers", "file_size": "file size"}


def _num(q: str, v, signed: bool = False, digits: int = 1) -> str:
    if v is None:
        return "?"
    text = human_bytes(v, digits) if q in _BYTES else human(v, digits)
    return ("+" + text) if signed and v > 0 else text


def _digits(q: str, old, new) -> int:
    """The number format of every command (one decimal: ``1.8G``, as ``analyze`` prints a
    total), with more decimals (up to 3) only where two different values would print the same."""
    digits = 1
    while digits < 3 and old is not None and new is not None and old != new and _num(q, old, digits=digits) == _num(q, new, digits=digits):
        digits += 1
    return digits


def _pct(p) -> str:
    return "" if p is None else f"{p:+.1f}%"


def _extra_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):  # three significant digits, trailing zeros kept: a column of 0.853, 0.880
        return f"{v:#.3g}".rstrip(".")
    if isinstance(v, int):
        return human(v) if abs(v) >= 10_000 else str(v)
    return str(v)


def _label(r: dict) -> str:
    o, n = r["old_names"], r["new_names"]
    if not o or not n or o == n:
        return ", ".join(o or n)
    if len(o) == 1 and len(n) > 1 and all(x.startswith(o[0] + "/") for x in n):  # a split (or rewrite)
        tail = ",".join(x[len(o[0]) + 1:] for x in n)
        return f"{o[0]} → {o[0]}/{{{tail}}}"
    return f"{', '.join(o)} → {', '.join(n)}"


_SPLIT = re.compile(r"^(.+) → \1/(\{[^{}]*\})$")


def shorten_label(label: str, width: int, head: int | None = None) -> str:
    """A layer label in ``width`` characters. ``X → X/{depthwise,pointwise}`` keeps its form:
    the repeated ``X`` becomes ``…`` (``X → …/{depthwise,pointwise}``), then ``X`` is shortened
    in the middle; anything else is shortened in the middle."""
    if len(label) <= width:
        return label
    m = _SPLIT.match(label)
    if m:
        x, tail = m.groups()
        fixed = len(" → …/") + len(tail)
        if len(x) + fixed <= width:
            return f"{x} → …/{tail}"
        for fixed, end in ((fixed, f" → …/{tail}"), (len(" → …"), " → …")):  # the narrowest: X → …
            room = width - fixed
            if room >= 6 and (head is None or head < room):
                return f"{shorten_middle(x, room, head)}{end}"
    return shorten_middle(label, width, head)


def _op_label(r: dict) -> str:
    if r["old_op"] and r["new_op"] and r["old_op"] != r["new_op"]:
        return f"{r['old_op']} → {r['new_op']}"
    return r["new_op"] or r["old_op"] or ""


def select_rows(data: dict, show_unchanged: bool = False, sort: str = "graph") -> list[dict]:
    rows = [r for r in data["rows"] if show_unchanged or r["status"] != "unchanged"]
    if sort == "delta":
        rows.sort(key=lambda r: (-abs(r["delta"]["macs"] or 0), -abs(r["delta"]["params"] or 0)))
    return rows


def _title(data: dict) -> str:
    def name(side):
        return data[side].get("path") or data[side].get("graph") or side

    return f"{name('old')} → {name('new')}"


def _counts_line(data: dict) -> str:
    c = data["counts"]
    text = f"{c['changed']} changed, {c['added']} added, {c['removed']} removed, {c['unchanged']} unchanged"
    if c.get("renamed"):
        text += f" ({c['renamed']} renamed)"
    return text


def _totals_rows(data: dict) -> list[tuple[str, str, str, str, str, str]]:
    out = []
    for q, t in data["totals"].items():
        if t["old"] is None and t["new"] is None:
            continue
        if q in ("buffers", "unknown") and not t["old"] and not t["new"]:
            continue
        ratio = ""
        if t["ratio"] is not None and t["delta"]:
            ratio = f"×{t['ratio']:.3g}"
            if 0 < t["ratio"] < 1:
                ratio += f" ({1 / t['ratio']:.2f}× less)"
        digits = _digits(q, t["old"], t["new"])
        out.append((_TOTAL_LABELS.get(q, q), _num(q, t["old"], digits=digits), _num(q, t["new"], digits=digits),
                    _num(q, t["delta"], True) if t["delta"] else ("0" if t["delta"] == 0 else "?"),
                    _pct(t["pct"]) if t["delta"] else "", ratio))
    return out


def _layer_cells(r: dict, extra_cols: list[str]) -> list[str]:
    o, n = r["old"] or {}, r["new"] or {}
    d, p = r["delta"], r["pct"]

    def pct(q):
        if r["status"] == "added":
            return "new"
        return _pct(p[q]) if d[q] else ""

    return [
        _MARK[r["status"]], _label(r), _op_label(r),
        _num("macs", o.get("macs")) if r["old"] else "", _num("macs", n.get("macs")) if r["new"] else "",
        _num("macs", d["macs"], True) if d["macs"] != 0 else "", pct("macs"),
        _num("params", d["params"], True) if d["params"] != 0 else "", pct("params"),
        _num("output_bytes", d["output_bytes"], True) if d["output_bytes"] != 0 else "", pct("output_bytes"),
        *[_extra_value(r["extra"].get(k)) for k in extra_cols],
    ]


_LAYER_HEAD = ("", "layer", "op", "MACs before", "MACs after", "Δ MACs", "%", "Δ params", "%",
               "Δ out bytes", "%")
#: the layer table's columns for a width: short headers, and what is left out first when it
#: does not fit (higher ``drop`` first); numbers are never cut
_LAYER_COLUMNS = [Column("", "left"), Column("layer", "left", flex=24, shorten=shorten_label),
                  Column("op", "left", flex=9, shorten=shorten_op), Column("MACs before", short="MACs"),
                  Column("MACs after", short="→ MACs"), Column("Δ MACs", short="ΔMACs", drop=4),
                  Column("%"), Column("Δ params", short="Δparams"), Column("%", drop=5),
                  Column("Δ out bytes", short="Δout B", drop=6), Column("%", drop=7)]
#: extra columns (``sepify rewrite``'s) by name: short header, drop priority
_EXTRA = {"orientation": ("orient.", 9), "energy kept": ("energy", 8), "rel. weight error": ("error", 2),
          "rank": ("rank", 0), "form": ("form", 4), "ms before": ("ms", 1), "ms after": ("→ ms", 1)}


def diff_table(data: dict, stream=None, show_unchanged: bool = False, sort: str = "graph",
               top: int | None = None, title: str | None = None, width: int | None = None) -> None:
    """The layer table and the totals, fitted to ``width`` (default: the terminal's)."""
    from .common import _console, print_table

    stream = stream or sys.stdout
    console = _console(stream, width)
    extra_cols = data.get("extra_columns") or []
    rows = select_rows(data, show_unchanged, sort)
    shown = rows[:top] if top else rows
    cells = [_layer_cells(r, extra_cols) for r in shown]
    columns = list(_LAYER_COLUMNS)
    splits = [m for m in (_SPLIT.match(c[1]) for c in cells) if m]
    if splits:  # room for "X → …/{depthwise,pointwise}" with 8 characters of X
        fixed = max(len(m.group(2)) for m in splits) + len(" → …/")
        columns[1] = Column("layer", "left", flex=max(24, fixed + 8), shorten=shorten_label, fixed=fixed,
                            min_fixed=len(" → …"))
    columns += [Column(k, short=_EXTRA.get(k, (None, 0))[0], drop=_EXTRA.get(k, (None, 10))[1])
                                for k in extra_cols]
    if shown:
        print_table(stream, title or f"sepify diff: {_title(data)}", columns, cells, None, width, compact=True)
    print_table(stream, "totals", [Column("", "left"), Column("before"), Column("after"), Column("Δ"), Column("%"),
                                   Column("ratio", drop=1)], _totals_rows(data), None, width, compact=True)
    hidden = "" if show_unchanged or not data["counts"]["unchanged"] else " (unchanged layers hidden; --all shows them)"
    if len(shown) < len(rows):
        hidden += f"; {len(rows) - len(shown)} more row(s) not shown (--top {top})"
    console.print(f"layers: {_counts_line(data)}{hidden}")


def diff_markdown(data: dict, show_unchanged: bool = False, sort: str = "graph", top: int | None = None,
                  title: str | None = None) -> str:
    """The totals and the layer rows in Markdown; ``title``: the heading's text instead of
    ``sepify diff: `old → new```."""
    out = [f"### {title}" if title else f"### sepify diff: `{md_escape(_title(data))}`", "",
           "| | before | after | Δ | % | ratio |", "|---|---:|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in _totals_rows(data)]
    out += ["", f"**Layers:** {_counts_line(data)}", ""]
    for w in data.get("warnings") or []:
        out += [f"> warning: {md_escape(w)}", ""]
    extra_cols = data.get("extra_columns") or []
    rows = select_rows(data, show_unchanged, sort)
    if top:
        rows = rows[:top]
    if rows:
        head = (*_LAYER_HEAD, *extra_cols)
        out += [f"<details><summary>{len(rows)} layer row(s)</summary>", "",
                "| " + " | ".join(md_escape(h) for h in head) + " |",
                "|" + "|".join("---" if i in (0, 1, 2) else "---:" for i in range(len(head))) + "|"]
        for r in rows:
            cells = _layer_cells(r, extra_cols)
            cells[1] = f"`{cells[1]}`"
            out.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
        out += ["", "</details>"]
    return "\n".join(out) + "\n"


def render_diff(data: dict, fmt: str = "table", stream=None, show_unchanged: bool = False,
                sort: str = "graph", top: int | None = None) -> str | None:
    """Render ``Diff.to_dict()``: returns text for json/markdown, prints a table to ``stream``
    (default stdout) and returns None for ``table``."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "markdown":
        return diff_markdown(data, show_unchanged, sort, top)
    if fmt == "table":
        diff_table(data, stream, show_unchanged, sort, top)
        return None
    raise UsageError(f"unknown diff format {fmt!r} (choose from {', '.join(DIFF_FORMATS)})")
