"""Measure: latency of candidate rewrites in onnxruntime, at each layer's real input shape.

What is timed
    For a layer (input shape, weight shape, bias, attributes, dtype, opset: a :class:`LayerSpec`)
    a one-layer model of the original Conv and one of each candidate pair (orientation, rank,
    graph form, :mod:`sepify.rewrite.emit`), with random weights of the right shapes (timing does
    not depend on the values), in onnxruntime's CPU provider with the default optimization level
    a user deploys with (``ORT_ENABLE_ALL``, so the NCHWc transforms apply), the requested intra-op
    threads (``--threads``; default: onnxruntime's own choice) and ``log_severity_level = 3``.

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
    - timings are cached per (spec, orientation, rank, form): layers of the same shape are timed
      once. The report gives the number of variants timed, cache hits and the seconds spent.

A pair is kept only when it is measured faster: per-round ratio median below ``1 - MIN_GAIN``.
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
    its ``spec``) or "model" (``what`` = "original" / "rewritten")."""

    kind: str
    what: object
    model: object  # ModelProto, bytes or a path
    feeds: dict
    spec: "LayerSpec | None" = None


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


def original_model(spec: LayerSpec, seed: int = 0) -> onnx.ModelProto:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    w = rng.standard_normal(spec.weight_shape).astype(dt)
    inits = [numpy_helper.from_array(w, "W")]
    ins = ["x", "W"]
    if spec.bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(spec.weight_shape[0]).astype(dt), "B"))
        ins.append("B")
    node = helper.make_node("Conv", ins, ["y"], name="conv", **spec.attr_dict())
    g = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", _NP_TO_ONNX[dt], list(spec.x_shape))],
                          [helper.make_tensor_value_info("y", _NP_TO_ONNX[dt], None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=_ir_for(spec.opset))


def factor_shapes(spec: LayerSpec, orientation: str, rank: int) -> tuple[tuple, tuple]:
    n, mg, *k = spec.weight_shape
    g = spec.group
    ones = [1] * len(k)
    if orientation == "dw-first":
        return (mg * g * rank, 1, *k), (n, mg * rank, *ones)
    return (n * rank, mg, *ones), (n, rank, *k)


def pair_model(spec: LayerSpec, orientation: str, rank: int, form: str, seed: int = 0) -> onnx.ModelProto:
    from onnx import helper

    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    s1, s2 = factor_shapes(spec, orientation, rank)
    first = rng.standard_normal(s1).astype(dt)
    second = rng.standard_normal(s2).astype(dt)
    bias = rng.standard_normal(spec.weight_shape[0]).astype(dt) if spec.bias else None
    spatial = {k: v for k, v in spec.attr_dict().items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}
    pair = emit_pair("x", "y", first, second, bias, spatial_attrs=spatial, group=spec.group, orientation=orientation,
                     rank=rank, form=form, names=_Names(), base="conv", opset=spec.opset)
    elem = _NP_TO_ONNX[dt]
    g = helper.make_graph(pair.nodes, "pair", [helper.make_tensor_value_info("x", elem, list(spec.x_shape))],
                          [helper.make_tensor_value_info("y", elem, None)], pair.initializers)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=_ir_for(spec.opset))


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
        self.originals: dict[LayerSpec, list[float]] = {}
        self.stats = MeasureStats()

    def original(self, spec: LayerSpec) -> float:
        """The original Conv's reference seconds (median of its measurements); measured alone if needed."""
        if spec not in self.originals:
            self.measure(spec, [])
        return float(np.median(self.originals[spec]))

    def measure(self, spec: LayerSpec, candidates: Sequence[tuple[str, int, str]]) -> dict[tuple, Measured]:
        """Time the candidates (orientation, rank, form) of a layer against its original Conv."""
        out: dict[tuple, Measured] = {}
        todo = []
        for cand in dict.fromkeys(candidates):
            hit = self.cache.get((spec, *cand))
            if hit is not None:
                out[cand] = hit
                self.stats.cache_hits += 1
            else:
                todo.append(cand)
        if not todo and spec in self.originals:
            return out
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal(spec.x_shape).astype(np.dtype(spec.dtype))}
        variants = [Variant("layer", "original", original_model(spec), feeds, spec)]
        variants += [Variant("layer", cand, pair_model(spec, *cand), feeds, spec) for cand in todo]
        timings = self.timer(variants)
        self.stats.variants_timed += len(variants)
        self.stats.seconds += time.perf_counter() - t0
        orig = timings[0]
        self.originals.setdefault(spec, []).append(orig.median)
        ref = float(np.median(self.originals[spec]))
        for cand, t in zip(todo, timings[1:]):
            ratio = paired_ratio(t, orig)
            m = Measured(ratio * ref, ratio, t)
            self.cache[(spec, *cand)] = m
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


def end_to_end(timer: Timer, original, rewritten, feeds: dict, rounds: int = 11) -> dict:
    """Whole-model runs of the original and the rewritten model, interleaved."""
    t0 = time.perf_counter()
    variants = [Variant("model", "original", original, feeds), Variant("model", "rewritten", rewritten, feeds)]
    try:
        a, b = timer(variants, rounds=rounds)
    except TypeError:  # a timer without a rounds argument
        a, b = timer(variants)
    return {"before": a.to_dict(), "after": b.to_dict(), "speedup": 1.0 / paired_ratio(b, a),
            "inputs": "random normal, " + ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()),
            "seconds": time.perf_counter() - t0}


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

    def to_dict(self) -> dict:
        return {"shape": self.spec.label(), "before_s": self.original_s, "after_s": self.seconds,
                "speedup": (1.0 / self.ratio) if self.ratio else None,
                "forms_s": dict(self.forms)}


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
                 model_seconds: Callable[[], float] | None = None) -> tuple[dict, dict[str, LayerLatency], dict]:
    """Choose (orientation, rank, form) per candidate by measurement.

    ``mac_choices``: the (orientation, rank) (or a reason) per layer from the MAC policy, used as
    the rank of the layer when ``opts.objective == "macs"`` (only the form is measured) or under a
    MAC budget. Returns (choices {name: (o, r, form) | reason}, latencies {name: LayerLatency},
    info for the report)."""
    from ..errors import BudgetError
    from . import allocate
    from .factorize import KEEP

    latency = opts.objective == "latency"
    choices: dict = {}
    lat: dict[str, LayerLatency] = {}
    info: dict = {}
    budget_mode = opts.target_macs is not None or opts.target_ratio is not None
    if opts.target_speedup is None:
        for c in candidates:
            name, spec = c.node.name, specs[c.node.name]
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
            got = measurer.measure(spec, cands)
            (o, r, f), m = fastest(got)
            rec = LayerLatency(spec, measurer.original(spec), (o, r, f), m.seconds, m.ratio,
                               {k[2]: v.seconds for k, v in got.items() if k[:2] == (o, r)})
            lat[name] = rec
            if latency and not is_faster(m):
                choices[name] = (f"kept: measured not faster than the original Conv (best: {o} rank {r} {f}, "
                                 f"{m.seconds * 1e3:.3g} ms vs {rec.original_s * 1e3:.3g} ms)")
                rec.chosen = rec.seconds = rec.ratio = None
                continue
            choices[name] = (o, r, f)
        return choices, lat, info

    # --target-speedup: budget on measured latency, allocated by an exact knapsack
    Option = allocate.Option
    layers, option_lists, measured_at = [], [], {}
    for c in candidates:
        name, spec = c.node.name, specs[c.node.name]
        curves = allocate.curves_of(c)
        best_at, faster = {}, []
        for o, sp in c.spectra.items():
            for r in range(1, min(sp.max_rank, MAX_RANKS) + 1):
                if not opts.allow_increase and not c.saves(o, r):
                    break
                got = measurer.measure(spec, [(o, r, f) for f in forms_for(opts.form, r)])
                key, m = fastest(got)
                best_at[(o, r)] = (key, m, {k[2]: v.seconds for k, v in got.items()})
                if not is_faster(m):
                    break
                faster.append((key, m.ratio, float(curves.additive[o][r - 1])))
        # costs from the paired ratios and the original's reference time over all its rounds
        orig = measurer.original(spec)
        options = [Option(KEEP, orig, 0.0)] + [Option(key, ratio * orig, err) for key, ratio, err in faster]
        measured_at[name] = best_at
        layers.append(c)
        option_lists.append(options)
        lat[name] = LayerLatency(spec, orig)
    total = model_seconds() if model_seconds else sum(lt.original_s for lt in lat.values())
    conv_sum = sum(options[0].cost for options in option_lists)
    need = total * (1.0 - 1.0 / opts.target_speedup)  # seconds the rewrite must save end to end
    budget = conv_sum - need
    floor = sum(min(o.cost for o in options) for options in option_lists)
    info.update({"model_before_s": total, "layers_before_s": conv_sum, "budget_s": budget})
    if need <= 0:
        return {c.node.name: "kept: the target speed-up is met without rewriting it" for c in layers}, lat, info
    picks = allocate.solve(option_lists, budget) if floor <= budget else None
    if picks is None:
        best = total / max(total - (conv_sum - floor), 1e-12)
        raise BudgetError(f"--target-speedup {opts.target_speedup:g} cannot be reached: measured per layer, the fastest "
                          f"rewrites save {(conv_sum - floor) * 1e3:.3g} ms of {total * 1e3:.3g} ms "
                          f"(at most ~{best:.2f}x)")
    for c, options, i in zip(layers, option_lists, picks):
        name, opt = c.node.name, options[i]
        rec = lat[name]
        if opt.key == KEEP:
            faster = [k for k in measured_at[name].values() if is_faster(k[1])]
            choices[name] = ("kept: no rewrite of it measured faster than the original Conv" if not faster else
                             "kept: the target speed-up is met with the other layers")
            continue
        o, r, f = opt.key
        _, m, forms = measured_at[name][(o, r)]
        rec.chosen, rec.seconds, rec.ratio, rec.forms = (o, r, f), opt.cost, m.ratio, forms
        choices[name] = (o, r, f)
    info["predicted_s"] = total - sum(lat[n].original_s - (lat[n].seconds or lat[n].original_s) for n in lat)
    return choices, lat, info
