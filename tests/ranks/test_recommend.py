"""recommend_ranks on planted spectra: each target, cap and shaping rule, and its recorded bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spectra.errors import ConfigError
from spectra.ranks import LeftOut, RankPolicy, recommend_ranks
from tests.ranks.rows import PLANTED, analysis, make_row


@pytest.mark.parametrize(("tau", "rank"), [(0.5, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)])
def test_energy_policy_picks_smallest_rank_reaching_tau(tau, rank):
    plan = recommend_ranks(analysis(make_row("a", PLANTED)), RankPolicy(energy=tau))
    (m,) = plan.modules
    assert m.rank == rank and m.reason == f"energy≥{tau:g}"
    assert m.energy == pytest.approx([16, 25, 29, 30][rank - 1] / 30) and m.energy == m.energy_upper
    assert m.params == rank * 64


def test_noise_caps_the_target_and_drops_modules_without_signal():
    rows = [make_row("a", PLANTED, noise_rank=2), make_row("b", PLANTED, noise_rank=0, layer=1)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.9))
    assert [(m.name, m.rank, m.reason) for m in plan.modules] == [("a", 2, "noise floor")]
    assert plan.left_out == (LeftOut("b", "no signal above the noise floor", 0, pytest.approx(np.sqrt(30))),)
    # negative control: without the noise cap the energy target wins
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.9, noise=False))
    assert [m.rank for m in plan.modules] == [3, 3]


def test_knee_finds_the_planted_elbow():
    sv = [10.0] * 5 + [0.2] * 27
    plan = recommend_ranks(analysis(make_row("a", sv)), RankPolicy(energy=None, knee=True, noise=False))
    assert plan.modules[0].rank == 5 and plan.modules[0].reason == "knee"
    # both targets: the larger one wins, so both are met
    plan = recommend_ranks(analysis(make_row("a", sv)), RankPolicy(energy=0.999, knee=True, noise=False))
    assert plan.modules[0].rank > 5 and plan.modules[0].reason.startswith("energy")


def test_uniform_is_smallest_power_of_two_meeting_the_share():
    # energy-0.9 ranks 3, 5 and 9 (flat spectra of length 3, 5, 9 plus a tiny tail)
    rows = [make_row(f"m{k}", [1.0] * k + [1e-4] * (32 - k), layer=i) for i, k in enumerate((3, 5, 9))]
    plan = recommend_ranks(analysis(*rows), RankPolicy(uniform=True, uniform_share=1.0, noise=False))
    assert {m.rank for m in plan.modules} == {16} and {m.reason for m in plan.modules} == {"uniform"}
    plan = recommend_ranks(analysis(*rows), RankPolicy(uniform=True, uniform_share=0.6, noise=False))
    assert {m.rank for m in plan.modules} == {8}


def test_fixed_rank_and_its_bound():
    plan = recommend_ranks(analysis(make_row("a", PLANTED)), RankPolicy(rank=8))
    assert plan.modules[0].rank == 8 and plan.modules[0].reason == "rank"
    with pytest.raises(ConfigError, match="exceeds min"):
        recommend_ranks(analysis(make_row("a", PLANTED, shape=(4, 32))), RankPolicy(rank=8))


def test_min_max_and_power_of_two():
    row = make_row("a", PLANTED)
    assert recommend_ranks(analysis(row), RankPolicy(energy=0.9, power_of_two=True)).modules[0].rank == 4
    m = recommend_ranks(analysis(row), RankPolicy(energy=0.9, max_rank=2)).modules[0]
    assert (m.rank, m.reason) == (2, "max_rank")
    m = recommend_ranks(analysis(row), RankPolicy(energy=0.5, min_rank=2)).modules[0]
    assert (m.rank, m.reason) == (2, "min_rank")
    m = recommend_ranks(analysis(make_row("a", PLANTED, shape=(3, 32))), RankPolicy(energy=1.0, noise=False)).modules[0]
    assert (m.rank, m.reason) == (3, "full rank")


def test_truncated_spectrum_gives_honest_bounds():
    # 8 equal values, only the top 4 listed: the energy at rank 4 is exact (1/2)
    row = make_row("a", [1.0] * 8, top_k=4, noise_rank=8)
    plan = recommend_ranks(analysis(row), RankPolicy(energy=0.9))
    m = plan.modules[0]
    # each unknown σ ≤ σ₄ = 1, so at least ceil((0.9·8 − 4) / 1) = 4 more are needed
    assert m.rank == 8 and "lower bound" in m.reason
    assert m.energy == pytest.approx(0.5) and m.energy_upper == pytest.approx(1.0)
    m = recommend_ranks(analysis(row), RankPolicy(rank=6)).modules[0]
    assert (m.energy, m.energy_upper) == (pytest.approx(0.5), pytest.approx(0.75))


def test_split_vector_embed_and_filtered_rows_are_not_targeted():
    rows = [make_row("t.h.0.attn.c_attn", PLANTED, shape=(96, 32), role="qkv", conv1d=True),
            make_row("t.h.0.attn.c_attn[q]", PLANTED, role="q", fused_name="t.h.0.attn.c_attn", conv1d=True),
            {"name": "t.h.0.ln_1", "role": "other", "kind": "vector", "shape": [32], "fro_norm": 1.0},
            make_row("t.wte", PLANTED, shape=(128, 32), role="embed"),
            make_row("t.h.0.mlp.c_fc", PLANTED, shape=(128, 32), role="up", conv1d=True)]
    plan = recommend_ranks(analysis(*rows), RankPolicy())
    assert [m.name for m in plan.modules] == ["t.h.0.attn.c_attn", "t.h.0.mlp.c_fc"]
    assert [m.name for m in plan.left_out] == ["t.wte"] and plan.left_out[0].rank == 3
    plan = recommend_ranks(analysis(*rows), RankPolicy(roles=("up",)))
    assert [m.name for m in plan.modules] == ["t.h.0.mlp.c_fc"]
    # a fused module is targeted by any role it holds, as extract and train take it (it was left out:
    # "role 'qkv' not in roles"); its split rows never are
    plan = recommend_ranks(analysis(*rows), RankPolicy(roles=("q", "v")))
    assert [m.name for m in plan.modules] == ["t.h.0.attn.c_attn"]
    plan = recommend_ranks(analysis(*rows), RankPolicy(include="*attn*"))
    assert [m.name for m in plan.modules] == ["t.h.0.attn.c_attn"]
    assert plan.to_peft_config()["fan_in_fan_out"] is True


def test_roles_take_gpt2_cross_attentions_fused_key_value():
    """GPT-2's crossattention.c_attn (role other, rows xk and xv) was left out of --roles k/v/xk/xv ("role 'other' not
    in roles") where extract and train take it; --roles xq does not take it."""
    cross = "t.h.0.crossattention"
    rows = [make_row(f"{cross}.c_attn", PLANTED, shape=(64, 32), role="other", conv1d=True),
            make_row(f"{cross}.q_attn", PLANTED, role="xq", conv1d=True)]
    for roles in (("k",), ("xv",)):
        plan = recommend_ranks(analysis(*rows), RankPolicy(roles=roles))
        assert [m.name for m in plan.modules] == [f"{cross}.c_attn"]
    assert [m.name for m in recommend_ranks(analysis(*rows), RankPolicy(roles=("xq",))).modules] == [f"{cross}.q_attn"]


@pytest.mark.parametrize(("rule", "rslora", "alpha", "scaling"), [
    ("scale", False, lambda r: 2.0 * r, lambda r: 2.0),
    ("scale", True, lambda r: 2.0 * np.sqrt(r), lambda r: 2.0),
    ("constant", False, lambda r: 16.0, lambda r: 16.0 / r),
    ("constant", True, lambda r: 16.0, lambda r: 16.0 / np.sqrt(r)),
])
def test_alpha_rules(rule, rslora, alpha, scaling):
    policy = RankPolicy(alpha_rule=rule, rslora=rslora)
    for r in (1, 4, 9):
        assert policy.alpha_for(r) == pytest.approx(alpha(r))
        assert policy.scaling(r) == pytest.approx(scaling(r))


def test_analysis_from_directory(tmp_path):
    (tmp_path / "analysis.json").write_text(json.dumps(analysis(make_row("a", PLANTED))))
    plan = recommend_ranks(tmp_path, RankPolicy())
    assert plan.base == {"path": "base", "fingerprint": "abc"} and plan.modules[0].rank == 3
    with pytest.raises(ConfigError, match="No analysis"):
        recommend_ranks(tmp_path / "nope", RankPolicy())


def test_a_level_the_sketch_left_unsettled_takes_the_analysis_upper_bound():
    """Values stop before a level the sketch could not settle (energy_rank_bounds holds its interval): recommend
    took the lower bound extrapolated from the last value (3× too low in a review's runs), not the sure rank."""
    sv = 0.9 ** np.arange(32)  # exact energy-95 % rank: 15
    exact = int(np.searchsorted(np.cumsum(sv**2) / np.sum(sv**2), 0.95 * (1 - 1e-12)) + 1)
    row = make_row("a", sv, top_k=10, noise_rank=32)
    row["energy_rank_bounds"] = {"0.95": [12, 17]}
    m = recommend_ranks(analysis(row), RankPolicy(energy=0.95)).modules[0]
    assert exact == 15 and m.rank == 17 >= exact and m.reason == "energy≥0.95 (upper bound of 12–17: not settled by the sketch)"
    assert m.energy <= 0.95 <= m.energy_upper
    del row["energy_rank_bounds"]  # negative control: the extrapolation from σ₁₀ alone falls short of the exact rank
    m = recommend_ranks(analysis(row), RankPolicy(energy=0.95)).modules[0]
    assert m.rank < exact and "lower bound" in m.reason
    assert recommend_ranks(analysis(make_row("a", sv)), RankPolicy(energy=0.95)).modules[0].rank == exact
