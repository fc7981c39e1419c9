"""Helpers shared by the renderers: the rich console, plain/rich tables, JSON layout, Markdown
escaping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable


def _console(stream, width: int | None = None):
    from rich.console import Console

    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=width or table_width(stream), highlight=False, markup=False,
                   color_system="auto" if tty else None, soft_wrap=False)


def table_width(stream) -> int:
    """The width tables are laid out for: ``$COLUMNS`` when set, else the terminal's width,
    else (a pipe or a file) 160 columns."""
    import os
    import shutil

    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) >= 20:
        return int(env)
    if hasattr(stream, "isatty") and stream.isatty():
        return shutil.get_terminal_size((160, 24)).columns
    return 160


# --- fitting a table to a width ---------------------------------------------------------------
@dataclass
class Column:
    """A table column for :func:`fit_table`.

    ``short``: the header used when the table does not fit. ``flex``: text that may be
    shortened in the middle (``backbone.st…conv2``), down to ``flex`` characters, by
    ``shorten`` (default :func:`shorten_middle`). ``fold``: long text wrapped instead (notes).
    ``drop``: the column may be left out when the table still does not fit (the highest first);
    numbers are never cut: a column of numbers is dropped whole or shown whole."""

    header: str
    justify: str = "right"
    short: str | None = None
    flex: int = 0
    fold: bool = False
    drop: int = 0
    shorten: Callable[[str, int], str] | None = None


def shorten_middle(text: str, width: int, head: int | None = None) -> str:
    """``text`` in at most ``width`` characters, its middle replaced by ``…`` (the start and
    the end of a layer name tell layers apart; a prefix alone would not)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    h = keep // 2 if head is None else max(0, min(head, keep))
    return text[:h] + "…" + text[len(text) - (keep - h):]


#: op types too long for a narrow column, by their usual short names
OP_ABBREVIATIONS = {"BatchNormalization": "BatchNorm", "InstanceNormalization": "InstanceNorm",
                    "LayerNormalization": "LayerNorm", "GlobalAveragePool": "GlobalAvgPool",
                    "DequantizeLinear": "Dequantize", "QuantizeLinear": "Quantize", "ConvTranspose": "ConvTransp"}


def shorten_op(text: str, width: int, head: int | None = None) -> str:
    """An op type (or ``A → B``) in ``width`` characters: usual abbreviations first."""
    if len(text) > width:
        for full, short in OP_ABBREVIATIONS.items():
            text = text.replace(full, short)
    return shorten_middle(text, width, head)


class _Names:
    """The distinct full texts of a column, to tell whether a shortened text (``…`` standing
    for any characters) could be read as more than one of them."""

    def __init__(self, texts: list[str]):
        import bisect
        import re

        self._bisect, self._re = bisect, re
        self.sorted = sorted(set(texts))

    def matches(self, short: str, limit: int = 2) -> int:
        if "…" not in short:
            return 1
        head = short.split("…", 1)[0]
        lo = self._bisect.bisect_left(self.sorted, head)
        pattern = self._re.compile(".*".join(map(self._re.escape, short.split("…"))), self._re.S)
        n = 0
        for t in self.sorted[lo:]:
            if not t.startswith(head):
                break
            if pattern.fullmatch(t):
                n += 1
                if n >= limit:
                    break
        return n


def _shorten_column(texts: list[str], width: int, shorten, names: _Names | None = None) -> list[str]:
    """Shorten every text to ``width``; where a shortened text could be read as another text
    of the column too, other cut points (more of the end, then more of the start) are tried."""
    names = names or _Names(texts)
    out = []
    cache: dict[str, str] = {}
    for t in texts:
        if t in cache:
            out.append(cache[t])
            continue
        o = shorten(t, width)
        if names.matches(o) > 1:
            for h in [*range(width // 2 - 1, -1, -1), *range(width // 2 + 1, width)]:
                cand = shorten(t, width, h)
                if names.matches(cand) == 1:
                    o = cand
                    break
        cache[t] = o
        out.append(o)
    return out


def _unambiguous_width(texts: list[str], floor: int, natural: int, shorten) -> int:
    """The narrowest width from ``floor`` at which no shortened text could be read as two."""
    names = _Names(texts)
    for w in range(floor, natural):
        if all(names.matches(o) == 1 for o in set(_shorten_column(texts, w, shorten, names))):
            return w
    return natural


def fit_table(columns: list[Column], rows: list[list[str]], total: list[str] | None, width: int,
              compact: bool = False):
    """Lay a table out for ``width`` characters (drawn by :func:`print_table`: a column costs
    its text width + 3, plus 1 for the box; ``compact``, no vertical lines: + 2). In order, while it does not fit: columns whose cells are all empty
    are left out (always), short headers, flexible columns narrowed to their minimum, then
    droppable columns left out, highest ``drop`` first. Returns (columns, rows, total,
    widths of the flexible columns) with the cells of flexible columns shortened."""
    body = rows + ([total] if total is not None else [])
    keep = [i for i, c in enumerate(columns) if any(r[i] for r in body)]

    def natural(i, short):
        c = columns[i]
        head = (c.short or c.header) if short else c.header
        return max([len(head), *(len(r[i]) for r in body)]) if body else len(head)

    short = False
    last_resort = False  # every droppable column gone: flexible columns below their minimum
    unambiguous: dict[int, int] = {}  # a flexible column's narrowest width that keeps its texts apart

    def floor_of(i):
        c = columns[i]
        if c.fold:
            return 10
        if i not in unambiguous:
            texts = [r[i] for r in body]
            unambiguous[i] = (_unambiguous_width(texts, c.flex, natural(i, False), c.shorten or shorten_middle)
                              if natural(i, False) > c.flex else c.flex)
        return unambiguous[i]

    while True:
        widths = {i: natural(i, short) for i in keep}
        need = sum(widths.values()) + (2 * len(keep) if compact else 3 * len(keep) + 1)
        floor = {i: 6 if last_resort else floor_of(i) for i in keep if columns[i].flex or columns[i].fold}
        flex = {i: widths[i] for i in floor if widths[i] > floor[i]}
        over = need - width
        if over > 0 and flex:  # narrow the flexible columns, the widest first, to their minimum
            while over > 0:  # one character at a time from the widest: they end up balanced
                wide = [i for i in flex if widths[i] > floor[i]]
                if not wide:
                    break
                i = max(wide, key=lambda k: (widths[k], -k))
                widths[i] -= 1
                over -= 1
        if over <= 0:
            break
        if not short:
            short = True
            continue
        droppable = [i for i in keep if columns[i].drop]
        if not droppable:
            if last_resort:
                break  # wider than ``width``: printed so (the terminal wraps lines; no number is cut)
            last_resort = True
            continue
        keep.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    out_cols = []
    for i in keep:
        c = columns[i]
        out_cols.append(Column(c.short or c.header if short else c.header, c.justify, c.short, c.flex, c.fold, c.drop, c.shorten))
    cut = {}
    for i in keep:
        c = columns[i]
        if c.flex and not c.fold and widths[i] < natural(i, short):
            cut[i] = _shorten_column([r[i] for r in body], widths[i], c.shorten or shorten_middle)
    new_body = [[cut[i][k] if i in cut else r[i] for i in keep] for k, r in enumerate(body)]
    new_rows = new_body[:len(rows)]
    new_total = new_body[len(rows)] if total is not None else None
    need = sum(widths[i] for i in keep) + (2 * len(keep) if compact else 3 * len(keep) + 1)
    return out_cols, new_rows, new_total, {keep.index(i): widths[i] for i in keep if columns[i].fold}, need


def md_escape(s) -> str:
    """Escape a value for a Markdown table cell."""
    return str(s).replace("|", "\\|").replace("\n", " ")


def dumps_json(data: dict) -> str:
    """Indented JSON, except that a long list of row objects (``layers``) has one compact
    object per line: a 50k-layer report stays readable and is written by the C encoder
    (``indent`` forces json's pure-Python encoder, ~10x slower)."""
    parts = []
    for key, value in data.items():
        if isinstance(value, list) and len(value) > 20 and all(isinstance(x, dict) for x in value):
            parts.append(f"  {json.dumps(key)}: [\n    {_rows_json(value)}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: " + json.dumps(value, indent=2).replace("\n", "\n  "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _rows_json(rows: list[dict]) -> str:
    """The objects of ``rows``, compact, one per line (joined by ``",\n    "``), encoded by one
    call of the C encoder. The line breaks go where ``}, {"<first key>": `` occurs in the
    one-line encoding: it cannot occur inside a JSON string (a ``"`` there is always ``\"``),
    so only whitespace between tokens is added and the JSON is the same."""
    first = next(iter(rows[0]), None)
    if first is None or not isinstance(first, str):
        return ",\n    ".join(json.dumps(x) for x in rows)
    key = json.dumps(first)
    return json.dumps(rows)[1:-1].replace("}, {" + key + ": ", "},\n    {" + key + ": ")


RICH_MAX_ROWS = 2000  # above this a plain aligned table is printed: rich takes ~0.7 ms a row


def print_table(stream, title: str, columns: list, rows: list[tuple], total: tuple | None,
                width: int | None = None, compact: bool = False) -> None:
    """A table with a title, ``columns`` (:class:`Column`, or (header, "left"|"right")), and a
    total row: rich for a screenful, fitted to the width (:func:`fit_table`); plain aligned
    text for thousands of rows (every column, nothing shortened). ``compact``: no vertical
    lines (a column costs 2 characters less: the wide layer tables of analyze, diff, rewrite)."""
    columns = [c if isinstance(c, Column) else Column(c[0], c[1], fold=c[0] == "note") for c in columns]
    if len(rows) <= RICH_MAX_ROWS:
        from rich import box
        from rich.table import Table

        width = width or table_width(stream)
        columns, rows, total, folds, need = fit_table(columns, [list(r) for r in rows],
                                                list(total) if total is not None else None, width, compact)
        style = dict(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True) if compact else {}
        table = Table(title=title, show_lines=False, **style)
        for i, c in enumerate(columns):
            if c.fold:
                table.add_column(c.header, justify=c.justify, overflow="fold", max_width=folds.get(i))
            else:
                table.add_column(c.header, justify=c.justify, no_wrap=True, overflow="ellipsis" if c.flex else "fold")
        for row in rows:
            table.add_row(*row)
        if total is not None:
            table.add_section()
            table.add_row(*total)
        _console(stream, max(width, need, 20)).print(table)
        return
    headers = [c.header for c in columns]
    body = [tuple(headers)] + rows + ([total] if total is not None else [])
    widths = [max(map(len, cells)) for cells in zip(*body)]
    fmt = "  ".join(f"{{:{'>' if c.justify == 'right' else '<'}{w}}}" for w, c in zip(widths, columns))
    rule = "  ".join("-" * w for w in widths)
    out = [title, fmt.format(*body[0]).rstrip(), rule]
    out += [fmt.format(*r).rstrip() for r in rows]
    if total is not None:
        out += [rule, fmt.format(*total).rstrip()]
    stream.write("\n".join(out) + "\n")
