"""Tests for the ``sepify rewrite`` command line (click's CliRunner).

Expected numbers are hand counts (samples/README.md) or onnxruntime outputs of the input model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sepify.cli import main


TINY_TOTAL_MACS = 2_254_176
TINY_TOTAL_PARAMS = 22_090 + 32  # + bn1's scale and bias (counted as PyTorch does, docs/conventions.md)


def invoke(*args):
    return CliRunner().invoke(main, ["rewrite", *map(str, args)], catch_exceptions=False)


def session(path_or_model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def tiny(tiny_model) -> Path:
    return tiny_model


def test_output_model_loads_and_runs(tiny, tmp_path):
    out = tmp_path / "tiny.sep.onnx"
    result = invoke(tiny, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node if n.op_type == "Conv"][:2] == ["conv1/depthwise", "conv1/pointwise"]
    assert "BatchNormalization" not in [n.op_type for n in model.graph.node]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (y,) = session(out).run(None, {"input": x})
    assert y.shape == (1, 10) and np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)  # still ends in Softmax
    props = {p.key: p.value for p in model.metadata_props}
    assert "sepify.version" in props and json.loads(props["sepify.rewrite"])["settings"]["rank"] is None
    assert listing(tmp_path) == ["models", "tiny.sep.onnx"]


def test_full_rank_output_matches_the_original(tiny, tmp_path):
    out = tmp_path / "full.onnx"
    result = invoke(tiny, "-o", out, "--rank", "full", "--allow-increase", "--orientation", "pw-first")
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (expected,) = session(tiny).run(None, {"input": x})
    (got,) = session(out).run(None, {"input": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_dry_run_json(tiny):
    folder = tiny.parent
    result = invoke(tiny, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    assert listing(folder) == ["tiny.onnx"]  # no model written
    report = json.loads(result.stdout)
    totals = report["totals"]
    assert totals["before"]["macs"] == TINY_TOTAL_MACS
    assert totals["before"]["params"] == TINY_TOTAL_PARAMS
    # rank 1, dw-first, by hand (N, M, K, P_out): conv1 (16, 3, 9, 1024), conv2 (32, 16, 9, 225),
    # conv4 (32, 32, 15, 36); MACs (M*K + N*M) * P_out; the rest (dw, pw, fc) 48,672 + 173,056 + 320
    conv1 = (3 * 9 + 16 * 3) * 1024
    conv2 = (16 * 9 + 32 * 16) * 225
    conv4 = (32 * 15 + 32 * 32) * 36
    assert totals["after"]["macs"] == conv1 + conv2 + conv4 + 48_672 + 173_056 + 320 == 500_592
    # params: conv1's bias now comes from the folded BN (whose 32 scale/bias are gone);
    # conv2 keeps its bias; conv4 has none; block3.dw 288, block3.pw 1,024, fc 330 unchanged
    p_conv1 = 3 * 9 + 16 * 3 + 16
    p_conv2 = 16 * 9 + 32 * 16 + 32
    p_conv4 = 32 * 15 + 32 * 32
    assert totals["after"]["params"] == p_conv1 + p_conv2 + p_conv4 + 288 + 1_024 + 330
    layers = {row["name"]: row for row in report["layers"]}
    assert set(layers) == {"conv1", "conv2", "conv4"}
    assert all(row["rank"] == 1 and 0 < row["rel_error"] < 1 for row in layers.values())
    assert layers["conv1"]["folded_batchnorm"] == "bn1"
    assert {s["name"]: s["reason"] for s in report["skipped"]} == {
        "block3.dw": "already depthwise (group == C_in)", "block3.pw": "1x1 kernel (already pointwise)"}
    assert report["schema"].startswith("sepify.rewrite/")


def test_dry_run_with_output_path_writes_nothing(tiny, tmp_path):
    out = tmp_path / "never.onnx"
    result = invoke(tiny, "--dry-run", "-o", out, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert not out.exists()
    md = result.stdout
    assert md.startswith("## sepify rewrite: `tiny.onnx` (rank 1, dw-first)")
    row = next(line for line in md.splitlines() if "conv2 → conv2/{depthwise,pointwise}" in line)
    assert row.startswith("|") and "dw-first" in row and "1/9" in row
    assert "- folded BatchNormalization `bn1` into `conv1`" in md
    assert "\n\n- folded BatchNormalization" in md  # a blank line: not swallowed by the <details> block
    assert "- `block3.dw`: already depthwise (group == C_in)" in md


def test_report_file(tiny, tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "report.json"
    result = invoke(tiny, "-o", out, "--format", "json", "--report", report, "--rank", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert {row["rank"] for row in data["layers"]} == {2}
    assert json.loads(result.stdout)["totals"] == data["totals"]


@pytest.mark.parametrize("spelling", ["same", "dot", "relative"])
def test_output_equal_to_input_is_refused(tiny, spelling, monkeypatch):
    if spelling == "same":
        out = tiny
    elif spelling == "dot":
        out = tiny.parent / "." / tiny.name
    else:
        monkeypatch.chdir(tiny.parent)
        out = Path(tiny.name)
    result = invoke(tiny, "-o", out)
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.stderr
    assert listing(tiny.parent) == ["tiny.onnx"]  # (bytes checked by the fixture)


def test_tolerance_failure_exits_1(tiny, tmp_path):
    result = invoke(tiny, "-o", tmp_path / "o.onnx", "--tolerance", "1e-6")
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "tolerance 1e-06" in result.stderr
    assert "FAILED" in result.stdout


def test_tolerance_met_exits_0(tiny, tmp_path):
    result = invoke(tiny, "-o", tmp_path / "o.onnx", "--rank", "full", "--allow-increase", "--tolerance", "1e-4")
    assert result.exit_code == 0, result.output
    assert "passed" in result.stdout


def test_verify_prints_per_output_errors(tiny, tmp_path):
    result = invoke(tiny, "-o", tmp_path / "o.onnx", "--verify")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("verification"))
    assert "random inputs: wiring smoke test, not an accuracy measurement" in lines[head]
    header = next(line for line in lines[head:] if "rel L2" in line)
    assert all(h in header for h in ("output", "max abs", "cosine", "top-1", "top-5", "note"))
    ver = json.loads(invoke(tiny, "--dry-run", "--verify", "--format", "json").stdout)["verification"]
    out, pre = ver["outputs"]["output"], ver["outputs"]["output"]["before_saturation"]
    row = next(line for line in lines[head:] if line.startswith("│ output "))
    assert f"{out['rel_l2_error']:.4g}" in row and f"{out['max_abs_error']:.4g}" in row
    row = next(line for line in lines[head:] if "before Softmax: fc_out" in line)  # tiny_cnn ends in fc -> Softmax
    assert f"{pre['rel_l2_error']:.4g}" in row
    assert "no --tolerance: not judged" in result.stdout

    result = invoke(tiny, "--dry-run", "--verify", "--format", "json", "--seed", "3")
    report = json.loads(result.stdout)
    ver = report["verification"]
    assert set(ver["outputs"]["output"]) >= {"max_abs_error", "rel_l2_error", "cosine", "top1_agreement", "top5_agreement"}
    assert ver["inputs"] == "random normal, seed 3" and ver["smoke_test"] is True
    assert ver["note"] == "random inputs: wiring smoke test, not an accuracy measurement"
    assert ver["passed"] is None and ver["tolerance"] is None


def test_verify_with_inputs_file(tiny, tmp_path):
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, input=x)  # the input's rank exactly: one sample (the single-sample format)
    result = invoke(tiny, "--dry-run", "--inputs", npz, "--format", "json", "--rank", "full", "--allow-increase")
    assert result.exit_code == 0, result.output
    ver = json.loads(result.stdout)["verification"]
    assert ver["inputs"] == f"--inputs {npz}" and ver["samples"] == 1 and ver["smoke_test"] is False
    assert ver["note"] is None
    assert ver["outputs"]["output"]["rel_l2_error"] < 1e-5


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf at all \x00\xff", b"\x08\x07\x12"])
def test_bad_model_file_exits_2_and_leaves_nothing(tmp_path, content):
    folder = tmp_path / "work"
    folder.mkdir()
    bad = folder / "bad.onnx"
    bad.write_bytes(content)
    result = invoke(bad, "-o", folder / "out.onnx", "--verify")
    assert result.exit_code == 2
    assert result.stderr.startswith("sepify: error:")
    assert listing(folder) == ["bad.onnx"]  # no output, no temporary file
    assert bad.read_bytes() == content


def test_missing_model_and_missing_output_folder(tiny, tmp_path):
    result = invoke(tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "no such file" in result.stderr
    result = invoke(tiny, "-o", tmp_path / "no" / "such" / "dir" / "o.onnx")
    assert result.exit_code == 2
    assert not (tmp_path / "no").exists()


def test_usage_errors_exit_2(tiny):
    assert invoke(tiny).exit_code == 2  # neither -o nor --dry-run
    result = invoke(tiny, "--dry-run", "--rank", "2", "--energy", "0.9")
    assert result.exit_code == 2 and "choose one rank criterion" in result.stderr
    assert invoke(tiny, "--dry-run", "--rank", "0").exit_code == 2
    assert invoke(tiny, "--dry-run", "--energy", "1.5").exit_code == 2
    assert invoke(tiny, "--dry-run", "--exclude", "(").exit_code == 2


def test_target_macs(tiny):
    result = invoke(tiny, "--dry-run", "--format", "json", "--target-macs", "1.2M")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["target_macs"] == 1_200_000
    assert 500_592 < report["totals"]["after"]["macs"] <= 1_200_000


def test_unreachable_target_macs_exits_2(tiny, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke(tiny, "-o", out, "--target-macs", "400K")
    assert result.exit_code == 2
    assert "cannot be reached" in result.stderr and "400,000" in result.stderr
    assert "is 500,592 MACs" in result.stderr  # the least this model can cost (rank 1 everywhere), an integer
    assert not out.exists()


def test_include_exclude_on_the_command_line(tiny):
    result = invoke(tiny, "--dry-run", "--format", "json", "--include", "^conv", "--exclude", "^conv2$")
    report = json.loads(result.stdout)
    assert [row["name"] for row in report["layers"]] == ["conv1", "conv4"]
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert reasons["conv2"] == "excluded by --exclude"
    assert reasons["block3.dw"] == "not matched by --include"


def test_external_data_model_via_cli(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 8, 8])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    out = tmp_path / "o.onnx"
    result = invoke(src, "-o", out, "--rank", "full", "--allow-increase", "--tolerance", "1e-5", "--format", "json")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == ["o.onnx", "o.onnx.data", "src"]
    assert json.loads(result.stdout)["verification"]["outputs"]["y"]["rel_l2_error"] < 1e-5
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before


def test_markdown_title_names_the_written_file(tiny, tmp_path):
    out = tmp_path / "tiny.sep.onnx"
    result = invoke(tiny, "-o", out, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert result.stdout.startswith("## sepify rewrite: `tiny.onnx` → `tiny.sep.onnx` (rank 1, dw-first)")
