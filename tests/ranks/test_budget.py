"""Budget allocation against brute force, and budgets applied to plans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, allocate_budget, recommend_ranks
from tests.ranks.rows import PLANTED, analysis, make_row


def _brute_force(cums, costs, lo, hi, budget):
    best = -1.0
    for ranks in itertools.product(*[range(lo, h + 1) for h in hi]):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(cum[r] for cum, r in zip(cums, ranks)))
    return best


def _random_problem(rng, n_modules, equal_costs):
    rows, cums, costs = [], [], []
    for m in range(n_modules):
        shape = (8, 8) if equal_costs else tuple(int(d) for d in rng.integers(3, 12, size=2))
        k = min(shape)
        sv = np.sort(rng.exponential(1.0, size=k) * rng.uniform(0.2, 3))[::-1]
        rows.append(make_row(f"m{m}", sv, shape=shape, layer=m))
        cums.append(np.concatenate([[0.0], np.cumsum(sv**2)]))
        costs.append(sum(shape))
    return rows, cums, costs


@pytest.mark.parametrize("equal_costs", [True, False])
def test_budget_greedy_against_brute_force(equal_costs):
    rng = np.random.default_rng(0)
    strictly_worse = 0
    for _ in range(40):
        rows, cums, costs = _random_problem(rng, 3, equal_costs)
        hi = [len(c) - 1 for c in cums]
        budget = int(rng.integers(sum(costs), sum(h * c for h, c in zip(hi, costs)) + 1))
        plan = recommend_ranks(analysis(*rows), RankPolicy(energy=None, noise=False, budget_params=budget))
        got = sum(cum[m.rank] for cum, m in zip(cums, plan.modules))
        best = _brute_force(cums, costs, 1, hi, budget)
        total = sum(c[-1] for c in cums)
        assert plan.total_params <= budget
        assert got <= best + 1e-9
        # the reported gap bounds the distance to the optimum
        assert best - got <= plan.budget_gap * total + 1e-9
        if equal_costs:
            assert got == pytest.approx(best, rel=1e-12)
        strictly_worse += got < best - 1e-9
    if not equal_costs:  # negative control: with unequal costs greedy is not always exact
        assert strictly_worse > 0


def test_greedy_prefix_is_optimal_for_its_own_cost():
    # unit steps: every greedy state before the first refusal is optimal for the budget it spends
    rng = np.random.default_rng(1)
    rows, cums, costs = _random_problem(rng, 3, equal_costs=False)
    hi = [len(c) - 1 for c in cums]
    for budget in range(sum(costs), sum(h * c for h, c in zip(hi, costs)) + 1, 7):
        result = allocate_budget([list(range(1, h + 1)) for h in hi], [list(c[1:]) for c in cums], costs, budget)
        if result.gap == 0:
            assert result.gain == pytest.approx(_brute_force(cums, costs, 1, hi, result.cost))


def test_budget_with_power_of_two_rungs_never_exceeds_and_respects_bound():
    rng = np.random.default_rng(2)
    rows, cums, costs = _random_problem(rng, 3, equal_costs=False)
    budget = 3 * sum(costs)
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=None, noise=False, power_of_two=True,
                                                       budget_params=budget))
    assert plan.total_params <= budget
    assert all(m.rank & (m.rank - 1) == 0 or m.rank == min(m.shape) for m in plan.modules)


def test_budget_caps_energy_targets_and_counts_dora():
    rows = [make_row("a", PLANTED, layer=0), make_row("b", [8.0, 1.0, 1.0, 1.0], layer=1)]
    unconstrained = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99))
    assert [m.rank for m in unconstrained.modules] == [4, 4]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99, budget_params=5 * 64))
    assert plan.total_params <= 5 * 64 and "budget" in {m.reason for m in plan.modules}
    # b's first direction holds 64/67 of its energy: it is bought before a's third
    assert [m.rank for m in plan.modules] == [3, 2] or [m.rank for m in plan.modules] == [4, 1]
    dora = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99, use_dora=True, budget_params=5 * 64 + 64))
    assert dora.total_params <= 5 * 64 + 64


def test_budget_below_cheapest_plan_and_bytes_budget():
    rows = [make_row("a", PLANTED), make_row("b", PLANTED, layer=1)]
    with pytest.raises(ConfigError, match="below the cheapest plan"):
        recommend_ranks(analysis(*rows), RankPolicy(energy=None, budget_params=127))
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=None, noise=False, budget_bytes=128 * 16))
    assert [m.rank for m in plan.modules] == [1, 1]
    # a byte budget is refused in its bytes, with the parameters they buy (it gave only "Budget of 127 parameters")
    with pytest.raises(ConfigError, match=r"^Budget of 2,032 bytes \(127 parameters at 16 bytes each\) is below the "
                                          r"cheapest plan \(128 parameters, 2,048 bytes: every module at its minimum "
                                          r"rank\)"):
        recommend_ranks(analysis(*rows), RankPolicy(energy=None, noise=False, budget_bytes=127 * 16))
