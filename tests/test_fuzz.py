"""Fuzzing: mutated copies of the committed samples through analyze, rewrite and check.

Only documented outcomes are allowed (docs/cli.md): exit 0, 1 or 2, never 3 (internal error),
never a traceback; on exit 2 exactly one ``sepify: error:`` line on stderr; a failed rewrite
leaves nothing in its output folder. Through the Python API: a result or a
:class:`sepify.errors.SepifyError`, nothing else.

Two kinds of mutation: bytes (flip, insert, delete, truncate, splice, of the serialized file)
and fields (a number of the parsed model set to an edge value: a dim, an attribute, a dim of
an input, an opset version...), since byte flips mostly land in weight payloads or break the
protobuf framing. ``SEPIFY_FUZZ_EXAMPLES`` raises the number of examples for a longer local run.

Crashes found here are fixed in the code and kept as regression cases in test_hostile.py.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sepify
from sepify.cli import main
from sepify.errors import SepifyError

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = {p.stem: p.read_bytes() for p in sorted((ROOT / "samples").glob("*.onnx"))}
EXAMPLES = int(os.environ.get("SEPIFY_FUZZ_EXAMPLES", "300"))  # in total, half bytes, half fields


# --- byte mutations ---------------------------------------------------------------------------
# A mutation is a small tuple (so hypothesis reports a readable recipe, not 90 kB of bytes):
# ("flip", i, bit), ("set", i, value), ("insert", i, bytes), ("delete", i, n), ("truncate", i),
# ("splice", i, donor, j, n, replace). Positions are taken modulo the current length.
def apply_byte_mutation(data: bytes, m: tuple) -> bytes:
    if not data:
        return data
    kind, i = m[0], m[1] % len(data)
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ (1 << m[2])]) + data[i + 1:]
    if kind == "set":
        return data[:i] + bytes([m[2]]) + data[i + 1:]
    if kind == "insert":
        return data[:i] + m[2] + data[i:]
    if kind == "delete":
        return data[:i] + data[i + m[2]:]
    if kind == "truncate":
        return data[:i]
    _, _, donor, j, n, replace = m
    src = SAMPLES[donor]
    chunk = src[j % len(src):j % len(src) + n]
    return data[:i] + chunk + data[i + (len(chunk) if replace else 0):]


POSITION = st.integers(0, 2**20)
BYTE_MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), POSITION, st.sampled_from([0x00, 0x01, 0x02, 0x08, 0x7F, 0x80, 0xFF])),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 64)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("splice"), POSITION, st.sampled_from(sorted(SAMPLES)), POSITION, st.integers(1, 256),
              st.booleans()),
)
BYTE_RECIPE = st.tuples(st.sampled_from(sorted(SAMPLES)), st.lists(BYTE_MUTATION, min_size=1, max_size=4))


def byte_mutated(recipe) -> bytes:
    name, mutations = recipe
    data = SAMPLES[name]
    for m in mutations:
        data = apply_byte_mutation(data, m)
    return data


# --- field mutations --------------------------------------------------------------------------
EDGE_INTS = [-(2**63), -(2**31), -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**40, 2**63 - 1]
NAMES = ["", "Conv", "com.unknown", "Relu", "Loop", "nope"]


def _int_fields(model: onnx.ModelProto) -> list:
    """(description, setter) for every int of the top-level graph that a mutation may change."""
    g = model.graph
    out = [("ir_version", lambda v: setattr(model, "ir_version", v))]
    for o in model.opset_import:
        out.append((f"opset {o.domain}", lambda v, o=o: setattr(o, "version", v)))
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            out.append((f"elem_type {vi.name}", lambda v, tt=tt: setattr(tt, "elem_type", v)))
            for k, d in enumerate(tt.shape.dim):
                out.append((f"dim {vi.name}[{k}]", lambda v, d=d: setattr(d, "dim_value", v)))
    for t in g.initializer:
        out.append((f"dtype {t.name}", lambda v, t=t: setattr(t, "data_type", v)))
        for k in range(len(t.dims)):
            out.append((f"dims {t.name}[{k}]", lambda v, t=t, k=k: t.dims.__setitem__(k, v)))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.INT:
                out.append((f"{n.name}.{a.name}", lambda v, a=a: setattr(a, "i", v)))
            elif a.type == onnx.AttributeProto.INTS:
                for k in range(len(a.ints)):
                    out.append((f"{n.name}.{a.name}[{k}]", lambda v, a=a, k=k: a.ints.__setitem__(k, v)))
            elif a.type == onnx.AttributeProto.FLOAT:
                out.append((f"{n.name}.{a.name}", lambda v, a=a: setattr(a, "f", float(v))))
    return out


def _str_fields(model: onnx.ModelProto) -> list:
    """(description, setter) for the names a mutation may change (rewires the graph)."""
    g = model.graph
    out = []
    for n in g.node:
        out.append((f"{n.name}.op_type", lambda v, n=n: setattr(n, "op_type", v)))
        out.append((f"{n.name}.domain", lambda v, n=n: setattr(n, "domain", v)))
        for k in range(len(n.input)):
            out.append((f"{n.name}.input[{k}]", lambda v, n=n, k=k: n.input.__setitem__(k, v)))
        for k in range(len(n.output)):
            out.append((f"{n.name}.output[{k}]", lambda v, n=n, k=k: n.output.__setitem__(k, v)))
    for vi in (*g.input, *g.output):
        out.append((f"name {vi.name}", lambda v, vi=vi: setattr(vi, "name", v)))
    return out


def field_mutated(recipe) -> bytes:
    """Apply (kind, field index, value index) mutations: kind "int" sets an int field to an edge
    value, kind "str" a name to another name of the graph or a few odd ones."""
    name, mutations = recipe
    model = onnx.ModelProto()
    model.ParseFromString(SAMPLES[name])
    names = sorted({n for node in model.graph.node for n in (*node.input, *node.output)}
                   | {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}) + NAMES
    for kind, field, value in mutations:
        fields = _int_fields(model) if kind == "int" else _str_fields(model)
        _, setter = fields[field % len(fields)]
        try:
            setter(EDGE_INTS[value % len(EDGE_INTS)] if kind == "int" else names[value % len(names)])
        except ValueError:  # out of range for an int32 field
            pass
    return model.SerializeToString()


FIELD_RECIPE = st.tuples(st.sampled_from(sorted(SAMPLES)),
                         st.lists(st.tuples(st.sampled_from(["int", "int", "int", "str"]), st.integers(0, 10**4),
                                            st.integers(0, 10**4)), min_size=1, max_size=3))


# --- the commands -----------------------------------------------------------------------------
def assert_documented(result, out_dir: Path | None = None) -> None:
    try:
        event(f"exit {result.exit_code}")  # the mix shows with --hypothesis-show-statistics
    except Exception:  # noqa: BLE001 - outside a hypothesis test (the regression cases)
        pass
    text = result.output
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exit_code in (0, 1, 2), (result.exit_code, text, result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sepify: error: "), result.stderr
    if out_dir is not None and result.exit_code == 2:
        assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())


def run_commands(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "m.onnx"
        path.write_bytes(data)
        out_dir = folder / "out"
        out_dir.mkdir()
        runner = CliRunner()
        assert_documented(runner.invoke(main, ["analyze", str(path), "--format", "json"]))
        assert_documented(runner.invoke(main, ["rewrite", str(path), "-o", str(out_dir / "m.sep.onnx")]), out_dir)
        assert_documented(runner.invoke(main, ["check", "--no-config", "--max-macs", "1G", str(path)]))
        assert path.read_bytes() == data, "the input was modified"


FUZZ_SETTINGS = settings(max_examples=EXAMPLES // 2, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])


# a RuntimeWarning (numpy: NaN, overflow) would be a stray line on a real stderr: an error here
@pytest.mark.filterwarnings("error::RuntimeWarning")
@FUZZ_SETTINGS
@given(BYTE_RECIPE)
def test_byte_mutations_give_documented_outcomes(recipe):
    run_commands(byte_mutated(recipe))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@FUZZ_SETTINGS
@given(FIELD_RECIPE)
def test_field_mutations_give_documented_outcomes(recipe):
    run_commands(field_mutated(recipe))


# --- the Python API: a fixed-seed loop of single-byte mutations -------------------------------
def _weight_spans(data: bytes) -> list[tuple[int, int]]:
    model = onnx.ModelProto()
    model.ParseFromString(data)
    spans = []
    for t in model.graph.initializer:
        raw = t.raw_data
        if len(raw) > 64:
            start = data.find(raw)
            if start >= 0:
                spans.append((start, start + len(raw)))
    return spans


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_single_byte_mutations_of_tiny_cnn_python_api(tmp_path):
    """400 random single-byte changes of tiny_cnn.onnx (seed 5): half anywhere, half in the
    graph structure (outside the weight payloads, where a flip rarely changes anything)."""
    data = SAMPLES["tiny_cnn"]
    spans = _weight_spans(data)
    structure = [i for i in range(len(data)) if not any(a <= i < b for a, b in spans)]
    rng = random.Random(5)
    path = tmp_path / "m.onnx"
    outcomes = {"ok": 0, "error": 0}
    for k in range(400):
        i = rng.randrange(len(data)) if k % 2 else rng.choice(structure)
        value = rng.randrange(256)
        mutated = data[:i] + bytes([value]) + data[i + 1:]
        path.write_bytes(mutated)
        try:
            sepify.analyze(path)
            outcomes["ok"] += 1
        except SepifyError:
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - the failure message names the mutation
            raise AssertionError(f"byte {i} set to {value:#04x}: {type(e).__name__}: {e}") from e
    assert outcomes["ok"] > 100 and outcomes["error"] > 100, outcomes  # both paths exercised


def test_a_free_dim_whose_derived_size_is_negative_at_the_stand_in_is_not_an_internal_error():
    """Found by the field fuzzer: tiny_cnn with its width written -1 and a pool made larger than
    the map: rewrite crashed (exit 3, 'p_out must be >= 0') on a negative derived size."""
    run_commands(field_mutated(("tiny_cnn", [("int", 339, 1108), ("int", 708, 1608)])))
