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

Budget allocation lives in :mod:`sepify.rewrite.allocate`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np


__all__ = [
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

        dw-first: (M*r*K + N*Mg*r) * p_out; pw-first: N*r*Mg * p_in + N*r*K * p_out.
        """
        r = self._rank(rank)
        p_in, p_out = _check_count(p_in, "p_in"), _check_count(p_out, "p_out")
        n, mg, m, k = _dims(self.weight_shape, self.group)
        if self.orientation == "dw-first":
            return (m * r * k + n * mg * r) * p_out
        return n * r * mg * p_in + n * r * k * p_out


def spectrum(weight: np.ndarray, group: int = 1, orientation: str = "dw-first") -> Spectrum:
    """SVD every slice of Conv ``weight`` (N, M/g, k1..kd) for ``orientation``.

    One batched ``np.linalg.svd`` call over the stacked slices, computed in float64. Factors come
    back in ``weight.dtype`` (float64 if the weight is not a floating-point array).
    """
    _check_orientation(orientation)
    w = np.asarray(weight)
    shape, group = _check_shape(w.shape, group)
    if not np.issubdtype(w.dtype, np.number) or np.issubdtype(w.dtype, np.complexfloating):
        raise ValueError(f"Conv weight must be a real numeric array, got dtype {w.dtype}")
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.dtype(np.float64)
    w64 = w.astype(np.float64, copy=False)
    if not np.all(np.isfinite(w64)):
        raise ValueError("Conv weight contains NaN or infinite values")
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
    """MACs of the original Conv: N * (M/g) * K * p_out."""
    shape, _ = _check_shape(weight_shape, group)
    return math.prod(shape) * _check_count(p_out, "p_out")


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
