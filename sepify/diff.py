"""``sepify diff``: layer-by-layer cost comparison of two models — the one diff engine.

:func:`compare` takes two analyze reports (the ``Analysis.to_dict()`` form, schema
``sepify.analysis/1``) — or anything :func:`load_report` accepts: an :class:`~sepify.analysis.Analysis`,
an ``onnx.ModelProto``, the path of a model file or of a JSON written by
``sepify analyze --format json`` — and returns a :class:`Diff`. ``Diff.to_dict()`` is the JSON
(schema ``sepify.diff/1``); :func:`render_diff` renders that dict as a table, JSON or Markdown,
so a saved diff renders the same as a fresh one.

Layer matching, in this order (each layer is matched at most once):

1. ``mapping`` — explicit ``{old_name: [new_names]}`` given by the caller (``sepify rewrite``
   knows what it replaced; ``sepify diff --map OLD=NEW1,NEW2``). ``[]`` marks an intended removal.
2. **name** — same node name in both models.
3. **split** — a removed layer ``X`` and the added layers named ``X/...`` (``X/depthwise``,
   ``X/pointwise``, ``X/spatial``, ...) form one row: the old layer against the sum of its
   replacements. A removed ``BatchNormalization`` right after ``X`` in the old graph is taken
   as folded into the replacement and joins the row's old side.
4. **position** — the layers still unmatched on both sides are aligned by op type in graph
   order (longest common subsequence, :class:`difflib.SequenceMatcher`); this catches renamed
   layers. ``positional=False`` turns it off.

What is left over is *removed* (old only) or *added* (new only). A matched row is *changed*
when its MACs, FLOPs, params or output bytes differ, when its op types differ or when it is a
split/mapping of one layer into several; otherwise *unchanged* (a renamed layer with the same
costs is unchanged, its row shows both names).

Quantities of a row with several layers on one side are sums; for ``output_bytes`` that is the
activation bytes written by those layers (consistent with ``totals.activation_bytes``).
A quantity that is unknown (``None``) in any layer of a side is unknown for the row.

Rows may carry an ``extra`` dict (``compare(..., extra={name: {...}})`` or ``row.extra[...] =``
afterwards); the renderers show the union of the extra keys as additional columns, in order of
first appearance. ``sepify rewrite`` uses this for its per-layer rank and error.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import __version__
from .errors import ModelError, UsageError
from .render.analysis import md_escape
from .units import human, human_bytes

SCHEMA = "sepify.diff/1"
ANALYSIS_SCHEMA = "sepify.analysis/1"

#: Per-layer quantities compared (row sums).
LAYER_QUANTITIES = ("macs", "flops", "params", "output_bytes")
#: Totals compared: key in ``totals`` (``file_size`` comes from ``model``, ``layers`` is a count).
TOTAL_QUANTITIES = ("macs", "flops", "params", "buffers", "param_bytes", "activation_peak_bytes",
                    "activation_bytes", "unknown", "nodes", "layers", "file_size")
_BYTES = {"output_bytes", "param_bytes", "activation_peak_bytes", "activation_bytes", "file_size"}
STATUSES = ("changed", "added", "removed", "unchanged")


# --- loading ----------------------------------------------------------------------------------
def load_report(source, *, input_shapes: Mapping[str, Sequence[int | str]] | None = None,
                dims: Mapping[str, int] | None = None) -> dict:
    """An analyze report (dict, schema ``sepify.analysis/1``) from any of:

    * such a dict (validated, returned as is);
    * an :class:`~sepify.analysis.Analysis`;
    * an ``onnx.ModelProto`` or the path of a model file (analyzed with ``input_shapes``/``dims``);
    * the path of a JSON file written by ``sepify analyze --format json`` (a ``.json`` suffix, or
      a file whose first non-blank character is ``{``); ``input_shapes``/``dims`` do not apply.

    Errors (no such file, not JSON, another schema) raise :class:`~sepify.errors.ModelError`.
    """
    if isinstance(source, dict):
        return _validate(source, "<report>")
    if hasattr(source, "to_dict") and hasattr(source, "totals") and hasattr(source, "layers"):
        return source.to_dict()
    from .analysis import analyze

    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.is_file() and _looks_like_json(path):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelError(f"{path}: not a valid JSON file ({e})") from None
            except OSError as e:
                raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
            return _validate(data, str(path))
    return analyze(source, input_shapes=input_shapes, dims=dims).to_dict()


def _looks_like_json(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.lstrip()[:1] == b"{"


def _validate(data, label: str) -> dict:
    if not isinstance(data, dict):
        raise ModelError(f"{label}: not a sepify analyze report (expected a JSON object)")
    schema = data.get("schema")
    if schema != ANALYSIS_SCHEMA:
        what = f"schema {schema!r}" if schema else "no 'schema' key"
        raise ModelError(f"{label}: not a sepify analyze report ({what}; expected {ANALYSIS_SCHEMA!r}, "
                         "as written by `sepify analyze --format json`)")
    if not isinstance(data.get("totals"), dict) or not isinstance(data.get("layers"), list):
        raise ModelError(f"{label}: malformed sepify analyze report (missing 'totals' or 'layers')")
    return data


# --- the engine -------------------------------------------------------------------------------
@dataclass
class DiffRow:
    """One row: a layer (or group of layers) of the old model against its match in the new."""

    status: str                 # changed | added | removed | unchanged
    match: str | None           # mapping | name | split | position | None (added/removed)
    old_names: list[str]
    new_names: list[str]
    old_op: str | None
    new_op: str | None
    old: dict | None            # {macs, flops, params, output_bytes} summed over old_names
    new: dict | None
    old_index: int | None = None  # graph index of the first old layer
    new_index: int | None = None  # graph index of the first new layer
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return (self.old_names or self.new_names)[0]

    def delta(self, q: str) -> int | None:
        """new − old (an added row counts old as 0, a removed row new as 0); None if unknown."""
        a = self.old.get(q) if self.old is not None else 0
        b = self.new.get(q) if self.new is not None else 0
        return None if a is None or b is None else b - a

    def pct(self, q: str) -> float | None:
        """Relative change in percent; None when the old value is 0 or unknown (an added row)."""
        d = self.delta(q)
        a = self.old.get(q) if self.old is not None else None
        return None if d is None or not a else 100.0 * d / a

    def to_dict(self) -> dict:
        return {
            "status": self.status, "match": self.match, "name": self.name,
            "old_names": list(self.old_names), "new_names": list(self.new_names),
            "old_op": self.old_op, "new_op": self.new_op,
            "old_index": self.old_index, "new_index": self.new_index,
            "old": self.old, "new": self.new,
            "delta": {q: self.delta(q) for q in LAYER_QUANTITIES},
            "pct": {q: _round(self.pct(q)) for q in LAYER_QUANTITIES},
            "extra": dict(self.extra),
        }


@dataclass
class Diff:
    """Result of :func:`compare`. ``rows`` in new-graph order (removed rows after the row of
    the old layer before them); ``to_dict()`` is the JSON."""

    old: dict
    new: dict
    rows: list[DiffRow]

    def totals(self) -> dict[str, dict]:
        out = {}
        for q in TOTAL_QUANTITIES:
            a, b = _total(self.old, q), _total(self.new, q)
            d = None if a is None or b is None else b - a
            out[q] = {"old": a, "new": b, "delta": d,
                      "pct": _round(100.0 * d / a) if d is not None and a else None,
                      "ratio": _round(b / a, 6) if a and b is not None else None}
        return out

    def counts(self) -> dict[str, int]:
        c = {s: 0 for s in STATUSES}
        for r in self.rows:
            c[r.status] += 1
        c["renamed"] = sum(1 for r in self.rows if r.match in ("position", "mapping")
                           and len(r.old_names) == len(r.new_names) == 1 and r.old_names != r.new_names)
        return c

    def row(self, name: str) -> DiffRow:
        """The row holding the layer ``name`` (old or new side)."""
        for r in self.rows:
            if name in r.old_names or name in r.new_names:
                return r
        raise KeyError(name)

    def extra_columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            for k in r.extra:
                if k not in cols:
                    cols.append(k)
        return cols

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "sepify_version": __version__,
            "old": _model_info(self.old),
            "new": _model_info(self.new),
            "totals": self.totals(),
            "counts": self.counts(),
            "extra_columns": self.extra_columns(),
            "rows": [r.to_dict() for r in self.rows],
        }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _total(report: dict, q: str):
    if q == "file_size":
        return (report.get("model") or {}).get("file_size")
    if q == "layers":
        return len(report.get("layers") or [])
    return (report.get("totals") or {}).get(q)


def _model_info(report: dict) -> dict:
    m = report.get("model") or {}
    return {"path": m.get("path"), "graph": m.get("graph"), "file_size": m.get("file_size"),
            "symbols": report.get("symbols") or {}}


def _sum(layers: list[dict]) -> dict:
    out = {}
    for q in LAYER_QUANTITIES:
        vals = [layer.get(q) for layer in layers]
        out[q] = None if any(v is None for v in vals) else sum(vals)
    return out


def _ops(layers: list[dict]) -> str | None:
    if not layers:
        return None
    ops: list[str] = []
    for layer in layers:
        if layer["op_type"] not in ops:
            ops.append(layer["op_type"])
    return "+".join(ops)


def compare(old, new, mapping: Mapping[str, str | Sequence[str]] | None = None, *,
            extra: Mapping[str, Mapping[str, Any]] | None = None, positional: bool = True,
            input_shapes: Mapping[str, Sequence[int | str]] | None = None,
            dims: Mapping[str, int] | None = None) -> Diff:
    """Compare two models layer by layer (see the module docstring for the matching rules).

    ``old``/``new``: anything :func:`load_report` accepts (``input_shapes``/``dims`` apply to
    models that need analyzing). ``mapping``: ``{old_name: [new_names]}`` matched first.
    ``extra``: ``{layer_name: {column: value}}`` attached to the row holding that layer (old or
    new name). Unknown names in ``mapping`` or ``extra`` raise :class:`UsageError`.
    """
    old_r = load_report(old, input_shapes=input_shapes, dims=dims)
    new_r = load_report(new, input_shapes=input_shapes, dims=dims)
    olds: list[dict] = list(old_r["layers"])
    news: list[dict] = list(new_r["layers"])
    used_old: set[int] = set()
    used_new: set[int] = set()
    groups: list[tuple[list[int], list[int], str]] = []

    def positions(layers: list[dict]) -> dict[str, list[int]]:
        by: dict[str, list[int]] = {}
        for i, layer in enumerate(layers):
            by.setdefault(layer["name"], []).append(i)
        return by

    old_by, new_by = positions(olds), positions(news)

    def take(by: dict[str, list[int]], used: set[int], name: str) -> int | None:
        for i in by.get(name, ()):
            if i not in used:
                used.add(i)
                return i
        return None

    # 1. explicit mapping
    for old_name, targets in (mapping or {}).items():
        targets = [targets] if isinstance(targets, str) else list(targets)
        i = take(old_by, used_old, old_name)
        if i is None:
            raise UsageError(f"mapping: no layer {old_name!r} in the old model"
                             + (" (or it is mapped twice)" if old_name in old_by else ""))
        js = []
        for t in targets:
            j = take(new_by, used_new, t)
            if j is None:
                raise UsageError(f"mapping {old_name!r}: no layer {t!r} in the new model"
                                 + (" (or it is mapped twice)" if t in new_by else ""))
            js.append(j)
        groups.append(([i], js, "mapping"))

    # 2. same name
    for i, layer in enumerate(olds):
        if i in used_old:
            continue
        for j in new_by.get(layer["name"], ()):
            if j not in used_new:
                used_old.add(i)
                used_new.add(j)
                groups.append(([i], [j], "name"))
                break

    # 3. split: removed X -> added X/..., longest names first so the most specific prefix wins
    for i in sorted((i for i in range(len(olds)) if i not in used_old), key=lambda i: -len(olds[i]["name"])):
        prefix = olds[i]["name"] + "/"
        js = [j for j, layer in enumerate(news) if j not in used_new and layer["name"].startswith(prefix)]
        if not js:
            continue
        used_old.add(i)
        used_new.update(js)
        group_old = [i]
        nxt = i + 1
        if nxt < len(olds) and nxt not in used_old and olds[nxt]["op_type"] == "BatchNormalization":
            used_old.add(nxt)
            group_old.append(nxt)
        groups.append((group_old, js, "split"))

    # 4. position and op type among the rest
    if positional:
        rest_old = [i for i in range(len(olds)) if i not in used_old]
        rest_new = [j for j in range(len(news)) if j not in used_new]
        sm = difflib.SequenceMatcher(None, [olds[i]["op_type"] for i in rest_old],
                                     [news[j]["op_type"] for j in rest_new], autojunk=False)
        for a, b, size in sm.get_matching_blocks():
            for k in range(size):
                i, j = rest_old[a + k], rest_new[b + k]
                used_old.add(i)
                used_new.add(j)
                groups.append(([i], [j], "position"))

    rows: list[DiffRow] = []
    for gi, gj, kind in groups:
        ol, nl = [olds[i] for i in sorted(gi)], [news[j] for j in sorted(gj)]
        rows.append(_row(ol, nl, kind))
    rows += [_row([olds[i]], [], None) for i in range(len(olds)) if i not in used_old]
    rows += [_row([], [news[j]], None) for j in range(len(news)) if j not in used_new]
    rows = _order(rows, olds)

    diff = Diff(old_r, new_r, rows)
    for name, cols in (extra or {}).items():
        try:
            diff.row(name).extra.update(cols)
        except KeyError:
            raise UsageError(f"extra: no layer {name!r} in either model") from None
    return diff


def _row(ol: list[dict], nl: list[dict], kind: str | None) -> DiffRow:
    old = _sum(ol) if ol else None
    new = _sum(nl) if nl else None
    if not ol:
        status = "added"
    elif not nl:
        status = "removed"
    else:
        differs = any(old[q] != new[q] for q in LAYER_QUANTITIES)
        reshaped = len(ol) != len(nl) or _ops(ol) != _ops(nl)
        status = "changed" if differs or reshaped else "unchanged"
    return DiffRow(
        status=status, match=kind,
        old_names=[layer["name"] for layer in ol], new_names=[layer["name"] for layer in nl],
        old_op=_ops(ol), new_op=_ops(nl), old=old, new=new,
        old_index=ol[0].get("index") if ol else None, new_index=nl[0].get("index") if nl else None,
    )


def _order(rows: list[DiffRow], olds: list[dict]) -> list[DiffRow]:
    """New-graph order; a removed row goes right after the row of the old layer before it."""
    new_pos = {}  # old layer name -> sort key of its row (last new index of the row)
    keyed = []
    for r in rows:
        if r.new_index is not None:
            key = (r.new_index, 0, 0)
            for n in r.old_names:
                new_pos[n] = r.new_index
            keyed.append((key, r))
    old_pos = {layer["name"]: i for i, layer in enumerate(olds)}
    for r in rows:
        if r.new_index is not None:
            continue
        i = old_pos.get(r.old_names[0], 0)
        anchor = -1
        for k in range(i - 1, -1, -1):
            if olds[k]["name"] in new_pos:
                anchor = new_pos[olds[k]["name"]]
                break
        keyed.append(((anchor, 1, i), r))
    keyed.sort(key=lambda kr: kr[0])
    return [r for _, r in keyed]


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


def _pct(p) -> str:
    return "" if p is None else f"{p:+.1f}%"


def _extra_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return human(v) if abs(v) >= 10_000 else str(v)
    return str(v)


def _label(r: dict) -> str:
    o, n = r["old_names"], r["new_names"]
    if not o or not n or o == n:
        return ", ".join(o or n)
    if r["match"] == "split" and all(x.startswith(o[0] + "/") for x in n):
        tail = ", ".join(x[len(o[0]) + 1:] for x in n)
        return f"{', '.join(o)} → {o[0]}/{{{tail}}}"
    return f"{', '.join(o)} → {', '.join(n)}"


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
        out.append((_TOTAL_LABELS.get(q, q), _num(q, t["old"], digits=2), _num(q, t["new"], digits=2),
                    _num(q, t["delta"], True, 2) if t["delta"] else ("0" if t["delta"] == 0 else "?"),
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


def diff_table(data: dict, stream=None, show_unchanged: bool = False, sort: str = "graph",
               top: int | None = None) -> None:
    from rich.table import Table

    from .render.analysis import _console

    stream = stream or sys.stdout
    console = _console(stream)
    extra_cols = data.get("extra_columns") or []
    rows = select_rows(data, show_unchanged, sort)
    if top:
        rows = rows[:top]
    table = Table(title=f"sepify diff: {_title(data)}")
    for i, col in enumerate((*_LAYER_HEAD, *extra_cols)):
        table.add_column(col, justify="left" if i in (0, 1, 2) else "right",
                         overflow="fold" if i == 1 else "ellipsis")
    for r in rows:
        table.add_row(*_layer_cells(r, extra_cols))
    if rows:
        console.print(table)
    totals = Table(title="totals")
    for i, col in enumerate(("", "before", "after", "Δ", "%", "ratio")):
        totals.add_column(col, justify="left" if i == 0 else "right")
    for row in _totals_rows(data):
        totals.add_row(*row)
    console.print(totals)
    hidden = "" if show_unchanged or not data["counts"]["unchanged"] else " (unchanged layers hidden; --all shows them)"
    console.print(f"layers: {_counts_line(data)}{hidden}")


def diff_markdown(data: dict, show_unchanged: bool = False, sort: str = "graph", top: int | None = None) -> str:
    out = [f"### sepify diff: `{md_escape(_title(data))}`", "",
           "| | before | after | Δ | % | ratio |", "|---|---:|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in _totals_rows(data)]
    out += ["", f"**Layers:** {_counts_line(data)}", ""]
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


def parse_mapping(items: Iterable[str]) -> dict[str, list[str]]:
    """``["a=b/x,b/y", "c=d"]`` (``--map``) → ``{"a": ["b/x", "b/y"], "c": ["d"]}``; ``a=`` → ``[]``."""
    out: dict[str, list[str]] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise UsageError(f"invalid --map {item!r} (expected OLD=NEW or OLD=NEW1,NEW2)")
        out[old.strip()] = [n.strip() for n in new.split(",") if n.strip()]
    return out
