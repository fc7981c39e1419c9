"""``sepify check``: cost budgets for models — budgets (what is measured and how it is judged),
config (``[tool.sepify]``), baselines; :func:`check` runs them on models.

``sepify.check`` is both this package and the function :func:`check`: calling the module,
``sepify.check(models, limits=...)``, calls :func:`check` (the public API named in the README).
"""

from __future__ import annotations

import sys
import types

from .budgets import QUANTITIES, BudgetResult, CheckReport, ModelResult, evaluate, measure
from .config import Config, Settings, find_config, load_config, merge, parse_config
from .run import check, check_model


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["QUANTITIES", "BudgetResult", "ModelResult", "CheckReport", "Config", "Settings", "check",
           "check_model", "evaluate", "measure", "find_config", "load_config", "parse_config", "merge"]
