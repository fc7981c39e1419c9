"""Measure: latency of candidate rewrites in onnxruntime, each layer in its context.

What is timed
    For a layer (input shape, weight shape, bias, attributes, dtype, opset: a :class:`LayerSpec`)
    a small model of the original Conv and one of each candidate pair (orientation, rank, graph
    form, :mod:`sepify.rewrite.emit`), with random weights of the right shapes (timing does not
    depend on the values), in the layer's :class:`Context`: the element-wise chain its output
    feeds (activation, residual Add, ...) and stand-ins for an NCHWc producer / consumer, so that
    the fusions and layout reorders of the whole model are in the timing (:func:`layer_context`).
    onnxruntime's CPU provider with the optimization level a user deploys with (``ORT_ENABLE_ALL``,
    so the NCHWc transforms and fusions apply), the requested intra-op threads (``--threads``;
    default: onnxruntime's own choice) and ``log_severity_level = 3``.

How (:class:`OrtTimer`)
    Every variant is warmed up (2 runs after the session is built), then timed in interleaved
    rounds: each round times every variant once (the order rotates from round to round), a
    sample being ``n`` back-to-back runs (``n`` such that a sample lasts ~``sample_s``) divided by
    ``n``. Per variant: the median over rounds and the quartiles (the spread). A candidate is
    compared with the original by the median of the *per-round* ratios (paired samples, robust
    to a machine whose speed drifts); its cost in seconds is that ratio times the original's
    median over all its measurements.

Which candidates (the bound)
    - a per-layer criterion (``--rank``, ``--energy``, ``--max-error``) or a MAC budget fixes
      the rank of each orientation: its forms are timed (at most 2 orientations x 3 forms);
    - ``--target-speedup``: ranks 1, 2, ... of each orientation while the pair has fewer MACs
      than the original Conv, at most :data:`MAX_RANKS` ranks, stopping after the first rank at
      which no form is faster than the original (latency grows with the rank);
    - timings are cached per (spec, context, orientation, rank, form): layers of the same shape
      in the same surroundings are timed once. The report gives the number of variants timed,
      cache hits and the seconds spent.

A pair is kept only when it is measured faster: per-round ratio median below ``1 - MIN_GAIN``.

``--target-speedup`` (:func:`speedup_table`, :func:`reallocate`): an exact knapsack over the
measured seconds, then the whole rewritten model timed against the original; a missed target
re-allocates with the per-layer savings scaled by the fraction that showed up end to end, at
most ``--latency-passes`` times (docs/rewrite.md).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from .emit import FORMS, _Names, emit_pair

MIN_GAIN = 0.02  # a pair must be measured at least 2% faster than the original Conv to be kept
MAX_RANKS = 12  # under --target-speedup: at most this many ranks per orientation are timed


# --- the runtime -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int | None:
    """Physical cores from /proc/cpuinfo (onnxruntime's default intra-op thread count), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    cores, phys = set(), None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            cores.add((phys, val.strip()))
    return len(cores) or None


def runtime_info(threads: int | None, clock: str = "wall") -> dict:
    import onnxruntime as ort

    return {
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": "CPUExecutionProvider",
        "graph_optimization": "ORT_ENABLE_ALL",
        "threads": threads,
        "threads_note": (f"{threads} intra-op thread(s) (--threads)" if threads is not None else
                         f"onnxruntime default intra-op threads (this machine: {physical_cores() or '?'} physical "
                         f"core(s), {os.cpu_count()} logical)"),
        "clock": "elapsed time (time.perf_counter)" if clock == "wall" else
                 "CPU time of the process (time.process_time; 1 thread)",
        "cpu": cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }


# --- timing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Seconds per run of one variant: median and quartiles over rounds; ``samples`` per round."""

    median: float
    q1: float
    q3: float
    samples: tuple[float, ...] = ()
    runs: int = 1  # runs per sample

    @classmethod
    def of(cls, samples: Sequence[float], runs: int = 1) -> "Timing":
        a = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75)), tuple(map(float, a)), runs)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "rounds": len(self.samples), "runs_per_round": self.runs}


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a / b (the rounds are interleaved: paired samples)."""
    if a.samples and len(a.samples) == len(b.samples):
        return float(np.median(np.asarray(a.samples) / np.asarray(b.samples)))
    return a.median / b.median


@dataclass(frozen=True)
class Variant:
    """One model to time. ``kind``: "layer" (``what`` = "original" or (orientation, rank, form), with
    its ``spec`` and ``context``) or "model" (``what`` = "original" / "rewritten", the rewritten
    model's ``choice``)."""

    kind: str
    what: object
    model: object  # ModelProto, bytes or a path
    feeds: dict
    spec: "LayerSpec | None" = None
    context: "Context | None" = None  # a layer's neighbourhood (None: the layer alone)
    choice: dict | None = None  # a whole rewritten model: {layer: (orientation, rank, form)}


Timer = Callable[[Sequence[Variant]], list[Timing]]


class OrtTimer:
    """Times variants in onnxruntime (interleaved rounds; see the module docstring)."""

    def __init__(self, threads: int | None = None, rounds: int = 7, warmup: int = 2, sample_s: float = 0.004,
                 max_runs: int = 64, clock: str = "wall"):
        self.threads, self.rounds, self.warmup, self.sample_s, self.max_runs = threads, rounds, warmup, sample_s, max_runs
        # "wall": time.perf_counter (latency, what a user sees). "process": time.process_time, the CPU
        # time of this process: with one thread, a run's latency without the time the OS gave to other
        # processes (a shared machine); with more threads it adds up the threads and is not a latency
        if clock not in ("wall", "process"):
            raise ValueError(f"clock must be 'wall' or 'process', not {clock!r}")
        self.clock = time.perf_counter if clock == "wall" else time.process_time

    def session(self, model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads or 0
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif isinstance(model, os.PathLike):
            model = str(model)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def __call__(self, variants: Sequence[Variant], rounds: int | None = None) -> list[Timing]:
        rounds = rounds or self.rounds
        sessions = [self.session(v.model) for v in variants]
        runs = []
        for s, v in zip(sessions, variants):
            for _ in range(self.warmup):
                s.run(None, v.feeds)
            t0 = time.perf_counter()
            s.run(None, v.feeds)
            est = max(time.perf_counter() - t0, 1e-6)
            runs.append(max(1, min(self.max_runs, math.ceil(self.sample_s / est))))
        samples: list[list[float]] = [[] for _ in variants]
        n = len(variants)
        for k in range(rounds):
            for j in range(n):
                i = (j + k) % n
                s, v, r = sessions[i], variants[i], runs[i]
                t0 = self.clock()
                for _ in range(r):
                    s.run(None, v.feeds)
                samples[i].append((self.clock() - t0) / r)
        return [Timing.of(samples[i], runs[i]) for i in range(n)]


# --- one-layer models --------------------------------------------------------------------------
_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
               np.dtype(np.float64): onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class LayerSpec:
    """Everything a layer's latency depends on (the cache key)."""

    x_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias: bool
    attrs: tuple  # sorted (name, value) of the Conv's attributes, lists as tuples
    dtype: str
    opset: int

    @property
    def group(self) -> int:
        return int(dict(self.attrs).get("group", 1))

    def attr_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.attrs}

    def label(self) -> str:
        n, mg, *k = self.weight_shape
        return f"{self.x_shape[1]}->{n} {'x'.join(map(str, k))} g{self.group} @ {'x'.join(map(str, self.x_shape[2:]))}"


def layer_spec(x_shape, weight: np.ndarray, has_bias: bool, attrs: dict, opset: int) -> LayerSpec:
    items = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else (v.decode() if isinstance(v, bytes) else v))
                         for k, v in attrs.items()))
    return LayerSpec(tuple(int(d) for d in x_shape), tuple(int(d) for d in weight.shape), bool(has_bias), items,
                     str(np.dtype(weight.dtype)), int(opset))


def _ir_for(opset: int) -> int:
    # the IR version onnx pairs with the opset (onnxruntime refuses IR newer than it knows)
    table = [(21, 10), (19, 9), (15, 8), (13, 7), (11, 6), (9, 4)]
    return next((ir for op, ir in table if opset >= op), 3)


def _layer_model(spec: LayerSpec, nodes: list, inits: list, ctx: "Context | None", label: str) -> onnx.ModelProto:
    """The layer's nodes (reading ``x``, writing ``y``) in a model: alone, or in its context."""
    from onnx import helper

    elem = _NP_TO_ONNX[np.dtype(spec.dtype)]
    if ctx is None:
        ins = [helper.make_tensor_value_info("x", elem, list(spec.x_shape))]
        outs = [helper.make_tensor_value_info("y", elem, None)]
        g = helper.make_graph(nodes, label, ins, outs, inits)
    else:
        g = ctx.graph(spec, nodes, inits, label)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=_ir_for(spec.opset))


def original_model(spec: LayerSpec, seed: int = 0, ctx: "Context | None" = None,
                   weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> onnx.ModelProto:
    """The layer's Conv (random weights of its shapes unless ``weight``/``bias`` are given), alone
    or in ``ctx``."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    w = rng.standard_normal(spec.weight_shape).astype(dt) if weight is None else weight
    inits = [numpy_helper.from_array(w, "W")]
    ins = [_input_of(ctx), "W"]
    if spec.bias:
        b = rng.standard_normal(spec.weight_shape[0]).astype(dt) if bias is None else bias
        inits.append(numpy_helper.from_array(b, "B"))
        ins.append("B")
    node = helper.make_node("Conv", ins, ["y"], name="conv", **spec.attr_dict())
    return _layer_model(spec, [node], inits, ctx, "layer")


def factor_shapes(spec: LayerSpec, orientation: str, rank: int) -> tuple[tuple, tuple]:
    n, mg, *k = spec.weight_shape
    g = spec.group
    ones = [1] * len(k)
    if orientation == "dw-first":
        return (mg * g * rank, 1, *k), (n, mg * rank, *ones)
    return (n * rank, mg, *ones), (n, rank, *k)


def pair_model(spec: LayerSpec, orientation: str, rank: int, form: str, seed: int = 0,
               ctx: "Context | None" = None, factors: tuple | None = None, bias: np.ndarray | None = None) -> onnx.ModelProto:
    """The layer's rank-``rank`` pair in ``form`` (random factors of their shapes unless ``factors``
    (first, second) and ``bias`` are given), alone or in ``ctx``."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    s1, s2 = factor_shapes(spec, orientation, rank)
    first, second = factors if factors is not None else (rng.standard_normal(s1).astype(dt),
                                                         rng.standard_normal(s2).astype(dt))
    if bias is None and spec.bias:
        bias = rng.standard_normal(spec.weight_shape[0]).astype(dt)
    spatial = {k: v for k, v in spec.attr_dict().items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}
    pair = emit_pair(_input_of(ctx), "y", first, second, bias, spatial_attrs=spatial, group=spec.group,
                     orientation=orientation, rank=rank, form=form, names=_Names(), base="conv", opset=spec.opset)
    return _layer_model(spec, pair.nodes, pair.initializers, ctx, "pair")


def layer_feeds(spec: LayerSpec, ctx: "Context | None" = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of a layer's model: ``x`` and the other tensors its context reads."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    feeds = {"x": rng.standard_normal(spec.x_shape).astype(dt)}
    for k, (shape, elem) in enumerate(ctx.externals if ctx is not None else ()):
        feeds[f"e{k}"] = rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return feeds


# --- the neighbourhood a layer is timed in ---------------------------------------------------------
#: ops whose output onnxruntime's NCHWc transformer keeps in its blocked layout (read in
#: onnxruntime/core/optimizer/nchwc_transformer.cc; QuickGelu is what x * Sigmoid(x) becomes): a
#: layer whose input comes from one of them, or whose output goes to one, needs no layout reorder
#: there in the whole model
NCHWC_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sum", "Mul",
                       "Concat", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid", "BatchNormalization",
                       "Resize", "Upsample", "QuickGelu"})
#: element-wise ops followed after a layer into its context (its activation, a residual Add, ...)
CHAIN_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                       "Celu", "Softplus", "Mish", "Gelu", "Erf", "Mul", "Add", "Sub", "Div", "Sum", "Max", "Min"})
MAX_CHAIN = 6  # nodes of a context at most
_BINARY_FUSED = {"Add", "Sum"}  # onnxruntime fuses these into the conv that writes one of their inputs


@dataclass(frozen=True)
class Context:
    """Where a layer runs in its model, for timing it there: the element-wise consumer chain of its
    output (the activation, x * Sigmoid(x), a residual Add and the activation after it...; at most
    :data:`MAX_CHAIN` nodes, up to the next Conv or any other op), with canonical tensor names so
    that layers in the same surroundings share their timings. ``prefix`` / the output flags: the
    layer's input comes from, or an output goes to, an op onnxruntime runs in its NCHWc layout
    (:data:`NCHWC_OPS`); a 1x1 depthwise conv stands in for that op, so that a form whose nodes
    leave that layout pays its reorders as it does in the whole model."""

    nodes: tuple[bytes, ...] = ()  # the chain's NodeProtos (serialized): reads "y", "c<k>", "e<k>"; writes "t<k>"
    consts: tuple[bytes, ...] = ()  # TensorProtos "c<k>" (small constants the chain reads)
    externals: tuple[tuple[tuple[int, ...], int], ...] = ()  # "e<k>": shape, elem type (random inputs)
    outputs: tuple[tuple[str, bool], ...] = (("y", False),)  # tensors read outside the chain; does an NCHWc op read them
    prefix: bool = False
    label: str = ""

    def graph(self, spec: LayerSpec, layer_nodes: list, layer_inits: list, name: str) -> onnx.GraphProto:
        from onnx import helper, numpy_helper

        dt = np.dtype(spec.dtype)
        elem = _NP_TO_ONNX[dt]
        nd = len(spec.x_shape) - 2
        one = {"kernel_shape": [1] * nd}

        def stand_in(src: str, dst: str, channels: int, tag: str):
            w = numpy_helper.from_array(np.ones((channels, 1, *[1] * nd), dtype=dt), f"{tag}.w")
            return helper.make_node("Conv", [src, w.name], [dst], name=tag, group=channels, **one), w

        nodes, inits = [], list(layer_inits)
        if self.prefix:
            n, w = stand_in("x", "x.in", spec.x_shape[1], "producer")
            nodes.append(n)
            inits.append(w)
        for k, (shape, _) in enumerate(self.externals):
            # the other operand of a residual Add comes in the NCHWc layout too, from an op that
            # cannot take the Add in (a conv with its activation fused: a Relu after the stand-in)
            n, w = stand_in(f"e{k}", f"e{k}.conv", shape[1], f"residual{k}")
            nodes += [n, helper.make_node("Relu", [f"e{k}.conv"], [f"e{k}.in"], name=f"residual{k}_act")]
            inits.append(w)
        rename = {f"e{k}": f"e{k}.in" for k in range(len(self.externals))}
        nodes += layer_nodes
        for b in self.nodes:
            n = onnx.NodeProto()
            n.ParseFromString(b)
            n.input[:] = [rename.get(t, t) for t in n.input]
            nodes.append(n)
        for b in self.consts:
            t = onnx.TensorProto()
            t.ParseFromString(b)
            inits.append(t)
        outs = []
        for k, (t, nchwc) in enumerate(self.outputs):
            if nchwc:
                n, w = stand_in(t, f"{t}.out", spec.weight_shape[0], f"consumer{k}")
                nodes.append(n)
                inits.append(w)
                t = f"{t}.out"
            outs.append(helper.make_tensor_value_info(t, elem, None))
        ins = [helper.make_tensor_value_info("x", elem, list(spec.x_shape))]
        ins += [helper.make_tensor_value_info(f"e{k}", e, list(shape)) for k, (shape, e) in enumerate(self.externals)]
        return helper.make_graph(nodes, name, ins, outs, inits)


def _input_of(ctx: "Context | None") -> str:
    return "x.in" if ctx is not None and ctx.prefix else "x"


def layer_context(view, x: str, y: str, values: dict) -> Context:
    """The :class:`Context` of the layer reading ``x`` and writing ``y`` in ``view`` (a
    :class:`sepify.model.graph.GraphView`); ``values``: the sizes of the symbolic dims."""
    import heapq

    from onnx import helper, numpy_helper

    def shape_of(t):
        sh = view.shape(t)
        if sh is None:
            return None
        out = []
        for d in sh:
            v = d if isinstance(d, int) else values.get(d)
            if not isinstance(v, int) or v < 1:
                return None
            out.append(int(v))
        return tuple(out)

    producer = view.producer_node(x)
    prefix = producer is not None and producer.domain in ("", "ai.onnx", "com.microsoft") and producer.op_type in NCHWC_OPS
    y_shape = shape_of(y)
    names = {y: "y"}  # model tensor -> canonical name
    chain, consts, externals, labels = [], [], [], []
    taken: set[int] = set()
    heap = list(view.consumers.get(y, []))
    heapq.heapify(heap)
    seen: set[int] = set()
    while heap and len(chain) < MAX_CHAIN:
        idx = heapq.heappop(heap)
        if idx in seen:
            continue
        seen.add(idx)
        node = view.nodes[idx]
        if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        if y_shape is None or shape_of(node.output[0]) != y_shape:
            continue
        ext, const, ok = [], [], True
        for t in node.input:
            if not t or t in names:
                continue
            if view.is_const(t):
                v = view.const_value(t)
                if v is None:
                    ok = False
                const.append((t, v))
            else:
                ext.append(t)
        if ext:  # one other tensor, for an Add / Sum of the layer's own output (a residual)
            ok = ok and not externals and len(ext) == 1 and node.op_type in _BINARY_FUSED and y in node.input
            sh = shape_of(ext[0]) if ok else None  # (a full-size operand: a broadcast one is not a residual)
            ok = ok and sh == y_shape and view.dtype(ext[0]) in _ONNX_FLOATS
        if not ok:
            continue
        for t, v in const:
            if t not in names:
                names[t] = f"c{len(consts)}"
                consts.append(numpy_helper.from_array(np.asarray(v), names[t]).SerializeToString())
        if ext:
            names[ext[0]] = f"e{len(externals)}"
            externals.append((sh, view.dtype(ext[0])))
        out = node.output[0]
        names[out] = f"t{len(chain)}"
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.name = f"chain{len(chain)}"
        n.ClearField("doc_string")
        n.ClearField("metadata_props")
        n.input[:] = [names.get(t, t) if t else t for t in node.input]
        n.output[:] = [names[out]]
        chain.append(n.SerializeToString())
        labels.append(node.op_type)
        taken.add(idx)
        for c in view.consumers.get(out, []):
            heapq.heappush(heap, c)
    outputs = []
    graph_outputs = set(view.graph_outputs)
    for t, canon in names.items():
        if canon[0] not in "yt":
            continue
        outside = [view.nodes[i] for i in view.consumers.get(t, []) if i not in taken]
        if outside or t in graph_outputs or (canon == "y" and not chain):
            nchwc = any(n.op_type in NCHWC_OPS and n.domain in ("", "ai.onnx") for n in outside) and t not in graph_outputs
            outputs.append((canon, nchwc))
    if not outputs:  # (a chain whose last tensor nothing reads: keep it as the output)
        outputs.append((names[next(reversed(names))], False))
    return Context(tuple(chain), tuple(consts), tuple(externals), tuple(outputs), prefix, "+".join(labels))


_ONNX_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


# --- per-layer measurements, cached --------------------------------------------------------------
@dataclass
class Measured:
    """A candidate's latency: ``seconds`` = ``ratio`` (paired, vs the original) x the original's
    reference median; ``timing`` the raw timing."""

    seconds: float
    ratio: float
    timing: Timing


@dataclass
class MeasureStats:
    variants_timed: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    layers: int = 0
    notes: list[str] = field(default_factory=list)


class LayerMeasurer:
    def __init__(self, timer: Timer):
        self.timer = timer
        self.cache: dict[tuple, Measured] = {}
        self.originals: dict[tuple, list[float]] = {}  # (spec, context) -> the original's medians
        self.stats = MeasureStats()

    def original(self, spec: LayerSpec, ctx: Context | None = None) -> float:
        """The original Conv's reference seconds (median of its measurements); measured alone if needed."""
        if (spec, ctx) not in self.originals:
            self.measure(spec, [], ctx)
        return float(np.median(self.originals[(spec, ctx)]))

    def measure(self, spec: LayerSpec, candidates: Sequence[tuple[str, int, str]],
                ctx: Context | None = None) -> dict[tuple, Measured]:
        """Time the candidates (orientation, rank, form) of a layer against its original Conv, both
        in the layer's context ``ctx`` (None: the layer alone)."""
        out: dict[tuple, Measured] = {}
        todo = []
        for cand in dict.fromkeys(candidates):
            hit = self.cache.get((spec, ctx, *cand))
            if hit is not None:
                out[cand] = hit
                self.stats.cache_hits += 1
            else:
                todo.append(cand)
        if not todo and (spec, ctx) in self.originals:
            return out
        t0 = time.perf_counter()
        feeds = layer_feeds(spec, ctx)
        variants = [Variant("layer", "original", original_model(spec, ctx=ctx), feeds, spec, ctx)]
        variants += [Variant("layer", cand, pair_model(spec, *cand, ctx=ctx), feeds, spec, ctx) for cand in todo]
        timings = self.timer(variants)
        self.stats.variants_timed += len(variants)
        self.stats.seconds += time.perf_counter() - t0
        orig = timings[0]
        self.originals.setdefault((spec, ctx), []).append(orig.median)
        ref = float(np.median(self.originals[(spec, ctx)]))
        for cand, t in zip(todo, timings[1:]):
            ratio = paired_ratio(t, orig)
            m = Measured(ratio * ref, ratio, t)
            self.cache[(spec, ctx, *cand)] = m
            out[cand] = m
        return out


def feeds_for(model: onnx.ModelProto, shapes: dict[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs (floats ~ N(0, 1), integers 0, booleans False) for timing a whole model."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = [int(d) for d in shapes[inp.name]]
        if np.issubdtype(dt, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dt)
    return feeds


E2E_ROUNDS = 21  # interleaved rounds of a whole-model comparison


def end_to_end(timer: Timer, original, rewritten, feeds: dict, rounds: int = E2E_ROUNDS,
               choice: dict | None = None) -> dict:
    """Whole-model runs of the original and the rewritten model, interleaved (``choice``: the
    rewritten model's layers, for a timer that wants to know)."""
    t0 = time.perf_counter()
    variants = [Variant("model", "original", original, feeds),
                Variant("model", "rewritten", rewritten, feeds, choice=choice)]
    try:
        a, b = timer(variants, rounds=rounds)
    except TypeError:  # a timer without a rounds argument
        a, b = timer(variants)
    spread = {}
    if a.samples and len(a.samples) == len(b.samples):
        per_round = np.asarray(a.samples) / np.asarray(b.samples)  # the speed-up of each round
        spread = {"speedup_q1": float(np.percentile(per_round, 25)), "speedup_q3": float(np.percentile(per_round, 75))}
    return {"before": a.to_dict(), "after": b.to_dict(), "speedup": 1.0 / paired_ratio(b, a), **spread,
            "inputs": "random normal, " + ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()),
            "seconds": time.perf_counter() - t0}


def graph_summary(model, threads: int | None = None) -> dict | None:
    """What onnxruntime's CPU provider makes of ``model`` (ModelProto, bytes or path) at
    ``ORT_ENABLE_ALL``: the optimized graph (``SessionOptions.optimized_model_filepath``) counted.
    ``nchwc_convs``: convs in the NCHWc layout; ``fused_activation``: convs (NCHWc or FusedConv)
    with the activation fused; ``fused_sum``: NCHWc convs with an Add fused (a 4th input);
    ``plain_convs``: convs left in NCHW; ``reorders``: layout conversions (ReorderInput /
    ReorderOutput); ``ops``: every op of the optimized graph with its count. None when the
    optimized graph cannot be written (e.g. over 2 GB)."""
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or 0
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    with tempfile.TemporaryDirectory(prefix="sepify-ort-") as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
        except Exception:  # noqa: BLE001 - a diagnostic: none rather than a failed rewrite
            return None
    ops: dict[str, int] = {}
    out = {"nchwc_convs": 0, "fused_activation": 0, "fused_sum": 0, "plain_convs": 0, "reorders": 0}
    for n in opt.graph.node:
        key = f"{n.domain}:{n.op_type}" if n.domain else n.op_type
        ops[key] = ops.get(key, 0) + 1
        if n.op_type == "Conv" or n.op_type == "FusedConv":
            act = any(a.name == "activation" for a in n.attribute)
            out["fused_activation"] += act
            if n.domain == "com.microsoft.nchwc":
                out["nchwc_convs"] += 1
                out["fused_sum"] += len(n.input) > 3 and bool(n.input[3])
            else:
                out["plain_convs"] += 1
        elif n.op_type in ("ReorderInput", "ReorderOutput"):
            out["reorders"] += 1
    out["ops"] = dict(sorted(ops.items()))
    return out


# --- the choice ----------------------------------------------------------------------------------
def forms_for(form_option: str, rank: int) -> tuple[str, ...]:
    if rank == 1:
        return ("native",)
    return FORMS if form_option == "auto" else (form_option,)


def fastest(measured: dict[tuple, Measured]) -> tuple[tuple, Measured]:
    order = {f: i for i, f in enumerate(FORMS)}
    return min(measured.items(), key=lambda kv: (kv[1].seconds, order[kv[0][2]], kv[0][1]))


def is_faster(m: Measured) -> bool:
    return m.ratio < 1.0 - MIN_GAIN


# --- latency-aware planning ------------------------------------------------------------------------
@dataclass
class LayerLatency:
    """The measured outcome of one layer: its original Conv and the chosen pair (if any)."""

    spec: LayerSpec
    original_s: float
    chosen: tuple | None = None  # (orientation, rank, form)
    seconds: float | None = None
    ratio: float | None = None
    forms: dict = field(default_factory=dict)  # form -> seconds at the chosen (orientation, rank)
    context: Context | None = None

    def to_dict(self) -> dict:
        return {"shape": self.spec.label(), "context": _context_label(self.context), "before_s": self.original_s,
                "after_s": self.seconds, "speedup": (1.0 / self.ratio) if self.ratio else None,
                "forms_s": dict(self.forms)}


def _context_label(ctx: Context | None) -> str | None:
    """``Conv+Add+Relu`` (the layer and its chain), with ``<-`` / ``->`` where a stand-in NCHWc
    producer / consumer surrounds it; None for a layer timed alone."""
    if ctx is None:
        return None
    return (("NCHWc -> " if ctx.prefix else "") + "+".join(["layer"] + ([ctx.label] if ctx.label else []))
            + (" -> NCHWc" if any(f for _, f in ctx.outputs) else ""))


def _criterion_rank(c, o: str, opts, curves) -> int:
    """The rank of orientation ``o`` the per-layer criterion names (weight or calibrated curves)."""
    sp = c.spectra[o]
    if opts.energy is not None:
        return curves.rank_for_energy(o, opts.energy)
    if opts.max_error is not None:
        return curves.rank_for_error(o, opts.max_error)
    if opts.rank == "full":
        return sp.max_rank
    return min(int(opts.rank or 1), sp.max_rank)


def plan_latency(candidates, opts, specs: dict, measurer: LayerMeasurer, mac_choices: dict | None,
                 contexts: dict | None = None) -> tuple[dict, dict[str, LayerLatency]]:
    """Choose (orientation, rank, form) per candidate by measurement, for a per-layer criterion or
    a MAC policy (``--target-speedup``: :func:`speedup_table` and :func:`reallocate`).

    ``mac_choices``: the (orientation, rank) (or a reason) per layer from the MAC policy, used as
    the rank of the layer when ``opts.objective == "macs"`` (only the form is measured) or under a
    MAC budget. ``contexts``: per layer the :class:`Context` it is timed in (None: alone).
    Returns (choices {name: (o, r, form) | reason}, latencies {name: LayerLatency})."""
    from . import allocate

    latency = opts.objective == "latency"
    contexts = contexts or {}
    choices: dict = {}
    lat: dict[str, LayerLatency] = {}
    budget_mode = opts.target_macs is not None or opts.target_ratio is not None
    for c in candidates:
        name, spec, ctx = c.node.name, specs[c.node.name], contexts.get(c.node.name)
        if not latency or budget_mode:
            pick = mac_choices.get(name)
            if not isinstance(pick, tuple):
                choices[name] = pick
                continue
            ranks = {pick[0]: pick[1]}
        else:
            curves = allocate.curves_of(c)
            ranks = {o: _criterion_rank(c, o, opts, curves) for o in c.spectra}
            ranks = {o: r for o, r in ranks.items()
                     if opts.allow_increase or c.saves(o, r)}
            if not ranks:
                choices[name] = "no saving at the chosen rank in any orientation (--allow-increase to force)"
                continue
        cands = [(o, r, f) for o, r in ranks.items() for f in forms_for(opts.form, r)]
        got = measurer.measure(spec, cands, ctx)
        (o, r, f), m = fastest(got)
        rec = LayerLatency(spec, measurer.original(spec, ctx), (o, r, f), m.seconds, m.ratio,
                           {k[2]: v.seconds for k, v in got.items() if k[:2] == (o, r)}, ctx)
        lat[name] = rec
        if latency and not is_faster(m):
            choices[name] = (f"kept: measured not faster than the original Conv (best: {o} rank {r} {f}, "
                             f"{m.seconds * 1e3:.3g} ms vs {rec.original_s * 1e3:.3g} ms)")
            rec.chosen = rec.seconds = rec.ratio = None
            continue
        choices[name] = (o, r, f)
    return choices, lat


# --- --target-speedup: a knapsack over measured seconds, checked end to end -----------------------
@dataclass
class SpeedupTable:
    """The options of ``--target-speedup``, per layer: keep its Conv (its measured seconds, no error)
    or a pair measured faster (its fastest form at each rank; its seconds and its additive error,
    ``allocate.curves_of(c).additive[o][r - 1]``). ``total``: the whole original model, measured."""

    names: list[str]
    options: list[list]  # per layer: allocate.Option, the first one KEEP
    measured_at: dict[str, dict]  # name -> (o, r) -> ((o, r, form), Measured, {form: seconds})
    lat: dict[str, LayerLatency]
    total: float

    @property
    def keep_sum(self) -> float:
        return math.fsum(opts[0].cost for opts in self.options)

    def saving(self, picks: Sequence[int]) -> float:
        """Predicted seconds saved: the sum over layers of the original's minus the option's seconds."""
        return math.fsum(opts[0].cost - opts[i].cost for opts, i in zip(self.options, picks))

    def max_saving(self) -> float:
        return self.saving(self.fastest())

    def fastest(self) -> list[int]:
        """Per layer the option with the fewest seconds (ties: the earlier, i.e. keep or the lower rank)."""
        return [min(range(len(opts)), key=lambda i: (opts[i].cost, i)) for opts in self.options]

    def solve(self, saving: float) -> list[int] | None:
        """The least total error saving at least ``saving`` seconds (the exact knapsack of
        :func:`sepify.rewrite.allocate.solve`), or None when even the fastest options save less."""
        from . import allocate

        if saving > self.max_saving() * (1 + 1e-12):
            return None
        return allocate.solve(self.options, self.keep_sum - saving)

    def choice(self, picks: Sequence[int]) -> dict:
        """{name: (o, r, form)} of the rewritten layers."""
        from .factorize import KEEP

        return {n: opts[i].key for n, opts, i in zip(self.names, self.options, picks) if opts[i].key != KEEP}


def speedup_table(candidates, opts, specs: dict, measurer: LayerMeasurer, model_seconds: Callable[[], float] | None,
                  contexts: dict | None = None) -> SpeedupTable:
    """Time, per layer in its context, ranks 1, 2, ... of each orientation (the fastest form of each)
    while the pair has fewer MACs than the Conv (at most :data:`MAX_RANKS`), stopping after the first
    rank no form of which is faster; then the whole original model (``model_seconds``)."""
    from . import allocate
    from .factorize import KEEP

    Option = allocate.Option
    contexts = contexts or {}
    names, option_lists, measured_at, lat = [], [], {}, {}
    for c in candidates:
        name, spec, ctx = c.node.name, specs[c.node.name], contexts.get(c.node.name)
        curves = allocate.curves_of(c)
        best_at, faster = {}, []
        for o, sp in c.spectra.items():
            for r in range(1, min(sp.max_rank, MAX_RANKS) + 1):
                if not opts.allow_increase and not c.saves(o, r):
                    break
                got = measurer.measure(spec, [(o, r, f) for f in forms_for(opts.form, r)], ctx)
                key, m = fastest(got)
                best_at[(o, r)] = (key, m, {k[2]: v.seconds for k, v in got.items()})
                if not is_faster(m):
                    break
                faster.append((key, m.ratio, float(curves.additive[o][r - 1])))
        # costs from the paired ratios and the original's reference time over all its rounds
        orig = measurer.original(spec, ctx)
        names.append(name)
        option_lists.append([Option(KEEP, orig, 0.0)] + [Option(key, ratio * orig, err) for key, ratio, err in faster])
        measured_at[name] = best_at
        lat[name] = LayerLatency(spec, orig, context=ctx)
    total = model_seconds() if model_seconds else math.fsum(lt.original_s for lt in lat.values())
    return SpeedupTable(names, option_lists, measured_at, lat, total)


def _describe(key) -> str:
    return "kept" if not isinstance(key, tuple) else f"{key[0]} rank {key[1]} {key[2]}"


STEP = 0.01
"""After a missed pass, the next one asks the knapsack for at least this fraction of the original
model's time more than the missed pass's predicted saving (a pass is met when the lower quartile
of its per-round speed-ups reaches the target: a median a hair above it is re-timed below it
half the time)."""


def reallocate(table: SpeedupTable, target: float, passes: int,
               time_choice: Callable[[dict], dict] | None) -> tuple[list[int], list[dict], int | None]:
    """Allocate for ``target`` and check it end to end, at most ``passes`` times.

    Pass 1 asks the knapsack to save ``need = T (1 - 1/X)`` of the whole model's measured ``T``.
    Each pass's model is timed whole against the original (``time_choice(choice)``: the
    :func:`end_to_end` dict of the model with that choice); it meets ``X`` when the lower quartile
    of its per-round speed-ups does (and the median). When it misses, with median ``s``, the
    measured saving ``T (1 - 1/s)`` over the predicted one is the fraction of the per-layer savings that shows up end to end, and the next pass asks the knapsack for
    ``max(need / fraction, the missed pass's saving + STEP * T)`` (the fastest options when that is
    more than they save; a fraction <= 0 asks for them directly). Stops when the target is met,
    after ``passes`` passes, or when a pass would time a choice already timed. Without ``time_choice`` one pass, not timed.

    Returns (the picks of the best pass, the pass records, the index of the best pass or None):
    the first pass that met the target, else the one measured fastest. When even the fastest
    options cannot save ``need`` by the per-layer timings, pass 1 times the fastest options end to
    end all the same (per-layer timings miss what the whole model gains or loses: the target may
    still be met, else the fastest model is returned with the target missed, said in the first
    record's ``per_layer_note``); without ``time_choice`` that is a
    :class:`~sepify.errors.BudgetError`."""
    from ..errors import BudgetError

    need = table.total * (1.0 - 1.0 / target)
    fastest = table.fastest()
    unreachable = None
    if table.solve(need) is None:
        most = table.max_saving()
        best = table.total / max(table.total - most, 1e-12)
        unreachable = (f"measured per layer, the fastest rewrites save {most * 1e3:.3g} ms of "
                       f"{table.total * 1e3:.3g} ms (at most ~{best:.2f}x)")
        if time_choice is None:
            raise BudgetError(f"--target-speedup {target:g} cannot be reached: {unreachable}")
    records: list[dict] = []
    tried: dict[tuple, int] = {}
    fraction, prev = 1.0, None
    last_saving = None
    for p in range(max(1, passes)):
        asked = need / fraction if fraction > 0 else math.inf
        if last_saving is not None and math.isfinite(asked):  # a miss: ask for more than the pass before
            asked = max(asked, last_saving + STEP * table.total)
        picks = table.solve(asked) if math.isfinite(asked) else None
        capped = picks is None
        if capped:
            picks = fastest
        if tuple(picks) in tried:
            records[-1]["stopped"] = (f"the corrected budget gives the choice of pass {tried[tuple(picks)] + 1} "
                                      f"again: nothing new to measure")
            break
        tried[tuple(picks)] = p
        saving = table.saving(picks)
        choice = table.choice(picks)
        rec = {"pass": p + 1, "saving_asked_s": asked if math.isfinite(asked) else None,
               "fastest_options": capped, "predicted_saving_s": saving, "predicted_s": table.total - saving,
               "predicted_speedup": table.total / max(table.total - saving, 1e-12), "rewritten": len(choice),
               "choice": {n: list(k) for n, k in choice.items()},
               "changes": [{"layer": n, "from": _describe((prev or {}).get(n)), "to": _describe(choice.get(n))}
                           for n in table.names if (prev or {}).get(n) != choice.get(n)]}
        if unreachable and p == 0:
            rec["per_layer_note"] = (f"--target-speedup {target:g} looks out of reach per layer ({unreachable}): "
                                     f"the fastest options were timed end to end")
        records.append(rec)
        prev = choice
        if time_choice is None:
            break
        e2e = time_choice(choice)
        s = e2e["speedup"]
        ok = min(s, e2e.get("speedup_q1", s)) >= target  # three rounds in four at least X
        rec.update({"end_to_end": e2e, "measured_speedup": s, "target_met": ok})
        if ok:
            break
        measured = table.total * (1.0 - 1.0 / s)
        fraction = measured / saving if saving > 0 else 0.0
        rec["realized_fraction"] = fraction
        last_saving = saving
    timed = [k for k, r in enumerate(records) if "measured_speedup" in r]
    if not timed:
        return [int(i) for i in (table.solve(need) or fastest)], records, None
    met = [k for k in timed if records[k]["target_met"]]
    best = met[0] if met else max(timed, key=lambda k: (records[k]["measured_speedup"], -k))
    picks = next(pk for pk, q in tried.items() if q == best)
    return list(picks), records, best


def apply_picks(table: SpeedupTable, picks: Sequence[int]) -> dict:
    """The choices of ``picks`` ({name: (o, r, form) | reason}), recorded in ``table.lat``."""
    from .factorize import KEEP

    choices = {}
    for name, options, i in zip(table.names, table.options, picks):
        opt, rec = options[i], table.lat[name]
        rec.chosen = rec.seconds = rec.ratio = None
        rec.forms = {}
        if opt.key == KEEP:
            faster = [k for k in table.measured_at[name].values() if is_faster(k[1])]
            choices[name] = ("kept: no rewrite of it measured faster than the original Conv" if not faster else
                             "kept: the target speed-up is met with the other layers")
            continue
        o, r, f = opt.key
        _, m, forms = table.measured_at[name][(o, r)]
        rec.chosen, rec.seconds, rec.ratio, rec.forms = (o, r, f), opt.cost, m.ratio, forms
        choices[name] = (o, r, f)
    return choices
