"""RankPolicy validation and budget strings."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, parse_budget


@pytest.mark.parametrize("kwargs", [dict(energy=0.0), dict(energy=1.5), dict(min_rank=0), dict(max_rank=0),
                                    dict(min_rank=4, max_rank=2), dict(budget_params=10, budget_bytes=10),
                                    dict(rank=3, power_of_two=True), dict(rank=4, uniform=True),
                                    dict(alpha_rule="magic"), dict(include="re:("), dict(roles=()),
                                    dict(energy=None), dict(budget_params=-1), dict(scale=0.0)])
def test_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        RankPolicy(**kwargs)


def test_parse_budget():
    assert parse_budget("20M") == {"budget_params": 20_000_000}
    assert parse_budget("4.1M") == {"budget_params": 4_100_000} and parse_budget("8.2M") == {"budget_params": 8_200_000}
    assert parse_budget("1.5e6") == {"budget_params": 1_500_000}
    assert parse_budget("2GB") == {"budget_bytes": 2_000_000_000}
    assert parse_budget("512MiB") == {"budget_bytes": 512 * 2**20}
    for bad in ("7B", "lots", "3 parsecs"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
