"""Shared helpers for sepify's tests: small models built with ``onnx.helper``.

``single_node_model`` builds a one-node model from a compact description of its inputs:

* a tuple/list of dims (ints or symbol strings) -> a float32 graph input ``x0``, ``x1``, ...
* a ``numpy.ndarray`` -> a constant initializer ``w1``, ``w2``, ... of that dtype
* ``Input(shape, dtype)`` -> a graph input with another element type
* ``None`` -> an omitted optional input (empty name)

Outputs are declared with the element type and rank ONNX shape inference finds and unknown
dimensions, so the code under test infers the dimensions itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
if str(SAMPLES) not in sys.path:
    sys.path.insert(0, str(SAMPLES))

DEFAULT_OPSET = 17
DEFAULT_IR = 8


@dataclass(frozen=True)
class Input:
    """A graph input of a given element type (default float32)."""

    shape: Sequence
    dtype: int = TensorProto.FLOAT


def output_info(name: str, dtype: int = TensorProto.FLOAT, rank: int | None = None) -> onnx.ValueInfoProto:
    """A graph output with an element type and a rank but no dimension values (the checker
    requires a shape on main-graph outputs; shape inference fills the dimensions in)."""
    return helper.make_tensor_value_info(name, dtype, [None] * rank if rank is not None else None)


def _declare_outputs(model: onnx.ModelProto, default_rank: int | None) -> onnx.ModelProto:
    """Give every output without a type the element type and rank ONNX shape inference finds
    (dimensions left unknown, so the code under test infers them itself)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        found = {o.name: o.type for o in inferred.graph.output}
    except Exception:  # noqa: BLE001 - e.g. a custom op: fall back to the defaults
        found = {}
    for out in model.graph.output:
        if out.type.HasField("tensor_type") and out.type.tensor_type.HasField("shape"):
            continue
        t = found.get(out.name)
        if t is not None and t.tensor_type.elem_type and t.tensor_type.HasField("shape"):
            dtype, rank = t.tensor_type.elem_type, len(t.tensor_type.shape.dim)
        else:
            if default_rank is None:
                raise ValueError(f"ONNX cannot tell the rank of output {out.name!r}: pass default_rank/out_rank")
            dtype = (t.tensor_type.elem_type if t is not None else 0) or TensorProto.FLOAT
            rank = default_rank
        out.CopyFrom(output_info(out.name, dtype, rank))
    return model


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[str | onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = DEFAULT_OPSET,
    extra_opsets: dict[str, int] | None = None,
    ir_version: int = DEFAULT_IR,
    functions: Sequence[onnx.FunctionProto] = (),
    value_info: Sequence[onnx.ValueInfoProto] = (),
    name: str = "test",
    default_rank: int | None = None,
) -> onnx.ModelProto:
    """A model; outputs given by name get their type and rank from ONNX shape inference."""
    outs = [onnx.ValueInfoProto(name=o) if isinstance(o, str) else o for o in outputs]
    graph = helper.make_graph(list(nodes), name, list(inputs), outs, initializer=list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, functions=list(functions))
    return _declare_outputs(model, default_rank)


def single_node_model(
    op_type: str,
    inputs: Sequence,
    *,
    n_outputs: int = 1,
    domain: str = "",
    opset: int = DEFAULT_OPSET,
    extra_opsets: dict[str, int] | None = None,
    node_name: str = "node",
    out_rank: int | None = None,
    **attrs,
) -> onnx.ModelProto:
    """A model with one node ``node_name`` of ``op_type``; see the module docstring for ``inputs``.

    ``out_rank``: the rank declared for outputs whose type shape inference cannot tell
    (custom-domain ops)."""
    graph_inputs, inits, names = [], [], []
    for i, spec in enumerate(inputs):
        if spec is None:
            names.append("")
        elif isinstance(spec, np.ndarray):
            name = f"w{i}"
            inits.append(numpy_helper.from_array(spec, name))
            names.append(name)
        elif isinstance(spec, Input):
            name = f"x{i}"
            graph_inputs.append(helper.make_tensor_value_info(name, spec.dtype, list(spec.shape)))
            names.append(name)
        else:
            name = f"x{i}"
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(spec)))
            names.append(name)
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outputs, name=node_name, domain=domain, **attrs)
    if domain and domain not in (extra_opsets or {}):
        extra_opsets = dict(extra_opsets or {}, **{domain: 1})
    return make_model([node], graph_inputs, outputs, inits, opset=opset, extra_opsets=extra_opsets,
                      default_rank=out_rank)


def rand(*shape, dtype=np.float32) -> np.ndarray:
    """Deterministic constant data of a given shape (values do not matter for counting)."""
    n = int(np.prod(shape)) if shape else 1
    return (np.arange(n) % 7 - 3).reshape(shape).astype(dtype)


def onnx_backend_data_dir() -> Path:
    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def make_samples():
    import make_samples as ms

    return ms


@pytest.fixture
def tiny_model(tmp_path, make_samples) -> Path:
    """tiny_cnn written to its own folder; at teardown the test checks its bytes are unchanged."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "tiny.onnx"
    path.write_bytes(make_samples.tiny_cnn().SerializeToString())
    data = path.read_bytes()
    yield path
    assert path.read_bytes() == data, "the input model was modified"


def pytest_collection_modifyitems(config, items):
    """``huge`` tests are opt-in. ``addopts`` deselects them with ``-m 'not huge'``, but any ``-m``
    on the command line replaces that (``-m 'not heavy'`` would run them): deselect them here
    unless the marker expression names ``huge``."""
    if "huge" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("huge") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("huge") is not None])
        items[:] = keep


@pytest.fixture(autouse=True, scope="session")
def _private_table_cache(tmp_path_factory):
    """Calibrated rewrites cache their tables (sepify.rewrite.sensitivity): never in the home
    folder of whoever runs the suite."""
    old = os.environ.get("SEPIFY_CACHE_DIR")
    os.environ["SEPIFY_CACHE_DIR"] = str(tmp_path_factory.mktemp("sepify-cache"))
    yield
    if old is None:
        os.environ.pop("SEPIFY_CACHE_DIR", None)
    else:
        os.environ["SEPIFY_CACHE_DIR"] = old
