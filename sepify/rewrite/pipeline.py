"""The rewrite pipeline: plan -> allocate -> emit on one prepared model, then the report.

The math lives in :mod:`sepify.rewrite.factorize` (pure numpy) and in ``docs/rewrite.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import onnx

from .. import __version__
from ..errors import ModelError, UsageError
from ..model.graph import GraphView, all_graphs, subgraphs
from ..model.external import weightless_copy
from ..model.loading import load
from ..model.reading import drop_initializer_inputs, read_model
from .allocate import plan_ranks
from .emit import _Names, _build, _opset
from .options import RewriteOptions
from .plan import Candidate, Skipped, _live_nodes, _name_nodes, plan_conv


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)



@dataclass
class RewriteResult:
    """``model``: the rewritten ModelProto; ``report``: the diff report as a dict (JSON form).

    For a source with external data, the initializers the rewrite left untouched still
    reference the source's data files (relative to ``source_path``'s folder; their bytes are
    never loaded): :meth:`save` copies them into the new data file."""

    model: onnx.ModelProto
    layers: list[LayerResult]
    skipped: list[Skipped]
    report: dict
    external_data: bool = False
    source_path: Path | None = None

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


# --- the command -----------------------------------------------------------------------------
def rewrite(
    source,
    options: RewriteOptions | None = None,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    **kwargs,
) -> RewriteResult:
    """Rewrite the eligible Convs of a model (path or ModelProto). Keyword arguments are
    :class:`RewriteOptions` fields (``rank=1``, ``energy=0.95``, ``orientation="auto"``...).

    Returns the new ModelProto and the report. The source is never modified.
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
    # shapes come from a weightless copy: checker and shape inference never copy the weights
    loaded = load(weightless_copy(raw, label=str(path) if path else "<model>"), input_shapes=input_shapes, dims=dims,
                  copy=False, path=path)
    loaded.path, loaded.file_size = path, (path.stat().st_size if path else None)
    if raw.functions:
        from onnx import inliner

        raw = inliner.inline_local_functions(raw)
    old_ir = drop_initializer_inputs(raw)
    values = {k: (v if v is not None else 1) for k, v in loaded.symbols.items()}
    view = GraphView(loaded.model.graph, symbols=loaded.symbols)
    view.initializers.update((t.name, t) for t in raw.graph.initializer)  # weights are read from raw
    from ..cost.analysis import analyze_loaded

    before = analyze_loaded(loaded, view=view)  # first: it also validates the inferred shapes (a ModelError)

    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    live = _live_nodes(view)
    for idx, node in enumerate(view.nodes):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        if idx not in live:  # the graph cleanup after the edit removes it
            skipped.append(Skipped(node.name or f"Conv_{idx}", "dead code: its output reaches no graph output "
                                                                "(removed from the rewritten model)"))
            continue
        plan = plan_conv(loaded.model, view, idx, node, opts, base_dir, values)
        if isinstance(plan, str):
            skipped.append(Skipped(node.name or f"Conv_{idx}", plan))
        else:
            candidates.append(plan)
    for node in view.nodes:  # convs inside If/Loop/Scan bodies are reported, not rewritten
        for _, sub in subgraphs(node):
            for g in all_graphs(sub):
                skipped.extend(Skipped(n.name or "Conv", f"inside a subgraph of {node.name or node.op_type} (not rewritten)")
                               for n in g.node if n.op_type == "Conv")

    choices = plan_ranks(candidates, opts, before.totals.macs)

    # build
    import onnx_graphsurgeon as gs

    # our private copy, without bound input shapes or inferred value_info. Weights in external
    # data stay there (the rewritten convs' were read one by one above): the new model keeps
    # referencing the untouched ones, and RewriteResult.save streams them into its data file
    work = raw
    try:
        graph = gs.import_onnx(work)
    except UnicodeDecodeError as e:  # ONNX allows any bytes in a string attribute; graphsurgeon does not
        raise ModelError(f"{path or '<model>'}: cannot rewrite: a string attribute is not UTF-8 text "
                         f"({e.object[:40]!r}), which onnx-graphsurgeon cannot read") from None
    by_name = {n.name: n for n in graph.nodes}
    names = _Names(work)
    results: list[LayerResult] = []
    for c in candidates:
        choice = choices.get(c.node.name)
        if choice is None:
            continue
        if isinstance(choice, str):
            skipped.append(Skipped(c.node.name, choice))
            continue
        orientation, rank = choice
        sp = c.spectra[orientation]
        macs_after = sp.macs(rank, c.p_in, c.p_out)
        if macs_after >= c.original_macs and not opts.allow_increase:
            skipped.append(Skipped(c.node.name, f"no saving at rank {rank} ({macs_after:,} >= {c.original_macs:,} MACs; --allow-increase to force)"))
            continue
        form = opts.form if opts.form != "auto" and rank > 1 else "native"
        new_nodes = _build(graph, gs, by_name, c, orientation, rank, names, form=form, opset=_opset(work))
        first, second = sp.factors(rank)
        results.append(LayerResult(
            name=c.node.name, orientation=orientation, rank=rank, max_rank=sp.max_rank,
            energy=float(sp.energy(rank)), rel_error=float(sp.rel_error(rank)),
            macs_before=c.original_macs, macs_after=int(macs_after),
            params_before=c.original_params, params_after=int(first.size + second.size + (c.bias.size if c.bias is not None else 0)),
            folded_batchnorm=(c.bn.name or "BatchNormalization") if c.bn is not None else None, new_nodes=new_nodes,
            form=form))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    new = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(new, raw, opts, results)
    if old_ir:
        new.ir_version = 4  # initializers are no longer listed as inputs

    try:  # checker and strict shape inference of the result, on a weightless copy
        new_loaded = load(weightless_copy(new), input_shapes=input_shapes, dims=dims, copy=False)
    except ModelError as e:  # a sepify bug, not a user error
        raise RuntimeError(f"the rewritten model fails validation: {e}") from e
    after = analyze_loaded(new_loaded)
    order = {n.name: i for i, n in enumerate(view.nodes)}
    skipped.sort(key=lambda s: order.get(s.name, len(order)))
    report = build_report(path, opts, before.to_dict(), after.to_dict(), results, skipped)
    if unnamed:
        report["notes"].append(f"{unnamed} unnamed or duplicate-named node(s) were given unique names (Op_index / name_index)")
    return RewriteResult(new, results, skipped, report, external, path)


def _restore_model_fields(new: onnx.ModelProto, raw: onnx.ModelProto, opts: RewriteOptions, results) -> None:
    new.ir_version = raw.ir_version
    del new.opset_import[:]
    new.opset_import.extend(raw.opset_import)
    new.producer_name, new.producer_version = raw.producer_name, raw.producer_version
    new.domain, new.model_version, new.doc_string = raw.domain, raw.model_version, raw.doc_string
    new.graph.name = raw.graph.name
    del new.metadata_props[:]
    keep = [p for p in raw.metadata_props if not p.key.startswith("sepify.")]
    new.metadata_props.extend(keep)
    onnx.helper.set_model_props(new, {**{p.key: p.value for p in keep},
                                      "sepify.version": __version__,
                                      "sepify.rewrite": json.dumps({"settings": opts.to_dict(),
                                                                    "layers": {r.name: [r.orientation, r.rank] for r in results}},
                                                                   sort_keys=True)})


def _diff(before: dict, after: dict, layers: list[LayerResult]) -> dict:
    """The layer-by-layer comparison, from the one diff engine (:mod:`sepify.diff`)."""
    from ..diff import compare

    mapping = {r.name: r.new_nodes for r in layers}
    extra = {r.name: {"orientation": r.orientation, "rank": f"{r.rank}/{r.max_rank}",
                      "energy kept": round(r.energy, 4), "rel. weight error": round(r.rel_error, 4)}
             for r in layers}
    return compare(before, after, mapping=mapping, extra=extra, positional=False).to_dict()


def build_report(path, opts: RewriteOptions, before: dict, after: dict, layers: list[LayerResult],
                 skipped: list[Skipped], verification: dict | None = None) -> dict:
    tb, ta = before["totals"], after["totals"]

    def ratio(a, b):
        return (a / b) if b else None

    return {
        "schema": "sepify.rewrite/1",
        "sepify_version": __version__,
        "model": str(path) if path else None,
        "settings": opts.to_dict(),
        "totals": {
            "before": {k: tb[k] for k in ("macs", "flops", "params", "activation_peak_bytes")},
            "after": {k: ta[k] for k in ("macs", "flops", "params", "activation_peak_bytes")},
            "macs_ratio": ratio(ta["macs"], tb["macs"]),
            "params_ratio": ratio(ta["params"], tb["params"]),
            "rewritten": len(layers),
            "skipped": len(skipped),
        },
        "layers": [layer.to_dict() for layer in layers],
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
        "diff": _diff(before, after, layers),
        "verification": verification,
        "notes": [],
        "before": before,
        "after": after,
    }
