"""``sepify diff``: layer-by-layer cost comparison of two models — the one diff engine.

:func:`compare` takes two analyze reports (the ``Analysis.to_dict()`` form, schema
``sepify.analysis/1``) — or anything :func:`load_report` accepts: an :class:`~sepify.cost.analysis.Analysis`,
an ``onnx.ModelProto``, the path of a model file or of a JSON written by
``sepify analyze --format json`` — and returns a :class:`Diff`. ``Diff.to_dict()`` is the JSON
(schema ``sepify.diff/1``); :func:`sepify.render.diff.render_diff` renders that dict as a table, JSON or Markdown,
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import __version__
from .errors import ModelError, UsageError

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
                dims: Mapping[str, int] | None = None, shape_words: Mapping[str, str] | None = None) -> dict:
    """An analyze report (dict, schema ``sepify.analysis/1``) from any of:

    * such a dict (validated, returned as is);
    * an :class:`~sepify.cost.analysis.Analysis`;
    * an ``onnx.ModelProto`` or the path of a model file (analyzed with ``input_shapes``/``dims``);
    * the path of a JSON file written by ``sepify analyze --format json`` (a ``.json`` suffix, or
      a file whose first non-blank character is ``{``); ``input_shapes``/``dims`` do not apply.

    Errors (no such file, not JSON, another schema) raise :class:`~sepify.errors.ModelError`.
    """
    if isinstance(source, dict):
        return _validate(source, "<report>")
    if hasattr(source, "to_dict") and hasattr(source, "totals") and hasattr(source, "layers"):
        return source.to_dict()
    from .cost.analysis import analyze

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
    return analyze(source, input_shapes=input_shapes, dims=dims, shape_words=shape_words).to_dict()


def _label(source, role: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else role


def _is_saved(source) -> bool:
    """A saved analyze report (a dict, an Analysis, a JSON file), not a model to analyze."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        return path.is_file() and _looks_like_json(path)
    return not hasattr(source, "graph")


def _graph_inputs(source) -> list[tuple[str, int | None]] | None:
    """The graph inputs of a model side (initializers listed as inputs excluded), as
    (name, declared rank or None); None for a saved report or a source that does not read
    (its analysis then gives the error)."""
    if _is_saved(source):
        return None
    from .model.reading import read_model

    try:
        model, _ = read_model(source, load_external_data=False, copy=False)
    except Exception:  # noqa: BLE001 - the analysis of this side reports it, in its words
        return None
    inits = {t.name for t in model.graph.initializer}
    return [(vi.name, len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None)
            for vi in model.graph.input if vi.name not in inits]


def side_input_shapes(old, new, shared: Mapping[str, Sequence[int | str]] | None,
                      old_own: Mapping[str, Sequence[int | str]] | None = None,
                      new_own: Mapping[str, Sequence[int | str]] | None = None,
                      warnings: list[str] | None = None) -> tuple[dict, dict, dict, dict]:
    """The input shapes of each side of a diff: (old shapes, new shapes, and for each side how
    errors name each override). ``shared`` (``--input-shape NAME=SHAPE``) binds input ``NAME``
    of every model side that has it. A name only one model has binds, in the other, the input
    at the same position (graph input order), when both have as many inputs, that input is not
    bound by name already and its declared rank is the shape's: a warning says so. A name no
    model side can take is an error (exit 2). ``old_own``/``new_own`` (``--old-input-shape`` /
    ``--new-input-shape``) bind one side only and win over ``shared`` for their input."""
    warnings = [] if warnings is None else warnings
    sides = [(old, "the old model", "--old-input-shape"), (new, "the new model", "--new-input-shape")]
    own = [dict(old_own or {}), dict(new_own or {})]
    words = [{name: f"{opt} {name}" for name in own[i]} for i, (_, _, opt) in enumerate(sides)]
    out = [{}, {}]
    shared = dict(shared or {})
    if shared:
        inputs = [_graph_inputs(src) for src, _, _ in sides]
        names = [None if ins is None else [n for n, _ in ins] for ins in inputs]
        for name, shape in shared.items():
            has = [ns is not None and name in ns for ns in names]
            for i in (0, 1):
                if has[i] or names[i] is None:  # (a saved report: it warns that shapes do not apply;
                    out[i][name] = shape        # an unreadable model: its analysis gives the error)
            if all(ns is None or has[i] for i, ns in enumerate(names)):
                continue
            if not any(has):
                listed = "; ".join(f"{role}: {', '.join(ns) or 'none'}" for (_, role, _), ns in zip(sides, names)
                                   if ns is not None)
                raise UsageError(f"--input-shape {name}: no model has an input {name!r} ({listed})")
            i = has.index(False)  # the side without it; the other has it
            src, role, opt = sides[i]
            pos = names[1 - i].index(name)
            candidate = names[i][pos] if len(names[i]) == len(names[1 - i]) else None
            rank = inputs[i][pos][1] if candidate is not None else None
            if candidate is not None and candidate in own[i]:
                continue  # (bound on that side by --old/--new-input-shape)
            if candidate is None or candidate in shared or (rank is not None and rank != len(shape)):
                raise UsageError(f"--input-shape {name}: {_label(src, role)} has no input {name!r} (its inputs: "
                                 f"{', '.join(names[i]) or 'none'}); bind its input with {opt} NAME=SHAPE")
            out[i][candidate] = shape
            words[i].setdefault(candidate, f"--input-shape {name} (bound to {candidate!r})")
            warnings.append(f"--input-shape {name}: {_label(src, role)} has no input {name!r}: bound to its input "
                            f"{candidate!r}, at the same position ({opt} {candidate}=SHAPE to choose)")
    for i in (0, 1):
        out[i].update(own[i])
    return out[0], out[1], words[0], words[1]


def _load_side(source, role: str, input_shapes, dims, warnings: list[str], shape_words=None) -> dict:
    """:func:`load_report` of one side of a diff, adding to ``warnings`` what of ``dims`` /
    ``input_shapes`` it ignored: a ``--dim`` the model has no dimension for (as ``sepify
    analyze`` warns), or both when the side is a saved report (its numbers are as saved)."""
    report = load_report(source, input_shapes=input_shapes, dims=dims, shape_words=shape_words)
    label = _label(source, role)
    saved = _is_saved(source)
    if saved:
        given = [opt for opt, v in (("--dim", dims), ("--input-shape", input_shapes)) if v]
        if given:
            verb = "do" if len(given) > 1 else "does"
            warnings.append(f"{' and '.join(given)} {verb} not apply to {label}: it is a saved analyze report, "
                            "whose numbers are those it was analyzed with (ignored)")
        return report
    have = set(report.get("symbols") or {})
    for name in sorted(set(dims or {}) - have):
        warnings.append(f"--dim {name}: {label} has no dimension named {name!r} (ignored)")
    return report


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
    problem = _malformed(data)
    if problem:
        raise ModelError(f"{label}: malformed sepify analyze report ({problem})")
    return data


def _is_count(v, nullable: bool = True) -> bool:
    return (v is None and nullable) or (isinstance(v, int) and not isinstance(v, bool))


def _malformed(data: dict) -> str | None:
    """What is wrong with the parts of an analyze report that diff and check compute with
    (an edited or foreign file must be an error, not a crash in the arithmetic), or None."""
    totals = data["totals"]
    for q in ("macs", "params"):
        if not _is_count(totals.get(q), nullable=False):
            return f"totals.{q}: {'missing' if q not in totals else f'{totals[q]!r} is not an integer'}"
    for q in TOTAL_QUANTITIES:
        if q in totals and not _is_count(totals[q]):
            return f"totals.{q}: {totals[q]!r} is not an integer"
    model = data.get("model")
    if model is not None and (not isinstance(model, dict) or not _is_count(model.get("file_size"))):
        return "model.file_size is not an integer" if isinstance(model, dict) else "'model' is not an object"
    for i, layer in enumerate(data["layers"]):
        if not isinstance(layer, dict):
            return f"layers[{i}] is not an object"
        for key in ("name", "op_type"):
            if not isinstance(layer.get(key), str):
                return f"layers[{i}].{key}: {'missing' if key not in layer else 'not a string'}"
        for q in (*LAYER_QUANTITIES, "index"):
            if q in layer and not _is_count(layer[q]):
                return f"layers[{i}].{q}: {layer[q]!r} is not an integer"
    return None


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
    #: ``--dim`` names a side has no dimension for, and bindings that do not apply to a side
    #: that is an analyze JSON (``sepify diff`` prints each on stderr as a warning)
    warnings: list[str] = field(default_factory=list)

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
            "warnings": list(self.warnings),
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
            dims: Mapping[str, int] | None = None,
            old_input_shapes: Mapping[str, Sequence[int | str]] | None = None,
            new_input_shapes: Mapping[str, Sequence[int | str]] | None = None) -> Diff:
    """Compare two models layer by layer (see the module docstring for the matching rules).

    ``old``/``new``: anything :func:`load_report` accepts (``input_shapes``/``dims`` apply to
    models that need analyzing; ``input_shapes`` by input name in each model, or by position in
    the model without that name, and ``old_input_shapes``/``new_input_shapes`` to one side:
    :func:`side_input_shapes`). ``mapping``: ``{old_name: [new_names]}`` matched first.
    ``extra``: ``{layer_name: {column: value}}`` attached to the row holding that layer (old or
    new name). Unknown names in ``mapping`` or ``extra`` raise :class:`UsageError`.
    """
    warnings: list[str] = []
    old_shapes, new_shapes, old_words, new_words = side_input_shapes(old, new, input_shapes, old_input_shapes,
                                                                     new_input_shapes, warnings)
    old_r = _load_side(old, "the old model", old_shapes, dims, warnings, old_words)
    new_r = _load_side(new, "the new model", new_shapes, dims, warnings, new_words)
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

    diff = Diff(old_r, new_r, rows, warnings)
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


def parse_mapping(items: Iterable[str]) -> dict[str, list[str]]:
    """``["a=b/x,b/y", "c=d"]`` (``--map``) → ``{"a": ["b/x", "b/y"], "c": ["d"]}``; ``a=`` → ``[]``."""
    out: dict[str, list[str]] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip():
            raise UsageError(f"invalid --map {item!r} (expected OLD=NEW or OLD=NEW1,NEW2)")
        out[old.strip()] = [n.strip() for n in new.split(",") if n.strip()]
    return out
