"""Calibrate: the input statistics of candidate Convs, collected with onnxruntime.

For a Conv with weight ``(N, Mg, *k)`` and group ``g``, a *patch* of its input at one output
position is, per group ``j``, the vector of the ``Mg * K`` input values the kernel reads
(channel-major, the kernel flattened in C order, exactly as ``W[n, m_local, k1, k2]``
flattens): the layer is ``y = W_j x + b`` on it. The factorization needs only the first and
second moments of these patches (:class:`~sepify.rewrite.factorize.LayerStats`), so memory
is bounded by the layers' sizes (``g * (Mg*K)^2`` per layer), not by the number of samples:

- **rows**: at most ``rows`` patch rows per layer in total (default :data:`DEFAULT_ROWS`),
  ``ceil(rows / fit samples)`` output positions per sample drawn without replacement with a
  seeded RNG (the same positions for a sample in every pass, so the original and the
  rewritten model's patches pair up); all positions when a sample has fewer;
- **padding**: ``auto_pad`` is resolved to explicit ``pads`` (SAME_UPPER / SAME_LOWER as
  onnxruntime computes them) and the input zero-padded, as the Conv pads it.

onnxruntime runs a *modified copy* of the model (never the input file): the candidates'
input tensors become graph outputs, and every pass runs only the *prefix* of the graph needed
for the tensors it asks for (onnxruntime 1.x computes every node of a session, requested or
not, measured: so the prefix is cut out before the session is made).

Passes (``F`` = fit samples, ``L`` = rewritten layers):

- phase 1: one pass over the fit samples on the original model, all candidates at once
  (``x~ == x``);
- phase 2 (sequential / asymmetric, Zhang et al. 1505.06798): per chosen layer in topological
  order, the original model's input ``x`` of that layer and the input ``x~`` the working model
  (earlier layers already rewritten) feeds it, both as prefixes: about ``L`` whole-model passes
  over the fit samples in total;
- measurement: one pass of the original and one of the rewritten model over the holdout
  samples, comparing every rewritten layer's output tensor (the pair's second Conv keeps the
  original output's name).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import ModelError
from ..model.graph import outer_inputs
from ..model.symdims import window

DEFAULT_ROWS = 16384
"""Patch rows accumulated per layer (``--calib-rows``)."""

REFIT_GAIN = 0.01
"""A kept Conv's refit is used only when it lowers its predicted relative output error by at
least this fraction (otherwise the Conv stays exactly as it was)."""

REFIT_MIN_ERROR = 1e-3
"""...and only when the drift of its inputs makes its predicted relative output error at least
this large (a full-rank rewrite upstream is exact: its kept Convs stay as they were)."""



# --- onnxruntime -----------------------------------------------------------------------------
def session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # numpy works between runs: idle onnxruntime threads must not spin and steal its cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model for calibration: {str(e).splitlines()[0][:300]}") from None


def run(sess, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(names, dict(feed))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"onnxruntime failed on a calibration sample: {str(e).splitlines()[0][:300]}") from None


def prefix(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs``: the nodes they need (subgraph reads
    included), their initializers, every graph input kept (feeds stay valid)."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    need: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        n = g.node[i]
        stack.extend(producer[t] for t in list(n.input) + outer_inputs(n) if t in producer)
    used = {t for i in need for t in list(g.node[i].input) + outer_inputs(g.node[i])} | set(outputs)
    out = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, f, getattr(model, f))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    ng = out.graph
    ng.name = g.name
    ng.input.extend(g.input)
    ng.node.extend(g.node[i] for i in sorted(need))
    ng.initializer.extend(t for t in g.initializer if t.name in used)
    ng.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
    types = {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}
    for o in outputs:
        vi = onnx.ValueInfoProto()
        if o in types:
            vi.CopyFrom(types[o])
        vi.name = o
        ng.output.append(vi)
    return out


def materialize(model: onnx.ModelProto, base_dir: str | None) -> onnx.ModelProto:
    """A copy with external data read into memory (onnxruntime runs it from bytes)."""
    from ..fileio import has_external_data

    out = onnx.ModelProto()
    out.CopyFrom(model)
    if has_external_data(out):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(out, base_dir or ".")
    return out


# --- conv geometry and patches ---------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...
    group: int


def geometry(node: onnx.NodeProto, weight_shape: Sequence[int], in_spatial: Sequence[int]) -> ConvGeometry:
    """The Conv's attributes with ``auto_pad`` resolved to explicit pads for ``in_spatial``."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    strides = tuple(a.get("strides", [1] * nd))
    dil = tuple(a.get("dilations", [1] * nd))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-int(in_spatial[i]) // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - int(in_spatial[i]))
            small, big = total // 2, total - total // 2
            b, e = (small, big) if auto == "SAME_UPPER" else (big, small)
            begin.append(b)
            end.append(e)
        pads = tuple(begin + end)
    elif auto == "VALID":
        pads = (0,) * (2 * nd)
    else:
        pads = tuple(a.get("pads", [0] * (2 * nd)))
    return ConvGeometry(kernel, strides, dil, pads, int(a.get("group", 1)))


def out_spatial(geo: ConvGeometry, in_spatial: Sequence[int]) -> tuple[int, ...]:
    nd = len(geo.kernel)
    return tuple(window(int(in_spatial[i]), geo.kernel[i], geo.strides[i], geo.dilations[i], geo.pads[i],
                        geo.pads[i + nd]) for i in range(nd))


def gather_patches(x: np.ndarray, geo: ConvGeometry, flat: np.ndarray) -> np.ndarray:
    """Patches of ``x`` (B, M, *spatial) at output positions ``flat`` (indices into
    (B, *out_spatial) in C order): (rows, g, Mg*K), index ``m_local*K + k``
    (:func:`sepify.rewrite.factorize.patches` with the resolved pads)."""
    from .factorize import patches

    return patches(x, geo.kernel, geo.strides, geo.pads, geo.dilations, geo.group, positions=flat)


def positions(rng_key: tuple, total: int, count: int) -> np.ndarray:
    """``count`` distinct indices of ``range(total)`` (all when fewer), seeded by ``rng_key``."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(rng_key).choice(total, size=count, replace=False))


# --- accumulation ----------------------------------------------------------------------------
def _empty_stats(geo: ConvGeometry, channels: int, paired: bool):
    from .factorize import LayerStats

    return LayerStats.zeros(geo.group, (channels // geo.group) * math.prod(geo.kernel), same=not paired)


@dataclass
class Layer:
    """What calibration needs of a candidate Conv."""

    name: str
    input: str  # the Conv's input tensor
    output: str  # the tensor the rewritten pair produces (the BN's output when folded)
    node: onnx.NodeProto
    weight_shape: tuple[int, ...]
    key: int  # stable index for the position RNG


def _rows_per_sample(rows: int, n_samples: int) -> int:
    return max(1, -(-int(rows) // max(1, n_samples)))


def _sample_rows(layer: Layer, arr: np.ndarray, seed: int, sample: int, per_sample: int) -> np.ndarray:
    geo = geometry(layer.node, layer.weight_shape, arr.shape[2:])
    total = arr.shape[0] * math.prod(out_spatial(geo, arr.shape[2:]))
    return positions((seed, layer.key, sample), total, per_sample), geo


_BATCH_ROWS = 2048


class _Rows:
    """Patch rows of one layer, buffered and folded into its LayerStats ``_BATCH_ROWS`` at a
    time: one GEMM per batch instead of one per sample (a sample gives ~100 rows, and
    accumulating them alone rewrites the whole d x d moment matrices every sample: measured,
    the statistics took most of a calibrated ResNet-50 rewrite that way).

    ``known``: the layer's phase-1 statistics (the original model's input at the same samples
    and positions), whose ``sum_x`` / ``xx`` ARE the paired statistics' ``sum_t`` / ``tt``: only
    ``x~ x~^T`` and ``x x~^T`` are accumulated then."""

    def __init__(self, geo: ConvGeometry, channels: int, paired: bool, known=None):
        self.paired, self.known = paired, known
        self.size = (channels // geo.group) * math.prod(geo.kernel)
        self.group = geo.group
        self.xs: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []
        self.count = 0
        if paired and known is not None:
            g, d = self.group, self.size
            self.n, self.sum_x, self.xx, self.tx = 0, np.zeros((g, d)), np.zeros((g, d, d)), np.zeros((g, d, d))
        else:
            self.stats = _empty_stats(geo, channels, paired)

    def add(self, x_rows: np.ndarray, t_rows: np.ndarray | None = None) -> None:
        self.xs.append(x_rows)
        if t_rows is not None:
            self.ts.append(t_rows)
        self.count += len(x_rows)
        if self.count >= _BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.xs:
            return
        x = np.concatenate(self.xs)
        t = np.concatenate(self.ts) if self.ts else None
        self.xs, self.ts, self.count = [], [], 0
        if not (self.paired and self.known is not None):
            self.stats.accumulate(x, t)
            return
        for a in (x, t):
            if not np.all(np.isfinite(a)):
                raise ModelError("a calibration sample makes a layer input NaN or infinite")
        xc = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float64)  # (g, rows, d)
        tc = np.ascontiguousarray(t.transpose(1, 0, 2), dtype=np.float64)
        self.n += x.shape[0]
        self.sum_x += xc.sum(axis=1)
        self.xx += np.matmul(xc.transpose(0, 2, 1), xc)
        self.tx += np.matmul(tc.transpose(0, 2, 1), xc)

    def result(self):
        self.flush()
        if not (self.paired and self.known is not None):
            return self.stats
        from .factorize import LayerStats

        k = self.known
        if k.n != self.n:  # pragma: no cover - the same samples and positions by construction
            raise RuntimeError(f"phase-1 and phase-2 row counts differ ({k.n} != {self.n})")
        return LayerStats(self.n, self.sum_x, k.sum_x, self.xx, self.tx, k.xx)


def collect_same(model: onnx.ModelProto, layers: list[Layer], samples: Sequence[Mapping], *, rows: int = DEFAULT_ROWS,
                 seed: int = 0, threads: int | None = None) -> dict[str, object]:
    """Phase 1: per layer, LayerStats of its input on the ORIGINAL model (x~ == x), one pass."""
    names = list(dict.fromkeys(layer.input for layer in layers))
    sess = session(prefix(model, names), threads)
    acc: dict[str, _Rows] = {}
    per = _rows_per_sample(rows, len(samples))
    for s, feed in enumerate(samples):
        got = dict(zip(names, run(sess, names, feed)))
        for layer in layers:
            x = got[layer.input]
            flat, geo = _sample_rows(layer, x, seed, s, per)
            if layer.name not in acc:
                acc[layer.name] = _Rows(geo, x.shape[1], paired=False)
            acc[layer.name].add(gather_patches(x, geo, flat))
    return {k: a.result() for k, a in acc.items()}


def collect_paired(original_sess, working: onnx.ModelProto, layer: Layer, samples: Sequence[Mapping], *,
                   rows: int = DEFAULT_ROWS, seed: int = 0, threads: int | None = None, known=None,
                   t_rows: Sequence[np.ndarray] | None = None, x_values: Sequence[np.ndarray] | None = None):
    """Phase 2 for one layer: x from ``original_sess`` (a session computing ``layer.input``
    on the original model), x~ from the working model's prefix; same positions per sample.
    ``known``: the layer's phase-1 statistics, when computed (see :class:`_Rows`).
    ``t_rows``: the original input's patch rows per sample at the same positions, when cached
    (:func:`collect_rows`): ``original_sess`` is then not run. ``x_values``: the working
    model's ``layer.input`` per sample, when computed already (:class:`Frontier`)."""
    sess = session(prefix(working, [layer.input]), threads) if x_values is None else None
    acc = None
    per = _rows_per_sample(rows, len(samples))
    for s, feed in enumerate(samples):
        (x,) = run(sess, [layer.input], feed) if x_values is None else (x_values[s],)
        if t_rows is not None:
            flat, geo = _sample_rows(layer, x, seed, s, per)
            t_patch = t_rows[s]
        else:
            (t,) = run(original_sess, [layer.input], feed)
            flat, geo = _sample_rows(layer, t, seed, s, per)
            t_patch = gather_patches(t, geo, flat)
        if acc is None:
            acc = _Rows(geo, x.shape[1], paired=True, known=known)
        acc.add(gather_patches(x, geo, flat), t_patch)
    return acc.result()


class Frontier:
    """The working model's values, per sample, at a cut through the graph: each phase-2 pass
    computes only the nodes between the previous layer's input and this layer's input
    (about one whole-model pass over the fit samples in all, instead of one prefix per layer).

    Valid because the layers are visited in topological order and the working model only changes
    at (or after) the layer just visited: every value kept is upstream of every later change.
    After each step only the tensors that a node not yet computed reads are kept; past
    ``budget`` bytes the frontier gives up (``compute`` returns None; the caller runs the prefix)."""

    def __init__(self, samples: Sequence[Mapping], threads: int | None = None, budget: int | None = None):
        self.values = [dict(feed) for feed in samples]
        self.threads, self.budget = threads, ROWS_CACHE_BYTES if budget is None else budget
        self.computed: set[str] = set()  # tensors whose values are in (or were dropped from) self.values
        self.alive = True

    def compute(self, model: onnx.ModelProto, tensor: str) -> list[np.ndarray] | None:
        if not self.alive or not self.values:
            return None
        g = model.graph
        inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        have = set(self.values[0])
        producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        need: set[int] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if not t or t in have or t in inits or t not in producer:
                continue
            i = producer[t]
            if i in need:
                continue
            need.add(i)
            n = g.node[i]
            stack.extend(list(n.input) + outer_inputs(n))
        if any(t in self.computed and t not in have for i in need for t in g.node[i].input):
            self.alive = False  # a value dropped earlier is needed again: not a valid cut
            return None
        made = {o for i in need for o in g.node[i].output if o}
        reads = sorted({t for i in need for t in list(g.node[i].input) + outer_inputs(g.node[i])
                        if t and t in have})
        rest = [n for i, n in enumerate(g.node) if i not in need and not all(
            o in self.computed or o in made or not o for o in n.output)]
        later = {t for n in rest for t in list(n.input) + outer_inputs(n)} | {o.name for o in g.output}
        keep_made = sorted(t for t in made if t in later or t == tensor)
        outputs = list(dict.fromkeys([tensor] + keep_made))
        if need:
            m = onnx.ModelProto()
            for f in ("ir_version", "producer_name", "domain"):
                setattr(m, f, getattr(model, f))
            m.opset_import.extend(model.opset_import)
            m.functions.extend(model.functions)
            m.graph.name = "frontier"
            first = self.values[0]
            for t in reads:
                a = np.asarray(first[t])
                m.graph.input.append(onnx.helper.make_tensor_value_info(
                    t, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim))
            m.graph.node.extend(g.node[i] for i in sorted(need))
            used = {t for i in need for t in list(g.node[i].input) + outer_inputs(g.node[i])}
            m.graph.initializer.extend(t for t in g.initializer if t.name in used)
            m.graph.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
            for t in outputs:
                m.graph.output.append(onnx.ValueInfoProto(name=t))
            sess = session(m, self.threads)
            for vals in self.values:
                vals.update(zip(outputs, run(sess, outputs, {t: vals[t] for t in reads})))
        self.computed |= made
        out = [vals[tensor] for vals in self.values]
        # keep what a node not yet computed (or a graph output) reads; graph inputs stay
        inputs = {i.name for i in g.input}
        keep = (later | inputs) - {""}
        size = 0
        for vals in self.values:
            for t in list(vals):
                if t not in keep:
                    del vals[t]
            size += sum(np.asarray(v).nbytes for v in vals.values())
        if size > self.budget:
            self.alive = False
            self.values = []
        return out


ROWS_CACHE_BYTES = 2 * 1024 ** 3
"""At most this many bytes of the original model's patch rows kept for the sequential fit
(:func:`collect_rows`); layers past it run the original prefix again in their phase-2 pass."""


def collect_rows(model: onnx.ModelProto, layers: list[Layer], samples: Sequence[Mapping], *, rows: int = DEFAULT_ROWS,
                 seed: int = 0, threads: int | None = None, budget: int = ROWS_CACHE_BYTES) -> dict[str, list]:
    """The ORIGINAL model's patch rows of ``layers``' inputs, per sample at the positions the
    phase-2 pass samples (the same RNG keys), from ONE pass over ``samples``: each phase-2 pass
    then runs only the working model. Layers are taken in order while the rows fit ``budget``
    bytes (the first sample's size times the samples); the others are not in the result."""
    out: dict[str, list] = {}
    if not layers or not samples:
        return out
    per = _rows_per_sample(rows, len(samples))
    names = list(dict.fromkeys(layer.input for layer in layers))
    sess = session(prefix(model, names), threads)
    keep: list[Layer] | None = None
    for s, feed in enumerate(samples):
        got = dict(zip(names, run(sess, names, feed)))
        if keep is None:
            keep, used = [], 0
            for layer in layers:
                x = got[layer.input]
                flat, geo = _sample_rows(layer, x, seed, 0, per)
                size = len(flat) * (x.shape[1] // geo.group) * math.prod(geo.kernel) * geo.group * x.itemsize
                if used + size * len(samples) > budget:
                    continue
                used += size * len(samples)
                keep.append(layer)
                out[layer.name] = []
        for layer in keep:
            x = got[layer.input]
            flat, geo = _sample_rows(layer, x, seed, s, per)
            out[layer.name].append(gather_patches(x, geo, flat))
    return out


# --- the working model -----------------------------------------------------------------------
def splice(model: onnx.ModelProto, layer: Layer, orientation: str, first: np.ndarray, second: np.ndarray,
           bias: np.ndarray | None, drop: Iterable[str] = ()) -> None:
    """Replace ``layer``'s Conv (and the nodes named in ``drop``, e.g. a folded BN) in
    ``model`` (in place) by the factor pair: the calibration working model (the written model
    is built by :mod:`.emit`)."""
    g = model.graph
    idx = next(i for i, n in enumerate(g.node) if n.name == layer.name)
    conv = g.node[idx]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    spatial = {k: v for k, v in attrs.items() if k in ("auto_pad", "pads", "strides", "dilations", "kernel_shape")}
    nd = len(layer.weight_shape) - 2
    point = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd), "dilations": [1] * nd}
    group = int(attrs.get("group", 1))
    base = f"__calib__/{layer.name}"
    mid = f"{base}/mid"
    w1, w2, b2 = f"{base}/w1", f"{base}/w2", f"{base}/b"
    if orientation == "dw-first":
        a1 = dict(spatial, group=int(layer.weight_shape[1] * group))
        a2 = dict(point, group=group)
    else:
        a1 = dict(point, group=group)
        a2 = dict(spatial, group=int(layer.weight_shape[0]))
    n1 = onnx.helper.make_node("Conv", [layer.input, w1], [mid], name=f"{base}/1", **a1)
    n2 = onnx.helper.make_node("Conv", [mid, w2] + ([b2] if bias is not None else []), [layer.output], name=f"{base}/2", **a2)
    from onnx import numpy_helper

    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(first), w1),
                          numpy_helper.from_array(np.ascontiguousarray(second), w2)])
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(first.dtype)), b2))
    dropped = set(drop)
    keep = [n for i, n in enumerate(g.node) if i != idx and n.name not in dropped]
    keep.insert(min(idx, len(keep)), n1)
    keep.insert(min(idx + 1, len(keep)), n2)
    del g.node[:]
    g.node.extend(keep)


def replace_dense(model: onnx.ModelProto, layer: Layer, weight: np.ndarray, bias: np.ndarray | None,
                  drop: Iterable[str] = ()) -> None:
    """Give ``layer``'s Conv (in place) new weights, with a folded BN (``drop``) removed: the
    calibration working model's copy of a refitted kept Conv."""
    g = model.graph
    idx = next(i for i, n in enumerate(g.node) if n.name == layer.name)
    conv = g.node[idx]
    base = f"__calib__/{layer.name}"
    from onnx import numpy_helper

    new = onnx.NodeProto()
    new.CopyFrom(conv)
    del new.input[:]
    new.input.extend([conv.input[0], f"{base}/w"] + ([f"{base}/b"] if bias is not None else []))
    del new.output[:]
    new.output.append(layer.output)
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(weight), f"{base}/w")])
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(weight.dtype)), f"{base}/b"))
    dropped = set(drop)
    keep = [n for i, n in enumerate(g.node) if i != idx and n.name not in dropped]
    keep.insert(min(idx, len(keep)), new)
    del g.node[:]
    g.node.extend(keep)


# --- measurement -----------------------------------------------------------------------------
def measure_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, tensors: list[str],
                    samples: Sequence[Mapping], threads: int | None = None) -> dict[str, float]:
    """Relative output error per tensor on ``samples``:
    ``sqrt(sum ||y~ - y||^2 / sum ||y - mean_c(y)||^2)`` with the per-channel mean over all
    samples and positions (the same normalisation as the predicted error: the fraction of the
    original output's variance that the rewrite gets wrong)."""
    if not samples or not tensors:
        return {}
    s1, s2 = session(prefix(original, tensors), threads), session(prefix(rewritten, tensors), threads)
    num = dict.fromkeys(tensors, 0.0)
    sy: dict[str, np.ndarray] = {}
    syy = dict.fromkeys(tensors, 0.0)
    cnt = dict.fromkeys(tensors, 0)
    for feed in samples:
        a, b = run(s1, tensors, feed), run(s2, tensors, feed)
        for t, ya, yb in zip(tensors, a, b):
            ya64, yb64 = ya.astype(np.float64), yb.astype(np.float64)
            num[t] += float(np.sum((yb64 - ya64) ** 2))
            axes = tuple(i for i in range(ya64.ndim) if i != 1)
            sy[t] = sy.get(t, 0.0) + ya64.sum(axis=axes)
            syy[t] += float(np.sum(ya64 ** 2))
            cnt[t] += ya64.size // ya64.shape[1]
    out = {}
    for t in tensors:
        den = syy[t] - float(np.sum(sy[t] ** 2)) / cnt[t]
        out[t] = math.sqrt(num[t] / den) if den > 0 else (0.0 if num[t] == 0 else math.inf)
    return out


# --- the math (sepify.rewrite.factorize) -----------------------------------------------------
def layer_curve(c, orientation: str, stats) -> np.ndarray:
    """Predicted relative output error of candidate ``c`` at ranks 1..max_rank (index r - 1),
    from the closed-form refit of the second factor (``output_error_curve(method="refit")``:
    one SVD and one set of normal matrices for all ranks; ALS only lowers these errors)."""
    from .factorize import output_error_curve

    return output_error_curve(c.weight, c.group, orientation, stats)


def layer_fit(c, orientation: str, rank: int, stats, method: str):
    """(first, second, bias, predicted relative output error) of ``c`` at ``rank``."""
    from .factorize import fit

    f = fit(c.weight, c.bias, c.group, orientation, rank, stats, method=method)
    return f.first, f.second, f.bias, float(f.error)

# --- the calibrated flow ---------------------------------------------------------------------
def _ancestors(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Names of the nodes ``tensor`` depends on."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    seen: set[str] = set()
    stack = [tensor]
    out: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or t not in producer:
            continue
        seen.add(t)
        n = producer[t]
        out.add(n.name)
        stack.extend(list(n.input) + outer_inputs(n))
    return out


class Calibrator:
    """Statistics, fits and measurements of one calibrated rewrite (see the module docstring).

    ``model``: the prepared model with its weights in memory (a private copy: it is never
    written); ``data``: the validated :class:`~sepify.rewrite.data.CalibrationSet`."""

    def __init__(self, model: onnx.ModelProto, data, *, rows: int = DEFAULT_ROWS, seed: int = 0,
                 method: str = "als", sequential: bool = True, threads: int | None = None, progress=None):
        self.model, self.data = model, data
        self.progress = progress or (lambda message: None)  # one line per step, e.g. to stderr
        self.rows, self.seed, self.method, self.sequential, self.threads = rows, seed, method, sequential, threads
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, int] = {"phase1": 0, "phase2": 0, "holdout": 0}
        self.same: dict[str, object] = {}

    def _time(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    @staticmethod
    def layer(c) -> Layer:
        out = c.bn.output[0] if c.bn is not None else c.node.output[0]
        return Layer(c.node.name, c.node.input[0], out, c.node, tuple(c.weight.shape), int(c.index))

    def phase1(self, cands: list) -> dict[str, object]:
        """LayerStats (x~ == x) of ``cands`` from one pass over the fit samples."""
        todo = [c for c in cands if c.node.name not in self.same]
        if todo:
            t0 = time.perf_counter()
            self.progress(f"calibration: input statistics of {len(todo)} conv(s) on {len(self.data.fit)} samples")
            self.same.update(collect_same(self.model, [self.layer(c) for c in todo], self.data.fit, rows=self.rows,
                                          seed=self.seed, threads=self.threads))
            self.passes["phase1"] += 1
            self._time("statistics", t0)
        return {c.node.name: self.same[c.node.name] for c in cands}

    def curves(self, cands: list) -> dict[str, dict[str, np.ndarray]]:
        """Per candidate and orientation: predicted relative output error at ranks 1..max."""
        stats = self.phase1(cands)
        t0 = time.perf_counter()
        out = {c.node.name: {o: layer_curve(c, o, stats[c.node.name]) for o in c.spectra} for c in cands}
        self._time("error curves", t0)
        return out

    def fit(self, chosen: list, kept: Sequence = ()) -> dict[str, tuple]:
        """``chosen``: [(candidate, orientation, rank)] in topological order. Returns
        {name: (first, second, bias, predicted relative output error)}; with ``sequential``
        each layer is fitted on the inputs the already-rewritten model feeds it.

        ``kept``: Convs left dense (:class:`~sepify.rewrite.plan.Kept`, any order). With
        ``sequential``, each one downstream of a rewritten layer is refitted, in topological
        order among the others, to its original output on the inputs the rewritten model feeds it
        (``factorize.refit_dense``), and the refit is used by the layers after it; kept only when
        it lowers the predicted error by at least :data:`REFIT_GAIN` (relative). Its entry in
        ``self.refits``: {name: (weight, bias, error after, error before)}."""
        out: dict[str, tuple] = {}
        self.refits: dict[str, tuple] = {}
        if not chosen:
            return out
        working = None
        done: set[str] = set()
        upstream: dict[str, set[str]] = {}
        for c, _, _ in chosen:  # the rewritten layers each one depends on
            upstream[c.node.name] = (_ancestors(self.model, c.node.input[0]) & done) if self.sequential else set()
            done.add(c.node.name)
        rewritten = set(done)
        steps = [(c.index, 0, c, o, r) for c, o, r in chosen]
        if self.sequential:
            for k in kept:
                if k.node.name in rewritten:
                    continue
                if _ancestors(self.model, k.node.input[0]) & rewritten:
                    steps.append((k.index, 1, k, None, None))
        steps.sort(key=lambda t: (t[0], t[1]))
        self.phase1([c for c, _, _ in chosen if not upstream[c.node.name]])  # one pass for all of them
        paired = [self.layer(c) for _, kind, c, _, _ in steps if kind == 1 or upstream[c.node.name]]
        t0 = time.perf_counter()
        cached = collect_rows(self.model, paired, self.data.fit, rows=self.rows, seed=self.seed, threads=self.threads)
        if paired:
            self.passes["rows"] = self.passes.get("rows", 0) + 1
            self._time("statistics", t0)
        self.rows_cached = {"layers": len(cached), "of": len(paired)}
        frontier = Frontier(self.data.fit, self.threads) if paired else None
        done = set()
        for i, (_, kind, c, o, r) in enumerate(steps):
            layer = self.layer(c)
            what = f"{o} rank {r}" if kind == 0 else "kept: refit"
            self.progress(f"calibration: fitting {c.node.name} ({i + 1}/{len(steps)}, {what})")
            if kind == 0 and not upstream[c.node.name]:
                stats = self.phase1([c])[c.node.name]
            else:
                t0 = time.perf_counter()
                t_rows = cached.pop(c.node.name, None)
                orig = None if t_rows is not None else session(prefix(self.model, [layer.input]), self.threads)
                xv = frontier.compute(working, layer.input) if frontier is not None else None
                # with both inputs in memory no onnxruntime session runs while the moments are
                # accumulated: numpy may use every core then (BLAS threads are otherwise kept at one)
                from threadpoolctl import threadpool_limits

                with threadpool_limits(limits=(os.cpu_count() or 1) if (xv is not None and t_rows is not None) else 1,
                                       user_api="blas"):
                    stats = collect_paired(orig, working, layer, self.data.fit, rows=self.rows, seed=self.seed,
                                           threads=self.threads, known=self.same.get(c.node.name), t_rows=t_rows,
                                           x_values=xv)
                self.passes["phase2"] += 1
                self._time("statistics", t0)
            t0 = time.perf_counter()
            drop = [c.bn.name] if c.bn is not None else []
            if kind == 1:
                from .factorize import refit_dense

                weight, bias, err, err_before = refit_dense(c.weight, c.bias, c.group, stats)
                self._time("fits", t0)
                if err_before < REFIT_MIN_ERROR or not err < (1.0 - REFIT_GAIN) * err_before:
                    continue
                self.refits[c.node.name] = (weight, bias, float(err), float(err_before))
                replace_dense(working, layer, weight, bias, drop=drop)
                continue
            first, second, bias, pred = layer_fit(c, o, r, stats, self.method)
            self._time("fits", t0)
            out[c.node.name] = (first, second, bias, float(pred))
            self.same.pop(c.node.name, None)  # its statistics are not needed again: free them
            if self.sequential:
                if working is None:
                    working = onnx.ModelProto()
                    working.CopyFrom(self.model)
                splice(working, layer, o, first, second, bias, drop=drop)
            done.add(c.node.name)
        self.same.clear()
        return out

    def measure(self, rewritten: onnx.ModelProto, tensors: list[str]) -> dict[str, float]:
        """Measured relative output error per tensor on the holdout samples."""
        if not len(self.data.holdout):
            return {}
        t0 = time.perf_counter()
        self.progress(f"calibration: measuring the rewritten layers on {len(self.data.holdout)} held-out samples")
        got = measure_outputs(self.model, rewritten, tensors, self.data.holdout, self.threads)
        self.passes["holdout"] += 1
        self._time("holdout measurement", t0)
        return got
