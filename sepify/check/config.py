"""Configuration (``[tool.sepify]`` in ``pyproject.toml``, found by walking up from the current
directory, or ``--config FILE`` — a ``sepify.toml`` with top-level keys or a ``[tool.sepify]``
table)::

    [tool.sepify]                       # defaults for every model
    max-unknown = 0
    max-growth = "2%"                   # or {macs = "2%", file-size = "5%"}
    baseline = "baselines/{stem}.json"  # {stem}/{name}: the model's file stem / name

    [[tool.sepify.models]]              # budgets for the models matching `path` (glob(s))
    path = "models/*.onnx"              # relative to the config file's folder; ** allowed
    max-macs = "600M"
    max-params = "4.5M"
    input-shape = {input = "1x3x224x224"}
    dims = {batch = 1}

Every ``[[models]]`` section matching a model applies, in file order, over the defaults (later
sections override earlier ones key by key); command-line options override them all. With no
model on the command line, ``check`` checks every file matched by the sections' ``path``.
"""

from __future__ import annotations

import difflib
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UsageError
from ..units import MAX_DIM, byte_style, parse_fraction, parse_quantity
from .budgets import QUANTITIES

_KEY_TO_Q = {v[0]: q for q, v in QUANTITIES.items()}
#: names accepted in ``max-growth = {NAME = ...}`` / ``--max-growth NAME=...``
_GROWTH_NAMES = {**{q: q for q in QUANTITIES}, **{q.replace("_", "-"): q for q in QUANTITIES}}
_SETTING_KEYS = (*_KEY_TO_Q, "max-growth", "baseline", "input-shape", "dims")
_SECTION_KEYS = ("path", *_SETTING_KEYS)
_TOP_KEYS = (*_SETTING_KEYS, "models")


# --- configuration ----------------------------------------------------------------------------
@dataclass
class Settings:
    """One layer of settings (defaults, a model section, the command line); see :func:`merge`."""

    limits: dict[str, int | None] = field(default_factory=dict)   # None: budget removed
    growth: dict[str, float | None] = field(default_factory=dict)  # "*" = default set
    baseline: str | None = None        # absolute, or relative to the cwd; may hold {stem}/{name}
    input_shapes: dict[str, list] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    #: how messages name where each input shape / dim came from: ``input-shape.images in
    #: pyproject.toml [tool.sepify]``, ``--dim batch``
    shape_words: dict[str, str] = field(default_factory=dict)
    dim_words: dict[str, str] = field(default_factory=dict)
    #: byte budgets written in decimal units (``20MB``): shown in them (see ``units.byte_style``)
    styles: dict[str, str] = field(default_factory=dict)


def merge(layers: Iterable[Settings]) -> Settings:
    out = Settings()
    for s in layers:
        out.limits.update(s.limits)
        for q in s.limits:  # a budget brings the unit it was written in
            out.styles[q] = s.styles.get(q, "binary")
        if s.growth:
            if "*" in s.growth:  # a plain value replaces the per-quantity ones below it
                out.growth = {}
            out.growth.update(s.growth)
        if s.baseline is not None:
            out.baseline = s.baseline
        out.input_shapes.update(s.input_shapes)
        out.dims.update(s.dims)
        out.shape_words.update(s.shape_words)
        out.dim_words.update(s.dim_words)
    out.limits = {q: v for q, v in out.limits.items() if v is not None}
    out.growth = {q: v for q, v in out.growth.items() if v is not None}
    return out


@dataclass
class Section:
    patterns: list[str]
    settings: Settings
    label: str
    root: Path
    _matches: set[Path] | None = None

    def files(self) -> list[Path]:
        """Files matched by the patterns, in pattern order, each sorted."""
        out: list[Path] = []
        for p in self.patterns:
            base = p if os.path.isabs(p) else str(self.root / p)
            out += [Path(f) for f in sorted(glob.glob(base, recursive=True)) if os.path.isfile(f)]
        return out

    def matches(self, path: Path) -> bool:
        if self._matches is None:
            self._matches = {f.resolve() for f in self.files()}
        return path.resolve() in self._matches


@dataclass
class Config:
    path: Path | None
    root: Path
    defaults: Settings
    sections: list[Section]

    def settings_for(self, path: Path) -> tuple[list[Settings], list[str]]:
        layers, labels = [self.defaults], [self.label]
        for s in self.sections:
            if s.matches(path):
                layers.append(s.settings)
                labels.append(s.label)
        return layers, labels

    def sections_for_label(self, settings: Settings) -> str:
        """The label of the section holding ``settings`` (the config's label for the defaults)."""
        return next((sec.label for sec in self.sections if sec.settings is settings), self.label)

    @property
    def label(self) -> str:
        if self.path is None:
            return "<config>"
        return f"{self.path} [tool.sepify]" if self.path.name == "pyproject.toml" else str(self.path)


def _toml_load(path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise UsageError(f"{path}: invalid TOML: not UTF-8 text (byte {e.start})") from None


def find_config(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` with a ``[tool.sepify]`` table, from ``start`` (default:
    the current directory) up to the filesystem root; None if there is none."""
    d = Path(start or os.getcwd()).resolve()
    for folder in (d, *d.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            try:
                data = _toml_load(candidate)
            except UsageError:
                if b"[tool.sepify" in candidate.read_bytes():
                    raise
                continue  # a broken pyproject.toml that is not ours: keep looking
            if isinstance(data.get("tool"), dict) and "sepify" in data["tool"]:
                return candidate
    return None


def load_config(path: str | os.PathLike, cwd: str | os.PathLike | None = None) -> Config:
    """Read a config file: its ``[tool.sepify]`` table if it has one (other tables are ignored),
    else (a ``sepify.toml``) its top-level keys; a ``pyproject.toml`` without the table is an error."""
    path = Path(path)
    if not path.is_absolute():
        path = Path(cwd or os.getcwd()) / path
    data = _toml_load(path)
    where = f"{path}"
    if isinstance(data.get("tool"), dict) and "sepify" in data["tool"]:
        # any TOML file with a [tool.sepify] table (a pyproject.toml, or another file like one):
        # that table is the config and the file's other tables belong to other tools
        table = data["tool"]["sepify"]
        where = f"{path} [tool.sepify]"
    elif path.name == "pyproject.toml":
        raise UsageError(f"{path}: no [tool.sepify] table")
    else:
        table = data
    return parse_config(table, root=path.parent, path=path, where=where)


def parse_config(table: Mapping[str, Any], root: str | os.PathLike = ".", path: Path | None = None,
                 where: str = "config") -> Config:
    """Build a :class:`Config` from the ``[tool.sepify]`` table (a dict)."""
    if not isinstance(table, Mapping):
        raise UsageError(f"{where}: expected a table")
    root = Path(root).resolve()
    _check_keys(table, _TOP_KEYS, where)
    defaults = _settings(table, root, where)
    sections = []
    models = table.get("models", [])
    if isinstance(models, Mapping):
        models = [models]
    if not isinstance(models, list):
        raise UsageError(f"{where}: 'models' must be an array of tables ([[tool.sepify.models]])")
    for n, sec in enumerate(models, 1):
        label = f"{where} models #{n}"
        if not isinstance(sec, Mapping):
            raise UsageError(f"{label}: expected a table")
        _check_keys(sec, _SECTION_KEYS, label)
        pats = sec.get("path")
        if pats is None:
            raise UsageError(f"{label}: missing 'path' (a glob such as \"models/*.onnx\")")
        pats = [pats] if isinstance(pats, str) else pats
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats):
            raise UsageError(f"{label}: 'path' must be a glob or a list of globs")
        label = f"{label} ({', '.join(pats)})"
        sections.append(Section(pats, _settings(sec, root, label), label, root))
    return Config(path, root, defaults, sections)


def _norm(key: str) -> str:
    return key.replace("_", "-")


def _check_keys(table: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in table:
        if _norm(key) not in allowed:
            close = difflib.get_close_matches(_norm(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(allowed)})"
            raise UsageError(f"{where}: unknown key {key!r}{hint}")


def _settings(table: Mapping, root: Path, where: str) -> Settings:
    s = Settings()
    for key, value in table.items():
        k = _norm(key)
        if k in _KEY_TO_Q:
            s.limits[_KEY_TO_Q[k]] = parse_limit(value, f"{key} in {where}")
            s.styles[_KEY_TO_Q[k]] = byte_style(value)
        elif k == "max-growth":
            s.growth = parse_growth(value, f"{key} in {where}")
        elif k == "baseline":
            if not isinstance(value, str) or not value:
                raise UsageError(f"{where}: 'baseline' must be a path")
            s.baseline = value if os.path.isabs(value) else str(root / value)
        elif k == "input-shape":
            s.input_shapes = parse_input_shapes(value, where)
            s.shape_words = {name: f"{key}.{name} in {where}" for name in s.input_shapes}
        elif k == "dims":
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: 'dims' must be a table such as {{batch = 1}}")
            for name, v in value.items():
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
                    big = " below 2**63 (ONNX dimensions are int64)" if isinstance(v, int) and v > MAX_DIM else ""
                    raise UsageError(f"{where}: dims.{name} must be a positive integer{big}, not {v!r}")
                s.dims[name] = v
                s.dim_words[name] = f"dims.{name} in {where}"
    return s


def parse_limit(value, what: str) -> int | None:
    """A budget value: ``"600M"``, ``4500000``, ``"8MiB"``; ``"none"``/``"off"`` removes it."""
    if isinstance(value, str) and value.strip().lower() in ("none", "off", "unlimited"):
        return None
    return parse_quantity(value, what)


def parse_growth(value, what: str) -> dict[str, float | None]:
    """``"2%"`` → ``{"*": 0.02}``; ``{macs = "2%"}`` → ``{"macs": 0.02}``; CLI items
    ``["2%", "file-size=5%"]`` are accepted as a list."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, str) and "=" in v:
                name, _, frac = v.partition("=")
                items.append((name.strip(), frac.strip()))
            else:
                items.append(("*", v))
    else:
        items = [("*", value)]
    out: dict[str, float | None] = {}
    for name, v in items:
        if name != "*":
            q = _GROWTH_NAMES.get(name.strip())
            if q is None or q == "unknown":
                names = ", ".join(n for n in _GROWTH_NAMES if "_" not in n and n != "unknown")
                raise UsageError(f"invalid {what}: unknown quantity {name!r} (known: {names})")
            name = q
        if isinstance(v, str) and v.strip().lower() in ("none", "off"):
            out[name] = None
            continue
        f = parse_fraction(v, what)
        if f < 0:
            raise UsageError(f"invalid {what}: {v!r} (must be >= 0)")
        out[name] = f
    return out


def parse_input_shapes(value, where: str) -> dict[str, list[int]]:
    """``input-shape = {images = "1x3x640x640"}`` (or ``[1, 3, 640, 640]``, or a list of
    ``"images=1x3x640x640"``): every dimension a positive integer (symbols are bound by ``dims``)."""
    from ..units import parse_input_shape, parse_shape

    out: dict[str, list[int]] = {}
    if isinstance(value, Mapping):
        for name, shape in value.items():
            what = f"input-shape.{name} in {where}"
            if isinstance(shape, list) and shape:
                for d in shape:
                    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM:
                        raise UsageError(f"invalid {what} {shape!r}: {d!r} is not a positive integer "
                                         "(a symbolic dimension is bound by name: dims = {NAME = VALUE})")
                out[name] = list(shape)
            elif isinstance(shape, str):
                out[name] = parse_shape(shape, what)
            else:
                raise UsageError(f"{what} must be like \"1x3x224x224\" or [1, 3, 224, 224]")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        out.update(parse_input_shape(v, f"input-shape in {where}") for v in value)
    else:
        raise UsageError(f"{where}: 'input-shape' must be a table such as {{input = \"1x3x224x224\"}}")
    return out
