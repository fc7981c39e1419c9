"""``sepify rewrite``: replace standard Conv nodes by depthwise + pointwise pairs.

The rewrite is a staged pipeline; each stage is a module with a typed result:

- :mod:`.plan`      — eligibility rules: each Conv becomes a candidate or a skip reason
  (folding a following BatchNormalization is one rule);
- :mod:`.factorize` — the math (pure numpy): per-slice SVD and the factors of a rank;
- :mod:`.allocate`  — rank policies (one class per policy) choosing (orientation, rank) per layer;
- :mod:`.emit`      — the graph edit, made directly on the ModelProto (only what changes);
- :mod:`.verify`    — running original and rewritten model in onnxruntime;
- :mod:`.pipeline`  — :func:`rewrite`, which runs the stages on one prepared model.

``sepify.rewrite`` is both this package and, for the public API, the function
:func:`~sepify.rewrite.pipeline.rewrite`: the package module is callable.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    """``sepify.rewrite(model, ...)`` calls :func:`sepify.rewrite.pipeline.rewrite`."""

    def __call__(self, *args, **kwargs):
        from .pipeline import rewrite

        return rewrite(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def __getattr__(name: str):
    if name in ("rewrite", "RewriteOptions", "RewriteResult", "LayerResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sepify.rewrite' has no attribute {name!r}")
