"""Options of a rewrite: how ranks are chosen, which Convs are considered."""

from __future__ import annotations

import re

import numpy as np
from dataclasses import dataclass
from typing import Sequence

from ..errors import UsageError
from .factorize import ORIENTATIONS

ORIENTATION_CHOICES = ORIENTATIONS + ("auto",)
OBJECTIVES = ("macs", "latency")
FORM_CHOICES = ("fast", "native", "split", "tiled", "auto")  # emit's FORMS + "fast" and "auto" (resolved by the pipeline)
# "fast" (the default without --objective latency): the form measured fastest in
# bench/bench_latency.py for each orientation at rank > 1 (docs/rewrite.md, "Graph forms")
SENSITIVITIES = ("measured", "none")
DISTORTIONS = ("auto", "kl", "rel")
FAST_FORM = {"dw-first": "split", "pw-first": "split"}
CALIB_METHODS = ("als", "refit")


@dataclass
class RewriteOptions:
    """How to choose ranks. Exactly one of rank / energy / max_error / target_* applies
    (rank=1 when none is given)."""

    rank: int | str | None = None  # an int, or "full"
    energy: float | None = None
    max_error: float | None = None
    target_macs: int | None = None
    target_ratio: float | None = None
    orientation: str = "dw-first"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    allow_increase: bool = False
    fold_batchnorm: bool = True
    # latency (sepify.rewrite.measure): objective "macs" (default) or "latency" (measured; implied
    # by target_speedup); form fast|native|split|tiled|auto (default: auto under latency, else fast);
    # threads: onnxruntime intra-op threads of the measurements (None: onnxruntime's default)
    objective: str | None = None
    target_speedup: float | None = None
    form: str | None = None
    threads: int | None = None
    clock: str = "wall"  # "process": CPU time of the process (needs threads=1; for shared machines)
    # --target-speedup: at most this many allocations, each timed end to end (measure.reallocate)
    latency_passes: int = 3
    # with calibration data (rewrite(..., calibration=...) / --calibration): see calibrate.py
    holdout: float = 0.2  # fraction in [0, 1) or a sample count >= 1 (data.py)
    calib_rows: int = 16384  # patch rows per layer
    calib_method: str = "als"  # "als" (alternating least squares) or "refit" (pointwise refit only)
    sequential: bool = True  # fit each layer on the inputs the already-rewritten layers produce
    calib_seed: int = 0  # the holdout split and the sampled positions
    # budgets with calibration data (sepify.rewrite.sensitivity): "measured" weighs each layer's
    # error by what it measurably does to the model's outputs; "none": every layer's relative
    # output error counts alike (the allocation before sensitivity)
    sensitivity: str = "measured"
    sensitivity_samples: int = 16  # held-out samples the sensitivities are measured on
    sensitivity_ranks: Sequence[int] = (1, 2, 4)  # ranks the sensitivities are measured at (interpolated between)
    distortion: str = "auto"  # how outputs are compared: auto | kl | rel
    cache_dir: str | None = None  # the per-model tables' cache (None: $SEPIFY_CACHE_DIR or ~/.cache/sepify)
    cache: bool = True
    # with calibration data and sequential: refit the Convs left dense after rewritten layers
    # to their original outputs (calibrate.Calibrator.fit, factorize.refit_dense)
    refit_kept: bool = True
    # with calibration data and sequential: a conv whose output is read only by an Add whose
    # other branch drifts is fitted to the original sum minus that drifted branch, so the Add's
    # output is what it undoes (calibrate, "Residual targets")
    residual_target: bool = True
    calib_cache_mb: float = 2048  # MiB of activations held between calibration passes (calibrate.Budget)
    # onnxruntime execution providers of the calibration and verification sessions, e.g.
    # ("CUDA", "CPU"); empty: CPU. The latency measurements always use their own CPU sessions.
    providers: Sequence[str] = ()

    def __post_init__(self):
        if self.objective is None:
            self.objective = "latency" if self.target_speedup is not None else "macs"
        if self.form is None:
            self.form = "auto" if self.objective == "latency" else "fast"

    def validate(self) -> None:
        chosen = [k for k in ("rank", "energy", "max_error", "target_macs", "target_ratio", "target_speedup") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise UsageError(f"choose one rank criterion, not {' and '.join('--' + c.replace('_', '-') for c in chosen)}")
        if self.rank is not None and self.rank != "full" and (not isinstance(self.rank, int) or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer or 'full', not {self.rank!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise UsageError("--energy must be in (0, 1]")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise UsageError("--max-error must be in [0, 1)")
        if self.target_ratio is not None and not 0 < self.target_ratio <= 1:
            raise UsageError("--target-ratio must be in (0, 1]")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.target_speedup is not None:
            if self.objective != "latency":
                raise UsageError("--target-speedup is a latency budget: it needs --objective latency, not macs")
            if not (isinstance(self.target_speedup, (int, float)) and self.target_speedup > 0
                    and self.target_speedup == self.target_speedup and self.target_speedup != float("inf")):
                raise UsageError(f"--target-speedup must be a positive number, not {self.target_speedup!r}")
        if self.form not in FORM_CHOICES:
            raise UsageError(f"--form must be one of {', '.join(FORM_CHOICES)}, not {self.form!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UsageError(f"--threads must be a positive integer, not {self.threads!r}")
        if isinstance(self.latency_passes, bool) or not isinstance(self.latency_passes, int) or self.latency_passes < 1:
            raise UsageError(f"--latency-passes must be a positive integer, not {self.latency_passes!r}")
        if self.clock not in ("wall", "process"):
            raise UsageError(f"--clock must be wall or process, not {self.clock!r}")
        if self.clock == "process" and self.threads != 1:
            raise UsageError("--clock process measures CPU time, a latency only with one thread: add --threads 1")
        if self.orientation not in ORIENTATION_CHOICES:
            raise UsageError(f"--orientation must be one of {', '.join(ORIENTATION_CHOICES)}")
        if isinstance(self.calib_rows, bool) or not isinstance(self.calib_rows, int) or self.calib_rows < 1:
            raise UsageError(f"--calib-rows must be a positive integer, not {self.calib_rows!r}")
        if (isinstance(self.calib_cache_mb, bool) or not isinstance(self.calib_cache_mb, (int, float))
                or not self.calib_cache_mb >= 0 or self.calib_cache_mb == float("inf")):
            raise UsageError(f"--calib-cache-mb must be a number >= 0, not {self.calib_cache_mb!r}")
        if self.providers:
            from .calibrate import providers_for

            providers_for(self.providers)  # a provider this onnxruntime lacks: one line, exit 2
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}")
        if self.sensitivity not in SENSITIVITIES:
            raise UsageError(f"--sensitivity must be one of {', '.join(SENSITIVITIES)}, not {self.sensitivity!r}")
        if (isinstance(self.sensitivity_samples, bool) or not isinstance(self.sensitivity_samples, int)
                or self.sensitivity_samples < 1):
            raise UsageError(f"--sensitivity-samples must be a positive integer, not {self.sensitivity_samples!r}")
        ranks = self.sensitivity_ranks
        if (isinstance(ranks, (str, bytes)) or not ranks
                or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in ranks)):
            raise UsageError(f"--sensitivity-ranks must be positive integers, e.g. 1,3, not {ranks!r}")
        self.sensitivity_ranks = tuple(sorted(set(int(r) for r in ranks)))
        if self.distortion not in DISTORTIONS:
            raise UsageError(f"--distortion must be one of {', '.join(DISTORTIONS)}, not {self.distortion!r}")
        for p in list(self.include) + list(self.exclude):
            try:
                re.compile(p)
            except re.error as e:
                raise UsageError(f"invalid pattern {p!r}: {e}") from None

    @property
    def criterion(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.max_error is not None:
            return f"max-error {self.max_error}"
        if self.target_macs is not None:
            return f"target-macs {self.target_macs}"
        if self.target_ratio is not None:
            return f"target-ratio {self.target_ratio}"
        if self.target_speedup is not None:
            return f"target-speedup {self.target_speedup}"
        return f"rank {self.rank if self.rank is not None else 1}"

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.__dict__.items()}
