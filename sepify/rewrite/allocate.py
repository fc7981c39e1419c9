"""Allocate: choose (orientation, rank) per candidate layer.

Per-layer policies (``--rank``, ``--energy``, ``--max-error``) decide each layer alone
(:func:`choose`); a global budget (``--target-macs`` / ``--target-ratio``) allocates ranks across
layers (:func:`plan_ranks` with :func:`allocate`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetError
from .factorize import KEEP, ORIENTATIONS, Spectrum, _as_int, _check_count, _check_orientation, original_macs
from .options import RewriteOptions
from .plan import Candidate


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
    """One candidate layer for :func:`allocate`.

    ``spectra`` maps orientation -> Spectrum of the same weight (one or both orientations).
    ``weight_norm_sq`` turns relative errors into absolute dropped energy
    (``weight_norm_sq * rel_error(r)**2``); pass ``spectrum.norm_sq`` for the plain ||W||_F^2.
    """

    name: str
    spectra: dict[str, Spectrum]
    p_in: int
    p_out: int
    weight_norm_sq: float


class _Layer:
    """Per-layer tables for the allocator: cost / error / allowed per (orientation, rank)."""

    def __init__(self, choice: LayerChoice):
        if not choice.spectra:
            raise ValueError(f"layer {choice.name!r}: no spectra given")
        specs = list(choice.spectra.values())
        for o, spec in choice.spectra.items():
            _check_orientation(o)
            if spec.orientation != o:
                raise ValueError(
                    f"layer {choice.name!r}: spectra[{o!r}] is a {spec.orientation} spectrum"
                )
            if (spec.weight_shape, spec.group) != (specs[0].weight_shape, specs[0].group):
                raise ValueError(f"layer {choice.name!r}: spectra describe different weights")
        norm_sq = float(choice.weight_norm_sq)
        if not (math.isfinite(norm_sq) and norm_sq >= 0.0):
            raise ValueError(f"layer {choice.name!r}: weight_norm_sq must be finite and >= 0")
        p_in, p_out = _check_count(choice.p_in, "p_in"), _check_count(choice.p_out, "p_out")
        self.name = choice.name
        self.original = original_macs(specs[0].weight_shape, specs[0].group, p_out)
        self.orients = [o for o in ORIENTATIONS if o in choice.spectra]
        self.cost: dict[str, np.ndarray] = {}  # index r-1
        self.err: dict[str, np.ndarray] = {}
        for o in self.orients:
            spec = choice.spectra[o]
            ranks = range(1, spec.max_rank + 1)
            self.cost[o] = np.array([spec.macs(r, p_in, p_out) for r in ranks], dtype=np.int64)
            self.err[o] = norm_sq * np.square(spec._rel[1:])
        # Rank-1 options that are cheaper than the original Conv.
        ok = [o for o in self.orients if self.cost[o][0] < self.original]
        if not ok:
            raise ValueError(
                f"layer {self.name!r}: rank 1 is not cheaper than the original Conv "
                f"({self.original:,} MACs) in any given orientation; leave it out of the allocation"
            )
        order = self.orients.index
        self.start = min(ok, key=lambda o: (self.err[o][0], self.cost[o][0], order(o)))
        self.cheapest = min(ok, key=lambda o: (self.cost[o][0], self.err[o][0], order(o)))
        # one more option: the original Conv, kept (no error, its original cost)
        self.cost[KEEP] = np.array([self.original], dtype=np.int64)
        self.err[KEEP] = np.zeros(1)
        self.options = [*self.orients, KEEP]

    def best_step(self, o: str, r: int, room: int):
        """Best improving step from state (o, r) adding at most ``room`` MACs, or None.

        Returns (score, (orientation, rank), delta_macs); score = dropped-energy reduction per
        MAC added (+inf when the step adds no MACs).
        """
        cur_c, cur_e = int(self.cost[o][r - 1]), float(self.err[o][r - 1])
        best, best_key = None, None
        for oi, o2 in enumerate(self.options):
            c, e = self.cost[o2], self.err[o2]
            ranks = np.arange(1, len(c) + 1)
            cheaper = (c < self.original) if o2 != KEEP else True  # a factorization must save MACs
            mask = cheaper & (e < cur_e) & (c - cur_c <= room)
            if o2 == o:  # within the current orientation only rank + 1
                mask &= ranks == r + 1
            if not mask.any():
                continue
            idx = np.flatnonzero(mask)
            dc = (c[idx] - cur_c).astype(np.float64)
            de = cur_e - e[idx]
            score = np.where(dc > 0, de / np.where(dc > 0, dc, 1.0), np.inf)
            # best in this orientation: highest score, then largest reduction, then lowest rank
            j = int(np.lexsort((idx, -de, -score))[0])
            key = (float(score[j]), float(de[j]), -oi)
            if best_key is None or key > best_key:
                best_key = key
                best = (float(score[j]), (o2, int(idx[j]) + 1), int(c[idx[j]]) - cur_c)
        return best


def _greedy(
    tabs: list[_Layer], state: list[tuple[str, int]], budget: int
) -> list[tuple[str, int]]:
    """Rule step 3 of :func:`allocate`, from ``state`` (which must fit the budget)."""
    state = list(state)
    total = sum(int(t.cost[o][r - 1]) for t, (o, r) in zip(tabs, state))
    version = [0] * len(tabs)
    heap: list = []

    def push(i: int) -> None:
        step = tabs[i].best_step(*state[i], budget - total)
        if step is not None:
            score, target, dc = step
            heapq.heappush(heap, (-score, i, version[i], target, dc))

    for i in range(len(tabs)):
        push(i)
    while heap:
        _, i, ver, target, dc = heapq.heappop(heap)
        if ver != version[i]:
            continue
        version[i] += 1
        if dc > budget - total:  # the budget shrank since this step was scored: rescore it
            push(i)
            continue
        state[i] = target
        total += dc
        if dc < 0:  # room grew: steps skipped earlier may fit now, rescore everyone
            heap.clear()
            for j in range(len(tabs)):
                version[j] += 1
                push(j)
        else:
            push(i)
    return state


def allocate(
    layers: list[LayerChoice], budget_macs: int
) -> tuple[dict[str, tuple[str, int]], int]:
    """Choose (orientation, rank) per layer so that total factorized MACs <= ``budget_macs``.

    Returns ``({name: (orientation, rank)}, total_macs)``: the layers to factorize (a layer the
    budget lets keep its original Conv is absent) and the total MACs of the given layers at the
    chosen configuration (``Spectrum.macs``, or the original MACs of a kept layer).

    The error of a layer at (o, r) is its absolute dropped energy
    ``weight_norm_sq * spectra[o].rel_error(r)**2``; the goal is a small total error. A
    factorization is only used when it is cheaper than the layer's original Conv; the original
    itself is one more option (:data:`KEEP`: no error, the original MACs), reached by a step like
    any other. A layer whose rank 1 is not cheaper in any given orientation is a ``ValueError``
    (the caller should leave it out). Rule:

    1. Cheapest start: every layer at rank 1 in the orientation with the fewest MACs (ties:
       smaller error, then ``ORIENTATIONS`` order). If it exceeds the budget, raise
       :class:`BudgetUnreachable`; its message gives this minimum.
    2. Error-best start: every layer at rank 1 in the orientation with the smallest error (ties:
       fewer MACs, then ``ORIENTATIONS`` order). If it exceeds the budget, switch layers to their
       cheapest orientation, smallest error increase per MAC saved first (ties: layer order),
       until it fits.
    3. Greedy, from each start: a step moves one layer from (o, r) either to (o, r + 1), to any
       rank of another given orientation, or to its original Conv (kept). Eligible steps strictly
       reduce the layer's error, keep a factorized layer's cost strictly below its original cost
       and keep the total within the budget.
       Take the step with the largest error reduction per MAC added (a step that adds no MACs
       ranks first; ties: larger reduction, then layer order, then ``ORIENTATIONS`` order, then
       lower rank); repeat until no step is eligible.
    4. Return the end state with the smaller total error (ties: the error-best start's).

    Two starts because the greedy only takes error-reducing steps: from the error-best start it
    cannot give up a little error in one layer to free MACs for a big gain in another, while
    from the cheapest start it may climb a worse path; neither result dominates the other.

    Each layer keeps its one best step in a heap; a step whose MACs no longer fit is rescored
    against the remaining budget when popped (the remaining budget only shrinks, so stored scores
    stay upper bounds; a step that lowers MACs triggers a full rescore). Cost: O(steps * (R +
    log L)) with R the number of ranks of a layer. Every step lowers the total error, so the
    greedy terminates.
    """
    budget = _as_int(budget_macs, "budget_macs")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names passed to allocate() must be unique")
    tabs = [_Layer(layer) for layer in layers]

    def cost1(t: _Layer, o: str) -> int:
        return int(t.cost[o][0])

    cheapest = [(t.cheapest, 1) for t in tabs]
    minimum = sum(cost1(t, t.cheapest) for t in tabs)
    if minimum > budget:
        raise BudgetUnreachable(budget, minimum)

    best = [(t.start, 1) for t in tabs]
    total = sum(cost1(t, t.start) for t in tabs)
    swaps = []  # (error added per MAC saved, layer); start != cheapest implies start costs more
    for i, t in enumerate(tabs):
        if t.cheapest != t.start:
            saved = cost1(t, t.start) - cost1(t, t.cheapest)
            swaps.append((float(t.err[t.cheapest][0] - t.err[t.start][0]) / saved, i, saved))
    for _, i, saved in sorted(swaps):
        if total <= budget:
            break
        best[i] = (tabs[i].cheapest, 1)
        total -= saved

    def error(state: list[tuple[str, int]]) -> float:
        return math.fsum(float(t.err[o][r - 1]) for t, (o, r) in zip(tabs, state))

    state = _greedy(tabs, best, budget)
    if cheapest != best:
        other = _greedy(tabs, cheapest, budget)
        if error(other) < error(state):
            state = other

    choice = {t.name: state[i] for i, t in enumerate(tabs) if state[i][0] != KEEP}
    final = sum(
        t.original if o == KEEP else layer.spectra[o].macs(r, layer.p_in, layer.p_out)
        for t, layer, (o, r) in zip(tabs, layers, state)
    )
    if final > budget:  # pragma: no cover - guarded by construction
        raise AssertionError(f"allocate() overshot the budget: {final} > {budget}")
    return choice, final


# --- rank choice -----------------------------------------------------------------------------
def choose(c: Candidate, opts: RewriteOptions) -> tuple[str, int]:
    """(orientation, rank) for a per-layer criterion."""
    options = []
    for o, sp in c.spectra.items():
        if opts.energy is not None:
            r = sp.rank_for_energy(opts.energy)
        elif opts.max_error is not None:
            r = sp.rank_for_error(opts.max_error)
        elif opts.rank == "full":
            r = sp.max_rank
        else:
            r = min(int(opts.rank or 1), sp.max_rank)
        options.append((o, r, sp.rel_error(r), sp.macs(r, c.p_in, c.p_out)))
    if len(options) == 1:
        return options[0][0], options[0][1]
    if opts.energy is not None or opts.max_error is not None:
        # the criterion fixes the error: take the cheaper orientation
        best = min(options, key=lambda t: (t[3], t[2], ORIENTATIONS.index(t[0])))
    elif opts.rank == "full":
        # both are exact: take the cheaper
        best = min(options, key=lambda t: (round(t[2], 12), t[3], ORIENTATIONS.index(t[0])))
    else:
        # --rank r: the MACs of rank r in the cheaper orientation are the layer's budget; take
        # the lowest-error (orientation, rank) within it, so auto never costs more than the
        # cheaper fixed orientation and never has a larger error
        budget = min(t[3] for t in options)
        within = [(o, r, sp.rel_error(r), sp.macs(r, c.p_in, c.p_out))
                  for o, sp in c.spectra.items() for r in range(1, sp.max_rank + 1)
                  if sp.macs(r, c.p_in, c.p_out) <= budget]
        best = min(within, key=lambda t: (round(t[2], 12), t[3], ORIENTATIONS.index(t[0]), t[1]))
    return best[0], best[1]


def plan_ranks(candidates: list[Candidate], opts: RewriteOptions, total_macs: int) -> dict:
    """Per layer (orientation, rank), or a reason string."""
    if opts.target_macs is None and opts.target_ratio is None:
        return {c.node.name: choose(c, opts) for c in candidates}
    target = opts.target_macs if opts.target_macs is not None else int(total_macs * opts.target_ratio)
    if target >= total_macs:  # the original model fits: any rewrite would only add weight error
        return {c.node.name: "kept: the budget is met without rewriting it" for c in candidates}
    fixed = total_macs - sum(c.original_macs for c in candidates)
    budget = target - fixed
    if budget < 0:
        raise BudgetError(f"--target-macs {target:,} cannot be reached: the layers that cannot be rewritten alone cost {fixed:,} MACs")
    out: dict = {}
    usable = []
    for c in candidates:
        if any(sp.macs(1, c.p_in, c.p_out) < c.original_macs for sp in c.spectra.values()):
            usable.append(c)
        else:
            out[c.node.name] = "no saving even at rank 1"
    budget -= sum(c.original_macs for c in candidates if c not in usable)
    layers = [LayerChoice(c.node.name, c.spectra, c.p_in, c.p_out, next(iter(c.spectra.values())).norm_sq)
              for c in usable]
    try:
        plan, reached = allocate(layers, budget)
    except BudgetError as e:
        minimum = getattr(e, "minimum_macs", None)
        if minimum is None:
            raise BudgetError(f"--target-macs {target:,} cannot be reached: {e}") from None
        floor = minimum + (target - budget)  # + the convs and other layers that are not rewritten
        raise BudgetError(f"--target-macs {target:,} cannot be reached: the least the model can cost is {floor:,} MACs "
                          f"(every eligible conv at rank 1; {target - budget:,} of them in layers that are not rewritten)") from None
    for c in usable:
        choice = plan.get(c.node.name)
        out[c.node.name] = choice if choice is not None else "kept: the budget is met without rewriting it"
    return out
