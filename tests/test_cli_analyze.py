"""``sepify analyze`` through click's CliRunner and once as ``python -m sepify``: formats, options,
and one-line errors with exit code 2 for files that are not models."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from sepify.cli import main

TINY_MACS = 2_254_176  # samples/README.md: hand count of the tiny CNN
TINY_LAYERS = 15


@pytest.fixture
def tiny(samples_dir):
    return str(samples_dir / "tiny_cnn.onnx")


def run(*args):
    result = CliRunner().invoke(main, ["analyze", *map(str, args)])
    return result


def test_table_has_totals(tiny):
    r = run(tiny)
    assert r.exit_code == 0, r.output
    assert f"{TINY_MACS:,}" in r.stdout
    assert "2.3M" in r.stdout  # human units
    assert "total" in r.stdout
    for name in ("conv1", "block3.dw", "fc", "softmax"):
        assert name in r.stdout


def test_json_to_file(tiny, tmp_path):
    out = tmp_path / "a.json"
    r = run(tiny, "--format", "json", "-o", out)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    d = json.loads(out.read_text())
    assert d["totals"]["macs"] == TINY_MACS
    assert len(d["layers"]) == TINY_LAYERS
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_json_to_stdout(tiny):
    r = run(tiny, "--format", "json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["totals"]["macs"] == TINY_MACS


def test_csv_one_row_per_layer(tiny):
    r = run(tiny, "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == TINY_LAYERS
    assert [row["name"] for row in rows][:3] == ["conv1", "bn1", "relu1"]  # graph order
    assert sum(int(row["macs"]) for row in rows) == TINY_MACS
    conv1 = rows[0]
    assert (conv1["op_type"], int(conv1["macs"])) == ("Conv", 32 * 32 * 16 * 27)


def test_markdown_has_a_table(tiny):
    r = run(tiny, "--format", "markdown")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("| MACs |") for line in lines)
    assert any(line.startswith("|---") for line in lines)
    assert sum(1 for line in lines if line.startswith("| ") and "| Conv |" in line) == 5
    assert "2.3M" in r.stdout


def test_by_op(tiny):
    r = run(tiny, "--by-op", "--format", "markdown")
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if line.startswith("| Conv |")]
    assert len(rows) == 1 and "| 5 |" in rows[0]  # 5 Conv layers grouped in one row
    t = run(tiny, "--by-op")
    assert t.exit_code == 0
    assert "by op type" in " ".join(t.stdout.split()) and "Gemm" in t.stdout  # the title may wrap (a long path)


def test_top_3_heaviest_first(tiny):
    r = run(tiny, "--top", "3", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    # samples/README.md: conv2 1,036,800 > conv4 552,960 > conv1 442,368 > block3.pw 173,056
    assert [row["name"] for row in rows] == ["conv2", "conv4", "conv1"]
    assert [int(row["macs"]) for row in rows] == [1_036_800, 552_960, 442_368]
    t = run(tiny, "--top", "3")
    assert t.exit_code == 0
    assert t.stdout.index("conv2") < t.stdout.index("conv4") < t.stdout.index("conv1")
    assert "block3.pw" not in t.stdout


def test_input_shape_doubles_macs(tiny):
    one = json.loads(run(tiny, "--format", "json").stdout)
    r = run(tiny, "--format", "json", "--input-shape", "input=2x3x32x32")
    assert r.exit_code == 0, r.output
    two = json.loads(r.stdout)
    assert two["totals"]["macs"] == 2 * one["totals"]["macs"] == 2 * TINY_MACS
    assert two["totals"]["params"] == one["totals"]["params"]


def test_dim_binds_symbol(make_samples, tmp_path):
    path = tmp_path / "sym.onnx"
    onnx.save(make_samples.worked_example(), str(path))
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(m, str(path))
    free = json.loads(run(path, "--format", "json").stdout)
    assert free["totals"]["macs"] == 1_228_800
    assert free["totals"]["macs_formula"] == "1.23M·batch"
    assert any("batch" in n for n in free["notes"])
    r = run(path, "--format", "json", "--dim", "batch=8")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["totals"]["macs"] == 8 * 1_228_800


@pytest.fixture
def bad_files(tmp_path, samples_dir):
    data = (samples_dir / "tiny_cnn.onnx").read_bytes()
    files = {
        "missing": tmp_path / "does_not_exist.onnx",
        "empty": tmp_path / "empty.onnx",
        "random": tmp_path / "random.onnx",
        "truncated": tmp_path / "truncated.onnx",
        "directory": tmp_path / "a_directory.onnx",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(bytes((i * 97 + 13) % 256 for i in range(2048)))
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "directory"])
def test_bad_input_exits_2_with_one_line(bad_files, kind):
    path = bad_files[kind]
    r = run(path)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert path.name in lines[0]
    assert "Traceback" not in r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)


def _python_m(*args, cwd=None):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "sepify", "analyze", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_python_m_sepify(tiny, bad_files):
    ok = _python_m(tiny, "--format", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["macs"] == TINY_MACS
    bad = _python_m(bad_files["truncated"])
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "truncated.onnx" in bad.stderr and "Traceback" not in bad.stderr


def test_large_model_table_lists_every_layer_and_json_parses(make_samples, tmp_path):
    # 1,100 (1x1 Conv 8->8 + Relu) pairs on 8x8: 2,200 rows, more than rich renders
    # (report.RICH_MAX_ROWS), so the plain aligned table is used; every row must still be there.
    path = tmp_path / "chain.onnx"
    onnx.save(make_samples.conv_chain(1100), str(path))
    r = run(path)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert sum(1 for line in lines if " Conv " in line) == 1100
    assert sum(1 for line in lines if " Relu " in line) == 1100
    per_pair = 8 * 8 * 8 * 8  # output elements x C_in x 1x1 kernel
    assert f"{1100 * per_pair:,}" in r.stdout
    out = tmp_path / "a.json"
    assert run(path, "--format", "json", "-o", out).exit_code == 0
    data = json.loads(out.read_text())
    assert len(data["layers"]) == 2200 and data["totals"]["macs"] == 1100 * per_pair
    assert data["layers"][0]["name"] == "conv1" and data["layers"][0]["macs"] == per_pair
    # one layer object per line (the report's line breaks are only whitespace between tokens)
    layer_lines = [line for line in out.read_text().splitlines() if line.startswith('    {"index": ')]
    assert len(layer_lines) == 2200
    assert json.loads(layer_lines[5].rstrip(",")) == data["layers"][5]


def test_json_rows_one_per_line_even_when_a_name_mimics_the_separator():
    from sepify.render.common import dumps_json

    rows = [{"index": i, "name": 'x}, {"index": 3' if i == 1 else f"n{i}", "output_shapes": [[1, i]]}
            for i in range(30)]
    text = dumps_json({"layers": rows})
    assert json.loads(text) == {"layers": rows}
    lines = text.splitlines()
    assert len(lines) == 2 + 30 + 2  # "{" and '"layers": [', one line per row, "]" and "}"
    assert json.loads(lines[3].rstrip(",")) == rows[1]


def test_brackets_in_names_are_printed_as_they_are(tmp_path):
    # rich reads "[v2]" as a style tag and drops it unless markup is off: a node name, an
    # unknown op's reason (tensor names) and a note must appear verbatim in the table
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Relu", ["x[v2]"], ["y[v2]"], name="relu[v2]"),
         h.make_node("Mystery", ["y[v2]"], ["z"], name="custom[bold]", domain="my.ops")],
        "g", [h.make_tensor_value_info("x[v2]", onnx.TensorProto.FLOAT, [1, 4])],
        [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("my.ops", 1)])
    path = tmp_path / "brackets.onnx"
    onnx.save(model, str(path))
    r = run(path)
    assert r.exit_code == 0, r.output
    assert "relu[v2]" in r.stdout and "custom[bold]" in r.stdout
    assert "my.ops.Mystery" in r.stdout  # its row says why its cost is unknown
