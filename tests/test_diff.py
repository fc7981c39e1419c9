"""Tests for sepify.diff (the diff engine) and ``sepify diff``.

Expected values are computed by hand from layer shapes (Conv MACs = H_out·W_out·C_out·C_in/group·k²),
never from sepify's own numbers. The rank-1 separable twin of Conv MobileNet is built here with
onnx.helper: every 3x3 Conv ``X`` becomes ``X/depthwise`` (3x3, group = C_in) + ``X/pointwise`` (1x1),
which is what ``sepify rewrite`` produces at rank 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sepify.cli import main
from sepify.diff import compare, load_report, parse_mapping
from sepify.render.diff import render_diff
from sepify.errors import ModelError, UsageError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))
import make_samples  # noqa: E402

# (C_in, C_out, stride, output side) of the 14 standard 3x3 convs of Conv MobileNet at 224
CONV_MOBILENET = [("conv1", 3, 32, 2, 112)] + [
    (f"block{k}.conv", cin, cout, s, side)
    for k, (cin, cout, s, side) in enumerate([
        (32, 64, 1, 112), (64, 128, 2, 56), (128, 128, 1, 56), (128, 256, 2, 28), (256, 256, 1, 28),
        (256, 512, 2, 14), (512, 512, 1, 14), (512, 512, 1, 14), (512, 512, 1, 14), (512, 512, 1, 14),
        (512, 512, 1, 14), (512, 1024, 2, 7), (1024, 1024, 1, 7)], start=1)
]


# --------------------------------------------------------------------------- model builders
def _model(nodes, inits, in_shape, out_shape, name="m"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _w(name, shape, rng):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.01).astype(np.float32), name)


def _conv(name, x, out, w, *, k, stride=1, pad=0, group=1):
    return helper.make_node("Conv", [x, w], [out], name=name, kernel_shape=[k, k], strides=[stride, stride],
                            pads=[pad] * 4, group=group)


def separable_conv_mobilenet() -> onnx.ModelProto:
    """Conv MobileNet with every 3x3 conv X replaced by X/depthwise + X/pointwise (rank 1)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "input"
    for name, cin, cout, stride, _ in CONV_MOBILENET:
        inits += [_w(f"{name}/depthwise.weight", (cin, 1, 3, 3), rng), _w(f"{name}/pointwise.weight", (cout, cin, 1, 1), rng)]
        nodes.append(_conv(f"{name}/depthwise", x, f"{name}/dw_out", f"{name}/depthwise.weight", k=3, stride=stride,
                           pad=1, group=cin))
        nodes.append(_conv(f"{name}/pointwise", f"{name}/dw_out", f"{name}_out", f"{name}/pointwise.weight", k=1))
        relu = "conv1.relu" if name == "conv1" else name.replace(".conv", ".relu")
        nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{relu}_out"], name=relu))
        x = f"{relu}_out"
    inits += [_w("fc.weight", (1000, 1024), rng), _w("fc.bias", (1000,), rng)]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool_out"], name="pool"),
              helper.make_node("Flatten", ["pool_out"], ["flatten_out"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flatten_out", "fc.weight", "fc.bias"], ["fc_out"], name="fc", transB=1),
              helper.make_node("Softmax", ["fc_out"], ["output"], name="softmax", axis=1)]
    return _model(nodes, inits, [1, 3, 224, 224], [1, 1000], "conv_mobilenet_rank1")


@pytest.fixture(scope="module")
def mobilenet_diff():
    return compare(make_samples.mobilenet_v1(conv_only=True), separable_conv_mobilenet())


def test_conv_mobilenet_rank1_totals_by_arithmetic():
    # the rank-1 rewrite of every 3x3 conv is MobileNet with conv1 separable too
    old = sum(side * side * cout * cin * 9 for _, cin, cout, _, side in CONV_MOBILENET) + 1024 * 1000
    new = sum(side * side * cin * (9 + cout) for _, cin, cout, _, side in CONV_MOBILENET) + 1024 * 1000
    assert old == 4_867_293_184
    conv1_std = 112 * 112 * 32 * 3 * 9
    conv1_sep = 112 * 112 * 3 * 9 + 112 * 112 * 3 * 32
    assert (conv1_std, conv1_sep) == (10_838_016, 1_542_912)
    assert new == 568_740_352 - conv1_std + conv1_sep == 559_445_248


def test_conv_mobilenet_rank1_diff(mobilenet_diff):
    d = mobilenet_diff
    data = d.to_dict()
    changed = [r for r in data["rows"] if r["status"] == "changed"]
    assert [r["name"] for r in changed] == [name for name, *_ in CONV_MOBILENET]
    assert data["counts"] == {"changed": 14, "added": 0, "removed": 0, "unchanged": 18, "renamed": 0}
    for r, (name, cin, cout, stride, side) in zip(changed, CONV_MOBILENET):
        assert r["match"] == "split"
        assert r["new_names"] == [f"{name}/depthwise", f"{name}/pointwise"]
        assert (r["old_op"], r["new_op"]) == ("Conv", "Conv")
        hw = side * side
        old_macs, new_macs = hw * cout * cin * 9, hw * cin * 9 + hw * cin * cout
        old_params, new_params = cout * cin * 9, cin * 9 + cin * cout
        old_bytes, new_bytes = 4 * cout * hw, 4 * (cin * hw + cout * hw)  # dw output + pw output written
        assert r["old"]["macs"] == old_macs and r["new"]["macs"] == new_macs
        assert r["delta"] == {"macs": new_macs - old_macs, "flops": 2 * (new_macs - old_macs),
                              "params": new_params - old_params, "output_bytes": new_bytes - old_bytes}
        assert r["pct"]["macs"] == pytest.approx(100 * (new_macs - old_macs) / old_macs, abs=1e-4)
        assert r["pct"]["params"] == pytest.approx(100 * (new_params - old_params) / old_params, abs=1e-4)
        assert r["pct"]["output_bytes"] == pytest.approx(100 * (new_bytes - old_bytes) / old_bytes, abs=1e-4)
    for r in data["rows"]:
        if r["status"] == "unchanged":
            assert r["match"] == "name" and r["delta"]["macs"] == 0 and r["old_names"] == r["new_names"]
    t = data["totals"]
    assert (t["macs"]["old"], t["macs"]["new"]) == (4_867_293_184, 559_445_248)
    assert t["macs"]["delta"] == 559_445_248 - 4_867_293_184
    assert t["macs"]["ratio"] == pytest.approx(559_445_248 / 4_867_293_184, rel=1e-5)
    old_params = sum(cout * cin * 9 for _, cin, cout, *_ in CONV_MOBILENET) + 1_025_000
    new_params = sum(cin * (9 + cout) for _, cin, cout, *_ in CONV_MOBILENET) + 1_025_000
    assert (t["params"]["old"], t["params"]["new"]) == (old_params, new_params) == (29_282_120, 4_210_088 - 864 + (3 * 9 + 3 * 32))
    assert (t["layers"]["old"], t["layers"]["new"]) == (32, 46)
    # the renderers show it (4.9G → 559.4M MACs: the number format of analyze)
    md = render_diff(data, "markdown")
    assert "| MACs | 4.9G | 559.4M | -4.3G | -88.5% | ×0.115 (8.70× less) |" in md and "`block7.conv → block7.conv/{depthwise,pointwise}`" in md
    assert json.loads(render_diff(data, "json")) == json.loads(json.dumps(data))


def test_extra_columns_for_rewrite(mobilenet_diff, capsys):
    d = mobilenet_diff
    d.row("block3.conv").extra.update({"rank": 1, "error": 0.0123})
    d.row("conv1/depthwise").extra["rank"] = 1  # looked up by the new name too
    data = d.to_dict()
    assert data["extra_columns"] == ["rank", "error"]
    assert data["rows"][0]["extra"] == {"rank": 1}
    render_diff(data, "table")
    out = capsys.readouterr().out
    assert "rank" in out and "error" in out and "0.0123" in out
    md = render_diff(data, "markdown")
    assert "| rank | error |" in md and "| 0.0123 |" in md
    for r in d.rows:
        r.extra.clear()


# --------------------------------------------------------------------------- matching rules on small models
def _chain(spec, *, cin=4, side=8, seed=0):
    """spec: list of (name, op, cout) with op in conv3/conv1/relu/bn/dw; returns a model."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, c = "input", cin
    for i, (name, op, cout) in enumerate(spec):
        out = "output" if i == len(spec) - 1 else f"{name}_out"
        if op in ("conv3", "conv1"):
            k = 3 if op == "conv3" else 1
            inits.append(_w(f"{name}.w", (cout, c, k, k), rng))
            nodes.append(_conv(name, x, out, f"{name}.w", k=k, pad=k // 2))
            c = cout
        elif op == "dw":
            inits.append(_w(f"{name}.w", (c, 1, 3, 3), rng))
            nodes.append(_conv(name, x, out, f"{name}.w", k=3, pad=1, group=c))
        elif op == "bn":
            for p in ("s", "b", "m", "v"):
                inits.append(numpy_helper.from_array(np.ones(c, np.float32), f"{name}.{p}"))
            nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{p}" for p in "sbmv"], [out], name=name))
        else:
            nodes.append(helper.make_node("Relu", [x], [out], name=name))
        x = out
    return _model(nodes, inits, [1, cin, side, side], [1, c, side, side])


def test_split_folds_batchnorm_and_sums():
    old = _chain([("a", "conv3", 8), ("a.bn", "bn", 0), ("a.relu", "relu", 0), ("b", "conv1", 8)])
    new = _chain([("a/depthwise", "dw", 0), ("a/pointwise", "conv1", 8), ("a.relu", "relu", 0), ("b", "conv1", 8)])
    d = compare(old, new)
    r = d.row("a")
    assert r.match == "split" and r.status == "changed"
    assert r.old_names == ["a", "a.bn"] and r.old_op == "Conv+BatchNormalization"
    assert r.new_names == ["a/depthwise", "a/pointwise"]
    hw = 64
    assert r.old["macs"] == hw * 8 * 4 * 9 and r.new["macs"] == hw * 4 * 9 + hw * 4 * 8
    bn_params = next(layer for layer in load_report(old)["layers"] if layer["name"] == "a.bn")["params"]
    assert r.delta("params") == (4 * 9 + 4 * 8) - (8 * 4 * 9 + bn_params)
    assert r.delta("output_bytes") == 4 * (4 * hw + 8 * hw) - 4 * (8 * hw + 8 * hw)
    assert [x.status for x in d.rows] == ["changed", "unchanged", "unchanged"]


def test_position_match_added_removed_and_order():
    old = _chain([("c1", "conv3", 8), ("r1", "relu", 0), ("c2", "conv1", 8), ("r2", "relu", 0), ("c3", "conv1", 4)])
    # every layer renamed, c2 narrowed from 8 to 6 output channels, c3 dropped
    new = _chain([("x1", "conv3", 8), ("y1", "relu", 0), ("x2", "conv1", 6), ("y2", "relu", 0)])
    d = compare(old, new)
    got = [(r.status, r.match, r.old_names, r.new_names) for r in d.rows]
    assert got == [
        ("unchanged", "position", ["c1"], ["x1"]),
        ("unchanged", "position", ["r1"], ["y1"]),
        ("changed", "position", ["c2"], ["x2"]),
        ("changed", "position", ["r2"], ["y2"]),  # Relu over 6 channels instead of 8
        ("removed", None, ["c3"], []),
    ]
    assert d.counts() == {"changed": 2, "added": 0, "removed": 1, "unchanged": 2, "renamed": 4}
    assert d.row("c2").delta("macs") == 64 * 6 * 8 - 64 * 8 * 8
    assert d.row("r2").delta("output_bytes") == 4 * 64 * (6 - 8)
    removed = d.row("c3")
    assert removed.delta("macs") == -64 * 4 * 8 and removed.pct("macs") == -100.0
    # a removed layer in the middle is listed after the row of the old layer before it
    new2 = _chain([("c1", "conv3", 8), ("r1", "relu", 0), ("r2", "relu", 0), ("c3", "conv1", 4)])
    assert [(r.status, r.name) for r in compare(old, new2).rows] == [
        ("unchanged", "c1"), ("unchanged", "r1"), ("removed", "c2"), ("unchanged", "r2"), ("unchanged", "c3")]
    # without position matching, nothing matches
    d2 = compare(old, new, positional=False)
    assert [r.status for r in d2.rows].count("added") == 4
    assert [r.status for r in d2.rows].count("removed") == 5
    added = d2.row("x1")
    assert added.delta("macs") == 64 * 8 * 4 * 9 and added.pct("macs") is None


def test_explicit_mapping_and_errors():
    old = _chain([("a", "conv3", 8), ("b", "relu", 0)])
    new = _chain([("p", "dw", 0), ("q", "conv1", 8), ("b", "relu", 0)])
    d = compare(old, new, mapping={"a": ["p", "q"]})
    r = d.row("a")
    assert r.match == "mapping" and r.new_names == ["p", "q"] and r.status == "changed"
    assert r.delta("macs") == (64 * 4 * 9 + 64 * 4 * 8) - 64 * 8 * 4 * 9
    with pytest.raises(UsageError, match="'zz'"):
        compare(old, new, mapping={"zz": ["p"]})
    with pytest.raises(UsageError, match="'nope'"):
        compare(old, new, mapping={"a": ["nope"]})
    with pytest.raises(UsageError, match="extra"):
        compare(old, new, extra={"nope": {"rank": 1}})
    assert parse_mapping(["a=p,q", "b="]) == {"a": ["p", "q"], "b": []}
    with pytest.raises(UsageError):
        parse_mapping(["novalue"])


def test_load_report_sources(tmp_path):
    m = _chain([("a", "conv3", 8)])
    onnx.save(m, tmp_path / "m.onnx")
    rep = load_report(tmp_path / "m.onnx")
    (tmp_path / "m.json").write_text(json.dumps(rep))
    (tmp_path / "saved").write_text(json.dumps(rep))  # sniffed as JSON without a suffix
    assert load_report(tmp_path / "m.json") == rep == load_report(str(tmp_path / "saved"))
    with pytest.raises(ModelError, match="no such file"):
        load_report(tmp_path / "missing.onnx")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(ModelError, match="not a sepify analyze report"):
        load_report(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a valid JSON"):
        load_report(tmp_path / "broken.json")


# --------------------------------------------------------------------------- CLI
def test_cli_diff_formats(tmp_path):
    old = _chain([("a", "conv3", 8), ("a.relu", "relu", 0)])
    new = _chain([("a/depthwise", "dw", 0), ("a/pointwise", "conv1", 8), ("a.relu", "relu", 0)])
    onnx.save(old, tmp_path / "old.onnx")
    onnx.save(new, tmp_path / "new.onnx")
    runner = CliRunner()
    # an analyze JSON on one side, a model on the other
    r = runner.invoke(main, ["analyze", str(tmp_path / "old.onnx"), "--format", "json", "-o", str(tmp_path / "old.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["diff", str(tmp_path / "old.json"), str(tmp_path / "new.onnx"), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["schema"] == "sepify.diff/1"
    row = data["rows"][0]
    assert row["match"] == "split" and row["delta"]["macs"] == (64 * 4 * 9 + 64 * 4 * 8) - 64 * 8 * 4 * 9
    assert data["totals"]["macs"]["old"] == 64 * 8 * 4 * 9
    r = runner.invoke(main, ["diff", str(tmp_path / "old.onnx"), str(tmp_path / "new.onnx")])
    assert r.exit_code == 0 and "a → a/{depthwise,pointwise}" in r.stdout and "1 unchanged" in r.stdout
    r = runner.invoke(main, ["diff", str(tmp_path / "old.onnx"), str(tmp_path / "new.onnx"), "--all",
                             "--format", "markdown", "-o", str(tmp_path / "d.md")])
    assert r.exit_code == 0
    md = (tmp_path / "d.md").read_text()
    assert md.startswith("### sepify diff") and "`a.relu`" in md
    r = runner.invoke(main, ["diff", str(tmp_path / "old.onnx"), str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "no such file" in r.stderr
    r = runner.invoke(main, ["diff", str(tmp_path / "old.onnx"), str(tmp_path / "new.onnx"), "--map", "zz=a/pointwise"])
    assert r.exit_code == 2 and "'zz'" in r.stderr
