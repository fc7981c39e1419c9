"""Verify: run the original and the rewritten model in onnxruntime on the same inputs and say,
honestly, how far apart their outputs are.

Inputs, best first (``docs/rewrite.md``, section *Verification*):

1. the held-out calibration samples (``--calibration``; never used to fit),
2. data from ``--inputs`` (:func:`load_samples`: a ``.npz`` with one array per graph input,
   samples stacked on a new leading axis, or a folder of ``.npz`` files, one sample each),
3. seeded random inputs: **a wiring smoke test, not an accuracy measurement** — every output
   format says so (:data:`SMOKE_TEST`).

Every sample is run and the measures are accumulated over all of them (a: original, b:
rewritten, sums over every element of every sample; memory does not grow with the number of
samples):

* relative L2 error ``‖a − b‖ / ‖a‖``, max abs error ``max |a − b|``, cosine ``a·b / (‖a‖ ‖b‖)``;
* class-like outputs — float with more than one class on the last axis, and rank 2
  (``[batch, classes]``), or the output of a Softmax / LogSoftmax over the last axis (through
  a trivial chain, below), or rank 3 with a last axis longer than the others (``[T, batch,
  classes]`` of a sequence recognizer) — per row (every position but the class axis, of every
  sample): top-1 agreement (same argmax) and top-5 agreement (the original's argmax is among
  the rewritten model's 5 largest; only with more than 5 classes); with several rows a sample,
  also ``sample_top1_agreement``, the share of samples whose rows all keep their argmax (for a
  sequence recognizer: the greedy decode is unchanged);
* integer and bool outputs: the fraction of equal elements (``exact_match``).

**Saturating ops.** A Softmax, LogSoftmax, Sigmoid, Tanh or HardSigmoid hides errors (a
destroyed 2-class model whose logits are large still gives one-hot probabilities with cosine
~1 and top-1 agreement 1). When a graph output is produced by one of them, directly or
through Identity / Reshape / Flatten / Squeeze / Unsqueeze / Transpose / Dropout, the tensor
*before* it is compared too, as an extra output of in-memory copies of both models (the input
files are never modified), and the share of saturated reference values is reported (Softmax:
rows whose largest probability is above 0.99; Sigmoid, HardSigmoid: values below 0.01 or
above 0.99; Tanh: ``|y| > 0.99``).

**Near-zero references.** With the scale ``S = 1 + the largest |a| over all compared graph
outputs``, a tensor whose reference RMS is at most ``1e-6 · S`` is flagged
``near_zero_reference``: its relative L2 error (noise over ~0) is not reported (``null``);
it is judged by ``scaled_error = RMS(a − b) / S`` instead.

**The checked error** (what ``--tolerance`` compares, ``checked_error``): the largest, over
graph outputs, of the output's relative L2 error (``scaled_error`` when near zero,
``1 − exact_match`` for integer outputs) and of its pre-saturation tensor's relative L2 error
when there is one (a saturating op can hide an error, and shift-invariant ones such as
Softmax can also magnify one, so both count). ``passed`` is ``None`` without a tolerance.
Non-finite values in the rewritten output where the original has none make the error
``None`` and the check fail.

**Layers** (``--verify-layers``): the rewritten pair's last node keeps the original conv's (or
folded BatchNormalization's) output tensor name, so that tensor is added as an output of both
models and compared the same way: the error after each rewritten layer, end to end, so a user
sees where the error comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import ModelError, UsageError
from .data import InputSpec, model_inputs, read_npz

SMOKE_TEST = "random inputs: wiring smoke test, not an accuracy measurement"
NEAR_ZERO = 1e-6          # reference RMS <= NEAR_ZERO * S (S = 1 + largest |reference| of the graph outputs)
SATURATING = ("Softmax", "LogSoftmax", "Sigmoid", "Tanh", "HardSigmoid")
TRIVIAL = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout")
CHECKED = ("max over graph outputs of max(relative L2 error of the output, of its pre-saturation tensor); "
           "near-zero references: RMS error / S; integer outputs: 1 - exact match")



# --- graph inputs ----------------------------------------------------------------------------
def random_samples(specs: Sequence[InputSpec], dims: Mapping[str, int] | None = None, seed: int = 0
                   ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """One seeded random sample (floats ~ N(0, 1), integers in [0, 10)) and the notes on the
    defaults applied. A dynamic batch (axis 0) that nothing binds is set to 1 (noted); any other
    unbound dim is a :class:`UsageError` naming the dims and how to bind them — never 1x1 inputs."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feed, notes, unbound = {}, [], []
    for spec in specs:
        if spec.shape is None:
            unbound.append(f"{spec.name} (rank unknown)")
            continue
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            elif axis == 0:
                shape.append(1)
                notes.append(f"input {spec.name!r}: batch dim {d or '?'} set to 1" + (f" (bind with --dim {d}=VALUE)" if d else ""))
            else:
                unbound.append(f"{spec.name}[{axis}]" + (f"={d}" if d else " (unnamed)"))
                shape.append(None)
        if None in shape:
            continue
        if spec.dtype is None:
            raise UsageError(f"cannot make random data for input {spec.name!r} (its type); pass --inputs data.npz")
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    if unbound:
        names = sorted({u.split("=", 1)[1] for u in unbound if "=" in u})
        how = (" ".join(f"--dim {n}=VALUE" for n in names) + " (or --input-shape)") if names \
            else "--input-shape NAME=1x3x224x224"
        raise UsageError(f"cannot make verification inputs: unbound dims {', '.join(unbound)}; bind them with {how}, "
                         "or verify on data (--inputs data.npz / --calibration)")
    return [feed], notes


def load_samples(path: str | os.PathLike, specs: Sequence[InputSpec]) -> list[dict[str, np.ndarray]]:
    """Samples from ``--inputs``: a ``.npz`` file with one array per graph input, or a folder of
    ``.npz`` files (one sample each, read in name order).

    In a file, an array with one more axis than the input has (``[S, *input_shape]``, as the
    calibration format) holds S samples; an array with exactly the input's rank is ONE sample
    (so files written for the single-sample ``--inputs`` keep working; a batch in it is one
    sample of that batch size, whose rows all count). All arrays must agree on S."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npz")
        if not files:
            raise UsageError(f"{p}: no .npz files in this folder")
        out = []
        for f in files:
            arrays = _read_npz(f)
            _check_names(arrays, specs, f)
            out.append(arrays)
        return out
    arrays = _read_npz(p)
    _check_names(arrays, specs, p)
    counts = {}
    for spec in specs:
        a = arrays[spec.name]
        rank = len(spec.shape) if spec.shape is not None else a.ndim
        if a.ndim == rank + 1:
            counts[spec.name] = a.shape[0]
        elif a.ndim == rank:
            counts[spec.name] = None
        else:
            raise UsageError(f"{p}: {spec.name!r} has shape {list(a.shape)}: expected {rank} axes (one sample) "
                             f"or {rank + 1} ([samples, ...])")
    kinds = set(counts.values())
    if kinds == {None}:
        return [arrays]
    if None in kinds or len(kinds) > 1:
        raise UsageError(f"{p}: the arrays disagree on the number of samples "
                         f"({', '.join(f'{k}: {v or 1}' for k, v in counts.items())})")
    (s,) = kinds
    if s == 0:
        raise UsageError(f"{p}: no samples (leading axis of length 0)")
    return [{k: v[i] for k, v in arrays.items()} for i in range(s)]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    return read_npz(path, f"--inputs {path}")


def _check_names(arrays: Mapping, specs: Sequence[InputSpec], where) -> None:
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in arrays]
    extra = [n for n in arrays if n not in wanted]
    if missing or extra:
        parts = ([f"lacks graph input(s) {', '.join(missing)}"] if missing else []) + \
                ([f"has array(s) {', '.join(extra)} that are not graph inputs"] if extra else [])
        raise UsageError(f"{where}: {'; '.join(parts)} (graph inputs: {', '.join(wanted)})")


def _checked(samples: Iterable[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], label: str
             ) -> Iterator[dict[str, np.ndarray]]:
    """Each sample with its arrays checked against the inputs (names, rank, fixed dims) and cast
    to the input's type within its kind (float64 data for a float32 input, ...)."""
    for i, sample in enumerate(samples):
        _check_names(sample, specs, f"{label}, sample {i}")
        feed = {}
        for spec in specs:
            a = np.asarray(sample[spec.name])
            if spec.shape is not None:
                if a.ndim != len(spec.shape):
                    raise UsageError(f"{label}, sample {i}: {spec.name!r} has shape {list(a.shape)}, "
                                     f"the input has {len(spec.shape)} axes")
                bad = [ax for ax, d in enumerate(spec.shape) if isinstance(d, int) and a.shape[ax] != d]
                if bad:
                    want = "x".join(str(d) if d is not None else "?" for d in spec.shape)
                    raise UsageError(f"{label}, sample {i}: {spec.name!r} has shape {'x'.join(map(str, a.shape))}, "
                                     f"the input is {want}")
            if spec.dtype is not None and a.dtype != spec.dtype:
                same_kind = (np.issubdtype(a.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)) or \
                            (np.issubdtype(a.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer))
                if not same_kind:
                    raise UsageError(f"{label}, sample {i}: {spec.name!r} is {a.dtype}, the input wants "
                                     f"{np.dtype(spec.dtype).name}")
                a = a.astype(spec.dtype)
            feed[spec.name] = a
        yield feed


# --- what to compare -------------------------------------------------------------------------
@dataclass
class Saturation:
    op: str
    tensor: str          # the saturating op's input
    axis: int | None     # Softmax / LogSoftmax axis (normalized later against the rank)
    legacy: bool         # Softmax-family before opset 13: the input is coerced to 2-D at ``axis``


def saturation_points(model: onnx.ModelProto) -> dict[str, Saturation]:
    """Per graph output produced by a saturating op (through a trivial chain), that op."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    feeds = {i.name for i in g.input} | {t.name for t in g.initializer}
    out = {}
    for vo in g.output:
        name, seen = vo.name, 0
        node = producer.get(name)
        while node is not None and node.domain in ("", "ai.onnx") and node.op_type in TRIVIAL and seen < 32:
            node, seen = producer.get(node.input[0]) if node.input else None, seen + 1
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in SATURATING or not node.input:
            continue
        if node.input[0] in feeds:
            continue
        axis = None
        if node.op_type in ("Softmax", "LogSoftmax"):
            attr = next((a for a in node.attribute if a.name == "axis"), None)
            axis = attr.i if attr is not None else (-1 if opset >= 13 else 1)
        out[name] = Saturation(node.op_type, node.input[0], axis, opset < 13)
    return out


def layer_tensors(rewritten: onnx.ModelProto, layers: Sequence[Mapping]) -> list[tuple[str, str]]:
    """``(layer name, tensor)`` per rewritten layer: the tensor the layer's new nodes produce that
    none of them consumes (the original conv's, or folded BN's, output name, kept by the rewrite)."""
    g = rewritten.graph
    by_name = {n.name: n for n in g.node}
    out = []
    for layer in layers:
        nodes = [by_name[n] for n in layer.get("new_nodes", []) if n in by_name]
        produced = [o for n in nodes for o in n.output if o]
        consumed = {i for n in nodes for i in n.input}
        ends = [o for o in produced if o not in consumed]
        if len(ends) == 1:
            out.append((layer["name"], ends[0]))
    return out


# --- the measures ----------------------------------------------------------------------------
class _Acc:
    """Streaming sums for one tensor over all samples."""

    def __init__(self, class_axis: int | None, saturation: Saturation | None = None):
        self.class_axis = class_axis      # axis of the classes for top-k, None: not class-like
        self.sat = saturation             # the saturating op producing this tensor (for its share)
        self.shape = None
        self.shapes_vary = False
        self.integer = False
        self.n = 0
        self.sq_ref = self.sq_new = self.sq_diff = self.dot = 0.0
        self.max_abs = self.max_abs_ref = 0.0
        self.equal = 0
        self.rows = self.top1 = self.top5 = 0
        self.samples = self.sample_top1 = 0   # samples whose rows all keep their argmax
        self.classes = None
        self.nonfinite_ref = self.nonfinite_new = 0
        self.sat_count = self.sat_total = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.shape is None:
            self.shape = list(a.shape)
        elif list(a.shape) != self.shape:
            self.shapes_vary = True
        if a.shape != b.shape:
            raise RuntimeError(f"output shapes differ between the models: {list(a.shape)} vs {list(b.shape)}")
        if not np.issubdtype(a.dtype, np.floating):
            self.integer = True
            self.n += a.size
            self.equal += int(np.count_nonzero(a == b))
            return
        a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
        fa, fb = np.isfinite(a64), np.isfinite(b64)
        self.nonfinite_ref += int(a64.size - np.count_nonzero(fa))
        self.nonfinite_new += int(b64.size - np.count_nonzero(fb))
        ok = fa & fb
        if not ok.all():
            a64, b64 = np.where(ok, a64, 0.0), np.where(ok, b64, 0.0)
        fa64, fb64 = a64.ravel(), b64.ravel()
        d = fa64 - fb64
        self.n += a.size
        # einsum, not np.dot/vdot: no BLAS threads (measured 0.1 s a call for a 180k-element
        # output when the BLAS pool competes for loaded cores; einsum 0.1 ms)
        self.sq_ref += float(np.einsum("i,i->", fa64, fa64))
        self.sq_new += float(np.einsum("i,i->", fb64, fb64))
        self.sq_diff += float(np.einsum("i,i->", d, d))
        self.dot += float(np.einsum("i,i->", fa64, fb64))
        if a.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
            self.max_abs_ref = max(self.max_abs_ref, float(np.max(np.abs(a64))))
        if self.class_axis is not None and a.ndim >= 1:
            ax = self.class_axis % a.ndim
            ra = np.moveaxis(a64, ax, -1).reshape(-1, a.shape[ax])
            rb = np.moveaxis(b64, ax, -1).reshape(-1, a.shape[ax])
            self.classes = a.shape[ax]
            top_a = np.argmax(ra, axis=1)
            self.rows += ra.shape[0]
            same = int(np.count_nonzero(top_a == np.argmax(rb, axis=1)))
            self.top1 += same
            self.samples += 1
            self.sample_top1 += int(same == ra.shape[0])
            if self.classes > 5:  # the original's argmax has fewer than 5 rewritten scores above it
                at = rb[np.arange(rb.shape[0]), top_a]
                self.top5 += int(np.count_nonzero(np.count_nonzero(rb > at[:, None], axis=1) < 5))
        if self.sat is not None:
            self._saturation(a64)

    def _saturation(self, y: np.ndarray) -> None:
        op = self.sat.op
        if op in ("Softmax", "LogSoftmax"):
            p = np.exp(y) if op == "LogSoftmax" else y
            if y.ndim == 0:
                return
            ax = self.sat.axis % y.ndim
            rows = p.reshape(int(np.prod(y.shape[:ax])), -1) if self.sat.legacy else \
                np.moveaxis(p, ax, -1).reshape(-1, y.shape[ax])
            self.sat_total += rows.shape[0]
            self.sat_count += int(np.count_nonzero(rows.max(axis=1) > 0.99)) if rows.size else 0
        elif op == "Tanh":
            self.sat_total += y.size
            self.sat_count += int(np.count_nonzero(np.abs(y) > 0.99))
        else:  # Sigmoid, HardSigmoid
            self.sat_total += y.size
            self.sat_count += int(np.count_nonzero((y < 0.01) | (y > 0.99)))

    def result(self, scale: float) -> dict:
        out: dict = {"shape": self.shape}
        if self.shapes_vary:
            out["shapes_vary"] = True
        if self.integer:
            match = self.equal / self.n if self.n else 1.0
            out.update(exact_match=match, rel_l2_error=None, max_abs_error=None, cosine=None,
                       near_zero_reference=False, error=1.0 - match)
            return out
        na, nb = np.sqrt(self.sq_ref), np.sqrt(self.sq_new)
        rms_ref = float(np.sqrt(self.sq_ref / self.n)) if self.n else 0.0
        rms_diff = float(np.sqrt(self.sq_diff / self.n)) if self.n else 0.0
        near_zero = rms_ref <= NEAR_ZERO * scale
        rel = None if near_zero else float(np.sqrt(self.sq_diff) / na)
        if na > 0 and nb > 0:
            cosine = float(np.clip(self.dot / (na * nb), -1.0, 1.0))
        else:
            cosine = 1.0 if na == nb else 0.0
        out.update(rel_l2_error=rel, max_abs_error=self.max_abs, cosine=cosine, rms_reference=rms_ref,
                   near_zero_reference=near_zero)
        if near_zero:
            out["scaled_error"] = rms_diff / scale
        out["error"] = out["scaled_error"] if near_zero else rel
        if self.class_axis is not None and self.rows:
            out["rows"] = self.rows
            out["classes"] = self.classes
            out["top1_agreement"] = self.top1 / self.rows
            out["top5_agreement"] = self.top5 / self.rows if self.classes > 5 else None
            if self.rows > self.samples:  # several rows a sample (a batch, a sequence): all of them agree
                out["sample_top1_agreement"] = self.sample_top1 / self.samples
        else:
            out["top1_agreement"] = out["top5_agreement"] = None
        if self.sat_total:
            share = self.sat_count / self.sat_total
            out["saturated_share"] = share
        if self.nonfinite_ref or self.nonfinite_new:
            out["nonfinite_reference"], out["nonfinite_rewritten"] = self.nonfinite_ref, self.nonfinite_new
            if self.nonfinite_new > self.nonfinite_ref:
                out["error"] = None
        return out


def _class_axis(shape: Sequence[int], sat: Saturation | None) -> int | None:
    """The class axis of a class-like float output (see the module docstring), or None."""
    rank = len(shape)
    if rank == 2:
        return -1
    if sat is not None and sat.op in ("Softmax", "LogSoftmax") and rank >= 1 and not sat.legacy \
            and sat.axis % rank == rank - 1:
        return -1
    if rank == 3 and all(shape[-1] > d for d in shape[:-1]):  # [T, N, classes] of a sequence recognizer
        return -1
    return None


# --- sessions --------------------------------------------------------------------------------
def _read(model) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    from ..model.reading import read_model

    return read_model(model, load_external_data=False, copy=False)


def _session(model: onnx.ModelProto, folder: Path | None, extra_outputs: Sequence[str] = (), threads: int | None = None,
             providers: Sequence[str] = ()):
    """An onnxruntime session of ``model`` (a proto, external data read from ``folder``) with
    ``extra_outputs`` added as graph outputs on a copy; C++ log silenced."""
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    add = [t for t in dict.fromkeys(extra_outputs) if t not in existing]
    if add:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(onnx.ValueInfoProto(name=t) for t in add)
        model = copy
    ort.set_default_logger_severity(3)  # the environment's logger too (warnings before the session's options apply)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        from .calibrate import providers_for

        return ort.InferenceSession(model.SerializeToString(), so, providers=providers_for(providers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        if isinstance(e, UsageError):
            raise
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def session(model, threads: int | None = None):
    """A plain onnxruntime session (path or proto), C++ log silenced."""
    proto, path = _read(model)
    return _session(proto, path.parent if path else None, threads=threads)


# --- the stage -------------------------------------------------------------------------------
def verify(original, rewritten, samples: Iterable[Mapping[str, np.ndarray]] | None = None, *,
           source: str | None = None, dims: Mapping[str, int] | None = None,
           input_shapes: Mapping[str, Sequence[int | str]] | None = None, seed: int = 0,
           layers: Sequence[Mapping] | None = None, tolerance: float | None = None,
           threads: int | None = None, providers: Sequence[str] = ()) -> dict:
    """Run both models (paths or ModelProtos) on every sample and compare (module docstring).

    ``samples``: an iterable of ``{input name: array}`` (one sample each, arrays of the input's
    rank), e.g. ``CalibrationSet.holdout`` or :func:`load_samples`; None: one seeded random
    sample, a smoke test. ``source`` describes the samples in the report. ``layers``: the
    report's ``layers`` rows (``name``, ``new_nodes``) for the per-layer errors. ``providers``:
    onnxruntime execution providers of both sessions (``--providers`` names; default CPU). Returns the
    report's ``verification`` dict; ``passed`` is None without ``tolerance``.
    """
    p1, path1 = _read(original)
    p2, path2 = _read(rewritten)
    specs = model_inputs(p1, input_shapes)
    notes: list[str] = []
    smoke = samples is None
    if smoke:
        samples, notes = random_samples(specs, dims, seed)
        label = f"random normal, seed {seed}"
    else:
        label = source or "data"
    sat = saturation_points(p1)
    produced2 = {o for n in p2.graph.node for o in n.output} | {i.name for i in p2.graph.input}
    pre = {}
    for out_name, s in sat.items():
        if s.tensor in produced2:
            pre[out_name] = s
        else:
            notes.append(f"{out_name}: the tensor before {s.op} ({s.tensor}) is not in the rewritten model; not compared")
    lt = layer_tensors(p2, layers) if layers else []
    outputs = [o.name for o in p1.graph.output]
    extra = [s.tensor for s in pre.values()] + [t for _, t in lt]
    s1 = _session(p1, path1.parent if path1 else None, extra, threads, providers)
    s2 = _session(p2, path2.parent if path2 else None, extra, threads, providers)
    names = list(dict.fromkeys(outputs + extra))
    accs = {n: _Acc(None) for n in names}
    for n in outputs:
        accs[n].sat = pre.get(n)
    count, first_shapes = 0, None
    for feed in _checked(samples, specs, label):
        try:
            r1 = s1.run(names, feed)
            r2 = s2.run(names, feed)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"onnxruntime failed to run the model on {label} sample {count}: "
                             f"{str(e).splitlines()[0][:300]}") from None
        for n, a, b in zip(names, r1, r2):
            acc = accs[n]
            if count == 0:
                first_shapes = first_shapes or {k: list(np.shape(v)) for k, v in feed.items()}
                acc.class_axis = _class_axis(a.shape, pre.get(n) if n in outputs else None) \
                    if np.issubdtype(a.dtype, np.floating) else None
                if acc.class_axis is not None and a.shape and a.shape[acc.class_axis] < 2:
                    acc.class_axis = None
            acc.add(a, b)
        count += 1
    if count == 0:
        raise UsageError(f"{label}: no samples to verify on")
    scale = 1.0 + max((accs[n].max_abs_ref for n in outputs), default=0.0)
    results = {}
    checked = []
    failed_nonfinite = False
    for n in outputs:
        r = accs[n].result(scale)
        errs = [r["error"]]
        if n in pre:
            s = pre[n]
            pr = accs[s.tensor].result(scale)
            pr["tensor"], pr["op"] = s.tensor, s.op
            r["before_saturation"] = pr
            errs.append(pr["error"])
        if any(e is None for e in errs):
            failed_nonfinite = True
        else:
            checked.append(max(errs))
        results[n] = r
    layer_rows = []
    for lname, t in lt:
        r = accs[t].result(scale)
        layer_rows.append({"name": lname, "tensor": t, **{k: r.get(k) for k in (
            "rel_l2_error", "max_abs_error", "cosine", "near_zero_reference", "scaled_error", "error")}})
    error = None if failed_nonfinite else max(checked, default=0.0)
    passed = None
    if tolerance is not None:
        passed = error is not None and error <= tolerance
    return {
        "inputs": label,
        "smoke_test": smoke,
        "note": SMOKE_TEST if smoke else None,
        "samples": count,
        "input_shapes": first_shapes,
        "notes": notes,
        "scale": scale,
        "outputs": results,
        "layers": layer_rows if layers is not None else None,
        "checked": CHECKED,
        "checked_error": error,
        "max_rel_l2_error": error,
        "tolerance": tolerance,
        "passed": passed,
    }
