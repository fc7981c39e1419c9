"""Calibration data for the data-aware rewrite: loading, validation, the fit / holdout split.

Sources (``--calibration PATH`` or the Python API's ``calibration=``):

- a ``.npz`` file with one array per graph input, named after the input, the samples stacked
  on a new leading axis: ``[S, *input_shape]`` (as ``--inputs`` of ``--verify``; an array of the
  input's own rank would be one sample there, so it is refused here with a hint);
- a folder of ``.npz`` files, one sample each (arrays shaped like the input, or ``[1, *shape]``),
  read in file-name order and streamed: a sample is read when it is used, never all at once;
- in Python, an iterable of ``{input_name: array}`` (one sample each), or a mapping
  ``{input_name: stacked array}`` like the ``.npz`` file.

Validation (each a one-line :class:`~sepify.errors.UsageError`, exit 2): every graph input
has an array and every array is a graph input; the dtype is the input's element type; the
shape matches the model's input shape with ``--input-shape`` / ``--dim`` applied; symbolic
dims are bound from the data (the same value in every sample and input, reported in
:attr:`CalibrationSet.dims`); the values are finite; and at least :data:`MIN_FIT_SAMPLES`
samples remain for the fit after the holdout is taken.

Split: ``holdout`` is a fraction in ``[0, 1)`` (``round(fraction * S)`` samples, at least 1
when the fraction is > 0) or a count ``>= 1``. The held-out samples are drawn with a seeded
permutation of the sample *indices* (``numpy.random.default_rng(seed)``), so the split never
depends on the values: changing a held-out sample cannot change the fit. They are never used
to fit; the rewrite measures its per-layer output errors on them and ``--verify`` compares the
models on them.

Default holdout 0.2: on a trained captcha CNN 128 calibration inputs fitted as well as 512
(``shared/reference.md``), so with a typical 256-sample set the fit keeps ~205 samples, well
past that point, while ~51 held-out samples give a measured error that is an average over many
inputs rather than a single one.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import UsageError

MIN_FIT_SAMPLES = 8
"""The fit set must keep at least this many samples (each gives many patch rows per layer, but
fewer inputs than this rarely cover the input distribution)."""

DEFAULT_HOLDOUT = 0.2

Feed = dict  # {input_name: np.ndarray}, one onnxruntime feed


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype (None when it is not a numeric tensor) and shape (per
    axis an int, a symbol name, or None for unknown; None when the rank is unknown)."""

    name: str
    dtype: np.dtype | None
    shape: tuple | None


def model_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence] | None = None) -> list[InputSpec]:
    """The graph inputs a feed needs (initializers listed as inputs, IR < 4, excluded), with
    ``input_shapes`` (``--input-shape``) replacing the declared shapes. Used for calibration
    data, ``--inputs`` and the random smoke-test inputs alike. A dimension with no name (or
    written ``-1``) is called ``<input>_d<axis>``, as :func:`~sepify.model.loading.bind_inputs`
    calls it, so that ``--dim`` binds it here too."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:  # noqa: BLE001 - e.g. a sequence or an undefined type
            dtype = None
        if dtype is not None and dtype.kind not in "biuf":  # strings, bfloat16 and the like
            dtype = None
        if input_shapes and vi.name in input_shapes:
            shape = tuple(d if isinstance(d, str) else int(d) for d in input_shapes[vi.name])
        elif tt.HasField("shape"):  # an anonymous or -1 dim has the name analysis gives it (--dim x_d0=...)
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                          else (d.dim_param or f"{vi.name}_d{axis}") for axis, d in enumerate(tt.shape.dim))
        else:
            shape = None
        out.append(InputSpec(vi.name, dtype, shape))
    return out


class _Samples(Sequence):
    """A read-only list of feeds produced on access (``get(i)``), so a folder is streamed."""

    def __init__(self, indices: Sequence[int], get: Callable[[int], Feed]):
        self._indices = list(indices)
        self._get = get

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _Samples(self._indices[i], self._get)
        return self._get(self._indices[i])

    @property
    def indices(self) -> list[int]:
        """Positions of these samples in the calibration source (file order / stack order)."""
        return list(self._indices)


@dataclass
class CalibrationSet:
    """Validated calibration samples, split into ``fit`` and ``holdout`` (sequences of feed
    dicts ``{input_name: array}`` shaped exactly like the model's inputs, ready for
    ``InferenceSession.run``). ``dims``: symbolic dims bound from the data."""

    fit: Sequence[Feed]
    holdout: Sequence[Feed]
    dims: dict[str, int]
    source: str
    holdout_setting: float
    seed: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return len(self.fit) + len(self.holdout)

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": self.n_samples, "fit_samples": len(self.fit),
                "holdout_samples": len(self.holdout), "holdout": self.holdout_setting, "split_seed": self.seed,
                "holdout_indices": list(getattr(self.holdout, "indices", [])),
                "input_shapes": self.input_shapes, "dims_bound_from_data": dict(self.dims)}


# --- reading ---------------------------------------------------------------------------------
def _npz_headers(path: Path, label: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Array names, shapes and dtypes of an ``.npz`` from the .npy headers (no data read)."""
    _require_npz(path, label)
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = reader(f)
                out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise UsageError(f"{label}: not a readable .npz file ({_line(e)})") from None
    return out


def _line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (calibration data, ``--inputs``). Anything else — a
    ``.npy`` file, an empty or truncated file, a JSON — is one line (:class:`UsageError`):
    ``np.load`` would return a bare array for a .npy and try to unpickle any other file."""
    _require_npz(path, label)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{label}: cannot read ({_line(e)})") from None


def _require_npz(path: Path, label: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UsageError(f"{label}: cannot read ({e.strerror or e})") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip (the second: an empty one, no arrays)
        return
    what = ("an empty file" if not head else "a .npy file (one array without a name)" if head == b"\x93NUMPY"
            else "not a zip archive")
    raise UsageError(f"{label}: not an .npz file: {what}; write one array per graph input, named after it, with "
                     "numpy.savez(path, NAME=array)")


# --- validation ------------------------------------------------------------------------------
class _Binder:
    """Binds symbolic dims from the data; every sample and input must agree."""

    def __init__(self, label: str, dims: Mapping[str, int] | None):
        self.label = label
        self.given = dict(dims or {})
        self.bound: dict[str, int] = {}
        self.where: dict[str, str] = {}

    def check(self, spec: InputSpec, shape: tuple[int, ...], what: str) -> None:
        want = spec.shape
        if want is None:  # no declared shape: anything goes
            return
        if len(shape) != len(want):
            raise UsageError(f"{self.label}: {what} has shape {list(shape)}, the model's input {spec.name!r} "
                             f"is {_fmt(want)} (rank {len(want)})")
        for i, (d, w) in enumerate(zip(shape, want)):
            if isinstance(w, int):
                if d != w:
                    raise UsageError(f"{self.label}: {what} has shape {list(shape)}, the model's input {spec.name!r} "
                                     f"is {_fmt(want)} (dim {i}: {d} != {w})")
            elif isinstance(w, str):
                if w in self.given and self.given[w] != d:
                    raise UsageError(f"{self.label}: {what} has {w}={d} (dim {i}), but --dim binds {w}={self.given[w]}")
                if w in self.bound and self.bound[w] != d:
                    raise UsageError(f"{self.label}: symbolic dim {w!r} is {self.bound[w]} in {self.where[w]} but {d} in "
                                     f"{what}; all samples must agree (resize them, or rewrite per input size)")
                if w not in self.given and w not in self.bound:
                    self.bound[w], self.where[w] = d, what


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_dtype(label: str, spec: InputSpec, dtype: np.dtype, what: str) -> None:
    if dtype != spec.dtype:
        raise UsageError(f"{label}: {what} is {dtype}, the model's input {spec.name!r} is {spec.dtype} "
                         f"(cast it, e.g. arr.astype(np.{spec.dtype}))")


def _check_names(label: str, specs: list[InputSpec], names: Iterable[str], what: str) -> None:
    names = list(names)
    wanted = [s.name for s in specs]
    extra = [n for n in names if n not in wanted]
    if extra:
        raise UsageError(f"{label}: {what}array {extra[0]!r} is not a graph input (graph inputs: {', '.join(wanted)})")
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UsageError(f"{label}: {what}no array for graph input {missing[0]!r} "
                         f"(arrays: {', '.join(names) or 'none'}; name each array after a graph input)")


def _check_finite(label: str, arr: np.ndarray, what: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise UsageError(f"{label}: {what} contains NaN or infinite values")


# --- the split -------------------------------------------------------------------------------
def _split(n: int, holdout: float, seed: int, label: str) -> tuple[list[int], list[int]]:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or holdout < 0 or not np.isfinite(holdout):
        raise UsageError(f"--holdout must be a fraction in [0, 1) or a sample count >= 1, not {holdout!r}")
    if holdout >= 1:
        if float(holdout) != int(holdout):
            raise UsageError(f"--holdout must be a fraction in [0, 1) or a whole sample count, not {holdout!r}")
        k = int(holdout)
    else:
        k = max(1, int(round(holdout * n))) if holdout > 0 else 0
    if n - k < MIN_FIT_SAMPLES:
        raise UsageError(f"{label}: too few calibration samples: {n} given, {k} held out (--holdout {holdout:g}) "
                         f"leaves {max(n - k, 0)} to fit; at least {MIN_FIT_SAMPLES} fit samples are needed")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])


# --- the entry point -------------------------------------------------------------------------
def load_calibration(source, model_or_inputs, *, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
                     input_shapes: Mapping[str, Sequence] | None = None,
                     dims: Mapping[str, int] | None = None) -> CalibrationSet:
    """Validate ``source`` against the model's inputs and split it (see the module docstring).

    ``model_or_inputs``: an ``onnx.ModelProto`` or a list of :class:`InputSpec`.
    """
    specs = model_or_inputs if isinstance(model_or_inputs, list) else model_inputs(model_or_inputs, input_shapes)
    for s in specs:
        if s.dtype is None:
            raise UsageError(f"--calibration: graph input {s.name!r} is not a tensor of a numpy type")
    by_name = {s.name: s for s in specs}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = f"--calibration {path}"
        if path.is_dir():
            return _from_folder(path, label, specs, holdout, seed, dims)
        if not path.exists():
            raise UsageError(f"{label}: no such file or folder")
        return _from_stacked(read_npz(path, label), label, str(path), specs, holdout, seed, dims)
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        return _from_stacked(arrays, "calibration", "<arrays>", specs, holdout, seed, dims)
    if isinstance(source, Iterable):
        samples = []
        label = "calibration"
        binder = _Binder(label, dims)
        for i, s in enumerate(source):
            if not isinstance(s, Mapping):
                raise UsageError(f"{label}: sample {i} is a {type(s).__name__}, not a dict {{input_name: array}}")
            _check_names(label, specs, s.keys(), f"sample {i}: ")
            feed = {}
            for name, v in s.items():
                a = np.asarray(v)
                what = f"sample {i} {name!r}"
                _check_dtype(label, by_name[name], a.dtype, what)
                binder.check(by_name[name], a.shape, what)
                _check_finite(label, a, what)
                feed[name] = a
            samples.append(feed)
        fit, hold = _split(len(samples), holdout, seed, label)
        return _make(samples.__getitem__, fit, hold, binder, "<samples>", holdout, seed, specs,
                     {k: list(v.shape) for k, v in samples[0].items()})
    raise UsageError(f"calibration must be a path, a mapping of stacked arrays or an iterable of dicts, "
                     f"not {type(source).__name__}")


def _make(get, fit, hold, binder, source, holdout, seed, specs, shapes: dict, notes=()) -> CalibrationSet:
    return CalibrationSet(_Samples(fit, get), _Samples(hold, get), dict(binder.bound), source, holdout, seed,
                          shapes, list(notes))


def _from_stacked(arrays: dict[str, np.ndarray], label: str, source: str, specs: list[InputSpec],
                  holdout, seed, dims) -> CalibrationSet:
    by_name = {s.name: s for s in specs}
    _check_names(label, specs, arrays.keys(), "")
    counts = {}
    binder = _Binder(label, dims)
    notes = []
    for name, a in arrays.items():
        spec = by_name[name]
        _check_dtype(label, spec, a.dtype, f"{name!r}")
        want = spec.shape
        if want is None or a.ndim == len(want) + 1:
            if a.ndim < 1:
                raise UsageError(f"{label}: {name!r} is a scalar; stack the samples on a leading axis")
            counts[name] = a.shape[0]
            binder.check(spec, tuple(a.shape[1:]), f"{name!r} (per sample)")
        else:
            hint = " (x[:, None] adds it)" if a.ndim == len(want) else ""
            raise UsageError(f"{label}: {name!r} has shape {list(a.shape)}; the model's input is {_fmt(want)}, so the "
                             f"samples must be stacked on a new leading axis: [S, {', '.join('?' if d is None else str(d) for d in want)}]{hint}")
        _check_finite(label, a, f"{name!r}")
    if len(set(counts.values())) > 1:
        raise UsageError(f"{label}: the arrays hold different numbers of samples "
                         f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    n = next(iter(counts.values())) if counts else 0

    def get(i: int) -> Feed:
        return {k: a[i] for k, a in arrays.items()}

    fit, hold = _split(n, holdout, seed, label)
    return _make(get, fit, hold, binder, source, holdout, seed, specs, {k: list(v.shape) for k, v in get(0).items()}, notes)


def _from_folder(path: Path, label: str, specs: list[InputSpec], holdout, seed, dims) -> CalibrationSet:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise UsageError(f"{label}: the folder has no .npz files (one sample per file)")
    by_name = {s.name: s for s in specs}
    binder = _Binder(label, dims)
    squeeze: dict[tuple[int, str], bool] = {}
    shapes: dict[str, list[int]] = {}
    for i, f in enumerate(files):  # headers only: the data is read when a sample is used
        heads = _npz_headers(f, f"{label}/{f.name}")
        _check_names(f"{label}/{f.name}", specs, heads.keys(), "")
        for name, (shape, dtype) in heads.items():
            spec = by_name[name]
            _check_dtype(f"{label}/{f.name}", spec, dtype, f"{name!r}")
            sq = spec.shape is not None and len(shape) == len(spec.shape) + 1 and shape[0] == 1
            squeeze[(i, name)] = sq
            binder.check(spec, shape[1:] if sq else shape, f"{f.name} {name!r}")
            if i == 0:
                shapes[name] = list(shape[1:] if sq else shape)

    def get(i: int) -> Feed:
        lab = f"{label}/{files[i].name}"
        data = read_npz(files[i], lab)
        out = {}
        for k, a in data.items():
            a = a[0] if squeeze[(i, k)] else a
            _check_finite(lab, a, f"{k!r}")
            out[k] = a
        return out

    fit, hold = _split(len(files), holdout, seed, label)
    return _make(get, fit, hold, binder, str(path), holdout, seed, specs, shapes)
