"""The HTML reports in a real browser: headless Chromium (Debian's ``chromium``, which .ci/run
installs) driven by Playwright. Each page loads from disk with no console error and no request
beyond the file itself, the rendered DOM shows the totals of the JSON report, and the charts
hold the report's numbers. A full-page screenshot of each is kept for a person to look at in
``test-artifacts/screenshots/`` (git-ignored; ``SEPIFY_TEST_ARTIFACTS`` moves it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from conftest import ROOT
from sepify.cli import main
from test_render_viewers import viewers_model

ARTIFACTS = Path(os.environ.get("SEPIFY_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]


def cli(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(exe), "headless Chromium is needed: apt-get install -y chromium (.ci/run does it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def reports(tmp_path_factory, samples_dir):
    """name -> (HTML file, the JSON report of the same run)."""
    import make_samples

    d = tmp_path_factory.mktemp("html")
    out = {}
    viewers = d / "viewers.onnx"
    onnx.save(viewers_model(), str(viewers))
    chain = d / "chain.onnx"
    onnx.save(make_samples.conv_chain(1500), str(chain))  # 3,000 layers: more bars than the page draws
    for name, model in (("analyze", viewers), ("analyze_large", chain)):
        cli("analyze", model, "--format", "html", "-o", d / f"{name}.html")
        out[name] = (d / f"{name}.html", json.loads(cli("analyze", model, "--format", "json")))
    tiny = samples_dir / "tiny_cnn.onnx"
    cli("rewrite", tiny, "-o", d / "tiny.sep.onnx", "--verify", "--report", d / "rewrite.html")
    out["rewrite"] = (d / "rewrite.html", json.loads(cli("rewrite", tiny, "--dry-run", "--verify", "--format", "json")))
    old, new = samples_dir / "worked_example.onnx", samples_dir / "worked_example_separable.onnx"
    cli("diff", old, new, "--no-position-match", "--format", "html", "-o", d / "diff.html")
    out["diff"] = (d / "diff.html", json.loads(cli("diff", old, new, "--no-position-match", "--format", "json")))
    return out


def open_page(browser, path: Path, name: str):
    """Load ``path`` and wait for the charts; return (page, console errors, foreign requests)."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("file://") else None)
    page.goto(path.as_uri())
    page.wait_for_selector(".plotly-graph-div .main-svg")
    page.wait_for_load_state("load")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    return page, errors, requests


def total_text(page, key: str) -> str:
    return page.inner_text(f'[data-total="{key}"] .exact')


def chart_data(page, div: str) -> list[dict]:
    return page.evaluate(f"""() => document.getElementById({json.dumps(div)}).data.map(
        t => ({{name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []), text: t.text}}))""")


def test_analyze_page(browser, reports):
    path, data = reports["analyze"]
    page, errors, requests = open_page(browser, path, "analyze")
    assert errors == [] and requests == []
    t = data["totals"]
    assert total_text(page, "macs") == f"{t['macs']:,}"
    assert total_text(page, "params") == f"{t['params']:,}"
    assert total_text(page, "activation_peak_bytes") == f"{t['activation_peak_bytes']:,} B"
    assert page.inner_text('[data-total="unknown"] .value') == "1"
    # the per-layer chart: one bar per layer, in graph order, with the report's MACs
    bars = chart_data(page, "chart-layers")[0]
    assert bars["x"] == [layer["index"] for layer in data["layers"]]
    assert bars["y"] == [layer["macs"] or 0 for layer in data["layers"]]
    # switch to params with the chart's own button
    page.locator("#chart-layers .updatemenu-button").nth(2).click()
    page.wait_for_function("() => document.getElementById('chart-layers').layout.yaxis.title.text === 'params'")
    assert chart_data(page, "chart-layers")[0]["y"] == [layer["params"] for layer in data["layers"]]
    # hover on the Conv bar names it and its shapes
    conv = next(i for i, layer in enumerate(data["layers"]) if layer["op_type"] == "Conv")
    page.locator("#chart-layers .updatemenu-button").nth(0).click()
    box = page.locator("#chart-layers .bars .point").nth(conv).bounding_box()  # (plotly's drag layer is on top)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#chart-layers .hoverlayer .hovertext")
    hover = page.evaluate("() => document.querySelector('#chart-layers .hoverlayer').textContent")
    assert "Conv_1" in hover and "1x8x8x8" in hover and "18,432" in hover
    # memory: the live bytes of the report, the peak marked
    memory = chart_data(page, "chart-memory")
    assert memory[0]["y"] == [layer["live_bytes"] for layer in data["layers"]]
    assert memory[1]["y"] == [data["activation_peak"]["bytes"]]
    assert "no cost rule for my.ops.Frob" in page.inner_text("#unknown")
    page.close()


def test_large_analyze_page_is_aggregated(browser, reports):
    path, data = reports["analyze_large"]
    page, errors, requests = open_page(browser, path, "analyze_large")
    assert errors == [] and requests == []
    assert total_text(page, "macs") == f"{data['totals']['macs']:,}"
    assert "each bar is the sum of 2 consecutive layers" in page.inner_text("#aggregated-layers")
    bars = chart_data(page, "chart-layers")[0]
    assert len(bars["y"]) == 1500
    macs = [layer["macs"] for layer in data["layers"]]
    assert bars["y"] == [macs[i] + macs[i + 1] for i in range(0, 3000, 2)]
    assert sum(bars["y"]) == data["totals"]["macs"]
    page.close()


def test_rewrite_page(browser, reports):
    path, data = reports["rewrite"]
    page, errors, requests = open_page(browser, path, "rewrite")
    assert errors == [] and requests == []
    b, a = data["totals"]["before"], data["totals"]["after"]
    assert f"{b['macs']:,} → {a['macs']:,}" in total_text(page, "macs")
    assert f"{b['params']:,} → {a['params']:,}" in total_text(page, "params")
    before, after = chart_data(page, "chart-rewrite")
    assert before["x"] == [r["name"] for r in data["layers"]]
    assert before["y"] == [r["macs_before"] for r in data["layers"]]
    assert after["y"] == [r["macs_after"] for r in data["layers"]]
    table = page.inner_text("#rewritten")
    for r in data["layers"]:
        assert f"{r['rank']} / {r['max_rank']}" in table and f"{r['rel_error']:.4f}" in table
    skipped = page.inner_text("#skipped")
    assert all(s["reason"] in skipped for s in data["skipped"])
    assert "output" in page.inner_text("#verification")
    page.close()


def test_diff_page(browser, reports):
    path, data = reports["diff"]
    assert data["counts"]["added"] == 2 and data["counts"]["removed"] == 1
    page, errors, requests = open_page(browser, path, "diff")
    assert errors == [] and requests == []
    t = data["totals"]["macs"]
    assert f"{t['old']:,} → {t['new']:,}" in total_text(page, "macs")
    traces = {tr["name"]: tr for tr in chart_data(page, "chart-diff")}
    added = [r for r in data["rows"] if r["status"] == "added"]
    removed = [r for r in data["rows"] if r["status"] == "removed"]
    assert traces["added"]["x"] == [r["delta"]["macs"] for r in added]
    assert traces["added"]["text"] == ["added"] * len(added)
    assert traces["removed"]["x"] == [r["delta"]["macs"] for r in removed] == [-1_228_800]
    assert traces["removed"]["text"] == ["removed"]
    page.close()
