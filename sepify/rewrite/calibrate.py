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
  (``x~ == x``). The same pass keeps, as far as the :class:`Budget` (``--calib-cache-mb``)
  allows, each candidate's original input for phase 2 (:class:`Kept`: the sampled patch rows,
  or the input map when smaller), deepest layers first;
- phase 2 (sequential / asymmetric, Zhang et al. 1505.06798), in *waves*: a chosen layer with no
  rewritten layer upstream is wave 0 (its phase-1 statistics suffice), any other one wave
  1 + the largest wave upstream of it. The layers of a wave do not depend on each other's
  rewrite, so one pass collects all their statistics, with every earlier wave spliced into the
  working model: the same statistics as one layer at a time in topological order. ``x`` comes
  from the kept original inputs (an original prefix re-runs only for layers the budget could
  not keep); ``x~`` from an *incremental* run of the working model (:class:`Frontier`): only
  the nodes between the tensors held from earlier waves and the wave's layer inputs. A chain
  like a ResNet thus costs about one working-model pass over the fit samples in total instead
  of ``L`` prefixes of both models; with a zero budget every pass runs its full prefix, as
  before (same result);
- measurement: one pass of the original and one of the rewritten model over the holdout
  samples, comparing every rewritten layer's output tensor (the pair's second Conv keeps the
  original output's name).

Residual targets: a phase-2 layer whose output is read only by a two-input ``Add`` whose other
input ``s`` depends on rewritten or refitted layers is fitted to ``t = W x + s - s~`` (the
original sum minus the drifted branch; ``s`` from the original pass, ``s~`` from the working
model at the same output positions), so that ``A x~ + b + s~`` restores the Add's output; its
errors are normalised by that output's variance (``OutputStats.ref_sum`` / ``ref_sq``). It goes
in a wave after the layers ``s`` depends on (:meth:`Calibrator.fit`); docs/rewrite.md.

Each pass's onnxruntime runs go one sample ahead in a background thread (:func:`ahead`;
onnxruntime releases the GIL) while numpy gathers the previous sample's patches; a third thread
(:class:`Folder`) folds them into the moments (float32 products of shifted rows, summed in
float64: :class:`_Rows`) meanwhile.
Sessions use ``providers`` (``--providers``; default CPU).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import ModelError, UsageError
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
DEFAULT_CACHE_MB = 2048
"""Memory for cached activations, MiB (``--calib-cache-mb``; see :class:`Budget`)."""


def providers_for(names: Sequence[str] | None) -> list[str]:
    """onnxruntime execution providers from ``--providers`` names (``CUDA``, ``CPU``, or the full
    ``CUDAExecutionProvider``; case-insensitive), in the given order; None or empty: CPU.
    A provider this onnxruntime build lacks is a :class:`~sepify.errors.UsageError` (one line,
    naming the available ones)."""
    if not names:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    by_key = {p.lower(): p for p in available}
    by_key.update({p[:-len("ExecutionProvider")].lower(): p for p in available if p.endswith("ExecutionProvider")})
    out = []
    for name in names:
        key = str(name).strip().lower()
        if key not in by_key:
            raise UsageError(f"--providers: {str(name).strip()!r} is not available in this onnxruntime "
                             f"({ort.__version__}); available: {', '.join(available)}")
        if by_key[key] not in out:
            out.append(by_key[key])
    return out


def session(model: onnx.ModelProto, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session of ``model`` for calibration (log silenced, no spinning;
    ``providers``: full onnxruntime names, default CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # numpy works between runs: idle onnxruntime threads must not spin and steal its cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # one intra-op thread unless ``threads`` says otherwise: every pass runs onnxruntime beside
    # numpy's threads (ahead, Folder) or two sessions at once (measure_outputs, sensitivity), and a
    # second intra-op thread per session only oversubscribes the cores (measured on the 2-core VM:
    # a calibrated ResNet-50 rewrite took 10 s less CPU, the same wall time)
    so.intra_op_num_threads = int(threads) if threads else 1
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model for calibration: {str(e).splitlines()[0][:300]}") from None


def run(sess, names: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(names, dict(feed))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"onnxruntime failed on a calibration sample: {str(e).splitlines()[0][:300]}") from None


def ahead(fn, n: int, depth: int = 2):
    """``fn(0) .. fn(n - 1)`` in order, computed by a background thread up to ``depth`` ahead of
    the consumer: onnxruntime releases the GIL while it runs, so a sample's pass overlaps the
    numpy work (patches, moment GEMMs, single-threaded) on the previous one. An exception in
    ``fn`` is re-raised here; leaving the loop early stops the thread."""
    import queue
    import threading

    if n <= 0:
        return
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work():
        try:
            for i in range(n):
                if stop.is_set():
                    return
                item = (True, fn(i))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=work, name="sepify-calibration-pass", daemon=True)
    thread.start()
    try:
        for _ in range(n):
            ok, value = q.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class Folder:
    """One background thread folding :class:`_Rows` batches into their moments (the float32
    GEMMs release the GIL), so that they run beside the main thread's patch gathering and
    projections: with ``ahead``'s onnxruntime thread, a pass keeps two cores busy. Batches are
    folded in submission order (a layer's sums in the same order as without it: the same
    result); at most ``depth`` are waiting at a time (``submit`` blocks beyond: bounded memory).
    A context manager; ``close`` waits for the work submitted."""

    def __init__(self, depth: int = 4):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sepify-calibration-fold")
        self._slots = threading.BoundedSemaphore(max(1, int(depth)))

    def submit(self, fn, *args):
        self._slots.acquire()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def needed_nodes(graph: onnx.GraphProto, outputs: Iterable[str], given: Iterable[str] = ()) -> set[int]:
    """Indices of the nodes computing ``outputs`` (subgraph reads included), not looking past
    the tensors in ``given`` (fed instead)."""
    given = set(given)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    need: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer and o not in given]
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        n = graph.node[i]
        stack.extend(producer[t] for t in list(n.input) + outer_inputs(n) if t in producer and t not in given)
    return need


def prefix(model: onnx.ModelProto, outputs: Sequence[str], given: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs``: the nodes they need (subgraph reads
    included), their initializers, every graph input kept (feeds stay valid). ``given``:
    tensors fed instead of computed ({name: an example value}, for its type): the cut stops
    there and the ones it reads become extra graph inputs (the incremental runs of phase 2)."""
    given = dict(given or {})
    g = model.graph
    need = needed_nodes(g, outputs, given)
    used = {t for i in need for t in list(g.node[i].input) + outer_inputs(g.node[i])} | set(outputs)
    out = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, f, getattr(model, f))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    ng = out.graph
    ng.name = g.name
    ng.input.extend(g.input)
    for name, value in given.items():
        if name in used:
            ng.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), list(np.shape(value))))
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
    """``count`` distinct indices of ``range(total)`` (all when fewer), seeded by ``rng_key``
    (read-only: the draws are remembered, as phase 2 draws a sample's positions again)."""
    return _positions(tuple(rng_key), int(total), int(count))


@functools.lru_cache(maxsize=1 << 15)
def _positions(rng_key: tuple, total: int, count: int) -> np.ndarray:
    out = np.arange(total) if count >= total else np.sort(
        np.random.default_rng(rng_key).choice(total, size=count, replace=False))
    out.flags.writeable = False
    return out


# --- accumulation ----------------------------------------------------------------------------
@dataclass
class Layer:
    """What calibration needs of a candidate Conv."""

    name: str
    input: str  # the Conv's input tensor
    output: str  # the tensor the rewritten pair produces (the BN's output when folded)
    node: onnx.NodeProto
    weight_shape: tuple[int, ...]
    key: int  # stable index for the position RNG
    weight: np.ndarray | None = None  # the weight the fit uses (a folded BN included): phase 2 projects on it
    skip: str | None = None  # residual target: the other input of the Add the output feeds ("Residual targets")
    sum_out: str | None = None  # ... and that Add's output
    rows: bool = False  # the input is (..., features): every vector a row (a recurrent node's input projection)

    def as_map(self, arr: np.ndarray) -> np.ndarray:
        """The layer's input as a conv input (B, C, *spatial): a recurrent node's (T, B, I) or
        (B, T, I) sequence becomes (1, I, T*B), each time step a position of a 1x1 conv."""
        if not self.rows:
            return arr
        return np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]).T[None])

    def project(self, rows: np.ndarray) -> np.ndarray:
        """The original layer's output (no bias) at patch rows (R, g, d): (R, g, Ng), float32."""
        if self.__dict__.get("_w3") is None:
            self.__dict__["_w3"] = _kernel3(self.weight, rows)
        return _apply3(self.__dict__["_w3"], rows)


def _kernel3(weight: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A conv weight as (g, d, Ng) float32 for the patch rows (R, g, d) of :func:`_apply3`."""
    g = int(rows.shape[1])
    return np.ascontiguousarray(np.asarray(weight, np.float32).reshape(g, -1, rows.shape[2]).transpose(0, 2, 1))


def _apply3(w3: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``W x`` at patch rows (R, g, d): (R, g, Ng) float32."""
    return np.matmul(np.asarray(rows, np.float32).transpose(1, 0, 2), w3).transpose(1, 0, 2)


def output_rows(t: np.ndarray, flat: np.ndarray, group: int, rows: int) -> np.ndarray | None:
    """The values of ``t`` (B, N, *out_spatial) at output positions ``flat`` as (R, g, Ng)
    float32 (the layout of :meth:`Layer.project`), or None when ``t`` is not one value per
    output position and channel (a broadcasting Add)."""
    if t.ndim < 2 or t.shape[1] % group or t.size != rows * t.shape[1]:
        return None
    b, n = t.shape[:2]
    r = np.asarray(t, np.float32).reshape(b, n, -1).transpose(0, 2, 1).reshape(-1, n)[flat]
    return r.reshape(len(flat), group, n // group)


def _rows_per_sample(rows: int, n_samples: int) -> int:
    return max(1, -(-int(rows) // max(1, n_samples)))


def _out_count(geo: ConvGeometry, x: np.ndarray) -> int:
    """Output positions (batch included) of a conv of geometry ``geo`` on input ``x``."""
    return x.shape[0] * math.prod(out_spatial(geo, x.shape[2:]))


def _sample_rows(layer: Layer, arr: np.ndarray, seed: int, sample: int, per_sample: int) -> np.ndarray:
    geo = geometry(layer.node, layer.weight_shape, arr.shape[2:])
    total = _out_count(geo, arr)
    return positions((seed, layer.key, sample), total, per_sample), geo


_BATCH_ROWS = 2048


def _gram(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``a^T a`` (float32 SYRK, numpy's ``a.T @ a`` of one buffer) or ``b^T a`` per group of
    (g, rows, d) float32 arrays, returned in float64."""
    out = np.empty((a.shape[0], (a if b is None else b).shape[2], a.shape[2]))
    for j in range(a.shape[0]):
        out[j] = (a[j].T @ a[j]) if b is None else (b[j].T @ a[j])
    return out


class _Rows:
    """Patch rows of one layer, buffered and folded into its moments ``_BATCH_ROWS`` at a time:
    one GEMM per batch instead of one per sample (a sample gives ~100 rows, and accumulating
    them alone rewrites the whole d x d moment matrices every sample: measured, the statistics
    took most of a calibrated ResNet-50 rewrite that way).

    The products are float32 GEMMs of *shifted* rows ``c = x - r`` (``r``: the first batch's
    mean, rounded to float32; ``c``: the exact difference rounded once to float32), summed over
    batches in float64, and the raw moments restored exactly at the end:
    ``sum x x^T = sum c c^T + (sum c) r^T + r (sum c)^T + n r r^T``. The shift keeps the float32
    products at the scale of the spread, not of the mean (no cancellation for inputs far from
    zero), so each batch's product has float32 rounding relative to the covariance; measured
    on a trained ResNet-50 layer (d = 1152, 16,400 rows): covariance within 3e-7 (relative,
    Frobenius) of the float64 products, the fitted output error within 4e-8, at 2.7x their
    speed. With a :class:`Folder` the batches are folded in its thread, beside the pass.

    ``paired``: rows of x~ with the original layer's outputs ``y = W x`` at the same positions
    (``add(x_rows, y_rows)``); the result is an :class:`~sepify.rewrite.factorize.OutputStats`
    (``sum y x~^T``: ``Ng/d`` of the ``x x~^T`` GEMM). Unpaired: a same-input LayerStats.

    Paired moments are accumulated of the *output drift* ``r = y - W x~`` (float32 per row), not
    of y, and y's moments restored in float64 from r's and x~'s: ``sum y x~^T = sum r x~^T +
    W sum x~ x~^T``, ``sum ||y||^2 = sum ||r||^2 + 2 tr(W sum x~ r^T) + tr(W xx W^T)``. The fit's
    error ``tt - 2 tr(W_ctx A^T) + tr(A Cxx A^T)`` is a difference of terms of the size of y's
    variance; from float32 moments of y it would carry their ~1e-7 relative rounding, i.e. a
    relative output error of ~3e-4 where the drift is nil (a full-rank rewrite upstream). With
    r's moments the same algebra holds exactly for the rounded ``xx``, so the error is as exact
    as r's own moments, down to an exact rewrite."""

    def __init__(self, geo: ConvGeometry, channels: int, paired: bool, weight=None, folder: "Folder | None" = None):
        self.paired, self.weight = paired, weight
        self.folder = folder  # a Folder: the batches are folded in its thread
        self.pending: list = []
        self.size = (channels // geo.group) * math.prod(geo.kernel)
        self.group = geo.group
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.count = 0
        self.n = 0
        g, d = self.group, self.size
        self.ref_x = self.ref_y = None
        self.cx, self.cxx = np.zeros((g, d)), np.zeros((g, d, d))  # shifted sums of x~
        self.cy = self.cyx = self.cyy = None
        self.ref_sum = self.ref_sq = None  # a residual target's reference (OutputStats.ref_sum / ref_sq)

    def add(self, x_rows: np.ndarray, y_rows: np.ndarray | None = None, ref_rows: np.ndarray | None = None) -> None:
        self.xs.append(x_rows)
        if y_rows is not None:  # the drift r = y - W x~ (class docstring)
            self.ys.append(np.asarray(y_rows, np.float32) - self._project(x_rows))
        if ref_rows is not None:
            r = np.asarray(ref_rows, np.float64)
            if self.ref_sum is None:
                self.ref_sum, self.ref_sq = np.zeros(r.shape[1:]), np.zeros(r.shape[1])
            self.ref_sum += r.sum(axis=0)
            self.ref_sq += np.einsum("rjn,rjn->j", r, r)
        self.count += len(x_rows)
        if self.count >= _BATCH_ROWS:
            self.flush()

    def _project(self, rows: np.ndarray) -> np.ndarray:
        """``W x`` at patch rows (R, g, d): (R, g, Ng) float32 (as :meth:`Layer.project`)."""
        if getattr(self, "_w3", None) is None:
            self._w3 = _kernel3(self.weight, rows)
        return _apply3(self._w3, rows)

    @staticmethod
    def _shifted(rows: list[np.ndarray], ref, squares: bool = False):
        """(float32 shifted rows (g, R, d), their float64 sum per group, their float64 sum of
        squares per group when ``squares`` (else None), shift (float64 holding float32 values)).

        The rows are float32 and the shift is rounded to float32, so ``x - r`` computed in float32
        is the float64 difference rounded once: the same float32 rows as a float64 detour, without
        its copies. The sum is the exact one, ``sum x - R r`` (float64 sums of float32 values)."""
        a = np.concatenate(rows, axis=0).transpose(1, 0, 2)  # (g, rows, d), a view
        if a.dtype != np.float32:
            a = a.astype(np.float32)
        total = a.sum(axis=1, dtype=np.float64)
        if not np.all(np.isfinite(total)):  # a NaN or an infinity anywhere reaches the sum
            raise ModelError("a calibration sample makes a layer input NaN or infinite")
        if ref is None:
            ref = (total / a.shape[1]).astype(np.float32).astype(np.float64)
        c = np.empty(a.shape, np.float32)
        np.subtract(a, ref.astype(np.float32)[:, None, :], out=c)
        sq = np.einsum("jrd,jrd->j", c, c, dtype=np.float64) if squares else None
        return c, total - a.shape[1] * ref, sq, ref

    def flush(self) -> None:
        if not self.xs:
            return
        xs, ys = self.xs, self.ys
        self.xs, self.ys, self.count = [], [], 0
        if self.folder is None:
            self._fold(xs, ys)
        else:  # in the folder's thread, in submission order (the same sums as here)
            self.pending.append(self.folder.submit(self._fold, xs, ys))

    def _fold(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
        xc, sx, _, self.ref_x = self._shifted(xs, self.ref_x)
        self.n += xc.shape[1]
        self.cx += sx
        self.cxx += _gram(xc)
        if self.paired:
            yc, sy, syy, self.ref_y = self._shifted(ys, self.ref_y, squares=True)
            if self.cy is None:
                self.cy, self.cyy = np.zeros_like(sy), np.zeros_like(syy)
                self.cyx = np.zeros((self.group, yc.shape[2], self.size))
            self.cy += sy
            self.cyy += syy
            self.cyx += _gram(xc, yc)

    def result(self):
        self.flush()
        for f in self.pending:
            f.result()  # (re-raises a fold's error)
        self.pending = []
        from .factorize import LayerStats, OutputStats

        n = self.n

        def raw(sa, ra, m, sb=None, rb=None):  # sum b a^T from the shifted sums (b = a: sb None)
            sb, rb = (sa, ra) if sb is None else (sb, rb)
            return (m + sb[:, :, None] * ra[:, None, :] + rb[:, :, None] * sa[:, None, :]
                    + n * rb[:, :, None] * ra[:, None, :])

        if n == 0:  # pragma: no cover - every layer gets rows
            raise RuntimeError("no calibration rows")
        sum_x = self.cx + n * self.ref_x
        xx = raw(self.cx, self.ref_x, self.cxx)
        if not self.paired:
            return LayerStats.from_same(n, sum_x, xx)
        ry = self.ref_y  # of r = y - W x~
        rr = self.cyy + 2.0 * np.einsum("jn,jn->j", ry, self.cy) + n * np.einsum("jn,jn->j", ry, ry)
        rx = raw(self.cx, self.ref_x, self.cyx, self.cy, ry)
        w3 = np.asarray(self.weight, np.float64).reshape(self.group, -1, self.size)
        wxx = np.matmul(w3, xx)
        yy = rr + 2.0 * np.einsum("jnd,jnd->j", w3, rx) + np.einsum("jnd,jnd->j", wxx, w3)
        sum_y = self.cy + n * ry + np.einsum("jnd,jd->jn", w3, sum_x)
        return OutputStats(n, sum_x, xx, self.weight, sum_y, rx + wxx, yy, self.ref_sum, self.ref_sq)


class Budget:
    """Bytes of activations calibration may hold between passes (``--calib-cache-mb``): the
    original model's inputs of the layers phase 2 will fit, and the working model's tensors at
    the frontier of what phase 2 has computed (:class:`Frontier`). ``take`` reserves or refuses,
    ``give`` returns; ``peak`` is the most ever held."""

    def __init__(self, mb: float = DEFAULT_CACHE_MB):
        self.limit = max(0, int(float(mb) * (1 << 20)))
        self.used = 0
        self.peak = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


@dataclass
class Kept:
    """The original model's side of one layer on every fit sample, held for phase 2: the
    original layer's outputs ``y = W x`` at the sampled positions (``kind="out"``: what phase 2
    reads of x, :class:`~sepify.rewrite.factorize.OutputStats`), or the whole input tensor when
    that is smaller (``"map"``); both give the same ``y``."""

    kind: str
    items: list
    nbytes: int
    skips: list | None = None  # residual target: the original other branch of the Add at the positions (R, g, Ng)

    def outputs(self, layer: Layer, sample: int, seed: int, per: int) -> np.ndarray:
        item = self.items[sample]
        if self.kind == "out":
            return item
        flat, geo = _sample_rows(layer, item, seed, sample, per)
        return layer.project(gather_patches(item, geo, flat))


def original_pass(model: onnx.ModelProto, layers: list[Layer], samples: Sequence[Mapping], *, rows: int = DEFAULT_ROWS,
                  seed: int = 0, threads: int | None = None, providers=None, stats=True,
                  keep: dict | None = None, budget: Budget | None = None, hold=None) -> dict[str, object]:
    """One pass of the ORIGINAL model over ``samples`` for ``layers``: the LayerStats of those
    named in ``stats`` (True: all; x~ == x) and, into ``keep``, the inputs of those named in
    ``hold`` (None: all) for phase 2 (:class:`Kept`) as far as ``budget`` allows, deepest layers
    first (the longest prefixes to re-run otherwise); sizes are those of the first sample. A
    pass with no statistics to collect stops after one sample when nothing fits."""
    stats = {layer.name for layer in layers} if stats is True else set(stats or ())
    hold = {layer.name for layer in layers} if hold is None else set(hold)
    names = list(dict.fromkeys([layer.input for layer in layers]
                               + [layer.skip for layer in layers if layer.skip and layer.name in hold]))
    sess = session(prefix(model, names), threads, providers)
    acc: dict[str, _Rows] = {}
    per = _rows_per_sample(rows, len(samples))
    keeping: dict[str, Kept] = {}
    by_name = {layer.name: layer for layer in layers}
    geo_of: dict[str, ConvGeometry] = {}
    folder = Folder()  # the moments' GEMMs beside this thread's patches
    try:
        for s, got in enumerate(ahead(lambda i: dict(zip(names, run(sess, names, samples[i]))), len(samples))):
            gathered = {}
            for layer in layers:
                x = layer.as_map(got[layer.input])
                flat, geo = _sample_rows(layer, x, seed, s, per)
                p = gather_patches(x, geo, flat)
                gathered[layer.name] = (x, p, flat)
                geo_of[layer.name] = geo
                if layer.name in stats:
                    if layer.name not in acc:
                        acc[layer.name] = _Rows(geo, x.shape[1], paired=False, folder=folder)
                    acc[layer.name].add(p)
            if s == 0 and keep is not None and budget is not None:
                for layer in reversed(layers):
                    if layer.name in keep or layer.name not in hold:
                        continue
                    x, p, _ = gathered[layer.name]
                    out = p.shape[0] * p.shape[1] * (layer.weight_shape[0] // p.shape[1]) * 4  # y rows, float32
                    kind, size = ("out", out) if out <= x.nbytes else ("map", x.nbytes)
                    if budget.take(size * len(samples)):
                        keeping[layer.name] = Kept(kind, [], size * len(samples), [] if layer.skip else None)
                if not stats and not keeping:
                    break
            for name, k in keeping.items():
                x, p, flat = gathered[name]
                layer = by_name[name]
                k.items.append(layer.project(p) if k.kind == "out" else x)
                if k.skips is not None:
                    k.skips.append(output_rows(got[layer.skip], flat, p.shape[1], _out_count(geo_of[name], x)))
        result = {k: a.result() for k, a in acc.items()}
    finally:
        folder.close()
    if keep is not None:
        keep.update(keeping)
    return result


def collect_same(model: onnx.ModelProto, layers: list[Layer], samples: Sequence[Mapping], *, rows: int = DEFAULT_ROWS,
                 seed: int = 0, threads: int | None = None, providers=None, keep: dict | None = None,
                 budget: Budget | None = None) -> dict[str, object]:
    """Phase 1: per layer, LayerStats of its input on the ORIGINAL model (x~ == x), one pass
    (and, with ``keep`` / ``budget``, the inputs phase 2 will need: :func:`original_pass`)."""
    return original_pass(model, layers, samples, rows=rows, seed=seed, threads=threads, providers=providers,
                         keep=keep, budget=budget)


def collect_paired(original_sess, working: onnx.ModelProto, layer: Layer, samples: Sequence[Mapping], *,
                   rows: int = DEFAULT_ROWS, seed: int = 0, threads: int | None = None, known=None):
    """Phase 2 for one layer, the plain way (full prefixes, float64 :class:`LayerStats`): x from
    ``original_sess`` (a session computing ``layer.input`` on the original model), x~ from the
    working model's prefix; same positions per sample. ``known``: the layer's phase-1
    statistics, whose ``sum_x`` / ``xx`` are this one's ``sum_t`` / ``tt``. (The calibrated
    rewrite's phase 2 is :meth:`Calibrator.fit`.)"""
    from .factorize import LayerStats

    sess = session(prefix(working, [layer.input]), threads)
    stats = None
    per = _rows_per_sample(rows, len(samples))
    for s, feed in enumerate(samples):
        (t,) = run(original_sess, [layer.input], feed)
        (x,) = run(sess, [layer.input], feed)
        flat, geo = _sample_rows(layer, t, seed, s, per)
        xr, tr = gather_patches(x, geo, flat), gather_patches(t, geo, flat)
        if stats is None:
            stats = LayerStats.zeros(xr.shape[1], xr.shape[2], same=False)
        stats.accumulate(xr, tr)
    if known is not None:
        return LayerStats(stats.n, stats.sum_x, known.sum_x, stats.xx, stats.tx, known.xx)
    return stats


class Frontier:
    """Phase 2's incremental runs of the WORKING model (module docstring, "Phase 2").

    Wave ``w`` needs the working model's inputs of its layers. Every tensor held here was
    computed, in an earlier wave, by the working model of that wave; being an ancestor of that
    wave's layers, no layer rewritten since is upstream of it (the layers go in topological
    order), so it is still what the current working model computes. A wave therefore runs only
    the nodes between the held tensors (fed as inputs) and its layers' inputs. After it, the
    tensors worth holding are the *cut* ``L_w``: produced by an ancestor of waves <= w's layers
    and read by a node that later waves need and that is not such an ancestor; they are kept as
    far as the :class:`Budget` allows (first sample's sizes), the rest dropped. Anything not held
    is recomputed from what is (at worst from the graph inputs: the full prefix), so the bound
    changes the time, never the result."""

    def __init__(self, budget: Budget, n_samples: int, threads=None, providers=None):
        self.budget, self.n, self.threads, self.providers = budget, n_samples, threads, providers
        self.values: dict[str, list] = {}
        self.sizes: dict[str, int] = {}
        self.nodes_run = 0  # nodes run over all waves (per sample)
        self.nodes_full = 0  # ... what full prefixes would have run
        self.waves_incremental = 0

    def _drop(self, name: str) -> None:
        self.values.pop(name, None)
        self.budget.give(self.sizes.pop(name, 0))

    def begin(self, working: onnx.ModelProto, targets: list[str], done_targets: list[str], later_targets: list[str]):
        """Prepare wave runs of ``working`` for ``targets``; ``done_targets``: the layer inputs of
        this and earlier waves, ``later_targets``: those of later waves."""
        g = working.graph
        graph_inputs = {i.name for i in g.input} | {t.name for t in g.initializer}
        anc = needed_nodes(g, done_targets)
        fut = needed_nodes(g, later_targets) - anc
        produced = {o for i in anc for o in g.node[i].output if o}
        cut = set()
        for i in fut:
            n = g.node[i]
            cut.update(t for t in list(n.input) + outer_inputs(n) if t in produced and t not in graph_inputs)
        cut.update(t for t in later_targets if t in produced)
        self.cut = cut
        self.targets = list(dict.fromkeys(targets))
        fetch = [t for t in self.targets if t not in self.values and t not in graph_inputs]
        sub = needed_nodes(g, fetch, self.values)
        reads = {x for i in sub for x in list(g.node[i].input) + outer_inputs(g.node[i])}
        self.given = [t for t in self.values if t in reads]
        for name in [t for t in self.values if t not in cut and t not in self.given and t not in self.targets]:
            self._drop(name)
        outs = {o for i in sub for o in g.node[i].output if o}
        self.new = [t for t in sorted(cut) if t in outs and t not in self.values]
        self.fetch = fetch + [t for t in self.new if t not in fetch]
        full = len(needed_nodes(g, self.targets))
        self.nodes_run += len(sub)
        self.nodes_full += full
        if len(sub) < full:
            self.waves_incremental += 1
        self.sess = None
        if self.fetch:
            model = prefix(working, self.fetch, {t: self.values[t][0] for t in self.given})
            self.sess = session(model, self.threads, self.providers)
            self.feed_names = {i.name for i in model.graph.input}
        self.keeping: list[str] = []

    def run(self, sample: int, feed: Mapping) -> dict[str, np.ndarray]:
        """The working model's ``targets`` on one fit sample (in order: sample 0 first)."""
        got = {}
        if self.sess is not None:
            inputs = {k: v for k, v in feed.items() if k in self.feed_names}
            inputs.update((t, self.values[t][sample]) for t in self.given)
            got = dict(zip(self.fetch, run(self.sess, self.fetch, inputs)))
        if sample == 0:
            for t in self.new:
                size = int(got[t].nbytes) * self.n
                if self.budget.take(size):
                    self.keeping.append(t)
                    self.sizes[t] = size
                    self.values[t] = []
        for t in self.keeping:
            self.values[t].append(got[t])
        return {t: got[t] if t in got else (feed[t] if t in feed else self.values[t][sample]) for t in self.targets}

    def end(self) -> None:
        """After the wave's last sample: drop what later waves do not read."""
        for name in [t for t in self.values if t not in self.cut]:
            self._drop(name)


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


def recurrent_inputs(k, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A recurrent node's new (W, B) from its refitted input projection ``weight``
    ((D*G*H, I, 1), :func:`~sepify.rewrite.plan.kept_recurrent`) and that projection's bias
    (the Wb half of B); the Rb half is the node's own (zeros when it had no B)."""
    d = k.directions
    w = np.ascontiguousarray(weight.reshape(d, -1, weight.shape[1]))
    gh = w.shape[1]
    rb = np.zeros((d, gh), w.dtype) if k.recurrent_bias is None else np.asarray(k.recurrent_bias, w.dtype).reshape(d, gh)
    return w, np.concatenate([np.asarray(bias, w.dtype).reshape(d, gh), rb], axis=1)


def replace_recurrent(model: onnx.ModelProto, k, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give the recurrent node ``k`` (in place) the refitted input projection: new W and B."""
    from onnx import numpy_helper

    w, b = recurrent_inputs(k, weight, bias)
    node = next(n for n in model.graph.node if n.name == k.node.name)
    base = f"__calib__/{k.node.name}"
    model.graph.initializer.extend([numpy_helper.from_array(w, f"{base}/W"), numpy_helper.from_array(b, f"{base}/B")])
    while len(node.input) < 4:
        node.input.append("")
    node.input[1], node.input[3] = f"{base}/W", f"{base}/B"


# --- measurement -----------------------------------------------------------------------------
class _RelError:
    """``sqrt(sum ||b - a||^2 / sum ||a - mean_c(a)||^2)`` accumulated over samples, the mean per
    channel (``axis``) over all samples and positions."""

    def __init__(self, axis: int):
        self.axis, self.num, self.sq, self.cnt = axis, 0.0, 0.0, 0
        self.sums: np.ndarray | float = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        axis = self.axis % a64.ndim
        self.num += float(np.sum((b64 - a64) ** 2))
        self.sums = self.sums + a64.sum(axis=tuple(i for i in range(a64.ndim) if i != axis))
        self.sq += float(np.sum(a64 ** 2))
        self.cnt += a64.size // a64.shape[axis]

    def value(self) -> float:
        den = self.sq - float(np.sum(np.square(self.sums))) / self.cnt if self.cnt else 0.0
        return math.sqrt(self.num / den) if den > 0 else (0.0 if self.num == 0 else math.inf)


def measure_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, tensors: list[str],
                    samples: Sequence[Mapping], threads: int | None = None, providers=None,
                    projections: Mapping[str, tuple] | None = None) -> dict[str, float]:
    """Relative output error per tensor on ``samples``:
    ``sqrt(sum ||y~ - y||^2 / sum ||y - mean_c(y)||^2)`` with the per-channel mean over all
    samples and positions (the same normalisation as the predicted error: the fraction of the
    original output's variance that the rewrite gets wrong).

    ``projections`` {key: (input tensor, W, b, W~, b~)}: also the same error of linear maps that
    are no tensor of the graph, ``x W^T + b`` of the input's last axis on the original model
    against ``x~ W~^T + b~`` on the rewritten one (a recurrent node's input projection, every
    time step a row; the channels are the map's outputs), keyed by ``key``, from the same runs."""
    projections = dict(projections or {})
    fetch = list(dict.fromkeys(list(tensors) + [v[0] for v in projections.values()]))
    if not samples or not fetch:
        return {}
    s1, s2 = (session(prefix(original, fetch), threads, providers),
              session(prefix(rewritten, fetch), threads, providers))
    acc = {t: _RelError(1) for t in tensors}
    acc.update((k, _RelError(-1)) for k in projections)

    def linear(x, w, b):
        return x.reshape(-1, x.shape[-1]).astype(np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)

    # the original's runs one sample ahead in a background thread, beside the rewritten model's
    for feed, a in zip(samples, ahead(lambda i: run(s1, fetch, samples[i]), len(samples))):
        ya, yb = dict(zip(fetch, a)), dict(zip(fetch, run(s2, fetch, feed)))
        for t in tensors:
            acc[t].add(ya[t], yb[t])
        for k, (t, w, b, w2, b2) in projections.items():
            acc[k].add(linear(ya[t], w, b), linear(yb[t], w2, b2))
    return {k: a.value() for k, a in acc.items()}


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
def _reads(layer: Layer) -> list[str]:
    """The tensors phase 2 reads for ``layer``: its input, and a residual target's other branch."""
    return [layer.input] + ([layer.skip] if layer.skip else [])


def _residual_adds(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """{tensor: (Add node name, the Add's other input, the Add's output)} for every tensor
    that is not a graph output and is read by exactly one node, a two-input ``Add`` of it and
    another tensor that is neither an initializer nor a graph input."""
    g = model.graph
    readers: dict[str, list] = {}
    for n in g.node:
        for t in set(list(n.input) + outer_inputs(n)):
            readers.setdefault(t, []).append(n)
    fixed = {o.name for o in g.output} | {i.name for i in g.initializer} | {i.name for i in g.input}
    out = {}
    for t, rs in readers.items():
        if not t or t in fixed or len(rs) != 1:
            continue
        n = rs[0]
        if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or not n.output[0]:
            continue
        other = [x for x in n.input if x != t]
        if len(other) != 1 or other[0] in fixed or not other[0]:
            continue
        out[t] = (n.name, other[0], n.output[0])
    return out


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
    written); ``data``: the validated :class:`~sepify.rewrite.data.CalibrationSet`;
    ``cache_mb``: the :class:`Budget` of held activations; ``providers``: onnxruntime
    execution providers of every calibration session (full names, :func:`providers_for`)."""

    def __init__(self, model: onnx.ModelProto, data, *, rows: int = DEFAULT_ROWS, seed: int = 0,
                 method: str = "als", sequential: bool = True, threads: int | None = None, progress=None,
                 cache_mb: float = DEFAULT_CACHE_MB, providers: Sequence[str] | None = None,
                 residual: bool = True):
        self.model, self.data = model, data
        self.residual = residual
        self.partners: dict[str, tuple[str, str, str]] = {}  # residual targets: {layer: (Add, other input, Add output)}
        self.plain: set[str] = set()  # layers whose residual target turned out not to apply (broadcasting)
        self.progress = progress or (lambda message: None)  # one line per step, e.g. to stderr
        self.rows, self.seed, self.method, self.sequential, self.threads = rows, seed, method, sequential, threads
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.budget = Budget(cache_mb)
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, int] = {"phase1": 0, "phase2": 0, "holdout": 0}
        self.same: dict[str, object] = {}
        self.kept: dict[str, Kept] = {}  # original inputs held for phase 2
        self.cache: dict[str, object] = {}

    def _time(self, key: str, t0: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    @staticmethod
    def layer(c) -> Layer:
        if getattr(c, "kind", "conv") == "recurrent":  # its linear output is no tensor of the graph
            return Layer(c.node.name, c.node.input[0], "", c.node, tuple(c.weight.shape), int(c.index), c.weight,
                         rows=True)
        out = c.bn.output[0] if c.bn is not None else c.node.output[0]
        return Layer(c.node.name, c.node.input[0], out, c.node, tuple(c.weight.shape), int(c.index), c.weight)

    def _layer(self, c) -> Layer:
        """:meth:`layer` with the residual target of ``c`` when it has one."""
        layer = self.layer(c)
        p = self.partners.get(c.node.name)
        if p is not None:
            layer.skip, layer.sum_out = p[1], p[2]
        return layer

    def _free(self, name: str) -> None:
        k = self.kept.pop(name, None)
        if k is not None:
            self.budget.give(k.nbytes)

    def phase1(self, cands: list, keep: bool = False) -> dict[str, object]:
        """LayerStats (x~ == x) of ``cands`` from one pass over the fit samples; ``keep``: also
        hold their original inputs for phase 2 (within the budget)."""
        todo = [c for c in cands if c.node.name not in self.same]
        if todo:
            t0 = time.perf_counter()
            self.progress(f"calibration: input statistics of {len(todo)} conv(s) on {len(self.data.fit)} samples")
            self.same.update(collect_same(self.model, [self.layer(c) for c in todo], self.data.fit, rows=self.rows,
                                          seed=self.seed, threads=self.threads, providers=self.providers,
                                          keep=self.kept if keep and self.sequential else None, budget=self.budget))
            self.passes["phase1"] += 1
            self._time("phase 1 statistics", t0)
        return {c.node.name: self.same[c.node.name] for c in cands}

    def curves(self, cands: list) -> dict[str, dict[str, np.ndarray]]:
        """Per candidate and orientation: predicted relative output error at ranks 1..max."""
        stats = self.phase1(cands, keep=True)
        t0 = time.perf_counter()
        out = {c.node.name: {o: layer_curve(c, o, stats[c.node.name]) for o in c.spectra} for c in cands}
        self._time("error curves", t0)
        return out

    def fit(self, chosen: list, dense: Sequence = ()) -> dict[str, tuple]:
        """``chosen``: [(candidate, orientation, rank)] in topological order. Returns
        {name: (first, second, bias, predicted relative output error)}; with ``sequential``
        each layer is fitted on the inputs the already-rewritten model feeds it.

        The layers go in *waves*: a layer with no rewritten layer upstream is wave 0 (its
        phase-1 statistics are all it needs), any other one wave 1 + the largest wave upstream
        of it. A wave's layers do not depend on each other's rewrite, so one pass of the working
        model (with every earlier wave spliced in) collects all their statistics; the result is
        the same as fitting them one by one in topological order.

        ``dense``: Convs left dense (:class:`~sepify.rewrite.plan.Kept`, any order). With
        ``sequential``, each one downstream of a rewritten layer is refitted to its original
        output on the inputs the rewritten model feeds it (``factorize.refit_dense``), in the
        wave after the layers it depends on, and the refit is used by the waves after it; kept
        only when it lowers the predicted error by at least :data:`REFIT_GAIN` (relative) from
        at least :data:`REFIT_MIN_ERROR`. ``self.refits``: {name: (weight, bias, error after,
        error before)}."""
        out: dict[str, tuple] = {}
        self.refits: dict[str, tuple] = {}
        if not chosen:
            return out
        index = {c.node.name: i for i, (c, _, _) in enumerate(chosen)}
        rewritten = {c.node.name for c, _, _ in chosen}
        items = [(c, o, r, 0) for c, o, r in chosen]
        self.partners, self.plain = {}, set()
        residual = self.sequential and self.residual
        sums = _residual_adds(self.model) if residual else {}
        if self.sequential:
            for k in dense:
                if k.node.name in rewritten:
                    continue
                skip = sums.get(self.layer(k).output, (None, None))[1]
                if (_ancestors(self.model, k.node.input[0]) & rewritten
                        or (skip is not None and _ancestors(self.model, skip) & rewritten)):
                    items.append((k, None, None, 1))
        items.sort(key=lambda t: t[0].index)  # topological: the nodes' order in the sorted graph
        names = {c.node.name for c, _, _, _ in items}
        upstream: dict[str, set[str]] = {}
        for c, _, _, _ in items:  # the rewritten (and refitted) layers each one depends on
            upstream[c.node.name] = ((_ancestors(self.model, c.node.input[0]) & names) - {c.node.name}
                                     if self.sequential else set())
        import networkx as nx

        dag = nx.DiGraph()  # u -> v: v is fitted after u
        dag.add_nodes_from(names)
        dag.add_edges_from((u, v) for v, us in upstream.items() for u in us)
        if residual:
            self._residual_targets(items, names, upstream, sums, dag)
        wave: dict[str, int] = {}
        for name in nx.topological_sort(dag):
            wave[name] = 1 + max((wave[u] for u in upstream[name]), default=-1)
        waves = [[x for x in items if wave[x[0].node.name] == w] for w in range(max(wave.values()) + 1)]
        paired = {c.node.name for group in waves[1:] for c, _, _, _ in group}
        for name in [n for n in self.kept if n not in paired]:
            self._free(name)
        todo = [self.layer(c) for c, _, _, _ in waves[0] if c.node.name not in self.same]
        missing = [self._layer(c) for group in waves[1:] for c, _, _, _ in group if c.node.name not in self.kept]
        if todo or missing:  # one pass of the original model: wave 0's statistics, phase 2's original inputs
            t0 = time.perf_counter()
            if todo:
                self.progress(f"calibration: input statistics of {len(todo)} conv(s) on {len(self.data.fit)} samples")
            self.same.update(original_pass(self.model, todo + missing, self.data.fit, rows=self.rows, seed=self.seed,
                                           threads=self.threads, providers=self.providers, stats=[x.name for x in todo],
                                           keep=self.kept, budget=self.budget, hold=[x.name for x in missing]))
            self.passes["phase1" if todo else "original"] = self.passes.get("phase1" if todo else "original", 0) + 1
            self._time("phase 1 statistics", t0)
        kept = sorted(self.kept)
        working = None
        if len(waves) > 1:
            working = onnx.ModelProto()
            working.CopyFrom(self.model)
        frontier = Frontier(self.budget, len(self.data.fit), self.threads, self.providers)
        reruns = 0
        for w, group in enumerate(waves):
            stats = {}
            if w == 0:
                stats = {c.node.name: self.phase1([c])[c.node.name] for c, _, _, _ in group}
            else:
                t0 = time.perf_counter()
                self.progress(f"calibration: statistics of {len(group)} conv(s) on the rewritten model "
                              f"(wave {w}/{len(waves) - 1})")
                layers = [self._layer(c) for c, _, _, _ in group]
                reruns += sum(1 for layer in layers if layer.name not in self.kept)
                later = [t for g in waves[w + 1:] for x in g for t in _reads(self._layer(x[0]))]
                upto = [t for g in waves[1:w + 1] for x in g for t in _reads(self._layer(x[0]))]
                stats = self._paired(working, layers, frontier, upto, later)
                self.passes["phase2"] += 1
                self._time("phase 2 statistics", t0)
            for c, o, r, kind in group:
                layer = self.layer(c)
                drop = [c.bn.name] if c.bn is not None else []
                if kind == 1:
                    from .factorize import refit_dense

                    self.progress(f"calibration: refitting {c.node.name} (kept dense)")
                    t0 = time.perf_counter()
                    weight, bias, err, err_before = refit_dense(c.weight, c.bias, c.group, stats.pop(c.node.name))
                    self._time("fits", t0)
                    if err_before >= REFIT_MIN_ERROR and err < (1.0 - REFIT_GAIN) * err_before:
                        self.refits[c.node.name] = (weight, bias, float(err), float(err_before))
                        if getattr(c, "kind", "conv") == "recurrent":
                            replace_recurrent(working, c, weight, bias)
                        else:
                            replace_dense(working, layer, weight, bias, drop=drop)
                    continue
                self.progress(f"calibration: fitting {c.node.name} ({index[c.node.name] + 1}/{len(chosen)}, {o} rank {r})")
                t0 = time.perf_counter()
                first, second, bias, pred = layer_fit(c, o, r, stats.pop(c.node.name), self.method)
                self._time("fits", t0)
                out[c.node.name] = (first, second, bias, float(pred))
                self.same.pop(c.node.name, None)  # its statistics are not needed again: free them
                if working is not None:
                    splice(working, layer, o, first, second, bias, drop=drop)
        for name in list(self.kept):
            self._free(name)
        for name in list(frontier.values):
            frontier._drop(name)
        self.same.clear()
        self.cache = {"limit_mb": round(self.budget.limit / (1 << 20), 1), "peak_mb": round(self.budget.peak / (1 << 20), 3),
                      "waves": len(waves) - 1, "original_inputs_held": len(kept), "original_inputs_rerun": reruns,
                      "incremental_waves": frontier.waves_incremental,
                      "working_nodes_run": frontier.nodes_run, "working_nodes_full_prefix": frontier.nodes_full}
        return out

    def _residual_targets(self, items, names: set[str], upstream: dict[str, set[str]], sums: dict, dag) -> None:
        """Give a residual target (module docstring) to every item whose output is read only by a
        two-input Add whose other branch depends on rewritten or refitted layers: the item then
        goes in a wave after those (``upstream`` and the fit order ``dag``, in place), unless that
        would make a cycle."""
        import networkx as nx

        for c, _, _, _ in items:
            name = c.node.name
            hit = sums.get(self.layer(c).output)
            if hit is None:
                continue
            add, skip, out = hit
            anc = _ancestors(self.model, skip)
            up = (anc & names) - {name}
            if name in anc or not up or any(nx.has_path(dag, name, u) for u in up):
                continue
            dag.add_edges_from((u, name) for u in up)
            upstream[name] |= up
            self.partners[name] = (add, skip, out)

    @property
    def residual_targets(self) -> dict[str, tuple[str, str]]:
        """{layer: (Add node, Add output)} of the last :meth:`fit`'s residual targets: those
        layers' predicted errors are of the Add's output."""
        return {k: (v[0], v[2]) for k, v in self.partners.items() if k not in self.plain}

    def _paired(self, working, layers: list[Layer], frontier: Frontier, upto: list[str], later: list[str]) -> dict:
        """Phase-2 statistics of one wave's ``layers``: x~ from the working model's incremental
        run, x from the held original inputs (or one original prefix for those not held)."""
        targets = list(dict.fromkeys(t for layer in layers for t in _reads(layer)))
        frontier.begin(working, targets, upto, later)
        rerun = [layer for layer in layers if layer.name not in self.kept]
        names = list(dict.fromkeys(t for layer in rerun for t in _reads(layer)))
        orig = session(prefix(self.model, names), self.threads, self.providers) if rerun else None
        per = _rows_per_sample(self.rows, len(self.data.fit))
        acc: dict[str, _Rows] = {}
        fit = self.data.fit

        def both(i):
            xs = frontier.run(i, fit[i])
            return xs, (dict(zip(names, run(orig, names, fit[i]))) if orig is not None else {})

        folder = Folder()  # the moments' GEMMs beside this thread's patches
        try:
            for s, (xs, ts) in enumerate(ahead(both, len(fit))):
                for layer in layers:
                    x = layer.as_map(xs[layer.input])
                    flat, geo = _sample_rows(layer, x, self.seed, s, per)
                    k = self.kept.get(layer.name)
                    y_rows = (k.outputs(layer, s, self.seed, per) if k is not None
                              else layer.project(gather_patches(layer.as_map(ts[layer.input]), geo, flat)))
                    ref = None
                    if layer.skip and layer.name not in self.plain:
                        total = _out_count(geo, x)
                        s_new = output_rows(xs[layer.skip], flat, geo.group, total)
                        s_old = (k.skips[s] if k is not None and k.skips is not None
                                 else output_rows(ts[layer.skip], flat, geo.group, total) if layer.skip in ts else None)
                        if s_new is not None and s_old is not None:
                            ref = y_rows + s_old
                            y_rows = ref - s_new
                        elif s == 0:  # not one value per output position (a broadcasting Add): the plain target
                            self.plain.add(layer.name)
                        else:  # pragma: no cover - shapes that broadcast differently per sample
                            ref = y_rows
                    if layer.name not in acc:
                        acc[layer.name] = _Rows(geo, x.shape[1], paired=True, weight=layer.weight, folder=folder)
                    acc[layer.name].add(gather_patches(x, geo, flat), y_rows, ref)
            frontier.end()
            for layer in layers:
                self._free(layer.name)
            return {name: a.result() for name, a in acc.items()}
        finally:
            folder.close()

    def measure(self, rewritten: onnx.ModelProto, tensors: list[str], projections: Mapping[str, tuple] | None = None
                ) -> dict[str, float]:
        """Measured relative output error per tensor on the holdout samples (and per
        :func:`measure_outputs` projection spec of ``projections``)."""
        if not len(self.data.holdout):
            return {}
        t0 = time.perf_counter()
        self.progress(f"calibration: measuring the rewritten layers on {len(self.data.holdout)} held-out samples")
        got = measure_outputs(self.model, rewritten, tensors, self.data.holdout, self.threads, self.providers,
                              projections)
        self.passes["holdout"] += 1
        self._time("holdout measurement", t0)
        return got
