"""Self-contained HTML reports of ``analyze``, ``rewrite`` and ``diff`` (``--format html``).

One file that opens from disk with no network: plotly.js, the styles and the report itself
are inline (no CDN, no web fonts: the page uses the system's fonts). The charts are plotly
figures built here in Python; the report is embedded unchanged as JSON
(``<script type="application/json" id="sepify-report">``, the same object ``--format json``
writes), and every number on the page is read from it.

A browser draws a few thousand bars or points comfortably, not 50,000: above
:data:`MAX_BARS` layers the per-layer chart shows sums over runs of consecutive layers (the
hover names the heaviest layer of each run), above :data:`MAX_POINTS` the memory curve keeps
the largest value of each run (so the peak stays visible); the page says so where it does.
Tables list the heaviest rows, not all of them; every row is in the embedded JSON.

plotly is a dependency of sepify (imported only when an HTML report is written).
"""

from __future__ import annotations

import html
import json
import math

from ..errors import UsageError
from ..units import human, human_bytes

MAX_BARS = 2000
MAX_POINTS = 5000
TOP_LABELS = 5  # heaviest bars labelled on the per-layer chart
TABLE_ROWS = 50  # rows of the "heaviest" tables
LIST_ROWS = 500  # unknown nodes, notes, skipped convs listed before "and N more"

_QUANTITIES = [("macs", "MACs", human), ("flops", "FLOPs", human), ("params", "params", human),
               ("output_bytes", "output bytes", human_bytes)]


PLOTLY_MISSING = "--format html needs plotly, a dependency of sepify that is missing here: pip install plotly"


def _plotly():
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        import plotly.offline
    except ImportError:
        raise UsageError(PLOTLY_MISSING) from None
    return go, pio, plotly.offline


def check_available() -> None:
    """Raise the one-line UsageError when plotly is missing (before any work is done)."""
    _plotly()


# --- page scaffolding ---------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:14px 24px}
header h1{font-size:20px;margin:0 0 4px 0;font-weight:600}
header .sub{font-size:13px;color:#d0d7de;word-break:break-all}
main{padding:12px 24px 40px 24px;max-width:1400px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:14px 0;padding:12px 16px}
h2{font-size:16px;margin:4px 0 10px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:130px;background:#fff}
.card .label{font-size:12px;color:#57606a;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:600}
.card .exact{font-size:12px;color:#57606a}
.bad .value{color:#cf222e}.good .value{color:#1a7f37}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #eaeef2;padding:3px 8px;text-align:left;vertical-align:top;max-width:520px;overflow-wrap:break-word}
.scroll{overflow-x:auto;max-width:100%}
th{background:#f6f8fa;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.notice{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:6px 10px;font-size:13px;margin:6px 0}
.muted{color:#57606a;font-size:13px}
code{font-size:12px;background:#f6f8fa;padding:1px 4px;border-radius:4px}
.added{color:#0969da}.removed{color:#8250df}.up{color:#cf222e}.down{color:#1a7f37}
footer{color:#57606a;font-size:12px;padding:0 24px 24px 24px}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _script_json(data) -> str:
    """JSON safe inside a <script> element (``<``, ``>``, ``&`` as \\u escapes: the same JSON)."""
    return (json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _page(title: str, subtitle: str, body: list[str], data: dict) -> str:
    _, _, offline = _plotly()
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>",
        f"<script>{offline.get_plotlyjs()}</script>",
        "</head>", "<body>",
        f'<header><h1>{_e(title)}</h1><div class="sub">{_e(subtitle)}</div></header>',
        "<main>", *body, "</main>",
        f'<footer>sepify {_e(data.get("sepify_version", ""))} · schema {_e(data.get("schema", ""))} · the numbers '
        'on this page are those of <code>--format json</code>, embedded below as '
        '<code>&lt;script id="sepify-report"&gt;</code>.</footer>',
        f'<script type="application/json" id="sepify-report">{_script_json(data)}</script>',
        "</body>", "</html>", ""])


def _figure(fig, div_id: str, height: int = 420, right: int = 20) -> str:
    _, pio, _ = _plotly()
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=right, t=70, b=40),
                      font=dict(family="system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif"))
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id,
                       default_height=f"{height}px", config={"displaylogo": False, "responsive": True})


def _card(label: str, value: str, exact: str = "", cls: str = "", test_id: str = "") -> str:
    tid = f' data-total="{_e(test_id)}"' if test_id else ""
    return (f'<div class="card {cls}"{tid}><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>'
            f'<div class="exact">{_e(exact)}</div></div>')


def _table(headers: list[str], rows: list[list], num: set[int] | None = None, table_id: str = "") -> str:
    num = num or set()
    tid = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in num else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in num else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _more(total: int, shown: int, what: str) -> str:
    if total <= shown:
        return ""
    return f'<p class="muted">… and {total - shown:,} more {_e(what)} (all of them are in the embedded JSON).</p>'


def _shape(shapes) -> str:
    from .analysis import _shape as shape

    return shape(shapes)


def _groups(n: int, limit: int) -> tuple[int, list[tuple[int, int]]]:
    """Runs of consecutive indices [start, stop) covering range(n) in at most ``limit`` runs."""
    size = max(1, math.ceil(n / limit))
    return size, [(i, min(n, i + size)) for i in range(0, n, size)]


def _generic(value) -> str:
    """A value of a field this renderer does not know (added by a later sepify), as text."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def _generic_section(title: str, value) -> str:
    """A section for a report field without a dedicated view: a key/value table (dict), a
    table of its rows (list of dicts), or the value."""
    if isinstance(value, dict):
        body = _table(["field", "value"], [[k, _generic(v)] for k, v in value.items()])
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        cols: list[str] = []
        for x in value:
            cols += [k for k in x if k not in cols]
        body = _table(cols, [[_generic(x.get(c)) for c in cols] for x in value[:LIST_ROWS]])
        body += _more(len(value), LIST_ROWS, "rows")
    else:
        body = f"<p>{_e(_generic(value))}</p>"
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


# --- analyze --------------------------------------------------------------------------------------
def _totals_cards(t: dict) -> str:
    cards = [_card("MACs", human(t["macs"]), f"{t['macs']:,}", test_id="macs"),
             _card("FLOPs", human(t["flops"]), f"{t['flops']:,}", test_id="flops"),
             _card("params", human(t["params"]), f"{t['params']:,}", test_id="params")]
    if t.get("buffers"):
        cards.append(_card("buffers", human(t["buffers"]), f"{t['buffers']:,}", test_id="buffers"))
    cards += [_card("activation peak", human_bytes(t["activation_peak_bytes"]), f"{t['activation_peak_bytes']:,} B",
                    test_id="activation_peak_bytes"),
              _card("unknown nodes", str(t["unknown"]), f"of {t['nodes']:,} nodes", "bad" if t["unknown"] else "",
                    test_id="unknown")]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _layer_chart(layers: list[dict]) -> str:
    go, _, _ = _plotly()
    n = len(layers)
    size, runs = _groups(n, MAX_BARS)
    grouped = size > 1
    xs, hover, ys = [], [], {q: [] for q, _, _ in _QUANTITIES}
    top_by = {q: [] for q, _, _ in _QUANTITIES}  # per run, its heaviest layer by each quantity
    for start, stop in runs:
        run = layers[start:stop]
        for q, _, _ in _QUANTITIES:
            ys[q].append(sum(r.get(q) or 0 for r in run))
            top_by[q].append(max(run, key=lambda r: r.get(q) or 0)["name"] if grouped else run[0]["name"])
        if grouped:
            top = max(run, key=lambda r: r.get("macs") or 0)
            xs.append(start)
            hover.append(f"layers {start}–{stop - 1} ({stop - start})<br>heaviest: {_e(top['name'])} ({_e(top['op_type'])}, "
                         f"{human(top.get('macs'))} MACs)<br>"
                         + "<br>".join(f"{label}: {fmt(ys[q][-1])} (sum)" for q, label, fmt in _QUANTITIES))
        else:
            r = run[0]
            xs.append(r["index"])
            hover.append(f"<b>{_e(r['name'])}</b> ({_e(r['op_type'])})<br>output {_e(_shape(r['output_shapes']))}<br>"
                         + "<br>".join(f"{label}: {fmt(r.get(q)) if r.get(q) is not None else 'unknown'}"
                                       + (f" ({r[q]:,})" if r.get(q) else "") for q, label, fmt in _QUANTITIES)
                         + (f"<br>unknown: {_e(r['unknown'])}" if r.get("unknown") else ""))

    def labels(q: str) -> list[dict]:
        """The heaviest bars by ``q``, labelled with the layer's name (of a run: its heaviest layer's)."""
        order = sorted(range(len(xs)), key=lambda i: -ys[q][i])
        # only bars that stand out: heavier than the first bar left unlabelled (ties: none)
        floor = ys[q][order[TOP_LABELS]] if len(order) > TOP_LABELS else 0
        order = [i for i in order[:TOP_LABELS] if ys[q][i] > floor]
        return [dict(x=xs[i], y=ys[q][i], text=_e(top_by[q][i]) + ("…" if grouped else ""), showarrow=True,
                     arrowhead=0, ax=0, ay=-20 - 14 * j, font=dict(size=11))  # staggered: neighbours stay legible
                for j, i in enumerate(order) if ys[q][i] > 0]

    fig = go.Figure(go.Bar(x=xs, y=ys["macs"], hovertext=hover, hoverinfo="text", marker_color="#0969da",
                           marker_line_width=0, name="MACs"))  # (an outline would wash out thin bars)
    buttons = [dict(label=label, method="update",
                    args=[{"y": [ys[q]], "name": [label]}, {"annotations": labels(q), "yaxis.title.text": label}, [0]])
               for q, label, _ in _QUANTITIES]
    fig.update_layout(annotations=labels("macs"), yaxis_title="MACs", xaxis_title="layer (graph order)",
                      bargap=0.05 if n > 100 else 0.2,
                      updatemenus=[dict(type="buttons", direction="right", x=0, y=1.02, xanchor="left", yanchor="bottom",
                                        buttons=buttons, showactive=True)])
    if n <= 30:
        fig.update_xaxes(dtick=1)
    unknown = [r for r in layers if r.get("unknown")]
    if not grouped and 0 < len(unknown) <= 200:  # a bar of unknown height: marked, not drawn as 0
        fig.add_trace(go.Scatter(x=[r["index"] for r in unknown], y=[0] * len(unknown), mode="markers+text",
                                 text=["?"] * len(unknown), textposition="top center", name="unknown cost",
                                 marker=dict(color="#cf222e", symbol="x", size=9), hoverinfo="text",
                                 hovertext=[f"<b>{_e(r['name'])}</b>: cost unknown ({_e(r['unknown'])})" for r in unknown]))
        fig.update_layout(showlegend=False)
    notice = ""
    if grouped:
        notice = (f'<div class="notice" id="aggregated-layers">{n:,} layers are more than a browser draws well: each bar '
                  f"is the sum of {size:,} consecutive layers ({len(runs):,} bars); the hover names the heaviest "
                  "layer of each. Every layer is in the embedded JSON.</div>")
    return notice + _figure(fig, "chart-layers", 460)


def _op_chart(by_op: dict) -> str:
    go, _, _ = _plotly()
    groups = sorted(by_op.items(), key=lambda kv: (kv[1]["macs"], kv[1]["flops"]))
    ops = [k for k, _ in groups]
    fig = go.Figure(go.Bar(y=ops, x=[g["macs"] for _, g in groups], orientation="h", marker_color="#8250df",
                           hovertext=[f"<b>{_e(k)}</b><br>{g['count']:,} node(s)<br>MACs {human(g['macs'])}<br>"
                                      f"FLOPs {human(g['flops'])}<br>params {human(g['params'])}"
                                      + (f"<br>unknown {g['unknown']}" if g["unknown"] else "") for k, g in groups],
                           hoverinfo="text"))
    buttons = [dict(label=label, method="update", args=[{"x": [[g.get(q, 0) for _, g in groups]]}, {"xaxis.title.text": label}])
               for q, label, _ in _QUANTITIES if q != "output_bytes"]
    buttons.append(dict(label="count", method="update", args=[{"x": [[g["count"] for _, g in groups]]},
                                                                 {"xaxis.title.text": "nodes"}]))
    fig.update_layout(xaxis_title="MACs", updatemenus=[dict(type="buttons", direction="right", x=0, y=1.02,
                                                            xanchor="left", yanchor="bottom", buttons=buttons)])
    height = max(260, min(1200, 90 + 22 * len(ops)))
    table = _table(["op type", "count", "MACs", "FLOPs", "params", "unknown"],
                   [[k, f"{g['count']:,}", human(g["macs"]), human(g["flops"]), human(g["params"]), g["unknown"] or ""]
                    for k, g in reversed(groups)], num={1, 2, 3, 4, 5}, table_id="by-op")
    return _figure(fig, "chart-ops", height) + table


def _memory_chart(data: dict) -> str:
    go, _, _ = _plotly()
    layers = data["layers"]
    peak = data.get("activation_peak") or {}
    live = [r.get("live_bytes") for r in layers]
    if not layers or all(v is None for v in live):
        return '<p class="muted">No per-layer live memory in this report (made by an older sepify).</p>'
    size, runs = _groups(len(layers), MAX_POINTS)
    xs, ys, hover = [], [], []
    for start, stop in runs:
        i = max(range(start, stop), key=lambda k: live[k] or 0)
        r = layers[i]
        xs.append(r["index"])
        ys.append(live[i] or 0)
        hover.append(f"<b>{_e(r['name'])}</b> ({_e(r['op_type'])})<br>live {human_bytes(live[i])}"
                     + (f"<br>(largest of layers {start}–{stop - 1})" if size > 1 else ""))
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line=dict(shape="hv", color="#0969da"), fill="tozeroy",
                               hovertext=hover, hoverinfo="text", name="live bytes"))
    if peak.get("index") is not None:
        fig.add_trace(go.Scatter(x=[peak["index"]], y=[peak["bytes"]], mode="markers", name="peak",
                                 marker=dict(color="#cf222e", size=11, symbol="diamond"),
                                 hovertext=[f"peak {human_bytes(peak['bytes'])} at {_e(peak['layer'])}"], hoverinfo="text"))
        fig.add_annotation(x=peak["index"], y=peak["bytes"], text=f"peak {human_bytes(peak['bytes'])} at {_e(peak['layer'])}",
                           showarrow=True, arrowhead=2, ax=40, ay=-30, font=dict(color="#cf222e"))
    fig.update_layout(xaxis_title="layer (execution order)", yaxis_title="live activation bytes", showlegend=False)
    if len(layers) <= 30:
        fig.update_xaxes(dtick=1)
    notice = ""
    if size > 1:
        notice = (f'<div class="notice" id="aggregated-memory">{len(layers):,} layers: the curve shows the largest value of '
                  f"each run of {size:,} consecutive layers ({len(runs):,} points), so the peak is kept.</div>")
    tensors = peak.get("tensors") or []
    table = ""
    if peak:
        rows = [[t["name"], human_bytes(t["bytes"]), f"{t['bytes']:,}", t["producer"] or "(graph input)"]
                for t in tensors[:LIST_ROWS]]
        table = (f'<h2>Tensors alive at the peak ({len(tensors):,}, {human_bytes(peak["bytes"])} at layer '
                 f'{_e(peak.get("layer"))})</h2>' + _table(["tensor", "size", "bytes", "made by"], rows, num={1, 2},
                                                           table_id="peak-tensors")
                 + _more(len(tensors), LIST_ROWS, "tensors"))
    return notice + _figure(fig, "chart-memory", 360) + table


def _heaviest_table(layers: list[dict], total_macs: int) -> str:
    top = sorted(layers, key=lambda r: (-(r.get("macs") or 0), r["index"]))[:TABLE_ROWS]
    rows = [[r["index"], r["name"], r["op_type"], _shape(r["output_shapes"]), human(r.get("macs")),
             f"{100 * r['macs'] / total_macs:.1f}%" if r.get("macs") and total_macs else "",
             human(r.get("flops")), human(r["params"]) if r["params"] else "", human_bytes(r.get("output_bytes"))]
            for r in top]
    return _table(["#", "name", "op", "output", "MACs", "share", "FLOPs", "params", "out bytes"], rows,
                  num={0, 4, 5, 6, 7, 8}, table_id="heaviest")


def _unknown_and_notes(data: dict) -> str:
    unknown = [r for r in data["layers"] if r.get("unknown")]
    noted = [r for r in data["layers"] if r.get("note")]
    out = []
    if unknown:
        out.append(f"<h2>Nodes of unknown cost ({len(unknown):,}; not in the totals)</h2>")
        out.append(_table(["#", "name", "op", "reason"], [[r["index"], r["name"], (r["domain"] + "." if r.get("domain") else "")
                                                          + r["op_type"], r["unknown"]] for r in unknown[:LIST_ROWS]],
                          num={0}, table_id="unknown"))
        out.append(_more(len(unknown), LIST_ROWS, "nodes"))
    else:
        out.append("<h2>Nodes of unknown cost</h2><p>None: every node's cost is known.</p>")
    if data.get("notes"):
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in data["notes"]) + "</ul>")
    if noted:
        out.append(f"<h2>Layer notes ({len(noted):,})</h2>")
        out.append(_table(["#", "name", "op", "note"], [[r["index"], r["name"], r["op_type"], r["note"]]
                                                       for r in noted[:LIST_ROWS]], num={0}, table_id="layer-notes"))
        out.append(_more(len(noted), LIST_ROWS, "layers"))
    return "<section>" + "".join(out) + "</section>"


def analysis_html(data: dict) -> str:
    t = data["totals"]
    model = data.get("model") or {}
    name = model.get("path") or model.get("graph") or "model"
    inputs = ", ".join(f"{i['name']} {_shape([i['shape']])} {i['dtype']}" for i in data.get("inputs") or [])
    body = [f"<section><h2>Totals</h2>{_totals_cards(t)}"]
    if t.get("macs_formula"):
        body.append(f'<p class="muted">MACs as a formula of the free dimensions: <code>{_e(t["macs_formula"])}</code></p>')
    body.append(f'<p class="muted">{len(data["layers"]):,} layers · inputs: {_e(inputs)}</p></section>')
    body.append("<section><h2>Cost per layer, in graph order</h2>" + _layer_chart(data["layers"]) + "</section>")
    body.append(f"<section><h2>Heaviest layers (top {min(TABLE_ROWS, len(data['layers']))} by MACs)</h2>"
                + _heaviest_table(data["layers"], t["macs"]) + "</section>")
    body.append("<section><h2>Cost by op type</h2>" + _op_chart(data.get("by_op") or {}) + "</section>")
    body.append("<section><h2>Live activation memory along the execution order</h2>" + _memory_chart(data) + "</section>")
    body.append(_unknown_and_notes(data))
    return _page(f"sepify analyze: {name}", f"MACs {human(t['macs'])} · params {human(t['params'])} · "
                 f"activation peak {human_bytes(t['activation_peak_bytes'])}", body, data)


# --- diff -------------------------------------------------------------------------------------------
_DIFF_QUANTITIES = [("macs", "MACs", human), ("params", "params", human), ("flops", "FLOPs", human),
                    ("output_bytes", "output bytes", human_bytes)]
_STATUS_STYLE = {"increase": ("#cf222e", "more"), "decrease": ("#1a7f37", "less"), "added": ("#0969da", "added"),
                 "removed": ("#8250df", "removed")}


def _row_label(r: dict) -> str:
    old, new = r.get("old_names") or [], r.get("new_names") or []
    if r["status"] == "added":
        return "+ " + ", ".join(new)
    if r["status"] == "removed":
        return "− " + ", ".join(old)
    if old == new:
        return ", ".join(old)
    return f"{', '.join(old)} → {', '.join(new)}"


def _diff_chart(rows: list[dict]) -> str:
    go, _, _ = _plotly()
    shown = [r for r in rows if r["status"] != "unchanged"]
    notice = ""
    if len(shown) > MAX_BARS:
        keep = set(sorted(range(len(shown)), key=lambda i: -abs(shown[i]["delta"].get("macs") or 0))[:MAX_BARS])
        notice = (f'<div class="notice" id="aggregated-diff">{len(shown):,} rows changed: the chart shows the {MAX_BARS:,} '
                  "largest MAC changes, in graph order. Every row is in the embedded JSON.</div>")
        shown = [r for i, r in enumerate(shown) if i in keep]
    if not shown:
        return '<p>No layer changed.</p>'

    def kind(r: dict, q: str) -> str:
        if r["status"] in ("added", "removed"):
            return r["status"]
        return "increase" if (r["delta"].get(q) or 0) > 0 else "decrease"

    labels = [f"{i}: {_row_label(r)}" for i, r in enumerate(shown)]

    def hover(r: dict) -> str:
        lines = [f"<b>{_e(_row_label(r))}</b> ({_e(r['status'])}"
                 + (f", matched by {_e(r['match'])}" if r.get("match") else "") + ")",
                 f"op: {_e(r.get('old_op') or '')} → {_e(r.get('new_op') or '')}"]
        for q, label, fmt in _DIFF_QUANTITIES:
            o = (r.get("old") or {}).get(q)
            n = (r.get("new") or {}).get(q)
            d = r["delta"].get(q)
            pct = r["pct"].get(q)
            lines.append(f"{label}: {fmt(o) if r.get('old') else '—'} → {fmt(n) if r.get('new') else '—'}"
                         + (f" ({'+' if d > 0 else ''}{fmt(d)}" + (f", {pct:+.1f}%" if pct is not None else "") + ")"
                            if d is not None else ""))
        return "<br>".join(lines)

    hovers = [hover(r) for r in shown]
    per_q = {}
    for q, _, _ in _DIFF_QUANTITIES:
        per_q[q] = {k: ([], [], []) for k in _STATUS_STYLE}
        for lab, r, h in zip(labels, shown, hovers):
            xs, ys, hs = per_q[q][kind(r, q)]
            xs.append(r["delta"].get(q) or 0)
            ys.append(lab)
            hs.append(h)
    fig = go.Figure()
    for k, (color, name) in _STATUS_STYLE.items():
        xs, ys, hs = per_q["macs"][k]
        marked = k in ("added", "removed")  # labelled: an added or removed layer may cost 0 MACs
        fig.add_trace(go.Bar(x=xs, y=ys, orientation="h", marker_color=color, name=name, hovertext=hs,
                             hoverinfo="text", text=[name] * len(xs) if marked else None,
                             textposition="outside" if marked else None, cliponaxis=False))
    buttons = [dict(label=label, method="update",
                    args=[{"x": [per_q[q][k][0] for k in _STATUS_STYLE], "y": [per_q[q][k][1] for k in _STATUS_STYLE],
                           "hovertext": [per_q[q][k][2] for k in _STATUS_STYLE],
                           "text": [[name] * len(per_q[q][k][0]) if k in ("added", "removed") else None
                                    for k, (_, name) in _STATUS_STYLE.items()]},
                          {"xaxis.title.text": f"{label}: new − old"}])
               for q, label, _ in _DIFF_QUANTITIES]
    fig.update_layout(barmode="relative", xaxis_title="MACs: new − old", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      yaxis=dict(autorange="reversed", categoryorder="array", categoryarray=labels,
                                 tickfont=dict(size=10)),
                      updatemenus=[dict(type="buttons", direction="right", x=0, y=1.02, xanchor="left", yanchor="bottom", buttons=buttons)])
    height = max(300, min(2400, 120 + 18 * len(shown)))
    return notice + _figure(fig, "chart-diff", height, right=80)  # room for an "added"/"removed" label at 0


def _diff_totals(data: dict) -> str:
    rows = []
    for q, v in data["totals"].items():
        fmt = human_bytes if "bytes" in q or q == "file_size" else human
        rows.append([q, fmt(v["old"]) if v["old"] is not None else "—", fmt(v["new"]) if v["new"] is not None else "—",
                     ("+" if (v["delta"] or 0) > 0 else "") + fmt(v["delta"]) if v["delta"] is not None else "—",
                     f"{v['pct']:+.2f}%" if v.get("pct") is not None else "",
                     f"{v['ratio']:.4g}" if v.get("ratio") is not None else "",
                     f"{v['old']:,}" if isinstance(v["old"], int) else "", f"{v['new']:,}" if isinstance(v["new"], int) else ""])
    return _table(["quantity", "old", "new", "change", "%", "new/old", "old (exact)", "new (exact)"], rows,
                  num={1, 2, 3, 4, 5, 6, 7}, table_id="diff-totals")


def _diff_rows_table(rows: list[dict], extra_cols: list[str]) -> str:
    changed = [r for r in rows if r["status"] != "unchanged"]
    top = sorted(changed, key=lambda r: -abs(r["delta"].get("macs") or 0))[:TABLE_ROWS * 4]
    out = [[r["status"], _row_label(r), f"{r.get('old_op') or ''} → {r.get('new_op') or ''}",
            human((r.get("old") or {}).get("macs")) if r.get("old") else "—",
            human((r.get("new") or {}).get("macs")) if r.get("new") else "—",
            human(r["delta"].get("macs")), f"{r['pct']['macs']:+.1f}%" if r["pct"].get("macs") is not None else "",
            human(r["delta"].get("params"))] + [_generic(r.get("extra", {}).get(c)) for c in extra_cols] for r in top]
    return (_table(["status", "layer", "op", "MACs old", "MACs new", "Δ MACs", "%", "Δ params", *extra_cols], out,
                   num={3, 4, 5, 6, 7}, table_id="diff-rows") + _more(len(changed), len(top), "changed rows"))


def diff_html(data: dict, title: str | None = None) -> str:
    def side(s):
        return s.get("path") or s.get("graph") or "?"

    c = data["counts"]
    t = data["totals"]
    cards = []
    for q, label, fmt in (("macs", "MACs", human), ("params", "params", human), ("flops", "FLOPs", human),
                          ("activation_peak_bytes", "activation peak", human_bytes)):
        v = t.get(q) or {}
        if v.get("old") is None:
            continue
        change = f"{v['pct']:+.1f}%" if v.get("pct") is not None else ""
        cls = "bad" if (v.get("delta") or 0) > 0 else ("good" if (v.get("delta") or 0) < 0 else "")
        cards.append(_card(label, f"{fmt(v['old'])} → {fmt(v['new'])}", f"{change} ({v['old']:,} → {v['new']:,})",
                           cls, test_id=q))
    counts = " · ".join(f"{c.get(k, 0):,} {k}" for k in ("changed", "added", "removed", "unchanged", "renamed"))
    body = [f'<section><h2>Totals</h2><div class="cards">{"".join(cards)}</div>'
            f'<p class="muted" id="diff-counts">{_e(counts)}</p>{_diff_totals(data)}</section>',
            "<section><h2>Per-layer change (new − old), in graph order</h2>"
            '<p class="muted">Red: the layer costs more, green: less; '
            '<span class="added">blue: added</span> and <span class="removed">purple: removed</span> layers '
            "(their whole cost). Unchanged layers are not drawn.</p>"
            + _diff_chart(data["rows"]) + "</section>",
            "<section><h2>Largest changes</h2>" + _diff_rows_table(data["rows"], data.get("extra_columns") or [])
            + "</section>"]
    return _page(title or f"sepify diff: {side(data['old'])} → {side(data['new'])}", counts, body, data)


# --- rewrite ------------------------------------------------------------------------------------
_KNOWN_LAYER_KEYS = ("name", "orientation", "rank", "max_rank", "energy", "rel_error", "macs_before", "macs_after",
                     "params_before", "params_after", "folded_batchnorm", "new_nodes")
_KNOWN_REPORT_KEYS = {"schema", "sepify_version", "model", "settings", "totals", "layers", "skipped", "diff",
                      "verification", "notes", "before", "after", "output"}


def _rewrite_cards(t: dict) -> str:
    b, a = t["before"], t["after"]
    cards = []
    for q, label, fmt in (("macs", "MACs", human), ("params", "params", human), ("flops", "FLOPs", human),
                          ("activation_peak_bytes", "activation peak", human_bytes)):
        if q not in b:
            continue
        ratio = a[q] / b[q] if b[q] else None
        cards.append(_card(label, f"{fmt(b[q])} → {fmt(a[q])}",
                           (f"{ratio:.3f}x · " if ratio is not None else "") + f"{b[q]:,} → {a[q]:,}",
                           "good" if a[q] < b[q] else ("bad" if a[q] > b[q] else ""), test_id=q))
    cards.append(_card("rewritten convs", str(t.get("rewritten", 0)), f"{t.get('skipped', 0)} not rewritten",
                       test_id="rewritten"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _rewrite_chart(layers: list[dict]) -> str:
    go, _, _ = _plotly()
    if not layers:
        return "<p>No Conv was rewritten.</p>"
    shown = layers
    notice = ""
    if len(layers) > MAX_BARS:
        shown = sorted(layers, key=lambda r: -(r["macs_before"] - r["macs_after"]))[:MAX_BARS]
        notice = (f'<div class="notice">{len(layers):,} layers rewritten: the chart shows the {MAX_BARS:,} with the largest '
                  "saving. Every layer is in the table below and in the embedded JSON.</div>")
    names = [r["name"] for r in shown]

    def hover(r):
        return (f"<b>{_e(r['name'])}</b><br>{_e(r['orientation'])}, rank {r['rank']} of {r['max_rank']}<br>"
                f"energy kept {r['energy']:.4f}, weight error {r['rel_error']:.4f}<br>"
                f"MACs {human(r['macs_before'])} → {human(r['macs_after'])}<br>"
                f"params {human(r['params_before'])} → {human(r['params_after'])}")

    hs = [hover(r) for r in shown]
    fig = go.Figure([go.Bar(x=names, y=[r["macs_before"] for r in shown], name="before", marker_color="#afb8c1",
                            hovertext=hs, hoverinfo="text"),
                     go.Bar(x=names, y=[r["macs_after"] for r in shown], name="after", marker_color="#0969da",
                            hovertext=hs, hoverinfo="text",
                            text=[f"r{r['rank']}" for r in shown], textposition="outside")])
    buttons = [dict(label=label, method="update",
                    args=[{"y": [[r[f"{q}_before"] for r in shown], [r[f"{q}_after"] for r in shown]]},
                          {"yaxis.title.text": label}]) for q, label in (("macs", "MACs"), ("params", "params"))]
    fig.update_layout(barmode="group", yaxis_title="MACs", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      updatemenus=[dict(type="buttons", direction="right", x=0, y=1.02, xanchor="left", yanchor="bottom", buttons=buttons)])
    return notice + _figure(fig, "chart-rewrite", 420)


def _rewrite_layers_table(layers: list[dict]) -> str:
    extra: list[str] = []
    for r in layers:
        extra += [k for k in r if k not in _KNOWN_LAYER_KEYS and k not in extra]
    rows = [[r["name"], r["orientation"], f"{r['rank']} / {r['max_rank']}", f"{r['energy']:.4f}", f"{r['rel_error']:.4f}",
             f"{human(r['macs_before'])} → {human(r['macs_after'])}",
             f"{r['macs_after'] / r['macs_before']:.3f}x" if r["macs_before"] else "",
             f"{human(r['params_before'])} → {human(r['params_after'])}", r.get("folded_batchnorm") or "",
             ", ".join(r.get("new_nodes") or [])] + [_generic(r.get(k)) for k in extra] for r in layers[:MAX_BARS]]
    return (_table(["layer", "orientation", "rank / max", "energy kept", "weight error", "MACs", "ratio", "params",
                    "folded BN", "new nodes", *extra], rows, num={2, 3, 4, 6}, table_id="rewritten")
            + _more(len(layers), MAX_BARS, "rewritten layers"))


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (nested measures as rows of their own)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _verification(ver: dict | None) -> str:
    if not ver:
        return ("<p>Not run (use <code>--verify</code>; random inputs are a smoke test, not an accuracy "
                "measurement).</p>")
    out = [f'<p class="muted">inputs: {_e(ver.get("inputs"))}</p>']
    if ver.get("smoke_test"):
        out.append(f'<p class="up" id="verification-smoke"><b>{_e(ver.get("note"))}</b></p>')
    for name, o in (ver.get("outputs") or {}).items():  # the flags, in words (the table below has the numbers)
        for label, t in ((name, o), (f"{name}, before {(o.get('before_saturation') or {}).get('op')}", o.get("before_saturation"))):
            if t and t.get("near_zero_reference"):
                out.append(f'<p class="muted verification-flag">{_e(label)}: reference near zero (RMS '
                           f'{t["rms_reference"]:.2g}): relative error not meaningful; RMS error / scale '
                           f'{t["scaled_error"]:.3g}</p>')
        pre = o.get("before_saturation")
        if pre and (o.get("saturated_share") or 0) >= 0.5:
            out.append(f'<p class="up verification-flag">{_e(name)}: {_e(pre["op"])} saturated in '
                       f'{o["saturated_share"]:.0%}: its output hides errors; before it ({_e(pre["tensor"])}): '
                       f'relative L2 {_generic(pre.get("rel_l2_error"))}</p>')
    outputs = {name: _flatten(o) for name, o in (ver.get("outputs") or {}).items()}
    cols: list[str] = []
    for o in outputs.values():
        cols += [k for k in o if k not in cols]
    # one column per output, one row per measure (the measures vary between sepify versions)
    out.append(_table(["measure", *outputs], [[c, *(_generic(o.get(c)) for o in outputs.values())] for c in cols],
                      num=set(range(1, len(outputs) + 1)), table_id="verification"))
    checked = ver.get("checked_error", ver.get("max_rel_l2_error"))
    checked_text = "non-finite" if checked is None else f"{checked:.4g}"
    what = "checked error" if "checked_error" in ver else "largest relative L2 error"
    if ver.get("tolerance") is None:
        out.append(f'<p class="muted" id="verification-result">{what} {checked_text}; no --tolerance given '
                   "(nothing to pass or fail)</p>")
    else:
        ok = ver.get("passed")
        out.append(f'<p class="{"down" if ok else "up"}" id="verification-result"><b>tolerance {ver["tolerance"]:g}: '
                   f'{"passed" if ok else "FAILED"}</b> ({what} {checked_text})</p>')
    rest = {k: v for k, v in ver.items() if k not in ("inputs", "outputs", "tolerance", "passed") and v not in (None, [], {})}
    if rest:
        out.append(_table(["field", "value"], [[k, _generic(v)] for k, v in rest.items()]))
    return "".join(out)


def rewrite_html(report: dict) -> str:
    from .rewrite import _criterion

    t = report["totals"]
    name = report.get("model") or "model"
    body = [f"<section><h2>Totals before → after</h2>{_rewrite_cards(t)}</section>",
            "<section><h2>Rewritten layers: MACs before and after (rank above the bar)</h2>"
            + _rewrite_chart(report["layers"]) + _rewrite_layers_table(report["layers"]) + "</section>"]
    skipped = report.get("skipped") or []
    body.append(f"<section><h2>Convs not rewritten ({len(skipped):,})</h2>"
                + (_table(["conv", "reason"], [[s["name"], s["reason"]] for s in skipped[:LIST_ROWS]], table_id="skipped")
                   + _more(len(skipped), LIST_ROWS, "convs") if skipped else "<p>None.</p>") + "</section>")
    body.append("<section><h2>Verification</h2>" + _verification(report.get("verification")) + "</section>")
    for key, value in report.items():  # fields added by later versions: shown generically
        if key not in _KNOWN_REPORT_KEYS and value not in (None, [], {}):
            body.append(_generic_section(key.replace("_", " "), value))
    if report.get("notes"):
        body.append("<section><h2>Notes</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in report["notes"]) + "</ul></section>")
    if report.get("diff"):
        body.append("<section><h2>Whole model, per layer (new − old)</h2>" + _diff_chart(report["diff"]["rows"]) + "</section>")
    settings = ", ".join(f"{k}={v}" for k, v in (report.get("settings") or {}).items() if v not in (None, [], False))
    body.append(f'<section><h2>Settings</h2><p class="muted">{_e(settings)}</p>'
                + (f'<p class="muted">wrote {_e(report["output"])}</p>' if report.get("output") else "") + "</section>")
    return _page(f"sepify rewrite: {name}", _criterion(report), body, report)


def render_html(data: dict) -> str:
    """The HTML page of an analysis, rewrite or diff report (by its ``schema``)."""
    schema = str(data.get("schema", ""))
    if schema.startswith("sepify.rewrite/"):
        return rewrite_html(data)
    if schema.startswith("sepify.diff/"):
        return diff_html(data)
    return analysis_html(data)
