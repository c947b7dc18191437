"""RankPolicy.has_budget says whether a budget is set; RankPolicy.budget is documented as what a plan with no
saved head may spend, which is what recommend spends there (budget_parameters with no head), not with one."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy
from spectra.ranks.budget import SAVED_BYTES_PER_PARAM, budget_parameters


@pytest.mark.parametrize("fields, has", [(dict(budget_params=5), True), (dict(budget_bytes=1000), True),
                                         (dict(), False), (dict(energy=None, rank=4), False)])
def test_has_budget(fields, has):
    assert RankPolicy(**fields).has_budget is has


def test_budget_alone_selects_ranks_and_none_is_refused():
    assert RankPolicy(energy=None, budget_bytes=1000).has_budget
    with pytest.raises(ConfigError, match="selects no rank"):
        RankPolicy(energy=None)


def test_budget_is_what_a_plan_without_a_saved_head_spends():
    policy = RankPolicy(budget_bytes=1000, bytes_per_param=16.0)
    assert policy.budget == 1000 // 16 == budget_parameters(None, 1000, 16.0, 0)
    # with a saved head of 10 parameters recommend spends more (8 B each, not 16): budget does not say that
    head = 10
    spent = budget_parameters(None, 1000, 16.0, head)
    assert spent == (1000 - SAVED_BYTES_PER_PARAM * head) // 16 + head != policy.budget
    assert RankPolicy(budget_params=7).budget == 7 and RankPolicy().budget is None
