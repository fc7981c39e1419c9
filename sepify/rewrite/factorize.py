"""Low-rank factorization of a Conv kernel into a depthwise + pointwise pair. Supported rewrites
(factors listed in execution order):
- ``"dw-first"`` (MobileNet form): Conv(W, group=g) => Conv(D, group=M), then Conv1x1(P, group=g)
- ``"pw-first"``:                  Conv(W, group=g) => Conv1x1(Q, group=g), then Conv(S, group=N)

Approach:
    A Conv weight W has shape (N, M/g, k1..kd), d in 1..3, with g groups, M input channels,
    N output channels, Ng = N/g, Mg = M/g and K = k1*...*kd. The Conv is linear in W, so it
    splits into two Convs whenever W is a sum of products of a "channel" factor and a
    "spatial" factor. Cut W into matrices ("slices"), take each slice's SVD A = U S Vt and
    keep the r largest singular triplets (s_i, u_i, v_i):

    dw-first: one slice per input channel m (global index m = j*Mg + m_local of group j):
        A_m = W[j*Ng:(j+1)*Ng, m_local] reshaped (Ng, K)
        - D = (M*r, 1, k1..kd), group=M:   D[m*r + i, 0]        = sqrt(s_i) * v_i  (reshaped to k)
        - P = (N, Mg*r, 1..1), group=g:    P[n, m_local*r + i]  = sqrt(s_i) * u_i[n_local]
        D carries strides/pads/dilations, P carries the bias. Exact when r = min(Ng, K).
        MACs = (M*r*K + N*Mg*r) * P_out                  (original Conv: N*Mg*K * P_out)

    pw-first: one slice per output channel n:
        A_n = W[n] reshaped (Mg, K)
        - Q = (N*r, Mg, 1..1), group=g:    Q[n*r + i, :]        = sqrt(s_i) * u_i
        - S = (N, r, k1..kd), group=N:     S[n, i]              = sqrt(s_i) * v_i  (reshaped to k)
        Q runs at the input resolution (stride 1, no pads); S carries strides/pads/dilations and
        the bias. Exact when r = min(Mg, K).
        MACs = N*r*Mg * P_in + N*r*K * P_out

    P_in / P_out are the products of the input / output spatial dims times the batch. Summed
    over all slices, the error of a rank-r rewrite is (Eckart-Young, per slice):
        rel_error(r)  = sqrt(sum of dropped s_i^2 over all slices) / ||W||_F
        energy(r)     = 1 - rel_error(r)^2          (fraction of ||W||_F^2 kept)

Worked example:
    W = (256, 3, 5, 5), g = 1, dw-first, P_in = P_out = 64: three slices of 256 x 25, max rank 25.
    At r = 1: D = (3, 1, 5, 5) with group=3, P = (256, 3, 1, 1) with group=1, and
        MACs = (3*1*25 + 256*3*1) * 64 = 4,800 + 49,152 = 53,952    vs  256*3*25 * 64 = 1,228,800.

    A rank-1 kernel is reproduced exactly at r = 1: W = (2, 1, 3) = [[[1, 2, 3]], [[2, 4, 6]]]
    is the single slice [[1, 2, 3], [2, 4, 6]] = sqrt(70) * ([1, 2]/sqrt 5) (x) ([1, 2, 3]/sqrt 14).
    On 8 input / 6 output positions the pair costs (1*1*3 + 2*1*1) * 6 = 30 MACs (original 36).

    >>> w = np.array([[[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.0]]])
    >>> spec = spectrum(w)
    >>> spec.max_rank, round(spec.rel_error(1), 12), spec.macs(1, p_in=8, p_out=6)
    (2, 0.0, 30)
    >>> d, p = spec.factors(1)
    >>> d.shape, p.shape
    ((1, 1, 3), (2, 1, 1))
    >>> bool(np.allclose(reconstruct(d, p, "dw-first", 1, w.shape), w))
    True

Data-aware factorization (calibration data; docs/rewrite.md, "Calibrated factorization"):
    Per group j a patch x in R^d, d = Mg*K (index m_local*K + k), and the layer is y = W_j x + b_j.
    ``LayerStats`` accumulates, over sampled output positions, the sums of x~ (the input the
    REWRITTEN model feeds the layer) and x (the ORIGINAL model's input) and their second
    moments; ``patches`` is the im2col that produces the rows. ``fit`` minimises, over the
    structured kernels A the two factor Convs can compute (dw-first: A[n, m*K+k] =
    sum_i P[n, m*r+i] D[m*r+i, k]; pw-first: A[n, m*K+k] = sum_i S[n,i,k] Q[n*r+i, m]),
        err(A) = tr(W Ctt W^T) - 2 tr(W Ctx A^T) + tr(A C~ A^T)  +  lam_j ||A_j - W_j||^2
    with the centred moments C~ = Cov(x~), Ctx = Cov(x, x~), Ctt = Cov(x); the new bias is
    bhat = W E[x] + b - A E[x~] and the reported error sqrt(err(A) / tr(W Ctt W^T)). The ridge
    (lam_j = lam * mean eigenvalue of C~_j) acts as virtual isotropic data targeting W: full rank
    stays exact, unexcited directions keep the weight-only result. "refit": the second factor
    in closed form given the first (the weight-SVD one; for dw-first layers with <= 16 input
    channels per group also the per-channel whitened one, the better kept) (dw-first:
    P = W Ctx B (B^T C~ B)^-1, B block-diagonal from D); "als": alternating exact block
    minimisations from there.

    Worked example: one input channel, two taps, W[0] = [2, 0], W[1] = [0, 1], tap variances
    1 and 9 with covariance 1.5. The output variance is 13; at rank 1 the weight-only SVD loses
    output 1 (error sqrt(9/13) = 0.832), the refit predicts it from tap 0 (residual 9 - 1.5^2:
    sqrt(6.75/13) = 0.721), the optimum [W C^1/2]_1 C^-1/2 (whitened SVD, exact for M = 1)
    drops the smaller eigenvalue (13 - sqrt 61)/2 of W C W^T: sqrt(2.595/13) = 0.447.

    >>> w = np.array([[[2.0, 0.0]], [[0.0, 1.0]]])
    >>> stats = LayerStats.from_same(1, np.zeros((1, 2)), np.array([[[1.0, 1.5], [1.5, 9.0]]]))
    >>> f = fit(w, None, 1, "dw-first", 1, stats, method="refit", lam=0.0, init="svd")
    >>> round(f.weight_error, 3), round(f.error, 3)
    (0.832, 0.721)
    >>> round(fit(w, None, 1, "dw-first", 1, stats, lam=0.0, init="whitened").error, 3)
    0.447
    >>> round(fit(w, None, 1, "dw-first", 1, stats, method="refit", lam=0.0).error, 3)  # auto
    0.447

Budget allocation lives in :mod:`sepify.rewrite.allocate`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np


__all__ = [
    "DEFAULT_LAM",
    "default_lam",
    "Fit",
    "LayerStats",
    "METHODS",
    "OutputStats",
    "Moments",
    "conv_output_spatial",
    "fit",
    "output_error_curve",
    "patches",
    "ORIENTATIONS",
    "KEEP",
    "Spectrum",
    "original_macs",
    "reconstruct",
    "spectrum",
]

ORIENTATIONS = ("dw-first", "pw-first")
KEEP = "original"  # the allocator's option of leaving a layer as it is (no error, its original MACs)

# Slack for ``rank_for_energy`` / ``rank_for_error``: a rank whose energy is within this of the
# requested fraction (or whose error is within this of the bound) counts as meeting it, so that
# e.g. ``rank_for_energy(1.0)`` is not defeated by rounding.
_TOL = 1e-12


# --------------------------------------------------------------------------- validation helpers


def _as_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _check_orientation(orientation) -> str:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    return orientation


def _check_shape(weight_shape, group) -> tuple[tuple[int, ...], int]:
    """Validate a Conv weight shape (N, M/g, k1..kd) and group; return them normalised."""
    shape = tuple(_as_int(x, "weight dimension") for x in weight_shape)
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            f"Conv weight must have 3 to 5 dims (N, M/g, k1..kd with d in 1..3), got shape {shape}"
        )
    if any(x < 1 for x in shape):
        raise ValueError(f"Conv weight dims must all be >= 1, got shape {shape}")
    group = _as_int(group, "group")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if shape[0] % group:
        raise ValueError(
            f"group={group} does not divide the {shape[0]} output channels of weight {shape}"
        )
    return shape, group


def _dims(shape: tuple[int, ...], group: int) -> tuple[int, int, int, int]:
    """(N, Mg, M, K) of a validated shape."""
    n, mg = shape[0], shape[1]
    return n, mg, mg * group, math.prod(shape[2:])


def _count(value, what: str):
    """A position count: a non-negative int, or a formula of symbolic dims (any object with
    polynomial ``+``/``*``, as :class:`sepify.cost.symbolic.Poly`), which is kept as it is."""
    return value if hasattr(value, "terms") else _check_count(value, what)


def _check_count(value, what: str) -> int:
    value = _as_int(value, what)
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------- spectrum


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values (and vectors) of every slice of one Conv weight in one orientation.

    Build with :func:`spectrum`. ``max_rank`` = min(rows, cols) of the slices: min(N/g, K) for
    dw-first, min(M/g, K) for pw-first. Equality is identity (the arrays are not compared).
    """

    orientation: str
    group: int
    weight_shape: tuple[int, ...]
    max_rank: int
    # Batched SVD of the stacked slices, float64, read-only: u (B, rows, R), s (B, R), vt (B, R, K).
    _u: np.ndarray = field(repr=False)
    _s: np.ndarray = field(repr=False)
    _vt: np.ndarray = field(repr=False)
    # _rel[r] / _energy[r] for r = 0..max_rank, nonincreasing / nondecreasing in r.
    _rel: np.ndarray = field(repr=False)
    _energy: np.ndarray = field(repr=False)
    _norm_sq: float = field(repr=False)
    _dtype: np.dtype = field(repr=False)

    # -- errors -------------------------------------------------------------------------------

    def _rank(self, rank) -> int:
        rank = _as_int(rank, "rank")
        if not 1 <= rank <= self.max_rank:
            raise ValueError(
                f"rank must be in 1..{self.max_rank} for a {self.orientation} factorization of "
                f"weight {self.weight_shape} (group={self.group}), got {rank}"
            )
        return rank

    @property
    def norm_sq(self) -> float:
        """||W||_F^2 (= sum of all squared singular values), in float64."""
        return self._norm_sq

    @property
    def singular_values(self) -> np.ndarray:
        """Read-only (num_slices, max_rank) array, each row descending."""
        return self._s

    def rel_error(self, rank: int) -> float:
        """sqrt(sum of dropped s^2 over all slices) / ||W||_F at ``rank`` (0 if W == 0)."""
        return float(self._rel[self._rank(rank)])

    def energy(self, rank: int) -> float:
        """Fraction of ||W||_F^2 kept at ``rank``: 1 - rel_error(rank)^2 (1 if W == 0)."""
        return float(self._energy[self._rank(rank)])

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest rank with energy(rank) >= fraction (within 1e-12); fraction in [0, 1]."""
        fraction = float(fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"energy fraction must be in [0, 1], got {fraction}")
        i = int(np.searchsorted(self._energy[1:], fraction - _TOL, side="left"))
        return min(i, self.max_rank - 1) + 1  # energy(max_rank) == 1 exactly, so i < max_rank

    def rank_for_error(self, max_rel_error: float) -> int:
        """Smallest rank with rel_error(rank) <= max_rel_error (within 1e-12); bound >= 0."""
        bound = float(max_rel_error)
        if not bound >= 0.0:  # also rejects NaN
            raise ValueError(f"max_rel_error must be >= 0, got {max_rel_error}")
        i = int(np.searchsorted(-self._rel[1:], -(bound + _TOL), side="left"))
        return min(i, self.max_rank - 1) + 1  # rel_error(max_rank) == 0 exactly

    # -- factors and cost ---------------------------------------------------------------------

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(first, second) Conv weights in execution order, in the dtype of the input weight.

        dw-first: (depthwise (M*r, 1, *k) for group=M, pointwise (N, Mg*r, 1..1) for group=g).
        pw-first: (pointwise (N*r, Mg, 1..1) for group=g, spatial (N, r, *k) for group=N).
        """
        r = self._rank(rank)
        n, mg, m, _ = _dims(self.weight_shape, self.group)
        g, kernel = self.group, self.weight_shape[2:]
        ones = (1,) * len(kernel)
        root = np.sqrt(self._s[:, :r])  # (B, r)
        left = self._u[:, :, :r] * root[:, None, :]  # (B, rows, r): sqrt(s_i) * u_i
        right = self._vt[:, :r, :] * root[:, :, None]  # (B, r, K):   sqrt(s_i) * v_i
        if self.orientation == "dw-first":
            # slice b = j*Mg + m_local = input channel m; rows = n_local of group j
            first = right.reshape(m * r, 1, *kernel)
            second = left.reshape(g, mg, n // g, r).transpose(0, 2, 1, 3)
            second = second.reshape(n, mg * r, *ones)
        else:
            # slice b = output channel n; rows = input channel of n's group
            first = left.transpose(0, 2, 1).reshape(n * r, mg, *ones)
            second = right.reshape(n, r, *kernel)
        return (
            np.ascontiguousarray(first, dtype=self._dtype),
            np.ascontiguousarray(second, dtype=self._dtype),
        )

    def macs(self, rank: int, p_in: int, p_out: int) -> int:
        """Multiply-accumulates of the factorized pair at ``rank``.

        dw-first: (M*r*K + N*Mg*r) * p_out; pw-first: N*r*Mg * p_in + N*r*K * p_out. With
        ``p_in``/``p_out`` formulas of symbolic dims, the MACs are a formula.
        """
        r = self._rank(rank)
        p_in, p_out = _count(p_in, "p_in"), _count(p_out, "p_out")
        n, mg, m, k = _dims(self.weight_shape, self.group)
        if self.orientation == "dw-first":
            return (m * r * k + n * mg * r) * p_out
        return n * r * mg * p_in + n * r * k * p_out


def _weight64(weight, group) -> tuple[np.ndarray, tuple[int, ...], int, np.dtype]:
    """A Conv weight checked (shape against ``group``, real, finite) and as float64, with its
    shape, group and the dtype factors come back in (float64 for a non-float weight)."""
    w = np.asarray(weight)
    shape, group = _check_shape(w.shape, group)
    if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
        raise ValueError(f"Conv weight must be a real numeric array, got dtype {w.dtype}")
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.dtype(np.float64)
    w64 = w.astype(np.float64, copy=False)
    if not np.all(np.isfinite(w64)):
        raise ValueError("Conv weight contains NaN or infinite values")
    return w64, shape, group, dtype


def spectrum(weight: np.ndarray, group: int = 1, orientation: str = "dw-first") -> Spectrum:
    """SVD every slice of Conv ``weight`` (N, M/g, k1..kd) for ``orientation``.

    One batched ``np.linalg.svd`` call over the stacked slices, computed in float64. Factors come
    back in ``weight.dtype`` (float64 if the weight is not a floating-point array).
    """
    _check_orientation(orientation)
    w64, shape, group, dtype = _weight64(weight, group)
    n, mg, m, k = _dims(shape, group)
    if orientation == "dw-first":
        # (N, Mg, K) -> (g, Ng, Mg, K) -> (g, Mg, Ng, K) -> (M, Ng, K): slice m = j*Mg + m_local
        ng = n // group
        stacked = w64.reshape(group, ng, mg, k).transpose(0, 2, 1, 3).reshape(m, ng, k)
    else:
        stacked = w64.reshape(n, mg, k)
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    max_rank = s.shape[1]

    # tail[r] = sum of squared singular values dropped at rank r (r = 0..max_rank), summed
    # smallest-first; tail[max_rank] = 0 and tail is nonincreasing by construction.
    per_rank = np.sum(s * s, axis=0)
    tail = np.zeros(max_rank + 1)
    tail[:max_rank] = np.cumsum(per_rank[::-1])[::-1]
    norm_sq = float(tail[0])
    if norm_sq > 0.0:
        ratio = np.minimum(tail / norm_sq, 1.0)
        rel, energy = np.sqrt(ratio), 1.0 - ratio
    else:
        rel, energy = np.zeros(max_rank + 1), np.ones(max_rank + 1)
    for a in (u, s, vt, rel, energy):
        a.setflags(write=False)
    return Spectrum(
        orientation=orientation,
        group=group,
        weight_shape=shape,
        max_rank=max_rank,
        _u=u,
        _s=s,
        _vt=vt,
        _rel=rel,
        _energy=energy,
        _norm_sq=norm_sq,
        _dtype=dtype,
    )


def original_macs(weight_shape, group: int, p_out: int) -> int:
    """MACs of the original Conv: N * (M/g) * K * p_out (a formula for a symbolic ``p_out``)."""
    shape, _ = _check_shape(weight_shape, group)
    return _count(p_out, "p_out") * math.prod(shape)


def reconstruct(first, second, orientation: str, group: int, weight_shape) -> np.ndarray:
    """The dense Conv kernel equivalent to running ``first`` then ``second`` (see ``factors``)."""
    _check_orientation(orientation)
    shape, g = _check_shape(weight_shape, group)
    n, mg, m, k = _dims(shape, g)
    kernel, ones = shape[2:], (1,) * (len(shape) - 2)
    a, b = np.asarray(first), np.asarray(second)
    if orientation == "dw-first":
        if a.ndim != len(shape) or a.shape[0] % m or a.shape[1:] != (1, *kernel):
            raise ValueError(
                f"depthwise factor must be (M*r, 1, *{kernel}) with M={m}, got {a.shape}"
            )
        r = a.shape[0] // m
        if b.shape != (n, mg * r, *ones):
            raise ValueError(f"pointwise factor must be {(n, mg * r, *ones)}, got {b.shape}")
        d = a.reshape(g, mg, r, k)  # [j, m_local, i, :]
        p = b.reshape(g, n // g, mg, r)  # [j, n_local, m_local, i]
        w = np.einsum("jnmi,jmik->jnmk", p, d)
    else:
        if a.ndim != len(shape) or a.shape[0] % n or a.shape[1:] != (mg, *ones):
            raise ValueError(
                f"pointwise factor must be (N*r, {mg}, 1..1) with N={n}, got {a.shape}"
            )
        r = a.shape[0] // n
        if b.shape != (n, r, *kernel):
            raise ValueError(f"spatial factor must be {(n, r, *kernel)}, got {b.shape}")
        w = np.einsum("nim,nik->nmk", a.reshape(n, r, mg), b.reshape(n, r, k))
    return w.reshape(shape)


# =========================================================================== data-aware factorization
#
# Everything below works on per-group "patch" vectors: for group j at one output position, the
# input patch x in R^(Mg*K) has index m_local*K + k (channel-major, the kernel flattened in C order,
# exactly as W[n, m_local, k1..kd] flattens), so the original layer is y = W_j x + b_j with
# W_j = W[j*Ng:(j+1)*Ng].reshape(Ng, Mg*K). See docs/rewrite.md, "Calibrated factorization".

# Default relative ridge strength (``lam=None``): the penalty is lam_j * ||A_j - W_j||_F^2 with
# lam_j = lam * (mean eigenvalue of Cov(x~) of group j), i.e. virtual isotropic calibration data
# with lam times the average input variance, whose target is the original layer; by default
#     lam = max(DEFAULT_LAM, LAM_PER_DIM * d / n)      (d = Mg*K patch entries, n rows)
# -- more shrinkage toward the weight when the rows are few for the dimension. Chosen by
# measurement (bench/bench_fit_layers.py: held-out output error of trained ddddocr convs, d from
# 216 to 576, 600 to 30,000 rows, lam scanned over 1e-3..1): this rule was within 0.005 of the
# best scanned lam in every case, a fixed 1e-2 up to 0.07 worse with few rows.
DEFAULT_LAM = 1e-3
LAM_PER_DIM = 0.3
# Relative diagonal jitter added to every normal matrix (numerical safety for exactly singular
# systems, e.g. all-zero weight slices); far below any effect on the reported errors.
_JITTER = 1e-12
# Dimension of the largest joint block solved at once in the ALS depthwise step; above it the step
# is a block Gauss-Seidel sweep over chunks of input channels (each an exact block minimisation).
_GS_BLOCK = 768
# Rows converted to float64 at a time by LayerStats.accumulate (bounds its temporary memory).
_ACC_CHUNK = 2048

METHODS = ("als", "refit")
INITS = ("auto", "svd", "whitened")
# init="auto" (dw-first) also tries the per-channel whitened start when a group has at most this
# many input channels, and keeps whichever refit has the lower error on the statistics. Measured
# (bench_fit_layers, ddddocr): whitened wins clearly with 1 input channel (rank 2: 0.60 vs 0.72
# held-out), loses with 24..64 (it ignores cross-channel correlation, which the refit uses).
_AUTO_WHITEN_MAX_MG = 16


def _f64(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


@dataclass(frozen=True, eq=False)
class Moments:
    """Means and centred (1/n-normalised) covariances of one layer's patches, float64, per group.

    ``cxx`` = Cov(x~), ``ctx`` = Cov(x, x~) (rows: original input, columns: rewritten input),
    ``ctt`` = Cov(x). For statistics of the non-sequential case the three are the same array;
    for :class:`OutputStats` ``mean_t``, ``ctx`` and ``ctt`` are None (not known).
    """

    n: int
    mean_x: np.ndarray  # (g, d)
    mean_t: np.ndarray  # (g, d)
    cxx: np.ndarray  # (g, d, d)
    ctx: np.ndarray  # (g, d, d)
    ctt: np.ndarray  # (g, d, d)


@dataclass(eq=False)
class LayerStats:
    """Sufficient statistics of one layer's input patches (see docs/rewrite.md), float64.

    ``x~`` is the input the REWRITTEN model feeds the layer, ``x`` the ORIGINAL model's input to
    it; every array has a leading group axis ``g`` and ``d = Mg*K`` patch entries:

    - ``n``: number of patch rows accumulated; ``sum_x`` / ``sum_t``: (g, d) sums of x~ / x;
    - ``xx`` = sum x~ x~^T, ``tx`` = sum x x~^T (rows original, columns rewritten),
      ``tt`` = sum x x^T: (g, d, d) each.

    In the non-sequential case (x~ == x, :meth:`from_same`) ``sum_t``, ``tx`` and ``tt`` are the
    very same arrays as ``sum_x`` and ``xx`` (no extra memory); :attr:`same` tells. Memory is
    3 * g * d^2 * 8 bytes (one third of it when ``same``), independent of the number of rows.
    """

    n: int
    sum_x: np.ndarray
    sum_t: np.ndarray
    xx: np.ndarray
    tx: np.ndarray
    tt: np.ndarray

    def __post_init__(self):
        self.n = _check_count(self.n, "n")
        converted: dict[int, np.ndarray] = {}  # keep shared arrays shared

        def conv(a, what):
            key = id(a)
            if key not in converted:
                converted[key] = _f64(a, what)
            return converted[key]

        self.sum_x, self.sum_t = conv(self.sum_x, "sum_x"), conv(self.sum_t, "sum_t")
        self.xx, self.tx, self.tt = conv(self.xx, "xx"), conv(self.tx, "tx"), conv(self.tt, "tt")
        if self.sum_x.ndim != 2:
            raise ValueError(f"sum_x must be (g, Mg*K), got shape {self.sum_x.shape}")
        g, d = self.sum_x.shape
        if g < 1 or d < 1:
            raise ValueError(f"sum_x must be (g, Mg*K) with g, Mg*K >= 1, got {self.sum_x.shape}")
        if self.sum_t.shape != (g, d):
            raise ValueError(f"sum_t must be {(g, d)}, got {self.sum_t.shape}")
        for name in ("xx", "tx", "tt"):
            if getattr(self, name).shape != (g, d, d):
                raise ValueError(f"{name} must be {(g, d, d)}, got {getattr(self, name).shape}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def zeros(cls, group: int, size: int, *, same: bool = True) -> "LayerStats":
        """Empty statistics for ``group`` groups of ``size`` = Mg*K patch entries.

        ``same=True`` shares the arrays of x and x~ (for the non-sequential case); it is undone
        (copied) automatically the first time :meth:`accumulate` gets distinct ``t_rows``.
        """
        group, size = _as_int(group, "group"), _as_int(size, "size")
        if group < 1 or size < 1:
            raise ValueError(f"group and size must be >= 1, got {group}, {size}")
        s, c = np.zeros((group, size)), np.zeros((group, size, size))
        if same:
            return cls(0, s, s, c, c, c)
        return cls(0, s, np.zeros_like(s), c, np.zeros_like(c), np.zeros_like(c))

    @classmethod
    def from_same(cls, n: int, sum_x, xx) -> "LayerStats":
        """Statistics of the non-sequential case x~ == x: ``sum_t = sum_x``, ``tx = tt = xx``."""
        sum_x, xx = _f64(sum_x, "sum_x"), _f64(xx, "xx")
        return cls(n, sum_x, sum_x, xx, xx, xx)

    @classmethod
    def from_rows(cls, x_rows, t_rows=None) -> "LayerStats":
        """Statistics of (rows, g, Mg*K) patch arrays (``t_rows`` None: x == x~)."""
        x = np.asarray(x_rows)
        if x.ndim != 3:
            raise ValueError(f"patch rows must be (rows, g, Mg*K), got shape {x.shape}")
        return cls.zeros(x.shape[1], x.shape[2], same=t_rows is None).accumulate(x, t_rows)

    @property
    def group(self) -> int:
        return self.sum_x.shape[0]

    @property
    def size(self) -> int:
        """d = Mg*K, the length of one group's patch."""
        return self.sum_x.shape[1]

    @property
    def same(self) -> bool:
        """True when x and x~ share their arrays (non-sequential statistics)."""
        return self.sum_t is self.sum_x and self.tx is self.xx and self.tt is self.xx

    def _unshare(self) -> None:
        if self.sum_t is self.sum_x:
            self.sum_t = self.sum_x.copy()
        if self.tx is self.xx or self.tx is self.tt:
            self.tx = self.tx.copy()
        if self.tt is self.xx:
            self.tt = self.xx.copy()

    def accumulate(self, x_rows, t_rows=None) -> "LayerStats":
        """Add patch rows in place and return ``self``.

        ``x_rows``: (rows, g, Mg*K) patches of the rewritten model's input to the layer (x~);
        ``t_rows``: the same positions of the original model's input (x), or None when they are
        equal (the non-sequential case). Any float dtype; accumulated in float64, in chunks of
        2048 rows (the temporary memory is bounded, whatever the number of rows).
        """
        x = np.asarray(x_rows)
        shape = (self.group, self.size)
        if x.ndim != 3 or x.shape[1:] != shape:
            raise ValueError(f"x_rows must be (rows, {shape[0]}, {shape[1]}), got {x.shape}")
        t = None if t_rows is None else np.asarray(t_rows)
        if t is not None and t.shape != x.shape:
            raise ValueError(f"t_rows must have the shape of x_rows {x.shape}, got {t.shape}")
        if t is not None and t is x:
            t = None
        if t is not None and self.same:
            self._unshare()
        for start in range(0, x.shape[0], _ACC_CHUNK):
            xc = _f64(x[start:start + _ACC_CHUNK], "x_rows").transpose(1, 0, 2)  # (g, rows, d)
            if not np.all(np.isfinite(xc)):
                raise ValueError("x_rows contains NaN or infinite values")
            xxc = np.matmul(xc.transpose(0, 2, 1), xc)
            self.sum_x += xc.sum(axis=1)
            self.xx += xxc
            if t is None:
                if not self.same:
                    self.sum_t += xc.sum(axis=1)
                    self.tx += xxc
                    self.tt += xxc
                continue
            tc = _f64(t[start:start + _ACC_CHUNK], "t_rows").transpose(1, 0, 2)
            if not np.all(np.isfinite(tc)):
                raise ValueError("t_rows contains NaN or infinite values")
            self.sum_t += tc.sum(axis=1)
            self.tx += np.matmul(tc.transpose(0, 2, 1), xc)
            self.tt += np.matmul(tc.transpose(0, 2, 1), tc)
        self.n += x.shape[0]
        return self

    def merge(self, other: "LayerStats") -> "LayerStats":
        """A new LayerStats holding the rows of both (neither input is modified)."""
        if not isinstance(other, LayerStats):
            raise TypeError(f"can only merge LayerStats, got {type(other).__name__}")
        if (other.group, other.size) != (self.group, self.size):
            raise ValueError(
                f"cannot merge statistics of shape {(other.group, other.size)} into "
                f"{(self.group, self.size)}"
            )
        if self.same and other.same:
            return LayerStats.from_same(self.n + other.n, self.sum_x + other.sum_x,
                                        self.xx + other.xx)
        return LayerStats(
            self.n + other.n,
            self.sum_x + other.sum_x,
            self.sum_t + other.sum_t,
            self.xx + other.xx,
            self.tx + other.tx,
            self.tt + other.tt,
        )

    def centered(self) -> Moments:
        """Means and 1/n-normalised centred covariances (shared when :attr:`same`)."""
        if self.n < 1:
            raise ValueError("no rows accumulated: cannot compute moments")
        n = float(self.n)
        mx = self.sum_x / n
        cxx = self.xx / n - mx[:, :, None] * mx[:, None, :]
        cxx = 0.5 * (cxx + cxx.transpose(0, 2, 1))
        if self.same:
            return Moments(self.n, mx, mx, cxx, cxx, cxx)
        mt = self.sum_t / n
        ctx = self.tx / n - mt[:, :, None] * mx[:, None, :]
        ctt = self.tt / n - mt[:, :, None] * mt[:, None, :]
        ctt = 0.5 * (ctt + ctt.transpose(0, 2, 1))
        return Moments(self.n, mx, mt, cxx, ctx, ctt)


@dataclass(eq=False)
class OutputStats:
    """Paired statistics with the ORIGINAL side projected on the layer's weight, float64.

    The fit reads the original input x only through the original layer's output ``y = W_j x``:
    ``W Cov(x, x~) = Cov(y, x~)``, ``tr(W Cov(x) W^T) = tr Cov(y)`` and ``W E[x] = E[y]``. So
    instead of ``sum_t`` (g, d), ``tx`` and ``tt`` (g, d, d) these hold, for the ``weight`` they
    were computed with (``fit`` refuses another one):

    - ``n``, ``sum_x`` (g, d), ``xx`` (g, d, d): as :class:`LayerStats` (x~, the rewritten
      model's input);
    - ``sum_y`` (g, Ng) = sum of y; ``yx`` (g, Ng, d) = sum y x~^T; ``yy`` (g,) = sum ||y||^2;
    - optional ``ref_sum`` (g, Ng), ``ref_sq`` (g,): the sum and sum of squares of a *reference*
      tensor whose variance normalises the relative errors instead of y's. A residual target
      (:mod:`sepify.rewrite.calibrate`, "Residual targets") fits the conv to
      ``y = W x + s - s~`` (the original sum minus the drifted other branch of the Add it feeds):
      its errors are then those of the Add's output, and are normalised by that output's
      variance (``W x + s``), as the measurement on the Add's output is.

    ``y`` need not be ``W x`` at all: the fit minimises ``E||A x~ + bhat - y||^2`` (plus the
    ridge toward W) for whatever rows y were accumulated.

    Accumulating ``y x~^T`` costs ``Ng/d`` (1/K for a layer with as many outputs as inputs) of
    ``x x~^T``'s GEMM, and the fit skips its ``W Cov(x, x~)`` product. Same fits as the
    LayerStats of the same rows (tested).
    """

    n: int
    sum_x: np.ndarray
    xx: np.ndarray
    weight: np.ndarray
    sum_y: np.ndarray
    yx: np.ndarray
    yy: np.ndarray
    ref_sum: np.ndarray | None = None
    ref_sq: np.ndarray | None = None

    def __post_init__(self):
        self.n = _check_count(self.n, "n")
        self.sum_x, self.xx = _f64(self.sum_x, "sum_x"), _f64(self.xx, "xx")
        self.weight = _f64(self.weight, "weight")
        self.sum_y, self.yx, self.yy = _f64(self.sum_y, "sum_y"), _f64(self.yx, "yx"), _f64(self.yy, "yy")
        if (self.ref_sum is None) != (self.ref_sq is None):
            raise ValueError("ref_sum and ref_sq go together")
        g, d = self.sum_x.shape
        ng = self.weight.shape[0] // g
        checks = [("xx", (g, d, d)), ("sum_y", (g, ng)), ("yx", (g, ng, d)), ("yy", (g,))]
        if self.ref_sum is not None:
            self.ref_sum, self.ref_sq = _f64(self.ref_sum, "ref_sum"), _f64(self.ref_sq, "ref_sq")
            checks += [("ref_sum", (g, ng)), ("ref_sq", (g,))]
        for name, shape in checks:
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must be {shape}, got {getattr(self, name).shape}")

    @property
    def group(self) -> int:
        return self.sum_x.shape[0]

    @property
    def size(self) -> int:
        return self.sum_x.shape[1]

    @classmethod
    def from_rows(cls, x_rows, t_rows, weight) -> "OutputStats":
        """Statistics of (rows, g, Mg*K) patch arrays of x~ and x for Conv ``weight`` (float64)."""
        x, t = _f64(x_rows, "x_rows"), _f64(t_rows, "t_rows")
        g = x.shape[1]
        w = _f64(weight, "weight").reshape(g, -1, x.shape[2])
        y = np.einsum("pjd,jnd->pjn", t, w)
        return cls(x.shape[0], x.sum(0), np.einsum("pjd,pje->jde", x, x), weight, y.sum(0),
                   np.einsum("pjn,pjd->jnd", y, x), np.einsum("pjn,pjn->j", y, y))


# --------------------------------------------------------------------------- patches (im2col)


def _conv_geometry(spatial, kernel_shape, strides, pads, dilations):
    d = len(kernel_shape)
    kernel = tuple(_as_int(k, "kernel_shape") for k in kernel_shape)
    strides = (1,) * d if strides is None else tuple(_as_int(s, "strides") for s in strides)
    dil = (1,) * d if dilations is None else tuple(_as_int(s, "dilations") for s in dilations)
    pads = (0,) * (2 * d) if pads is None else tuple(_as_int(p, "pads") for p in pads)
    if len(strides) != d or len(dil) != d or len(pads) != 2 * d or len(spatial) != d:
        raise ValueError(
            f"{d}-D kernel needs {d} strides, {d} dilations, {2 * d} pads and a {d}-D input; got "
            f"strides={strides}, dilations={dil}, pads={pads}, input spatial dims {tuple(spatial)}"
        )
    if min(kernel) < 1 or min(strides) < 1 or min(dil) < 1 or min(pads) < 0:
        raise ValueError(
            f"kernel, strides, dilations must be >= 1 and pads >= 0, got kernel={kernel}, "
            f"strides={strides}, dilations={dil}, pads={pads}"
        )
    out = []
    for i in range(d):
        span = dil[i] * (kernel[i] - 1) + 1
        size = spatial[i] + pads[i] + pads[i + d]
        if size < span:
            raise ValueError(
                f"padded input dim {i} ({size}) is smaller than the dilated kernel ({span})"
            )
        out.append((size - span) // strides[i] + 1)
    return kernel, strides, pads, dil, tuple(out)


def conv_output_spatial(spatial, kernel_shape, strides=None, pads=None, dilations=None):
    """Output spatial dims of a Conv with explicit ``pads`` (ONNX order: all begins, all ends)."""
    return _conv_geometry(tuple(spatial), kernel_shape, strides, pads, dilations)[4]


def patches(x, kernel_shape, strides=None, pads=None, dilations=None, group: int = 1,
            positions=None) -> np.ndarray:
    """im2col: the (rows, g, Mg*K) input patches of a Conv, in the layer's dtype.

    ``x``: (B, M, s1..sd) NCHW input, d in 1..3; ``kernel_shape`` (k1..kd); ``strides`` and
    ``dilations`` (d ints, default 1); ``pads`` in ONNX order (x1_begin, .., xd_begin, x1_end, ..,
    xd_end), default 0 -- ``auto_pad`` must be resolved into explicit pads by the caller
    (SAME_UPPER puts the odd pad at the end, SAME_LOWER at the beginning). Padding reads zeros.
    Row ``p`` is output position ``p`` in C order over (B, o1..od) (see
    :func:`conv_output_spatial`); ``positions`` (1-D ints in ``[0, B*prod(o))``) selects rows.
    Entry ``[p, j, m_local*K + k]`` is input channel ``j*Mg + m_local`` at kernel tap ``k`` (C
    order over k1..kd), so ``W_j @ patches[p, j] + b_j`` is the Conv output of group ``j``'s
    output channels at ``p``.
    """
    x = np.asarray(x)
    if x.ndim < 3 or x.ndim > 5:
        raise ValueError(f"input must be (B, M, s1..sd) with d in 1..3, got shape {x.shape}")
    batch, m = x.shape[:2]
    kernel, strides, pads, dil, out = _conv_geometry(x.shape[2:], kernel_shape, strides, pads,
                                                     dilations)
    group = _as_int(group, "group")
    if group < 1 or m % group:
        raise ValueError(f"group={group} must be >= 1 and divide the {m} input channels")
    d = len(kernel)
    total = batch * math.prod(out)
    if positions is None:
        pos = np.arange(total)
    else:
        pos = np.asarray(positions)
        if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
            raise ValueError("positions must be a 1-D integer array")
        if pos.size and (pos.min() < 0 or pos.max() >= total):
            raise ValueError(f"positions must be in [0, {total}) (B * output positions)")
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)]) if any(pads) else x
    # every (dilated) window as a strided view, then the selected positions' windows copied out:
    # the same entries as indexing each tap, ~3x faster (one contiguous K-block per channel)
    span = tuple(dil[i] * (kernel[i] - 1) + 1 for i in range(d))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + d)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)
              + tuple(slice(None, None, dl) for dl in dil)]  # (B, M, o1..od, k1..kd)
    coords = np.unravel_index(pos, (batch, *out))  # b, o1..od, each (rows,)
    cols = win[(coords[0], slice(None)) + tuple(coords[1:])]  # (rows, M, k1..kd)
    return cols.reshape(pos.size, group, (m // group) * math.prod(kernel))


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True, eq=False)
class Fit:
    """A data-aware factorization of one Conv (see :func:`fit`).

    ``first`` / ``second``: the factor weights in execution order, in the shapes and dtype of
    :meth:`Spectrum.factors`; ``bias``: (N,) bias of the second Conv (always present: the closed
    form absorbs the mean shift even when the original Conv had none).
    ``error``: predicted relative output error on the statistics, sqrt(err(A) / tr(W Ctt W^T))
    (docs/rewrite.md); ``weight_error``: the same measure for the weight-only SVD factors at the
    same rank (also with the closed-form bias), for comparison. ``lam``: the relative ridge
    strength used; ``sweeps``: ALS sweeps run (0 for ``"refit"``).
    """

    orientation: str
    rank: int
    method: str
    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray
    error: float
    weight_error: float
    lam: float
    sweeps: int

    @property
    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.first, self.second


def _rel(num: np.ndarray, den: np.ndarray) -> float:
    num, den = float(np.sum(num)), float(np.sum(den))
    num = max(num, 0.0)
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(num / den)


def _solve_spd(g: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the batched symmetric positive (semi)definite systems g x = rhs (jittered)."""
    size = g.shape[-1]
    diag = np.einsum("...ii->...i", g)
    scale = np.mean(diag, axis=-1)
    scale = np.where(scale > 0.0, scale, 1.0)
    gj = g + (_JITTER * scale)[..., None, None] * np.eye(size)
    return np.linalg.solve(gj, rhs)


@dataclass(frozen=True, eq=False)
class _Problem:
    """One layer's weight and moments in per-group form, with the ridge-modified moments."""

    shape: tuple[int, ...]
    group: int
    n: int  # N
    mg: int
    k: int
    w: np.ndarray  # (g, Ng, d) float64
    mom: Moments
    lam: np.ndarray  # (g,) absolute ridge per group
    cp: np.ndarray  # (g, d, d) Cov(x~) + lam I
    wcp: np.ndarray  # (g, Ng, d) W (Cov(x, x~) + lam I)
    w_ctx: np.ndarray  # (g, Ng, d) W Cov(x, x~)
    tt: np.ndarray  # (g,) tr(W Ctt W^T)
    wmean: np.ndarray  # (g, Ng) W E[x]
    scale: np.ndarray  # (g,) what relative errors are relative to: tt, or a reference's variance

    @property
    def ng(self) -> int:
        return self.n // self.group

    def data_error(self, a: np.ndarray) -> np.ndarray:
        """err(A) per group for a structured kernel A (g, Ng, d) (stable form when x~ == x)."""
        mom = self.mom
        if mom.ctx is not None and mom.cxx is mom.ctx and mom.ctx is mom.ctt:
            e = self.w - a
            return np.einsum("jnd,jnd->j", np.matmul(e, mom.cxx), e)
        quad = np.einsum("jnd,jnd->j", np.matmul(a, mom.cxx), a)
        return self.tt - 2.0 * np.einsum("jnd,jnd->j", self.w_ctx, a) + quad

    def new_bias(self, a: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """bhat_j = W_j mean(x) + b_j - A_j mean(x~), as (N,) float64."""
        am = np.einsum("jnd,jd->jn", a, self.mom.mean_x)
        return (self.wmean - am).reshape(-1) + bias


def default_lam(size: int, rows: int) -> float:
    """The relative ridge strength used when ``lam`` is None: max(1e-3, 0.3 * size / rows)."""
    return max(DEFAULT_LAM, LAM_PER_DIM * size / max(rows, 1))


def _problem(weight, group, stats, lam) -> tuple[_Problem, np.dtype, float]:
    w64, shape, group, dtype = _weight64(weight, group)
    if not isinstance(stats, (LayerStats, OutputStats)):
        raise TypeError(f"stats must be a LayerStats or OutputStats, got {type(stats).__name__}")
    n, mg, _, k = _dims(shape, group)
    d = mg * k
    if (stats.group, stats.size) != (group, d):
        raise ValueError(
            f"statistics are for {stats.group} group(s) of {stats.size} patch entries, but weight "
            f"{shape} with group={group} needs {group} of {d}"
        )
    if isinstance(stats, OutputStats) and (stats.weight.shape != w64.shape or not np.array_equal(stats.weight, w64)):
        raise ValueError("these OutputStats were projected on another weight than the one being fitted")
    alpha = default_lam(d, stats.n) if lam is None else float(lam)
    if not alpha >= 0.0 or not math.isfinite(alpha):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    w3 = w64.reshape(group, n // group, d)
    if isinstance(stats, OutputStats):
        if stats.n < 1:
            raise ValueError("no rows accumulated: cannot compute moments")
        cnt = float(stats.n)
        mx, my = stats.sum_x / cnt, stats.sum_y / cnt
        cxx = stats.xx / cnt - mx[:, :, None] * mx[:, None, :]
        mom = Moments(stats.n, mx, None, 0.5 * (cxx + cxx.transpose(0, 2, 1)), None, None)
        w_ctx = stats.yx / cnt - my[:, :, None] * mx[:, None, :]
        tt = stats.yy / cnt - np.einsum("jn,jn->j", my, my)
        wmean = my
        scale = tt
        if stats.ref_sum is not None:
            mr = stats.ref_sum / cnt
            scale = stats.ref_sq / cnt - np.einsum("jn,jn->j", mr, mr)
    else:
        mom = stats.centered()
        w_ctx = np.matmul(w3, mom.ctx)
        w_ctt = w_ctx if mom.ctt is mom.ctx else np.matmul(w3, mom.ctt)
        tt = np.einsum("jnd,jnd->j", w_ctt, w3)
        wmean = np.einsum("jnd,jd->jn", w3, mom.mean_t)
        scale = tt
    mean_eig = np.einsum("jii->j", mom.cxx) / d
    lam_abs = alpha * np.where(mean_eig > 0.0, mean_eig, 1.0)
    eye = np.eye(d)
    cp = mom.cxx + lam_abs[:, None, None] * eye
    wcp = w_ctx + lam_abs[:, None, None] * w3
    prob = _Problem(shape, group, n, mg, k, w3, mom, lam_abs, cp, wcp, w_ctx, tt, wmean, scale)
    return prob, dtype, alpha


# -- dw-first: D (g, Mg, r, K), P (g, Ng, Mg, r); A[j, n, m*K + k] = sum_i P[j,n,m,i] D[j,m,i,k]


def _dw_kernel(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    g, ng, mg, _ = p.shape
    return np.einsum("jnmi,jmik->jnmk", p, d).reshape(g, ng, mg * d.shape[-1])


def _dw_normal(d: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """G[j, (m,i), (m',i')] = sum_{k,k'} D[m,i,k] cov[(m,k),(m',k')] D[m',i',k'] (g, Mg r, Mg r)."""
    g, mg, r, k = d.shape
    t = np.matmul(d, cov.reshape(g, mg, k, mg * k))  # (g, Mg, r, Mg*K): rows (m,i), cols (m',k')
    t = t.reshape(g, mg * r, mg, k).transpose(0, 2, 1, 3)  # (g, m', (m,i), k')
    gm = np.matmul(t, d.transpose(0, 1, 3, 2))  # (g, m', (m,i), i')
    return gm.transpose(0, 2, 1, 3).reshape(g, mg * r, mg * r)


def _dw_rhs(d: np.ndarray, wc: np.ndarray) -> np.ndarray:
    """c[j, n, (m,i)] = sum_k wc[j, n, (m,k)] D[m,i,k]  (g, Ng, Mg r)."""
    g, mg, r, k = d.shape
    c = np.einsum("jnmk,jmik->jnmi", wc.reshape(g, -1, mg, k), d)
    return c.reshape(g, -1, mg * r)


def _dw_pstep(prob: _Problem, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form P given D (the refit); returns (P, J-part tr(c P^T)) for monitoring."""
    g, mg, r, _ = d.shape
    gm = _dw_normal(d, prob.cp)
    c = _dw_rhs(d, prob.wcp)
    p = np.swapaxes(_solve_spd(gm, np.swapaxes(c, 1, 2)), 1, 2)  # (g, Ng, Mg r)
    return p.reshape(g, prob.ng, mg, r), np.einsum("jnc,jnc->j", c, p)


def _dw_dstep(prob: _Problem, p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """D given P: exact joint solve, or block Gauss-Seidel over chunks of input channels."""
    g, mg, r, k = d.shape
    ng = prob.ng
    p2 = p.reshape(g, ng, mg * r)
    ptp = np.matmul(p2.transpose(0, 2, 1), p2).reshape(g, mg, r, mg, r)
    cp5 = prob.cp.reshape(g, mg, k, mg, k)
    rhs = np.einsum("jnmi,jnmk->jmik", p, prob.wcp.reshape(g, ng, mg, k))  # (g, Mg, r, K)
    chunk = max(1, min(mg, _GS_BLOCK // (r * k)))

    def hessian(a, b):  # H restricted to channels a..b: (g, c r K, c r K)
        h = np.einsum("jmipq,jmkpl->jmikpql", ptp[:, a:b, :, a:b, :], cp5[:, a:b, :, a:b, :])
        size = (b - a) * r * k
        return h.reshape(g, size, size)

    if chunk >= mg:
        sol = _solve_spd(hessian(0, mg), rhs.reshape(g, mg * r * k, 1))
        return sol.reshape(g, mg, r, k)
    d = d.copy()
    dd = mg * k
    # A Cp, kept current. A = P D is block-sparse in D, so for r < K it is cheaper as
    # P (Ng x Mg r) @ (D Cp) (Mg r x d) than as A (Ng x d) @ Cp (d x d), with
    # (D Cp)[(m,i), :] = sum_k D[m,i,k] Cp[(m,k), :] (the same sums, in another order)
    low = r < k
    cp4 = prob.cp.reshape(g, mg, k, dd)
    if low:
        ac = np.matmul(p2, np.matmul(d, cp4).reshape(g, mg * r, dd)).reshape(g, ng, mg, k)
    else:
        ac = np.matmul(_dw_kernel(p, d), prob.cp).reshape(g, ng, mg, k)
    for a in range(0, mg, chunk):
        b = min(mg, a + chunk)
        ds = d[:, a:b]
        h = hessian(a, b)
        grad = np.einsum("jnmi,jnmk->jmik", p[:, :, a:b], ac[:, :, a:b])  # (H D)_S, all channels
        inner = np.matmul(h, ds.reshape(g, -1, 1)).reshape(ds.shape)  # (H_SS D_S)
        new = _solve_spd(h, (rhs[:, a:b] - grad + inner).reshape(g, -1, 1)).reshape(ds.shape)
        if low:  # ac += P_S (Ng x c r) @ ((new - old) Cp rows of S) (c r x d)
            u = np.matmul(new - ds, cp4[:, a:b]).reshape(g, (b - a) * r, dd)
            ac += np.matmul(p[:, :, a:b].reshape(g, ng, (b - a) * r), u).reshape(g, ng, mg, k)
        else:
            delta = np.einsum("jnmi,jmik->jnmk", p[:, :, a:b], new - ds).reshape(g, ng, -1)
            ac += np.matmul(delta, prob.cp[:, a * k:b * k, :]).reshape(g, ng, mg, k)
        d[:, a:b] = new
    return d


def _dw_whitened(prob: _Problem, rank: int) -> np.ndarray:
    """Per-channel whitened SVD: D_m = [F_m C_mm^-1/2]_r C_mm^-1/2 rows (ignores cross-channel)."""
    g, mg, k = prob.group, prob.mg, prob.k
    cmm = np.einsum("jmkml->jmkl", prob.cp.reshape(g, mg, k, mg, k))  # (g, Mg, K, K)
    ev, vec = np.linalg.eigh(cmm)
    floor = _JITTER * np.maximum(np.mean(ev, axis=-1, keepdims=True), 1e-300)
    ev = np.maximum(ev, floor)
    inv_half = np.matmul(vec * (1.0 / np.sqrt(ev))[..., None, :], np.swapaxes(vec, -1, -2))
    f = prob.wcp.reshape(g, prob.ng, mg, k).transpose(0, 2, 1, 3)  # (g, Mg, Ng, K)
    _, s, vt = np.linalg.svd(np.matmul(f, inv_half), full_matrices=False)
    return np.matmul(vt[:, :, :rank, :] * np.sqrt(s[:, :, :rank])[..., None], inv_half)


# -- pw-first: Q (N, r, Mg), S (N, r, K); A[n, m*K + k] = sum_i Q[n,i,m] S[n,i,k]

_PW_CHUNK_FLOATS = 1 << 23  # bound on temporaries of the pw-first steps (64 MB in float64)
# ALS pw-first sweeps: both half-steps by Kronecker-preconditioned CG (_pw_q_pcg, _pw_s_pcg), at most
# these many iterations each, warm-started (each iteration lowers the objective), stopping earlier
# once every channel's r^T M^-1 r fell below _CG_TOL of its start. Measured (bench/bench_calibrate.py
# --fit-layers, trained ResNet-50 3x3 convs, rank 4): 3 + 2 reach a lower objective than the exact
# S step + 10 block-Jacobi CG iterations did, in a third to a half of the time (about dw-first's).
_CG_ITERS = 3
_CG_S_ITERS = 2
_CG_TOL = 1e-4
# Up to this Mg*r the sweeps take exact block steps instead (direct Q solves, _pw_sfit): as cheap as a
# few PCG iterations there, and exact whatever the input statistics (the preconditioner assumes
# channel and spatial correlations that roughly separate, as in images).
_PW_DIRECT_MAX = 64


def _pw_kernel(q: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    n, _, mg = q.shape
    return np.einsum("nim,nik->nmk", q, s).reshape(group, n // group, mg * s.shape[-1])


def _pw_sstep(prob: _Problem, q: np.ndarray, cov=None, wc=None):
    """S given Q per output channel; returns (G (N, rK, rK), rhs (N, rK)) for the solve.

    With ``cov`` / ``wc`` (default: the ridge-modified Cp and W Cp) other moments are used."""
    cov = prob.cp if cov is None else cov
    wc = prob.wcp if wc is None else wc
    n, r, mg = q.shape
    g, ng, k = prob.group, prob.ng, prob.k
    d = mg * k
    gm = np.empty((n, r * k, r * k))
    rhs = np.empty((n, r * k))
    step = max(1, _PW_CHUNK_FLOATS // max(1, r * k * d))
    for j in range(g):
        cpj = cov[j].reshape(mg, k * d)
        wcj = wc[j].reshape(ng, mg, k)
        for a in range(0, ng, step):
            b = min(ng, a + step)
            c = b - a
            qs = q[j * ng + a:j * ng + b]  # (c, r, Mg)
            t = np.matmul(qs.reshape(-1, mg), cpj).reshape(c, r * k, mg, k)  # [n, (i,k), p, l]
            t = np.matmul(t.transpose(0, 1, 3, 2), qs.transpose(0, 2, 1)[:, None])  # [n,(i,k),l,q]
            gm[j * ng + a:j * ng + b] = t.reshape(c, r, k, k, r).transpose(0, 1, 2, 4, 3).reshape(
                c, r * k, r * k)
            rhs[j * ng + a:j * ng + b] = np.einsum("nim,nmk->nik", qs, wcj[a:b]).reshape(b - a, -1)
    return gm, rhs


def _pw_sfit(prob: _Problem, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """S given Q (the exact S step of :func:`_pw_sstep`, solved chunk by chunk), with ``A Cp``
    for the next Q step and the objective's J-part ``sum(rhs * S)``.

    ``T[n, (i,k), :] = Q[n,i,:] Cp[(., k), :]`` gives both the normal matrices of S and, once S is
    solved, ``(A Cp)[n] = sum_{i,k} S[n,i,k] T[n,(i,k)]``: the warm-started Q step's first residual
    then needs no product with Cp of its own (one of the r + iterations GEMMs per sweep saved)."""
    n, r, mg = q.shape
    g, ng, k = prob.group, prob.ng, prob.k
    d = mg * k
    s = np.empty((n, r, k))
    acp = np.empty((n, d))
    gain = 0.0
    step = max(1, _PW_CHUNK_FLOATS // max(1, r * k * d))
    for j in range(g):
        cpj = prob.cp[j].reshape(mg, k * d)
        wcj = prob.wcp[j].reshape(ng, mg, k)
        for a in range(0, ng, step):
            b = min(ng, a + step)
            c = b - a
            qs = q[j * ng + a:j * ng + b]  # (c, r, Mg)
            t = np.matmul(qs.reshape(-1, mg), cpj).reshape(c, r * k, mg, k)  # [n, (i,k), p, l]
            gm = np.matmul(t.transpose(0, 1, 3, 2), qs.transpose(0, 2, 1)[:, None])  # [n,(i,k),l,q]
            gm = gm.reshape(c, r, k, k, r).transpose(0, 1, 2, 4, 3).reshape(c, r * k, r * k)
            rhs = np.einsum("nim,nmk->nik", qs, wcj[a:b]).reshape(c, -1)
            sol = _solve_spd(gm, rhs[..., None])[..., 0]  # (c, rK)
            gain += float(np.sum(rhs * sol))
            s[j * ng + a:j * ng + b] = sol.reshape(c, r, k)
            acp[j * ng + a:j * ng + b] = np.matmul(sol[:, None, :], t.reshape(c, r * k, d))[:, 0]
    return s, acp, gain


def _pw_kron(prob: _Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Kronecker preconditioner's factors per group: (Cm, Cm^-1 (g, Mg, Mg), Ck, Ck^-1 (g, K, K)).

    ``Cm = mean_k Cp[(., k), (., k)]`` (the channel covariance, averaged over taps) and
    ``Ck = mean_m Cp[(m, .), (m, .)] / mean diag(Cm)`` (the tap covariance): ``Cp ~ Cm (x) Ck``,
    exact for inputs whose channel and spatial correlations separate (the ridge
    ``lam I = lam I_Mg (x) I_K`` is of that form). Both are averages of principal blocks of the
    SPD Cp, so SPD themselves (a relative jitter guards exactly singular ones)."""
    g, mg, k = prob.group, prob.mg, prob.k
    cp4 = prob.cp.reshape(g, mg, k, mg, k)
    cm = np.einsum("jakbk->jab", cp4) / k
    ck = np.einsum("jmkml->jkl", cp4) / mg
    scale = np.einsum("jaa->j", cm) / mg
    scale = np.where(scale > 0, scale, 1.0)
    ck = ck / scale[:, None, None]
    cm = cm + (_JITTER * scale)[:, None, None] * np.eye(mg)
    kscale = np.einsum("jkk->j", ck) / k
    ck = ck + (_JITTER * np.where(kscale > 0, kscale, 1.0))[:, None, None] * np.eye(k)
    return cm, np.linalg.inv(cm), ck, np.linalg.inv(ck)


def _spd_inv(m: np.ndarray) -> np.ndarray:
    """Inverses of a batch of small SPD matrices, with the relative jitter of :func:`_solve_spd`."""
    size = m.shape[-1]
    scale = np.einsum("...ii->...", m) / size
    return np.linalg.inv(m + (_JITTER * np.where(scale > 0, scale, 1.0))[..., None, None] * np.eye(size))


def _pcg(x, b, res, product, precondition, acp, iters: int, tol: float):
    """Preconditioned conjugate gradients on the per-channel systems ``G x = b`` of one chunk,
    from ``x`` with residual ``res = b - G x``. ``product(p) -> (G p, (dA) Cp)``: the step's
    change of the kernel times Cp comes with every product, so ``acp`` (``A Cp`` of the kernel
    at ``x``) is carried along (``acp += alpha (dA) Cp``) and the other factor's step starts
    from it without a product of its own. Stops after ``iters`` iterations, or once every
    channel's ``res^T M^-1 res`` fell below ``tol`` times its start. Returns (x, acp, J) with
    ``J = x^T G x - 2 b^T x = -x . (res + b)`` per channel (the objective, up to its constant)."""
    axes = tuple(range(1, x.ndim))
    z = precondition(res)
    pdir = z.copy()
    rz = np.sum(res * z, axis=axes)
    stop = tol * np.maximum(rz, 1e-300)
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    for _ in range(iters):
        if np.all(rz <= stop):
            break
        gp, up = product(pdir)
        pap = np.sum(pdir * gp, axis=axes)
        alpha = np.where(pap > 0, rz / np.where(pap > 0, pap, 1.0), 0.0)
        x += alpha[expand] * pdir
        res -= alpha[expand] * gp
        acp += alpha[expand] * up
        z = precondition(res)
        rz_new = np.sum(res * z, axis=axes)
        beta = np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        pdir = z + beta[expand] * pdir
        rz = rz_new
    return x, acp, -np.sum(x * (res + b), axis=axes)


def _pw_chunks(prob: _Problem):
    """(group j, first, last) output-channel chunks bounding the pw-first PCG temporaries."""
    step = max(1, _PW_CHUNK_FLOATS // max(1, 4 * prob.mg * prob.k))
    for j in range(prob.group):
        for a in range(0, prob.ng, step):
            yield j, j * prob.ng + a, j * prob.ng + min(prob.ng, a + step)


def _pw_q_pcg(prob: _Problem, s: np.ndarray, q: np.ndarray, acp: np.ndarray, kron, iters: int, tol: float):
    """Q given S by PCG (see :func:`_pw_qstep_cg`), from ``q`` whose kernel times Cp is ``acp``
    (N, Mg, K). Returns (Q, acp, J) for the new Q."""
    n, r, k = s.shape
    mg, d = prob.mg, prob.mg * prob.k
    _, cmi, ck, _ = kron
    q, acp = q.copy(), acp.copy()
    total = 0.0
    for j, a, b in _pw_chunks(prob):
        c = b - a
        ss = s[a:b]  # (c, r, K)
        sst = ss.transpose(0, 2, 1)
        cpj = prob.cp[j]

        def product(v):  # v (c, Mg, r): dA = v S, G v = (dA Cp) S^T
            u = np.matmul(np.matmul(v, ss).reshape(c, d), cpj).reshape(c, mg, k)
            return np.matmul(u, sst), u

        ski = _spd_inv(np.matmul(np.matmul(ss, ck[j]), sst))  # (S_n Ck S_n^T)^-1

        def precondition(res):  # (Cm (x) S Ck S^T)^-1 res = Cm^-1 R (S Ck S^T)^-1
            return np.matmul(np.matmul(cmi[j], res), ski)

        rhs = np.matmul(prob.wcp[j, a - j * prob.ng:b - j * prob.ng].reshape(c, mg, k), sst)
        x = q[a:b].transpose(0, 2, 1).copy()  # (c, Mg, r)
        res = rhs - np.matmul(acp[a:b], sst)
        x, acp[a:b], jn = _pcg(x, rhs, res, product, precondition, acp[a:b], iters, tol)
        q[a:b] = x.transpose(0, 2, 1)
        total += float(np.sum(jn))
    return q, acp, total


def _pw_s_pcg(prob: _Problem, q: np.ndarray, s: np.ndarray, acp: np.ndarray, kron, iters: int, tol: float):
    """S given Q by PCG, from ``s`` whose kernel times Cp is ``acp``; preconditioner
    ``(Q_n Cm Q_n^T)^-1 R Ck^-1`` (the Kronecker approximation of the S system
    ``(Q_n (x) I) Cp (Q_n (x) I)^T ~ (Q_n Cm Q_n^T) (x) Ck``). Returns (S, acp, J)."""
    n, r, mg = q.shape
    k, d = prob.k, prob.mg * prob.k
    cm, _, _, cki = kron
    s, acp = s.copy(), acp.copy()
    total = 0.0
    for j, a, b in _pw_chunks(prob):
        c = b - a
        qs = q[a:b]  # (c, r, Mg)
        qt = qs.transpose(0, 2, 1)
        cpj = prob.cp[j]

        def product(v):  # v (c, r, K): dA = Q^T v, G v = Q (dA Cp)
            u = np.matmul(np.matmul(qt, v).reshape(c, d), cpj).reshape(c, mg, k)
            return np.matmul(qs, u), u

        qmi = _spd_inv(np.matmul(np.matmul(qs, cm[j]), qt))  # (Q_n Cm Q_n^T)^-1

        def precondition(res):
            return np.matmul(np.matmul(qmi, res), cki[j])

        rhs = np.matmul(qs, prob.wcp[j, a - j * prob.ng:b - j * prob.ng].reshape(c, mg, k))  # (c, r, K)
        x = s[a:b].copy()
        res = rhs - np.matmul(qs, acp[a:b])
        x, acp[a:b], jn = _pcg(x, rhs, res, product, precondition, acp[a:b], iters, tol)
        s[a:b] = x
        total += float(np.sum(jn))
    return s, acp, total


def _pw_acp(prob: _Problem, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``A Cp`` per output channel (N, Mg, K) of the pw-first kernel of (Q, S)."""
    a = _pw_kernel(q, s, prob.group)  # (g, Ng, d)
    return np.matmul(a, prob.cp).reshape(prob.n, prob.mg, prob.k)


def _pw_qstep_cg(prob: _Problem, s: np.ndarray, q0: np.ndarray, iters: int | None = None,
                 tol: float | None = None) -> np.ndarray:
    """Q given S by preconditioned conjugate gradients, warm-started at ``q0``.

    The normal matrix of output channel n (Mg*r square),
    ``G_n = (I (x) S_n) Cp (I (x) S_n)^T``, is never built: a product with it costs one
    (channels x d) @ (d x d) GEMM for a chunk of output channels. Preconditioner: with the
    Kronecker approximation ``Cp ~ Cm (x) Ck`` (:func:`_pw_kron`), ``G_n ~ Cm (x) (S_n Ck S_n^T)``,
    whose inverse is applied as ``Z = Cm^-1 R (S_n Ck S_n^T)^-1`` (R: the (Mg, r) residual): one
    Mg x Mg inverse per group for all channels, an r x r one per channel. It is exact when Cp is
    a Kronecker product (one iteration then solves the system) and keeps the cross-channel
    coupling that a per-channel block-Jacobi preconditioner drops.

    At most ``iters`` iterations (default ``_CG_ITERS``), fewer once every channel's
    ``r^T M^-1 r`` is below ``tol`` (default ``_CG_TOL``) times its value at the warm start. PCG
    from a warm start lowers the (convex) objective at every iteration, so ALS stays monotone.
    """
    iters = _CG_ITERS if iters is None else iters
    tol = _CG_TOL if tol is None else tol
    return _pw_q_pcg(prob, s, q0, _pw_acp(prob, q0, s), _pw_kron(prob), iters, tol)[0]


def _pw_qstep(prob: _Problem, s: np.ndarray) -> np.ndarray:
    """Q given S per output channel: the exact joint solve of size Mg*r per output channel
    (the reference the PCG steps are tested against; ALS uses :func:`_pw_q_pcg`)."""
    n, r, k = s.shape
    g, ng, mg = prob.group, prob.ng, prob.mg
    q = np.empty((n, r, mg))
    step = max(1, _PW_CHUNK_FLOATS // max(1, 2 * mg * mg * k * r))
    for j in range(g):
        cp4 = prob.cp[j].reshape(mg, k, mg, k)
        wcj = prob.wcp[j].reshape(ng, mg, k)
        for a in range(0, ng, step):
            b = min(ng, a + step)
            c = b - a
            ss = s[j * ng + a:j * ng + b]  # (c, r, K)
            t = np.matmul(cp4.reshape(mg * k * mg, k), ss.reshape(c * r, k).T)  # [(m,k,p), (n,q)]
            t = t.reshape(mg, k, mg * c * r).transpose(0, 2, 1)  # [m, (p,n,q), k]
            # gm[n, m, i, p, q] = sum_k S[n,i,k] t[m, k, p, n, q]
            t = t.reshape(mg, mg, c, r, k).transpose(2, 0, 1, 3, 4)  # [n, m, p, q, k]
            gm = np.matmul(t.reshape(c, mg * mg * r, k), ss.transpose(0, 2, 1))  # [n,(m,p,q),i]
            gm = gm.reshape(c, mg, mg, r, r).transpose(0, 1, 4, 2, 3).reshape(c, mg * r, mg * r)
            rhs = np.einsum("nik,nmk->nmi", ss, wcj[a:b]).reshape(b - a, mg * r, 1)
            q[j * ng + a:j * ng + b] = _solve_spd(gm, rhs).reshape(b - a, mg, r).transpose(0, 2, 1)
    return q


# -- public API


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _whiten_candidate(group, weight) -> bool:
    """Whether init="auto" also tries the whitened start (few input channels per group)."""
    return np.shape(weight)[1] <= _AUTO_WHITEN_MAX_MG


def _alternate(state, sweep, objective: float, sweeps: int, tol: float):
    """ALS driver: ``sweep(state) -> (state, objective)`` up to ``sweeps`` times, stopping when the
    objective improves by no more than ``tol`` (relative). Returns (state, sweeps run)."""
    done = 0
    for _ in range(sweeps):
        state, new = sweep(state)
        done += 1
        if objective - new <= tol * max(abs(objective), 1e-300):
            break
        objective = new
    return state, done


def _balance(x: np.ndarray, x_axis: int, y: np.ndarray, y_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each rank-one term (x summed over ``x_axis``, y over ``y_axis``) so both factors carry
    the same norm: their product is unchanged, and neither factor is tiny in float32."""
    xn = np.sqrt(np.sum(x * x, axis=x_axis))
    yn = np.sqrt(np.sum(y * y, axis=y_axis))
    scale = np.where((xn > 0) & (yn > 0), np.sqrt(yn / np.where(xn > 0, xn, 1.0)), 1.0)
    return x * np.expand_dims(scale, x_axis), y / np.expand_dims(scale, y_axis)


def fit(weight, bias, group: int, orientation: str, rank: int, stats: "LayerStats | OutputStats", *,
        method: str = "als", sweeps: int = 10, lam: float | None = None, init: str = "auto",
        tol: float = 1e-9) -> Fit:
    """Fit the rank-``rank`` factors of Conv ``weight`` to the layer's output on ``stats``.

    Minimises err(A) + lam_j ||A_j - W_j||^2 over structured kernels A (docs/rewrite.md), with
    lam_j = ``lam`` (relative; default :func:`default_lam`: max(1e-3, 0.3 * Mg*K / rows)) times
    the mean eigenvalue of Cov(x~) of group j. ``method="refit"``: the first factor from ``init`` (``"svd"``: the
    weight-only SVD factors; ``"whitened"``: per-channel whitened SVD, dw-first only), the
    second factor in closed form. ``"als"``: then up to ``sweeps`` alternating exact block
    minimisations (first factor given the second, second given the first), stopping early when
    the objective improves by less than ``tol`` (relative). The bias of the second Conv is the
    closed form bhat = W mean(x) + b - A mean(x~).
    """
    _check_orientation(orientation)
    _check_method(method)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "auto":
        init = "best" if orientation == "dw-first" and _whiten_candidate(group, weight) else "svd"
    elif init == "whitened" and orientation != "dw-first":
        raise ValueError("init='whitened' is implemented for the dw-first orientation only")
    sweeps = _check_count(sweeps, "sweeps")
    prob, dtype, alpha = _problem(weight, group, stats, lam)
    spec = spectrum(prob.w.reshape(prob.shape), prob.group, orientation)  # float64 factors
    r = spec._rank(rank)
    b = np.zeros(prob.n) if bias is None else _f64(bias, "bias").reshape(-1)
    if b.shape != (prob.n,):
        raise ValueError(f"bias must have {prob.n} entries, got shape {np.shape(bias)}")
    g, ng, mg, k = prob.group, prob.ng, prob.mg, prob.k
    f0, s0 = spec.factors(r)
    if orientation == "dw-first":
        a0 = _dw_kernel(s0.reshape(g, ng, mg, r), f0.reshape(g, mg, r, k))
    else:
        a0 = _pw_kernel(f0.reshape(prob.n, r, mg), s0.reshape(prob.n, r, k), g)
    weight_error = _rel(prob.data_error(a0), prob.scale)
    tt_mod = np.einsum("jnd,jnd->j", np.matmul(prob.w, prob.cp), prob.w)  # only for monitoring
    done = 0
    if orientation == "dw-first":
        dfac = _dw_whitened(prob, r) if init == "whitened" else f0.reshape(g, mg, r, k)
        pfac, gain = _dw_pstep(prob, dfac)
        if init == "best":  # keep the whitened start if its refit has the lower error
            dw = _dw_whitened(prob, r)
            pw, gw = _dw_pstep(prob, dw)
            if np.sum(prob.data_error(_dw_kernel(pw, dw))) < np.sum(
                    prob.data_error(_dw_kernel(pfac, dfac))):
                dfac, pfac, gain = dw, pw, gw
        if method == "als":
            def dw_sweep(state):
                d, p, _ = state
                d = _dw_dstep(prob, p, d)
                p, gain = _dw_pstep(prob, d)
                return (d, p, gain), float(np.sum(tt_mod - gain))

            (dfac, pfac, gain), done = _alternate((dfac, pfac, gain), dw_sweep, float(np.sum(tt_mod - gain)),
                                                  sweeps, tol)
        pfac, dfac = _balance(pfac, 1, dfac, 3)  # P (g, Ng, Mg, r) against D (g, Mg, r, K)
        a = _dw_kernel(pfac, dfac)
        first, second = dfac.reshape(f0.shape), pfac.reshape(s0.shape)
    else:
        qfac = f0.reshape(prob.n, r, mg)
        sfac, acp, gain = _pw_sfit(prob, qfac)
        if method == "als":
            kron = _pw_kron(prob) if mg * r > _PW_DIRECT_MAX else None
            acp = acp.reshape(prob.n, mg, k)

            exact = mg * r <= _PW_DIRECT_MAX

            def pw_sweep(state):
                q, s_, acp_ = state
                if exact:
                    q = _pw_qstep(prob, s_)
                    s_, _, gain = _pw_sfit(prob, q)
                    return (q, s_, None), float(np.sum(tt_mod) - gain)
                q, acp_, _ = _pw_q_pcg(prob, s_, q, acp_, kron, _CG_ITERS, _CG_TOL)
                s_, acp_, jn = _pw_s_pcg(prob, q, s_, acp_, kron, _CG_S_ITERS, _CG_TOL)
                return (q, s_, acp_), float(np.sum(tt_mod) + jn)

            (qfac, sfac, _), done = _alternate((qfac, sfac, acp), pw_sweep, float(np.sum(tt_mod) - gain), sweeps, tol)
        qfac, sfac = _balance(qfac, 2, sfac, 2)  # Q (N, r, Mg) against S (N, r, K)
        a = _pw_kernel(qfac, sfac, g)
        first, second = qfac.reshape(f0.shape), sfac.reshape(s0.shape)
    error = _rel(prob.data_error(a), prob.scale)
    new_bias = prob.new_bias(a, b)
    return Fit(
        orientation=orientation,
        rank=r,
        method=method,
        first=np.ascontiguousarray(first, dtype=dtype),
        second=np.ascontiguousarray(second, dtype=dtype),
        bias=np.ascontiguousarray(new_bias, dtype=dtype),
        error=error,
        weight_error=weight_error,
        lam=alpha,
        sweeps=done,
    )


def _dw_refit_curve(prob: _Problem, dfac: np.ndarray, svals: np.ndarray, top: int) -> list:
    """err(A) per group of the dw-first refit at every rank 1..top, from ONE Cholesky.

    In rank-major order (column i*Mg + m) the rank-r normal matrix G'_r = B_r^T Cp B_r and
    right-hand side y_r = W (Ctx + lam I) B_r are leading blocks of the rank-``top`` ones, so the
    Cholesky factor L_r is the leading block of L. With Y = y L^-T (also nested),
    P_r = Y_r L_r^-1 by block back-substitution, and, because the weight-SVD depthwise factor
    has B^T B = diag(s) (s: the singular values) and W B = P0 diag(s),
        err_r = tt - ||Y_r||^2 - mu ||P_r||^2 - lam (||(P_r - P0_r) s^1/2||^2 - ||P0_r s^1/2||^2)
    (mu: the jitter). Costs one (Mg*top)^3/3 Cholesky plus block GEMMs.
    """
    g, mg, _, k = dfac.shape
    ng, b = prob.ng, mg
    perm = (np.arange(top)[:, None] + np.arange(mg)[None, :] * top).reshape(-1)  # i-major
    gp = _dw_normal(dfac, prob.cp)[:, perm][:, :, perm]
    y = _dw_rhs(dfac, prob.wcp)[:, :, perm]  # (g, Ng, Mg*top)
    size = gp.shape[-1]
    scale = np.mean(np.einsum("jii->ji", gp), axis=-1)
    mu = _JITTER * np.where(scale > 0.0, scale, 1.0)
    gp = gp + mu[:, None, None] * np.eye(size)
    low = np.linalg.cholesky(gp)  # (g, size, size)
    blk = lambda i: slice(i * b, (i + 1) * b)  # noqa: E731
    inv_diag = [np.linalg.inv(low[:, blk(i), blk(i)]) for i in range(top)]
    yt = np.swapaxes(y, 1, 2)  # (g, size, Ng)
    ytl = np.empty_like(yt)  # Y^T = L^-1 y^T
    for i in range(top):
        rhs = yt[:, blk(i)]
        if i:
            rhs = rhs - np.matmul(low[:, blk(i), :i * b], ytl[:, :i * b])
        ytl[:, blk(i)] = np.matmul(inv_diag[i], rhs)
    # s per column (i, m) in i-major order: singular value i of input channel m of its group
    s_col = svals.reshape(g, mg, -1)[:, :, :top].transpose(0, 2, 1).reshape(g, size)
    # P0^T columns: sqrt(s) u, i.e. (W B)^T / s
    p0t = np.swapaxes(_dw_rhs(dfac, prob.w), 1, 2)[:, perm] / np.where(s_col > 0, s_col, 1.0)[
        ..., None]
    lam = prob.lam
    errs = []
    for r in range(1, top + 1):
        n = r * b
        pt = np.empty((g, n, ng))  # P_r^T = L_r^-T Y_r^T
        for i in range(r - 1, -1, -1):
            rhs = ytl[:, blk(i)]
            if i < r - 1:
                rhs = rhs - np.matmul(np.swapaxes(low[:, (i + 1) * b:n, blk(i)], 1, 2),
                                      pt[:, (i + 1) * b:n])
            pt[:, blk(i)] = np.matmul(np.swapaxes(inv_diag[i], 1, 2), rhs)
        sr = s_col[:, :n, None]
        diff = np.einsum("jcn,jcn->j", (pt - p0t[:, :n]) ** 2, sr)
        base = np.einsum("jcn,jcn->j", p0t[:, :n] ** 2, sr)
        err = (prob.tt - np.einsum("jcn,jcn->j", ytl[:, :n], ytl[:, :n])
               - mu * np.einsum("jcn,jcn->j", pt, pt) - lam * (diff - base))
        errs.append(err)
    return errs


def output_error_curve(weight, group: int, orientation: str, stats: "LayerStats | OutputStats", ranks=None,
                       method: str = "refit", *, lam: float | None = None, init: str = "auto",
                       sweeps: int = 10) -> np.ndarray:
    """Predicted relative output error (as :attr:`Fit.error`) at each rank, float64.

    ``ranks``: the ranks to evaluate (default 1..max_rank); the result is aligned with them.
    ``method="refit"`` shares one SVD and one set of normal matrices over all ranks (the rank-r
    system is a sub-block of the max-rank one), so it costs about one refit per rank's solve;
    ``"als"`` runs :func:`fit` at every rank. Errors use the bias-absorbing definition of
    docs/rewrite.md; square them for the allocator's additive error.
    """
    _check_orientation(orientation)
    _check_method(method)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    prob, _, _ = _problem(weight, group, stats, lam)
    spec = spectrum(prob.w.reshape(prob.shape), prob.group, orientation)
    if ranks is None:
        ranks = range(1, spec.max_rank + 1)
    ranks = [spec._rank(r) for r in ranks]
    if not ranks:
        return np.zeros(0)
    auto_best = (init == "auto" and orientation == "dw-first"
                 and _whiten_candidate(group, weight))
    if method == "als" or init == "whitened" or auto_best:
        return np.array([
            fit(weight, None, group, orientation, r, stats, method=method, sweeps=sweeps,
                lam=lam, init=init).error
            for r in ranks
        ])
    g, ng, mg, k = prob.group, prob.ng, prob.mg, prob.k
    top = max(ranks)
    f0, _ = spec.factors(top)
    out = np.empty(len(ranks))
    if orientation == "dw-first":
        errs = _dw_refit_curve(prob, f0.reshape(g, mg, top, k), spec.singular_values, top)
        for pos, r in enumerate(ranks):
            out[pos] = _rel(errs[r - 1], prob.scale)
        return out
    qfac = f0.reshape(prob.n, top, mg)
    gp, rp = _pw_sstep(prob, qfac)
    gd, rd = _pw_sstep(prob, qfac, prob.mom.cxx, prob.w_ctx)
    for pos, r in enumerate(ranks):
        m = r * k
        sol = _solve_spd(gp[:, :m, :m], rp[:, :m, None])[..., 0]  # (N, rK)
        quad = np.einsum("nc,nc->n", np.einsum("ncd,nd->nc", gd[:, :m, :m], sol), sol)
        err = prob.tt - 2.0 * np.einsum("nc,nc->n", rd[:, :m], sol).reshape(g, ng).sum(1) \
            + quad.reshape(g, ng).sum(1)
        out[pos] = _rel(err, prob.scale)
    return out


# =========================================================================== kept layers: downstream refit
def refit_dense(weight, bias, group: int, stats: LayerStats, *, lam: float | None = None):
    """Refit a Conv that is KEPT (not factorized) to its original output on the inputs the
    rewritten model feeds it: the dense kernel minimising

        err(A) + lam_j ||A_j - W_j||^2,   err(A) = E|| A x~ + bhat - (W x + b) ||^2

    per group (the ridge of :func:`fit`, toward the original weight), in closed form
    ``A_j = W_j (Cov(x, x~) + lam_j I) (Cov(x~) + lam_j I)^-1`` and the bias of :func:`fit`.
    With x~ == x the solution is W itself. Returns (weight, bias, predicted relative output
    error of the refit, the same error of the original weight on x~), weight and bias in the
    weight's dtype."""
    prob, dtype, _ = _problem(weight, group, stats, lam)
    a = np.swapaxes(_solve_spd(prob.cp, np.swapaxes(prob.wcp, 1, 2)), 1, 2)  # (g, Ng, d)
    b = np.zeros(prob.n) if bias is None else _f64(bias, "bias").reshape(-1)
    new_b = prob.new_bias(a, b)
    return (a.reshape(prob.shape).astype(dtype), new_b.astype(dtype), _rel(prob.data_error(a), prob.scale),
            _rel(prob.data_error(prob.w), prob.scale))
