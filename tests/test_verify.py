"""Honest verification (sepify/rewrite/verify.py): expected values are computed here with numpy
from the models' known math, or from onnxruntime runs of the models made by the test."""

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
from sepify.rewrite.verify import verify



def invoke(*args):
    return CliRunner().invoke(main, ["rewrite", *map(str, args)], catch_exceptions=False)


def model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def classifier(w: np.ndarray) -> onnx.ModelProto:
    """x [N, 4] -> MatMul W -> logits -> Softmax -> Flatten -> Identity -> prob (a trivial chain after Softmax)."""
    return model([helper.make_node("MatMul", ["x", "W"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
                  helper.make_node("Flatten", ["p"], ["pf"], axis=1),
                  helper.make_node("Identity", ["pf"], ["prob"])],
                 [vi("x", ["N", 4])], [vi("prob", ["N", w.shape[1]])], {"W": w.astype(np.float32)})


def test_saturated_softmax_is_exposed_by_the_pre_softmax_comparison():
    rng = np.random.default_rng(0)
    w = np.array([[40.0, -40.0], [-30.0, 30.0], [25.0, -25.0], [-35.0, 35.0]])
    w_bad = 3.0 * w  # logits 3x as large: relative L2 error 2 on the logits, the same argmax everywhere
    samples = [{"x": rng.standard_normal((4, 4)).astype(np.float32)} for _ in range(8)]
    ver = verify(classifier(w), classifier(w_bad), samples, source="test data")
    out = ver["outputs"]["prob"]
    # the probabilities hide it: (nearly) one-hot on both sides, every argmax agrees
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert out["top1_agreement"] == 1.0 and out["rows"] == 32 and out["top5_agreement"] is None  # 2 classes
    assert out["cosine"] > 0.99
    assert out["saturated_share"] == pytest.approx(np.mean(p.max(1) > 0.99))
    assert out["saturated_share"] >= 0.5
    pre = out["before_saturation"]
    assert pre["op"] == "Softmax" and pre["tensor"] == "logits"
    assert pre["rel_l2_error"] == pytest.approx(2.0, rel=1e-5)  # ||3z - z|| / ||z||
    assert pre["max_abs_error"] == pytest.approx(np.max(np.abs(2 * z)), rel=1e-5)
    assert ver["checked_error"] == pytest.approx(2.0, rel=1e-5)
    assert ver["passed"] is None and ver["tolerance"] is None and ver["samples"] == 8
    assert ver["smoke_test"] is False and ver["note"] is None and ver["inputs"] == "test data"
    failed = verify(classifier(w), classifier(w_bad), samples, tolerance=0.5)
    assert failed["passed"] is False
    assert verify(classifier(w), classifier(w), samples, tolerance=1e-6)["passed"] is True


def two_outputs(zero_scale: float) -> onnx.ModelProto:
    """y = x W (a normal output) and z = y * zero_scale (near zero)."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    return model([helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Mul", ["y", "s"], ["z"])],
                 [vi("x", [2, 4])], [vi("y", [2, 3]), vi("z", [2, 3])],
                 {"W": w, "s": np.array(zero_scale, dtype=np.float32)})


def test_near_zero_output_is_flagged_not_a_huge_relative_error():
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    ver = verify(two_outputs(1e-9), two_outputs(3e-9), samples)  # z's relative error is 2 (200%)
    z = ver["outputs"]["z"]
    assert z["near_zero_reference"] is True and z["rel_l2_error"] is None
    y = np.concatenate([s["x"] for s in samples]).astype(np.float64) @ (np.arange(12).reshape(4, 3) / 10)
    scale = 1 + np.abs(y).max()  # S = 1 + the largest |reference| of the graph outputs
    assert ver["scale"] == pytest.approx(scale, rel=1e-6)
    rms_diff = np.sqrt(np.mean((2e-9 * y) ** 2))
    assert z["scaled_error"] == pytest.approx(rms_diff / scale, rel=1e-3)
    assert ver["outputs"]["y"]["near_zero_reference"] is False and ver["outputs"]["y"]["rel_l2_error"] < 1e-7
    assert ver["checked_error"] < 1e-8  # neither output is wrong by more than noise at the model's scale
    assert verify(two_outputs(1e-9), two_outputs(3e-9), samples, tolerance=1e-3)["passed"] is True
    # an output that should be ~0 but is not (z = y) is still caught, on the same scale
    bad = verify(two_outputs(1e-9), two_outputs(1.0), samples, tolerance=1e-3)
    assert bad["passed"] is False and bad["outputs"]["z"]["scaled_error"] > 0.1


def scores(bias: np.ndarray, shape=("N", 8)) -> onnx.ModelProto:
    return model([helper.make_node("Add", ["x", "b"], ["s"])], [vi("x", list(shape))], [vi("s", list(shape))],
                 {"b": bias.astype(np.float32)})


def test_top1_top5_agreement_across_samples_by_hand():
    # three samples of two rows each; the rewritten model adds b = [0, 0, 0, 0, 0, 0, 0, 5]
    rows = np.array([
        [9, 8, 7, 6, 5, 4, 3, 0],     # argmax 0 -> rewritten [.., 5]: argmax still 0
        [1, 2, 3, 4, 9, 0, 0, 6],     # argmax 4 (9) -> 7 has 11: top-1 changes; 4 is 2nd: in top 5
        [5, 6, 7, 8, 9, 1, 0, 0],     # argmax 4 stays (9 > 5)
        [0, 1, 2, 3, 4, 5, 6, 1.5],   # argmax 6 -> 7 has 6.5: changes; 6 is 2nd
        [9, 9.5, 9.2, 9.3, 9.4, 9.1, 0, 4.9],  # argmax 1 (9.5) -> 7 has 9.9: changes; 1 is 2nd
        [0, 0, 0, 0, 0, 0, 1, 0],     # argmax 6 -> 7 has 5: changes; 6 second
    ], dtype=np.float32)
    bias = np.zeros(8)
    bias[7] = 5
    samples = [{"x": rows[i:i + 2]} for i in range(0, 6, 2)]
    ver = verify(scores(np.zeros(8)), scores(bias), samples)
    s = ver["outputs"]["s"]
    assert s["rows"] == 6 and s["classes"] == 8
    assert s["top1_agreement"] == pytest.approx(2 / 6)  # rows 0 and 2 keep their argmax
    assert s["top5_agreement"] == 1.0
    assert s["sample_top1_agreement"] == 0.0  # every sample has a row that changed

    # and on random data against a direct numpy count, top-5 included; a [T, batch, classes]
    # output (rank 3, classes the longest axis) is class-like per position
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 1, 8)).astype(np.float32)
    b = rng.standard_normal(8) * 1.5
    ver = verify(scores(np.zeros(8), ("T", 1, 8)), scores(b, ("T", 1, 8)), [{"x": xi} for xi in x])
    ref, new = x.reshape(-1, 8).astype(np.float64), x.reshape(-1, 8) + b.astype(np.float32)
    top1 = np.mean(ref.argmax(1) == new.argmax(1))
    top5 = np.mean([r.argmax() in np.argsort(-n)[:5] for r, n in zip(ref, new)])
    whole = np.mean((ref.argmax(1) == new.argmax(1)).reshape(12, 3).all(axis=1))
    s = ver["outputs"]["s"]
    assert s["rows"] == 36 and s["classes"] == 8
    assert s["top1_agreement"] == pytest.approx(top1)
    assert s["top5_agreement"] == pytest.approx(top5)
    assert s["sample_top1_agreement"] == pytest.approx(whole)
    assert 0 < whole < top1 < top5 < 1  # the case discriminates


@pytest.fixture
def tiny(tiny_model) -> Path:
    return tiny_model


def _ort_run(path_or_model, feeds, extra=()):
    m = onnx.load(str(path_or_model)) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in extra)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = ["output", *extra]
    return [dict(zip(names, s.run(names, f))) for f in feeds]


def rel_l2(ref, new):
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([n.ravel() for n in new]).astype(np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(a)


def test_inputs_multi_sample_file_and_verify_layers_match_onnxruntime(tiny, tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 1, 3, 32, 32)).astype(np.float32)
    npz = tmp_path / "five.npz"
    np.savez(npz, input=x)  # [S, *input_shape]: 5 samples
    out = tmp_path / "o.onnx"
    result = invoke(tiny, "-o", out, "--rank", "2", "--inputs", npz, "--verify-layers", "--format", "json")
    assert result.exit_code == 0, result.output
    ver = json.loads(result.stdout)["verification"]
    assert ver["samples"] == 5 and ver["input_shapes"] == {"input": [1, 3, 32, 32]}
    feeds = [{"input": xi} for xi in x]
    tensors = ["bn1_out", "conv2_out", "conv4_out"]  # conv1's BN is folded: the pair ends in bn1's output name
    ref = _ort_run(tiny, feeds, tensors + ["fc_out"])
    new = _ort_run(out, feeds, tensors + ["fc_out"])
    o = ver["outputs"]["output"]
    assert o["rel_l2_error"] == pytest.approx(rel_l2([r["output"] for r in ref], [n["output"] for n in new]), rel=1e-4)
    assert o["before_saturation"]["rel_l2_error"] == pytest.approx(
        rel_l2([r["fc_out"] for r in ref], [n["fc_out"] for n in new]), rel=1e-4)
    top1 = np.mean([r["output"].argmax() == n["output"].argmax() for r, n in zip(ref, new)])
    assert o["top1_agreement"] == pytest.approx(top1) and o["rows"] == 5
    layers = {row["name"]: row for row in ver["layers"]}
    assert [(row["name"], row["tensor"]) for row in ver["layers"]] == list(zip(["conv1", "conv2", "conv4"], tensors))
    for name, t in zip(["conv1", "conv2", "conv4"], tensors):
        expected = rel_l2([r[t] for r in ref], [n[t] for n in new])
        assert layers[name]["rel_l2_error"] == pytest.approx(expected, rel=1e-4)
        assert layers[name]["max_abs_error"] == pytest.approx(
            max(np.abs(r[t] - n[t]).max() for r, n in zip(ref, new)), rel=1e-4)
    # the table shows the per-layer rows
    table = invoke(tiny, "--dry-run", "--rank", "2", "--inputs", npz, "--verify-layers").stdout
    assert f"verification on --inputs {npz}, 5 samples\n" in table
    row = next(line for line in table.splitlines() if "conv2_out" in line)
    assert f"{layers['conv2']['rel_l2_error']:.4g}" in row


def test_inputs_file_errors_exit_2_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputt=np.zeros((1, 3, 32, 32), np.float32))
    result = invoke(tiny, "--dry-run", "--inputs", bad)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "lacks graph input(s) input" in result.stderr and "inputt" in result.stderr
    np.savez(bad, input=np.zeros((2, 3, 3, 32, 32), np.float32))
    result = invoke(tiny, "--dry-run", "--inputs", bad)
    assert result.exit_code == 2 and "sample 0: 'input' has shape 3x3x32x32, the input is 1x3x32x32" in result.stderr


def spatial_model() -> onnx.ModelProto:
    w = np.random.default_rng(5).standard_normal((8, 3, 3, 3)).astype(np.float32)
    return model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                 [vi("x", ["N", 3, "H", "W"])], [vi("y", ["N", 8, "H", "W"])], {"W": w})


def test_unbound_spatial_dims_exit_2_one_line(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(spatial_model(), str(path))
    result = invoke(path, "--dry-run", "--verify")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "unbound dims x[2]=H, x[3]=W" in result.stderr and "--dim H=VALUE --dim W=VALUE" in result.stderr
    result = invoke(path, "--dry-run", "--verify", "--dim", "H=6", "--dim", "W=5", "--format", "json")
    assert result.exit_code == 0, result.output
    ver = json.loads(result.stdout)["verification"]
    assert ver["input_shapes"] == {"x": [1, 3, 6, 5]}
    assert ver["notes"] == ["input 'x': batch dim N set to 1 (bind with --dim N=VALUE)"]
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((2, 1, 3, 7, 7), np.float32))  # data binds the dims
    result = invoke(path, "--dry-run", "--inputs", npz, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["input_shapes"] == {"x": [1, 3, 7, 7]}


def test_flags_appear_in_table_and_markdown(tmp_path):
    """A saturated softmax and a near-zero output, flagged in every format (nothing to rewrite:
    the models are the same, so the numbers are 0 and only the flags are under test)."""
    w = np.array([[40.0, -40.0], [-30.0, 30.0], [25.0, -25.0], [-35.0, 35.0]], np.float32)
    m = model([helper.make_node("MatMul", ["x", "W"], ["logits"]), helper.make_node("Softmax", ["logits"], ["prob"]),
               helper.make_node("Mul", ["logits", "s"], ["tiny"])],
              [vi("x", [8, 4])], [vi("prob", [8, 2]), vi("tiny", [8, 2])], {"W": w, "s": np.array(1e-9, np.float32)})
    path, npz = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(m, str(path))
    x = np.random.default_rng(4).standard_normal((3, 8, 4)).astype(np.float32)
    np.savez(npz, x=x)
    z = x.reshape(-1, 4).astype(np.float64) @ w
    share = np.mean(np.max(np.exp(z) / np.exp(z).sum(1, keepdims=True), axis=1) > 0.99)
    assert share >= 0.5
    ver = json.loads(invoke(path, "--dry-run", "--inputs", npz, "--format", "json").stdout)["verification"]
    assert ver["outputs"]["tiny"]["near_zero_reference"] is True and ver["outputs"]["tiny"]["rel_l2_error"] is None
    assert ver["outputs"]["prob"]["saturated_share"] == pytest.approx(share)
    for fmt in ("table", "markdown"):
        text = invoke(path, "--dry-run", "--inputs", npz, "--format", fmt).stdout
        tiny_row = next(line for line in text.splitlines() if "tiny" in line and "reference ~0" in line)
        assert "n/a" in tiny_row and "RMS error / scale 0" in tiny_row
        pre_row = next(line for line in text.splitlines() if "before Softmax: logits" in line)
        assert f"Softmax saturated in {share:.0%}: its output hides errors" in pre_row
    from sepify.render.html import rewrite_html

    report = json.loads(invoke(path, "--dry-run", "--inputs", npz, "--format", "json").stdout)
    page = rewrite_html(report)
    assert "tiny: reference near zero" in page and f"prob: Softmax saturated in {share:.0%}" in page
    assert "verification-smoke" not in page
    report = json.loads(invoke(path, "--dry-run", "--verify", "--format", "json").stdout)
    assert "random inputs: wiring smoke test, not an accuracy measurement" in rewrite_html(report)


def test_verify_uses_every_held_out_calibration_sample(tiny, tmp_path):
    x = np.random.default_rng(6).standard_normal((12, 1, 3, 32, 32)).astype(np.float32)
    cal, out = tmp_path / "cal.npz", tmp_path / "o.onnx"
    np.savez(cal, input=x)
    result = invoke(tiny, "-o", out, "--calibration", cal, "--holdout", "4", "--rank", "2", "--verify",
                    "--format", "json", "--calib-method", "refit")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    held = report["calibration"]["holdout_indices"]
    ver = report["verification"]
    assert len(held) == 4 and ver["samples"] == 4 and ver["smoke_test"] is False
    assert ver["inputs"] == "calibration holdout (never used to fit)"
    feeds = [{"input": x[i]} for i in held]
    ref, new = _ort_run(tiny, feeds, ["fc_out"]), _ort_run(out, feeds, ["fc_out"])
    assert ver["outputs"]["output"]["before_saturation"]["rel_l2_error"] == pytest.approx(
        rel_l2([r["fc_out"] for r in ref], [n["fc_out"] for n in new]), rel=1e-4)


def test_verification_fits_100_columns(tiny, tmp_path):
    x = np.random.default_rng(8).standard_normal((2, 1, 3, 32, 32)).astype(np.float32)
    npz = tmp_path / "v.npz"
    np.savez(npz, input=x)
    for args in (("--verify",), ("--inputs", npz, "--verify-layers")):
        result = CliRunner().invoke(main, ["rewrite", str(tiny), "--dry-run", *map(str, args)], env={"COLUMNS": "100"},
                                    catch_exceptions=False)
        lines = result.stdout.splitlines()
        ver = lines[next(i for i, line in enumerate(lines) if line.startswith("verification")):]
        assert max(map(len, ver)) <= 100, max(ver, key=len)
        data = json.loads(CliRunner().invoke(main, ["rewrite", str(tiny), "--dry-run", "--format", "json",
                                                    *map(str, args)]).stdout)["verification"]
        out, pre = data["outputs"]["output"], data["outputs"]["output"]["before_saturation"]
        row = next(line for line in ver if "↳ before Softmax: fc_out" in line)  # names and numbers whole
        assert f"{pre['rel_l2_error']:.4g}" in row and f"{pre['max_abs_error']:.4g}" in row and f"{pre['cosine']:.5f}" in row
        row = next(line for line in ver if line.startswith("│ output "))
        assert f"{out['rel_l2_error']:.4g}" in row and f"{out['top1_agreement']:.3f}" in row
        for layer in data["layers"] or []:
            row = next(line for line in ver if f"│ {layer['name']} " in line)
            assert layer["tensor"] in row and f"{layer['rel_l2_error']:.4g}" in row
