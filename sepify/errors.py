"""Errors that the CLI turns into a one-line message and a documented exit code.

Exit codes (see docs/cli.md):

* 0 — success (for ``check``: every model within budget)
* 1 — a budget was exceeded (``check``) or verification exceeded ``--tolerance`` (``rewrite``)
* 2 — usage, configuration or model error (missing file, not ONNX, truncated, invalid graph, ...)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2


class SepifyError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = EXIT_ERROR


class ModelError(SepifyError):
    """The model file cannot be read or is not a valid ONNX graph."""


class UsageError(SepifyError):
    """Bad option values or configuration."""


class BudgetError(SepifyError):
    """A requested budget cannot be met (e.g. ``rewrite --target-macs`` below rank 1 everywhere)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for a one-line error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
