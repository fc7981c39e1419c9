"""sepify: static cost analysis, depthwise-separable rewriting and budget checks for ONNX CNNs.

Public API (imported lazily so that ``sepify --help`` starts fast)::

    sepify.analyze(path_or_model, input_shapes=None, dims=None) -> Analysis
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "Analysis", "SepifyError", "ModelError", "UsageError"]


def __getattr__(name: str):
    if name in ("analyze", "Analysis"):
        from . import analysis

        return getattr(analysis, name)
    if name in ("SepifyError", "ModelError", "UsageError", "BudgetError"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'sepify' has no attribute {name!r}")
