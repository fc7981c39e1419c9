"""``--format html``, ``netron`` and ``model-explorer`` (analyze, rewrite, diff): the files parse,
carry every layer's numbers as ``--format json`` gives them, name only nodes the model has, and
reference no network resource. (The pages in a real browser: tests/test_browser.py.)"""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sepify.cli import main


def viewers_model() -> onnx.ModelProto:
    """Names as exporters leave them: an unnamed Constant (a weight, not a layer) and Conv, two
    nodes named "r", a node named "node" (the name Model Explorer gives unnamed nodes) and a
    custom op of unknown cost."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(np.ones((1, 8, 1, 1), np.float32))),
        helper.make_node("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="r"),
        helper.make_node("Add", ["b", "bias"], ["c"], name="r"),
        helper.make_node("Relu", ["c"], ["d"], name="node"),
        helper.make_node("Frob", ["d"], ["y"], name="custom", domain="my.ops"),
    ]
    m = helper.make_model(helper.make_graph(nodes, "viewers", [x], [y], [w]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    m.ir_version = 8
    return m


CONV_MACS = 8 * 8 * 8 * 4 * 3 * 3  # output 8x8x8, each 4*3*3 multiply-adds = 18,432


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("viewers") / "viewers.onnx"
    onnx.save(viewers_model(), str(path))
    return path


def cli(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def analysis_json(model_path):
    return json.loads(cli("analyze", model_path, "--format", "json"))


class _Page(HTMLParser):
    """Every tag with its attributes, the text of <style> and <script> elements, and the
    embedded report."""

    def __init__(self):
        super().__init__()
        self.tags, self.styles, self.scripts, self.report, self._in = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = (tag, dict(attrs))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in is None:
            return
        tag, attrs = self._in
        if tag == "style":
            self.styles.append(data)
        elif tag == "script" and attrs.get("id") == "sepify-report":
            self.report = json.loads(data)
        elif tag == "script":
            self.scripts.append(data)


def parse_page(text: str) -> _Page:
    assert text.startswith("<!DOCTYPE html>")
    page = _Page()
    page.feed(text)
    page.close()
    return page


def assert_offline(page: _Page) -> None:
    """No element loads anything (scripts and styles are inline), no stylesheet imports or
    fetches a URL."""
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "img", "object", "embed", "base"), (tag, attrs)
        assert "src" not in attrs, (tag, attrs)
        if tag != "a":
            assert "href" not in attrs, (tag, attrs)
        elif attrs.get("href"):
            assert attrs["href"].startswith("#"), attrs
    for css in page.styles:
        assert "url(" not in css and "@import" not in css
    assert any("Plotly.newPlot" in s for s in page.scripts)  # the charts are drawn by the inline plotly.js


# --- HTML -------------------------------------------------------------------------------------------
def test_analyze_html_embeds_the_json_report_and_loads_nothing(model_path, analysis_json):
    page = parse_page(cli("analyze", model_path, "--format", "html"))
    assert_offline(page)
    assert page.report == analysis_json  # every layer's numbers, as --format json has them
    conv = next(layer for layer in page.report["layers"] if layer["op_type"] == "Conv")
    assert conv["macs"] == CONV_MACS
    # the unnamed Constant builds a weight (no row): 2 derived names, the Conv and the second "r"
    assert [(x["name"], x["onnx_name"]) for x in page.report["layers"] if "onnx_name" in x] == [("Conv_1", ""), ("r_3", "r")]
    assert "2 unnamed or duplicate-named node(s)" in " ".join(page.report["notes"])
    totals = {a["data-total"] for t, a in page.tags if "data-total" in a}
    assert {"macs", "flops", "params", "activation_peak_bytes", "unknown"} <= totals
    ids = {a.get("id") for _, a in page.tags}
    assert {"chart-layers", "chart-ops", "chart-memory", "heaviest", "by-op", "peak-tensors", "unknown"} <= ids


def test_html_page_text_shows_totals_and_unknown_reasons(model_path, analysis_json):
    text = cli("analyze", model_path, "--format", "html")
    t = analysis_json["totals"]
    assert f"{t['macs']:,}" in text and f"{t['params']:,}" in text
    unknown = [layer for layer in analysis_json["layers"] if layer["unknown"]]
    assert [layer["name"] for layer in unknown] == ["custom"]
    assert "no cost rule for my.ops.Frob" in text


def test_report_json_cannot_end_the_script_element(tmp_path):
    # a node name holding "</script>" stays inside the embedded JSON
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="</script><b>&")], "g", [x],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    page = parse_page(cli("analyze", path, "--format", "html"))
    assert page.report["layers"][0]["name"] == "</script><b>&"
    assert not any(t == "b" for t, _ in page.tags)


def test_rewrite_html_report_file_and_json_agree(samples_dir, tmp_path):
    out = tmp_path / "tiny.sep.onnx"
    report = tmp_path / "report.html"
    stdout = cli("rewrite", samples_dir / "tiny_cnn.onnx", "-o", out, "--verify", "--report", report)
    assert "rewritten 3 Conv(s)" in stdout  # the table on stdout, the page in the file
    page = parse_page(report.read_text())
    assert_offline(page)
    as_json = json.loads(cli("rewrite", samples_dir / "tiny_cnn.onnx", "--dry-run", "--verify", "--format", "json"))
    # the written run also knows the output file and its size; the dry run does not
    size = out.stat().st_size
    assert page.report["output"] == str(out) and page.report["after"]["model"]["file_size"] == size
    assert page.report["diff"]["totals"]["file_size"]["new"] == page.report["diff"]["new"]["file_size"] == size
    for rep in (page.report, as_json):
        rep["after"]["model"]["file_size"] = rep["after"]["model"]["path"] = None
        rep["diff"]["new"]["file_size"] = rep["diff"]["new"]["path"] = None
        rep["diff"]["totals"]["file_size"].update(new=None, delta=None, pct=None, ratio=None)
    for key in ("totals", "layers", "skipped", "verification", "before", "after", "diff"):
        assert page.report[key] == as_json[key], key
    assert {r["name"] for r in page.report["layers"]} == {"conv1", "conv2", "conv4"}
    ids = {a.get("id") for _, a in page.tags}
    assert {"chart-rewrite", "rewritten", "skipped", "verification", "chart-diff"} <= ids


def test_rewrite_html_shows_fields_it_does_not_know(samples_dir):
    from sepify.render.html import render_html

    report = json.loads(cli("rewrite", samples_dir / "tiny_cnn.onnx", "--dry-run", "--format", "json"))
    report["latency"] = {"before_ms": 1.25, "after_ms": 0.75}
    report["layers"][0]["calibration_error"] = 0.0123
    text = render_html(report)
    assert "latency" in text and "before_ms" in text and "0.75" in text
    assert "calibration_error" in text and "0.0123" in text


def test_diff_html_marks_added_and_removed(samples_dir, tmp_path):
    old = samples_dir / "worked_example.onnx"
    new = samples_dir / "worked_example_separable.onnx"
    page = parse_page(cli("diff", old, new, "--format", "html"))
    assert_offline(page)
    assert page.report == json.loads(cli("diff", old, new, "--format", "json"))
    assert any("chart-diff" == a.get("id") for _, a in page.tags)


def test_html_needs_plotly_one_line_exit_2(model_path, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["analyze", str(model_path), "--format", "html", "-o", str(out)])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("sepify: error: --format html needs plotly, a dependency of sepify that is missing "
                                "here: pip install plotly")
    assert not out.exists()


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_plotly_is_a_default_dependency_and_the_html_extra_still_exists():
    """``pip install sepify`` is enough for the README's ``--format html`` example; the ``html``
    extra is kept (empty) so ``pip install 'sepify[html]'`` still resolves."""
    project = _pyproject()["project"]
    names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    assert "plotly" in names
    assert "html" in project["optional-dependencies"]


def test_large_model_is_aggregated_and_says_so(monkeypatch):
    from sepify.render import html as h

    layers = [{"index": i, "name": f"l{i}", "op_type": "Conv", "domain": "", "macs": i, "flops": 2 * i, "params": 1,
               "buffers": 0, "output_shapes": [[1, 2]], "output_bytes": 8, "unknown": None, "note": "",
               "node_index": i, "live_bytes": 16 + (i % 7)} for i in range(95)]
    monkeypatch.setattr(h, "MAX_BARS", 10)
    monkeypatch.setattr(h, "MAX_POINTS", 20)
    text = h._layer_chart(layers)
    assert 'id="aggregated-layers"' in text and "sum of 10 consecutive layers (10 bars)" in text
    text = h._memory_chart({"layers": layers, "activation_peak": {"bytes": 22, "layer": "l6", "index": 6, "tensors": []}})
    assert 'id="aggregated-memory"' in text and "largest value of each run of 5 consecutive layers (19 points)" in text


# --- Netron -----------------------------------------------------------------------------------------
def metrics_by_target(att: dict, kind: str = "node") -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in att["metrics"]:
        if item["kind"] == kind:
            out.setdefault(item["target"], {})[item["name"]] = item["value"]
    return out


def test_netron_attachment_matches_json_and_names_real_nodes(model_path, analysis_json, tmp_path):
    out = tmp_path / "viewers.onnx.json"
    cli("analyze", model_path, "--format", "netron", "-o", out)
    att = json.loads(out.read_text())
    assert att["signature"] == "netron:attachment"
    assert set(att) == {"signature", "metadata", "metrics"}
    for item in att["metrics"] + att["metadata"]:
        assert set(item) == {"kind", "target", "name", "value"}
    names = {n.name for n in onnx.load(str(model_path)).graph.node}
    by_node = metrics_by_target(att)
    assert set(by_node) <= names  # Netron matches node items on the node's own name
    # the unnamed Conv and the second "r" have no name of their own: Netron cannot show them
    assert set(by_node) == {"r", "node", "custom"}
    layers = {layer["name"]: layer for layer in analysis_json["layers"]}
    for target, m in by_node.items():
        layer = layers[target]
        for key, label in (("flops", "FLOPs"), ("params", "params"), ("output_bytes", "output bytes"),
                           ("live_bytes", "live bytes")):
            if layer[key] is not None:
                assert m[label] == layer[key], (target, label)
        assert m["MACs"] == (layer["macs"] if layer["macs"] is not None else f"unknown: {layer['unknown']}")
    assert metrics_by_target(att, "model")[""]["MACs"] == analysis_json["totals"]["macs"] == CONV_MACS
    meta = {(i["target"], i["name"]): i["value"] for i in att["metadata"]}
    assert "Conv_1" in meta[("", "sepify.not_attached")] and "r_3" in meta[("", "sepify.not_attached")]
    assert "2 nodes are named 'r'" in meta[("r", "sepify.shared_name")] and "r_3" in meta[("r", "sepify.shared_name")]


def test_netron_rewrite_attachment_describes_the_rewritten_model(samples_dir, tmp_path):
    out = tmp_path / "tiny.sep.onnx"
    att_path = tmp_path / "tiny.sep.onnx.json"
    cli("rewrite", samples_dir / "tiny_cnn.onnx", "-o", out, "--format", "netron", "--report", att_path)
    att = json.loads(att_path.read_text())
    report = json.loads(cli("rewrite", samples_dir / "tiny_cnn.onnx", "--dry-run", "--format", "json"))
    names = {n.name for n in onnx.load(str(out)).graph.node}
    assert set(metrics_by_target(att)) <= names
    assert {i["target"] for i in att["metadata"] if i["kind"] == "node"} <= names
    meta = {(i["target"], i["name"]): i["value"] for i in att["metadata"]}
    for r in report["layers"]:
        for node in r["new_nodes"]:
            assert meta[(node, "rank")] == r["rank"]
            assert meta[(node, "max rank")] == r["max_rank"]
            assert meta[(node, "weight error")] == r["rel_error"]
            assert meta[(node, "energy kept")] == r["energy"]
            assert meta[(node, "replaces")] == r["name"]
    assert meta[("block3.dw", "not rewritten")] == "already depthwise (group == C_in)"
    after = {layer["name"]: layer for layer in report["after"]["layers"]}
    for target, m in metrics_by_target(att).items():
        assert m["MACs"] == after[target]["macs"]


# --- Model Explorer -------------------------------------------------------------------------------
def test_model_explorer_node_data_uses_the_viewers_node_ids(model_path, analysis_json, tmp_path):
    out = tmp_path / "macs.json"
    cli("analyze", model_path, "--format", "model-explorer", "-o", out)
    data = json.loads(out.read_text())
    assert set(data) == {"name", "results", "gradient"}
    assert [g["stop"] for g in data["gradient"]][0] == 0 and data["gradient"][-1]["stop"] == 1
    # Model Explorer's ONNX adapter (onnx_ir NameFixPass) names the nodes, in order:
    # Constant "node", Conv "node_1", "r", the second "r" -> "r_1", "node" (taken) -> "node_2", "custom"
    # (worked out by hand from model_explorer_onnx 0.4.2 and onnx_ir's naming pass)
    assert data["results"] == {"node_1": {"value": CONV_MACS}, "r": {"value": 0}, "r_1": {"value": 0},
                               "node_2": {"value": 0}}  # "custom": unknown MACs, left out
    params = json.loads(cli("analyze", model_path, "--format", "model-explorer", "--metric", "output_bytes"))
    by_index = {layer["node_index"]: layer for layer in analysis_json["layers"]}
    ids = ["node", "node_1", "r", "r_1", "node_2", "custom"]
    assert params["results"] == {ids[i]: {"value": by_index[i]["output_bytes"]} for i in by_index
                                 if by_index[i]["output_bytes"] is not None}


def test_model_explorer_rewrite_keys_are_rewritten_model_nodes(samples_dir, tmp_path):
    out = tmp_path / "tiny.sep.onnx"
    me = tmp_path / "macs.json"
    cli("rewrite", samples_dir / "tiny_cnn.onnx", "-o", out, "--format", "model-explorer", "--report", me)
    data = json.loads(me.read_text())
    names = {n.name for n in onnx.load(str(out)).graph.node}
    assert set(data["results"]) <= names and "conv1/depthwise" in data["results"]
    report = json.loads(cli("rewrite", samples_dir / "tiny_cnn.onnx", "--dry-run", "--format", "json"))
    assert data["results"] == {layer["name"]: {"value": layer["macs"]} for layer in report["after"]["layers"]}


def test_model_explorer_names_are_onnx_irs(tmp_path):
    """The oracle: Model Explorer's ONNX adapter names nodes with onnx_ir's NameFixPass (its
    first pass); run that pass itself on a graph of unnamed nodes, duplicates, names that the
    generated names collide with, and an If whose branches hold unnamed nodes."""
    import onnx_ir as ir
    from onnx_ir.passes.common import NameFixPass

    from sepify.render.model_explorer import viewer_names

    def branch(tag: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{tag}_o", TensorProto.FLOAT, [2])
        return helper.make_graph([helper.make_node("Relu", ["x"], [f"{tag}_t"]),
                                  helper.make_node("Neg", [f"{tag}_t"], [f"{tag}_o"], name="node")], tag, [], [out])

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    names = ["", "a", "a", "node_1", "", "a_1", "", "node"]
    nodes = [helper.make_node("If", ["cond"], ["t0"], then_branch=branch("then"), else_branch=branch("else"))]
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=name))
    m = helper.make_model(helper.make_graph(nodes, "g", [x, cond],
                                            [helper.make_tensor_value_info(f"t{len(names)}", TensorProto.FLOAT, [2])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(m)
    NameFixPass()(model)
    assert viewer_names(m.graph) == [node.name for node in model.graph]
