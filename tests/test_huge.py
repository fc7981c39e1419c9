"""Huge models (issue 5): a generated model with more than 2 GB of weights in external data.

Opt-in (``python -m pytest -q -m huge``; the default run deselects the ``huge`` marker): it
writes ~2.5 GB (the model) plus ~2.5 GB (the rewritten copy) to a temporary folder, which
``SEPIFY_HUGE_TMP`` may choose (default: the system temporary folder); both are removed at the
end. About 30 s on 2 cores; the test process itself peaks at ~2.5 GB (onnxruntime holds the
weights while it runs the model; the sepify commands stay under 100 MB).

The model: a moderate 3x3 Conv ``mid`` (256 -> 256 channels) followed by 3x3 Convs with 4,096
channels on a 4x4 map (each 604 MB of float32 weights), Relu between them. The weights are
written chunk by chunk straight into ``huge.onnx.data`` (seeded uniform values scaled by
1/sqrt(fan-in)); the model file only references them, so generating it never holds more
than one chunk in memory.

Each command runs as ``python -m sepify ...`` in a fresh subprocess whose peak RSS is read
from ``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper process (so earlier children do not
count). ``analyze`` and ``check`` never read the weight bytes; ``rewrite --include ^mid$``
reads only ``mid``'s weight and streams the untouched weights into the new data file.
Figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytestmark = pytest.mark.huge

HW = 4  # spatial size of every feature map
C_IN = 256  # input channels, and mid's channels
C_BIG = 4096  # channels of the big convs
N_BIG = 4  # big 4096 -> 4096 convs (604 MB each), after one 256 -> 4096 conv
CHUNK = 64 * 2**20  # bytes generated and written at a time
ALIGN = 4096


def _convs() -> list[tuple[str, int, int]]:
    """(name, C_in, C_out) of every 3x3 Conv, in graph order."""
    convs = [("mid", C_IN, C_IN), ("widen", C_IN, C_BIG)]
    convs += [(f"big{i}", C_BIG, C_BIG) for i in range(1, N_BIG + 1)]
    return convs


def _external(name: str, dims: list[int], data, offset_holder: list[int], rng, scale: float) -> TensorProto:
    """A float32 initializer whose values are written to ``data`` chunk by chunk (seeded uniform
    in [-scale, scale)), referenced by location/offset/length."""
    count = int(np.prod(dims))
    pad = -offset_holder[0] % ALIGN
    data.write(b"\0" * pad)
    offset = offset_holder[0] + pad
    left = count
    while left:
        n = min(left, CHUNK // 4)
        chunk = rng.random(n, dtype=np.float32)
        chunk *= 2 * scale
        chunk -= scale
        data.write(chunk.tobytes())
        left -= n
    offset_holder[0] = offset + count * 4
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "huge.onnx.data"), ("offset", str(offset)), ("length", str(count * 4))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def build_huge_model(folder: Path) -> Path:
    """Write ``folder/huge.onnx`` + ``folder/huge.onnx.data``; return the model path."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    offset = [0]
    with open(folder / "huge.onnx.data", "wb") as data:
        for i, (name, cin, cout) in enumerate(_convs()):
            scale = float(np.sqrt(3.0 / (cin * 9)))  # variance 1/fan-in: activations stay O(1)
            inits.append(_external(f"{name}.weight", [cout, cin, 3, 3], data, offset, rng, scale))
            inits.append(_external(f"{name}.bias", [cout], data, offset, rng, 0.1))
            y = f"{name}_out"
            nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            x = y
            if i < len(_convs()) - 1:
                nodes.append(helper.make_node("Relu", [x], [f"{name}_relu"], name=f"{name}_relu"))
                x = f"{name}_relu"
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, HW, HW])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C_BIG, HW, HW])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "huge.onnx"
    onnx.save_model(model, str(path))  # every tensor already references the data file
    return path


def weight_bytes() -> int:
    return sum((cout * cin * 9 + cout) * 4 for _, cin, cout in _convs())


def expected_macs() -> int:
    return sum(cout * cin * 9 * HW * HW for _, cin, cout in _convs())


def expected_params() -> int:
    return sum(cout * cin * 9 + cout for _, cin, cout in _convs())


_MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    rc = subprocess.run(sys.argv[3:], stdout=out, stderr=err).returncode
seconds = time.perf_counter() - t
print(json.dumps({"rc": rc, "seconds": seconds,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(folder: Path, *args) -> dict:
    """Run ``python -m sepify ARGS`` in a fresh wrapper process: exit code, wall time, peak RSS
    of the sepify process (MB), stdout and stderr."""
    out, err = folder / "cmd.stdout", folder / "cmd.stderr"
    cmd = [sys.executable, "-c", _MEASURE, str(out), str(err), sys.executable, "-m", "sepify", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures = json.loads(proc.stdout)
    figures["stdout"], figures["stderr"] = out.read_text(), err.read_text()
    return figures


FIGURES: dict[str, dict] = {}


def _report(what: str, fig: dict) -> None:
    FIGURES[what] = {k: v for k, v in fig.items() if k not in ("stdout", "stderr")}
    print(f"\n[huge] {what}: {fig['seconds']:.1f} s, peak RSS {fig['max_rss_mb']:.0f} MB "
          f"({fig['max_rss_mb'] * 2**20 / weight_bytes():.1%} of the weights)")


@pytest.fixture(scope="module")
def huge(request):
    parent = os.environ.get("SEPIFY_HUGE_TMP") or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    need = 2.2 * weight_bytes() + 2**30
    if shutil.disk_usage(parent).free < need:  # asked for explicitly (-m huge): say why it cannot run
        pytest.fail(f"the huge-model test needs {need / 1e9:.1f} GB free in {parent} (set SEPIFY_HUGE_TMP)")
    folder = Path(tempfile.mkdtemp(prefix="sepify-huge-", dir=parent))
    try:
        t = time.perf_counter()
        path = build_huge_model(folder)
        size = (folder / "huge.onnx.data").stat().st_size
        print(f"\n[huge] model: {path.stat().st_size:,} B graph + {size:,} B external data "
              f"({weight_bytes() / 1e9:.2f} GB of weights, {expected_params():,} params, "
              f"{expected_macs():,} MACs), generated in {time.perf_counter() - t:.1f} s")
        assert size > 2**31
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if FIGURES:
            print("\n[huge] figures: " + json.dumps(FIGURES, sort_keys=True))


def test_analyze_does_not_read_the_weights(huge):
    fig = measure(huge.parent, "analyze", huge, "--format", "json")
    assert fig["rc"] == 0, fig["stderr"]
    _report("analyze", fig)
    totals = json.loads(fig["stdout"])["totals"]
    assert totals["macs"] == expected_macs()
    assert totals["params"] == expected_params()
    assert fig["max_rss_mb"] * 2**20 < 0.25 * weight_bytes()


def test_check_does_not_read_the_weights(huge):
    fig = measure(huge.parent, "check", huge, "--no-config", "--max-macs", expected_macs(),
                  "--max-params", expected_params(), "--format", "json")
    assert fig["rc"] == 0, fig["stderr"]
    _report("check", fig)
    (model,) = json.loads(fig["stdout"])["models"]
    assert model["status"] == "pass", model
    assert fig["max_rss_mb"] * 2**20 < 0.25 * weight_bytes()
    over = measure(huge.parent, "check", huge, "--no-config", "--max-macs", expected_macs() - 1)
    assert over["rc"] == 1, over["stderr"]


def _run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # basic optimizations only: the NCHWc layout transform would keep a reordered copy of
    # every weight beside the original (twice the memory, same result)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    del sess
    return y


def test_rewrite_writes_a_valid_external_data_model(huge):
    folder = huge.parent
    out = folder / "out" / "huge.sep.onnx"
    out.parent.mkdir()
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}
    # full rank of the one moderate conv: exact, so the outputs must match; every other
    # weight (2.4 GB) is carried through untouched
    fig = measure(folder, "rewrite", huge, "-o", out, "--include", "^mid$", "--rank", "full",
                  "--allow-increase", "--format", "json")
    assert fig["rc"] == 0, fig["stderr"]
    _report("rewrite", fig)
    # the untouched weights are copied file to file in chunks, never loaded
    assert fig["max_rss_mb"] * 2**20 < 0.25 * weight_bytes()
    report = json.loads(fig["stdout"])
    assert [layer["name"] for layer in report["layers"]] == ["mid"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["huge.sep.onnx", "huge.sep.onnx.data"]
    # the input is untouched
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
            if p.is_file() and p.name.startswith("huge")} == {k: v for k, v in before.items() if k.startswith("huge")}

    onnx.checker.check_model(str(out), full_check=True)
    header = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in header.graph.initializer}
    # the pair's weights (full rank 9: the default `split` form, docs/rewrite.md) replace mid's
    (layer,) = report["layers"]
    assert layer["form"] == "split" and layer["rank"] == 9
    pair_convs = [n for n in layer["new_nodes"] if n.startswith(("mid/depthwise_", "mid/pointwise"))]
    assert len(pair_convs) == 10
    assert "mid.weight" not in inits and {f"{n}.weight" for n in pair_convs} <= set(inits)
    # every big weight went to the new data file, byte for byte (spot-checked at both ends)
    for name, _, _ in _convs()[1:]:
        t = inits[f"{name}.weight"]
        assert t.data_location == TensorProto.EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "huge.sep.onnx.data"
        src = next(s for s in onnx.load(str(huge), load_external_data=False).graph.initializer if s.name == t.name)
        src_info = {e.key: e.value for e in src.external_data}
        assert info["length"] == src_info["length"]
        n = int(info["length"])
        with open(out.parent / info["location"], "rb") as a, open(folder / src_info["location"], "rb") as b:
            for at in (0, n - 2**20):
                a.seek(int(info["offset"]) + at)
                b.seek(int(src_info["offset"]) + at)
                assert a.read(2**20) == b.read(2**20)
    assert (out.parent / "huge.sep.onnx.data").stat().st_size > 2**31

    x = np.random.default_rng(1).standard_normal((1, C_IN, HW, HW)).astype(np.float32)
    t = time.perf_counter()
    expected = _run_ort(huge, x)
    got = _run_ort(out, x)
    rel = float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))
    print(f"\n[huge] onnxruntime, original + rewritten: {time.perf_counter() - t:.1f} s, relative L2 error {rel:.2e}")
    assert np.isfinite(expected).all() and np.linalg.norm(expected) > 0
    assert rel < 1e-4, rel
