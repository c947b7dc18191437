"""Per-module ranks under one parameter budget: a greedy multiple-choice knapsack with its LP bound.

References
----------
.. [1] Dantzig, "Discrete-variable extremum problems", Operations Research 5 (1957).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from spectra.errors import ConfigError


# Bytes a parameter of a module PEFT trains in full (modules_to_save: a classifier's head) takes under a byte budget,
# as `spectra memory` counts it at its default for an adapter (a bf16 base, AdamW): PEFT's trainable copy (2), its
# gradient (2) and AdamW's two moments (2·2), all in the base's dtype, as PEFT upcasts only the LoRA layers. A LoRA
# parameter (fp32: 4 + 4 + 8) takes RankPolicy.bytes_per_param, 16 by default.
SAVED_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_budget`: ranks, their total gain and cost, and the LP gap bound."""

    ranks: tuple[int, ...]
    gain: float
    cost: int
    gap: float


def allocate_budget(ladders: list[list[int]], gains: list[list[float]], unit_costs: list[int],
                    budget: int, *, fixed_cost: int = 0, fixed_label: str = "fixed",
                    budget_label: str | None = None, cost_label=None) -> Allocation:
    """Maximise Σ_m gain_m(r_m) subject to Σ_m r_m·c_m + fixed ≤ budget, r_m on its ladder.

    Greedy on marginal gain per parameter: start every module at the first rung of its ladder
    (its minimum rank), then repeatedly take the step (next rung of some module) with the
    highest gain/cost ratio that still fits; a module whose next step does not fit stops there.

    Parameters
    ----------
    ladders : list of list of int
        Per module, the allowed ranks in increasing order (e.g. 1..u, or powers of two).
    gains : list of list of float
        ``gains[m][j]``: gain (Σσᵢ² captured) at rank ``ladders[m][j]``.
    unit_costs : list of int
        Per module, parameters per unit of rank, c_m = d_in + d_out.
    budget : int
        Parameters available. ``fixed_cost`` (DoRA magnitudes, the modules PEFT trains in full for a
        classifier's task type) is spent first; ``fixed_label`` says what it is in the refusal, and
        ``budget_label`` what the budget was as given (a byte budget: its bytes and the parameters they
        buy; default "N parameters"), and ``cost_label`` (a function of the cheapest plan's parameters) what
        that plan costs in the budget's units (default "N").

    Returns
    -------
    Allocation

    Raises
    ------
    ConfigError
        If the cheapest plan (every module at its minimum rank) exceeds the budget.

    Notes
    -----
    Why greedy, and how far from optimal. A step j of module m has gain g_{mj} and cost c_{mj}.
    With σ₁ ≥ σ₂ ≥ …, the ratio g_{mj}/c_{mj} is the *mean* of σᵢ²/c_m over the ranks the step
    adds, so it never increases along a module's ladder (for unit steps and for power-of-two
    rungs alike): cumulative energy is concave in the parameters spent.

    1. *Fractional relaxation* (steps may be taken in part): this is the fractional knapsack,
       solved exactly by taking steps in decreasing ratio order [1]_. Concavity makes that
       order respect each ladder's order, so the "step j before j+1" constraints never bind.
    2. *Prefix optimality*: let P be the steps greedy takes before the first one that does not
       fit. P is the fractional optimum for budget C(P) and it is integral, so no plan costing
       ≤ C(P) captures more. Greedy then keeps adding smaller steps that still fit, which only
       adds energy.
    3. *Bound for the full budget*: OPT(B) ≤ LP(B) = G(P) + ρ*·(B − C(P)), with ρ* the ratio of
       the first step that did not fit; ``gap = LP(B) − gain`` is reported, and is below one
       step's gain. If every step costs the same (unit steps and equal c_m, e.g. all-square
       modules), greedy takes the B/c best steps and is exactly optimal.
    The test suite checks all three against brute force on small problems.
    """
    n = len(ladders)
    pos = [0] * n
    cost = fixed_cost + sum(ladders[m][0] * unit_costs[m] for m in range(n))
    if cost > budget:
        fixed = f", {fixed_cost:,} of it {fixed_label}" if fixed_cost else ""
        said = budget_label or f"{budget:,} parameters"
        raise ConfigError(f"Budget of {said} is below the cheapest plan "
                          f"({cost_label(cost) if cost_label else f'{cost:,}'}: every module at "
                          f"its minimum rank{fixed}). Raise the budget, lower min_rank, or target fewer modules.")
    gain = sum(gains[m][0] for m in range(n))

    def step(m: int) -> tuple[float, float, int] | None:
        j = pos[m]
        if j + 1 >= len(ladders[m]):
            return None
        g = gains[m][j + 1] - gains[m][j]
        c = (ladders[m][j + 1] - ladders[m][j]) * unit_costs[m]
        return (g / c, g, c) if g > 0 else None

    heap = [(-s[0], m) for m in range(n) if (s := step(m)) is not None]
    heapq.heapify(heap)
    lp_bound = None
    while heap:
        _, m = heapq.heappop(heap)
        ratio, g, c = step(m)
        if cost + c > budget:
            if lp_bound is None:  # first step that does not fit: the LP bound of note 3
                lp_bound = gain + ratio * (budget - cost)
            continue
        pos[m] += 1
        cost += c
        gain += g
        nxt = step(m)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0], m))
    gap = max(lp_bound - gain, 0.0) if lp_bound is not None else 0.0
    return Allocation(ranks=tuple(ladders[m][pos[m]] for m in range(n)), gain=gain, cost=cost, gap=gap)


def budget_parameters(budget_params: int | None, budget_bytes: int | None, bytes_per_param: float,
                      saved: int = 0) -> int | None:
    """A budget in the parameters :func:`allocate_budget` spends, ``saved`` (the modules PEFT trains in full) among
    them as its ``fixed_cost``; None without a budget.

    A parameter budget is as given: every trainable parameter counts one. A byte budget charges ``bytes_per_param``
    for each LoRA parameter (and DoRA magnitude) and :data:`SAVED_BYTES_PER_PARAM` for each saved one, as
    ``spectra memory`` counts a bf16 head: the result is ``⌊(budget_bytes − 8·saved) / bytes_per_param⌋ + saved``,
    so that a plan of L LoRA parameters fits when ``bytes_per_param·L + 8·saved ≤ budget_bytes``. A byte budget that
    does not cover the saved modules gives at most ``saved`` (the caller refuses it).
    """
    if budget_bytes is None:
        return budget_params
    rest = budget_bytes - SAVED_BYTES_PER_PARAM * saved
    return (math.floor(rest / bytes_per_param) if rest > 0 else 0) + saved
