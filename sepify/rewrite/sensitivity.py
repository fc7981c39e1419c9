"""Sensitivity: what one layer's rewrite does to the MODEL's outputs, measured with onnxruntime.

Why. The budget allocators (``--target-macs`` / ``--target-ratio`` / ``--target-speedup``) choose
one option per layer minimising a sum of per-layer errors. With calibration data that error used to
be ``eps_l(o, r)^2``, the layer's own predicted relative output error (:mod:`.calibrate`), every
layer weighted alike. But the rest of the network amplifies some layers' errors and absorbs
others' (a layer before a wide pooling, a layer whose error a saturating activation hides, the
last layer before a classifier): the relative output error of a layer does not say what its error
costs in the model's output.

What. For every candidate ``l`` and a few ranks ``R_l`` (default ``{1, 2, 4}`` where they save
MACs), the layer alone is replaced by its closed-form rank-``r`` pair (the phase-1 "refit" factors
of :func:`sepify.rewrite.factorize.fit`, on the original model's inputs), and the model's outputs
are compared with the original's on the *sensitivity samples* (the held-out calibration samples,
at most ``samples`` of them; the fit samples when there is no holdout):

    D_l(r) = sum_k D_k(y_k, y~_k)       (over the graph outputs k the layer reaches)

- ``kl`` outputs (probabilities: non-negative, summing to 1 over the last axis; log-probabilities:
  ``logsumexp`` 0 over the last axis; logits: produced by Gemm/MatMul through shape-only ops, the
  last axis having at least 2 entries): the mean over positions of ``KL(p || p~)`` in nats, with
  ``p = softmax`` of the logits;
- ``rel`` outputs (everything else): ``sum ||y~ - y||^2 / sum ||y - mean_c(y)||^2`` over the
  samples (the normalisation of the per-layer errors).

Only the suffix of the graph that depends on the layer's output runs for each option: the original
model runs once per sample, returning the layer's input and every tensor the suffix reads from
outside it; the option's output is a dense Conv with the pair's equivalent kernel
(:func:`~sepify.rewrite.factorize.reconstruct`, exactly the pair's output, linear in its input).

Between measured ranks, the *amplification* ``a_l(r) = D_l(r) / eps_l(r)^2`` (how much of the
layer's relative output distortion reaches the model's outputs) is interpolated linearly in ``r``
and held constant past the last measured rank, and the allocator's additive error is

    e_l(o, r) = a_l(r) * eps_l(o, r)^2

for both orientations (the amplification is a property of where the layer sits; measured in the
orientation whose rank-1 error is lower). The errors stay additive across layers: a first-order
model (small, independent distortions add), checked in ``bench/bench_sensitivity.py`` against the
distortion of the whole rewritten model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..model.graph import outer_inputs

DEFAULT_RANKS = (1, 2, 4)
DEFAULT_SAMPLES = 16
_SHAPE_ONLY = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"}
_LOGIT_OPS = {"Gemm", "MatMul", "FusedMatMul", "FusedGemm"}


# --- distortion of one output ------------------------------------------------------------------
def _logits_producer(model: onnx.ModelProto, name: str) -> bool:
    """Is graph output ``name`` produced by a Gemm/MatMul through shape-only ops (a logits head)?"""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    n = producer.get(name)
    for _ in range(32):
        if n is None:
            return False
        if n.op_type in _LOGIT_OPS:
            return True
        if n.op_type not in _SHAPE_ONLY or not n.input:
            return False
        n = producer.get(n.input[0])
    return False


def output_kind(y: np.ndarray, logits_head: bool, mode: str = "auto") -> str:
    """``"probs"``, ``"logprobs"``, ``"logits"`` (each compared by KL) or ``"rel"`` for one
    graph output whose original value (first sample) is ``y``."""
    if mode == "rel" or not np.issubdtype(y.dtype, np.floating) or y.ndim == 0 or y.shape[-1] < 2:
        return "rel"
    y64 = y.astype(np.float64)
    if np.all(y64 >= 0) and np.allclose(y64.sum(-1), 1.0, atol=1e-3):
        return "probs"
    if np.all(y64 <= 1e-6):
        lse = np.log(np.exp(y64).sum(-1))
        if np.allclose(lse, 0.0, atol=1e-3):
            return "logprobs"
    if logits_head or mode == "kl":
        return "logits"
    return "rel"


def _log_probs(y: np.ndarray, kind: str) -> np.ndarray:
    y = y.astype(np.float64)
    if kind == "probs":
        return np.log(np.maximum(y, 1e-30))
    if kind == "logprobs":
        return y
    y = y - y.max(-1, keepdims=True)
    return y - np.log(np.exp(y).sum(-1, keepdims=True))


class _Acc:
    """Distortion of one output over samples: KL sums and position counts, or the rel sums."""

    def __init__(self, kind: str):
        self.kind = kind
        self.num = 0.0
        self.den = 0.0  # rel: sum ||y - mean||^2 (filled from the reference); kl: positions

    def add(self, ref: np.ndarray, new: np.ndarray, ref_stats: "_Ref", lp: np.ndarray | None = None) -> None:
        """``lp``: the reference's log-probabilities when already computed (one per sample)."""
        if self.kind == "rel":
            self.num += float(np.sum((new.astype(np.float64) - ref.astype(np.float64)) ** 2))
            return
        lp = _log_probs(ref, self.kind) if lp is None else lp
        lq = _log_probs(new, self.kind)
        kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
        self.num += float(np.sum(np.maximum(kl, 0.0)))
        self.den += kl.size

    def value(self, ref_stats: "_Ref") -> float:
        if self.kind == "rel":
            den = ref_stats.variance_sum()
            return self.num / den if den > 0 else (0.0 if self.num == 0 else math.inf)
        return self.num / self.den if self.den else 0.0


@dataclass
class _Ref:
    """Running per-channel statistics of an original output (the ``rel`` normaliser)."""

    sum_c: np.ndarray | float = 0.0
    sum_sq: float = 0.0
    count: int = 0

    def add(self, y: np.ndarray) -> None:
        y = y.astype(np.float64)
        axes = tuple(i for i in range(y.ndim) if i != min(1, y.ndim - 1))
        self.sum_c = self.sum_c + (y.sum(axis=axes) if y.ndim else y)
        self.sum_sq += float(np.sum(y * y))
        self.count += y.size // (y.shape[min(1, y.ndim - 1)] if y.ndim else 1)

    def variance_sum(self) -> float:
        if not self.count:
            return 0.0
        return self.sum_sq - float(np.sum(np.square(self.sum_c))) / self.count


# --- the suffix of one layer ---------------------------------------------------------------------
def _descendants(model: onnx.ModelProto, tensor: str) -> list[int]:
    """Indices (graph order) of the nodes that depend on ``tensor``."""
    g = model.graph
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for t in set(list(n.input) + outer_inputs(n)):
            if t:
                consumers.setdefault(t, []).append(i)
    seen: set[int] = set()
    stack = list(consumers.get(tensor, []))
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for o in g.node[i].output:
            stack.extend(consumers.get(o, []))
    return sorted(seen)


@dataclass
class _Suffix:
    nodes: list[int]
    reads: list[str]  # tensors from outside the suffix (not initializers), the layer's output first
    outputs: list[str]  # graph outputs the suffix computes
    session: object = None


def _suffix(model: onnx.ModelProto, tensor: str, inits: set[str], graph_outputs: list[str]) -> _Suffix:
    g = model.graph
    nodes = _descendants(model, tensor)
    made = {o for i in nodes for o in g.node[i].output if o}
    reads = [tensor]
    for i in nodes:
        for t in list(g.node[i].input) + outer_inputs(g.node[i]):
            if t and t not in made and t not in inits and t not in reads:
                reads.append(t)
    outs = [o for o in graph_outputs if o in made]
    if tensor in graph_outputs:
        outs.insert(0, tensor)
    return _Suffix(nodes, reads, outs)


def _elem_type(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def _options_model(node: onnx.NodeProto, x: np.ndarray, kernels: list[tuple[np.ndarray, np.ndarray]],
                   opset: list) -> onnx.ModelProto:
    """One Conv per option with the option's dense equivalent kernel and bias (the Conv's own
    attributes): outputs ``opt0, opt1, ...``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes, inits, outs = [], [], []
    for j, (w, b) in enumerate(kernels):
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.astype(x.dtype)), f"w{j}"),
                  numpy_helper.from_array(np.ascontiguousarray(b.astype(x.dtype)), f"b{j}")]
        nodes.append(helper.make_node("Conv", ["x", f"w{j}", f"b{j}"], [f"opt{j}"], **attrs))
        outs.append(helper.make_tensor_value_info(f"opt{j}", _elem_type(x), None))
    graph = helper.make_graph(nodes, "sensitivity_options",
                              [helper.make_tensor_value_info("x", _elem_type(x), [None] * x.ndim)], outs, inits)
    m = helper.make_model(graph, opset_imports=[o for o in opset if o.domain in ("", "ai.onnx")])
    m.ir_version = 8
    return m


# --- the measurement -----------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """Measured distortion of the model's outputs with this layer alone rewritten."""

    name: str
    orientation: str  # where it was measured
    ranks: list[int]
    distortion: list[float]  # D_l(r) at ``ranks``
    rel_error: list[float]  # eps_l(r) (the refit's predicted relative output error) at ``ranks``
    seconds: float = 0.0
    measured: bool = True  # False: onnxruntime could not run its suffix (amplification 1)

    @property
    def amplification(self) -> list[float]:
        return [d / (e * e) if e > 0 else 0.0 for d, e in zip(self.distortion, self.rel_error)]

    def factor(self, rank: int) -> float:
        """a_l(rank): linear in rank between the measured ranks, constant past the ends."""
        amp = self.amplification
        if not amp:
            return 1.0
        return float(np.interp(rank, self.ranks, amp))

    def to_dict(self) -> dict:
        return {"orientation": self.orientation, "ranks": list(self.ranks),
                "distortion": [float(x) for x in self.distortion],
                "rel_error": [float(x) for x in self.rel_error],
                "amplification": [float(x) for x in self.amplification], "measured": self.measured}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "LayerSensitivity":
        return cls(name, d["orientation"], list(d["ranks"]), list(d["distortion"]), list(d["rel_error"]),
                   measured=bool(d.get("measured", True)))


def measured_ranks(c, orientation: str, ranks: Sequence[int] = DEFAULT_RANKS) -> list[int]:
    """The ranks of ``ranks`` at which ``c`` saves MACs (at least rank 1)."""
    sp = c.spectra[orientation]
    got = [r for r in ranks if r <= sp.max_rank and c.saves(orientation, r)]
    return got or [1]


def measure(model: onnx.ModelProto, cands: list, stats: Mapping[str, object], curves: Mapping[str, Mapping],
            samples: Sequence[Mapping], *, ranks: Sequence[int] = DEFAULT_RANKS, distortion: str = "auto",
            threads: int | None = None, progress=None, method: str = "refit") -> dict[str, LayerSensitivity]:
    """Per candidate: :class:`LayerSensitivity` (see the module docstring). ``model``: the
    prepared model with weights in memory; ``stats``: phase-1 LayerStats per candidate name;
    ``curves``: per candidate name and orientation, eps at ranks 1..max (chooses the
    orientation); ``samples``: feed dicts."""
    from .calibrate import prefix, run, session
    from .factorize import fit, reconstruct

    progress = progress or (lambda message: None)
    if not cands or not samples:
        return {}
    g = model.graph
    inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = [o.name for o in g.output]
    plans = []
    t0 = time.perf_counter()
    for c in cands:
        per = curves[c.node.name]
        o = min(per, key=lambda k: float(per[k][0]))
        rs = measured_ranks(c, o, ranks)
        kernels, errs = [], []
        for r in rs:
            f = fit(c.weight, c.bias, c.group, o, r, stats[c.node.name], method=method)
            kernels.append((reconstruct(f.first, f.second, o, c.group, c.weight.shape), f.bias))
            errs.append(float(f.error))
        y_name = c.bn.output[0] if c.bn is not None else c.node.output[0]
        plans.append((c, o, rs, kernels, errs, y_name, _suffix(model, y_name, inits, graph_outputs)))
    fit_seconds = time.perf_counter() - t0
    fetch = list(dict.fromkeys(graph_outputs + [t for p in plans for t in [p[0].node.input[0]] + p[6].reads
                                                  if t not in graph_inputs]))
    notes: list[str] = []
    orig = session(prefix(model, fetch), threads)
    accs: dict[str, list[dict[str, _Acc]]] = {}
    refs: dict[str, _Ref] = {o: _Ref() for o in graph_outputs}
    kinds: dict[str, str] = {}
    opts_sess: dict[str, object] = {}
    failed: dict[str, str] = {}
    spent = {p[0].node.name: 0.0 for p in plans}
    progress(f"calibration: sensitivity of {len(plans)} conv(s) to the model's outputs on {len(samples)} samples")
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sepify-sensitivity")
    try:
        for s, feed in enumerate(samples):
            values = dict(zip(fetch, run(orig, fetch, feed)))
            values.update({k: np.asarray(v) for k, v in feed.items()})
            if not kinds:
                kinds = {o: output_kind(values[o], _logits_producer(model, o), distortion) for o in graph_outputs}
            for o in graph_outputs:
                refs[o].add(values[o])
            ref_lp = {o: _log_probs(values[o], kinds[o]) for o in graph_outputs if kinds[o] != "rel"}

            def one(plan, values=values, ref_lp=ref_lp):
                c, o, rs, kernels, errs, y_name, sx = plan
                name = c.node.name
                if name in failed:
                    return
                t1 = time.perf_counter()
                x = values[c.node.input[0]]
                try:
                    if name not in opts_sess:
                        opts_sess[name] = session(_options_model(c.node, x, kernels, list(model.opset_import)), threads)
                        inner = [t for t in sx.outputs if t != sx.reads[0]]
                        # the suffix: the graph from the layer's output and the tensors read from outside
                        given = {t: values[t] for t in sx.reads if t not in graph_inputs}
                        sx.session = session(prefix(model, inner, given), threads) if inner else None
                        accs[name] = [{out: _Acc(kinds[out]) for out in sx.outputs} for _ in rs]
                    ys = run(opts_sess[name], [f"opt{j}" for j in range(len(rs))], {"x": x})
                    for j, y in enumerate(ys):
                        got = {}
                        if sx.session is not None:
                            feed_s = {t: values[t] for t in list(sx.reads[1:]) + [i.name for i in g.input]
                                      if t in values}
                            feed_s[sx.reads[0]] = y
                            inner = [t for t in sx.outputs if t != sx.reads[0]]
                            got = dict(zip(inner, run(sx.session, inner, feed_s)))
                        if sx.reads[0] in sx.outputs:  # the layer's output is itself a graph output
                            got[sx.reads[0]] = y
                        for out in sx.outputs:
                            accs[name][j][out].add(values[out], got[out], refs[out], ref_lp.get(out))
                except Exception as e:  # noqa: BLE001 - a suffix onnxruntime cannot run: unweighted, with a note
                    failed[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                spent[name] += time.perf_counter() - t1

            # the layers' option and suffix runs in two threads (onnxruntime releases the GIL; one
            # intra-op thread each): every layer's sums still go sample by sample, in the same order
            before = set(failed)
            list(pool.map(one, plans))
            notes.extend(f"sensitivity of {p[0].node.name} not measured (its error counts unweighted): "
                         f"{failed[p[0].node.name]}" for p in plans if p[0].node.name in failed and p[0].node.name not in before)
    finally:
        pool.shutdown(wait=True)
    out = {}
    for c, o, rs, kernels, errs, y_name, sx in plans:
        name = c.node.name
        if name in failed:
            dist = [e * e for e in errs]  # amplification 1: the unweighted error
        else:
            dist = [sum(a.value(refs[k]) for k, a in accs.get(name, [{}] * len(rs))[j].items()) for j in range(len(rs))]
        out[name] = LayerSensitivity(name, o, list(rs), dist, errs, round(spent[name] + fit_seconds / len(plans), 4),
                                     measured=name not in failed)
    out["__kinds__"] = kinds  # type: ignore[assignment]
    out["__notes__"] = notes  # type: ignore[assignment]
    return out


def additive(sens: LayerSensitivity, rel: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The allocator's additive errors ``a_l(r) * eps_l(o, r)^2`` per orientation, ranks 1..max."""
    out = {}
    for o, eps in rel.items():
        eps = np.asarray(eps, dtype=np.float64)
        factors = np.array([sens.factor(r) for r in range(1, len(eps) + 1)])
        out[o] = factors * np.square(eps)
    return out


# --- the cache -----------------------------------------------------------------------------------
def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else ``$SEPIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/sepify``, else ``~/.cache/sepify``."""
    if explicit:
        return Path(explicit)
    if os.environ.get("SEPIFY_CACHE_DIR"):
        return Path(os.environ["SEPIFY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sepify"


def cache_key(model: onnx.ModelProto, data, settings: Mapping) -> str:
    """sha256 of the model's bytes, every calibration sample (fit and holdout, in order) and the
    settings that change the tables."""
    from .. import __version__

    h = hashlib.sha256()
    h.update(model.SerializeToString(deterministic=True))
    for part in (data.fit, data.holdout):
        h.update(b"|part|")
        for feed in part:
            for k in sorted(feed):
                a = np.ascontiguousarray(feed[k])
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
                h.update(a.tobytes())
    h.update(json.dumps({**settings, "version": __version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class TableCache:
    """Per-model tables of a calibrated rewrite (error curves and sensitivities), one JSON file
    per key in ``folder``; reading or writing problems only turn the cache off (a note)."""

    folder: Path | None
    key: str
    notes: list[str] = field(default_factory=list)
    hit: bool = False

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / f"tables-{self.key[:32]}.json"

    def load(self) -> dict | None:
        p = self.path
        if p is None or not p.is_file():
            return None
        try:
            got = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            self.notes.append(f"cache file {p} unreadable ({type(e).__name__}): recomputed")
            return None
        if got.get("key") != self.key:
            return None
        self.hit = True
        return got

    def save(self, tables: dict) -> None:
        p = self.path
        if p is None:
            return
        from ..fileio import write_bytes

        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(p, json.dumps({"key": self.key, **tables}).encode("utf-8"))
        except OSError as e:
            self.notes.append(f"cache not written to {p} ({e.strerror or type(e).__name__})")
