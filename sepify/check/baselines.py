"""Baselines of ``sepify check``: the report a model's growth is measured against.

A baseline is an analyze JSON (``sepify analyze --format json``) or a model file (analyzed with
the model's own ``input-shape``/``dims``). Its path may hold ``{stem}`` / ``{name}``, replaced by
the checked model's file stem / name, so one setting serves every model of a config section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def baseline_path(template: str, model: Path) -> str:
    """``baselines/{stem}.json`` for ``models/net.onnx`` → ``baselines/net.json``."""
    return template.replace("{stem}", model.stem).replace("{name}", model.name)


def load_baseline(path: str, input_shapes: Mapping[str, Sequence[int | str]] | None = None,
                  dims: Mapping[str, int] | None = None) -> dict:
    """The baseline's analyze report (dict); errors raise :class:`~sepify.errors.ModelError`."""
    from ..diff import load_report

    return load_report(path, input_shapes=input_shapes, dims=dims)
