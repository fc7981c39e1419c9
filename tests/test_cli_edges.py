"""Odd-but-possible command lines and files, each a bug a QA pass found (exit 3 or a wrong
answer before its fix): one clear line on stderr and exit 2, or the documented behaviour."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sepify.cli import main


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def one_error_line(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sepify: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- numbers on the command line and in configs ------------------------------------------------
@pytest.mark.parametrize("value", ["²", "١٢", "99999999999999999999", "9223372036854775808"])
def test_dim_value_not_an_int64_dimension(tiny_model, value):
    """str.isdigit() accepts '²' (int() does not) and a dim above int64 overflowed in onnx."""
    one_error_line(run("analyze", tiny_model, "--dim", f"batch={value}"), "--dim")
    one_error_line(run("analyze", tiny_model, "--input-shape", f"input=1x3x{value}x32"), "--input-shape")


def test_largest_int64_dim_is_accepted(tiny_model):
    r = run("analyze", tiny_model, "--dim", f"nosuch={2**63 - 1}", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["totals"]["macs"] == 2_254_176


@pytest.mark.parametrize("args", [["--max-macs", "1e400"], ["--max-growth", "nan", "--baseline", "{model}"],
                                  ["--max-growth", "inf%", "--baseline", "{model}"]])
def test_check_non_finite_numbers(tiny_model, args):
    r = run("check", "--no-config", tiny_model, *[a.replace("{model}", str(tiny_model)) for a in args])
    one_error_line(r, "invalid max-")


@pytest.mark.parametrize("text", ["max-macs = inf", "max-macs = nan", "max-macs = 1e400", "max-growth = nan",
                                  "dims = {batch = 99999999999999999999}",
                                  "input-shape = {input = [1, 3, 99999999999999999999, 32]}",
                                  'input-shape = {input = "1x3x²x32"}'])
def test_config_non_finite_or_huge_values(tiny_model, tmp_path, text):
    cfg = tmp_path / "sepify.toml"
    cfg.write_text(text + "\n")
    one_error_line(run("check", "--config", cfg, tiny_model), str(cfg))


@pytest.mark.parametrize("args", [["--target-ratio", "nan"], ["--target-macs", "1e400"], ["--tolerance", "nan"],
                                  ["--tolerance", "-1"], ["--tolerance", "inf"],
                                  ["--holdout", "1e400", "--calibration", "c.npz"]])
def test_rewrite_non_finite_numbers(tiny_model, args):
    one_error_line(run("rewrite", tiny_model, "--dry-run", *args), args[0].lstrip("-").split("-")[-1])


# --- stdout closed early (``sepify analyze m.onnx | head``) ---------------------------------------
def _relu_chain(path, n: int):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu_{i}") for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_closed_pipe_is_quiet(tmp_path):
    """The reader of stdout goes away after one line: no 'internal error' (it was exit 3), no
    traceback, no "Exception ignored" at exit; exit 141 (128 + SIGPIPE) as a shell reports it."""
    import os
    import subprocess
    import sys

    import sepify

    model = _relu_chain(tmp_path / "chain.onnx", 1500)  # a rich table, written row by row
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(os.path.dirname(os.path.dirname(sepify.__file__))),
                                                         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "sepify", "analyze", str(model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


class _ClosedPipe:
    """A stdout whose reader has gone: every write fails as a closed pipe's does."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def isatty(self):
        return False


@pytest.mark.parametrize("args", [["analyze", "{m}", "--format", "csv"], ["analyze", "{m}", "--format", "json"],
                                  ["diff", "{m}", "{m}", "--all"], ["check", "--no-config", "{m}"]])
def test_closed_pipe_every_command(tiny_model, monkeypatch, capsys, args):
    import sys

    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    with pytest.raises(SystemExit) as e:
        main.main([a.replace("{m}", str(tiny_model)) for a in args], prog_name="sepify")
    assert e.value.code == 141
    assert capsys.readouterr().err == ""


def test_config_not_utf8(tiny_model, tmp_path):
    """TOML is UTF-8: a config in another encoding was an internal error (UnicodeDecodeError)."""
    cfg = tmp_path / "sepify.toml"
    cfg.write_bytes('max-macs = "1G" # größe\n'.encode("latin-1"))
    one_error_line(run("check", "--config", cfg, tiny_model), str(cfg), "not UTF-8")


# --- outputs whose folder is missing: refused before the work, nothing written -------------------
@pytest.mark.parametrize("args", [["rewrite", "{m}", "-o", "{t}/out.onnx", "--report", "{t}/nodir/r.json"],
                                  ["check", "--no-config", "{m}", "--junit", "{t}/nodir/j.xml"],
                                  ["check", "--no-config", "{m}", "-o", "{t}/nodir/c.json"],
                                  ["diff", "{m}", "{m}", "-o", "{t}/nodir/d.md"]])
def test_missing_output_folder_before_work(tiny_model, tmp_path, args):
    """rewrite wrote the model and then failed on --report's folder; check printed its whole
    report and then failed on --junit's."""
    out = tmp_path / "outs"
    out.mkdir()
    r = run(*[a.replace("{m}", str(tiny_model)).replace("{t}", str(out)) for a in args])
    one_error_line(r, "nodir", "does not exist")
    assert r.stdout == ""
    assert list(out.iterdir()) == []


# --- analyze JSON files that are not what sepify wrote -------------------------------------------
def _report(tiny_model, tmp_path, edit) -> str:
    r = run("analyze", tiny_model, "--format", "json")
    data = json.loads(r.stdout)
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


EDITS = {
    "macs is text": (lambda d: d["totals"].update(macs="2.3M"), "totals.macs"),
    "no macs": (lambda d: d["totals"].pop("macs"), "totals.macs"),
    "layer without name": (lambda d: d["layers"][3].pop("name"), "layers[3].name"),
    "layer params text": (lambda d: d["layers"][0].update(params="448"), "layers[0].params"),
    "layer not an object": (lambda d: d["layers"].__setitem__(2, 7), "layers[2]"),
    "file size text": (lambda d: d["model"].update(file_size="88K"), "model.file_size"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_malformed_analyze_json(tiny_model, tmp_path, case):
    """diff of such a file was an internal error (KeyError, TypeError); check --baseline too."""
    edit, where = EDITS[case]
    bad = _report(tiny_model, tmp_path, edit)
    one_error_line(run("diff", bad, tiny_model), "malformed", where)
    one_error_line(run("check", "--no-config", tiny_model, "--baseline", bad, "--max-growth", "1%"), "malformed", where)


# --- diff and --dim: warned as analyze warns ------------------------------------------------------
def _batch_model(path):
    """A 1x1 Conv (4 -> 2 channels, no bias) on an input [batch, 4, 3, 3]: 2*4*9 = 72 MACs a sample."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_diff_warns_unknown_dim(tiny_model, tmp_path):
    """An unknown --dim was silently ignored by diff; analyze and check warn about it."""
    batched = _batch_model(tmp_path / "b.onnx")
    r = run("diff", batched, tiny_model, "--dim", "batch=5", "--dim", "typo=3", "--format", "json")
    assert r.exit_code == 0, r.output
    warns = [line for line in r.stderr.splitlines()]
    assert warns == [f"sepify: warning: --dim typo: {batched} has no dimension named 'typo' (ignored)",
                     f"sepify: warning: --dim batch: {tiny_model} has no dimension named 'batch' (ignored)",
                     f"sepify: warning: --dim typo: {tiny_model} has no dimension named 'typo' (ignored)"]
    data = json.loads(r.stdout)
    assert data["totals"]["macs"]["old"] == 5 * 72  # the binding applied where the model has it
    assert [w for w in data["warnings"]] == [w.removeprefix("sepify: warning: ") for w in warns]
    md = run("diff", batched, tiny_model, "--dim", "typo=3", "--format", "markdown")
    assert f"> warning: --dim typo: {batched} has no dimension named 'typo' (ignored)" in md.stdout


def _conv_model(path, inputs, extra_rank=1) -> str:
    """A 3->4 3x3 Conv (pad 1) on the first input, H x W free; further inputs are extras of
    rank ``extra_rank`` that no node reads (inputs the model only declares)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    first = inputs[0]
    node = helper.make_node("Conv", [first, "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    ins = [helper.make_tensor_value_info(first, TensorProto.FLOAT, [1, 3, "h", "w_"])]
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2] * extra_rank) for n in inputs[1:]]
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w_"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_diff_input_shape_across_input_names(tmp_path):
    """The two models name their image input differently (a re-export): --input-shape NAME
    binds the input of the same position in the model without NAME (a warning says so);
    --old-input-shape / --new-input-shape bind one side each."""
    old = _conv_model(tmp_path / "old.onnx", ["images"])
    new = _conv_model(tmp_path / "new.onnx", ["input"])
    r = run("diff", old, new, "--input-shape", "images=1x3x8x8", "--format", "json")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"sepify: warning: --input-shape images: {new} has no input 'images': bound to "
                                     "its input 'input', at the same position (--new-input-shape input=SHAPE to choose)"]
    macs = json.loads(r.stdout)["totals"]["macs"]
    assert macs["old"] == macs["new"] == 8 * 8 * 4 * 3 * 3 * 3 == 6912  # out positions x C_out x C_in x k x k
    r = run("diff", old, new, "--old-input-shape", "images=1x3x8x8", "--new-input-shape", "input=1x3x16x16",
            "--format", "json")
    assert r.exit_code == 0 and r.stderr == "", r.output
    macs = json.loads(r.stdout)["totals"]["macs"]
    assert (macs["old"], macs["new"]) == (6912, 16 * 16 * 4 * 27)
    # a shared binding and the other side's own: no guess, no warning
    r = run("diff", old, new, "--input-shape", "images=1x3x8x8", "--new-input-shape", "input=1x3x4x4", "--format", "json")
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert json.loads(r.stdout)["totals"]["macs"]["new"] == 4 * 4 * 4 * 27
    # a name in both models binds both, as before
    r = run("diff", old, old, "--input-shape", "images=1x3x8x8", "--format", "json")
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["totals"]["macs"]["new"] == 6912


def test_diff_input_shape_errors(tmp_path):
    old = _conv_model(tmp_path / "old.onnx", ["images"])
    new = _conv_model(tmp_path / "new.onnx", ["input"])
    two = _conv_model(tmp_path / "two.onnx", ["input", "extra"])
    one_error_line(run("diff", old, new, "--input-shape", "typo=1x3x8x8"),
                   "--input-shape typo: no model has an input 'typo' (the old model: images; the new model: input)")
    # no position to match: a different number of inputs
    one_error_line(run("diff", old, two, "--input-shape", "images=1x3x8x8"),
                   f"--input-shape images: {two} has no input 'images' (its inputs: input, extra); "
                   "bind its input with --new-input-shape NAME=SHAPE")
    # the input at that position has another rank
    big = _conv_model(tmp_path / "big.onnx", ["input", "big"], extra_rank=4)
    one_error_line(run("diff", two, big, "--input-shape", "extra=5"),
                   f"--input-shape extra: {big} has no input 'extra' (its inputs: input, big)")
    one_error_line(run("diff", old, new, "--new-input-shape", "images=1x3x8x8"),
                   "--new-input-shape images: 'images' is not a graph input (inputs: input)")
    one_error_line(run("diff", old, new, "--old-input-shape", "images"), "invalid --old-input-shape 'images'")


def test_diff_bindings_do_not_apply_to_saved_json(tiny_model, tmp_path):
    saved = tmp_path / "tiny.json"
    saved.write_text(run("analyze", tiny_model, "--format", "json").stdout)
    r = run("diff", saved, tiny_model, "--input-shape", "input=1x3x64x64")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"sepify: warning: --input-shape does not apply to {saved}: it is a saved analyze "
                                     "report, whose numbers are those it was analyzed with (ignored)"]
    r = run("diff", tiny_model, tiny_model, "--dim", "typo=2")
    assert r.stderr.count("warning") == 2  # each side named: the two are two models to the user


# --- data files that are not .npz ---------------------------------------------------------------------
def _npy(path):
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, np.zeros((10, 1, 3, 32, 32), np.float32))


NOT_NPZ = {
    "npy": (_npy, "a .npy file"),
    "empty": (lambda p: p.write_bytes(b""), "an empty file"),
    "json": (lambda p: p.write_text('{"input": [1, 2]}'), "not a zip archive"),
}


@pytest.mark.parametrize("option", ["--calibration", "--inputs"])
@pytest.mark.parametrize("kind", list(NOT_NPZ))
def test_data_file_not_npz(tiny_model, tmp_path, option, kind):
    """A .npy file was an internal error (np.load returns a bare array), an empty file too
    (EOFError) for --calibration, and a JSON 'contains pickled (object) data'."""
    make, what = NOT_NPZ[kind]
    path = tmp_path / f"data.{kind}"
    make(path)
    one_error_line(run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", option, path), option, "not an .npz file", what)
    assert not (tmp_path / "o.onnx").exists()


# --- analyze --by-op honours --sort; Markdown notes after the layer table ----------------------------
@pytest.mark.parametrize("sort", ["flops", "params", "name"])
@pytest.mark.parametrize("fmt", ["csv", "markdown", "table"])
def test_by_op_sort(tiny_model, sort, fmt):
    """--by-op ignored --sort (always by MACs) and said 'the heaviest by MACs' under --sort params."""
    layers = json.loads(run("analyze", tiny_model, "--format", "json").stdout)["layers"]
    groups: dict[str, dict] = {}
    for layer in layers:  # the groups by hand, from the per-layer rows
        g = groups.setdefault(layer["op_type"], {"flops": 0, "params": 0, "macs": 0})
        for q in g:
            g[q] += layer[q] or 0
    if sort == "name":
        expected = sorted(groups)
    else:
        expected = sorted(groups, key=lambda op: (-groups[op][sort], -groups[op]["macs"], -groups[op]["flops"], op))
    r = run("analyze", tiny_model, "--by-op", "--sort", sort, "--top", "3", "--format", fmt)
    assert r.exit_code == 0, r.output
    if fmt == "csv":
        got = [line.split(",")[0] for line in r.stdout.splitlines()[1:]]
    elif fmt == "markdown":
        got = [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")][3:]
    else:
        got = [line.split()[0] for line in r.stdout.splitlines() if line.split() and line.split()[0] in groups]
        word = {"flops": "the heaviest by FLOPs", "params": "the heaviest by params", "name": "the first by name"}[sort]
        assert f"5 more op types not shown (--top 3: {word};" in r.stdout
    assert got == expected[:3]


def test_markdown_notes_are_a_list(tmp_path):
    """The notes came right after </details>: CommonMark keeps them inside the HTML block (shown
    as one raw line of text, not a list)."""
    from markdown_it import MarkdownIt

    model = _batch_model(tmp_path / "b.onnx")  # an unbound batch: one note
    md = run("analyze", model, "--format", "markdown").stdout
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert "<li>unbound symbolic dimensions set to 1 for the numbers: batch" in html


def test_rewrite_verification_tables_fit_80_columns(tiny_model, tmp_path):
    """The verification table was 81 columns wide at COLUMNS=80 (its columns could not shrink)."""
    r = run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", "--verify-layers", "--rank", "2", env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any("before Softmax" in line or "before Soft" in line or "…" in line for line in lines)
    assert "error after each rewritten layer" in r.stdout
    too_wide = [line for line in lines if len(line) > 80]
    assert too_wide == []


def test_unreachable_target_ratio_names_the_ratio(tiny_model, tmp_path):
    """The error of an unreachable --target-ratio spoke of a --target-macs the user never gave."""
    line = one_error_line(run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", "--target-ratio", "0.1"))
    total, least = 2_254_176, 500_592  # samples/README.md; rank 1 everywhere (test_rewrite_cli)
    assert f"--target-ratio 0.1 ({int(total * 0.1):,} of {total:,} MACs) cannot be reached" in line
    assert f"the least the model can cost is {least:,} MACs ({least / total:.3f} of the model" in line
    assert "--target-macs" not in line


def test_rewrite_markdown_has_no_diff_heading(tiny_model):
    """A dry run's Markdown said '### sepify diff: `.../tiny.onnx → tiny_cnn`' (the graph name of a
    model that is not written), under a report titled 'sepify rewrite'."""
    md = run("rewrite", tiny_model, "--dry-run", "--format", "markdown").stdout
    assert md.startswith("## sepify rewrite: `tiny.onnx` (rank 1, dw-first)\n")
    assert "sepify diff" not in md
    assert "### cost before → after" in md


@pytest.mark.parametrize("fmt", ["netron", "model-explorer"])
def test_rewrite_dry_run_viewer_file_warns(tiny_model, fmt):
    r = run("rewrite", tiny_model, "--dry-run", "--format", fmt)
    assert r.exit_code == 0, r.output
    assert "conv1/depthwise" in r.stdout  # it names nodes of the rewritten model...
    assert r.stderr.startswith(f"sepify: warning: --dry-run: the {fmt} file describes the rewritten model")


@pytest.mark.parametrize("args,warning", [
    (["analyze", "{m}", "--format", "json", "--top", "3"], "--top shapes the table, CSV and Markdown; --format json"),
    (["analyze", "{m}", "--format", "model-explorer", "--by-op", "--sort", "params"],
     "--by-op, --sort shape the table, CSV and Markdown; --format model-explorer"),
    (["diff", "{m}", "{m}", "--format", "json", "--all"], "--all shapes the table and Markdown; --format json"),
])
def test_row_options_ignored_by_machine_formats_warn(tiny_model, args, warning):
    """--top 3 with --format json wrote all 15 layers without a word."""
    r = run(*[a.replace("{m}", str(tiny_model)) for a in args])
    assert r.exit_code == 0, r.output
    assert r.stderr == f"sepify: warning: {warning} holds every row (ignored)\n"
    if args[:1] == ["analyze"] and "json" in args:
        assert len(json.loads(r.stdout)["layers"]) == 15  # every layer, as the warning says


def test_row_options_of_the_table_do_not_warn(tiny_model):
    assert run("analyze", tiny_model, "--top", "3", "--by-op", "--sort", "flops").stderr == ""
    assert run("diff", tiny_model, tiny_model, "--all", "--top", "3", "--format", "markdown").stderr == ""


def _anonymous_dims_model(path):
    """A 3x3 Conv (4 -> 6 channels) on an input whose batch, height and width have no name."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, None, None])
    for axis in (0, 2, 3):
        x.type.tensor_type.shape.dim[axis].Clear()
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, None, None])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g", [x],
                              [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_verify_binds_anonymous_dims_by_their_names(tmp_path):
    """docs/cli.md: anonymous input dims are named <input>_d<axis> and bound with --dim. analyze
    did so, but rewrite --verify's random input said 'x[2] (unnamed)' and would not take the dims."""
    model = _anonymous_dims_model(tmp_path / "m.onnx")
    analysis = json.loads(run("analyze", model, "--dim", "x_d2=8", "--dim", "x_d3=8", "--format", "json").stdout)
    assert analysis["totals"]["macs"] == 6 * 4 * 9 * 8 * 8  # each output position: 4*9 MACs per output channel
    r = run("rewrite", model, "-o", tmp_path / "o.onnx", "--verify", "--dim", "x_d2=8", "--dim", "x_d3=8",
            "--rank", "full", "--format", "json")
    assert r.exit_code == 0, r.output
    ver = json.loads(r.stdout)["verification"]
    assert ver["samples"] == 1 and ver["checked_error"] < 1e-4  # full rank: the same function
    r = run("rewrite", model, "-o", tmp_path / "o.onnx", "--verify")
    line = one_error_line(r, "x[2]=x_d2", "x[3]=x_d3", "--dim x_d2=VALUE --dim x_d3=VALUE (or --input-shape),")
    assert "(unnamed)" not in line


def test_check_one_unbound_dim_is_it(tmp_path):
    """One dimension is 'it', not 'them' (the note and the error)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, "W"])], [w])
    path = tmp_path / "w.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = run("check", "--no-config", path, "--max-params", "100", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "unbound dimension W: no budget of this model depends on it" in json.loads(r.stdout)["models"][0]["notes"]
    line = one_error_line(run("check", "--no-config", path, "--max-macs", "1M"), "unbound dimension W")
    assert "bind it with --dim W=VALUE" in line


@pytest.mark.parametrize("args", [["analyze", ""], ["rewrite", "", "--dry-run"], ["diff", "", "{m}"],
                                  ["check", "--no-config", "", "--max-macs", "1G"]])
def test_empty_model_path(tiny_model, args):
    """`sepify analyze "$MODEL"` with MODEL unset said '.: is a directory, not an ONNX file'."""
    r = run(*[a.replace("{m}", str(tiny_model)) for a in args])
    assert r.exit_code == 2, r.output
    assert "sepify: error: '': an empty model path (an unset variable in a script?)" in r.stderr.splitlines()
    assert "directory" not in r.output


@pytest.mark.parametrize("suffix", [".data", ".alt.data"])
def test_report_is_not_the_data_file_of_the_output(tiny_model, tmp_path, suffix):
    """rewrite -o out.onnx --report out.onnx.alt.data wrote the model's weights to that file and
    then the report over them: out.onnx no longer loaded."""
    import onnx

    src = tmp_path / "m.onnx"
    onnx.save(onnx.load(tiny_model), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    out = tmp_path / "out.onnx"
    for _ in range(2):  # the second save alternates the data file's name (.data, .alt.data)
        r = run("rewrite", src, "-o", out, "--report", f"{out}{suffix}")
        one_error_line(r, "--report is a name of -o's external-data file", "overwrite the rewritten model's weights")
        assert run("rewrite", src, "-o", out, "--report", tmp_path / "r.json", "--format", "json").exit_code == 0
        onnx.checker.check_model(str(out), full_check=True)
        assert len(onnx.load(str(out)).graph.node) == 17  # the pair loads, weights and all


@pytest.mark.parametrize("name,check", [
    ("r.json", lambda text: json.loads(text)["schema"] == "sepify.rewrite/1"),
    ("r.md", lambda text: text.startswith("## sepify rewrite: `tiny.onnx`")),
    ("r.txt", lambda text: "sepify rewrite:" in text.splitlines()[0] and "┃" not in text),
])
def test_report_file_format_follows_its_name_under_the_default_format(tiny_model, tmp_path, name, check):
    """--report r.json under the default --format wrote the terminal table into r.json."""
    r = run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", "--report", tmp_path / name)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].strip().startswith("sepify rewrite:")  # stdout: the table
    assert check((tmp_path / name).read_text())
    r = run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--format", "markdown")
    assert (tmp_path / "r.json").read_text().startswith("## sepify rewrite")  # an explicit --format wins


def test_layer_budget_of_a_model_without_layers(tmp_path):
    """A graph of no nodes (an identity export) has no layer above any budget: it FAILED with
    'layer MACs could not be measured'."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    path = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [x], [x]), opset_imports=[helper.make_opsetid("", 17)]), path)
    r = run("check", "--no-config", path, "--max-layer-macs", "1", "--format", "json")
    assert r.exit_code == 0, r.output
    (budget,) = [b for b in json.loads(r.stdout)["models"][0]["budgets"] if b["quantity"] == "layer_macs"]
    assert budget["value"] == 0 and budget["passed"] is True


def test_dash_outputs(tiny_model, tmp_path, monkeypatch):
    """'-' is stdout for -o and --report; rewrite -o - and check --junit - wrote a file named '-',
    and rewrite --report - printed the report twice (two JSON documents on stdout)."""
    monkeypatch.chdir(tmp_path)
    one_error_line(run("rewrite", tiny_model, "-o", "-"), "-o -", "not to stdout")
    one_error_line(run("check", "--no-config", tiny_model, "--junit", "-"), "--junit -")
    r = run("rewrite", tiny_model, "--dry-run", "--report", "-", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["schema"] == "sepify.rewrite/1"  # one document
    assert not (tmp_path / "-").exists()


def test_check_a_model_named_twice_is_checked_once(tiny_model, monkeypatch, tmp_path):
    """Overlapping shell globs named a model twice: two suites with the same testcases in JUnit."""
    import xml.etree.ElementTree as ET

    monkeypatch.chdir(tiny_model.parent)
    junit = tmp_path / "j.xml"
    r = run("check", "--no-config", "tiny.onnx", "./tiny.onnx", str(tiny_model), "--max-macs", "1G", "--junit", junit,
            "--format", "json")
    assert r.exit_code == 0, r.output
    assert [m["path"] for m in json.loads(r.stdout)["models"]] == ["tiny.onnx"]
    assert len(ET.parse(junit).getroot().findall("testsuite")) == 1


def test_metric_without_model_explorer_warns(tiny_model, tmp_path):
    r = run("analyze", tiny_model, "--metric", "params", "--format", "json")
    assert r.exit_code == 0 and r.stderr.startswith("sepify: warning: --metric params is the quantity of a --format "
                                                    "model-explorer file")
    assert run("analyze", tiny_model, "--metric", "params", "--format", "model-explorer").stderr == ""
    me = tmp_path / "me.json"
    r = run("rewrite", tiny_model, "-o", tmp_path / "o.onnx", "--metric", "params", "--format", "model-explorer",
            "--report", me)
    assert r.stderr == "" and json.loads(me.read_text())["results"]["fc"]["value"] == 330  # 32*10 + 10


def test_rewrite_error_column_keeps_its_digits(tiny_model):
    """The weight-error column read 0.853, 0.88, 0.912: three significant digits, with the zeros."""
    r = run("rewrite", tiny_model, "--dry-run", "--format", "json")
    errors = {x["name"]: x["rel_error"] for x in json.loads(r.stdout)["layers"]}
    md = run("rewrite", tiny_model, "--dry-run", "--format", "markdown").stdout
    for name, err in errors.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| ~ | `{name} → "))
        assert row.rstrip(" |").split("| ")[-1] == f"{round(err, 4):#.3g}"


def test_op_column_loses_the_spaces_before_letters():
    from sepify.render.common import shorten_op

    assert shorten_op("Conv → Conv+Concat", 17) == "Conv→Conv+Concat"  # was "Conv → C…v+Concat"
    assert shorten_op("Conv → Conv+Concat", 18) == "Conv → Conv+Concat"
    assert shorten_op("BatchNormalization → Conv", 12) == "Batch…m→Conv"  # "BatchNorm→Conv", cut in the middle


def test_negative_seed_is_a_usage_error(tiny_model):
    """numpy's generators take no negative seed: --seed -1 was an internal error (ValueError)."""
    r = run("rewrite", tiny_model, "--dry-run", "--verify", "--seed", "-1")
    assert r.exit_code == 2 and "--seed" in r.output and "Traceback" not in r.output


def test_output_below_a_file(tiny_model):
    one_error_line(run("analyze", tiny_model, "-o", f"{tiny_model}/a.json"), f"folder {tiny_model} is not a folder")


def test_numbers_above_tera_have_units():
    """A 1x3x48x10^17 input shape gave 'MACs 8468400000.0T' and '229920260.6TiB'."""
    from sepify.units import human, human3, human_bytes

    assert human(1_500_000_000_000_000) == "1.5P"
    assert human(2_300_000_000_000_000_000) == "2.3E"
    assert human(999_960_000_000_000) == "1.0P"  # rounds to 1000.0T: the next unit
    assert human_bytes(3 * 2**50) == "3.0PiB" and human_bytes(5 * 10**18, style="si") == "5.0EB"
    assert human3(42_000_000_000_000_000) == "42.0P"


def test_baseline_errors_say_it_is_the_baseline(tiny_model, tmp_path):
    """'x/tiny.json: no such file' for model tiny.onnx did not say which file that was."""
    r = run("check", "--no-config", tiny_model, "--baseline", str(tmp_path / "base" / "{stem}.json"))
    one_error_line(r, f"{tiny_model}: the baseline {tmp_path / 'base' / 'tiny.json'}: no such file")


def test_file_size_counts_external_data(tiny_model, tmp_path):
    """check --max-file-size passed a model whose weights are in an external-data file: its
    'file size' was the .onnx header alone (2.8 KiB of a 91 KiB model)."""
    import onnx

    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(tiny_model), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    total = src.stat().st_size + (src.parent / "w.bin").stat().st_size
    assert (src.parent / "w.bin").stat().st_size > 80_000  # the weights: 22,122 params + 32 buffers, float32
    assert json.loads(run("analyze", src, "--format", "json").stdout)["model"]["file_size"] == total
    r = run("check", "--no-config", src, "--max-file-size", str(total - 1), "--format", "json")
    assert r.exit_code == 1, r.output
    (b,) = [b for b in json.loads(r.stdout)["models"][0]["budgets"] if b["quantity"] == "file_size"]
    assert b["value"] == total and not b["passed"]


def test_markdown_layer_names_are_literal(tmp_path):
    """A layer named 'a*b*' rendered as 'a<em>b</em>' and '<lambda>' as an HTML tag on GitHub."""
    import onnx
    from markdown_it import MarkdownIt
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="block*1*/relu"),
             helper.make_node("Relu", ["y"], ["z"], name="<lambda>[0]"),
             helper.make_node("Relu", ["z"], ["w"], name="conv_1_bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "names.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    md = run("analyze", path, "--format", "markdown").stdout
    assert "| conv_1_bn |" in md  # underscores inside a word are left as they are
    html = MarkdownIt("commonmark").enable("table").render(md)
    for name in ("block*1*/relu", "&lt;lambda&gt;[0]", "conv_1_bn"):
        assert f"<td>{name}</td>" in html, html


def test_rewrite_file_sizes_count_external_data(tiny_model, tmp_path):
    """rewrite's 'file size' row was the .onnx headers alone for external-data models: +69%
    where the model shrank about 5x."""
    import onnx

    src = tmp_path / "ext" / "m.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(tiny_model), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    before = src.stat().st_size + (src.parent / "w.bin").stat().st_size
    out = tmp_path / "out" / "r.onnx"
    out.parent.mkdir()
    r = run("rewrite", src, "-o", out, "--format", "json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    after = sum(p.stat().st_size for p in out.parent.iterdir())  # the header and its data file
    fs = rep["diff"]["totals"]["file_size"]
    assert (fs["old"], fs["new"]) == (before, after)
    assert rep["before"]["model"]["file_size"] == before and rep["after"]["model"]["file_size"] == after
    assert after < before


def test_rewrite_unused_dim_note_as_analyze_words_it(tiny_model):
    note = [n for n in json.loads(run("rewrite", tiny_model, "--dry-run", "--dim", "zz=3", "--format", "json").stdout)
            ["notes"] if "dims not in the model" in n]
    assert note == [n for n in json.loads(run("analyze", tiny_model, "--dim", "zz=3", "--format", "json").stdout)["notes"]
                    if "dims not in the model" in n]
