"""Allocate: choose (orientation, rank) per candidate layer — one class per rank policy.

Every policy reads, per candidate, its *error curves* (:class:`ErrorCurves`): for each
orientation, the relative error at every rank 1..max_rank. Without calibration data they are
the weight errors of the SVD (``Spectrum.rel_error``); with calibration data the calibrate stage
replaces them by predicted relative *output* errors (``Candidate.curves``). The policies:

- :class:`FixedRank` (``--rank r`` / ``full``), :class:`Energy` (``--energy f``: the smallest rank
  keeping ``1 - rel_error^2 >= f``), :class:`MaxError` (``--max-error e``: the smallest rank with
  ``rel_error <= e``) decide each layer alone;
- :class:`Budget` (``--target-macs`` / ``--target-ratio``) allocates ranks across layers with
  :func:`solve`, the optimal multiple-choice knapsack below;
- a latency policy builds :class:`Option` lists with measured seconds as costs and calls
  :func:`solve` the same way (``sepify.rewrite.measure``).

Multiple-choice knapsack (:func:`solve`). Layer ``l`` has options ``j`` with cost ``c_lj`` and
additive error ``e_lj`` (keeping the original Conv is an option with error 0). Choose one option per
layer minimising ``sum e`` subject to ``sum c <= B``. The solver is a dynamic programme over the
Pareto front of (cost, error) of the layers seen so far: adding a layer combines every front point
with every option, drops points over the budget and points dominated by a cheaper point with no
larger error. The front after the last layer holds the optimum; back-pointers give the choice.
This is exact for any real costs. Its size is bounded by the number of distinct partial costs; if it
exceeds ``max_front`` (default 5,000) it is thinned to points at least ``slack / max_front`` apart
in cost (``slack`` = budget minus the cheapest configuration), which keeps every point feasible and
loses at most one thinning step per layer of budget. The additive errors are

- weight curves: absolute dropped energy ``||W||_F^2 * rel_error^2`` (a layer with a large weight
  counts more, as before);
- output curves: ``rel_output_error^2`` — every layer's relative output distortion counts equally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from ..errors import BudgetError
from .factorize import KEEP, ORIENTATIONS, Spectrum, _as_int, _check_count, _check_orientation, original_macs
from .options import RewriteOptions
from .plan import Candidate

_TOL = 1e-12


# --------------------------------------------------------------------------- the knapsack
@dataclass(frozen=True)
class Option:
    """One choice for one layer: ``key`` identifies it (e.g. ``("dw-first", 3)`` or ``KEEP``)."""

    key: Hashable
    cost: float
    error: float


def solve(options: Sequence[Sequence[Option]], budget: float, max_front: int = 5_000) -> list[int] | None:
    """Optimal multiple-choice knapsack: one option index per layer minimising the summed error
    with summed cost <= ``budget`` (a total within a relative 1e-12 of the budget counts as
    fitting: float sums in another order); ``None`` when even the cheapest options exceed it.

    Ties: among equal total errors the cheaper total; among equal (cost, error) the one that spends
    more on the earlier layers, then the earlier option. See the module docstring for the method and its bound.
    """
    if any(len(opts) == 0 for opts in options):
        raise ValueError("every layer needs at least one option")
    minimum = math.fsum(min(o.cost for o in opts) for opts in options)
    if minimum > budget * (1 + _TOL):
        return None
    slack = max(float(budget) - minimum, 0.0)
    cost = np.zeros(1)
    err = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for opts in options:
        oc = np.array([o.cost for o in opts], dtype=np.float64)
        oe = np.array([o.error for o in opts], dtype=np.float64)
        c = (cost[:, None] + oc[None, :]).ravel()
        e = (err[:, None] + oe[None, :]).ravel()
        parent = np.repeat(np.arange(cost.size), oc.size)
        choice = np.tile(np.arange(oc.size), cost.size)
        # keep what can still fit: the cheapest completion of the remaining layers is added later,
        # so prune against the budget only (exact: costs are non-negative)
        ok = c <= budget * (1 + _TOL)
        c, e, parent, choice = c[ok], e[ok], parent[ok], choice[ok]
        # by cost, then error; ties: the more expensive partial state of the earlier layers (so the
        # earlier layers get the rank), then the earlier option
        order = np.lexsort((-parent, e, c))  # stable: then the earlier option
        c, e, parent, choice = c[order], e[order], parent[order], choice[order]
        # Pareto: keep a point only if its error is below every cheaper point's
        prev_min = np.minimum.accumulate(np.concatenate(([np.inf], e[:-1])))
        keep = np.ones(e.size, dtype=bool)
        keep[1:] = e[1:] < prev_min[1:] - _TOL * np.abs(prev_min[1:])
        c, e, parent, choice = c[keep], e[keep], parent[keep], choice[keep]
        if c.size > max_front and slack > 0:
            step = slack / max_front
            bucket = np.floor((c - c[0]) / step)
            first = np.concatenate(([True], bucket[1:] != bucket[:-1]))
            # in each bucket the last point has the lowest error: keep it (its exact cost)
            last = np.concatenate((first[1:], [True]))
            c, e, parent, choice = c[last], e[last], parent[last], choice[last]
        cost, err = c, e
        back.append((parent, choice))
    best = int(np.argmin(err))  # first minimum = the cheapest among equal errors (front is sorted)
    picks = []
    for parent, choice in reversed(back):
        picks.append(int(choice[best]))
        best = int(parent[best])
    return picks[::-1]


# --------------------------------------------------------------------------- error curves
@dataclass
class ErrorCurves:
    """Per orientation, relative errors (``rel[o][r - 1]``) and the additive errors the budget
    allocator sums (``additive[o][r - 1]``). ``kind``: ``"weight"`` or ``"output"``."""

    kind: str
    rel: dict[str, np.ndarray]
    additive: dict[str, np.ndarray]

    def rank_for_energy(self, o: str, fraction: float) -> int:
        """Smallest rank with 1 - rel^2 >= fraction (the top rank when none reaches it)."""
        kept = 1.0 - np.square(self.rel[o])
        hit = np.flatnonzero(kept >= fraction - _TOL)
        return int(hit[0]) + 1 if hit.size else len(kept)

    def rank_for_error(self, o: str, bound: float) -> int:
        """Smallest rank with rel <= bound (the top rank when none reaches it)."""
        hit = np.flatnonzero(self.rel[o] <= bound + _TOL)
        return int(hit[0]) + 1 if hit.size else len(self.rel[o])


def weight_curves(spectra: dict[str, Spectrum], norm_sq: float | None = None) -> ErrorCurves:
    """Weight-error curves of the SVD (data-free)."""
    rel = {o: np.asarray(sp._rel[1:], dtype=np.float64) for o, sp in spectra.items()}
    ns = next(iter(spectra.values())).norm_sq if norm_sq is None else float(norm_sq)
    return ErrorCurves("weight", rel, {o: ns * np.square(r) for o, r in rel.items()})


def curves_of(c: Candidate) -> ErrorCurves:
    """The candidate's curves: the calibrated ones when the calibrate stage set them."""
    curves = getattr(c, "curves", None)
    return curves if curves is not None else weight_curves(c.spectra)


def _macs(c: Candidate, o: str, r: int) -> int:
    """The pair's MACs for comparing options of one layer (at the planning positions)."""
    return c.plan_macs(o, r)


# --------------------------------------------------------------------------- policies
class RankPolicy:
    """Maps the candidates to ``{name: (orientation, rank)}`` or ``{name: reason}``."""

    def plan(self, candidates: list[Candidate], total_macs: int) -> dict:
        return {c.node.name: self.choose(c) for c in candidates}

    def choose(self, c: Candidate) -> tuple[str, int]:  # per-layer policies
        raise NotImplementedError

    @staticmethod
    def _cheaper(c: Candidate, picks: dict[str, int], curves: ErrorCurves) -> tuple[str, int]:
        """Several orientations, each with its rank for the criterion: the criterion fixes the
        error, so take the cheaper (ties: smaller error, then ``ORIENTATIONS`` order)."""
        return min(((o, r) for o, r in picks.items()),
                   key=lambda t: (_macs(c, *t), float(curves.rel[t[0]][t[1] - 1]), ORIENTATIONS.index(t[0])))


class FixedRank(RankPolicy):
    """``--rank r`` (or ``full``). With ``--orientation auto`` the MACs of rank r in the cheaper
    orientation are the layer's budget, and the lowest-error (orientation, rank) within it is
    taken: auto never costs more than the cheaper fixed orientation, never has a larger error."""

    def __init__(self, rank: int | str | None):
        self.rank = rank if rank is not None else 1

    def choose(self, c: Candidate) -> tuple[str, int]:
        curves = curves_of(c)
        if self.rank == "full":
            picks = {o: sp.max_rank for o, sp in c.spectra.items()}
            if len(picks) == 1:
                return next(iter(picks.items()))
            # all exact: take the cheaper
            return min(picks.items(), key=lambda t: (round(float(curves.rel[t[0]][t[1] - 1]), 12),
                                                     _macs(c, *t), ORIENTATIONS.index(t[0])))
        picks = {o: min(int(self.rank), sp.max_rank) for o, sp in c.spectra.items()}
        if len(picks) == 1:
            return next(iter(picks.items()))
        budget = min(_macs(c, o, r) for o, r in picks.items())
        within = [(o, r) for o, sp in c.spectra.items() for r in range(1, sp.max_rank + 1) if _macs(c, o, r) <= budget]
        return min(within, key=lambda t: (round(float(curves.rel[t[0]][t[1] - 1]), 12), _macs(c, *t),
                                          ORIENTATIONS.index(t[0]), t[1]))


class Energy(RankPolicy):
    """``--energy f``: per layer the smallest rank keeping ``1 - rel_error^2 >= f`` (weight energy
    without calibration, output variance with it)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def choose(self, c: Candidate) -> tuple[str, int]:
        curves = curves_of(c)
        return self._cheaper(c, {o: curves.rank_for_energy(o, self.fraction) for o in c.spectra}, curves)


class MaxError(RankPolicy):
    """``--max-error e``: per layer the smallest rank with ``rel_error <= e`` (weight error
    without calibration, relative output error with it)."""

    def __init__(self, bound: float):
        self.bound = bound

    def choose(self, c: Candidate) -> tuple[str, int]:
        curves = curves_of(c)
        return self._cheaper(c, {o: curves.rank_for_error(o, self.bound) for o in c.spectra}, curves)


KEPT = "kept: the budget is met without rewriting it"


class Budget(RankPolicy):
    """``--target-macs N`` / ``--target-ratio F``: the whole model within N MACs (or F times its
    MACs) with the least total additive error (:func:`solve`). Per layer the options are keeping the
    original Conv (no error) and every (orientation, rank) cheaper than it."""

    def __init__(self, target_macs: int | None = None, target_ratio: float | None = None):
        self.target_macs, self.target_ratio = target_macs, target_ratio

    def plan(self, candidates: list[Candidate], total_macs: int) -> dict:
        target = self.target_macs if self.target_macs is not None else int(total_macs * self.target_ratio)
        if target >= total_macs:  # the original model fits: any rewrite would only add error
            return {c.node.name: KEPT for c in candidates}
        fixed = total_macs - sum(c.original_macs for c in candidates)
        out: dict = {}
        usable = []
        for c in candidates:
            if any(c.saves(o, 1) for o in c.spectra):
                usable.append(c)
            else:
                out[c.node.name] = "no saving even at rank 1"
        fixed += sum(c.original_macs for c in candidates if c not in usable)
        budget = target - fixed
        asked = (f"--target-macs {target:,}" if self.target_macs is not None
                 else f"--target-ratio {self.target_ratio:g} ({target:,} of {total_macs:,} MACs)")
        if budget < 0:
            raise BudgetError(f"{asked} cannot be reached: the layers that cannot be rewritten "
                              f"alone cost {fixed:,} MACs ({fixed / total_macs:.3f} of the model)")
        options = [layer_options(c, curves_of(c)) for c in usable]
        picks = solve(options, budget)
        if picks is None:
            minimum = int(sum(min(o.cost for o in opts if o.key != KEEP) for opts in options))
            raise BudgetError(f"{asked} cannot be reached: the least the model can cost is "
                              f"{minimum + fixed:,} MACs ({(minimum + fixed) / total_macs:.3f} of the model; every "
                              f"eligible conv at rank 1; {fixed:,} of them in layers that are not rewritten)")
        for c, opts, j in zip(usable, options, picks):
            key = opts[j].key
            out[c.node.name] = KEPT if key == KEEP else key
        return out


def layer_options(c: Candidate, curves: ErrorCurves) -> list[Option]:
    """Keep, then every (orientation, rank) cheaper than the original Conv, in ``ORIENTATIONS``
    and rank order."""
    opts = [Option(KEEP, float(c.original_macs), 0.0)]
    for o in ORIENTATIONS:
        if o not in c.spectra:
            continue
        for r in range(1, c.spectra[o].max_rank + 1):
            m = c.spectra[o].macs(r, c.p_in, c.p_out)  # (a budget is in the report's numbers)
            if m < c.original_macs:
                opts.append(Option((o, r), float(m), float(curves.additive[o][r - 1])))
    return opts


def policy_for(opts: RewriteOptions) -> RankPolicy:
    """The policy the options name (exactly one criterion applies; rank 1 when none is given)."""
    if opts.target_macs is not None or opts.target_ratio is not None:
        return Budget(opts.target_macs, opts.target_ratio)
    if opts.energy is not None:
        return Energy(opts.energy)
    if opts.max_error is not None:
        return MaxError(opts.max_error)
    return FixedRank(opts.rank)


def plan_ranks(candidates: list[Candidate], opts: RewriteOptions, total_macs: int) -> dict:
    """Per layer (orientation, rank), or a reason string."""
    return policy_for(opts).plan(candidates, total_macs)


# --------------------------------------------------------------------------- weight-error API
class BudgetUnreachable(BudgetError, ValueError):
    """The MAC budget is below the cheapest rank-1 configuration of the given layers."""

    def __init__(self, budget_macs: int, minimum_macs: int):
        self.budget_macs = budget_macs
        self.minimum_macs = minimum_macs
        super().__init__(
            f"MAC budget {budget_macs:,} is unreachable: rank 1 in the cheapest orientation of "
            f"every layer already needs {minimum_macs:,} MACs"
        )


@dataclass
class LayerChoice:
    """One candidate layer for :func:`allocate` (the weight-error allocation without a graph).

    ``spectra`` maps orientation -> Spectrum of the same weight (one or both orientations).
    ``weight_norm_sq`` turns relative errors into absolute dropped energy
    (``weight_norm_sq * rel_error(r)**2``); pass ``spectrum.norm_sq`` for the plain ||W||_F^2.
    """

    name: str
    spectra: dict[str, Spectrum]
    p_in: int
    p_out: int
    weight_norm_sq: float
    _original: int = field(default=0, repr=False)


def _validated(choice: LayerChoice) -> tuple[int, list[Option]]:
    if not choice.spectra:
        raise ValueError(f"layer {choice.name!r}: no spectra given")
    specs = list(choice.spectra.values())
    for o, spec in choice.spectra.items():
        _check_orientation(o)
        if spec.orientation != o:
            raise ValueError(f"layer {choice.name!r}: spectra[{o!r}] is a {spec.orientation} spectrum")
        if (spec.weight_shape, spec.group) != (specs[0].weight_shape, specs[0].group):
            raise ValueError(f"layer {choice.name!r}: spectra describe different weights")
    norm_sq = float(choice.weight_norm_sq)
    if not (math.isfinite(norm_sq) and norm_sq >= 0.0):
        raise ValueError(f"layer {choice.name!r}: weight_norm_sq must be finite and >= 0")
    p_in, p_out = _check_count(choice.p_in, "p_in"), _check_count(choice.p_out, "p_out")
    original = original_macs(specs[0].weight_shape, specs[0].group, p_out)
    opts = [Option(KEEP, float(original), 0.0)]
    for o in ORIENTATIONS:
        spec = choice.spectra.get(o)
        if spec is None:
            continue
        for r in range(1, spec.max_rank + 1):
            m = spec.macs(r, p_in, p_out)
            if m < original:
                opts.append(Option((o, r), float(m), norm_sq * float(spec._rel[r]) ** 2))
    if len(opts) == 1:
        raise ValueError(f"layer {choice.name!r}: rank 1 is not cheaper than the original Conv ({original:,} MACs) "
                         f"in any given orientation; leave it out of the allocation")
    return original, opts


def allocate(layers: list[LayerChoice], budget_macs: int) -> tuple[dict[str, tuple[str, int]], int]:
    """Choose (orientation, rank) per layer so that total MACs <= ``budget_macs`` with the least
    total absolute dropped weight energy (:func:`solve`: optimal).

    Returns ``({name: (orientation, rank)}, total_macs)``: the layers to factorize (a layer the
    budget lets keep its original Conv is absent) and the total MACs of the given layers. A
    factorization is only an option when it is cheaper than the layer's original Conv; a layer
    whose rank 1 is not cheaper in any given orientation is a ``ValueError``. A budget below every
    layer at its cheapest rank 1 raises :class:`BudgetUnreachable` (its message gives the minimum).
    """
    budget = _as_int(budget_macs, "budget_macs")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names passed to allocate() must be unique")
    tables = [_validated(layer) for layer in layers]
    options = [opts for _, opts in tables]
    minimum = sum(int(min(o.cost for o in opts if o.key != KEEP)) for opts in options)
    if minimum > budget:
        raise BudgetUnreachable(budget, minimum)
    picks = solve(options, budget)
    assert picks is not None  # the minimum fits
    choice = {layer.name: opts[j].key for layer, opts, j in zip(layers, options, picks) if opts[j].key != KEEP}
    total = sum(int(opts[j].cost) for opts, j in zip(options, picks))
    return choice, total
