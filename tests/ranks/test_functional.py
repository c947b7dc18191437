"""Functional ranks from truncation sweeps with planted gaps."""

from __future__ import annotations

import json

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, functional_ranks, load_plan, recommend_ranks, save_plan
from tests.ranks.rows import PLANTED, analysis, make_row


def sweep_dict(curves, *, higher_is_better=True, examples=200, modules=None):
    """A truncation sweep with planted gaps: curves maps group -> {rank: (gap, gap_interval)}."""
    tuned = 0.88
    sign = 1 if higher_is_better else -1
    points = [{"group": g, "non_target": "tuned", "rank": r, "label": f"r={r}", "metric": tuned - sign * gap,
               "interval": None, "gap": gap, "gap_interval": list(interval), "loss": 0.0, "accuracy": 0.0}
              for g, curve in curves.items() for r, (gap, interval) in curve.items()]
    return {"kind": "truncation_sweep", "metric": {"name": "accuracy", "higher_is_better": higher_is_better},
            "examples": examples, "unit": "examples", "non_target": ["tuned"], "truncation": "eckart-young",
            "reference": {"tuned": {"metric": tuned, "interval": [0.85, 0.91]}}, "points": points,
            "bootstrap": {"replicates": 1000, "confidence": 0.95},
            "modules": [m if isinstance(m, dict) else {"name": m} for m in (modules or [])]}


MODEL_CURVE = {1: (0.10, (0.07, 0.13)), 2: (0.05, (0.03, 0.07)), 4: (0.008, (-0.002, 0.02)),
               8: (0.001, (-0.004, 0.006)), 16: (0.0, (0.0, 0.0))}


@pytest.mark.parametrize(("epsilon", "rank", "resolved"), [(0.01, 4, False), (0.06, 2, False), (0.03, 4, True),
                                                          (0.0, 16, True)])
def test_functional_picks_smallest_rank_within_epsilon(epsilon, rank, resolved):
    rows = [make_row("a", [1.0] * 32), make_row("b", [1.0] * 32, role="v", shape=(8, 32))]
    plan = recommend_ranks(analysis(*rows), RankPolicy(functional=epsilon), sweep=sweep_dict({"model": MODEL_CURVE}))
    assert [m.rank for m in plan.modules] == [rank, min(rank, 8)]
    assert plan.modules[0].reason == f"functional≤{epsilon:g} (model)"
    choice = plan.functional["groups"]["model"]
    assert choice["rank"] == rank and choice["resolved"] is resolved  # the sweep's noise decides "resolved"
    assert plan.functional["examples"] == 200 and plan.functional["tuned"]["interval"] == [0.85, 0.91]


def test_functional_ignores_a_lucky_dip_and_reports_when_nothing_qualifies():
    dip = {1: (0.001, (0, 0.01)), 2: (0.05, (0.03, 0.07)), 4: (0.001, (0, 0.01)), 8: (0.0, (0, 0))}
    choice = functional_ranks(sweep_dict({"model": dip}), 0.01)["groups"]["model"]
    assert choice["rank"] == 4 and choice["swept"] == [1, 2, 4, 8]
    never = {1: (0.2, (0.1, 0.3)), 2: (0.1, (0.05, 0.15))}
    plan = recommend_ranks(analysis(make_row("a", [1.0] * 32)), RankPolicy(functional=0.01),
                           sweep=sweep_dict({"model": never}))
    assert plan.modules[0].rank == 32 and plan.modules[0].reason.endswith("no swept rank within ε")


def test_functional_per_role_and_rank_zero_leaves_a_module_out(tmp_path):
    curves = {"q": {0: (0.004, (0, 0.008)), 1: (0.0, (0, 0))},
              "v": {0: (0.3, (0.2, 0.4)), 1: (0.1, (0.05, 0.15)), 2: (0.0, (0, 0))}}
    rows = [make_row("q0", PLANTED, role="q"), make_row("v0", PLANTED, role="v"), make_row("o0", PLANTED, role="o")]
    sweep = sweep_dict(curves, modules=["q0", "v0"])
    plan = recommend_ranks(analysis(*rows), RankPolicy(functional=0.01), sweep=sweep)
    assert [(m.name, m.rank, m.reason) for m in plan.modules] == [("v0", 2, "functional≤0.01 (role v)")]
    reasons = {m.name: m.reason for m in plan.left_out}
    assert reasons["q0"].startswith("not needed") and reasons["o0"].startswith("not truncated by the sweep")
    assert load_plan(save_plan(plan, tmp_path / "plan.json")).functional == json.loads(json.dumps(plan.functional))
    # lower-is-better metrics read the same gaps
    lower = sweep_dict({"model": MODEL_CURVE}, higher_is_better=False)
    assert functional_ranks(lower, 0.01)["groups"]["model"]["rank"] == 4


def test_functional_policy_errors(tmp_path):
    with pytest.raises(ConfigError, match="sweep"):
        recommend_ranks(analysis(make_row("a", PLANTED)), RankPolicy(functional=0.01))
    with pytest.raises(ConfigError, match="functional"):
        RankPolicy(functional=-0.1)
    with pytest.raises(ConfigError, match="cannot be combined"):
        RankPolicy(functional=0.01, rank=4)
    with pytest.raises(ConfigError, match="not a truncation sweep"):
        functional_ranks({"runs": []}, 0.01)
    with pytest.raises(ConfigError, match="cannot read sweep"):
        functional_ranks(tmp_path / "missing", 0.01)
    with pytest.raises(ConfigError, match="no adapter is needed"):
        recommend_ranks(analysis(make_row("a", PLANTED)), RankPolicy(functional=0.01),
                        sweep=sweep_dict({"model": {0: (0.0, (0, 0))}}))


def test_a_choice_at_full_rank_says_no_rank_below_full_rank_met_epsilon():
    """A swept rank ≥ every module's min(out, in) is the full fine-tune itself (gap 0 by construction): chosen, it is
    marked at_full_rank, not passed off as a resolved functional rank."""
    modules = [{"name": "q0", "role": "q", "full_rank": 64}, {"name": "v0", "role": "v", "full_rank": 32}]
    curves = {"model": {1: (0.02, (0.018, 0.021)), 2: (0.012, (0.010, 0.014)), 100: (0.0, (0.0, 0.0))},
              "v": {1: (0.02, (0.018, 0.021)), 32: (0.0, (0.0, 0.0))},
              "q": {1: (0.001, (0.0, 0.002)), 32: (0.0, (0.0, 0.0)), 64: (0.0, (0.0, 0.0))}}
    groups = functional_ranks(sweep_dict(curves, modules=modules), 0.01)["groups"]
    model, v, q = groups["model"], groups["v"], groups["q"]
    assert (model["rank"], model["full_rank"], model["at_full_rank"]) == (100, 64, True)
    assert model["resolved"] is True  # trivially: the interval of a gap that is 0 by construction
    assert (v["rank"], v["full_rank"], v["at_full_rank"]) == (32, 32, True)  # one role's modules decide its curve
    assert (q["rank"], q["full_rank"], q["at_full_rank"]) == (1, 64, False)
    # 32 is v's full rank but not q's: on the model curve it still truncates, so it is a real functional rank
    below = functional_ranks(sweep_dict({"model": {1: (0.02, (0.01, 0.03)), 32: (0.0, (0.0, 0.0))}},
                                        modules=modules), 0.01)["groups"]["model"]
    assert (below["rank"], below["at_full_rank"]) == (32, False)
    unknown = functional_ranks(sweep_dict(curves, modules=["q0", "v0"]), 0.01)["groups"]["model"]
    assert unknown["full_rank"] is None and unknown["at_full_rank"] is None  # an older sweep.json: not claimed
    never = functional_ranks(sweep_dict({"model": {1: (0.2, (0.1, 0.3))}}, modules=modules), 0.01)["groups"]
    assert never["model"]["rank"] is None and never["model"]["at_full_rank"] is None


def test_each_stack_has_role_curves_of_its_own_and_each_module_takes_its_own():
    """A vision tower's q_proj is on the sweep's "vision q" curve (its row's stack), never on the language model's
    "q": each takes its own curve's rank, and each curve's full rank is that of its own modules. Control: a sweep
    written before stacks existed (no stack in its rows) reads as it did, one q curve for both."""
    modules = [{"name": "q0", "role": "q", "full_rank": 32},
               {"name": "vq0", "role": "q", "stack": "vision", "full_rank": 16}]
    curves = {"q": {1: (0.3, (0.2, 0.4)), 2: (0.1, (0.05, 0.15)), 4: (0.0, (0.0, 0.0))},
              "vision q": {1: (0.002, (0.0, 0.004)), 2: (0.0, (0.0, 0.0)), 4: (0.0, (0.0, 0.0))}}
    rows = [make_row("q0", PLANTED, role="q"), make_row("vq0", PLANTED, role="q", shape=(16, 16)) | {"stack": "vision"}]
    plan = recommend_ranks(analysis(*rows), RankPolicy(functional=0.01), sweep=sweep_dict(curves, modules=modules))
    assert [(m.name, m.rank, m.reason) for m in plan.modules] == [("q0", 4, "functional≤0.01 (role q)"),
                                                                   ("vq0", 1, "functional≤0.01 (role vision q)")]
    groups = plan.functional["groups"]
    assert (groups["q"]["full_rank"], groups["vision q"]["full_rank"]) == (32, 16)
    assert groups["vision q"]["at_full_rank"] is False
    # control: an older sweep.json, its rows without a stack, its one q curve over both towers
    old = sweep_dict({"q": curves["q"]}, modules=[{k: v for k, v in m.items() if k != "stack"} for m in modules])
    plan = recommend_ranks(analysis(*rows), RankPolicy(functional=0.01), sweep=old)
    assert [(m.name, m.rank) for m in plan.modules] == [("q0", 4), ("vq0", 4)]
    assert plan.functional["groups"]["q"]["full_rank"] == 32


def test_a_curve_the_sweeps_data_never_reached_gives_its_modules_their_spectral_rank():
    """A curve the sweep marked unreached is flat because its eval data never ran through its modules (a vision tower
    swept on text), not because they are not needed: it has no functional rank, and its modules take the rank the
    spectral rule gives them (energy 0.9 → 3 of PLANTED; the noise floor, 0 for vk0, still leaves one out), the
    reason saying why, through the policy's shaping. Before, both were left out "not needed" at rank 0. Controls: the
    sweep without the marker (a sweep.json written before the check) reads as it did; a marker for the other
    non-target source does not apply."""
    modules = [{"name": "q0", "role": "q", "full_rank": 32},
               {"name": "vq0", "role": "q", "stack": "vision", "full_rank": 32},
               {"name": "vk0", "role": "k", "stack": "vision", "full_rank": 32}]
    flat = {0: (0.0, (0.0, 0.0)), 1: (0.0, (0.0, 0.0)), 2: (0.0, (0.0, 0.0))}
    curves = {"q": {0: (0.3, (0.2, 0.4)), 1: (0.1, (0.05, 0.15)), 2: (0.0, (0.0, 0.0))},
              "vision q": flat, "vision k": flat}
    rows = [make_row("q0", PLANTED), make_row("vq0", PLANTED) | {"stack": "vision"},
            make_row("vk0", PLANTED, role="k", noise_rank=0) | {"stack": "vision"}]

    def marked(non_target):
        return sweep_dict(curves, modules=modules) | {"unreached": [
            {"group": g, "non_target": [non_target], "modules": [m], "note": "…"}
            for g, m in (("vision q", "vq0"), ("vision k", "vk0"))]}

    groups = functional_ranks(marked("tuned"), 0.01)["groups"]
    assert groups["vision q"] == {"rank": None, "swept": [0, 1, 2], "full_rank": 32, "at_full_rank": None,
                                  "unreached": True}
    assert groups["q"]["rank"] == 2 and "unreached" not in groups["q"]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=None, functional=0.01), sweep=marked("tuned"))
    assert [(m.name, m.rank, m.reason) for m in plan.modules] == [
        ("q0", 2, "functional≤0.01 (role q)"),
        ("vq0", 3, "energy≥0.9; the sweep's data never reached role vision q")]
    assert {m.name: m.reason for m in plan.left_out} == {
        "vk0": "no signal above the noise floor (the sweep's data never reached role vision k)"}
    for policy, expected in ((RankPolicy(energy=0.8, functional=0.01), (2, "energy≥0.8")),  # 25/30: its own τ
                             (RankPolicy(energy=None, power_of_two=True, functional=0.01), (4, "power of two")),
                             # knee alone: Kneedle's 2 (cum/30 − i/4 = .283, .333, .217), not the default τ's 3
                             (RankPolicy(energy=None, knee=True, functional=0.01), (2, "knee"))):
        plan = recommend_ranks(analysis(*rows), policy, sweep=marked("tuned"))
        assert [(m.rank, m.reason) for m in plan.modules if m.name == "vq0"] == [
            (expected[0], f"{expected[1]}; the sweep's data never reached role vision q")]
    for sweep in (sweep_dict(curves, modules=modules), marked("base")):  # controls: as before the check
        plan = recommend_ranks(analysis(*rows), RankPolicy(energy=None, functional=0.01), sweep=sweep)
        assert [m.name for m in plan.modules] == ["q0"]
        assert {m.name: m.reason for m in plan.left_out} == {n: "not needed: the sweep at rank 0 is within ε"
                                                             for n in ("vq0", "vk0")}
