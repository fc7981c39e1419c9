"""Running the check: every model against its budgets (config sections, then the command line)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import ModelError, SepifyError, UsageError
from .baselines import baseline_path, load_baseline
from ..cost.analysis import SHAPE_QUANTITIES, UNBOUND_NOTE_PREFIX, UNUSED_DIMS_NOTE
from .budgets import QUANTITIES, CheckReport, ModelResult, budgeted, evaluate
from ..units import byte_style
from .config import Config, Settings, find_config, load_config, merge, parse_growth, parse_limit


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
            cli.styles[q] = byte_style(v)
    if max_growth is not None and max_growth != () and max_growth != []:
        cli.growth = parse_growth(max_growth, "max-growth")
    if baseline is not None:
        b = os.fspath(baseline)
        cli.baseline = b if os.path.isabs(b) else str(cwd / b)
    cli.input_shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    cli.dims = dict(dims or {})
    cli.shape_words = {k: f"--input-shape {k}" for k in cli.input_shapes}
    cli.dim_words = {k: f"--dim {k}" for k in cli.dims}

    paths: list[tuple[str, Path | None, str | None]] = []  # (display, path, error)
    if models:
        here = cwd == Path.cwd().resolve()
        given: set[Path] = set()
        for m in models:
            if not os.fspath(m):  # Path("") is the current folder
                paths.append(("''", None, "'': an empty model path (an unset variable in a script?)"))
                continue
            p = Path(os.fspath(m))
            p = p if p.is_absolute() or here else cwd / p
            key = p.resolve() if p.exists() else p
            if key in given:  # a model named twice (overlapping globs: models/*.onnx models/net.onnx) is one model
                continue
            given.add(key)
            paths.append((os.fspath(m), p, None))
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
    read = [(str(cfg.path), "the config file")] if cfg is not None and cfg.path is not None else []
    for (_, path, _), r in zip(paths, results):
        if path is not None:
            read.append((str(path), "a checked model"))
        if r.baseline_file is not None:
            read.append((r.baseline_file, "the baseline"))
    return CheckReport(results, config=cfg.label if cfg else None, inputs=read, warnings=_dims_warnings(results))


def _dims_warnings(results: list[ModelResult]) -> list[str]:
    """A ``dims`` key that no checked model has (among the models it was given to and that
    could be read) is a warning: a typo, or a setting for a model that is gone. A key that
    only some models lack is a note on those models (a glob matches models of several kinds)."""
    seen: dict[str, tuple[str, bool]] = {}  # words -> (name, some model has it)
    for r in results:
        for name, (words, has) in r.dims_given.items():
            seen[words] = (name, has is not False or seen.get(words, (name, False))[1])
    return [f"{words}: no checked model has a dimension named {name!r} (ignored)"
            for words, (name, has) in seen.items() if not has]


def _display(path: Path, cwd: Path) -> str:
    try:
        return os.path.relpath(path, cwd)
    except ValueError:  # another drive on Windows
        return str(path)


def check_model(path: Path, display: str, cfg: Config | None, cli: Settings, cwd: Path) -> ModelResult:
    """Check one model; a :class:`SepifyError` becomes ``status == "error"``."""
    from ..cost.analysis import analyze

    t0 = time.perf_counter()
    layers, labels = cfg.settings_for(path) if cfg else ([], [])
    if cli.limits or cli.growth or cli.baseline or cli.input_shapes or cli.dims:
        labels = [*labels, "command line"]
    s = merge([*layers, cli])
    result = ModelResult(display, "error", sources=labels)
    baseline = None
    if s.baseline:
        baseline = baseline_path(s.baseline, path)
        result.baseline = _display(Path(baseline), cwd)
        result.baseline_file = baseline
    hint = _bind_hint(cfg, layers)
    result.dims_given = {n: (s.dim_words.get(n, f"--dim {n}"), None) for n in s.dims}  # None: not known
    need = budgeted(s.limits, s.growth, baseline is not None)
    try:
        try:
            an = analyze(path, input_shapes=s.input_shapes or None, dims=s.dims or None,
                         shape_words=s.shape_words, bind_hint=hint)
        except ModelError as e:
            if not getattr(e, "unbound", None) or not need & set(SHAPE_QUANTITIES):
                raise
            names = e.unbound
            quantities = [QUANTITIES[q][1] for q in SHAPE_QUANTITIES if q in need]
            raise UsageError(f"{display}: {', '.join(quantities)} cannot be measured with the unbound "
                             f"dimension{'s' if len(names) > 1 else ''} {', '.join(names)} (at 1 the model is "
                             f"invalid: {e.reason.removeprefix(str(path) + ': ')}); {_bind_hint(cfg, layers, names)}") from None
        data = an.to_dict(layers=False)
        result.dims_given = {n: (s.dim_words.get(n, f"--dim {n}"), n not in an.unused_dims) for n in s.dims}
        unbound = {k: v for k, v in data["symbols"].items() if not v["bound"]}
        guessed = {k: [q for q in v["affects"] if q in need] for k, v in unbound.items() if not v["batch"]}
        guessed = {k: qs for k, qs in guessed.items() if qs}
        if guessed:
            quantities = [QUANTITIES[q][1] for q in SHAPE_QUANTITIES if any(q in qs for qs in guessed.values())]
            names = sorted(guessed)
            many = len(quantities) > 1
            raise UsageError(f"{display}: the {', '.join(quantities)} budget{'s' if many else ''} depend{'' if many else 's'} "
                             f"on the unbound dimension{'s' if len(names) > 1 else ''} {', '.join(names)}, which a check "
                             f"does not guess; {_bind_hint(cfg, layers, names)}")
        t = data["totals"]
        result.totals = {"macs": t["macs"], "flops": t["flops"], "params": t["params"],
                         "activation_peak_bytes": t["activation_peak_bytes"], "unknown": t["unknown"],
                         "file_size": data["model"].get("file_size")}
        base_report = None
        if baseline is not None:
            try:
                base_report = load_baseline(baseline, input_shapes=s.input_shapes or None, dims=s.dims or None)
            except SepifyError as e:  # say which file it is: the error names the baseline's path only
                raise type(e)(f"{display}: the baseline {e}") from None
        result.results = evaluate(data, s.limits, s.growth, base_report, s.styles)
        result.notes = [n for n in data.get("notes") or [] if not n.startswith((UNUSED_DIMS_NOTE, UNBOUND_NOTE_PREFIX))]
        for n, (words, has) in result.dims_given.items():
            if not has:
                result.notes.append(f"{words}: this model has no dimension named {n!r} (ignored)")
        batch = sorted(k for k, v in unbound.items() if v["batch"] and set(v["affects"]) & need)
        free = sorted(k for k, v in unbound.items() if k not in batch and k not in guessed)
        if free:
            result.notes.append(f"unbound dimension{'s' if len(free) > 1 else ''} {', '.join(free)}: no budget "
                                f"of this model depends on {'them' if len(free) > 1 else 'it'}")
        if batch:
            result.notes.append(f"per sample: the dynamic batch dimension {', '.join(batch)} is set to 1 "
                                f"(to budget a batch of SIZE, bind it: --dim {batch[0]}=SIZE, or dims in the config)")
        if all(q == "unknown" for q in s.limits) and base_report is None:
            result.notes.append("no budget configured for this model: only max-unknown = 0 applies")
        result.status = "pass" if all(r.passed for r in result.results) else "fail"
    except SepifyError as e:
        result.error = str(e)
    result.seconds = time.perf_counter() - t0
    return result


def _bind_hint(cfg: Config | None, layers: list[Settings], names: list[str] | None = None) -> str:
    """How to bind dimensions, in the words of where the model's settings come from: the last
    config section matching the model, else the command line."""
    them = "them" if names is None or len(names) > 1 else "it"
    names = names or ["NAME"]
    dims = ", ".join(f"{n} = VALUE" for n in names)
    flags = " ".join(f"--dim {n}=VALUE" for n in names)
    if cfg is not None and len(layers) > 1:
        return f"bind {them} with dims = {{{dims}}} (or input-shape) in {cfg.sections_for_label(layers[-1])}, or {flags}"
    return f"bind {them} with {flags} or --input-shape INPUT=1x3x224x224 (or dims / input-shape in the config)"


def dumps(report: CheckReport | dict) -> str:
    data = report.to_dict() if isinstance(report, CheckReport) else report
    return json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
