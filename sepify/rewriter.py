"""``sepify rewrite``: replace standard Conv nodes by depthwise + pointwise pairs.

Each rule follows the shape *check, then rewrite*: :func:`plan_conv` inspects one Conv and
returns either a :class:`Candidate` (with its SVD spectra) or the reason it is skipped;
:func:`_build` edits the graph (with onnx-graphsurgeon) for the chosen rank. The math lives in
:mod:`sepify.factorize` (pure numpy) and in ``docs/rewrite.md``.

Conv → BatchNormalization with constant statistics is folded before factorizing::

    s = gamma / sqrt(var + eps);   W' = W * s[:, None, ...];   b' = (b - mean) * s + beta

so the factorized kernel is what the deployed model computes and the BN node disappears.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from . import __version__
from .errors import BudgetError, ModelError, UsageError
from .rewrite.factorize import ORIENTATIONS, LayerChoice, Spectrum, allocate, spectrum
from .graph import GraphView, all_graphs, is_float, outer_inputs, subgraphs
from .loading import drop_initializer_inputs, load, read_model, weightless_copy

ORIENTATION_CHOICES = ORIENTATIONS + ("auto",)


@dataclass
class RewriteOptions:
    """How to choose ranks. Exactly one of rank / energy / max_error / target_* applies
    (rank=1 when none is given)."""

    rank: int | str | None = None  # an int, or "full"
    energy: float | None = None
    max_error: float | None = None
    target_macs: int | None = None
    target_ratio: float | None = None
    orientation: str = "dw-first"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    allow_increase: bool = False
    fold_batchnorm: bool = True

    def validate(self) -> None:
        chosen = [k for k in ("rank", "energy", "max_error", "target_macs", "target_ratio") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise UsageError(f"choose one rank criterion, not {' and '.join('--' + c.replace('_', '-') for c in chosen)}")
        if self.rank is not None and self.rank != "full" and (not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer or 'full', not {self.rank!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError("--energy must be in (0, 1]")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise UsageError("--max-error must be in [0, 1)")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise UsageError("--target-ratio must be in (0, 1]")
        if self.orientation not in ORIENTATION_CHOICES:
            raise UsageError(f"--orientation must be one of {', '.join(ORIENTATION_CHOICES)}")
        for p in list(self.include) + list(self.exclude):
            try:
                re.compile(p)
            except re.error as e:
                raise UsageError(f"invalid pattern {p!r}: {e}") from None

    @property
    def criterion(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.max_error is not None:
            return f"max-error {self.max_error}"
        if self.target_macs is not None:
            return f"target-macs {self.target_macs}"
        if self.target_ratio is not None:
            return f"target-ratio {self.target_ratio}"
        return f"rank {self.rank if self.rank is not None else 1}"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.__dict__.items()}


@dataclass
class Candidate:
    """An eligible Conv: its (possibly BN-folded) weight and spectra."""

    node: onnx.NodeProto
    index: int
    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    p_in: int  # batch x prod(input spatial)
    p_out: int  # batch x prod(output spatial)
    spectra: dict[str, Spectrum]
    bn: onnx.NodeProto | None = None
    original_macs: int = 0
    original_params: int = 0


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Skipped:
    name: str
    reason: str


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

    def save(self, path: str | Path) -> None:
        """Write the model atomically (external data kept in external form), then check it."""
        from .fileio import refuse_overwrite, save_model

        out = Path(path)
        refuse_overwrite(out, self.source_path)
        if save_model(self.model, out, self.external_data, source=self.source_path):
            try:
                onnx.checker.check_model(str(out), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise RuntimeError(f"the rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e


# --- weights ---------------------------------------------------------------------------------
def _const_array(model: onnx.ModelProto, view: GraphView, name: str, base_dir: str | None) -> np.ndarray:
    """The value of a constant tensor: an initializer, a Constant node's value, or evaluated from
    the constant-only nodes that compute it (with onnx's reference evaluator)."""
    init = view.initializer(name)
    if init is not None:
        return onnx.numpy_helper.to_array(init, base_dir or "")
    needed: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [name]
    inits: dict[str, onnx.TensorProto] = {}
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        i = view.initializer(t)
        if i is not None:
            inits[t] = i
            continue
        node = view.producer_node(t)
        if node is None:
            raise ValueError(f"constant {t!r} has no producer")
        if node not in needed:
            needed.append(node)
        stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(view.nodes)}
    needed.sort(key=lambda n: order[id(n)])
    from onnx.reference import ReferenceEvaluator

    tensors = []
    for t in inits.values():
        arr = onnx.numpy_helper.to_array(t, base_dir or "")
        tensors.append(onnx.numpy_helper.from_array(arr, t.name))
    g = onnx.helper.make_graph(needed, "const", [], [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)], tensors)
    m = onnx.helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return np.asarray(ReferenceEvaluator(m).run(None, {})[0])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def plan_conv(model, view: GraphView, idx: int, node: onnx.NodeProto, opts: RewriteOptions,
              base_dir: str | None, values: Mapping[str, int]) -> Candidate | str:
    """Check one Conv: a :class:`Candidate`, or the reason it is not rewritten."""
    name = node.name
    if opts.include and not _matches(name, opts.include):
        return "not matched by --include"
    if opts.exclude and _matches(name, opts.exclude):
        return "excluded by --exclude"
    if len(node.input) < 2 or not view.is_const(node.input[1]):
        return "weight is not a constant"
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias and not view.is_const(node.input[2]):
        return "bias is not a constant"
    wshape = view.shape(node.input[1])
    if wshape is None or not all(isinstance(d, int) for d in wshape) or not 3 <= len(wshape) <= 5:
        return "weight shape unknown or not 1-D/2-D/3-D"
    if not is_float(view.dtype(node.input[1])):
        return "weight is not floating point"
    attrs = _attrs(node)
    group = int(attrs.get("group", 1))
    n_out, c_per_group = wshape[0], wshape[1]
    kernel = wshape[2:]
    if _prod(kernel) == 1:
        return "1x1 kernel (already pointwise)"
    if c_per_group == 1 and group > 1:
        return "already depthwise (group == C_in)"
    xs, ys = view.shape(node.input[0]), view.shape(node.output[0])
    if xs is None or ys is None or len(ys) != len(wshape) or len(xs) != len(wshape):
        return "input or output shape unknown"

    def positions(shape):
        dims = [shape[0]] + list(shape[2:])
        out = 1
        for d in dims:
            if d is None or (isinstance(d, str) and d not in values):
                return None
            out *= d if isinstance(d, int) else values[d]
        return out

    p_in, p_out = positions(xs), positions(ys)
    if p_in is None or p_out is None:
        return "input or output shape unknown"
    try:
        weight = _const_array(model, view, node.input[1], base_dir)
        bias = _const_array(model, view, node.input[2], base_dir) if has_bias else None
    except Exception as e:  # noqa: BLE001 - an unreadable constant is a reason, not a crash
        return f"cannot read weight ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
    if tuple(weight.shape) != tuple(wshape):
        return f"weight shape {tuple(weight.shape)} disagrees with inferred {tuple(wshape)}"
    bn = None
    if opts.fold_batchnorm:
        bn = _foldable_bn(view, node)
        if bn is not None:
            try:
                folded = _fold_bn(model, view, bn, weight, bias, base_dir)
                if not all(np.all(np.isfinite(a)) for a in folded):
                    raise ValueError("folding gives NaN or infinite values")
                weight, bias = folded
            except Exception:  # noqa: BLE001 - leave unfoldable BN alone
                bn = None
    if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
        return "weight or bias contains NaN or infinite values"
    orientations = ORIENTATIONS if opts.orientation == "auto" else (opts.orientation,)
    spectra = {o: spectrum(weight, group, o) for o in orientations}
    original = n_out * c_per_group * _prod(kernel) * p_out
    return Candidate(node, idx, weight, bias, group, p_in, p_out, spectra, bn, original,
                     weight.size + (bias.size if bias is not None else 0))


def _foldable_bn(view: GraphView, node: onnx.NodeProto) -> onnx.NodeProto | None:
    out = node.output[0]
    users = view.consumers.get(out, [])
    if len(users) != 1 or out in view.graph_outputs:
        return None
    bn = view.nodes[users[0]]
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or bn.input[0] != out:
        return None
    if int(_attrs(bn).get("training_mode", 0)) != 0 or any(o for o in bn.output[1:]):
        return None
    if len(bn.input) < 5 or not all(view.is_const(i) for i in bn.input[1:5]):
        return None
    return bn


def _fold_bn(model, view, bn, weight, bias, base_dir):
    gamma, beta, mean, var = (_const_array(model, view, n, base_dir).astype(np.float64) for n in bn.input[1:5])
    eps = float(_attrs(bn).get("epsilon", 1e-5))
    with np.errstate(all="ignore"):  # a negative variance: NaN, and the caller does not fold
        s = gamma / np.sqrt(var + eps)
        w = (weight.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
        b0 = bias.astype(np.float64) if bias is not None else np.zeros_like(s)
        b = ((b0 - mean) * s + beta).astype(weight.dtype)
    return w, b


# --- rank choice -----------------------------------------------------------------------------
def _choose(c: Candidate, opts: RewriteOptions) -> tuple[str, int]:
    """(orientation, rank) for a per-layer criterion."""
    options = []
    for o, sp in c.spectra.items():
        if opts.energy is not None:
            r = sp.rank_for_energy(opts.energy)
        elif opts.max_error is not None:
            r = sp.rank_for_error(opts.max_error)
        elif opts.rank == "full":
            r = sp.max_rank
        else:
            r = min(int(opts.rank or 1), sp.max_rank)
        options.append((o, r, sp.rel_error(r), sp.macs(r, c.p_in, c.p_out)))
    if len(options) == 1:
        return options[0][0], options[0][1]
    if opts.energy is not None or opts.max_error is not None:
        # the criterion fixes the error: take the cheaper orientation
        best = min(options, key=lambda t: (t[3], t[2], ORIENTATIONS.index(t[0])))
    elif opts.rank == "full":
        # both are exact: take the cheaper
        best = min(options, key=lambda t: (round(t[2], 12), t[3], ORIENTATIONS.index(t[0])))
    else:
        # --rank r: the MACs of rank r in the cheaper orientation are the layer's budget; take
        # the lowest-error (orientation, rank) within it, so auto never costs more than the
        # cheaper fixed orientation and never has a larger error
        budget = min(t[3] for t in options)
        within = [(o, r, sp.rel_error(r), sp.macs(r, c.p_in, c.p_out))
                  for o, sp in c.spectra.items() for r in range(1, sp.max_rank + 1)
                  if sp.macs(r, c.p_in, c.p_out) <= budget]
        best = min(within, key=lambda t: (round(t[2], 12), t[3], ORIENTATIONS.index(t[0]), t[1]))
    return best[0], best[1]


# --- graph edit ------------------------------------------------------------------------------
class _Names:
    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = set()
        for g in all_graphs(model.graph):
            self.used.update(n.name for n in g.node)
            self.used.update(o for n in g.node for o in n.output)
            self.used.update(i.name for i in g.initializer)
            self.used.update(i.name for i in g.input)

    def make(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _build(graph, gs, by_name: dict, c: Candidate, orientation: str, rank: int, names: _Names) -> list[str]:
    """Replace the Conv (and its folded BN) in the gs graph by the two factor convs.
    ``by_name``: the gs nodes by name (every top-level node is named, see :func:`_name_nodes`)."""
    node = by_name[c.node.name]
    first_w, second_w = c.spectra[orientation].factors(rank)
    attrs = dict(node.attrs)
    spatial_attrs = {k: v for k, v in attrs.items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}
    nd = c.weight.ndim - 2
    point_attrs = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd), "dilations": [1] * nd}
    x = node.inputs[0]
    if c.bn is not None:
        bn = by_name[c.bn.name]
        y = bn.outputs[0]
        bn.outputs = []
        bn.inputs = []
    else:
        y = node.outputs[0]
    node.outputs = []
    node.inputs = []
    base = c.node.name or f"conv{c.index}"
    dtype = first_w.dtype
    mid = gs.Variable(names.make(f"{base}/{'depthwise' if orientation == 'dw-first' else 'pointwise'}_out"), dtype=dtype)
    bias = None
    if c.bias is not None:
        bias = gs.Constant(names.make(f"{base}/bias"), np.ascontiguousarray(c.bias.astype(dtype)))
    if orientation == "dw-first":
        n1 = f"{base}/depthwise"
        n2 = f"{base}/pointwise"
        w1 = gs.Constant(names.make(f"{n1}.weight"), np.ascontiguousarray(first_w))
        w2 = gs.Constant(names.make(f"{n2}.weight"), np.ascontiguousarray(second_w))
        a1 = dict(spatial_attrs, group=int(c.weight.shape[1] * c.group))
        a2 = dict(point_attrs, group=c.group)
    else:
        n1 = f"{base}/pointwise"
        n2 = f"{base}/spatial"
        w1 = gs.Constant(names.make(f"{n1}.weight"), np.ascontiguousarray(first_w))
        w2 = gs.Constant(names.make(f"{n2}.weight"), np.ascontiguousarray(second_w))
        a1 = dict(point_attrs, group=c.group)
        a2 = dict(spatial_attrs, group=int(c.weight.shape[0]))
    n1, n2 = names.make(n1), names.make(n2)
    graph.nodes.append(gs.Node("Conv", name=n1, attrs=a1, inputs=[x, w1], outputs=[mid]))
    graph.nodes.append(gs.Node("Conv", name=n2, attrs=a2, inputs=[mid, w2] + ([bias] if bias is not None else []), outputs=[y]))
    return [n1, n2]


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
    from .fileio import has_external_data

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
    from .analysis import analyze_loaded

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

    choices = _plan_ranks(candidates, opts, before.totals.macs)

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
        new_nodes = _build(graph, gs, by_name, c, orientation, rank, names)
        first, second = sp.factors(rank)
        results.append(LayerResult(
            name=c.node.name, orientation=orientation, rank=rank, max_rank=sp.max_rank,
            energy=float(sp.energy(rank)), rel_error=float(sp.rel_error(rank)),
            macs_before=c.original_macs, macs_after=int(macs_after),
            params_before=c.original_params, params_after=int(first.size + second.size + (c.bias.size if c.bias is not None else 0)),
            folded_batchnorm=(c.bn.name or "BatchNormalization") if c.bn is not None else None, new_nodes=new_nodes))
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


def _live_nodes(view: GraphView) -> set[int]:
    """Indices of the nodes whose outputs reach a graph output (subgraph reads included)."""
    live: set[int] = set()
    producer = view.producer
    stack = [producer[o] for o in view.graph_outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        ins, _, sub = view.io[i]
        stack.extend(producer[n] for n in (ins + outer_inputs(view.nodes[i]) if sub else ins) if n in producer)
    return live


def _name_nodes(model: onnx.ModelProto) -> int:
    """Give unnamed top-level nodes a name (``Conv_12``), and nodes whose name an earlier node
    already has a unique one (``conv_12``), so rows and rewrites can refer to them."""
    used = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    count = 0
    for i, n in enumerate(model.graph.node):
        if n.name and n.name not in seen:
            seen.add(n.name)
            continue
        base = f"{n.name or n.op_type}_{i}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        n.name = name
        used.add(name)
        seen.add(name)
        count += 1
    return count


def _plan_ranks(candidates: list[Candidate], opts: RewriteOptions, total_macs: int) -> dict:
    """Per layer (orientation, rank), or a reason string."""
    if opts.target_macs is None and opts.target_ratio is None:
        return {c.node.name: _choose(c, opts) for c in candidates}
    target = opts.target_macs if opts.target_macs is not None else int(total_macs * opts.target_ratio)
    if target >= total_macs:  # the original model fits: any rewrite would only add weight error
        return {c.node.name: "kept: the budget is met without rewriting it" for c in candidates}
    fixed = total_macs - sum(c.original_macs for c in candidates)
    budget = target - fixed
    if budget < 0:
        raise BudgetError(f"--target-macs {target:,} cannot be reached: the layers that cannot be rewritten alone cost {fixed:,} MACs")
    out: dict = {}
    usable = []
    for c in candidates:
        if any(sp.macs(1, c.p_in, c.p_out) < c.original_macs for sp in c.spectra.values()):
            usable.append(c)
        else:
            out[c.node.name] = "no saving even at rank 1"
    budget -= sum(c.original_macs for c in candidates if c not in usable)
    layers = [LayerChoice(c.node.name, c.spectra, c.p_in, c.p_out, next(iter(c.spectra.values())).norm_sq)
              for c in usable]
    try:
        plan, reached = allocate(layers, budget)
    except BudgetError as e:
        minimum = getattr(e, "minimum_macs", None)
        if minimum is None:
            raise BudgetError(f"--target-macs {target:,} cannot be reached: {e}") from None
        floor = minimum + (target - budget)  # + the convs and other layers that are not rewritten
        raise BudgetError(f"--target-macs {target:,} cannot be reached: the least the model can cost is {floor:,} MACs "
                          f"(every eligible conv at rank 1; {target - budget:,} of them in layers that are not rewritten)") from None
    for c in usable:
        choice = plan.get(c.node.name)
        out[c.node.name] = choice if choice is not None else "kept: the budget is met without rewriting it"
    return out


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
    from .diff import compare

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
