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

Growth: with a baseline (an analyze JSON or a model file), ``max-growth`` limits
``value <= baseline * (1 + growth)``. A plain value applies to ``macs`` and ``params`` and to
every quantity that has an absolute budget (except ``unknown``); ``{quantity = value}`` picks
quantities one by one. A baseline without ``max-growth`` allows no growth (0%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .. import __version__
from ..errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, UsageError
from ..units import human, human_bytes

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
GROWTH_DEFAULT = ("macs", "params")
DEFAULT_UNKNOWN = 0



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
        "layer_macs": ((heaviest["macs"], f"heaviest layer: {heaviest['name']}") if heaviest
                       else (0, "no layer") if not report.get("layers")  # a model of no nodes: no layer costs anything
                       else (None, "every layer of unknown cost")),
        "activation_peak": (t.get("activation_peak_bytes"), ""),
        "file_size": ((report.get("model") or {}).get("file_size"), ""),
        "unknown": (t.get("unknown"), ("unknown: " + ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else ""))
                    if unknown else ""),
    }


def fmt_value(q: str, v: float | int | None, digits: int = 1, style: str = "binary") -> str:
    """A value of quantity ``q``; bytes in binary units, or decimal ones (``style="si"``) when
    the budget was written so (``20MB``)."""
    if v is None:
        return "?"
    if QUANTITIES[q][2] == "bytes":
        return human_bytes(v, digits, style)
    if q == "unknown":
        return str(int(v))
    return human(v if not isinstance(v, float) or not v.is_integer() else int(v), digits)


def fmt_against(q: str, value, *others, digits: int = 1, style: str = "binary") -> tuple[str, ...]:
    """``value`` and each of ``others``: each other value with the digits it needs to look
    different from ``value`` alone, ``value`` with the most of those. A growth row shows the
    value against its limit and its baseline: a baseline close to the value needs decimals, the
    limit beside them does not (it printed ``711.40M``)."""
    need = [_digits(q, (o, value), digits, style) for o in others]
    return (fmt_value(q, value, max(need, default=digits), style),
            *(fmt_value(q, o, d, style) for o, d in zip(others, need)))


def _digits(q: str, values, digits: int, style: str) -> int:
    """The fewest digits (``digits`` .. 4) at which different values look different."""
    known = [v for v in values if v is not None]
    while digits < 4:
        texts = {}
        clash = False
        for v in known:
            t = fmt_value(q, v, digits, style)
            if texts.setdefault(t, v) != v:
                clash = True
        if not clash:
            break
        digits += 1
    return digits


def fmt_many(q: str, *values, digits: int = 1, style: str = "binary") -> tuple[str, ...]:
    """Format values with enough digits (up to 4) that different values look different."""
    digits = _digits(q, values, digits, style)
    return tuple(fmt_value(q, v, digits, style) for v in values)


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
    style: str = "binary"               # bytes shown in binary or decimal ("si") units

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
            "style": self.style,
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
    baseline_file: str | None = field(default=None, repr=False)  # the baseline's path as read
    #: dims this model was given: name -> (words naming the setting, whether the model has it)
    dims_given: dict[str, tuple[str, bool]] = field(default_factory=dict, repr=False)

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
    #: the files the check read, as (path, role): models, baselines, the config file
    inputs: list[tuple[str, str]] = field(default_factory=list)
    #: problems of the settings that fail no model (a ``dims`` key no checked model has)
    warnings: list[str] = field(default_factory=list)

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
            "passed": self.passed, "exit_code": self.exit_code, "warnings": self.warnings,
            "summary": {"models": len(self.models), "passed": n["pass"], "failed": n["fail"], "errors": n["error"],
                        "budgets": sum(len(m.results) for m in self.models),
                        "budgets_failed": sum(1 for m in self.models for r in m.results if not r.passed)},
            "models": [m.to_dict() for m in self.models],
        }


# --- evaluation -------------------------------------------------------------------------------
def budgeted(limits: Mapping[str, object], growth: Mapping[str, object], has_baseline: bool) -> set[str]:
    """The quantities :func:`evaluate` judges for these settings (``unknown`` always)."""
    out = {q for q, v in limits.items() if v is not None} | {"unknown"}
    if has_baseline:
        if not growth or "*" in growth:
            out |= {*GROWTH_DEFAULT, *(q for q in limits if q != "unknown")}
        out |= {q for q in growth if q != "*"}
    return out



def evaluate(report: dict, limits: Mapping[str, int | float | None] | None = None,
             growth: Mapping[str, float] | None = None, baseline: dict | None = None,
             styles: Mapping[str, str] | None = None) -> list[BudgetResult]:
    """Evaluate budgets on an analyze report dict.

    ``limits``: ``{quantity: max}`` (``None`` values are ignored; ``unknown`` defaults to 0).
    ``growth``: ``{quantity: fraction}``, ``"*"`` for the default set (``macs``, ``params`` and
    every quantity with a limit except ``unknown``); needs ``baseline`` (an analyze report dict).
    A baseline with no growth given allows no growth. An unmeasurable value fails its budget.
    ``styles``: ``{quantity: "si"}`` shows that byte quantity in decimal units (the unit the
    user wrote the budget in, see :func:`~sepify.units.byte_style`).
    """
    styles = styles or {}
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
        st = styles.get(q, "binary")
        if v is None:
            results.append(BudgetResult(q, "max", lim, None, False, f"{label} could not be measured", detail, style=st))
            continue
        passed = v <= lim
        sv, sl = fmt_many(q, v, lim, style=st)
        if passed:
            msg = f"{label} {sv} within {QUANTITIES[q][0]} {sl}"
        else:
            over = v - lim
            msg = (f"{label} {sv} exceeds {QUANTITIES[q][0]} {sl} by {fmt_value(q, over, style=st)}"
                   + (f" ({100.0 * over / lim:.1f}%)" if lim else ""))
            if detail:
                msg += f"; {detail}"
        results.append(BudgetResult(q, "max", lim, v, passed, msg, detail, style=st))

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
        st = styles.get(q, "binary")
        if v is None or b is None:
            missing = "the model" if v is None else "the baseline"
            results.append(BudgetResult(q, "growth", None if b is None else b * (1 + g), v, False,
                                        f"{label} growth cannot be checked: no value in {missing}", detail,
                                        baseline=b, growth_limit=g, style=st))
            continue
        lim = b * (1 + g)
        actual = (v - b) / b if b else (0.0 if v == 0 else None)  # None: grew from 0
        passed = v <= lim
        sb, sv = fmt_many(q, b, v, style=st)
        change = "from 0" if actual is None else f"{actual * 100:+.1f}%"
        if passed:
            msg = f"{label} {change} vs baseline ({sb} → {sv}), within max-growth {g * 100:.1f}%"
        else:
            msg = f"{label} grew {change} vs baseline ({sb} → {sv}), above max-growth {g * 100:.1f}%"
        results.append(BudgetResult(q, "growth", lim, v, passed, msg, detail, baseline=b, growth_limit=g,
                                    growth=actual, style=st))
    return results
