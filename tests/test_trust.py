"""Outputs a user can trust (issue 10, items 3-5): ``check`` never passes on a guess, tables fit
a terminal, and the smaller things (by-op CSV, hidden rows, shapes, units, one number format).

Everything runs through the command line on small models written to a temporary folder; the
expected numbers are hand counts (a KxK Conv over HxW with pads: H*W*Cout*Cin*K*K MACs).
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import sepify
from sepify.cli import main


def run(*args, columns: int | None = None):
    env = {"COLUMNS": str(columns)} if columns else {}
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def conv_model(path, dims, names=("conv",), cin=3, cout=4, k=3, pads=1):
    """Convs in a chain (``cin`` -> ``cout`` -> ``cout`` ...), each KxK with ``pads``, input
    ``x`` of shape ``dims`` (ints or symbol names), all weights initializers."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", cin
    for i, name in enumerate(names):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(rng.standard_normal((cout, c, k, k)).astype(np.float32), w))
        out = "y" if i == len(names) - 1 else f"t{i}"
        nodes.append(helper.make_node("Conv", [x, w], [out], name=name, pads=[pads] * 4))
        x, c = out, cout
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- item 3: check never passes on a guess -----------------------------------------------------
PER_IMAGE_8x8 = 8 * 8 * 4 * 3 * 9  # 6,912 MACs for 3 -> 4 channels, 3x3, 8x8, pads 1


def test_check_fails_on_unbound_spatial_dims(here):
    conv_model(here / "hw.onnx", ["N", 3, "H", "W"])
    r = run("check", "hw.onnx", "--no-config", "--max-macs", "1G", "--max-activation-peak", "8MiB")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        "sepify: error: hw.onnx: the MACs, activation peak budgets depend on the unbound dimensions H, W, which a "
        "check does not guess; bind them with --dim H=VALUE --dim W=VALUE or --input-shape INPUT=1x3x224x224 "
        "(or dims / input-shape in the config)"]
    assert r.stdout.splitlines()[0] == "hw.onnx — ERROR (the error is on stderr)"  # the message once
    data = json.loads(run("check", "hw.onnx", "--no-config", "--max-macs", "1G", "--format", "json").stdout)
    assert data["models"][0]["status"] == "error" and "the MACs budget depends on" in data["models"][0]["error"]


def test_check_binds_or_needs_no_binding(here):
    conv_model(here / "hw.onnx", ["N", 3, "H", "W"])
    # params do not depend on H and W: measured, no guess
    r = run("check", "hw.onnx", "--no-config", "--max-params", "1K", "--format", "json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["models"][0]
    b = m["budgets"][0]
    assert (b["quantity"], b["value"], b["passed"]) == ("params", 4 * 3 * 9, True)
    assert "unbound dimensions H, N, W: no budget of this model depends on them" in m["notes"]
    # bound on the command line: measured at 8x8, per sample
    for args in (["--dim", "H=8", "--dim", "W=8"], ["--input-shape", "x=1x3x8x8"]):
        r = run("check", "hw.onnx", "--no-config", "--max-macs", "1G", *args, "--format", "json")
        assert r.exit_code == 0, r.output
        m = json.loads(r.stdout)["models"][0]
        assert m["totals"]["macs"] == PER_IMAGE_8x8
        per_sample = [n for n in m["notes"] if n.startswith("per sample")]
        assert per_sample == ([] if "--input-shape" in args else [
            "per sample: the dynamic batch dimension N is set to 1 (to budget a batch of SIZE, bind it: "
            "--dim N=SIZE, or dims in the config)"])


def test_dynamic_batch_alone_is_measured_per_sample(here):
    conv_model(here / "n.onnx", ["batch", 3, 8, 8])
    r = run("check", "n.onnx", "--no-config", "--max-macs", "6912", "--max-activation-peak", "1MiB")
    assert r.exit_code == 0, r.output
    assert "note: per sample: the dynamic batch dimension batch is set to 1" in r.stdout
    r = run("check", "n.onnx", "--no-config", "--max-macs", "6911", "--format", "json")
    assert r.exit_code == 1 and json.loads(r.stdout)["models"][0]["budgets"][0]["value"] == PER_IMAGE_8x8
    r = run("check", "n.onnx", "--no-config", "--max-macs", "1G", "--dim", "batch=4", "--format", "json")
    assert json.loads(r.stdout)["models"][0]["totals"]["macs"] == 4 * PER_IMAGE_8x8
    # the Python API (sepify.check is the package and the function) behaves the same
    import sepify.check

    rep = sepify.check(["n.onnx"], limits={"macs": "1G"}, dims={"batch": 4}, discover=False)
    assert rep.exit_code == 0 and rep.models[0].totals["macs"] == 4 * PER_IMAGE_8x8


def test_model_invalid_at_the_stand_in_value_names_the_dims(here):
    # tiny_cnn with H, W unbound: at 1 x 1 its pooled maps are smaller than the next kernel
    import make_samples

    model = make_samples.tiny_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(model, "hw_tiny.onnx")
    r = run("check", "hw_tiny.onnx", "--no-config", "--max-macs", "1G")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1
    # (its costs are exact formulas of H and W: the budget depends on them, and a check does not guess)
    assert r.stderr.startswith("sepify: error: hw_tiny.onnx: the MACs budget depends on the unbound dimensions H, W")
    assert r.stderr.rstrip().endswith("bind them with --dim H=VALUE --dim W=VALUE or --input-shape INPUT=1x3x224x224 "
                                      "(or dims / input-shape in the config)")
    # analyze gives the numbers at the smallest power of two where the model has no negative size
    a = json.loads(run("analyze", "hw_tiny.onnx", "--format", "json").stdout)
    size = a["symbols"]["H"]["value"]
    assert a["symbols"]["W"]["value"] == size and size > 1 and a["totals"]["macs_formula"]
    assert a["totals"]["macs"] == json.loads(run("analyze", "hw_tiny.onnx", "--dim", f"H={size}", "--dim", f"W={size}",
                                                 "--format", "json").stdout)["totals"]["macs"]
    # by hand (samples/make_samples.py): conv2 3x3/2 p0 gives (H-3)//2 + 1, block3.dw 3x3 p0 two
    # less, the 2x2/2 pool halves it: ((H-3)//2 - 1)//2 >= 1 needs H >= 9: 16 among the powers of two
    assert size == 16
    r = run("check", "hw_tiny.onnx", "--no-config", "--max-macs", "1G", "--dim", "H=32", "--dim", "W=32", "--format", "json")
    assert json.loads(r.stdout)["models"][0]["totals"]["macs"] == 2_254_176  # tiny_cnn's hand count (samples/README.md)


def test_config_dims_note_warning_and_words(here):
    (here / "models").mkdir()
    conv_model(here / "models" / "hw.onnx", ["N", 3, "H", "W"])
    conv_model(here / "models" / "fixed.onnx", [1, 3, 8, 8])
    (here / "budgets.toml").write_text(
        '[project]\nname = "not ours"\n[tool.other]\nx = 1\n'  # other tables of the file are ignored
        '[tool.sepify]\nmax-macs = "1G"\n[[tool.sepify.models]]\npath = "models/*.onnx"\n'
        'dims = {H = 8, W = 8, typo = 3}\n')
    r = run("check", "--config", "budgets.toml", "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    where = f"{here / 'budgets.toml'} [tool.sepify] models #1 (models/*.onnx)"
    assert data["warnings"] == [f"dims.typo in {where}: no checked model has a dimension named 'typo' (ignored)"]
    assert r.stderr.splitlines() == [f"sepify: warning: {data['warnings'][0]}"]
    from sepify.render.check import github_annotations

    assert github_annotations(data, env={}) == [
        "::warning title=sepify check%3A warning::" + data["warnings"][0].replace("%", "%25")]
    notes = {m["path"]: [n for n in m["notes"] if n.startswith("dims.")] for m in data["models"]}
    assert notes == {
        os.path.join("models", "fixed.onnx"): [f"dims.{d} in {where}: this model has no dimension named {d!r} (ignored)"
                                               for d in ("H", "W", "typo")],
        os.path.join("models", "hw.onnx"): [f"dims.typo in {where}: this model has no dimension named 'typo' (ignored)"]}
    assert {m["path"]: m["totals"]["macs"] for m in data["models"]} == {
        os.path.join("models", "fixed.onnx"): PER_IMAGE_8x8, os.path.join("models", "hw.onnx"): PER_IMAGE_8x8}
    # the config's own words: an unbound dim of a model the config budgets, a bad input-shape
    (here / "budgets.toml").write_text('[tool.sepify]\nmax-macs = "1G"\n[[tool.sepify.models]]\npath = "models/hw.onnx"\n')
    r = run("check", "--config", "budgets.toml")
    assert r.exit_code == 2
    assert r.stderr.strip().endswith(
        f"bind them with dims = {{H = VALUE, W = VALUE}} (or input-shape) in {here / 'budgets.toml'} [tool.sepify] "
        "models #1 (models/hw.onnx), or --dim H=VALUE --dim W=VALUE")
    (here / "budgets.toml").write_text('[[models]]\npath = "models/hw.onnx"\ninput-shape = {x = "1x3xax8"}\n')
    r = run("check", "--config", "budgets.toml")
    assert (r.exit_code, r.stderr) == (2, f"sepify: error: invalid input-shape.x in {here / 'budgets.toml'} models #1 (models/hw.onnx) "
                                          "'1x3xax8': 'a' is not a positive integer (a symbolic dimension is bound by "
                                          "name: --dim NAME=VALUE, or dims in the config)\n")


def test_analyze_dims_the_model_lacks(here):
    conv_model(here / "n.onnx", ["batch", 3, 8, 8])
    a = sepify.analyze(str(here / "n.onnx"), dims={"batch": 2, "typo": 3})
    assert a.unused_dims == ["typo"] and a.totals.macs == 2 * PER_IMAGE_8x8
    assert "dims not in the model, ignored: typo (its symbolic dimensions: batch)" in a.notes
    r = run("analyze", "n.onnx", "--dim", "typo=3")
    assert r.exit_code == 0
    assert r.stderr == "sepify: warning: --dim typo: n.onnx has no dimension named 'typo' (ignored)\n"


# --- item 4: tables that fit ------------------------------------------------------------------
LONG = [f"encoder.layers.{i}.attention.output.dense_projection" for i in range(3)]  # differ in the middle


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith(("totals:", "note:"))]


def test_analyze_table_at_80_and_120_columns(here):
    conv_model(here / "long.onnx", [1, 3, 16, 16], names=LONG)
    macs = [16 * 16 * 4 * 3 * 9, 16 * 16 * 4 * 4 * 9, 16 * 16 * 4 * 4 * 9]  # 27,648 / 36,864 / 36,864
    wide = run("analyze", "long.onnx", columns=120).stdout
    assert all(len(line) <= 120 for line in _table_lines(wide))
    assert all(name in wide for name in LONG) and "…" not in wide
    assert "note" not in wide.splitlines()[2]  # no empty note column
    narrow = run("analyze", "long.onnx", columns=80).stdout
    lines = _table_lines(narrow)
    assert all(len(line) <= 80 for line in lines), max(map(len, lines))
    rows = [line for line in lines if " Conv " in line]
    assert len(rows) == 3
    shown = [next(w for w in row.split() if "…" in w) for row in rows]
    assert len(set(shown)) == 3  # shortened, and still told apart
    for i, (name, short) in enumerate(zip(LONG, shown)):
        head, tail = short.split("…")
        assert name.startswith(head) and name.endswith(tail)
        assert f"layers.{i}" in head  # the part that tells the layers apart is kept (not an ambiguous prefix)
    for row, m in zip(rows, macs):
        assert f" {m / 1000:.1f}K " in row  # numbers whole: 27.6K, 36.9K
    assert "note" not in lines[2]


def _rewrite(here, columns, *extra):
    conv_model(here / "m.onnx", [1, 3, 16, 16], names=LONG[:2], cout=8)
    return run("rewrite", "m.onnx", "-o", "m.sep.onnx", *extra, columns=columns)


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_rewrite_table_fits_and_names_the_output(here, columns):
    r = _rewrite(here, columns)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    table = lines[:lines.index(next(x for x in lines if x.startswith("layers:")))]
    assert all(len(line) <= columns for line in table), max(map(len, table))
    assert "sepify rewrite: m.onnx → m.sep.onnx (rank 1, dw-first)" in lines[0]
    rows = [x for x in table if " Conv " in x and " → " in x]
    assert len(rows) == 2
    for i, (row, name) in enumerate(zip(rows, LONG)):
        label = row.split("  Conv")[0].strip().lstrip("~").strip()
        first, _, tail = label.partition(" → ")
        assert tail in ("…/{depthwise,pointwise}", f"{name}/{{depthwise,pointwise}}", "…")
        assert (tail == "…") == (columns == 80)  # the narrowest form only where nothing else fits
        assert name.startswith(first.split("…")[0]) and name.endswith(first.split("…")[-1])
        assert f"layers.{i}" in first  # still tells the two layers apart
    # numbers are never cut: the first layer's MACs before (16*16*8*3*9) and after (rank 1: depthwise
    # 16*16*3*9 + pointwise 16*16*3*8), as the number format prints them
    before, after = 16 * 16 * 8 * 3 * 9, 16 * 16 * 3 * 9 + 16 * 16 * 3 * 8
    assert f" {before / 1000:.1f}K " in rows[0] and f" {after / 1000:.1f}K " in rows[0]
    size = os.stat(here / "m.sep.onnx").st_size
    file_row = next(x for x in lines if x.strip().startswith("file size"))
    assert f" {size / 1024:.1f}KiB " in file_row and "?" not in file_row


def test_rewrite_report_names_the_written_file(here):
    r = _rewrite(here, 120, "--format", "json")
    rep = json.loads(r.stdout)
    size = os.stat(here / "m.sep.onnx").st_size
    assert rep["output"] == "m.sep.onnx" and rep["diff"]["new"]["path"] == "m.sep.onnx"
    assert rep["diff"]["totals"]["file_size"]["new"] == rep["after"]["model"]["file_size"] == size
    old = rep["diff"]["totals"]["file_size"]["old"]
    assert old == os.stat(here / "m.onnx").st_size and rep["diff"]["totals"]["file_size"]["delta"] == size - old


# --- item 5: smaller things ---------------------------------------------------------------------
def test_by_op_csv_and_hidden_rows(here):
    conv_model(here / "long.onnx", [1, 3, 16, 16], names=LONG)
    r = run("analyze", "long.onnx", "--by-op", "--format", "csv")
    assert list(csv.reader(io.StringIO(r.stdout))) == [
        ["op_type", "count", "macs", "flops", "params", "unknown"],
        ["Conv", "3", str(27_648 + 2 * 36_864), str(2 * (27_648 + 2 * 36_864)), str(4 * 3 * 9 + 2 * 4 * 4 * 9), "0"]]
    r = run("analyze", "long.onnx", "--top", "1", columns=120)
    assert "2 more layers not shown (--top 1: the heaviest by MACs; the total row counts them all)" in r.stdout
    r = run("analyze", "long.onnx", "--top", "3", columns=120)
    assert "not shown" not in r.stdout


@pytest.mark.parametrize("shape,bad", [("1x3xax224", "a"), ("1x3x0x224", "0"), ("1x3x-1x224", "-1")])
def test_input_shape_takes_positive_integers_only(here, shape, bad):
    conv_model(here / "m.onnx", [1, 3, 16, 16])
    r = run("analyze", "m.onnx", "--input-shape", f"x={shape}")
    assert (r.exit_code, r.stderr) == (2, f"sepify: error: invalid --input-shape 'x={shape}': {bad!r} is not a positive "
                                          "integer (a symbolic dimension is bound by name: --dim NAME=VALUE, or dims "
                                          "in the config)\n")


def test_byte_budgets_in_the_unit_written(here):
    conv_model(here / "m.onnx", [1, 16, 16, 16], cin=16, cout=32)  # 4,608 float weights: 18 kB
    size = os.stat("m.onnx").st_size
    r = run("check", "m.onnx", "--no-config", "--max-file-size", "20MB", "--format", "json")
    b = json.loads(r.stdout)["models"][0]["budgets"][0]
    assert b["message"] == f"file size {size / 1000:.1f}kB within max-file-size 20.0MB"
    r = run("check", "m.onnx", "--no-config", "--max-file-size", "1kB", columns=120)
    assert r.exit_code == 1 and f"file size {size / 1000:.1f}kB exceeds max-file-size 1.0kB" in r.stdout
    r = run("check", "m.onnx", "--no-config", "--max-file-size", "1KiB", columns=120)
    assert f"file size {size / 1024:.1f}KiB exceeds max-file-size 1.0KiB" in r.stdout


def test_one_number_format_in_analyze_and_diff(here):
    # 221 x 222 x 64 x 64 x 9 = 1,808,621,568 MACs: "1.8G" (it was 1.81G in diff)
    conv_model(here / "big.onnx", [1, 64, 221, 222], cin=64, cout=64)
    macs = 221 * 222 * 64 * 64 * 9
    assert json.loads(run("analyze", "big.onnx", "--format", "json").stdout)["totals"]["macs"] == macs
    assert f"MACs 1.8G ({macs:,})" in run("analyze", "big.onnx").stdout
    md = run("diff", "big.onnx", "big.onnx", "--format", "markdown").stdout
    assert "| MACs | 1.8G | 1.8G | 0 |" in md
    table = run("diff", "big.onnx", "big.onnx", columns=120).stdout
    macs_row = next(line for line in table.splitlines() if line.strip().startswith("MACs"))
    assert macs_row.split()[:3] == ["MACs", "1.8G", "1.8G"]
