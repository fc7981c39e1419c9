"""``sepify check``: cost budgets for models, from the command line or a config file.

Python API::

    from sepify.check import check
    report = check(["models/net.onnx"], limits={"macs": "600M"}, baseline="main.json", max_growth="2%")
    report.exit_code        # 0 within budget, 1 a budget exceeded, 2 a model/config error
    report.to_dict()        # the JSON (schema ``sepify.check/1``)

Budgeted quantities (``QUANTITIES``): ``macs``, ``flops``, ``params`` (totals of
``sepify analyze``), ``layer_macs`` (the heaviest single layer), ``activation_peak`` (bytes),
``file_size`` (bytes of the model file) and ``unknown`` (nodes whose cost sepify cannot compute;
the limit defaults to 0 — a gate must not pass a model it could not measure).

Configuration (``[tool.sepify]`` in ``pyproject.toml``, found by walking up from the current
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

Growth: with a baseline (an analyze JSON or a model file), ``max-growth`` limits
``value <= baseline * (1 + growth)``. A plain value applies to ``macs`` and ``params`` and to
every quantity that has an absolute budget (except ``unknown``); ``{quantity = value}`` picks
quantities one by one. A baseline without ``max-growth`` allows no growth (0%).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import __version__
from ..errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, SepifyError, UsageError
from ..units import human, human_bytes, parse_fraction, parse_quantity

SCHEMA = "sepify.check/1"

#: quantity -> (config key / CLI option without "--", label, unit)
QUANTITIES: dict[str, tuple[str, str, str]] = {
    "macs": ("max-macs", "MACs", "count"),
    "flops": ("max-flops", "FLOPs", "count"),
    "params": ("max-params", "params", "count"),
    "layer_macs": ("max-layer-macs", "layer MACs", "count"),
    "activation_peak": ("max-activation-peak", "activation peak", "bytes"),
    "file_size": ("max-file-size", "file size", "bytes"),
    "unknown": ("max-unknown", "unknown nodes", "count"),
}
_KEY_TO_Q = {v[0]: q for q, v in QUANTITIES.items()}
#: names accepted in ``max-growth = {NAME = ...}`` / ``--max-growth NAME=...``
_GROWTH_NAMES = {**{q: q for q in QUANTITIES}, **{q.replace("_", "-"): q for q in QUANTITIES}}
GROWTH_DEFAULT = ("macs", "params")
DEFAULT_UNKNOWN = 0

_SETTING_KEYS = (*_KEY_TO_Q, "max-growth", "baseline", "input-shape", "dims")
_SECTION_KEYS = ("path", *_SETTING_KEYS)
_TOP_KEYS = (*_SETTING_KEYS, "models")


# --- measured values --------------------------------------------------------------------------
def measure(report: dict) -> dict[str, tuple[int | None, str]]:
    """``{quantity: (value, detail)}`` from an analyze report dict (``Analysis.to_dict()``)."""
    t = report.get("totals") or {}
    layers = [layer for layer in report.get("layers") or [] if layer.get("macs") is not None]
    heaviest = max(layers, key=lambda layer: layer["macs"], default=None)
    unknown = [layer["name"] for layer in report.get("layers") or [] if layer.get("unknown")]
    return {
        "macs": (t.get("macs"), ""),
        "flops": (t.get("flops"), ""),
        "params": (t.get("params"), ""),
        "layer_macs": ((heaviest["macs"], f"heaviest layer: {heaviest['name']}") if heaviest else (None, "no layer")),
        "activation_peak": (t.get("activation_peak_bytes"), ""),
        "file_size": ((report.get("model") or {}).get("file_size"), ""),
        "unknown": (t.get("unknown"), ("unknown: " + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else ""))
                    if unknown else ""),
    }


def fmt_value(q: str, v: float | int | None, digits: int = 1) -> str:
    if v is None:
        return "?"
    if QUANTITIES[q][2] == "bytes":
        return human_bytes(v, digits)
    if q == "unknown":
        return str(int(v))
    return human(v if not isinstance(v, float) or not v.is_integer() else int(v), digits)


def fmt_many(q: str, *values, digits: int = 1) -> tuple[str, ...]:
    """Format values with enough digits (up to 4) that different values look different."""
    known = [v for v in values if v is not None]
    while digits < 4:
        texts = {}
        clash = False
        for v in known:
            t = fmt_value(q, v, digits)
            if texts.setdefault(t, v) != v:
                clash = True
        if not clash:
            break
        digits += 1
    return tuple(fmt_value(q, v, digits) for v in values)


# --- results ----------------------------------------------------------------------------------
@dataclass
class BudgetResult:
    """One budget of one model. ``limit`` is the largest allowed value (for a growth budget:
    ``baseline * (1 + growth_limit)``); ``margin = limit - value`` (negative when over)."""

    quantity: str
    kind: str                   # "max" | "growth"
    limit: float | None         # None: no baseline value to grow from
    value: int | None
    passed: bool
    message: str
    detail: str = ""
    baseline: int | None = None
    growth_limit: float | None = None   # fraction
    growth: float | None = None         # fraction, actual

    @property
    def name(self) -> str:
        key = QUANTITIES[self.quantity][0]
        return key if self.kind == "max" else f"max-growth:{key[4:]}"

    @property
    def margin(self) -> float | None:
        return None if self.value is None or self.limit is None else self.limit - self.value

    @property
    def margin_pct(self) -> float | None:
        m = self.margin
        return None if m is None or not self.limit else 100.0 * m / self.limit

    def to_dict(self) -> dict:
        return {
            "name": self.name, "quantity": self.quantity, "kind": self.kind,
            "unit": QUANTITIES[self.quantity][2],
            "limit": self.limit, "value": self.value,
            "margin": self.margin, "margin_pct": None if self.margin_pct is None else round(self.margin_pct, 4),
            "passed": self.passed, "message": self.message, "detail": self.detail,
            "baseline": self.baseline, "growth_limit": self.growth_limit,
            "growth": None if self.growth is None else round(self.growth, 6),
        }


@dataclass
class ModelResult:
    path: str                       # as given (or relative to the current directory)
    status: str                     # pass | fail | error
    results: list[BudgetResult] = field(default_factory=list)
    error: str | None = None
    totals: dict = field(default_factory=dict)
    baseline: str | None = None
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "path": self.path, "status": self.status, "error": self.error,
            "budgets": [r.to_dict() for r in self.results],
            "totals": self.totals, "baseline": self.baseline, "sources": self.sources,
            "notes": self.notes, "seconds": round(self.seconds, 3),
        }


@dataclass
class CheckReport:
    models: list[ModelResult]
    config: str | None = None

    @property
    def exit_code(self) -> int:
        if any(m.status == "error" for m in self.models):
            return EXIT_ERROR
        if any(m.status == "fail" for m in self.models):
            return EXIT_FAILED
        return EXIT_OK

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_dict(self) -> dict:
        n = {s: sum(1 for m in self.models if m.status == s) for s in ("pass", "fail", "error")}
        return {
            "schema": SCHEMA, "sepify_version": __version__, "config": self.config,
            "passed": self.passed, "exit_code": self.exit_code,
            "summary": {"models": len(self.models), "passed": n["pass"], "failed": n["fail"], "errors": n["error"],
                        "budgets": sum(len(m.results) for m in self.models),
                        "budgets_failed": sum(1 for m in self.models for r in m.results if not r.passed)},
            "models": [m.to_dict() for m in self.models],
        }


# --- evaluation -------------------------------------------------------------------------------
def evaluate(report: dict, limits: Mapping[str, int | float | None] | None = None,
             growth: Mapping[str, float] | None = None, baseline: dict | None = None) -> list[BudgetResult]:
    """Evaluate budgets on an analyze report dict.

    ``limits``: ``{quantity: max}`` (``None`` values are ignored; ``unknown`` defaults to 0).
    ``growth``: ``{quantity: fraction}``, ``"*"`` for the default set (``macs``, ``params`` and
    every quantity with a limit except ``unknown``); needs ``baseline`` (an analyze report dict).
    A baseline with no growth given allows no growth. An unmeasurable value fails its budget.
    """
    limits = {q: v for q, v in (limits or {}).items() if v is not None}
    for q in limits:
        if q not in QUANTITIES:
            raise UsageError(f"unknown budget quantity {q!r} (known: {', '.join(QUANTITIES)})")
    limits.setdefault("unknown", DEFAULT_UNKNOWN)
    values = measure(report)
    results = []
    for q in QUANTITIES:
        if q not in limits:
            continue
        lim = limits[q]
        v, detail = values[q]
        label = QUANTITIES[q][1]
        if v is None:
            results.append(BudgetResult(q, "max", lim, None, False, f"{label} could not be measured", detail))
            continue
        passed = v <= lim
        sv, sl = fmt_many(q, v, lim)
        if passed:
            msg = f"{label} {sv} within {QUANTITIES[q][0]} {sl}"
        else:
            over = v - lim
            msg = (f"{label} {sv} exceeds {QUANTITIES[q][0]} {sl} by {fmt_value(q, over)}"
                   + (f" ({100.0 * over / lim:.1f}%)" if lim else ""))
            if detail:
                msg += f"; {detail}"
        results.append(BudgetResult(q, "max", lim, v, passed, msg, detail))

    growth = dict(growth or {})
    if growth and baseline is None:
        raise UsageError("max-growth needs a baseline (--baseline FILE or `baseline` in the config)")
    if baseline is None:
        return results
    if not growth:
        growth = {"*": 0.0}
    star = growth.pop("*", None)
    per_q: dict[str, float] = {}
    if star is not None:
        for q in (*GROWTH_DEFAULT, *(q for q in limits if q != "unknown")):
            per_q.setdefault(q, star)
    per_q.update(growth)
    base_values = measure(baseline)
    for q in QUANTITIES:
        if q not in per_q:
            continue
        g = per_q[q]
        label = QUANTITIES[q][1]
        v, detail = values[q]
        b, _ = base_values[q]
        if v is None or b is None:
            missing = "the model" if v is None else "the baseline"
            results.append(BudgetResult(q, "growth", None if b is None else b * (1 + g), v, False,
                                        f"{label} growth cannot be checked: no value in {missing}", detail,
                                        baseline=b, growth_limit=g))
            continue
        lim = b * (1 + g)
        actual = (v - b) / b if b else (0.0 if v == 0 else None)  # None: grew from 0
        passed = v <= lim
        sb, sv = fmt_many(q, b, v, digits=2)
        change = "from 0" if actual is None else f"{actual * 100:+.1f}%"
        if passed:
            msg = f"{label} {change} vs baseline ({sb} → {sv}), within max-growth {g * 100:.1f}%"
        else:
            msg = f"{label} grew {change} vs baseline ({sb} → {sv}), above max-growth {g * 100:.1f}%"
        results.append(BudgetResult(q, "growth", lim, v, passed, msg, detail, baseline=b, growth_limit=g,
                                    growth=actual))
    return results


# --- configuration ----------------------------------------------------------------------------
@dataclass
class Settings:
    """One layer of settings (defaults, a model section, the command line); see :func:`merge`."""

    limits: dict[str, int | None] = field(default_factory=dict)   # None: budget removed
    growth: dict[str, float | None] = field(default_factory=dict)  # "*" = default set
    baseline: str | None = None        # absolute, or relative to the cwd; may hold {stem}/{name}
    input_shapes: dict[str, list] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)


def merge(layers: Iterable[Settings]) -> Settings:
    out = Settings()
    for s in layers:
        out.limits.update(s.limits)
        if s.growth:
            if "*" in s.growth:  # a plain value replaces the per-quantity ones below it
                out.growth = {}
            out.growth.update(s.growth)
        if s.baseline is not None:
            out.baseline = s.baseline
        out.input_shapes.update(s.input_shapes)
        out.dims.update(s.dims)
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
    """Read a config file: ``[tool.sepify]`` if the file has one, else its top-level keys."""
    path = Path(path)
    if not path.is_absolute():
        path = Path(cwd or os.getcwd()) / path
    data = _toml_load(path)
    where = f"{path}"
    if isinstance(data.get("tool"), dict) and "sepify" in data["tool"]:
        others = [k for k in data if k != "tool"]
        if path.name != "pyproject.toml" and others:
            raise UsageError(f"{path}: unknown key {others[0]!r} (with a [tool.sepify] table, put every key inside it)")
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
        elif k == "max-growth":
            s.growth = parse_growth(value, f"{key} in {where}")
        elif k == "baseline":
            if not isinstance(value, str) or not value:
                raise UsageError(f"{where}: 'baseline' must be a path")
            s.baseline = value if os.path.isabs(value) else str(root / value)
        elif k == "input-shape":
            s.input_shapes = parse_input_shapes(value, where)
        elif k == "dims":
            if not isinstance(value, Mapping):
                raise UsageError(f"{where}: 'dims' must be a table such as {{batch = 1}}")
            for name, v in value.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise UsageError(f"{where}: dims.{name} must be a positive integer, not {v!r}")
                s.dims[name] = v
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


def parse_input_shapes(value, where: str) -> dict[str, list]:
    from ..loading import parse_input_shape

    out: dict[str, list] = {}
    if isinstance(value, Mapping):
        for name, shape in value.items():
            if isinstance(shape, list):
                if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
                    raise UsageError(f"{where}: input-shape.{name} must be like \"1x3x224x224\" or [1, 3, 224, 224]")
                out[name] = list(shape)
            elif isinstance(shape, str):
                out.update([parse_input_shape(f"{name}={shape}")])
            else:
                raise UsageError(f"{where}: input-shape.{name} must be like \"1x3x224x224\" or [1, 3, 224, 224]")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        out.update(parse_input_shape(v) for v in value)
    else:
        raise UsageError(f"{where}: 'input-shape' must be a table such as {{input = \"1x3x224x224\"}}")
    return out


# --- the check --------------------------------------------------------------------------------
def check(
    models: Sequence[str | os.PathLike] = (),
    *,
    config: str | os.PathLike | Config | None = None,
    discover: bool = True,
    cwd: str | os.PathLike | None = None,
    limits: Mapping[str, int | float | str | None] | None = None,
    max_growth=None,
    baseline: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> CheckReport:
    """Check models against their budgets; every model is checked even if one fails.

    ``models``: paths (relative to ``cwd``); empty: every file matched by the config sections.
    ``config``: a file path or a :class:`Config`; when None and ``discover``, the nearest
    ``pyproject.toml`` with ``[tool.sepify]`` above ``cwd``. ``limits`` (``{"macs": "600M"}``,
    ``None`` removes a budget), ``max_growth`` (``"2%"``, ``{"macs": 0.02}`` or a list of CLI
    items), ``baseline``, ``input_shapes`` and ``dims`` override the config for every model.

    Config errors raise :class:`UsageError`; model errors are recorded on that model
    (``status == "error"``, exit code 2) and the other models are still checked.
    """
    cwd = Path(cwd or os.getcwd()).resolve()
    if isinstance(config, Config):
        cfg = config
    elif config is not None:
        cfg = load_config(config, cwd)
    elif discover:
        found = find_config(cwd)
        cfg = load_config(found) if found else None
    else:
        cfg = None

    cli = Settings()
    for q, v in (limits or {}).items():
        if q not in QUANTITIES:
            raise UsageError(f"unknown budget quantity {q!r} (known: {', '.join(QUANTITIES)})")
        if v is not None:
            cli.limits[q] = parse_limit(v, QUANTITIES[q][0])
    if max_growth is not None and max_growth != () and max_growth != []:
        cli.growth = parse_growth(max_growth, "max-growth")
    if baseline is not None:
        b = os.fspath(baseline)
        cli.baseline = b if os.path.isabs(b) else str(cwd / b)
    cli.input_shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    cli.dims = dict(dims or {})

    paths: list[tuple[str, Path | None, str | None]] = []  # (display, path, error)
    if models:
        here = cwd == Path.cwd().resolve()
        for m in models:
            p = Path(os.fspath(m))
            paths.append((os.fspath(m), p if p.is_absolute() or here else cwd / p, None))
    elif cfg is not None and cfg.sections:
        seen: set[Path] = set()
        for sec in cfg.sections:
            files = sec.files()
            if not files:
                paths.append((", ".join(sec.patterns), None, f"{sec.label}: 'path' matches no file"))
            for f in files:
                r = f.resolve()
                if r not in seen:
                    seen.add(r)
                    paths.append((_display(f, cwd), f, None))
    elif cfg is not None:
        raise UsageError(f"no model given, and {cfg.label} has no [[models]] section with a 'path' to check")
    else:
        raise UsageError("no model given (pass model files, or declare [[tool.sepify.models]] paths in a config)")

    results = []
    for display, path, err in paths:
        if err is not None:
            results.append(ModelResult(display, "error", error=err))
            continue
        results.append(check_model(path, display, cfg, cli, cwd))
    return CheckReport(results, config=cfg.label if cfg else None)


def _display(path: Path, cwd: Path) -> str:
    try:
        return os.path.relpath(path, cwd)
    except ValueError:  # another drive on Windows
        return str(path)


def check_model(path: Path, display: str, cfg: Config | None, cli: Settings, cwd: Path) -> ModelResult:
    """Check one model; a :class:`SepifyError` becomes ``status == "error"``."""
    from ..analysis import analyze
    from ..diff import load_report

    t0 = time.perf_counter()
    layers, labels = cfg.settings_for(path) if cfg else ([], [])
    if cli.limits or cli.growth or cli.baseline or cli.input_shapes or cli.dims:
        labels = [*labels, "command line"]
    s = merge([*layers, cli])
    result = ModelResult(display, "error", sources=labels)
    baseline = None
    if s.baseline:
        baseline = s.baseline.replace("{stem}", path.stem).replace("{name}", path.name)
        result.baseline = _display(Path(baseline), cwd)
    try:
        data = analyze(path, input_shapes=s.input_shapes or None, dims=s.dims or None).to_dict(layers=False)
        t = data["totals"]
        result.totals = {"macs": t["macs"], "flops": t["flops"], "params": t["params"],
                         "activation_peak_bytes": t["activation_peak_bytes"], "unknown": t["unknown"],
                         "file_size": data["model"].get("file_size")}
        base_report = None
        if baseline is not None:
            base_report = load_report(baseline, input_shapes=s.input_shapes or None, dims=s.dims or None)
        result.results = evaluate(data, s.limits, s.growth, base_report)
        result.notes = list(data.get("notes") or [])
        if all(q == "unknown" for q in s.limits) and base_report is None:
            result.notes.append("no budget configured for this model: only max-unknown = 0 applies")
        result.status = "pass" if all(r.passed for r in result.results) else "fail"
    except SepifyError as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - t0
    return result


def dumps(report: CheckReport | dict) -> str:
    data = report.to_dict() if isinstance(report, CheckReport) else report
    return json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"


__all__ = ["QUANTITIES", "BudgetResult", "ModelResult", "CheckReport", "Config", "Settings", "check",
           "check_model", "evaluate", "measure", "find_config", "load_config", "parse_config", "merge"]
