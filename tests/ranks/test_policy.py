"""RankPolicy validation and budget strings."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, parse_budget


@pytest.mark.parametrize("kwargs", [dict(energy=0.0), dict(energy=1.5), dict(min_rank=0), dict(max_rank=0),
                                    dict(min_rank=4, max_rank=2), dict(budget_params=10, budget_bytes=10),
                                    dict(rank=3, power_of_two=True), dict(rank=4, uniform=True),
                                    dict(alpha_rule="magic"), dict(include="re:("), dict(roles=("q", "q_proj")),
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
    # a fractional count: the whole count within it (rounding let 2001 parameters into a budget of 2000.7)
    assert parse_budget("2000.7") == {"budget_params": 2000} and parse_budget("2000.5") == {"budget_params": 2000}
    assert parse_budget("0.1GiB") == {"budget_bytes": 107_374_182}
    # read in decimal: a float tolerance for 4.1 × 10⁶'s binary rounding had rounded these up, over the cap
    assert parse_budget("0.7GiB") == {"budget_bytes": 751_619_276}  # 751619276.8
    assert parse_budget("2.2GiB") == {"budget_bytes": 2_362_232_012}  # 2362232012.8
    assert parse_budget("1500000000.7") == {"budget_params": 1_500_000_000}
    assert parse_budget("1e24") == {"budget_params": 10**24}
    # exactly, past Decimal's 28 digits too (they rounded these up to 2001 and 1024)
    assert parse_budget("2000.9999999999999999999999999") == {"budget_params": 2000}
    assert parse_budget("0.99999999999999999999999999999KiB") == {"budget_bytes": 1023}
    for huge in ("1e25", "1e999999999", "2e24KiB", "1e99999999999999999999"):  # too large, said as such by the CLI
        with pytest.raises(OverflowError, match="beyond any model"):
            parse_budget(huge)
    for bad in ("7B", "lots", "3 parsecs", "1e25", "1e999999999", "9" * 5000, "1e" + "0" * 4400 + "1",
                "0." + "0" * 5000 + "1M"):  # the long ones: int()'s 4300-digit limit was a ValueError traceback
        with pytest.raises(ConfigError):
            parse_budget(bad)


@pytest.mark.parametrize("empty", [(), [], "", " , "])
def test_an_empty_roles_selection_is_the_default_as_train_reads_it(empty):
    """RankPolicy(roles=()) was refused ("RankPolicy.roles is empty") while TrainConfig and estimate_memory read an
    empty selection as none given (checkpoints.roles.check_roles: every block role). It reads as None here too, and
    plans what None plans: every block role's matrices, the same plan as the explicit list of every block role."""
    from spectra.checkpoints.roles import default_roles
    from spectra.ranks import recommend_ranks
    from tests.ranks.rows import PLANTED, analysis, make_row

    assert RankPolicy(roles=empty).roles is None  # as TrainConfig(roles=()).roles (tests/lora/test_train_roles.py)
    rows = [make_row("m.embed_tokens", PLANTED, shape=(64, 32), role="embed", layer=None),
            *(make_row(f"m.layers.0.{n}", PLANTED, role=r) for n, r in
              (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
               ("self_attn.o_proj", "o"), ("mlp.up_proj", "up"), ("mlp.down_proj", "down"))),
            make_row("m.layers.0.mlp.gate", PLANTED, shape=(4, 32), role="other"),  # an MoE router
            make_row("lm_head", PLANTED, shape=(64, 32), role="head", layer=None)]
    empty_plan = recommend_ranks(analysis(*rows), RankPolicy(roles=empty, energy=0.8))
    assert empty_plan == recommend_ranks(analysis(*rows), RankPolicy(roles=None, energy=0.8))
    explicit = recommend_ranks(analysis(*rows), RankPolicy(roles=default_roles(None), energy=0.8))
    assert empty_plan.modules == explicit.modules and len(empty_plan.modules) == 6
    assert {m.name for m in empty_plan.left_out} == {m.name for m in explicit.left_out} == {
        "m.embed_tokens", "m.layers.0.mlp.gate", "lm_head"}
    assert recommend_ranks(analysis(*rows), RankPolicy(roles=("q",), energy=0.8)).modules != empty_plan.modules


@pytest.mark.parametrize("kwargs, said", [
    (dict(scale=-1.0), "RankPolicy.scale must be > 0, got -1.0."),
    (dict(scale=0.0, alpha_rule="constant"), "RankPolicy.scale must be > 0, got 0.0."),
    (dict(alpha=0.0, alpha_rule="constant"), "RankPolicy.alpha must be > 0, got 0.0."),
    (dict(alpha=float("nan")), "RankPolicy.alpha must be > 0, got nan."),
])
def test_scale_and_alpha_are_refused_each_by_name_with_its_value(kwargs, said):
    """"RankPolicy.scale and alpha must be > 0, got 2.0, -1.0": which one was at fault was left to the reader."""
    with pytest.raises(ConfigError) as exc:
        RankPolicy(**kwargs)
    assert str(exc.value) == said
    RankPolicy(scale=0.5, alpha=0.5)  # negative control: both positive, taken
