"""The rewrite pipeline: plan -> allocate -> emit on one prepared model, then the report.

The math lives in :mod:`sepify.rewrite.factorize` (pure numpy) and in ``docs/rewrite.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .. import __version__
from ..cost.analysis import unused_dims_note
from ..cost.symbolic import formula
from ..errors import ModelError, UsageError
from ..model.graph import GraphView, all_graphs, subgraphs
from ..model.external import file_bytes, weightless_copy
from ..model.loading import load, name_function_nodes as _name_function_nodes
from ..model.reading import drop_initializer_inputs, read_model, topological_sort
from ..units import human3
from .allocate import plan_ranks
from .factorize import original_macs
from .emit import Replacement, _Names, _opset, apply, build, is_sorted
from .options import FAST_FORM, RewriteOptions
from .plan import SHAPE_UNKNOWN, Candidate, Skipped, _live_nodes, _name_nodes, plan_conv


@dataclass
class LayerResult:
    name: str
    orientation: str
    rank: int
    max_rank: int
    energy: float
    rel_error: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    folded_batchnorm: str | None = None
    new_nodes: list[str] = field(default_factory=list)
    form: str = "native"  # graph form of the pair (sepify.rewrite.emit)
    latency: dict | None = None  # measured per-layer latency (sepify.rewrite.measure), when measured
    # with calibration data: relative output error of the layer (docs/rewrite.md), predicted
    # from the fit statistics and measured on the held-out samples (None without them)
    output_error_predicted: float | None = None
    output_error_measured: float | None = None
    # MACs as formulas of the unbound symbolic dims (``576·N·⌈H/4⌉·⌈W/4⌉``), None when static
    macs_before_formula: str | None = None
    macs_after_formula: str | None = None
    # with measured sensitivities (sepify.rewrite.sensitivity): the distortion of the model's
    # outputs this layer's option is predicted to cause alone, a_l(r) * eps_l(o, r)^2 (what the
    # budget allocator summed)
    distortion_predicted: float | None = None
    # the Add whose output the predicted and measured output errors are of (a residual target,
    # calibrate "Residual targets"); None: the layer's own output
    output_error_at: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)



def _macs_formulas(c: Candidate, sp, rank: int) -> dict:
    """The layer's MACs before and after as formulas, when its positions are symbolic."""
    if c.p_out_sym is None and c.p_in_sym is None:
        return {}
    p_in = c.p_in_sym if c.p_in_sym is not None else c.p_in
    p_out = c.p_out_sym if c.p_out_sym is not None else c.p_out
    before = original_macs(sp.weight_shape, sp.group, p_out)
    return {"macs_before_formula": formula(before, human3), "macs_after_formula": formula(sp.macs(rank, p_in, p_out), human3)}


@dataclass
class RewriteResult:
    """``model``: the rewritten ModelProto; ``report``: the diff report as a dict (JSON form).

    For a source with external data, the initializers the rewrite left untouched still
    reference the source's data files (relative to ``source_path``'s folder; their bytes are
    never loaded): :meth:`save` copies them into the new data file. ``calibration``: the
    validated calibration set of a calibrated rewrite (``.fit`` / ``.holdout``: sequences of
    feed dicts), None otherwise."""

    model: onnx.ModelProto
    layers: list[LayerResult]
    skipped: list[Skipped]
    report: dict
    external_data: bool = False
    source_path: Path | None = None
    calibration: object = None  # the CalibrationSet (.fit / .holdout feeds) of a calibrated rewrite
    latency_stage: object = None  # the measure stage, when latency was measured

    def measure_saved(self, path: str | Path) -> None:
        """End-to-end latency of a rewrite with external data, from its saved file (it cannot run
        from memory): fills ``report["latency"]["end_to_end"]`` when it is missing."""
        lat = self.report.get("latency")
        if self.latency_stage is None or not lat or lat.get("end_to_end") is not None:
            return
        if self.latency_stage.original is None or self.latency_stage.feeds is None:
            return
        lat["end_to_end"] = self.latency_stage.end_to_end(str(path))
        self.report["notes"] = [n for n in self.report["notes"] if not n.startswith("end-to-end latency not measured")]

    def save(self, path: str | Path, inputs=None) -> None:
        """Write the model atomically (external data kept in external form), then check it.
        Neither file may be the source model, one of its data files or one of ``inputs``
        (a :class:`~sepify.fileio.Inputs`: the other files the caller read)."""
        from ..fileio import Inputs, save_model

        out = Path(path)
        guard = inputs if inputs is not None else Inputs()
        guard.add_model(self.source_path)
        guard.refuse(out)
        if save_model(self.model, out, self.external_data, source=self.source_path, inputs=guard):
            try:
                onnx.checker.check_model(str(out), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise RuntimeError(f"the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e
        self._record_output(out)

    def _record_output(self, out: Path) -> None:
        """The report names the written file and its size (the diff's "file size" row and the
        after-analysis, which were computed before there was a file)."""
        size = file_bytes(onnx.load(str(out), load_external_data=False), out)  # (its data file too)
        self.report["output"] = str(out)
        diff = self.report.get("diff")
        if diff:
            diff["new"]["path"], diff["new"]["file_size"] = str(out), size
            t = diff["totals"].get("file_size")
            if t is not None:
                a = t["old"]
                t["new"] = size
                t["delta"] = None if a is None else size - a
                t["pct"] = round(100.0 * (size - a) / a, 4) if a else None
                t["ratio"] = round(size / a, 6) if a else None
        after = self.report.get("after")
        if after and isinstance(after.get("model"), dict):
            after["model"]["path"], after["model"]["file_size"] = str(out), size


_QUANTIZED_CONVS = {"ConvInteger", "QLinearConv"}


# --- the command -----------------------------------------------------------------------------
def rewrite(
    source,
    options: RewriteOptions | None = None,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    timer=None,
    calibration=None,
    progress=None,
    **kwargs,
) -> RewriteResult:
    """Rewrite the eligible Convs of a model (path or ModelProto). Keyword arguments are
    :class:`RewriteOptions` fields (``rank=1``, ``energy=0.95``, ``orientation="auto"``...).

    ``calibration``: calibration data (a ``.npz`` path, a folder of ``.npz`` files, a mapping
    of stacked arrays or an iterable of ``{input_name: array}``; see :mod:`.data`): the
    factorization then minimises each layer's output error on it (:mod:`.calibrate`). Without
    it the rewrite is the weight-only SVD. ``progress``: called with a one-line message at each
    calibration step (the CLI prints them on a terminal's stderr).

    Returns the new ModelProto and the report. The source is never modified.

    ``timer``: what times models for ``objective="latency"`` / ``form="auto"`` (default: a
    :class:`sepify.rewrite.measure.OrtTimer` with ``threads``); any callable taking a list of
    :class:`~sepify.rewrite.measure.Variant` and returning one :class:`~sepify.rewrite.measure.Timing` each.
    """
    opts = options or RewriteOptions(**kwargs)
    if options is not None and kwargs:
        raise UsageError("pass either options or keyword options, not both")
    opts.validate()
    raw, path = read_model(source, load_external_data=False)
    base_dir = str(path.parent) if path else None
    from ..fileio import has_external_data

    external = has_external_data(raw)
    unnamed = _name_nodes(raw)
    # what the edit starts from: the model as read (nodes named as the analysis names them).
    # The analysis and the plan read a copy with model-local functions inlined and, for IR < 4,
    # without the initializers listed as inputs; the written model keeps both as they were.
    edit_base = raw
    if raw.functions or (raw.ir_version < 4 and len(raw.graph.input) > 0):
        edit_base = onnx.ModelProto()
        edit_base.CopyFrom(raw)
    if raw.functions:  # inlined here (not only in loading) so that the nodes it adds are named too
        from onnx import inliner

        try:
            _name_function_nodes(raw)  # edit_base keeps the functions as they are
            raw = inliner.inline_local_functions(raw)
        except Exception as e:  # noqa: BLE001 - a broken function body is a model error
            raise ModelError(f"{path or '<model>'}: cannot inline model-local functions: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        unnamed += _name_nodes(raw)
    calib = None
    if calibration is not None:
        from .data import load_calibration

        calib = load_calibration(calibration, raw, holdout=opts.holdout, seed=opts.calib_seed,
                                 input_shapes=input_shapes, dims=dims)
        dims = {**calib.dims, **(dims or {})}  # symbolic dims bound from the data
    # shapes come from a weightless copy: checker and shape inference never copy the weights
    loaded = load(weightless_copy(raw, label=str(path) if path else "<model>"), input_shapes=input_shapes, dims=dims,
                  copy=False, path=path)
    loaded.path, loaded.file_size = path, (file_bytes(raw, path) if path else None)  # (its data files too)
    if edit_base.functions:
        loaded.notes.insert(0, "model-local functions were inlined")
    old_ir = drop_initializer_inputs(raw)
    values = {k: (v if v is not None else 1) for k, v in loaded.symbols.items()}
    view = GraphView(loaded.model.graph, symbols=loaded.symbols, lost=loaded.lost)
    view.initializers.update((t.name, t) for t in raw.graph.initializer)  # weights are read from raw
    from ..cost.analysis import analyze_prepared

    def load_numeric(to=1):
        return load(weightless_copy(raw, label=str(path) if path else "<model>"), input_shapes=input_shapes, dims=dims,
                    copy=False, path=path, bind_unbound_to=to)

    # the one analysis analyze/check/diff report; first: it also validates the inferred shapes (a ModelError)
    before = analyze_prepared(loaded, load_numeric, view=view)
    # the layers' numbers take the analysis' stand-in values (1, or larger where the model has
    # negative sizes at 1: cost.analysis.stand_in_values)
    values = {k: before.symbols.get(k, {}).get("value", v) for k, v in values.items()}

    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    live = _live_nodes(view)
    numeric_view = None
    for idx, node in enumerate(view.nodes):
        if node.op_type in _QUANTIZED_CONVS:
            skipped.append(Skipped(node.name or f"{node.op_type}_{idx}",
                                   f"quantized ({node.op_type}): only float Convs are factorized"))
            continue
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        if idx not in live:  # nothing reads it: rewriting it would save nothing that runs
            skipped.append(Skipped(node.name or f"Conv_{idx}", "dead code: its output reaches no graph output "
                                                                "(left as it is)"))
            continue
        plan = plan_conv(loaded.model, view, idx, node, opts, base_dir, values)
        if plan == SHAPE_UNKNOWN and any(v is None for v in loaded.symbols.values()):
            # a spatial size derived from a free symbol (H after a stride: not a polynomial) is
            # lost to inference; the factorization needs only the weight, and the MACs take the
            # unbound symbols at 1, as the analysis numbers do
            if numeric_view is None:
                numeric = load_numeric()
                numeric_view = GraphView(numeric.model.graph, symbols=numeric.symbols, lost=numeric.lost)
                numeric_view.initializers.update(view.initializers)
            if len(numeric_view.nodes) == len(view.nodes):
                plan = plan_conv(numeric.model, numeric_view, idx, numeric_view.nodes[idx], opts, base_dir, values)
        if isinstance(plan, str):
            skipped.append(Skipped(node.name or f"Conv_{idx}", plan))
        else:
            candidates.append(plan)
    for node in view.nodes:  # convs inside If/Loop/Scan bodies are reported, not rewritten
        for _, sub in subgraphs(node):
            for g in all_graphs(sub):
                skipped.extend(Skipped(n.name or "Conv", f"inside a subgraph of {node.name or node.op_type} (not rewritten)")
                               for n in g.node if n.op_type == "Conv")

    _refuse_guessed_budget(opts, candidates, before)
    calibrator = None
    sensitivity_info = None
    if calib is not None:
        from threadpoolctl import threadpool_limits

        from .calibrate import Calibrator, materialize, providers_for

        calibrator = Calibrator(materialize(raw, base_dir), calib, rows=opts.calib_rows, seed=opts.calib_seed,
                                method=opts.calib_method, sequential=opts.sequential, threads=opts.threads,
                                progress=progress, cache_mb=opts.calib_cache_mb,
                                providers=providers_for(opts.providers), residual=opts.residual_target)
        with threadpool_limits(limits=1, user_api="blas"):  # see README (dependencies)
            sensitivity_info = _set_output_curves(candidates, opts, calibrator, before.totals.macs)
    choices = plan_ranks(candidates, opts, before.totals.macs) if opts.target_speedup is None else {}
    latency = None
    if opts.objective == "latency" or opts.form == "auto":  # the measure stage
        latency = _Latency(opts, timer, raw, path, external, loaded, values, calibrated=calibrator is not None)
        # --target-speedup times whole rewritten models between allocations: with the weight-SVD
        # factors (the shapes of the final fit; timing does not depend on the values)
        latency.builder = lambda choice: _timing_model(edit_base, raw, old_ir, candidates, choice, path)
        choices = latency.plan(candidates, view, choices)
    kept: list = []
    if calibrator is not None:
        chosen = []
        for c in candidates:
            ch = choices.get(c.node.name)
            if isinstance(ch, tuple):
                o, r = ch[0], ch[1]
                if c.saves(o, r) or opts.allow_increase:
                    chosen.append((c, o, r))
        if opts.refit_kept and opts.sequential and chosen:
            kept = _kept_convs(loaded.model, view, candidates, {c.node.name for c, _, _ in chosen}, live, opts,
                               base_dir)
        with threadpool_limits(limits=1, user_api="blas"):
            fitted = calibrator.fit(chosen, kept)

    # build: the edit is made on our private copy of the model as read (no bound input shapes,
    # no inferred value_info). Weights in external data stay there (the rewritten convs' were
    # read one by one above): the new model keeps referencing the untouched ones, and
    # RewriteResult.save streams them into its data file
    names = _Names(raw)
    replacements: list[Replacement] = []
    results: list[LayerResult] = []
    notes: list[str] = []
    for c in candidates:
        choice = choices.get(c.node.name)
        if choice is None:
            continue
        if isinstance(choice, str):
            skipped.append(Skipped(c.node.name, choice))
            continue
        orientation, rank, *chosen_form = choice
        sp = c.spectra[orientation]
        macs_after = sp.macs(rank, c.p_in, c.p_out)
        if not c.saves(orientation, rank) and not opts.allow_increase:
            skipped.append(Skipped(c.node.name, f"no saving at rank {rank} ({macs_after:,} >= {c.original_macs:,} MACs; --allow-increase to force)"))
            continue
        form = chosen_form[0] if chosen_form else (opts.form if opts.form != "auto" else "native")
        form = FAST_FORM[orientation] if form == "fast" else form
        form = form if rank > 1 else "native"
        fit = fitted[c.node.name] if calibrator is not None else None
        rep = build(c, orientation, rank, names, form=form, opset=_opset(raw),
                    factors=fit[:2] if fit is not None else None, bias=fit[2] if fit is not None else None)
        replacements.append(rep)
        new_nodes = rep.pair.names
        first, second = fit[:2] if fit is not None else sp.factors(rank)
        new_bias = fit[2] if fit is not None else c.bias
        results.append(LayerResult(
            name=c.node.name, orientation=orientation, rank=rank, max_rank=sp.max_rank,
            energy=float(sp.energy(rank)), rel_error=float(sp.rel_error(rank)),
            macs_before=c.original_macs, macs_after=int(macs_after),
            params_before=c.original_params, params_after=int(first.size + second.size + (new_bias.size if new_bias is not None else 0)),
            folded_batchnorm=(c.bn.name or "BatchNormalization") if c.bn is not None else None, new_nodes=new_nodes,
            form=form, latency=latency.layer(c.node.name) if latency else None,
            output_error_predicted=fit[3] if fit is not None else None,
            distortion_predicted=_distortion(c, orientation, rank),
            **_macs_formulas(c, sp, rank)))
    refits: list[dict] = []
    projections: dict[str, tuple] = {}  # recurrent input projections: measured in numpy (no tensor of the graph)
    if calibrator is not None and calibrator.refits:
        from .emit import refitted

        by_name = {k.node.name: k for k in kept}
        for name, (w, b, err, err0) in calibrator.refits.items():
            k = by_name[name]
            rep = refitted(k, w, b, names)
            replacements.append(rep)
            add = calibrator.residual_targets.get(name)
            recurrent = k.kind == "recurrent"
            refits.append({"name": name, "op_type": k.node.op_type,
                           "what": "input projection" if recurrent else "weights",
                           "output_error_before": err0, "output_error_predicted": err,
                           "output_error_measured": None, "output_error_at": add[0] if add else None,
                           "folded_batchnorm": (k.bn.name or "BatchNormalization") if k.bn is not None else None,
                           "tensor": None if recurrent else add[1] if add else rep.pair.nodes[0].output[0]})
            if recurrent:
                projections[("projection", name)] = (k.node.input[0], k.weight.reshape(k.weight.shape[0], -1),
                                     k.bias if k.bias is not None else np.zeros(k.weight.shape[0]),
                                     w.reshape(w.shape[0], -1), b)
    new = edit_base
    if (results or refits) and edit_base is not raw and not _top_level(edit_base, replacements):
        # a rewritten Conv is inside a model-local function: edit the inlined model
        new = raw
        if old_ir:
            new.ir_version = 4  # initializers are no longer listed as inputs
        notes.append("model-local functions were inlined in the rewritten model: a rewritten Conv was inside one")
    if results and not is_sorted(new.graph):  # the checker wants the order the loading sorted into
        topological_sort(new.graph, str(path or "<model>"))
        notes.append("the nodes were not in topological order: the rewritten model has them sorted")
    apply(new, replacements)  # in place: from here on ``raw`` may be the edited model
    _set_rewrite_metadata(new, opts, results)
    if not results:  # nothing rewritten: the model as it was, with the rewrite's metadata
        after = before
    else:
        def load_new(**numeric):
            light = weightless_copy(new)
            _name_function_nodes(light)  # inlined by the loading with the names the "before" has
            return load(light, input_shapes=input_shapes, dims=dims, copy=False, **numeric)

        try:  # checker and strict shape inference of the result, on a weightless copy
            new_loaded = load_new()
        except ModelError as e:  # a sepify bug, not a user error
            raise RuntimeError(f"the rewritten model fails validation: {e}") from e
        after = analyze_prepared(new_loaded, lambda to=1: load_new(bind_unbound_to=to))
    calib_info = None
    if calibrator is not None:
        from .calibrate import materialize

        residual = calibrator.residual_targets
        by_layer = {r.name: (c.bn.output[0] if c.bn is not None else c.node.output[0])
                    for r in results for c in candidates if c.node.name == r.name}
        for r in results:  # a residual target's errors are of the Add's output
            if r.name in residual:
                r.output_error_at = residual[r.name][0]
                by_layer[r.name] = residual[r.name][1]
        measured = calibrator.measure(materialize(new, base_dir),
                                      list(by_layer.values()) + [f["tensor"] for f in refits if f["tensor"]], projections)
        for r in results:
            r.output_error_measured = measured.get(by_layer[r.name])
        for f in refits:
            t = f.pop("tensor")
            f["output_error_measured"] = measured.get(t if t else ("projection", f["name"]))
        calib_info = {**calib.to_dict(), "rows_per_layer": opts.calib_rows, "method": opts.calib_method,
                      "sequential": opts.sequential, "seconds": {k: round(v, 3) for k, v in calibrator.seconds.items()},
                      "passes": dict(calibrator.passes), "providers": calibrator.providers,
                      "cache": calibrator.cache, "notes": calib.notes, "sensitivity": sensitivity_info}
    order = {n.name: i for i, n in enumerate(view.nodes)}
    skipped.sort(key=lambda s: order.get(s.name, len(order)))
    report = build_report(path, opts, before.to_dict(), after.to_dict(), results, skipped, calibration=calib_info)
    report["refitted"] = refits
    if refits:
        n_rec = sum(1 for f in refits if f["what"] == "input projection")
        what = " and ".join(x for x in (f"{len(refits) - n_rec} conv(s) left dense" if len(refits) > n_rec else "",
                                        f"the input projection of {n_rec} recurrent node(s)" if n_rec else "") if x)
        report["notes"].append(f"{what} were refitted to their original outputs on the calibration data (after the "
                               f"rewritten layers before them; MACs unchanged)")
    report["notes"].extend(notes)
    if latency is not None:
        report["latency"] = latency.report(new, external)
        report["notes"].extend(latency.notes)
    if unnamed:
        report["notes"].append(f"{unnamed} unnamed or duplicate-named node(s) were given unique names (Op_index / name_index)")
    if loaded.unused_dims:
        report["notes"].append(unused_dims_note(loaded.unused_dims, loaded.symbols))
    report["unused_dims"] = list(loaded.unused_dims)
    return RewriteResult(new, results, skipped, report, external, path, calib, latency_stage=latency)


def _timing_model(edit_base: onnx.ModelProto, raw: onnx.ModelProto, old_ir: bool, candidates: list[Candidate],
                  choice: dict, path) -> onnx.ModelProto:
    """The rewritten model of ``choice`` ({layer: (orientation, rank, form)}) with the weight-SVD
    factors, built as the final model is (a copy: the sources are not touched), for timing."""
    names = _Names(raw)
    reps = []
    for c in candidates:
        pick = choice.get(c.node.name)
        if isinstance(pick, tuple):
            o, r, form = pick
            reps.append(build(c, o, r, names, form=form if r > 1 else "native", opset=_opset(raw)))
    base = edit_base
    if reps and edit_base is not raw and not _top_level(edit_base, reps):
        base = raw
    new = onnx.ModelProto()
    new.CopyFrom(base)
    if base is raw and edit_base is not raw and old_ir:
        new.ir_version = 4
    if reps and not is_sorted(new.graph):
        topological_sort(new.graph, str(path or "<model>"))
    apply(new, reps)
    return new


class _Latency:
    """The measure stage: per-layer timings in context and choices (:mod:`.measure`), the passes
    of ``--target-speedup`` (whole rewritten models timed), end-to-end runs."""

    def __init__(self, opts: RewriteOptions, timer, raw: onnx.ModelProto, path, external: bool, loaded, values,
                 calibrated: bool = False):
        from . import measure

        self.opts, self.m = opts, measure
        self.timer = timer if timer is not None else measure.OrtTimer(opts.threads, clock=opts.clock)
        self.measurer = measure.LayerMeasurer(self.timer)
        self.opset = _opset(raw)
        self.notes: list[str] = []
        self.layers: dict = {}
        self.info: dict = {}
        self.external = external
        self.calibrated = calibrated
        self.builder = None  # choice -> the rewritten ModelProto (weight-SVD factors), for the passes
        self.passes: list[dict] = []
        self.best_pass: int | None = None
        # the original as onnxruntime runs it (from its file when its weights are external)
        self.original = str(path) if external and path else (None if external else raw.SerializeToString())
        unbound = sorted(k for k, v in loaded.symbols.items() if v is None)
        self.unbound = unbound
        shapes = {}
        inits = {i.name for i in loaded.model.graph.initializer}
        for inp in loaded.model.graph.input:
            if inp.name in inits or not inp.type.HasField("tensor_type"):
                continue
            dims = inp.type.tensor_type.shape.dim
            shapes[inp.name] = [d.dim_value if d.HasField("dim_value") else values.get(d.dim_param, 1) for d in dims]
        self.feeds = measure.feeds_for(loaded.model, shapes) if shapes or not loaded.model.graph.input else None
        self.values = values
        self.e2e_before: float | None = None

    def _spec(self, c: Candidate, view):
        from .plan import _attrs

        xs = view.shape(c.node.input[0])
        dims = []
        for axis, d in enumerate(xs):
            if isinstance(d, int):
                dims.append(d)
                continue
            if axis >= 2 and d in self.unbound:
                raise UsageError(f"--objective latency / --form auto time each layer at its input shape, but "
                                 f"{c.node.name}'s input has the unbound dimension {d!r}: bind it with --dim {d}=N "
                                 f"(or --input-shape)")
            dims.append(int(self.values[d]))
        return self.m.layer_spec(dims, c.weight, c.bias is not None, _attrs(c.node), self.opset)

    def _context(self, c: Candidate, view):
        y = c.bn.output[0] if c.bn is not None else c.node.output[0]
        return self.m.layer_context(view, c.node.input[0], y, self.values)

    def _model_seconds(self) -> float:
        if self.original is None or self.feeds is None:
            raise UsageError("--target-speedup needs the whole model timed, which is not possible for a model held in "
                             "memory with external data: pass its path")
        (t,) = self.timer([self.m.Variant("model", "original", self.original, self.feeds)])
        self.e2e_before = t.median
        return t.median

    def _time_choice(self, choice: dict) -> dict:
        model = self.builder(choice)
        return self.m.end_to_end(self.timer, self.original, model, self.feeds, choice=choice)

    def plan(self, candidates: list[Candidate], view, mac_choices: dict) -> dict:
        if self.unbound:
            self.notes.append(f"latency measured with unbound dimension(s) {', '.join(self.unbound)} at 1 "
                              f"(bind them with --dim for the shapes you deploy)")
        specs = {c.node.name: self._spec(c, view) for c in candidates}
        contexts = {c.node.name: self._context(c, view) for c in candidates}
        if self.opts.target_speedup is None:
            choices, self.layers = self.m.plan_latency(candidates, self.opts, specs, self.measurer, mac_choices,
                                                       contexts)
            return choices
        target = self.opts.target_speedup
        table = self.m.speedup_table(candidates, self.opts, specs, self.measurer, self._model_seconds, contexts)
        self.layers = table.lat
        need = table.total * (1.0 - 1.0 / target)  # seconds the rewrite must save end to end
        self.info.update({"model_before_s": table.total, "layers_before_s": table.keep_sum,
                          "saving_needed_s": need, "budget_s": table.keep_sum - need})
        if need <= 0:
            return {n: "kept: the target speed-up is met without rewriting it" for n in table.names}
        timeable = self.builder is not None and not self.external and self.original is not None and self.feeds is not None
        if not timeable and self.opts.latency_passes > 1:
            self.notes.append("one allocation, not checked end to end before writing: a model with external data is "
                              "timed whole from its saved file only")
        picks, self.passes, self.best_pass = self.m.reallocate(table, target, self.opts.latency_passes,
                                                               self._time_choice if timeable else None)
        self.info["predicted_s"] = table.total - table.saving(picks)
        return self.m.apply_picks(table, picks)

    def layer(self, name: str) -> dict | None:
        rec = self.layers.get(name)
        return rec.to_dict() if rec is not None and rec.chosen is not None else None

    def report(self, new: onnx.ModelProto, external: bool) -> dict:
        st = self.measurer.stats
        self.out = out = {
            "objective": self.opts.objective,
            "form": self.opts.form,
            **self.m.runtime_info(self.opts.threads, self.opts.clock),
            "min_gain": self.m.MIN_GAIN if self.opts.objective == "latency" else None,
            "layers": [{"name": n, "chosen": list(r.chosen) if r.chosen else None, **r.to_dict()}
                       for n, r in self.layers.items()],
            "measuring": {"seconds": st.seconds, "variants_timed": st.variants_timed, "cache_hits": st.cache_hits,
                          "distinct_layer_contexts": len(self.measurer.originals),
                          "bound": ("ranks 1.. of each orientation while cheaper in MACs than the original, at most "
                                    f"{self.m.MAX_RANKS}, stopping at the first rank no form of which is faster; "
                                    "each layer timed in its context; timings cached per layer shape and context"
                                    if self.opts.target_speedup is not None else
                                    "the rank the criterion chooses, each form, each layer timed in its context; "
                                    "timings cached per layer shape and context")},
            "end_to_end": None,
        }
        load, cores = out.get("load_average"), os.cpu_count() or 1
        if load and load[0] > cores and self.opts.clock == "wall":
            self.notes.append(f"the machine was busy while measuring (load average {load[0]:.1f} on {cores} CPU(s)): "
                              f"elapsed-time figures mostly measure the other jobs; --threads 1 --clock process "
                              f"measures this model's CPU time instead")
        chosen = [r for r in self.layers.values() if r.chosen is not None]
        out["layers_total"] = {"before_s": sum(r.original_s for r in self.layers.values()),
                               "after_s": sum((r.seconds if r.chosen else r.original_s) for r in self.layers.values()),
                               "rewritten": len(chosen)}
        if self.opts.target_speedup is not None:
            out["target_speedup"] = self.opts.target_speedup
            out.update({k: v for k, v in self.info.items()})
            out["latency_passes"] = self.opts.latency_passes
            out["passes"] = self.passes
            out["best_pass"] = self.best_pass + 1 if self.best_pass is not None else None
        if external or self.original is None or self.feeds is None:
            self.notes.append("end-to-end latency not measured: the rewritten model has external data (time the saved "
                              "model)")
            return out
        if self.best_pass is not None and not self.calibrated:
            # the model written is the best pass's model (the same factors): its timing is the figure
            e2e = dict(self.passes[self.best_pass]["end_to_end"])
            e2e["pass"] = self.best_pass + 1
            out["end_to_end"] = self._judge(e2e)
        else:
            out["end_to_end"] = self.end_to_end(new)
        if isinstance(self.timer, self.m.OrtTimer):
            out["optimized_graph"] = {"before": self.m.graph_summary(self.original, self.opts.threads),
                                      "after": self.m.graph_summary(new, self.opts.threads)}
        return out

    def end_to_end(self, new) -> dict:
        choice = {n: r.chosen for n, r in self.layers.items() if r.chosen is not None}
        return self._judge(self.m.end_to_end(self.timer, self.original, new, self.feeds, choice=choice))

    def _judge(self, e2e: dict) -> dict:
        """``target_met`` from the measured end-to-end speed-up of the model written, and the notes."""
        out = self.out
        if self.opts.target_speedup is None:
            return e2e
        x = self.opts.target_speedup
        out["target_met"] = e2e["speedup"] >= x
        passes = [p for p in self.passes if "measured_speedup" in p]
        for p in self.passes[:1]:
            if p.get("per_layer_note") and p["per_layer_note"] not in self.notes:
                self.notes.append(p["per_layer_note"])
        if not out["target_met"]:
            if passes:
                best = max(passes, key=lambda p: p["measured_speedup"])
                self.notes.append(
                    f"TARGET NOT MET: measured end to end, the model written is {e2e['speedup']:.3f}x faster than the "
                    f"original, below --target-speedup {x:g}, after {len(passes)} pass(es) (at most "
                    f"--latency-passes {self.opts.latency_passes}); it is the fastest model found (pass "
                    f"{best['pass']}, {best['measured_speedup']:.3f}x with the weight-SVD factors). Ask for more "
                    f"passes, or accept the speed-up the layers allow")
            else:
                self.notes.append(f"TARGET NOT MET: measured end-to-end speed-up {e2e['speedup']:.3f}x is below "
                                  f"--target-speedup {x:g} (one allocation from per-layer timings, not re-allocated)")
        if self.calibrated and self.best_pass is not None:
            p = self.passes[self.best_pass]
            if p.get("target_met") != out["target_met"]:
                self.notes.append(f"pass {p['pass']} (the same graph with weight-SVD factors) measured "
                                  f"{p['measured_speedup']:.3f}x and the calibrated model written {e2e['speedup']:.3f}x: "
                                  f"the graphs are the same, the difference is timing noise")
        return e2e


def _distortion(c: Candidate, orientation: str, rank: int) -> float | None:
    curves = getattr(c, "curves", None)
    if curves is None or curves.kind != "model" or orientation not in curves.additive:
        return None
    return float(curves.additive[orientation][rank - 1])


def _kept_convs(model, view, candidates: list[Candidate], rewritten: set[str], live: set[int], opts, base_dir) -> list:
    """The live top-level float Convs that stay dense (:class:`~sepify.rewrite.plan.Kept`):
    candidates not chosen, and Convs that are not candidates (1x1, depthwise, ...); and the
    input projections of the recurrent nodes (LSTM, GRU, RNN: ``plan.kept_recurrent``)."""
    from .plan import RECURRENT_GATES, Kept, kept_conv, kept_recurrent

    by_name = {c.node.name: c for c in candidates}
    out = []
    for idx, node in enumerate(view.nodes):
        if node.op_type in RECURRENT_GATES and idx in live:
            r = kept_recurrent(model, view, idx, node, opts, base_dir)
            if r is not None:
                out.append(r)
            continue
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or idx not in live or node.name in rewritten:
            continue
        c = by_name.get(node.name)
        if c is not None:
            out.append(Kept(c.node, c.index, c.weight, c.bias, c.group, c.bn))
            continue
        k = kept_conv(model, view, idx, node, opts, base_dir)
        if k is not None:
            out.append(k)
    return out


def _top_level(model: onnx.ModelProto, replacements) -> bool:
    """Are the replaced nodes all top-level nodes of ``model`` (not inside a model-local function)?"""
    nodes = {n.name: n for n in model.graph.node}
    return all(r.conv in nodes and nodes[r.conv].op_type in ("Conv", "LSTM", "GRU", "RNN")
               and nodes[r.conv].output[:1] == [r.conv_output]
               and (r.bn is None or r.bn in nodes) for r in replacements)


def _set_rewrite_metadata(new: onnx.ModelProto, opts: RewriteOptions, results) -> None:
    """``sepify.version`` and ``sepify.rewrite`` (the settings and every layer's choice) in the
    model's metadata_props, replacing the entries of an earlier rewrite; the others stay as they are."""
    entries = {"sepify.version": __version__,
               "sepify.rewrite": json.dumps({"settings": opts.to_dict(),
                                             "layers": {r.name: [r.orientation, r.rank] + ([r.form] if r.form != "native" else [])
                                                        for r in results}}, sort_keys=True)}
    stale = [k for k, p in enumerate(new.metadata_props) if p.key.startswith("sepify.")]
    for k in reversed(stale):
        del new.metadata_props[k]
    for key, value in entries.items():
        new.metadata_props.add(key=key, value=value)


def _diff(before: dict, after: dict, layers: list[LayerResult]) -> dict:
    """The layer-by-layer comparison, from the one diff engine (:mod:`sepify.diff`)."""
    from ..diff import compare

    mapping = {r.name: r.new_nodes for r in layers}
    extra = {r.name: {"orientation": r.orientation, "rank": f"{r.rank}/{r.max_rank}",
                      "energy kept": round(r.energy, 4), "rel. weight error": round(r.rel_error, 4)}
             for r in layers}
    if any(r.form != "native" or r.latency for r in layers):
        for r in layers:
            extra[r.name]["form"] = r.form
    for r in layers:
        if r.latency:
            extra[r.name]["ms before"] = round(r.latency["before_s"] * 1e3, 3)
            extra[r.name]["ms after"] = round(r.latency["after_s"] * 1e3, 3)
    for r in layers:
        if r.output_error_predicted is not None:
            extra[r.name]["out. error pred."] = round(r.output_error_predicted, 4)
            extra[r.name]["out. error meas."] = (round(r.output_error_measured, 4)
                                                 if r.output_error_measured is not None else None)
    return compare(before, after, mapping=mapping, extra=extra, positional=False).to_dict()


def build_report(path, opts: RewriteOptions, before: dict, after: dict, layers: list[LayerResult],
                 skipped: list[Skipped], verification: dict | None = None, calibration: dict | None = None) -> dict:
    tb, ta = before["totals"], after["totals"]

    def ratio(a, b):
        return (a / b) if b else None

    return {
        "schema": "sepify.rewrite/1",
        "sepify_version": __version__,
        "model": str(path) if path else None,
        "settings": opts.to_dict(),
        "totals": {
            "before": {k: tb[k] for k in ("macs", "flops", "params", "activation_peak_bytes", "macs_formula") if k in tb},
            "after": {k: ta[k] for k in ("macs", "flops", "params", "activation_peak_bytes", "macs_formula") if k in ta},
            "macs_ratio": ratio(ta["macs"], tb["macs"]),
            "params_ratio": ratio(ta["params"], tb["params"]),
            "rewritten": len(layers),
            "skipped": len(skipped),
        },
        "layers": [layer.to_dict() for layer in layers],
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
        "diff": _diff(before, after, layers),
        "verification": verification,
        "calibration": calibration,
        "notes": [],
        "before": before,
        "after": after,
    }



def _refuse_guessed_budget(opts: RewriteOptions, candidates: list[Candidate], before) -> None:
    """A MAC budget (``--target-macs`` / ``--target-ratio``) over layers whose positions depend
    on an unbound dimension other than a dynamic batch would be met at the stand-in value 1 only
    (a stride-32 map then weighs as much as the full-size one): refused, as ``sepify check``
    refuses to pass on that guess. Binding the dims changes only the planning: the written model
    keeps its symbolic dims."""
    if opts.target_macs is None and opts.target_ratio is None:
        return
    batch = {k for k, v in before.symbols.items() if v.get("batch")}
    free = sorted({s for c in candidates for p in (c.p_in_sym, c.p_out_sym) if p is not None for s in p.symbols}
                  - batch)
    if free:
        flag = "--target-macs" if opts.target_macs is not None else "--target-ratio"
        raise UsageError(f"{flag}: the MACs of the rewritable layers depend on the unbound dimension(s) "
                         f"{', '.join(free)}; bind them for the planning with "
                         + " ".join(f"--dim {k}=VALUE" for k in free)
                         + " (the written model keeps them symbolic)")


def _set_output_curves(candidates: list[Candidate], opts: RewriteOptions, calibrator, total_macs: int,
                       base_model=None) -> dict | None:
    """With calibration data every rank policy reads PREDICTED relative OUTPUT errors
    (``Candidate.curves``, from the phase-1 statistics) instead of weight errors; the phase-1
    pass is skipped when the policy needs no curve (``--rank`` in one fixed orientation).

    Under a budget (``--target-macs/--target-ratio/--target-speedup``) with ``sensitivity ==
    "measured"`` the additive errors the allocator sums are the measured distortions of the
    model's outputs (:mod:`.sensitivity`). The curves and sensitivities are cached per model,
    data and settings (``opts.cache_dir``). Returns the report's ``sensitivity`` section (None
    when not measured)."""
    if (opts.target_macs is None and opts.target_ratio is None and opts.energy is None and opts.max_error is None
            and opts.orientation != "auto" and opts.target_speedup is None):
        return None
    from . import sensitivity as sens
    from .allocate import ErrorCurves

    if opts.target_macs is not None or opts.target_ratio is not None:
        plan_ranks(candidates, opts, total_macs)  # an unreachable budget fails before the onnxruntime passes
    budget = opts.target_macs is not None or opts.target_ratio is not None or opts.target_speedup is not None
    measured = budget and opts.sensitivity == "measured"
    cache = None
    if opts.cache:
        key = sens.cache_key(calibrator.model, calibrator.data, {
            "rows": opts.calib_rows, "seed": opts.calib_seed, "sensitivity_samples": opts.sensitivity_samples,
            "distortion": opts.distortion, "ranks": list(opts.sensitivity_ranks),
            "candidates": sorted((c.node.name, sorted(c.spectra)) for c in candidates)})
        cache = sens.TableCache(sens.cache_dir(opts.cache_dir), key)
    tables = cache.load() if cache is not None else None
    names = {c.node.name for c in candidates}
    if tables is not None and set(tables.get("curves", {})) >= names and (
            not measured or set(tables.get("sensitivity", {})) >= names):
        curves = {n: {o: np.asarray(v, dtype=np.float64) for o, v in tables["curves"][n].items()} for n in names}
        layers = {n: sens.LayerSensitivity.from_dict(n, tables["sensitivity"][n]) for n in names} if measured else {}
        kinds = tables.get("kinds", {})
        sens_notes = []
        calibrator.progress("calibration: error curves and sensitivities from the cache")
    else:
        tables = None
        curves = calibrator.curves(candidates)
        layers, kinds, sens_notes = {}, {}, []
        if measured:
            import time as _time

            t0 = _time.perf_counter()
            samples = calibrator.data.holdout if len(calibrator.data.holdout) >= 4 else calibrator.data.fit
            samples = list(samples)[:opts.sensitivity_samples]
            got = sens.measure(calibrator.model, candidates, calibrator.phase1(candidates), curves, samples,
                               ranks=tuple(opts.sensitivity_ranks),
                               distortion=opts.distortion, threads=opts.threads, progress=calibrator.progress)
            kinds = got.pop("__kinds__", {})
            sens_notes = got.pop("__notes__", [])
            layers = got
            calibrator._time("sensitivity", t0)
        if cache is not None:
            cache.save({"curves": {n: {o: [float(x) for x in v] for o, v in per.items()} for n, per in curves.items()},
                        "sensitivity": {n: s.to_dict() for n, s in layers.items()}, "kinds": kinds})
    for c in candidates:
        per = curves[c.node.name]
        rel = {o: np.asarray(v, dtype=np.float64) for o, v in per.items()}
        if measured:
            c.curves = ErrorCurves("model", rel, sens.additive(layers[c.node.name], rel))
        else:
            c.curves = ErrorCurves("output", rel, {o: np.square(v) for o, v in rel.items()})
    if not measured and cache is None:
        return None
    info = {"mode": opts.sensitivity if budget else "none", "cache": None}
    if cache is not None:
        info["cache"] = {"path": str(cache.path) if cache.path else None, "hit": cache.hit, "notes": cache.notes}
    if measured:
        samples_used = min(opts.sensitivity_samples, len(calibrator.data.holdout) if len(calibrator.data.holdout) >= 4
                           else len(calibrator.data.fit))
        info.update({"samples": samples_used,
                     "from": "holdout" if len(calibrator.data.holdout) >= 4 else "fit",
                     "outputs": kinds, "layers": {n: s.to_dict() for n, s in layers.items()}, "notes": sens_notes})
    return info
