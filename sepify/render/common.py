"""Helpers shared by the renderers: the rich console, plain/rich tables, JSON layout, Markdown
escaping."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable


def _console(stream, width: int | None = None):
    tty = hasattr(stream, "isatty") and stream.isatty()
    return _quiet_console_class()(file=stream, width=width or table_width(stream), highlight=False, markup=False,
                   color_system="auto" if tty else None, soft_wrap=False)


_CONSOLE = None


def _quiet_console_class():
    """rich's Console, except that a closed pipe (``| head``) raises :class:`BrokenPipeError` as
    every other write does (rich's own ``on_broken_pipe`` exits with status 1 on its own): the
    command line ends every command the same way then (silently, exit 141)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        class QuietConsole(Console):
            def on_broken_pipe(self) -> None:
                self.quiet = True
                raise BrokenPipeError(32, "Broken pipe")

        _CONSOLE = QuietConsole
    return _CONSOLE


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
    fixed: int = 0  # characters of a shortened text that are not the name (a label's " → …/{...}")
    min_fixed: int = 0  # the same in the text's narrowest form (a label's " → …")


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
    if len(text) > width:  # "Conv → Conv+Concat" in 17: "Conv→Conv+Concat", not "Conv → C…v+Concat"
        text = text.replace(" → ", "→")
    return shorten_middle(text, width, head)


def _needs(texts: list[str]) -> tuple[int, int]:
    """How many characters of the start (``h``), or of the end (``t``), tell every two
    different texts apart: one more than the longest common prefix (suffix) of two of them
    (neighbours in sorted order have the longest)."""
    distinct = sorted(set(texts))
    if len(distinct) < 2:
        return 0, 0

    def longest(xs):
        best = 0
        for a, b in zip(xs, xs[1:]):
            n = min(len(a), len(b))
            k = 0
            while k < n and a[k] == b[k]:
                k += 1
            best = max(best, k)
        return best + 1

    return longest(distinct), longest(sorted(t[::-1] for t in distinct))


def _head_for(width: int, needs: tuple[int, int], fixed: int = 0) -> int | None:
    """Where to cut a text shortened to ``width`` (``fixed`` of which is not the name): the
    start up to what tells the texts apart, or the end; None when neither fits."""
    keep = width - fixed - 1
    h, t = needs
    if h and h <= keep and (h <= t or t > keep):
        return max(h, keep // 2) if keep // 2 >= h else h
    if t and t <= keep:
        return keep - max(t, keep - keep // 2)
    return None if (h or t) else keep // 2


def _shorten_column(texts: list[str], width: int, shorten, needs: tuple[int, int], fixed: int = 0) -> list[str]:
    """Every text shortened to ``width`` with one cut for the column (see :func:`_head_for`), so
    that what tells two texts apart is kept: a shortened text is never one that could be read
    as another text of the column."""
    head = _head_for(width, needs, fixed)
    cache: dict[str, str] = {}
    out = []
    for t in texts:
        o = cache.get(t)
        if o is None:
            o = cache[t] = shorten(t, width, head)
        out.append(o)
    return out


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
    needs: dict[int, tuple[int, int]] = {}  # per flexible column: what tells its texts apart

    def needs_of(i):
        if i not in needs:
            needs[i] = _needs([r[i] for r in body])
        return needs[i]

    def floor_of(i, last: bool = False):
        """The narrowest width that keeps a column's texts apart (and at least its ``flex``;
        ``last``: below it, to the narrowest form of the text, e.g. a label ``X → …``)."""
        c = columns[i]
        if c.fold:
            return 10
        h, t = needs_of(i)
        fixed = c.min_fixed if last else c.fixed
        need = min(x for x in (h, t) if x) + 1 + fixed if (h or t) else 0
        return min(natural(i, False), max(6 if last else c.flex, need))

    while True:
        widths = {i: natural(i, short) for i in keep}
        need = sum(widths.values()) + (2 * len(keep) if compact else 3 * len(keep) + 1)
        over = need - width
        flexible = [i for i in keep if columns[i].flex or columns[i].fold] if over > 0 else []
        floor = {i: floor_of(i, last_resort) for i in flexible}
        flex = {i: widths[i] for i in floor if widths[i] > floor[i]}
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
        out_cols.append(Column(c.short or c.header if short else c.header, c.justify, c.short, c.flex, c.fold, c.drop,
                               c.shorten, c.fixed, c.min_fixed))
    cut = {}
    for i in keep:
        c = columns[i]
        if c.flex and not c.fold and widths[i] < natural(i, short):
            fixed = c.fixed if widths[i] >= floor_of(i) else c.min_fixed
            cut[i] = _shorten_column([r[i] for r in body], widths[i], c.shorten or shorten_middle, needs_of(i), fixed)
    new_body = [[cut[i][k] if i in cut else r[i] for i in keep] for k, r in enumerate(body)]
    new_rows = new_body[:len(rows)]
    new_total = new_body[len(rows)] if total is not None else None
    need = sum(widths[i] for i in keep) + (2 * len(keep) if compact else 3 * len(keep) + 1)
    return out_cols, new_rows, new_total, {keep.index(i): widths[i] for i in keep if columns[i].fold}, need


def md_escape(s) -> str:
    """Escape a value for a Markdown table cell."""
    return str(s).replace("|", "\\|").replace("\n", " ")


_MD_SPECIAL = re.compile(r"([\\`*<>\[\]])")  # ("_" inside a word starts no emphasis: conv_1 stays readable)


def md_text(s) -> str:
    """A name as literal Markdown text in a table cell: the characters that would start emphasis,
    a link, an HTML tag or code are backslash-escaped (``a*b*`` is not italics, ``<lambda>`` is no
    tag), then :func:`md_escape`."""
    return md_escape(_MD_SPECIAL.sub(r"\\\1", str(s)))


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
