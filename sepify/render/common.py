"""Helpers shared by the renderers: the rich console, plain/rich tables, JSON layout, Markdown
escaping."""

from __future__ import annotations

import json


def _console(stream, width: int | None = None):
    from rich.console import Console

    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=width or (None if tty else 160), highlight=False, markup=False,
                   color_system="auto" if tty else None, soft_wrap=False)


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


def print_table(stream, title: str, columns: list[tuple[str, str]], rows: list[tuple], total: tuple | None) -> None:
    """A table with a title, ``columns`` as (header, "left"|"right"), and a total row: rich
    for a screenful, plain aligned text for thousands of rows (same columns, same order)."""
    if len(rows) <= RICH_MAX_ROWS:
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for header, just in columns:
            table.add_column(header, justify=just, overflow="fold" if header == "note" else "ellipsis")
        for row in rows:
            table.add_row(*row)
        if total is not None:
            table.add_section()
            table.add_row(*total)
        _console(stream).print(table)
        return
    body = [tuple(h for h, _ in columns)] + rows + ([total] if total is not None else [])
    widths = [max(map(len, cells)) for cells in zip(*body)]
    fmt = "  ".join(f"{{:{'>' if just == 'right' else '<'}{w}}}" for w, (_, just) in zip(widths, columns))
    rule = "  ".join("-" * w for w in widths)
    out = [title, fmt.format(*body[0]).rstrip(), rule]
    out += [fmt.format(*r).rstrip() for r in rows]
    if total is not None:
        out += [rule, fmt.format(*total).rstrip()]
    stream.write("\n".join(out) + "\n")
