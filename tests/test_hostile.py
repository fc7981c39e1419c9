"""Hostile input, tried for real: a corpus of broken files made here (in ``tmp_path``).

For every file, ``sepify analyze``, ``sepify rewrite -o OUT`` and ``sepify check`` exit with
code 2 and print exactly one line on stderr (``sepify: error: FILE: problem``) naming the
file and the problem; no traceback; ``rewrite`` leaves nothing in the output folder (no model,
no ``.*.tmp``). A few cases run through ``python -m sepify`` to see the real stderr.

External data is validated from metadata (lstat/stat) for every command: the file exists,
its location is relative, stays inside the model's folder and goes through no symbolic link
(as onnx requires to read it; a link that leads outside is reported as outside), offset +
length fit in the file. A location that escapes the folder is refused *without being opened*.

The ``regression_*`` cases and tests are inputs the fuzz test (tests/test_fuzz.py) found:
crashes (exit 3), or verdicts that differed between commands, each fixed where its comment
says.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main
from sepify.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").glob("*.onnx"))
SECRET = b"root:x:0:0:secret-content-must-never-be-read\n" * 3  # 138 bytes


# --- model builders ---------------------------------------------------------------------------
def _conv_model(w: onnx.TensorProto | None = None, x_shape=(1, 3, 8, 8), y_shape=(1, 4, 6, 6),
                extra_nodes=()) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(W[4,3,3,3]) -> y -> Relu -> z. ``w`` replaces the weight."""
    if w is None:
        w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
             helper.make_node("Relu", ["y"], ["z"], name="relu"), *extra_nodes]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, list(y_shape))], initializer=[w],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _external_weight(location: str, offset: int | None = None, length: int | None = None,
                     dims=(4, 3, 3, 3)) -> onnx.TensorProto:
    t = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return t


WEIGHT_BYTES = np.ones((4, 3, 3, 3), np.float32).tobytes()  # 432 bytes


def _save(model: onnx.ModelProto | bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


# Each builder gets a fresh folder ``root`` and returns the model path; the model lives in
# root/a/b/ so that "../../etc/passwd" from it lands in root/etc/passwd (created by the test).
Builder = Callable[[Path], Path]
CASES: dict[str, tuple[Builder, str]] = {}


def case(name: str, expected: str):
    """Register a builder; ``expected`` is a regex the error line must match (besides the file)."""
    def deco(fn: Builder) -> Builder:
        CASES[name] = (fn, expected)
        return fn
    return deco


def _model_path(root: Path) -> Path:
    return root / "a" / "b" / "model.onnx"


@case("empty", r"empty file")
def _empty(root):
    return _save(b"", _model_path(root))


if hasattr(os, "mkfifo"):
    @case("fifo", r"not a regular file")
    def _fifo(root):
        # reading a named pipe blocks until a writer comes: refused before any read
        path = _model_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path


@case("random_bytes", r"not an ONNX model")
def _random(root):
    return _save(np.random.default_rng(5).bytes(4096), _model_path(root))


@case("random_bytes_small", r"not an ONNX model")
def _random_small(root):
    return _save(bytes([0x08, 0x96, 0x01, 0x12, 0x07]) + b"garbage", _model_path(root))


def _cut_points(n: int) -> dict[str, int]:
    return {"1": 1, "10pct": n // 10, "50pct": n // 2, "90pct": n * 9 // 10, "len-1": n - 1}


for _sample in SAMPLES:
    for _label, _ in _cut_points(_sample.stat().st_size).items():
        def _truncated(root, sample=_sample, label=_label):
            data = sample.read_bytes()
            return _save(data[:_cut_points(len(data))[label]], _model_path(root))
        case(f"truncated_{_sample.stem}_{_label}", r"not an ONNX model|truncated|invalid graph")(_truncated)


@case("tensor_proto", r"not an ONNX model")
def _tensor_proto(root):
    return _save(numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(2, 3, 4), "t").SerializeToString(),
                 _model_path(root))


@case("graph_proto", r"not an ONNX model")
def _graph_proto(root):
    return _save(_conv_model().graph.SerializeToString(), _model_path(root))


@case("cycle", r"cycle")
def _cycle(root):
    nodes = [helper.make_node("Add", ["x", "d"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["d"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), _model_path(root))


@case("undefined_tensor", r"undefined tensor 'nope'")
def _undefined(root):
    m = _conv_model()
    m.graph.node[1].input[0] = "nope"
    return _save(m, _model_path(root))


@case("duplicate_output", r"'y'")
def _duplicate(root):
    m = _conv_model(extra_nodes=[helper.make_node("Sigmoid", ["x"], ["y"], name="sig")])
    return _save(m, _model_path(root))


@case("conv_weight_rank_2", r"conv|rank|weight")
def _conv_rank(root):
    m = _conv_model(numpy_helper.from_array(np.ones((4, 27), np.float32), "W"))
    return _save(m, _model_path(root))


@case("negative_input_dim", r"negative")
def _neg_input(root):
    return _save(_conv_model(x_shape=(1, 3, -8, 8)), _model_path(root))


@case("negative_output_dim", r"negative")
def _neg_output(root):
    return _save(_conv_model(y_shape=(1, 4, -6, 6)), _model_path(root))


@case("negative_initializer_dim", r"negative")
def _neg_init(root):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    w.dims[0] = -4
    return _save(_conv_model(w), _model_path(root))


@case("zero_input_dim", r"'x'.*(dimension|axis).*\b0\b|empty")
def _zero_input(root):
    return _save(_conv_model(x_shape=(1, 3, 0, 8), y_shape=(1, 4, "h", 6)), _model_path(root))


@case("unknown_opset_domain", r"com\.unknown")
def _unknown_domain(root):
    m = _conv_model(extra_nodes=[helper.make_node("Mystery", ["z"], ["q"], name="mystery", domain="com.unknown")])
    return _save(m, _model_path(root))


@case("shapes_contradict_weights", r"shape")
def _contradict(root):
    # the weight makes 4 output channels; the model declares 8
    return _save(_conv_model(y_shape=(1, 8, 6, 6)), _model_path(root))


@case("input_channels_contradict_weights", r"shape|channel")
def _contradict_channels(root):
    # the weight expects 5 input channels; the input has 3
    w = numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "W")
    return _save(_conv_model(w), _model_path(root))


@case("weight_data_contradicts_dims", r"\bW\b.*(bytes|elements|size)")
def _data_vs_dims(root):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    w.raw_data = w.raw_data[:100]
    return _save(_conv_model(w), _model_path(root))


@case("external_missing_file", r"'W'.*weights\.bin.*(no such file|missing|not found)")
def _ext_missing(root):
    return _save(_conv_model(_external_weight("weights.bin", 0, 432)), _model_path(root))


@case("external_escapes_folder", r"'W'.*\.\./\.\./etc/passwd.*outside the model's folder")
def _ext_escape(root):
    _save(SECRET, root / "etc" / "passwd")
    return _save(_conv_model(_external_weight("../../etc/passwd")), _model_path(root))


@case("external_absolute_path", r"'W'.*outside the model's folder|absolute")
def _ext_absolute(root):
    secret = _save(SECRET, root / "etc" / "passwd")
    return _save(_conv_model(_external_weight(str(secret))), _model_path(root))


@case("external_symlink_escapes", r"'W'.*outside the model's folder")
def _ext_symlink(root):
    secret = _save(SECRET, root / "etc" / "passwd")
    path = _model_path(root)
    path.parent.mkdir(parents=True)
    (path.parent / "weights.bin").symlink_to(secret)
    return _save(_conv_model(_external_weight("weights.bin")), path)


@case("external_symlink_inside", r"'W'.*symbolic link")
def _ext_symlink_inside(root):
    # inside the folder, but onnx (and so rewrite) refuses to read through a link: every
    # command refuses it alike
    path = _model_path(root)
    _save(WEIGHT_BYTES, path.parent / "real" / "w.bin")
    (path.parent / "weights").symlink_to(path.parent / "real")
    return _save(_conv_model(_external_weight("weights/w.bin")), path)


@case("external_dotdot_back_inside", r"'W'.*outside the model's folder")
def _ext_dotdot(root):
    # "../b/w.bin" from a/b/ is a/b/w.bin, but climbs out on the way: refused, as onnx does
    path = _model_path(root)
    _save(WEIGHT_BYTES, path.parent / "w.bin")
    return _save(_conv_model(_external_weight("../b/w.bin")), path)


@case("external_past_end", r"'W'.*(past the end|beyond|only)")
def _ext_past_end(root):
    path = _model_path(root)
    _save(WEIGHT_BYTES[:300], path.parent / "weights.bin")
    return _save(_conv_model(_external_weight("weights.bin", 64, 432)), path)


@case("external_short_without_length", r"'W'.*(past the end|beyond|only|needs)")
def _ext_short(root):
    path = _model_path(root)
    _save(WEIGHT_BYTES[:200], path.parent / "weights.bin")
    return _save(_conv_model(_external_weight("weights.bin")), path)


@case("external_length_contradicts_dims", r"'W'.*432")
def _ext_length(root):
    path = _model_path(root)
    _save(WEIGHT_BYTES * 2, path.parent / "weights.bin")
    return _save(_conv_model(_external_weight("weights.bin", 0, 400)), path)


@case("external_bad_offset", r"'W'.*offset")
def _ext_bad_offset(root):
    path = _model_path(root)
    _save(WEIGHT_BYTES, path.parent / "weights.bin")
    return _save(_conv_model(_external_weight("weights.bin", "x12")), path)


@case("external_location_is_folder", r"'W'.*(folder|directory)")
def _ext_dir(root):
    path = _model_path(root)
    (path.parent / "weights.bin").mkdir(parents=True)
    return _save(_conv_model(_external_weight("weights.bin")), path)


@case("external_no_location", r"('W'|name: W\)).*location")  # sepify's message, or the checker's (analyze)
def _ext_no_location(root):
    w = _external_weight("weights.bin")
    del w.external_data[:]
    return _save(_conv_model(w), _model_path(root))


# --- regressions: inputs the fuzz test (tests/test_fuzz.py) found, fixed where named ----------
SAMPLE = {p.stem: p for p in SAMPLES}


def _sample_model(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLE[name]))


def _bytes_set(name: str, offset: int, value: bytes) -> bytes:
    data = SAMPLE[name].read_bytes()
    return data[:offset] + value + data[offset + len(value):]


@case("regression_huge_stride_negative_shapes", r"negative shape")
def _huge_stride(root):
    # tiny_cnn with conv1 strides [2**40, 1]: shape inference makes conv2's output 0 and
    # block3's -2 high; analyze reported negative MACs (exit 0), rewrite crashed in factorize
    # (exit 3). Fix: validation.check_inferred_shapes (no negative dimension after inference).
    m = _sample_model("tiny_cnn")
    next(a for a in m.graph.node[0].attribute if a.name == "strides").ints[0] = 2**40
    return _save(m, _model_path(root))


@case("regression_conv_group_0", r"group 0")
def _group_0(root):
    # tiny_cnn with conv1 group = 0: analyze passed, rewrite crashed in factorize (exit 3).
    # Fix: validation.check_inferred_shapes checks group, channels against the weight.
    m = _sample_model("tiny_cnn")
    next(a for a in m.graph.node[0].attribute if a.name == "group").i = 0
    return _save(m, _model_path(root))


@case("regression_conv_group_huge", r"channels")
def _group_huge(root):
    # worked_example with group = 2**63 - 1: rewrite crashed in factorize (exit 3). Same fix.
    m = _sample_model("worked_example")
    next(a for a in m.graph.node[0].attribute if a.name == "group").i = 2**63 - 1
    return _save(m, _model_path(root))


@case("regression_doc_string_not_utf8", r"doc_string is not valid UTF-8")
def _doc_not_utf8(root):
    # worked_example_separable with byte 3829 (in the graph's doc_string) set to 0xff: protobuf
    # returns such a string as bytes; rewrite crashed copying it (UnicodeDecodeError, exit 3).
    # Fix: loading._check_text.
    return _save(_bytes_set("worked_example_separable", 3829, b"\xff"), _model_path(root))


def _with_bad_text(model: onnx.ModelProto, setter) -> bytes:
    setter(model, "QQMARKQQ")
    return model.SerializeToString().replace(b"QQMARKQQ", b"QQ\xff\xfeRKQQ")


def _if_model(then_nodes: list, then_out=("Yb", [1, 3, 8, 8]), then_inits=()) -> onnx.ModelProto:
    """An If on input X (1x3x8x8): the then-branch runs ``then_nodes`` (reading X, making
    ``then_out``); the else-branch passes X on."""
    h = onnx.helper
    then = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info(then_out[0], TensorProto.FLOAT, then_out[1])],
                        list(then_inits))
    other = h.make_graph([h.make_node("Identity", ["X"], ["Yo"])], "else",
                         [], [h.make_tensor_value_info("Yo", TensorProto.FLOAT, [1, 3, 8, 8])])
    graph = h.make_graph(
        [h.make_node("If", ["cond"], ["Y"], then_branch=then, else_branch=other)], "g",
        [h.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8]),
         h.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [h.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@case("tensor_name_not_utf8_in_a_subgraph", r"not valid UTF-8")
def _subgraph_bad_name(root):
    h = onnx.helper
    model = _if_model([h.make_node("Relu", ["X"], ["QQMARKQQ"], name="branch_relu"),
                       h.make_node("Identity", ["QQMARKQQ"], ["Yb"], name="branch_id")])
    data = model.SerializeToString().replace(b"QQMARKQQ", b"QQ\xff\xfeRKQQ")
    return _save(data, _model_path(root))


for _field, _setter in {
    "producer_name": lambda m, v: setattr(m, "producer_name", v),
    "graph_name": lambda m, v: setattr(m.graph, "name", v),
    "node_name": lambda m, v: setattr(m.graph.node[0], "name", v),
    "tensor_name": lambda m, v: (m.graph.node[0].output.__setitem__(0, v), m.graph.node[1].input.__setitem__(0, v)),
    "metadata": lambda m, v: onnx.helper.set_model_props(m, {"k": v}),
    "dim_param": lambda m, v: setattr(m.graph.input[0].type.tensor_type.shape.dim[0], "dim_param", v),
}.items():
    # found probing the class of the doc_string crash: JSON/rich output of a bytes name, the
    # rewriter's copies (exit 3). Fix: loading._check_text, validation.check_inferred_shapes.
    case(f"regression_{_field}_not_utf8", r"not valid UTF-8")(
        lambda root, setter=_setter: _save(_with_bad_text(_sample_model("worked_example_separable"), setter),
                                           _model_path(root)))


@case("regression_large_weight_data_contradicts_dims", r"conv2\.weight.*too small")
def _large_weight_dims(root):
    # tiny_cnn with conv2.weight dims [32, 16, 3, 1] -> [32, 16, 3, 7]: analyze (checker) said
    # exit 2, rewrite validated a weightless stub and went on (exit 0). Fix:
    # external.weightless_copy(label=...) checks what the stubs hide.
    m = _sample_model("tiny_cnn")
    w = next(t for t in m.graph.initializer if t.name == "conv2.weight")
    w.dims[3] = 7
    return _save(m, _model_path(root))


@case("regression_weight_dims_overflow", r"overflow")
def _dims_overflow(root):
    m = _sample_model("tiny_cnn")
    w = next(t for t in m.graph.initializer if t.name == "conv2.weight")
    w.dims[0], w.dims[1] = 2**40, 2**40
    return _save(m, _model_path(root))


def test_regression_nan_weight_is_a_skip_reason(tmp_path):
    """worked_example with 121 bytes of tiny_cnn spliced into its weight (byte fuzz): NaN and
    infinite weights; rewrite crashed in factorize (exit 3). Fix: rewriter.plan_conv skips the
    conv with a reason (and a BatchNormalization whose folding is not finite is not folded)."""
    we, tiny = SAMPLE["worked_example"].read_bytes(), SAMPLE["tiny_cnn"].read_bytes()
    path = _save(we[:28664] + tiny[88259:88380] + we[28785:], tmp_path / "m.onnx")
    w = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    assert not np.all(np.isfinite(w)), "the regression input no longer has non-finite weights"
    result = run_cli(["rewrite", str(path), "-o", str(tmp_path / "out.onnx"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == [{"name": "conv", "reason": "weight or bias contains NaN or infinite values"}]


def test_string_attribute_not_utf8_is_kept(tmp_path):
    """A string attribute may hold any bytes in ONNX (analyze and check accept it). The graph
    library the rewrite used decoded them as UTF-8 (rewrite crashed, exit 3, then refused the
    model, exit 2); the edit is now made on the ModelProto and leaves the node as it is."""
    m = _sample_model("worked_example")
    y = m.graph.output[0].name
    blob = helper.make_node("Blob", [y], ["blob"], name="blob", domain="com.example", payload=b"\xff\xfe binary")
    m.graph.node.append(blob)
    m.graph.output.append(helper.make_tensor_value_info("blob", TensorProto.FLOAT, [1, 256, 8, 8]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    path = _save(m, tmp_path / "in" / "m.onnx")
    assert run_cli(["analyze", str(path)]).exit_code == 0
    out = tmp_path / "out.onnx"
    result = run_cli(["rewrite", str(path), "-o", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)["layers"]] == ["conv"]
    written = onnx.load(str(out))
    assert [n.op_type for n in written.graph.node] == ["Conv", "Conv", "Blob"]
    assert written.graph.node[2].SerializeToString() == blob.SerializeToString()


def test_regression_dead_conv_is_skipped(tmp_path):
    """tiny_cnn with relu4 reading relu2_out (field fuzz): block3 and conv4 are dead code, which
    the graph cleanup after the edit removes; rewrite failed with "mapping 'conv4': no layer
    'conv4/depthwise' in the new model" (exit 2 on a valid model). Fix: rewriter skips dead convs."""
    m = _sample_model("tiny_cnn")
    next(n for n in m.graph.node if n.name == "relu4").input[0] = "relu2_out"
    path = _save(m, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    result = run_cli(["rewrite", str(path), "-o", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {s["name"] for s in report["skipped"] if s["reason"].startswith("dead code")} == {"block3.dw", "block3.pw", "conv4"}
    assert {r["name"] for r in report["layers"]} == {"conv1", "conv2"}
    onnx.checker.check_model(onnx.load(str(out)))


def test_regression_unbound_symbol_against_declared_output(tmp_path):
    """worked_example_separable with bit 5 of byte 4117 flipped (byte fuzz): the input's last
    dimension loses its value, the output still declares 8. Unbound symbols are set to 1 for
    the numbers, which contradicted the declared output: analyze exited 2 where rewrite and the
    model were fine. Fix: loading.load forgets derived dims when the stand-in values conflict."""
    path = _save(_bytes_set("worked_example_separable", 4117, b"\x28"), tmp_path / "m.onnx")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[3].HasField("dim_value") is False
    for args in (["analyze"], ["check", "--no-config"], ["rewrite", "--dry-run"]):
        result = run_cli([args[0], str(path), *args[1:]])
        assert result.exit_code == 0, (args, result.output)


# --- running the commands ---------------------------------------------------------------------
COMMANDS = {
    "analyze": lambda path, out: ["analyze", str(path)],
    "rewrite": lambda path, out: ["rewrite", str(path), "-o", str(out)],
    "check": lambda path, out: ["check", "--no-config", "--max-macs", "1G", str(path)],
}


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args)


def assert_one_error_line(result, path: Path, expected: str | None = None) -> str:
    """Exit 2, one ``sepify: error:`` line on stderr naming the file (and matching ``expected``),
    no traceback anywhere."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("sepify: error: "), line
    assert str(path) in line, line
    if expected:
        assert re.search(expected, line, re.IGNORECASE), line
    return line


def assert_nothing_written(out_dir: Path) -> None:
    left = sorted(p.name for p in out_dir.iterdir())
    assert left == [], f"rewrite left files behind: {left}"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(name, command, tmp_path):
    build, expected = CASES[name]
    path = build(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()}
    result = run_cli(COMMANDS[command](path, out_dir / "model.sep.onnx"))
    assert_one_error_line(result, path, expected)
    assert SECRET.decode()[:20] not in result.output
    assert_nothing_written(out_dir)
    assert {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()} == before, "input files changed"


@pytest.mark.parametrize("name", ["truncated_tiny_cnn_90pct", "external_escapes_folder", "regression_huge_stride_negative_shapes",
                                  "shapes_contradict_weights"])
def test_failed_rewrite_beside_the_model_keeps_the_previous_output(name, tmp_path):
    """``-o`` into the model's own folder, over an output of an earlier run: after the error the
    folder holds exactly what it held, the earlier output byte for byte."""
    build, expected = CASES[name]
    path = build(tmp_path / "in")
    out = path.parent / "model.sep.onnx"
    out.write_bytes(b"the previous output")
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    assert_one_error_line(run_cli(COMMANDS["rewrite"](path, out)), path, expected)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_python_api_raises_model_error(tmp_path):
    for name, (build, expected) in CASES.items():
        path = build(tmp_path / name)
        with pytest.raises(ModelError, match=re.compile(expected, re.IGNORECASE)):
            sepify.analyze(path)


# --- the escaping location is never opened ----------------------------------------------------
class OpenSpy:
    """Record every path opened through Python (builtins.open, io.open, os.open)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(real))

    def _wrap(self, real):
        def spy(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.path.realpath(os.fsdecode(file)))
            return real(file, *args, **kwargs)
        return spy


@pytest.mark.parametrize("name", ["external_escapes_folder", "external_absolute_path", "external_symlink_escapes"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_escaping_location_is_never_opened(name, command, tmp_path, monkeypatch):
    build, expected = CASES[name]
    path = build(tmp_path / "in")
    secret = tmp_path / "in" / "etc" / "passwd"
    assert secret.read_bytes() == SECRET
    # give the secret exactly the weight's size and valid float data: were it read, rewrite
    # would succeed, so the refusal cannot come from a size check after the fact
    secret.write_bytes(WEIGHT_BYTES)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spy = OpenSpy(monkeypatch)
    result = run_cli(COMMANDS[command](path, out_dir / "model.sep.onnx"))
    monkeypatch.undo()
    line = assert_one_error_line(result, path, r"outside the model's folder")
    assert os.path.realpath(secret) not in spy.paths, line
    assert_nothing_written(out_dir)


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    """The checks do not refuse what is fine: a subfolder, ``.`` and ``..`` that stay inside, an
    offset, no length."""
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "w.bin").write_bytes(b"\0" * 16 + WEIGHT_BYTES)
    for i, (loc, off, length) in enumerate([("weights/w.bin", 16, 432), ("./weights/../weights/w.bin", 16, None),
                                            ("weights//w.bin", 16, 432)]):
        path = _save(_conv_model(_external_weight(loc, off, length)), folder / f"model{i}.onnx")
        assert sepify.analyze(path).totals.macs == 4 * 3 * 9 * 36
        out = tmp_path / f"out{i}.onnx"
        result = run_cli(["rewrite", str(path), "-o", str(out)])
        assert result.exit_code == 0, result.output
        result = run_cli(["check", "--no-config", "--max-macs", "1G", str(path)])
        assert result.exit_code == 0, result.output


def test_zero_dim_input_can_be_overridden(tmp_path):
    """A zero dimension in a graph input is refused (a model of empty tensors has no costs to
    report), but --input-shape gives the input a real shape."""
    path = CASES["zero_input_dim"][0](tmp_path)
    result = run_cli(["analyze", str(path), "--input-shape", "x=1x3x8x8", "--format", "json"])
    assert result.exit_code == 0, result.output


# --- real processes: the stderr a CI log shows ------------------------------------------------
@pytest.mark.parametrize("name,command", [("empty", "analyze"), ("external_escapes_folder", "rewrite"),
                                          ("truncated_tiny_cnn_50pct", "check"), ("cycle", "rewrite")])
def test_subprocess_stderr_is_one_line(name, command, tmp_path):
    build, expected = CASES[name]
    path = build(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "sepify", *COMMANDS[command](path, out_dir / "m.onnx")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sepify: error: ") and str(path) in lines[0]
    assert re.search(expected, lines[0], re.IGNORECASE), lines[0]
    assert_nothing_written(out_dir)


def test_conv_inside_an_if_branch_is_checked_against_its_weight(tmp_path):
    # the branch's Conv reads 3 channels with a weight made for 5: a ModelError like at the top level
    w = onnx.numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "W")
    model = _if_model([onnx.helper.make_node("Conv", ["X", "W"], ["Yb"], name="branch_conv")],
                      then_out=("Yb", [1, 4, 6, 6]), then_inits=[w])
    path = _save(model, tmp_path / "if.onnx")
    with pytest.raises(ModelError, match=r"branch_conv.*3 channels.*expects 5"):
        sepify.analyze(path)
