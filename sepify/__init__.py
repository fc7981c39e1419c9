"""sepify: static cost analysis, depthwise-separable rewriting and budget checks for ONNX CNNs.

Public API (imported lazily so that ``sepify --help`` starts fast)::

    sepify.analyze(path_or_model, input_shapes=None, dims=None) -> Analysis
    sepify.rewrite(path_or_model, rank=1, ...) -> RewriteResult (.model, .report, .save(path))
    sepify.check(models, limits={...}) -> CheckReport  (sepify.check)
    sepify.compare(old, new) -> Diff                     (sepify.diff)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "Analysis", "rewrite", "RewriteOptions", "check", "compare",
           "SepifyError", "ModelError", "UsageError", "BudgetError"]


def __getattr__(name: str):
    if name in ("analyze", "Analysis"):
        from .cost import analysis

        return getattr(analysis, name)
    if name in ("rewrite", "RewriteOptions", "RewriteResult"):
        from .rewrite import pipeline as rewriter

        return getattr(rewriter, name)
    if name == "check":
        from .check import check

        return check
    if name == "compare":
        from .diff import compare

        return compare
    if name in ("SepifyError", "ModelError", "UsageError", "BudgetError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'sepify' has no attribute {name!r}")
