"""``--objective latency`` / ``--target-speedup`` / ``--form auto`` (sepify.rewrite.measure).

Choices are tested with an injected timer (deterministic fake timings keyed by what is timed), never
by real timing; the real onnxruntime timer is only run end to end to check the report's structure.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from sepify.cli import main
from sepify.errors import BudgetError, UsageError
from sepify.rewrite import measure
from sepify.rewrite.measure import Timing
from sepify.rewrite.pipeline import rewrite
from test_rewrite import rel_l2, run

OPSET = 17


def two_conv_model(seed: int = 0) -> onnx.ModelProto:
    """x (1, 8, 12, 12) -> conv "a" 8->16 3x3 -> Relu -> conv "b" 16->8 3x3 -> y."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "Wa"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "Ba"),
             numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "Wb")]
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["h"], name="a", pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Conv", ["hr", "Wb"], ["y"], name="b", pads=[1] * 4)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


class FakeTimer:
    """Seconds per variant from ``layer(spec, what)`` / ``model(what)``; records what it was asked."""

    def __init__(self, layer, model=lambda what: 1.0):
        self.layer, self.model, self.calls, self.names = layer, model, [], {}

    def __call__(self, variants, rounds=None):
        call = [(v.kind, v.what) for v in variants]
        self.calls.append(call)
        if variants[0].spec is not None:
            self.names[id(call)] = name_of(variants[0].spec)
        out = []
        for v in variants:
            t = self.layer(v.spec, v.what) if v.kind == "layer" else self.model(v.what)
            out.append(Timing.of([t] * 3))
        return out


def name_of(spec) -> str:  # which layer of two_conv_model a spec is
    return "a" if spec.weight_shape[0] == 16 else "b"


def test_a_pair_measured_slower_than_the_original_is_not_rewritten():
    # a: split at rank 2 is faster than the original (0.5 vs 1.0), native and tiled slower;
    # b: every form slower than the original
    def layer(spec, what):
        if what == "original":
            return 1.0
        o, r, form = what
        if name_of(spec) == "a":
            return {"split": 0.5, "native": 1.5, "tiled": 1.2}[form]
        return 1.1

    timer = FakeTimer(layer)
    result = rewrite(two_conv_model(), rank=2, objective="latency", timer=timer)
    assert [(l.name, l.orientation, l.rank, l.form) for l in result.layers] == [("a", "dw-first", 2, "split")]
    skipped = {s.name: s.reason for s in result.skipped}
    assert "measured not faster" in skipped["b"]
    # every form of the criterion's rank was timed against the original, for both layers
    layer_calls = [c for c in timer.calls if c[0][0] == "layer"]
    assert sorted(c[0][1] for c in layer_calls) == ["original", "original"]
    assert all(sorted(w[2] for _, w in c[1:]) == ["native", "split", "tiled"] for c in layer_calls)
    assert result.layers[0].latency["before_s"] == 1.0 and result.layers[0].latency["after_s"] == 0.5
    # the graph is the split form and computes what native computes
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") == 4 and ops.count("Concat") == 1  # a: 2 dw + concat + pw; b: the original
    native = rewrite(two_conv_model(), rank=2, include=["^a$"])
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)
    assert rel_l2(run(native.model, {"x": x})[0], run(result.model, {"x": x})[0]) < 1e-5
    lat = result.report["latency"]
    assert lat["end_to_end"]["speedup"] == pytest.approx(1.0)  # the fake model timer: 1 s before and after
    assert [row["name"] for row in lat["layers"]] == ["a", "b"] and lat["layers"][1]["chosen"] is None


def test_a_gain_below_the_noise_margin_is_not_kept():
    def layer(spec, what):
        return 1.0 if what == "original" else 1.0 - measure.MIN_GAIN / 2

    result = rewrite(two_conv_model(), rank=1, objective="latency", timer=FakeTimer(layer))
    assert result.layers == []
    assert all("measured not faster" in s.reason for s in result.skipped)


def test_form_auto_under_the_macs_objective_only_picks_the_form():
    # objective macs: the rank is the criterion's; the fastest form is emitted even when slower
    # than the original (MACs decide whether to rewrite)
    def layer(spec, what):
        return 1.0 if what == "original" else {"native": 3.0, "split": 2.5, "tiled": 2.0}[what[2]]

    result = rewrite(two_conv_model(), rank=2, form="auto", timer=FakeTimer(layer))
    assert [(l.name, l.form) for l in result.layers] == [("a", "tiled"), ("b", "tiled")]


def _weight_error(w: np.ndarray, rank: int) -> float:
    """dw-first dropped energy at ``rank``: per input channel, the SVD tail of W[:, m] (N x K)."""
    return sum(float(np.sum(np.linalg.svd(w[:, m].reshape(w.shape[0], -1).astype(np.float64),
                                          compute_uv=False)[rank:] ** 2)) for m in range(w.shape[1]))


def test_target_speedup_allocates_measured_seconds_optimally():
    # whole model 2.0 s; each original conv 1.0 s; a pair at rank r costs 0.1 + 0.2 r s. Target
    # 1.6x: save 0.75 s. Ranks timed: while cheaper in MACs (a 8->16: 200 r < 1152 MACs per
    # position, r <= 5; b 16->8: 272 r < 1152, r <= 4) and until one is not faster (a, r = 5: 1.1 s)
    def layer(spec, what):
        return 1.0 if what == "original" else 0.1 + 0.2 * what[1]

    timer = FakeTimer(layer, model=lambda what: 2.0)
    model = two_conv_model()
    result = rewrite(model, target_speedup=1.6, timer=timer)
    ws = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # brute force over keep / the faster ranks 1..4 per layer (independent of the allocator)
    opts = [(None, 1.0)] + [(r, 0.1 + 0.2 * r) for r in range(1, 5)]
    best = None
    for (ra, ca), (rb, cb) in itertools.product(opts, opts):
        if ca + cb > 2.0 - 2.0 * (1 - 1 / 1.6) + 1e-12:
            continue
        err = (_weight_error(ws["Wa"], ra) if ra else 0.0) + (_weight_error(ws["Wb"], rb) if rb else 0.0)
        if best is None or err < best[0] - 1e-9:
            best = (err, ra, rb)
    got = {l.name: l.rank for l in result.layers}
    assert (got.get("a"), got.get("b")) == best[1:]
    lat = result.report["latency"]
    assert lat["target_speedup"] == 1.6 and lat["model_before_s"] == 2.0
    assert lat["predicted_s"] <= 2.0 / 1.6 + 1e-9
    # the fake whole-model timer says 2.0 s before and after: the target is reported as missed
    assert lat["target_met"] is False and any("below --target-speedup 1.6" in n for n in result.report["notes"])
    timed = {}
    for call in timer.calls:
        for kind, what in call:
            if kind == "layer" and what != "original":
                timed.setdefault(call_layer(call, timer), set()).add(what[1])
    assert timed == {"a": {1, 2, 3, 4, 5}, "b": {1, 2, 3, 4}}


def call_layer(call, timer):
    return timer.names[id(call)]


def test_unreachable_target_speedup_is_a_budget_error():
    def layer(spec, what):
        return 1.0 if what == "original" else 0.9  # at best 10% faster per conv

    with pytest.raises(BudgetError, match="--target-speedup 3 cannot be reached"):
        rewrite(two_conv_model(), target_speedup=3, timer=FakeTimer(layer, model=lambda w: 2.0))


def test_latency_options_are_validated():
    with pytest.raises(UsageError, match="objective"):
        rewrite(two_conv_model(), objective="speed")
    with pytest.raises(UsageError, match="needs --objective latency"):
        rewrite(two_conv_model(), objective="macs", target_speedup=1.5)
    with pytest.raises(UsageError, match="choose one rank criterion"):
        rewrite(two_conv_model(), rank=2, target_speedup=1.5)
    with pytest.raises(UsageError, match="--threads"):
        rewrite(two_conv_model(), objective="latency", threads=0)
    with pytest.raises(UsageError, match="--target-speedup"):
        rewrite(two_conv_model(), target_speedup=-1.0)


def test_unbound_batch_is_timed_at_1_and_said_so():
    model = two_conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    timer = FakeTimer(lambda s, w: 1.0 if w == "original" else 0.5)
    result = rewrite(model, objective="latency", timer=timer)
    assert [l.name for l in result.layers] == ["a", "b"]
    specs = [v for c in timer.calls for v in c]
    assert {row["shape"] for row in result.report["latency"]["layers"]} == {"8->16 3x3 g1 @ 12x12", "16->8 3x3 g1 @ 12x12"}
    assert any("unbound dimension(s) batch at 1" in n for n in result.report["notes"])
    assert specs


def test_objective_latency_end_to_end_with_onnxruntime(tmp_path):
    # real timings: only the structure and plausibility of the report are checked
    src = tmp_path / "two.onnx"
    src.write_bytes(two_conv_model().SerializeToString())
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(main, ["rewrite", str(src), "-o", str(out), "--objective", "latency", "--rank", "2",
                                  "--threads", "1", "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    lat = rep["latency"]
    assert lat["threads"] == 1 and lat["runtime"].startswith("onnxruntime ") and lat["cpu"]
    assert lat["provider"] == "CPUExecutionProvider" and lat["graph_optimization"] == "ORT_ENABLE_ALL"
    assert [row["name"] for row in lat["layers"]] == ["a", "b"]
    for row in lat["layers"]:
        assert row["before_s"] > 0 and set(row["forms_s"]) <= {"native", "split", "tiled"}
    e2e = lat["end_to_end"]
    for side in ("before", "after"):
        t = e2e[side]
        assert 0 < t["q1_s"] <= t["median_s"] <= t["q3_s"] and t["rounds"] >= 5
    assert e2e["speedup"] > 0
    rewritten = {layer["name"] for layer in rep["layers"]}
    kept = {s["name"] for s in rep["skipped"]}
    assert rewritten | kept == {"a", "b"} and not rewritten & kept
    for layer in rep["layers"]:  # a rewritten layer was measured faster than its original
        assert layer["latency"]["after_s"] < layer["latency"]["before_s"]
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)
    assert run(m, {"x": x})[0].shape == (1, 8, 12, 12)
    # the table shows the latency lines
    r = CliRunner().invoke(main, ["rewrite", str(src), "--dry-run", "--objective", "latency", "--threads", "1"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "end-to-end:" in r.output and "onnxruntime" in r.output
    r = CliRunner().invoke(main, ["rewrite", str(src), "--dry-run", "--objective", "latency", "--threads", "1",
                                  "--clock", "process", "--format", "markdown"], catch_exceptions=False)
    assert r.exit_code == 0 and "end-to-end:" in r.output and "CPU time of the process" in r.output
    r = CliRunner().invoke(main, ["rewrite", str(src), "--dry-run", "--objective", "latency", "--clock", "process"])
    assert r.exit_code == 2 and "--threads 1" in r.output


def test_external_data_model_is_timed_end_to_end_from_the_saved_files(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(two_conv_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(main, ["rewrite", str(src), "-o", str(out), "--objective", "latency", "--threads", "1",
                                  "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    e2e = rep["latency"]["end_to_end"]
    assert e2e is not None and e2e["before"]["median_s"] > 0 and e2e["after"]["median_s"] > 0
    assert not any("end-to-end latency not measured" in n for n in rep["notes"])
    # dry run: nothing saved, so nothing to time end to end, and the report says so
    r = CliRunner().invoke(main, ["rewrite", str(src), "--dry-run", "--objective", "latency", "--threads", "1",
                                  "--format", "json"], catch_exceptions=False)
    rep = json.loads(r.output)
    assert rep["latency"]["end_to_end"] is None and any("end-to-end latency not measured" in n for n in rep["notes"])
