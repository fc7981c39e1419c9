"""Google Model Explorer node data: one value per node, coloured on a gradient.

Format (read in ``model_explorer/node_data_builder.py`` of the ``ai-edge-model-explorer``
package, 0.1.34, and in its web app, which takes a file whose top level has ``results`` as the
data of the graph on screen): a ``GraphNodeData`` object
``{"name": ..., "results": {NODE_ID: {"value": number}}, "gradient": [{"stop": 0..1,
"bgColor": ...}]}``; stop 0 is the smallest value of ``results``, stop 1 the largest. Loaded
with ``model-explorer model.onnx --node_data_paths=macs.json`` (or from the UI's node data
menu, or dropped on the graph).

Node ids: Model Explorer reads ONNX through the ``model-explorer-onnx`` adapter (0.4.2 read),
whose graph node id is the node's name after onnx_ir's ``NameFixPass``: a unique name is kept;
an unnamed node becomes ``node``, ``node_1``, ``node_2``...; a later node of a taken name
``<name>_1``, ``<name>_2``... (one counter per preferred name, shared with the nodes of
subgraphs, visited depth first after their node). :func:`viewer_names` replays that on the
model's graph, so a layer whose name sepify derived (``Conv_12``) is keyed by the id Model
Explorer gives the same node. Without the graph, such layers are left out.
"""

from __future__ import annotations

import collections
import json

import onnx

#: the quantities a node data file can carry (one per file)
METRICS = {"macs": "MACs", "flops": "FLOPs", "params": "params", "output_bytes": "output bytes",
           "live_bytes": "live activation bytes"}

GRADIENT = [{"stop": 0, "bgColor": "#ffffff"}, {"stop": 0.5, "bgColor": "#fdae61"}, {"stop": 1, "bgColor": "#d7191c"}]


def viewer_names(graph: onnx.GraphProto) -> list[str]:
    """The node ids Model Explorer's ONNX adapter gives the nodes of ``graph`` (top level, in
    node order): onnx_ir's ``NameFixPass`` with its ``SimpleNameGenerator``."""
    counter: collections.Counter[str] = collections.Counter()

    def fix(name: str, used: set[str]) -> str:
        if name and name not in used:
            used.add(name)
            return name
        preferred = name or "node"
        new = preferred
        while new in used:
            counter[preferred] += 1
            new = f"{preferred}_{counter[preferred]}"
        used.add(new)
        return new

    def walk(g: onnx.GraphProto, out: list[str] | None) -> None:
        used: set[str] = set()
        for node in g.node:
            name = fix(node.name, used)
            if out is not None:
                out.append(name)
            for attr in node.attribute:  # subgraphs, depth first, right after their node
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, None)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub, None)

    names: list[str] = []
    walk(graph, names)
    return names


def node_data(data: dict, metric: str = "macs", graph: onnx.GraphProto | None = None) -> dict:
    """``GraphNodeData`` of one quantity of an analysis report (or of a rewrite report: the
    rewritten model's). Nodes whose value is unknown are left out (drawn uncoloured)."""
    if str(data.get("schema", "")).startswith("sepify.rewrite/"):
        data = data["after"]
    ids = viewer_names(graph) if graph is not None else None
    results = {}
    for layer in data["layers"]:
        value = layer.get(metric)
        if value is None:
            continue
        index = layer.get("node_index")
        if ids is not None and index is not None and index < len(ids):
            key = ids[index]  # (a kept name can be renamed too: an earlier unnamed node may take "node")
        elif "onnx_name" not in layer:
            key = layer["name"]
        else:
            continue
        results[key] = {"value": value}
    return {"name": f"{METRICS[metric]} (sepify)", "results": results, "gradient": GRADIENT}


def render_model_explorer(data: dict, metric: str = "macs", graph: onnx.GraphProto | None = None) -> str:
    """Node data as JSON text, one node a line."""
    d = node_data(data, metric, graph)
    rows = ",\n    ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in d["results"].items())
    return (f'{{\n  "name": {json.dumps(d["name"])},\n  "results": {{\n    {rows}\n  }},\n'
            f'  "gradient": {json.dumps(d["gradient"])}\n}}\n')
