"""Report: what `sepify rewrite` changes in the parts of a model it does not rewrite.

For each model, rewrite it (rank 1 by default, nothing saved) and compare the result with the
source on everything the rewrite has no reason to touch: the untouched nodes (order, name,
op, domain, inputs/outputs, attributes including If/Loop bodies and their value_info,
doc_string, metadata_props), value_info of untouched tensors, initializers still used (data
type, dims, bytes or external-data reference), sparse initializers, graph and model fields
(doc_string, metadata_props, producer, opset imports, model-local functions, training_info,
quantization_annotation, inputs/outputs in order with their types). And where the new nodes
sit: in place of the node they replace. A report, not a test: nothing is asserted.

    PYTHONPATH=. python bench/roundtrip_fidelity.py /work/scratch/models/flat [--hand-made] [--rank 1]

``--hand-made`` adds small models carrying each item (built here, see :func:`hand_made`).
To check that two versions of sepify write models that compute the same (three settings)::

    PYTHONPATH=OLD_SRC python bench/roundtrip_fidelity.py FOLDER --save /tmp/old
    PYTHONPATH=.       python bench/roundtrip_fidelity.py FOLDER --save /tmp/new
    python bench/roundtrip_fidelity.py --compare /tmp/old /tmp/new

Prints one row per model (the items that differ, with a count) and, at the end, the items lost
on any model. Untouched nodes are matched to the source by their output names.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_NODE_FIELDS = ("name", "op_type", "domain", "input", "output", "doc_string", "metadata_props", "overload")


def _ser(msgs) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in msgs]


def _key(node: onnx.NodeProto) -> str | None:
    return next((o for o in node.output if o), None)


def _named_copy(model: onnx.ModelProto) -> list[str]:
    """The names sepify's rewrite gives the top-level nodes (unnamed / duplicate ones derived)."""
    from sepify.model.graph import unique_node_names

    names, _ = unique_node_names([n.name for n in model.graph.node], [n.op_type for n in model.graph.node])
    return list(names)


def _graph_reads(g: onnx.GraphProto) -> set[str]:
    """Every tensor name a graph and its subgraphs read (node inputs, graph outputs)."""
    out = {o.name for o in g.output}
    for n in g.node:
        out.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out |= _graph_reads(sub)
    return out


def compare(before: onnx.ModelProto, after: onnx.ModelProto, replaced: set[int]) -> dict[str, int]:
    """Differences outside the rewritten nodes (``replaced``: indices in ``before.graph.node``),
    as {item: count}. 0 everywhere is a faithful edit."""
    d: dict[str, int] = defaultdict(int)
    bg, ag = before.graph, after.graph
    # --- model fields
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(before, f) != getattr(after, f):
            d[f"model.{f}"] += 1
    if _ser(before.opset_import) != _ser(after.opset_import):
        d["model.opset_import"] += 1
    meta = [p for p in after.metadata_props if not p.key.startswith("sepify.")]
    if _ser(before.metadata_props) != _ser(meta):
        d["model.metadata_props"] += 1
    if _ser(before.functions) != _ser(after.functions):
        d["model.functions"] += max(1, abs(len(before.functions) - len(after.functions)))
    if _ser(before.training_info) != _ser(after.training_info):
        d["model.training_info"] += 1
    if hasattr(before, "configuration") and _ser(before.configuration) != _ser(after.configuration):
        d["model.configuration"] += 1
    # --- graph fields
    for f in ("name", "doc_string"):
        if getattr(bg, f) != getattr(ag, f):
            d[f"graph.{f}"] += 1
    if _ser(bg.input) != _ser(ag.input):
        d["graph.input (order/types)"] += 1
    if _ser(bg.output) != _ser(ag.output):
        d["graph.output (order/types)"] += 1
    if _ser(bg.quantization_annotation) != _ser(ag.quantization_annotation):
        d["graph.quantization_annotation"] += 1
    if hasattr(bg, "metadata_props") and _ser(bg.metadata_props) != _ser(ag.metadata_props):
        d["graph.metadata_props"] += 1
    if _ser(bg.sparse_initializer) != _ser(ag.sparse_initializer):
        d["graph.sparse_initializer"] += 1
    # --- nodes: untouched ones matched by their first output. Nodes that only fed the replaced
    # ones (a Constant holding a weight or BN statistics) go with them: not counted as lost
    first_replaced = min(replaced, default=0)
    replaced = replaced | _feeders_only(bg, replaced)
    derived = _named_copy(before)
    untouched = [n for i, n in enumerate(bg.node) if i not in replaced]
    derived_of = {id(n): derived[i] for i, n in enumerate(bg.node)}
    by_key = {_key(n): n for n in ag.node}
    positions = {id(n): i for i, n in enumerate(ag.node)}
    order = []
    for n in untouched:
        m = by_key.get(_key(n))
        if m is None or m.op_type != n.op_type:
            d["node lost"] += 1
            continue
        order.append(positions[id(m)])
        for f in _NODE_FIELDS:
            a, b = getattr(n, f), getattr(m, f)
            if f == "name" and a != b and b == derived_of[id(n)]:
                d["node.name (unnamed/duplicate given its derived name: by design)"] += 1
                continue
            if (_ser(a) != _ser(b)) if f == "metadata_props" else (list(a) != list(b) if f in ("input", "output") else a != b):
                d[f"node.{f}"] += 1
        plain = [a for a in n.attribute if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
        plain2 = [a for a in m.attribute if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
        if _ser(plain) != _ser(plain2):
            d["node.attribute"] += 1
        subs = [a for a in n.attribute if a not in plain]
        subs2 = [a for a in m.attribute if a not in plain2]
        if _ser(subs) != _ser(subs2):
            d["node.attribute (subgraph)"] += 1
            vi = [_ser(a.g.value_info) for a in subs if a.type == onnx.AttributeProto.GRAPH]
            vi2 = [_ser(a.g.value_info) for a in subs2 if a.type == onnx.AttributeProto.GRAPH]
            if vi != vi2:
                d["node.attribute (subgraph value_info)"] += 1
    if order != sorted(order):
        d["node order (untouched)"] += sum(1 for a, b in zip(order, order[1:]) if b < a)
    # new nodes: each replaced node's replacement where it was (between its untouched neighbours)
    new_pos = [i for i, n in enumerate(ag.node) if _key(n) not in {_key(u) for u in untouched}]
    if replaced and new_pos:
        before_it = sum(1 for i in range(first_replaced) if i not in replaced)
        if min(new_pos) != before_it:
            d["new nodes not in place"] += 1
    # --- tensors: value_info of tensors still in the graph, initializers still read
    reads = _graph_reads(ag) | {o for n in ag.node for o in n.output}
    avi = {v.name: v for v in ag.value_info}
    for v in bg.value_info:
        if v.name not in reads:
            continue
        w = avi.get(v.name)
        if w is None:
            d["value_info lost"] += 1
        elif w.SerializeToString() != v.SerializeToString():
            d["value_info changed"] += 1
    ainit = {t.name: t for t in ag.initializer}
    order_b = [t.name for t in bg.initializer if t.name in ainit]
    order_a = [t.name for t in ag.initializer if t.name in set(order_b)]
    if order_a != order_b:
        d["initializer order"] += 1
    for t in bg.initializer:
        u = ainit.get(t.name)
        if u is None:
            if t.name in reads:
                d["initializer lost"] += 1
            continue
        if t.data_type != u.data_type:
            d["initializer data_type"] += 1
        if list(t.dims) != list(u.dims):
            d["initializer dims"] += 1
        if t.data_location != u.data_location or _ser(t.external_data) != _ser(u.external_data):
            d["initializer external-data reference"] += 1
        elif t.SerializeToString() != u.SerializeToString():
            d["initializer bytes/encoding"] += 1
    stale = [t.name for t in ag.initializer if t.name not in reads]
    if stale:
        d["unused initializers left"] += len(stale)
    return dict(d)


def _feeders_only(g: onnx.GraphProto, replaced: set[int]) -> set[int]:
    """Nodes that computed only the weights / BN statistics of the ``replaced`` nodes (their
    inputs after the first, the data input): all their outputs are read by nothing else."""
    keep = _graph_reads(onnx.GraphProto(node=[n for n in g.node if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)])) | {o.name for o in g.output}
    readers: dict[str, set[int]] = defaultdict(set)
    producer = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            readers[t].add(i)
        for o in n.output:
            producer[o] = i
    out: set[int] = set()
    stack = [t for i in replaced for t in g.node[i].input[1:]]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in replaced or i in out:
            continue
        outs = [o for o in g.node[i].output if o]
        if all(o not in keep and readers[o] <= (replaced | out | {i}) for o in outs):
            out.add(i)
            stack.extend(g.node[i].input)
    return out


def replaced_indices(source: onnx.ModelProto, result) -> set[int]:
    names = _named_copy(source)
    gone = {r.name for r in result.layers} | {r.folded_batchnorm for r in result.layers if r.folded_batchnorm}
    return {i for i, n in enumerate(names) if n in gone}


# --- hand-made models: one item each, a Conv to rewrite in all ---------------------------------
_SHAPES = {"y": [1, 8, 8, 8], "z": [1, 8, 8, 8], "f": [1, 8, 8, 8], "gl": [1, 8, 8, 8], "h32": [2, 3],
           "x2": [1, 4, 8, 8], "sp_out": [1, 8, 8, 8]}
_TYPES = {"i32": (TensorProto.INT32, [3])}


def _base(extra_nodes=(), extra_inits=(), outputs=("y",), **kw) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
             *extra_inits]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"], name="sig"), *extra_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info(o, *_TYPES.get(o, (TensorProto.FLOAT, _SHAPES.get(o))))
                           for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, **kw)
    return m


def hand_made() -> dict[str, onnx.ModelProto]:
    out = {}
    m = _base()
    m.graph.node[0].doc_string = "relu doc"
    m.graph.node[2].doc_string = "sigmoid doc"
    out["node doc_string"] = m
    m = _base()
    m.graph.node[0].metadata_props.add(key="origin", value="torch")
    m.graph.node[2].metadata_props.add(key="scope", value="head")
    out["node metadata_props"] = m
    m = _base()
    helper.set_model_props(m, {"author": "me", "license": "MIT"})
    m.producer_name, m.producer_version, m.doc_string, m.graph.doc_string = "exporter", "9.9", "model doc", "graph doc"
    m.domain, m.model_version = "com.example", 7
    out["model fields"] = m
    m = _base()
    m.graph.value_info.extend([helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, "h", 8])])
    out["value_info (symbolic, untouched tensor)"] = m
    m = _base()
    m.graph.value_info.extend([helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    out["value_info (type, no shape)"] = m
    # If with a body (its own value_info), reading the Conv's output and an outer initializer
    then = helper.make_graph([helper.make_node("Add", ["y", "k"], ["t1"], name="then_add"),
                              helper.make_node("Neg", ["t1"], ["t"], name="then_neg")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8, 8, 8])],
                             value_info=[helper.make_tensor_value_info("t1", TensorProto.FLOAT, [1, 8, 8, 8])])
    els = helper.make_graph([helper.make_node("Identity", ["y"], ["e"], name="else_id")], "else", [],
                            [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8, 8, 8])])
    nodes = [helper.make_node("ReduceSum", ["y"], ["s"], name="rsum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=then, else_branch=els)]
    out["If with a body"] = _base(nodes, [numpy_helper.from_array(np.float32(1.5).reshape(()), "k"),
                                          numpy_helper.from_array(np.zeros((), np.float32), "zero")], ("y", "z"))
    # a model-local function used by a node
    fn = helper.make_function("local.fn", "Swish", ["a"], ["o"],
                              [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["o"])],
                              [helper.make_opsetid("", 17)])
    m = _base([helper.make_node("Swish", ["y"], ["f"], name="swish", domain="local.fn")], outputs=("y", "f"),
              functions=[fn])
    m.opset_import.append(helper.make_opsetid("local.fn", 1))
    out["model-local function"] = m
    # a custom-domain node onnxruntime runs (com.microsoft)
    m = _base([helper.make_node("Gelu", ["y"], ["gl"], name="gelu", domain="com.microsoft")], outputs=("y", "gl"))
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out["custom-domain node"] = m
    m = _base()
    m.graph.node[0].op_type = "LeakyRelu"
    m.graph.node[0].attribute.extend([helper.make_attribute("alpha", 0.5)])
    m.graph.node[0].attribute[0].doc_string = "attribute doc"
    out["attribute doc_string"] = m
    m = _base()
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "sp"),
                                   numpy_helper.from_array(np.array([1, 5], np.int64), "sp_i"), [1, 8, 1, 1])
    m.graph.sparse_initializer.extend([sp])  # unread: no standard op takes a sparse tensor (the checker says so)
    out["sparse initializer"] = m
    m = _base()
    m.graph.quantization_annotation.extend([onnx.TensorAnnotation(
        tensor_name="r", quant_parameter_tensor_names=[onnx.StringStringEntryProto(key="SCALE_TENSOR", value="b")])])
    out["quantization_annotation"] = m
    m = _base()
    ti = onnx.TrainingInfoProto()
    ti.algorithm.CopyFrom(helper.make_graph([], "algo", [], []))
    m.training_info.extend([ti])
    out["training_info"] = m
    m = _base(extra_inits=[numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "h16"),
                           helper.make_tensor("i8", TensorProto.INT8, [3], [1, -2, 3])],
              extra_nodes=[helper.make_node("Cast", ["h16"], ["h32"], name="cast", to=TensorProto.FLOAT),
                           helper.make_node("Cast", ["i8"], ["i32"], name="cast8", to=TensorProto.INT32)],
              outputs=("y", "h32", "i32"))
    m.graph.initializer[-1].ClearField("int32_data")
    m.graph.initializer[-1].raw_data = np.array([1, -2, 3], np.int8).tobytes()
    out["initializer dtypes and raw/typed encoding"] = m
    m = _base()
    m.graph.node[0].name = ""
    m.graph.node[2].name = ""
    out["unnamed nodes"] = m
    m = _base([helper.make_node("Neg", ["r"], ["dead"], name="dead_neg")])
    out["dead node"] = m
    m = _base([helper.make_node("Identity", ["x"], ["x2"], name="early_id")])  # a node after the Conv, independent
    m.graph.node.insert(2, m.graph.node.pop())  # order: relu, conv, early_id, sig (valid topological order)
    m.graph.output.extend([helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4, 8, 8])])
    out["node order (a non-canonical topological order)"] = m
    return out


# --- the same rewrites by two versions of sepify: do the written models compute the same? -------
SETTINGS = {"r1": dict(rank=1), "r3split": dict(rank=3, form="split", allow_increase=True),
            "pw2tiled": dict(rank=2, orientation="pw-first", form="tiled", allow_increase=True)}
# inputs of the real models whose declared shapes leave a dim free (silero: 576 samples and its states)
_FEED_SHAPES = {"input": {"silero": [1, 576]}, "state": {"silero": [2, 1, 128]}, "h": {"silero": [1, 1, 128]},
                "c": {"silero": [1, 1, 128]}}


def save_rewrites(folder: Path, out: Path) -> None:
    """Rewrite every model of ``folder`` with each of :data:`SETTINGS` using the sepify on the
    path, and save what rewrites something to ``out`` (``<model>.<setting>.onnx``)."""
    import sepify

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.rglob("*.onnx")):
        for tag, kw in SETTINGS.items():
            try:
                r = sepify.rewrite(str(f), **kw)
            except Exception as e:  # noqa: BLE001 - a report
                print(f"{f.name} {tag}: {type(e).__name__}")
                continue
            if r.layers:
                r.save(out / f"{f.stem}.{tag}.onnx")


def compare_outputs(old: Path, new: Path) -> None:
    """The models of ``old`` and ``new`` saved by :func:`save_rewrites` with two versions: the
    full checker on each new one, and onnxruntime's outputs of both on the same random inputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    worst, n = 0.0, 0
    for f in sorted(old.glob("*.onnx")):
        g = new / f.name
        onnx.checker.check_model(str(g), full_check=True)
        plans = [json.loads({p.key: p.value for p in onnx.load(str(x), load_external_data=False).metadata_props}
                            ["sepify.rewrite"])["layers"] for x in (f, g)]
        if plans[0] != plans[1]:  # the two versions chose other layers / ranks: not the same edit
            print(f"{f.name[:64]:64} not comparable: rewrote {sorted(plans[0])} vs {sorted(plans[1])}")
            continue
        a = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for i in a.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 64) for k, d in enumerate(i.shape)]
            shape = next((v for key, v in _FEED_SHAPES.get(i.name, {}).items() if key in f.name), shape)
            if "int64" in i.type:
                feeds[i.name] = np.full(shape, 16000, np.int64)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in i.type else np.float32)
        oa, ob = a.run(None, feeds), b.run(None, feeds)
        same = all(np.array_equal(x, y) for x, y in zip(oa, ob))
        d = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
                for x, y in zip(oa, ob))
        worst, n = max(worst, d), n + 1
        print(f"{f.name[:64]:64} {'bit-identical' if same else f'max |diff| {d:.3g}'}")
    print(f"{n} model pairs, largest output difference {worst:g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, nargs="?")
    ap.add_argument("--hand-made", action="store_true")
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--save", type=Path, metavar="OUT", help="save the rewrites of FOLDER (3 settings) to OUT instead")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("OLD", "NEW"),
                    help="compare two --save folders (made by two versions) in onnxruntime instead")
    args = ap.parse_args()
    if args.compare:
        return compare_outputs(*args.compare)
    if args.save:
        return save_rewrites(args.folder, args.save)
    import sepify

    models: list[tuple[str, onnx.ModelProto, object]] = []
    if args.folder:
        for f in sorted(args.folder.rglob("*.onnx")):
            models.append((f.name, onnx.load(str(f), load_external_data=False), str(f)))
    if args.hand_made:
        models += [(k, v, v) for k, v in hand_made().items()]
    lost: dict[str, list[str]] = defaultdict(list)
    for label, source, src in models:
        try:
            r = sepify.rewrite(src, rank=args.rank, allow_increase=True)
        except Exception as e:  # noqa: BLE001 - a report
            print(f"{label[:48]:48}  rewrite failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        if not r.layers:
            print(f"{label[:48]:48}  nothing rewritten ({len(r.skipped)} skipped)")
            continue
        diff = compare(source, r.model, replaced_indices(source, r))
        for k in diff:
            lost[k].append(label)
        text = ", ".join(f"{k} x{v}" for k, v in sorted(diff.items())) or "identical outside the rewritten nodes"
        print(f"{label[:48]:48}  {len(r.layers):3} rewritten  {text}", flush=True)
    print("\nitems that differ:" if lost else "\nno item differs on any model")
    for k, v in sorted(lost.items()):
        print(f"  {k}: {len(v)} model(s) ({', '.join(x[:30] for x in v[:4])}{' ...' if len(v) > 4 else ''})")


if __name__ == "__main__":
    sys.exit(main())
