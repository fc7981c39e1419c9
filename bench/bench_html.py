"""Benchmark: the viewer formats on a large model.

Builds a Conv+Relu chain (default 50,000 nodes), analyzes it once, then times rendering the
report as JSON (the reference), HTML, a Netron attachment and Model Explorer node data, and
gives each file's size. With ``--browser`` (needs Playwright and Debian's chromium), also loads
the HTML page in headless Chromium and times until the charts are drawn, and the switch of the
per-layer chart from MACs to params. Figures are printed; nothing is asserted.

    python bench/bench_html.py [--nodes 50000] [--repeat 3] [--browser]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(ROOT))


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--browser", action="store_true")
    args = ap.parse_args()

    import onnx

    import make_samples
    import sepify
    from sepify.render.common import dumps_json
    from sepify.render.html import render_html
    from sepify.render.model_explorer import render_model_explorer
    from sepify.render.netron import render_netron

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.onnx"
        onnx.save(make_samples.conv_chain(args.nodes // 2), str(path))
        t = time.perf_counter()
        data = sepify.analyze(str(path)).to_dict()
        print(f"model: {args.nodes:,}-node Conv+Relu chain; analyze + to_dict {time.perf_counter() - t:.2f} s")
        render_html(data)  # warm-up: imports plotly
        for name, fn in (("json", lambda: dumps_json(data)), ("html", lambda: render_html(data)),
                         ("netron", lambda: render_netron(data)), ("model-explorer", lambda: render_model_explorer(data))):
            secs, text = best_of(fn, args.repeat)
            print(f"  {name:15s} render {secs:6.2f} s   {len(text.encode()) / 1e6:6.1f} MB")
            if name == "html":
                html_path = Path(tmp) / "report.html"
                html_path.write_text(text)
        if args.browser:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                b = p.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
                for _ in range(args.repeat):
                    page = b.new_page(viewport={"width": 1300, "height": 900})
                    t = time.perf_counter()
                    page.goto(html_path.as_uri())
                    page.wait_for_selector("#chart-memory .main-svg")
                    loaded = time.perf_counter() - t
                    t = time.perf_counter()
                    page.locator("#chart-layers .updatemenu-button").nth(2).click()
                    page.wait_for_function(
                        "() => document.getElementById('chart-layers').layout.yaxis.title.text === 'params'")
                    switched = time.perf_counter() - t
                    print(f"  browser: page loaded and charts drawn {loaded:.2f} s; MACs -> params {switched:.2f} s")
                    page.close()
                b.close()


if __name__ == "__main__":
    main()
