"""A Netron attachment: per-node costs shown in Netron's node panel.

Format (read in Netron's ``source/view.js``, ``metadata.Attachment``): a ``.json`` file
``{"signature": "netron:attachment", "metadata": [...], "metrics": [...]}`` whose items are
``{"kind": "model"|"graph"|"node"|..., "target": NAME, "name": ..., "value": ...}``. Netron
opens it when it is opened *after* a model (File > Open, or dropped on the window) and shows
the ``metrics`` of a node under "Metrics" and its ``metadata`` under "Metadata" in the node's
properties. A node item is matched on ``node::<the node's name>`` (its first line); the model's
on ``model::`` (an empty target).

Netron identifies nodes by their own names, so:

* an unnamed node cannot carry an item (Netron matches no key for an empty name);
* nodes sharing a name share the items of that name: the items are those of the first node of
  the name (the one that kept it in the report), with a ``sepify.shared_name`` note saying so;
  the later ones (given derived names, ``conv_12``) get none of their own.

The layers left out are listed in the model's metadata (``sepify.not_attached``).
"""

from __future__ import annotations

import json

from ..units import human

SIGNATURE = "netron:attachment"

#: (report key, metric name shown in Netron)
METRICS = (("macs", "MACs"), ("flops", "FLOPs"), ("params", "params"), ("buffers", "buffers"),
           ("output_bytes", "output bytes"), ("live_bytes", "live bytes"))


def viewer_name(layer: dict) -> str | None:
    """The name Netron knows the layer's node by, or None when Netron cannot address it (an
    unnamed node, or a later node of a name an earlier node has)."""
    if "onnx_name" not in layer:
        return layer["name"]
    return None  # derived: unnamed (onnx_name "") or a duplicate (the first node of the name has it)


def _item(kind: str, target: str, name: str, value) -> dict:
    return {"kind": kind, "target": target, "name": name, "value": value}


def _layer_metrics(layer: dict, target: str) -> list[dict]:
    out = []
    for key, label in METRICS:
        v = layer.get(key)
        if key == "buffers" and not v:
            continue
        if v is None and key in ("macs", "flops") and layer.get("unknown"):
            v = f"unknown: {layer['unknown']}"
        if v is None:
            continue
        out.append(_item("node", target, label, v))
    return out


def _model_items(data: dict, skipped: list[str]) -> tuple[list[dict], list[dict]]:
    t = data["totals"]
    metrics = [_item("model", "", "MACs", t["macs"]), _item("model", "", "FLOPs", t["flops"]),
               _item("model", "", "params", t["params"]),
               _item("model", "", "activation peak bytes", t["activation_peak_bytes"]),
               _item("model", "", "unknown-cost nodes", t["unknown"])]
    metadata = [_item("model", "", "sepify", f"sepify {data.get('sepify_version', '')}: MACs {human(t['macs'])}, "
                                             f"params {human(t['params'])}")]
    if skipped:
        metadata.append(_item("model", "", "sepify.not_attached",
                              f"{len(skipped)} node(s) without a name of their own (unnamed or duplicate) carry no "
                              "metrics here: " + ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")))
    return metrics, metadata


def analysis_attachment(data: dict) -> dict:
    """The attachment of an analysis report (``sepify.analysis/1``)."""
    metrics: list[dict] = []
    metadata: list[dict] = []
    skipped = []
    shared: dict[str, list[str]] = {}  # a name several nodes have -> the derived names of the later ones
    for layer in data["layers"]:
        if layer.get("onnx_name"):
            shared.setdefault(layer["onnx_name"], []).append(layer["name"])
    for layer in data["layers"]:
        target = viewer_name(layer)
        if target is None:
            skipped.append(layer["name"])
            continue
        metrics += _layer_metrics(layer, target)
        if layer.get("note"):
            metadata.append(_item("node", target, "sepify.note", layer["note"]))
        if target in shared:
            metadata.append(_item("node", target, "sepify.shared_name",
                                  f"{len(shared[target]) + 1} nodes are named {target!r}: these metrics are those of "
                                  f"the first (node {layer['node_index']}); sepify calls the others "
                                  + ", ".join(shared[target])))
    model_metrics, model_metadata = _model_items(data, skipped)
    return {"signature": SIGNATURE, "metadata": model_metadata + metadata, "metrics": model_metrics + metrics}


# labels of the fields of a rewrite layer result (others are shown under their own key)
_REWRITE_LABELS = {"orientation": "orientation", "rank": "rank", "max_rank": "max rank", "energy": "energy kept",
                   "rel_error": "weight error", "macs_before": "MACs before", "macs_after": "MACs after",
                   "params_before": "params before", "params_after": "params after",
                   "folded_batchnorm": "folded BN"}


def rewrite_attachment(report: dict) -> dict:
    """The attachment of a rewrite report, for the *rewritten* model: every node's metrics (from
    the analysis of the rewritten model), and on each new depthwise/pointwise node the rank,
    orientation, energy kept and weight error of the factorization it belongs to (plus any
    other scalar field of the layer result), on a Conv left as it was the reason."""
    att = analysis_attachment(report["after"])
    names = {layer["name"] for layer in report["after"]["layers"] if viewer_name(layer) is not None}
    for r in report["layers"]:
        items = [("replaces", r["name"])]
        for key, value in r.items():
            if key in ("name", "new_nodes") or value is None:
                continue
            if isinstance(value, (int, float, str, bool)):
                items.append((_REWRITE_LABELS.get(key, key), value))
            else:
                items.append((key, json.dumps(value, sort_keys=True)))
        for node in r.get("new_nodes") or []:
            if node in names:
                att["metadata"] += [_item("node", node, k, v) for k, v in items]
    for s in report.get("skipped") or []:
        if s["name"] in names:
            att["metadata"].append(_item("node", s["name"], "not rewritten", s["reason"]))
    return att


def render_netron(data: dict) -> str:
    """An analysis or rewrite report as a Netron attachment (JSON text, one item a line)."""
    from .common import dumps_json

    att = rewrite_attachment(data) if str(data.get("schema", "")).startswith("sepify.rewrite/") else analysis_attachment(data)
    return dumps_json(att)
