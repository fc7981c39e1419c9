"""Tests for ``sepify check`` (sepify.check, sepify.render.check and the CLI command).

Models are built here with onnx.helper: ``net(c)`` is a 3x3 Conv 8->c (pads 1, no bias) on a
1x8x16x16 input followed by a Relu, so MACs = 16·16·c·8·9 = 18,432·c and params = 72·c exactly;
``net(103)`` is exactly 3% heavier than ``net(100)`` in both. Expectations are arithmetic on
those shapes, never sepify's own output.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sepify.check import check, evaluate, find_config
from sepify.check.config import parse_growth
from sepify.render.check import github_annotations, junit_xml, render_check
from sepify.cli import main
from sepify.errors import UsageError


def net(c: int, name: str = "conv") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((c, 8, 3, 3), 0.01, np.float32), f"{name}.weight")
    nodes = [helper.make_node("Conv", ["input", f"{name}.weight"], ["conv_out"], name=name, kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv_out"], ["output"], name="relu")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, c, 16, 16])],
                              initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def macs(c: int) -> int:
    return 16 * 16 * c * 8 * 9


def params(c: int) -> int:
    return c * 8 * 9


def unknown_op_model() -> onnx.ModelProto:
    n = helper.make_node("Foo", ["input"], ["output"], name="foo", domain="com.example")
    g = helper.make_graph([n], "u", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                             ir_version=8)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A temp folder as the current directory, no GitHub environment, with models/small.onnx (c=100),
    models/big.onnx (c=103) and bad.onnx (garbage)."""
    monkeypatch.chdir(tmp_path)
    for var in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_WORKSPACE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "models").mkdir()
    onnx.save(net(100), tmp_path / "models" / "small.onnx")
    onnx.save(net(103), tmp_path / "models" / "big.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01 this is not a model \xff" * 10)
    return tmp_path


def run(*args, env=None):
    return CliRunner().invoke(main, ["check", *args], env=env)


# --------------------------------------------------------------------------- exit codes
def test_exit_codes(work):
    small = "models/small.onnx"
    assert macs(100) == 1_843_200 and params(100) == 7_200
    r = run(small, "--max-macs", "1.9M", "--max-params", "7.2K")  # params exactly at the limit: passes
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout
    r = run(small, "--max-macs", "1.8M")
    assert r.exit_code == 1
    assert "FAIL" in r.stdout and "exceeds max-macs" in r.stdout
    r = run("bad.onnx", "--max-macs", "1.8M")
    assert r.exit_code == 2 and r.stderr.count("not an ONNX model") == 1 and "not an ONNX model" not in r.stdout  # once
    r = run("missing.onnx")
    assert r.exit_code == 2 and "no such file" in r.stderr
    r = run(small, "--max-macs", "lots")
    assert r.exit_code == 2 and "invalid max-macs" in r.stderr
    (work / "pyproject.toml").write_text('[tool.sepify]\nmax-macs = "1M"\nmax-mac = "2M"\n')
    r = run(small)
    assert r.exit_code == 2 and "'max-mac'" in r.stderr and "did you mean 'max-macs'" in r.stderr
    r = run(small, "--no-config", "--max-macs", "2M")
    assert r.exit_code == 0


def test_all_models_checked_and_error_wins(work):
    r = run("models/small.onnx", "bad.onnx", "models/big.onnx", "--max-macs", "1.85M", "--format", "json")
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    assert [m["status"] for m in data["models"]] == ["pass", "error", "fail"]
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("sepify: error: ") and "bad.onnx" in errors[0]
    assert data["summary"] == {"models": 3, "passed": 1, "failed": 1, "errors": 1, "budgets": 4, "budgets_failed": 1}
    big = data["models"][2]["budgets"][0]
    assert (big["name"], big["value"], big["limit"], big["margin"]) == ("max-macs", macs(103), 1_850_000,
                                                                       1_850_000 - macs(103))
    r = run("models/small.onnx", "models/big.onnx", "--max-macs", "1.85M")
    assert r.exit_code == 1 and "1 over budget" in r.stdout


def test_every_quantity(work):
    onnx.save(unknown_op_model(), work / "unknown.onnx")
    size = os.path.getsize(work / "models" / "small.onnx")
    # activation peak: conv output (100x16x16 fp32) and relu output are live together
    peak = 2 * 100 * 16 * 16 * 4
    assert peak == 200 * 1024
    flops = 2 * macs(100) + 100 * 16 * 16  # a multiply-add is 2 FLOPs; Relu 1 FLOP per output element
    ok = ["--max-flops", str(flops), "--max-layer-macs", str(macs(100)),
          "--max-activation-peak", "200KiB", "--max-file-size", str(size)]
    r = run("models/small.onnx", *ok, "--format", "json")
    assert r.exit_code == 0, r.stdout
    budgets = {b["quantity"]: b for b in json.loads(r.stdout)["models"][0]["budgets"]}
    assert list(budgets) == ["flops", "layer_macs", "activation_peak", "file_size", "unknown"]
    assert budgets["activation_peak"]["value"] == peak and budgets["file_size"]["value"] == size
    assert budgets["layer_macs"]["detail"] == "heaviest layer: conv"
    assert all(b["margin"] == 0 for q, b in budgets.items())  # every budget exactly at its limit
    for flag, value in (("--max-flops", flops - 1), ("--max-layer-macs", macs(100) - 1),
                        ("--max-activation-peak", "199KiB"), ("--max-file-size", size - 1)):
        r = run("models/small.onnx", flag, str(value))
        assert r.exit_code == 1, (flag, r.stdout)
    # unknown nodes: none allowed by default, a gate must not pass what it cannot measure
    r = run("unknown.onnx")
    assert r.exit_code == 1 and "unknown nodes" in r.stdout and "foo" in r.stdout
    assert run("unknown.onnx", "--max-unknown", "1").exit_code == 0


# --------------------------------------------------------------------------- outputs
def test_junit(work):
    r = run("models/small.onnx", "models/big.onnx", "bad.onnx", "--max-macs", "1.85M", "--max-params", "7.3K",
            "--junit", "report.xml")
    assert r.exit_code == 2
    root = ET.parse(work / "report.xml").getroot()
    assert root.tag == "testsuites"
    cases = root.findall(".//testcase")
    # 2 models x 3 budgets (macs, params, unknown) + 1 testcase for the broken model
    assert len(cases) == 7 and root.get("tests") == "7"
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 2 and root.get("failures") == "2"  # big: macs (1,898,496) and params (7,416)
    assert {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None} == {
        ("models/big.onnx", "max-macs"), ("models/big.onnx", "max-params")}
    errors = root.findall(".//testcase/error")
    assert len(errors) == 1 and root.get("errors") == "1" and "bad.onnx" in errors[0].get("message")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["models/small.onnx", "models/big.onnx", "bad.onnx"]
    assert [s.get("failures") for s in suites] == ["0", "2", "0"]


def test_json_round_trip(work):
    r = run("models/small.onnx", "models/big.onnx", "--max-macs", "1.85M", "--format", "json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert json.dumps(data, indent=2) + "\n" == r.stdout
    assert data["schema"] == "sepify.check/1" and data["exit_code"] == 1 and data["passed"] is False
    api = check(["models/small.onnx", "models/big.onnx"], limits={"macs": "1.85M"}).to_dict()
    for d in (data, api):
        for m in d["models"]:
            m.pop("seconds")
    assert api == data
    # a saved report renders like a fresh one
    assert render_check(data, "markdown") == render_check(api, "markdown")
    assert junit_xml(data) == junit_xml(api)


def test_github_annotations_only_under_github_actions(work):
    args = ["models/small.onnx", "models/big.onnx", "bad.onnx", "--max-macs", "1.85M"]
    r = run(*args)
    assert "::error" not in r.stdout and "::error" not in r.stderr
    assert run(*args, env={"GITHUB_ACTIONS": "false"}).stdout.count("::error") == 0
    summary = work / "summary.md"
    summary.write_text("# earlier step\n")
    r = run(*args, env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert r.exit_code == 2
    lines = [line for line in r.stdout.splitlines() if line.startswith("::error")]
    assert len(lines) == 2
    assert lines[0].startswith("::error file=models/big.onnx,title=sepify check%3A max-macs exceeded::MACs ")
    assert lines[1].startswith("::error file=bad.onnx,")
    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not overwritten
    assert "#### `models/big.onnx` — FAIL" in text and "#### `models/small.onnx` — PASS" in text
    assert "❌ **FAIL**" in text and "`bad.onnx` — ERROR" in text
    # with JSON on stdout, annotations go to stderr so the JSON stays parseable
    r = run(*args, "--format", "json", env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": None})
    json.loads(r.stdout)
    assert r.stderr.count("::error") == 2
    # escaping of the message and properties
    data = check(["models/big.onnx"], limits={"macs": 1}).to_dict()
    data["models"][0]["path"] = "a,b:c.onnx"
    data["models"][0]["budgets"][0]["message"] = "50% over\nline 2"
    (line,) = github_annotations(data, env={})
    assert line.startswith("::error file=a%2Cb%3Ac.onnx,") and line.endswith("::50%25 over%0Aline 2")


# --------------------------------------------------------------------------- config
CONFIG = """
[tool.sepify]
max-unknown = 0

[[tool.sepify.models]]
path = "models/small*.onnx"
max-macs = "1.9M"

[[tool.sepify.models]]
path = ["models/big*.onnx"]
max-macs = "1.85M"
max-params = "8K"
"""


def test_config_discovery_from_nested_dir_and_globs(work, monkeypatch):
    (work / "pyproject.toml").write_text(CONFIG)
    nested = work / "a" / "b" / "c"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert find_config() == work / "pyproject.toml"
    r = run("--format", "json")  # no models: every file matched by the sections' paths
    assert r.exit_code == 1, r.output
    data = json.loads(r.stdout)
    assert data["config"] == f"{work / 'pyproject.toml'} [tool.sepify]"
    got = {m["path"]: (m["status"], [(b["name"], b["limit"]) for b in m["budgets"]]) for m in data["models"]}
    assert got == {
        os.path.join("..", "..", "..", "models", "small.onnx"): ("pass", [("max-macs", 1_900_000), ("max-unknown", 0)]),
        os.path.join("..", "..", "..", "models", "big.onnx"): ("fail", [("max-macs", 1_850_000), ("max-params", 8_000),
                                                                      ("max-unknown", 0)]),
    }
    # a model given on the command line gets the budgets of the sections matching it
    r = run("../../../models/small.onnx", "--format", "json")
    assert r.exit_code == 0
    assert [b["name"] for b in json.loads(r.stdout)["models"][0]["budgets"]] == ["max-macs", "max-unknown"]
    # a model no section matches: only max-unknown = 0, and a note says so
    onnx.save(net(4), work / "other.onnx")
    r = run("../../../other.onnx", "--format", "json")
    m = json.loads(r.stdout)["models"][0]
    assert r.exit_code == 0 and [b["name"] for b in m["budgets"]] == ["max-unknown"]
    assert any("no budget configured" in n for n in m["notes"])


def test_cli_overrides_config(work):
    (work / "pyproject.toml").write_text(CONFIG)
    assert run("models/big.onnx").exit_code == 1
    assert run("models/big.onnx", "--max-macs", "1.9M").exit_code == 0
    r = run("models/big.onnx", "--max-macs", "none", "--max-params", "7K", "--format", "json")
    assert r.exit_code == 1
    m = json.loads(r.stdout)["models"][0]
    assert [(b["name"], b["limit"], b["passed"]) for b in m["budgets"]] == [
        ("max-params", 7_000, False), ("max-unknown", 0, True)]
    assert m["sources"][-1] == "command line"


def test_config_file_option_and_formats(work, monkeypatch):
    # sepify.toml with top-level keys; relative paths are relative to the config's folder
    cfg_dir = work / "conf"
    cfg_dir.mkdir()
    (cfg_dir / "sepify.toml").write_text(
        'max-params = "7.3K"\n[[models]]\npath = "../models/*.onnx"\ninput-shape = {input = "1x8x16x16"}\n'
        "dims = {}\n")
    r = run("--config", "conf/sepify.toml", "--format", "json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert {m["path"]: m["status"] for m in data["models"]} == {
        os.path.join("models", "big.onnx"): "fail", os.path.join("models", "small.onnx"): "pass"}
    # the same keys under [tool.sepify] in a file of another name
    (cfg_dir / "other.toml").write_text('[tool.sepify]\nmax-params = "7.3K"\n')
    assert run("models/big.onnx", "--config", "conf/other.toml").exit_code == 1
    assert run("models/small.onnx", "--config", "conf/other.toml").exit_code == 0
    # errors name the problem
    (cfg_dir / "bad.toml").write_text('[[models]]\npath = "*.onnx"\nmax_macs = "1M"\nflops = 3\n')
    r = run("--config", "conf/bad.toml")
    assert r.exit_code == 2 and "'flops'" in r.stderr and "models #1" in r.stderr
    (cfg_dir / "broken.toml").write_text("max-macs = \n")
    r = run("models/small.onnx", "--config", "conf/broken.toml")
    assert r.exit_code == 2 and "invalid TOML" in r.stderr
    r = run("models/small.onnx", "--config", "conf/missing.toml")
    assert r.exit_code == 2 and "not found" in r.stderr
    (cfg_dir / "nomatch.toml").write_text('[[models]]\npath = "nothing/*.onnx"\nmax-macs = 1\n')
    r = run("--config", "conf/nomatch.toml")
    assert r.exit_code == 2 and "matches no file" in r.stderr
    # input-shape from the config applies (a wrong input name is a model error, exit 2)
    (cfg_dir / "shape.toml").write_text('[[models]]\npath = "../models/small.onnx"\ninput-shape = {images = "1x8x16x16"}\n')
    r = run("--config", "conf/shape.toml")
    assert r.exit_code == 2 and "input-shape.images in " in r.stderr and "'images' is not a graph input" in r.stderr
    # markdown and table to a file
    r = run("models/small.onnx", "--max-macs", "2M", "--format", "markdown", "-o", "check.md")
    assert r.exit_code == 0 and (work / "check.md").read_text().startswith("### ✅ sepify check: PASS")
    r = run("models/small.onnx", "--max-macs", "2M", "-o", "check.txt")
    assert r.exit_code == 0 and "quantity" in (work / "check.txt").read_text()


def test_config_values_parsed():
    assert parse_growth("2%", "g") == {"*": 0.02}
    assert parse_growth({"macs": "2%", "file-size": 0.05}, "g") == {"macs": 0.02, "file_size": 0.05}
    assert parse_growth(["1%", "params=3%"], "g") == {"*": 0.01, "params": 0.03}
    with pytest.raises(UsageError, match="'unknown'"):
        parse_growth({"unknown": "1%"}, "g")
    with pytest.raises(UsageError, match="'bogus'"):
        parse_growth(["bogus=1%"], "g")


# --------------------------------------------------------------------------- baseline growth
def test_growth_row_limit_uses_the_number_format(work):
    """A baseline and a value that look alike at one decimal need two; the limit beside them does
    not (it printed 19.41M, as in the 711.40M of a real check)."""
    onnx.save(net(1003), work / "models" / "base.onnx")
    onnx.save(net(1004), work / "models" / "new.onnx")
    base, value = macs(1003), macs(1004)
    assert (base, value) == (18_487_296, 18_505_728)  # both 18.5M at one decimal
    limit = base * 1.05  # 19,411,660.8: 19.4M
    r = run("models/new.onnx", "--baseline", "models/base.onnx", "--max-growth", "macs=5%", "--format", "json")
    assert r.exit_code == 0, r.output
    growth = next(b for b in json.loads(r.stdout)["models"][0]["budgets"] if b["name"] == "max-growth:macs")
    assert growth["limit"] == pytest.approx(limit)
    from sepify.render.check import budget_cells

    label, lim, val, margin, result = budget_cells(growth)
    assert lim == "19.4M (+5.0% of 18.49M)"  # the baseline with the digits that tell it from the value
    assert val == "18.51M (+0.1%)"
    assert margin == "+905.9K (+4.7%)"  # 19,411,660.8 - 18,505,728 = 905,932.8; / limit
    table = run("models/new.onnx", "--baseline", "models/base.onnx", "--max-growth", "macs=5%").stdout
    assert "19.4M (+5.0% of 18.49M)" in table and "19.41M" not in table


def test_baseline_growth(work):
    r = CliRunner().invoke(main, ["analyze", "models/small.onnx", "--format", "json", "-o", "base.json"])
    assert r.exit_code == 0
    assert run("models/big.onnx", "--baseline", "base.json", "--max-growth", "2%").exit_code == 1
    r = run("models/big.onnx", "--baseline", "base.json", "--max-growth", "5%", "--format", "json")
    assert r.exit_code == 0
    budgets = json.loads(r.stdout)["models"][0]["budgets"]
    growth = {b["quantity"]: b for b in budgets if b["kind"] == "growth"}
    assert set(growth) == {"macs", "params"}  # the default set with no absolute budget
    assert growth["macs"]["growth"] == pytest.approx((macs(103) - macs(100)) / macs(100)) == pytest.approx(0.03)
    assert growth["macs"]["baseline"] == macs(100)
    assert growth["params"]["limit"] == pytest.approx(params(100) * 1.05)
    # a model file as the baseline works the same; a 3% growth passes 3% exactly
    assert run("models/big.onnx", "--baseline", "models/small.onnx", "--max-growth", "2%").exit_code == 1
    assert run("models/big.onnx", "--baseline", "models/small.onnx", "--max-growth", "3%").exit_code == 0
    # per-quantity growth, and growth on a budgeted quantity (file size) only when named/budgeted
    r = run("models/big.onnx", "--baseline", "base.json", "--max-growth", "5%", "--max-growth", "params=2%")
    assert r.exit_code == 1 and "params grew +3.0%" in r.stdout
    r = run("models/big.onnx", "--baseline", "base.json", "--max-growth", "5%", "--max-file-size", "1MB",
            "--format", "json")
    names = [b["name"] for b in json.loads(r.stdout)["models"][0]["budgets"]]
    assert names == ["max-file-size", "max-unknown", "max-growth:macs", "max-growth:params", "max-growth:file-size"]
    # a baseline without --max-growth allows no growth; a smaller model passes it
    assert run("models/big.onnx", "--baseline", "base.json").exit_code == 1
    assert run("models/small.onnx", "--baseline", "models/big.onnx").exit_code == 0
    # errors: growth without a baseline, a missing baseline, baseline placeholders from the config
    r = run("models/big.onnx", "--max-growth", "2%")
    assert r.exit_code == 2 and "needs a baseline" in r.stderr
    r = run("models/big.onnx", "--baseline", "nope.json")
    assert r.exit_code == 2 and "no such file" in r.stderr
    (work / "baselines").mkdir()
    for c, stem in ((100, "big"), (103, "small")):
        assert CliRunner().invoke(main, ["analyze", "models/" + ("small" if c == 100 else "big") + ".onnx",
                                         "--format", "json", "-o", f"baselines/{stem}.json"]).exit_code == 0
    (work / "pyproject.toml").write_text('[tool.sepify]\nbaseline = "baselines/{stem}.json"\nmax-growth = "2%"\n'
                                         '[[tool.sepify.models]]\npath = "models/*.onnx"\n')
    r = run("--format", "json")  # big vs small's numbers: +3% fails; small vs big's: shrinks, passes
    data = json.loads(r.stdout)
    assert r.exit_code == 1
    assert {m["path"]: m["status"] for m in data["models"]} == {
        os.path.join("models", "big.onnx"): "fail", os.path.join("models", "small.onnx"): "pass"}
    assert data["models"][0]["baseline"] == os.path.join("baselines", "big.json")


def test_evaluate_api():
    from sepify.cost.analysis import analyze

    rep = analyze(net(103)).to_dict()
    base = analyze(net(100)).to_dict()
    res = evaluate(rep, {"macs": macs(103)}, {"*": 0.03}, base)
    assert [(r.name, r.passed) for r in res] == [("max-macs", True), ("max-unknown", True),
                                                ("max-growth:macs", True), ("max-growth:params", True)]
    res = evaluate(rep, {}, {"macs": 0.0299}, base)
    assert [(r.name, r.passed) for r in res] == [("max-unknown", True), ("max-growth:macs", False)]
    assert res[1].margin == pytest.approx(macs(100) * 1.0299 - macs(103))
    with pytest.raises(UsageError, match="needs a baseline"):
        evaluate(rep, {}, {"*": 0.02}, None)
    with pytest.raises(UsageError, match="'watts'"):
        evaluate(rep, {"watts": 3})
