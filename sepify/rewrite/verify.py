"""Numerical verification of a rewrite: run the original and the rewritten model in
onnxruntime on the same inputs and measure how far the outputs are apart.

Random inputs (seeded) are a smoke test of the rewrite's wiring and of the weight error's
effect on activations; they are not an accuracy measurement. For that, pass real data
(``--inputs file.npz``) and evaluate on your own validation set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from ..errors import ModelError, UsageError

_INT_RANGES = {np.dtype("bool"): (0, 2)}


def _session(model: onnx.ModelProto | str | os.PathLike):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = min(4, os.cpu_count() or 1)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def make_inputs(session, dims: Mapping[str, int] | None = None, seed: int = 0,
                input_shapes: Mapping[str, list] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input: floats ~ N(0, 1), integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = {}
    for inp in session.get_inputs():
        shape = (input_shapes or {}).get(inp.name) or inp.shape
        concrete = []
        for d in shape:
            if isinstance(d, int) and d > 0:
                concrete.append(d)
            elif isinstance(d, str) and d in dims:
                concrete.append(int(dims[d]))
            else:
                concrete.append(1)
        t = inp.type  # e.g. "tensor(float)"
        kind = t[t.find("(") + 1:-1]
        np_type = {"float": np.float32, "float16": np.float16, "double": np.float64, "int64": np.int64,
                   "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}.get(kind)
        if np_type is None:
            raise UsageError(f"cannot make random data for input {inp.name!r} of type {t}; pass --inputs file.npz")
        if np.issubdtype(np_type, np.floating):
            feeds[inp.name] = rng.standard_normal(concrete).astype(np_type)
        elif np_type is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, concrete).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 10, concrete).astype(np_type)
    return feeds


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read inputs: {e}") from None


def compare_outputs(a: np.ndarray, b: np.ndarray) -> dict:
    """max abs error, relative L2 error ``‖a−b‖/‖a‖``, cosine similarity, top-1 agreement."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    diff = a64 - b64
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    out = {
        "shape": list(np.shape(a)),
        "max_abs_error": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "rel_l2_error": float(np.linalg.norm(diff) / na) if na > 0 else float(np.linalg.norm(diff)),
        "cosine": float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0),
        "top1_agreement": None,
    }
    if np.ndim(a) == 2 and np.shape(a)[1] > 1 and np.issubdtype(np.asarray(a).dtype, np.floating):
        out["top1_agreement"] = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    return out


def verify(original, rewritten, dims: Mapping[str, int] | None = None, inputs: Mapping[str, np.ndarray] | None = None,
           seed: int = 0, input_shapes: Mapping[str, list] | None = None) -> dict:
    """Run both models on the same inputs; per output, the error measures of :func:`compare_outputs`."""
    s1, s2 = _session(original), _session(rewritten)
    feeds = dict(inputs) if inputs is not None else make_inputs(s1, dims, seed, input_shapes)
    names = [o.name for o in s1.get_outputs()]
    missing = [i.name for i in s1.get_inputs() if i.name not in feeds]
    if missing:
        raise UsageError(f"--inputs lacks graph input(s): {', '.join(missing)}")
    try:
        r1 = s1.run(names, feeds)
        r2 = s2.run(names, feeds)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"onnxruntime failed to run the model: {str(e).splitlines()[0][:300]}") from None
    outputs = {n: compare_outputs(a, b) for n, a, b in zip(names, r1, r2)}
    return {
        "inputs": "file" if inputs is not None else f"random normal, seed {seed}",
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "outputs": outputs,
        "max_rel_l2_error": max((o["rel_l2_error"] for o in outputs.values()), default=0.0),
    }
