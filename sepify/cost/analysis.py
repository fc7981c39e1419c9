"""``sepify analyze``: per-layer MACs, FLOPs, parameters and activation sizes of a model.

One row per node that computes on activations (nodes that only build constants — weight
``DequantizeLinear``, ``Constant``, shape arithmetic on constants — are part of the weights, not
layers). Conventions are in ``docs/conventions.md``; cost formulas in :mod:`sepify.cost.costs`.

Symbolic dimensions: costs are computed as polynomials of the symbols left unbound; numbers
are reported with each unbound symbol set to 1 (the report names them), and totals also as a
formula (``4.09G·batch``). A Conv or pool over a symbolic height gives a *derived* dimension
(``⌈H/2⌉``, :mod:`sepify.model.symdims`), and costs stay exact formulas in those. Where a
symbolic dimension is still lost (an op no rule follows), the model is analyzed a second time
with the unbound symbols set to 1 for the numbers, and the formula is reported only where it is
exact.
"""

from __future__ import annotations

import contextlib
import gc

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import onnx

from .. import __version__
from ..errors import ModelError
from .costs import PARAM_ROLES, Cost, OpContext, Unknown, find_rule
from ..model.graph import GraphView, is_float, itemsize, static_numel, subgraphs, unique_node_names
from ..model.loading import LoadedModel, load
from ..model.validation import check_conv, check_inferred_shapes
from .symbolic import Num, Poly, add_terms, base_symbols, dim_poly, evaluate, formula
from ..units import human, human3

SCHEMA = "sepify.analysis/1"

_NO_ROLES: dict = {}
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "ConvInteger": 1, "QLinearConv": 3}


@dataclass(slots=True)
class Layer:
    index: int
    name: str
    op_type: str
    domain: str
    macs: int | None
    flops: int | None
    params: int
    buffers: int
    output_shapes: list
    output_bytes: int | None
    unknown: str | None = None  # reason the cost is unknown
    note: str = ""
    macs_formula: str | None = None
    flops_formula: str | None = None
    node_index: int | None = None  # position in the graph's node list (execution order)
    onnx_name: str | None = None  # the node's own name, when ``name`` is derived (unnamed/duplicate)
    live_bytes: int | None = None  # live activation bytes while this node runs (peak = the max)

    def to_dict(self) -> dict:
        d = {
            "index": self.index, "name": self.name, "op_type": self.op_type, "domain": self.domain,
            "macs": self.macs, "flops": self.flops, "params": self.params, "buffers": self.buffers,
            "output_shapes": self.output_shapes, "output_bytes": self.output_bytes,
            "unknown": self.unknown, "note": self.note, "node_index": self.node_index,
            "live_bytes": self.live_bytes,
        }
        if self.onnx_name is not None:
            d["onnx_name"] = self.onnx_name
        if self.macs_formula:
            d["macs_formula"] = self.macs_formula
        if self.flops_formula:
            d["flops_formula"] = self.flops_formula
        return d


@dataclass
class Totals:
    macs: int
    flops: int
    params: int
    buffers: int
    activation_peak_bytes: int
    activation_bytes: int
    unknown: int
    nodes: int
    param_bytes: int
    macs_formula: str | None = None
    flops_formula: str | None = None
    # the unknown nodes by cause (UNKNOWN_CAUSES), only the causes that occur
    unknown_causes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Analysis:
    """The result of :func:`analyze`: ``.layers``, ``.totals``, ``.to_dict()`` (the JSON)."""

    model: dict
    inputs: list[dict]
    symbols: dict[str, dict]
    layers: list[Layer]
    totals: Totals
    notes: list[str] = field(default_factory=list)
    activation_peak: dict | None = None  # where the peak is and the tensors live there
    unused_dims: list[str] = field(default_factory=list)  # ``dims`` names the model has no symbol for

    def to_dict(self, layers: bool = True) -> dict:
        """The JSON report (schema ``sepify.analysis/1``). ``layers=False``: the summary that
        budgets read (cheap on a large model): no ``by_op``, and ``layers`` holds only the
        heaviest layer by MACs and the layers of unknown cost."""
        if not layers:
            known = [x for x in self.layers if x.macs is not None]
            heaviest = max(known, key=lambda x: x.macs, default=None)
            keep = [x for x in self.layers if x is heaviest or x.unknown]
        return {
            "schema": SCHEMA,
            "sepify_version": __version__,
            "model": self.model,
            "inputs": self.inputs,
            "symbols": self.symbols,
            "totals": self.totals.to_dict(),
            **({"by_op": self.by_op()} if layers else {}),
            "layers": [layer.to_dict() for layer in (self.layers if layers else keep)],
            "activation_peak": self.activation_peak,
            "notes": self.notes,
        }

    def by_op(self) -> dict[str, dict]:
        """Totals per op type, in order of first appearance."""
        groups: dict[str, dict] = {}
        for layer in self.layers:
            key = layer.op_type if layer.domain in ("", "ai.onnx") else f"{layer.domain}.{layer.op_type}"
            g = groups.setdefault(key, {"count": 0, "macs": 0, "flops": 0, "params": 0, "unknown": 0})
            g["count"] += 1
            g["macs"] += layer.macs or 0
            g["flops"] += layer.flops or 0
            g["params"] += layer.params
            g["unknown"] += 1 if layer.unknown else 0
        return groups

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# --- the walk ---------------------------------------------------------------------------------
# A walked node is a plain tuple (cheap to make; there is one per node):
#   (node name, op, domain ("" for the default domain), cost or None, reason it is unknown or
#    None, params, buffers, note, output names, output shapes, output bytes)
# (the last two only when the walk is asked for them, see _Walker.walk; else None)
_Row = tuple


class _Walker:
    """Computes costs and parameter counts over a graph and its subgraphs."""

    def __init__(self, label: str = "<model>"):
        self.label = label  # the model, named in a ModelError
        self.counted: set[str] = set()  # constant tensors already counted (shared weights count once)
        self.param_bytes = 0
        self._sizes: dict = {}  # TensorInfo -> (elements, default role, bytes)
        self._sources: dict = {}  # computed constant -> the stored tensor(s) it is made from
        # nodes of unknown cost, those inside subgraphs counted one by one (not the If/Loop that
        # holds them; not those in an If branch that never runs): a figure for reports
        self.leaves = 0

    def _size(self, t) -> tuple[int | None, str, int]:
        """(elements, default role, bytes) of a constant of this type, once per distinct type."""
        try:
            return self._sizes[t]
        except KeyError:
            pass
        n = static_numel(t.shape)
        if n is None:
            out = (None, "none", 0)
        else:
            out = (n, "param" if is_float(t.dtype) and n > 1 else "none", int(n * (itemsize(t.dtype) or 0)))
        self._sizes[t] = out
        return out

    def _source(self, view: GraphView, name: str) -> tuple[str, ...]:
        """What a computed constant is made from: the stored tensors behind its data inputs
        (through ``DequantizeLinear``, ``Cast``, ``Transpose``, ``Sub``, ``Where``...; scales,
        zero points, shape vectors and scalars are not data), as the names of those tensors, so
        that each stored weight counts once however many nodes rebuild or combine it (two
        ``DequantizeLinear`` of one int8 weight; Swin's shifted-window mask, built at export time
        from a few small fills and a ``ConstantOfShape``, is not a 64x49x49 weight). ``Constant``
        outputs and constants made from no data (``ConstantOfShape``) are their own source."""
        key = self._sources.get(name)
        if key is not None:
            return key
        key = (name,)
        v = view
        while v is not None and name not in v.producer:
            v = v.outer
        if v is not None and name not in v.initializers:
            idx = v.producer[name]
            op = v.ops[idx]
            roles = PARAM_ROLES.get(op, _NO_ROLES)
            data: dict[str, None] = {}
            for i, n in enumerate(v.io[idx][0]):
                if not n or op == "Constant":
                    continue
                role = roles.get(i)
                if role is None:
                    t = v.tensor(n)
                    role = "param" if t is not None and t.shape is not None and self._size(t)[1] == "param" else "none"
                if role == "param":
                    data.update(dict.fromkeys(self._source(v, n)))
            if data:
                key = tuple(data)
        self._sources[name] = key
        return key

    def params_of(self, op: str, view: GraphView, ins: list[str]) -> tuple[int, int, str]:
        """Parameters and buffers among the constant inputs of a node (each constant counted once
        in the model), and a note on unusual ones."""
        roles = PARAM_ROLES.get(op, _NO_ROLES)
        params = buffers = 0
        notes = None
        top = view.outer is None
        const, info, counted, sizes = view.const, view.info, self.counted, self._sizes
        initializers = view.initializers
        for i, name in enumerate(ins):
            if not name or not (name in const if top else view.is_const(name)) or name in counted:
                continue
            t = info.get(name) or view.tensor(name)
            if t is None or t.shape is None:
                notes = (notes or []) + [f"constant {name!r} has unknown shape"]
                continue
            size = sizes.get(t) or self._size(t)
            n = size[0]
            if n is None:
                continue
            role = roles.get(i, size[1])
            if role == "none":
                continue
            if name not in initializers:  # a computed constant: counted by its stored sources
                fresh = [k for k in self._source(view, name) if k not in counted]
                if not fresh:
                    continue
                counted.update(fresh)
                if fresh != [name]:  # stored weights (expanded, tiled, cast, dequantized,
                    n = nbytes = 0  # combined...): their own elements are the parameters
                    for k in fresh:
                        st = view.tensor(k)
                        stored_size = (sizes.get(st) or self._size(st)) if st is not None and st.shape is not None else None
                        if stored_size is None or stored_size[0] is None:
                            n = None
                            break
                        n += stored_size[0]
                        nbytes += stored_size[2]
                    if n is None:  # a source of unknown size: the computed tensor's own
                        n = size[0]
                    else:
                        size = (n, size[1], nbytes)
            counted.add(name)
            if role == "param":
                params += n
                self.param_bytes += size[2]
            else:
                buffers += n
        w = _WEIGHT_INPUT.get(op)
        if w is not None and len(ins) > w and ins[w] and not (ins[w] in const or view.is_const(ins[w])):
            notes = (notes or []) + [f"weight {ins[w]!r} is not a constant"]
        return params, buffers, "; ".join(notes) if notes else ""

    def walk(self, view: GraphView, nbytes: "_Bytes | None" = None) -> list[_Row]:
        """One row per node that computes on activations, in graph order (hot: one pass, the
        common case of a node with no constant input skips the parameter count).

        ``nbytes`` (the main graph): also give each row its output shapes and bytes, and set
        ``self.peak`` to the peak of live activation bytes over the execution order, constants
        excluded. A tensor is live from its producer (graph inputs: from the start) to its last
        consumer (subgraph reads included); graph outputs stay live to the end; tensors of
        unknown size count 0. (Nodes that build constants are not rows: they read and make
        only constants, so they change nothing that is live.) ``self.trace`` then holds, per
        row, (node index, live bytes while the node runs: its inputs and outputs included), and
        ``self.peak_node`` the node index where the peak is first reached (None: no node, the
        graph inputs alone)."""
        rows = []
        append = rows.append
        const = view.const
        top = view.outer is None
        nodes = view.nodes
        report = nbytes is not None
        if report:
            info, of = view.info, nbytes.of
            last = view.last_use()
            keep = set(view.graph_outputs)
            sizes: dict[str, int] = {}
            pop = sizes.pop
            live = 0
            for name in view.graph_inputs:
                if name not in const:
                    sizes[name] = nbytes(name) or 0
                    live += sizes[name]
            peak = live
            peak_node = None
            trace = self.trace = []
            trace_append = trace.append
        shapes = out_bytes = None
        for idx, ((ins, outs, sub), op, domain, node, name) in enumerate(
                zip(view.io, view.ops, view.domains, nodes, view.names)):
            for o in outs:
                if o and o not in const:
                    break
            else:
                if outs:
                    continue  # builds a constant: part of the weights, not a layer
            if op in _WEIGHT_INPUT or not const.isdisjoint(ins) or (not top and any(n and view.is_const(n) for n in ins)):
                params, buffers, note = self.params_of(op, view, ins)
            else:
                params = buffers = 0
                note = ""
            if op == "Conv" and not domain:  # validation, in this one pass over the nodes
                check_conv(node, view, ins, outs, self.label)
            if report:  # output shapes and bytes; liveness
                shapes = []
                out_bytes = 0
                for o in outs:
                    if not o:
                        continue
                    t = info.get(o) or view.tensor(o)
                    shapes.append(list(t.shape) if t is not None and t.shape is not None else None)
                    b = of(t)
                    out_bytes = None if b is None or out_bytes is None else out_bytes + b
                    if o not in const:
                        b = sizes[o] = b or 0
                        live += b
                if live > peak:
                    peak = live
                    peak_node = idx
                trace_append((idx, live))
                for n in ins:
                    if n in sizes and last[n] == idx and n not in keep:
                        live -= pop(n)
                for o in outs:
                    if o not in last and o in sizes and o not in keep:
                        live -= pop(o)
            try:
                if sub:
                    cost, sub_note, sub_params, sub_buffers = self.control_flow(node, view)
                    params += sub_params
                    buffers += sub_buffers
                    note = "; ".join(x for x in (note, sub_note) if x)
                else:
                    rule = find_rule(domain, op)
                    if rule is None:
                        raise Unknown(f"no cost rule for {domain + '.' if domain else ''}{op}")
                    cost = rule(OpContext(node, view, ins, outs))
                    if cost.note:
                        note = "; ".join(x for x in (note, cost.note) if x)
                append((name, op, domain, cost, None, params, buffers, note, outs, shapes, out_bytes))
            except Unknown as e:
                if sub:  # the weights read inside the subgraphs count even when a cost is unknown
                    params += getattr(e, "params", 0)
                    buffers += getattr(e, "buffers", 0)
                if not getattr(e, "nested", False):
                    self.leaves += 1
                append((name, op, domain, None, str(e), params, buffers, note, outs, shapes, out_bytes))
            except (ValueError, TypeError, ZeroDivisionError, IndexError, KeyError) as e:
                self.leaves += 1
                append((name, op, domain, None, f"malformed node ({type(e).__name__}: {e})", params, buffers, note, outs,
                        shapes, out_bytes))
        if report:
            self.peak = peak
            self.peak_node = peak_node
        return rows

    def _sub(self, graph: onnx.GraphProto, view: GraphView) -> tuple[Num, Num, int, int, list[str]]:
        sub = GraphView(graph, outer=view)
        check_inferred_shapes(sub, self.label)  # names and negative dims, as for the main graph
        rows = self.walk(sub)
        macs: Num = 0
        flops: Num = 0
        params = buffers = 0
        unknown = []
        for name, op, _, cost, reason, p, b, *_ in rows:
            params += p
            buffers += b
            if cost is None:
                unknown.append(f"{name or op}: {reason}")
            else:
                macs = macs + cost.macs
                flops = flops + cost.flops
        return macs, flops, params, buffers, unknown

    def control_flow(self, node: onnx.NodeProto, view: GraphView) -> tuple[Cost, str, int, int]:
        op = node.op_type
        subs, leaves = {}, {}
        for name, g in subgraphs(node):
            before = self.leaves
            subs[name] = self._sub(g, view)
            leaves[name] = self.leaves - before
        params = sum(s[2] for s in subs.values())
        buffers = sum(s[3] for s in subs.values())
        # an If whose condition the shapes decide (shape resolution, :mod:`sepify.model.shapes`)
        # runs one branch: the other's costs are never paid (its constants are still stored)
        taken = getattr(view.lost, "taken", {}).get(node.output[0]) if op == "If" and node.output else None
        if taken not in subs:
            taken = None
        else:
            self.leaves -= sum(n for name, n in leaves.items() if name != taken)
        unknown = [u for name, s in subs.items() if taken is None or name == taken for u in s[4]]
        if unknown:
            e = Unknown(f"subgraph nodes of unknown cost: {'; '.join(unknown[:3])}")
            e.params, e.buffers, e.nested = params, buffers, True
            raise e
        if taken is not None:
            s = subs[taken]
            other = next(name for name in subs if name != taken)
            return Cost(s[0], s[1]), f"If: the shapes decide the condition: {taken} runs ({other} never does)", params, buffers
        if op == "If" and len(subs) == 2:
            (n1, s1), (n2, s2) = subs.items()
            v1, v2 = evaluate(s1[0], {}), evaluate(s2[0], {})
            f1, f2 = evaluate(s1[1], {}), evaluate(s2[1], {})
            name, s = ((n1, s1), (n2, s2))[0 if (v1, f1) >= (v2, f2) else 1]
            other = n2 if name == n1 else n1
            other_macs = v2 if name == n1 else v1
            return Cost(s[0], s[1]), f"If: {name} is costlier (counted); {other} has {human(other_macs)} MACs", params, buffers
        if op == "Loop":
            body = subs["body"]
            trips = None
            if node.input and node.input[0]:
                val = view.const_value(node.input[0])
                if val is not None and val.size == 1:
                    trips = int(val.reshape(()))
            if trips is None and node.output:  # computed from shapes (shape resolution)
                t = getattr(view.lost, "taken", {}).get(node.output[0])
                trips = t if t.__class__ is int else None
            if trips is None:
                return Cost(body[0], body[1]), "Loop: per iteration (trip count not constant)", params, buffers
            return Cost(body[0] * trips, body[1] * trips), f"Loop: {trips} iterations", params, buffers
        if op == "Scan":
            body = subs["body"]
            n_scan = OpContext(node, view).attr("num_scan_inputs", 0)
            n_state = len(node.input) - n_scan
            if n_scan <= 0:
                raise Unknown("Scan without scan inputs")
            axes = OpContext(node, view).attr("scan_input_axes") or [0] * n_scan
            shape = OpContext(node, view).in_shape(n_state)
            length = shape[axes[0] if axes[0] >= 0 else len(shape) + axes[0]]
            return Cost(body[0] * length, body[1] * length), "Scan: body x sequence length", params, buffers
        # any other op with subgraphs: sum of its subgraphs, once
        macs = sum((s[0] for s in subs.values()), 0)
        flops = sum((s[1] for s in subs.values()), 0)
        rule = find_rule(node.domain, op)
        if rule is not None:
            c = rule(OpContext(node, view))
            macs, flops = macs + c.macs, flops + c.flops
        return Cost(macs, flops), f"{op}: subgraphs counted once", params, buffers


_MISSING = object()


class _Bytes:
    """Bytes of a tensor (symbols at their values), or None if unknown; computed once per
    distinct tensor type (tensors of one type share their :class:`~sepify.model.graph.TensorInfo`)."""

    def __init__(self, view: GraphView, values: Mapping[str, int]):
        self.view, self.values, self.cache = view, values, {}

    def __call__(self, name: str) -> int | None:
        t = self.view.info.get(name)
        if t is None:
            t = self.view.tensor(name)
        return self.of(t)

    def of(self, t) -> int | None:
        out = self.cache.get(t, _MISSING)
        if out is not _MISSING:
            return out
        out = None
        if t is not None and t.shape is not None:
            size = itemsize(t.dtype)
            n = 1
            for d in t.shape:
                if d.__class__ is int:
                    n *= d
                elif d in self.values:
                    n *= self.values[d]
                elif (p := dim_poly(d)) is not None:  # a derived dimension (⌈H/2⌉)
                    n *= p.evaluate(self.values)
                else:
                    n = None
                    break
            if n is not None and size is not None:
                out = int(n * size)
        self.cache[t] = out
        return out


def _shape_list(t) -> list | None:
    return list(t.shape) if t is not None and t.shape is not None else None


def analyze_loaded(loaded: LoadedModel, numeric: LoadedModel | None = None, view: GraphView | None = None,
                   numeric_at: Mapping[str, int] | None = None) -> Analysis:
    """Analyze a prepared model. ``numeric``: the same model with unbound symbols set to 1,
    used for the numbers of layers whose cost is not polynomial in the symbols (``numeric_at``:
    the values it gave them, when not 1). ``view``: the caller's view of ``loaded.model.graph``,
    if it has one."""
    model = loaded.model
    if view is None:
        view = GraphView(model.graph, symbols=loaded.symbols, lost=loaded.lost)
    check_inferred_shapes(view, loaded.label)
    graph_inputs = [vi for vi in model.graph.input if vi.name not in view.const]
    input_shapes = {vi.name: _shape_list(view.tensor(vi.name)) for vi in graph_inputs}
    batch = _batch_symbols(loaded.symbols, input_shapes.values())
    if numeric is None:
        values, stand_in = stand_in_values(view, loaded.symbols, _leading_symbols(loaded.symbols, input_shapes.values()))
    else:  # (the numeric pass's values; its stand-in is the non-batch one)
        at = numeric_at or {}
        values = {k: (v if v is not None else at.get(k, 1)) for k, v in loaded.symbols.items()}
        stand_in = max(at.values(), default=1)
    unbound = sorted(k for k, v in loaded.symbols.items() if v is None)
    walker = _Walker(loaded.label)
    nbytes = _Bytes(view, values)
    rows = walker.walk(view, nbytes)
    peak = walker.peak
    trace, peak_at = walker.trace, (view, nbytes, walker.peak_node)

    numeric_rows = None
    if numeric is not None:  # the peak too is measured on the numeric view: it has every size
        numeric_view = GraphView(numeric.model.graph, symbols=numeric.symbols, lost=numeric.lost)
        numeric_walker = _Walker(loaded.label)
        numeric_bytes = _Bytes(numeric_view, values)
        numeric_rows = numeric_walker.walk(numeric_view, numeric_bytes)
        peak = numeric_walker.peak
        peak_at = (numeric_view, numeric_bytes, numeric_walker.peak_node)
        if len(numeric_rows) != len(rows):
            numeric_rows = None
        else:
            trace = [(i, b) for (i, _), (_, b) in zip(trace, numeric_walker.trace)]
    names, originals = unique_node_names(view.names, view.ops)

    layers: list[Layer] = []
    tot_macs = tot_flops = 0  # the constant parts of the totals, and their symbolic terms:
    sym_macs: dict = {}  # (summed in place: adding Polys one layer at a time copies them)
    sym_flops: dict = {}
    formula_exact = True
    num_macs = num_flops = 0
    tot_params = tot_buffers = act_bytes = n_unknown = 0
    for i, (name, op, domain, cost, reason, params, buffers, note, outs, shapes, out_bytes) in enumerate(rows):
        macs_f = flops_f = None
        if cost is not None:
            macs, flops = cost.macs, cost.flops
            if macs.__class__ is not int or flops.__class__ is not int:  # symbolic (a Poly)
                macs_f, flops_f = formula(macs, human3), formula(flops, human3)
                macs, flops = evaluate(macs, values), evaluate(flops, values)
                add_terms(sym_macs, cost.macs)
                add_terms(sym_flops, cost.flops)
            else:
                tot_macs += macs
                tot_flops += flops
            num_macs += macs
            num_flops += flops
        elif numeric_rows is not None and numeric_rows[i][3] is not None:
            formula_exact = False
            macs, flops = evaluate(numeric_rows[i][3].macs, {}), evaluate(numeric_rows[i][3].flops, {})
            num_macs += macs
            num_flops += flops
            reason = None
            note = "; ".join(x for x in (note, f"cost computed with unbound symbols = {stand_in} (not polynomial)") if x)
        else:
            macs = flops = None
        node_idx, live_b = trace[i]
        layers.append(Layer(i, names[node_idx], op, domain, macs, flops, params, buffers,
                            shapes, out_bytes, reason, note, macs_f, flops_f, node_idx,
                            originals.get(node_idx), live_b))
        tot_params += params
        tot_buffers += buffers
        if out_bytes:
            act_bytes += out_bytes
        if reason:
            n_unknown += 1

    totals = Totals(
        macs=num_macs, flops=num_flops,
        params=tot_params, buffers=tot_buffers,
        activation_peak_bytes=peak,
        activation_bytes=act_bytes, unknown=n_unknown, nodes=len(view.nodes),
        param_bytes=walker.param_bytes,
        macs_formula=formula(Poly(sym_macs) + tot_macs, human3) if formula_exact else None,
        flops_formula=formula(Poly(sym_flops) + tot_flops, human3) if formula_exact else None,
    )
    notes = list(loaded.notes)
    derived = sum(1 for layer in layers if layer.onnx_name is not None)  # (constant-building nodes are no rows)
    if derived:
        notes.append(f"{derived} unnamed or duplicate-named node(s) are shown under derived names "
                     "(Op_index / name_index; the node's own name is in onnx_name)")
    if loaded.unused_dims:
        notes.append(unused_dims_note(loaded.unused_dims, loaded.symbols))
    if unbound and stand_in == 1:
        notes.append(UNBOUND_NOTE + ", ".join(unbound)
                     + " (bind them with --dim NAME=VALUE)")
    elif unbound:
        notes.append(f"unbound symbolic dimensions set to {stand_in} for the numbers (the smallest power of two "
                     f"at which the model has no empty or negative size; a dynamic batch stays 1): " + ", ".join(unbound) + " (bind them with --dim NAME=VALUE)")
        if not formula_exact:
            notes.append("some costs are not polynomial in the symbols (shape inference lost them); totals formula omitted")
    if totals.unknown:
        totals.unknown_causes, why = unknown_causes(layers)
        notes.append(f"{totals.unknown} node(s) of unknown cost are not included in the totals: " + "; ".join(why))
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    affects = _affects(unbound, sym_macs, sym_flops, formula_exact and numeric is None, input_shapes.values(), layers,
                       set(loaded.symbols))
    return Analysis(
        model={
            "path": str(loaded.path) if loaded.path else None, "file_size": loaded.file_size,
            "ir_version": model.ir_version, "opsets": opsets, "producer": model.producer_name,
            "graph": model.graph.name,
        },
        inputs=[{"name": vi.name, "shape": input_shapes[vi.name],
                 "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} for vi in graph_inputs],
        symbols={k: {"value": values[k], "bound": v is not None,
                     **({"batch": k in batch, "affects": affects[k]} if v is None else {})}
                 for k, v in sorted(loaded.symbols.items())},
        layers=layers, totals=totals, notes=notes, unused_dims=list(loaded.unused_dims),
        activation_peak=_peak_tensors(*peak_at, peak, names, layers),
    )


#: why a node's cost is unknown, as ``totals.unknown_causes`` counts them
UNKNOWN_CAUSES = ("data-dependent size", "no cost rule", "shape not inferred", "malformed node")
_DATA_DEPENDENT = "its size depends on the input values ("


def unknown_causes(layers: Sequence[Layer]) -> tuple[dict[str, int], list[str]]:
    """The unknown layers by cause — a size that depends on the input values (after NonZero,
    Unique, TopK with a computed k...: no static analysis can give it), an op with no cost rule,
    a shape inference could not resolve, a malformed node — and a phrase for each cause that
    occurs, naming where (the op that makes the size data-dependent, the ops without a rule). An
    If/Loop/Scan whose body holds unknown nodes goes by the first reason inside it."""
    counts: dict[str, int] = {}
    where: dict[str, dict[str, None]] = {}
    for layer in layers:
        reason = layer.unknown
        if not reason:
            continue
        if _DATA_DEPENDENT in reason:
            cause = "data-dependent size"
            at = reason.split(_DATA_DEPENDENT, 1)[1].split(")", 1)[0]
        elif "no cost rule for " in reason:
            cause = "no cost rule"
            at = reason.split("no cost rule for ", 1)[1].split(";", 1)[0].split(" ", 1)[0]
        elif reason.startswith("malformed node"):
            cause, at = "malformed node", layer.name
        else:
            cause, at = "shape not inferred", ""
        counts[cause] = counts.get(cause, 0) + 1
        if at:
            where.setdefault(cause, {})[at] = None
    words = {"data-dependent size": "with a size that depends on the input values (after {})",
             "no cost rule": "of an op with no cost rule ({})",
             "shape not inferred": "with a shape shape inference could not resolve",
             "malformed node": "malformed ({})"}
    phrases = []
    for cause in UNKNOWN_CAUSES:
        if cause in counts:
            names = list(where.get(cause, {}))
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            phrases.append(f"{counts[cause]} " + words[cause].format(listed))
    return {c: counts[c] for c in UNKNOWN_CAUSES if c in counts}, phrases


UNUSED_DIMS_NOTE = "dims not in the model, ignored: "


def unused_dims_note(unused: Sequence[str], symbols: Mapping[str, object]) -> str:
    """The note for ``--dim`` names a model has no symbol for (every command words it so)."""
    have = sorted(symbols)
    return (UNUSED_DIMS_NOTE + ", ".join(unused)
            + (f" (its symbolic dimensions: {', '.join(have)})" if have else " (it has no symbolic dimensions)"))
UNBOUND_NOTE = "unbound symbolic dimensions set to 1 for the numbers: "
UNBOUND_NOTE_PREFIX = "unbound symbolic dimensions set to "


def stand_in_values(view: GraphView, symbols: Mapping[str, int | None], batch: set[str]) -> tuple[dict, int]:
    """The values the numbers take for unbound symbols: 1, unless some derived dimension
    (``⌈H/2⌉ - 3``) is negative there — a model that cannot run at that size — then the
    smallest power of two (2..1024) at which every one is positive (the model runs), for every
    unbound symbol but a batch (``batch``: the first dim of an input, which stays 1). Returns
    (values, the stand-in used)."""
    base = {k: (v if v is not None else 1) for k, v in symbols.items()}
    polys = {dim_poly(d) for t in view.distinct_infos() if t.shape for d in t.shape
             if d.__class__ is str and d not in symbols}
    polys.discard(None)
    if not polys or all(p.evaluate(base) >= 0 for p in polys):
        return base, 1
    for size, at in _larger_stand_ins(symbols, batch):
        values = {**base, **at}
        if all(p.evaluate(values) >= 1 for p in polys):
            return values, size
    return base, 1


def _larger_stand_ins(symbols: Mapping[str, int | None], leading: set[str]):
    """The stand-ins tried where 1 does not do: for each power of two 2..1024, that value for
    every unbound symbol but the ``leading`` ones (a batch), which stay 1."""
    for size in (2 ** i for i in range(1, 11)):
        yield size, {k: (1 if k in leading else size) for k, v in symbols.items() if v is None}


#: the quantities of a report that can depend on a dimension (``sepify check`` budgets them)
SHAPE_QUANTITIES = ("macs", "flops", "layer_macs", "activation_peak")


def _affects(unbound: list[str], sym_macs: dict, sym_flops: dict, exact: bool, input_shapes, layers,
             bound_names: set[str] = frozenset()) -> dict[str, list[str]]:
    """For each unbound symbol, the quantities its value changes (``SHAPE_QUANTITIES`` order).

    MACs and FLOPs (and so the heaviest layer's MACs): the symbols of their polynomial terms;
    where a cost is not polynomial (shape inference lost a symbol), every unbound symbol.
    Activation peak: a symbol in the shape of a graph input or of any layer output, and every
    unbound symbol when some shape was lost. Params, file size and unknown nodes never change."""
    in_macs = {base for mono in sym_macs for sym, _ in mono for base in base_symbols(sym)}
    in_flops = {base for mono in sym_flops for sym, _ in mono for base in base_symbols(sym)}
    in_shapes: set[str] = set()
    unbound_set = set(unbound) | bound_names
    lost = not exact
    for shape in input_shapes:
        if shape is None:
            lost = True
            continue
        in_shapes.update(d for d in shape if d.__class__ is str)
    for layer in layers:
        for shape in layer.output_shapes or ():
            if shape is None:
                continue
            for d in shape:
                if d.__class__ is str:
                    derived = dim_poly(d)
                    if derived is not None:  # (⌈H/2⌉: sepify.model.symdims)
                        in_shapes.update(derived.symbols)
                        continue
                    in_shapes.add(d)
                    if d not in unbound_set:  # a dimension shape inference named itself (unk__0): lost
                        lost = True
                elif d is None:
                    lost = True
    out = {}
    for k in unbound:
        macs = lost or k in in_macs
        q = {"macs": macs, "flops": lost or k in in_flops, "layer_macs": macs, "activation_peak": lost or k in in_shapes}
        out[k] = [name for name in SHAPE_QUANTITIES if q[name]]
    return out


def _leading_symbols(symbols: Mapping[str, int | None], input_shapes) -> set[str]:
    """Symbols that are the first dimension of some input of rank >= 2 (a batch, even where the
    model also uses it elsewhere, as a recurrent state's batch axis): they stay 1 when the
    stand-in value of the other symbols is raised (:func:`stand_in_values`)."""
    return {d for shape in input_shapes for axis, d in enumerate(shape or ())
            if axis == 0 and d.__class__ is str and len(shape) >= 2 and d in symbols}


def _batch_symbols(symbols: Mapping[str, int | None], input_shapes) -> set[str]:
    """Symbols that are a batch dimension: they appear in the graph inputs' shapes only as the
    first dimension of an input of rank >= 2 (``N`` of ``N x C x H x W``), nowhere else."""
    first: set[str] = set()
    other: set[str] = set()
    for shape in input_shapes:
        for axis, d in enumerate(shape or ()):
            if d.__class__ is str:
                (first if axis == 0 and len(shape) >= 2 else other).add(d)
    return {k for k in first - other if k in symbols}


def _peak_tensors(view: GraphView, nbytes: "_Bytes", peak_node: int | None, peak: int, names: list[str],
                  layers: list[Layer]) -> dict:
    """Where the activation peak is (the first node reaching it) and the tensors live there:
    the same liveness as :meth:`_Walker.walk` (a tensor is live from its producer to its last
    reader; graph outputs to the end; an output nobody reads only while its node runs), replayed
    for one node. Sorted by bytes, largest first."""
    const, last, keep = view.const, view.last_use(), set(view.graph_outputs)
    at = peak_node if peak_node is not None else -1
    row = {x.node_index: x for x in layers}
    tensors = []

    def add(name: str, producer: int | None) -> None:
        end = len(view.nodes) if name in keep else last.get(name, producer if producer is not None else -1)
        if end >= at:
            tensors.append({"name": name, "bytes": nbytes(name) or 0,
                            "producer": row[producer].name if producer in row else None})

    for name in view.graph_inputs:
        if name not in const:
            add(name, None)
    for idx in range(at + 1):
        for o in view.io[idx][1]:
            if o and o not in const:
                add(o, idx)
    tensors.sort(key=lambda t: -t["bytes"])
    layer = row.get(peak_node)
    return {"bytes": peak, "layer": layer.name if layer else None, "index": layer.index if layer else None,
            "tensors": tensors}


def analyze(
    source,
    input_shapes: Mapping[str, Sequence[int | str]] | None = None,
    dims: Mapping[str, int] | None = None,
    *,
    shape_words: Mapping[str, str] | None = None,
    bind_hint: str | None = None,
) -> Analysis:
    """Analyze a model file (path) or an ``onnx.ModelProto``; see :class:`Analysis`.

    ``input_shapes``: ``{"images": [1, 3, 640, 640]}`` overrides input shapes;
    ``dims``: ``{"batch": 8}`` binds symbolic dimensions everywhere. A ``dims`` name the model
    has no symbol for is ignored, with a note (and listed in ``Analysis.unused_dims``).

    When the model is invalid only with its unbound symbols at the stand-in value 1 (a 1x1
    image pooled below a kernel's size), the :class:`~sepify.errors.ModelError` names them and
    how to bind them (``bind_hint``, default: with --dim / --input-shape). ``shape_words``: how
    errors name each input's shape override (see :func:`~sepify.model.loading.bind_inputs`).
    """
    with no_gc():
        loaded = load(source, input_shapes=input_shapes, dims=dims, shape_words=shape_words)
        unbound = sorted(k for k, v in loaded.symbols.items() if v is None)
        try:
            return analyze_prepared(loaded, lambda to=1: load(source, input_shapes=input_shapes, dims=dims,
                                                              bind_unbound_to=to, shape_words=shape_words))
        except ModelError as e:
            if not unbound:
                raise
            hint = bind_hint or "bind them with --dim NAME=VALUE or --input-shape NAME=1x3x224x224"
            err = ModelError(f"{e} — with the unbound dimension(s) {', '.join(unbound)} set to 1; {hint}")
            err.unbound, err.reason = unbound, str(e)  # (for sepify check's own message)
            raise err from None


def analyze_prepared(loaded: LoadedModel, reload_numeric, view: GraphView | None = None) -> Analysis:
    """The one analysis every command reports (``analyze``, ``check``, ``diff``, and the
    before/after of ``rewrite``): the cost walk on ``loaded``, and when shape inference lost a
    symbolic dimension somewhere, a second load with the unbound symbols at 1
    (``reload_numeric(1)``, the same preparation with ``bind_unbound_to=1``) for the numbers the
    formulas cannot give; where the model is invalid at 1, at the smallest power of two it is
    valid at (``reload_numeric({symbol: value})``, a dynamic batch at 1). ``view``: the caller's
    view of ``loaded.model.graph``, if it has one."""
    if view is None:
        view = GraphView(loaded.model.graph, symbols=loaded.symbols, lost=loaded.lost)
    if not (any(v is None for v in loaded.symbols.values()) and view.loses_dims()):
        return analyze_loaded(loaded, None, view=view)
    try:
        return analyze_loaded(loaded, reload_numeric(1), view=view)
    except ModelError:
        # invalid at 1 (an STFT window longer than a 1-sample input): the smallest power of two
        # at which the model is valid, for every unbound symbol but a dynamic batch
        inputs = [_shape_list(view.tensor(vi.name)) for vi in loaded.model.graph.input if vi.name not in view.const]
        batch = _leading_symbols(loaded.symbols, inputs)
        if all(k in batch for k, v in loaded.symbols.items() if v is None):
            raise
        for _, at in _larger_stand_ins(loaded.symbols, batch):
            try:
                return analyze_loaded(loaded, reload_numeric(at), view=view, numeric_at=at)
            except ModelError:
                continue
        raise


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic garbage collector while building the analysis: it allocates a few
    objects per tensor and creates no reference cycles, and on a 50k-node graph the collector's
    repeated passes over the growing heap cost about a third of the analysis time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
