"""Rank policies on planted spectra, budget allocation against brute force, plan files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import torch
import pytest

from spectra.errors import ConfigError
from spectra.ranks import (LeftOut, ModuleRank, RankPlan, RankPolicy, allocate_budget, check_peft_config,
                           functional_ranks, load_plan, parse_budget, recommend_ranks, save_plan)


def make_row(name, sv, *, shape=(32, 32), role="q", layer=0, tail=(), noise_rank=None, conv1d=False,
             fused_name=None, top_k=None):
    """An analysis matrix row with planted singular values ``sv`` (plus an unlisted ``tail``)."""
    sv = np.asarray(sv, dtype=np.float64)
    fro = float(np.sqrt((sv**2).sum() + (np.asarray(tail, dtype=np.float64) ** 2).sum()))
    known = sv if top_k is None else sv[:top_k]
    return {"name": name, "role": role, "layer": layer, "expert": None, "kind": "matrix",
            "fused_name": fused_name, "conv1d": conv1d, "shape": list(shape), "fro_norm": fro,
            "singular_values": known.tolist(), "gd_rank": int((sv > 0).sum()),
            "noise": {"sigma": 0.0, "fro": 0.0, "mp_edge": 0.0,
                      "rank_above": int((sv > 0).sum()) if noise_rank is None else noise_rank}}


def analysis(*rows):
    return {"schema_version": 1, "config": {}, "base": {"path": "base", "fingerprint": "abc"}, "modules": list(rows)}


# σ² = 16, 9, 4, 1: cumulative energy 16/30, 25/30, 29/30, 1
PLANTED = [4.0, 3.0, 2.0, 1.0]


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
    plan = recommend_ranks(analysis(*rows), RankPolicy(include="*attn*"))
    assert [m.name for m in plan.modules] == ["t.h.0.attn.c_attn"]
    assert plan.to_peft_config()["fan_in_fan_out"] is True


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
    assert parse_budget("1.5e6") == {"budget_params": 1_500_000}
    assert parse_budget("2GB") == {"budget_bytes": 2_000_000_000}
    assert parse_budget("512MiB") == {"budget_bytes": 512 * 2**20}
    for bad in ("7B", "lots", "3 parsecs"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


# ---------------------------------------------------------------------------- budget


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


# ---------------------------------------------------------------------------- PEFT config and files


def test_peft_keys_are_anchored_and_checked():
    rows = [make_row("model.layers.1.self_attn.q_proj", PLANTED, layer=1),
            make_row("model.layers.11.self_attn.q_proj", [4.0, 0.1, 0.1, 0.1], layer=11)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.9))
    names = ["model", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
             "x.model.layers.1.self_attn.q_proj"]
    cfg = plan.to_peft_config()
    assert cfg["rank_pattern"] == {r"^model\.layers\.1\.self_attn\.q_proj": 3} and cfg["r"] == 1
    assert check_peft_config(cfg, names[:3])[r"^model\.layers\.1\.self_attn\.q_proj"] == names[1]
    # negative controls: a suffix key hits two modules; a module absent from the base
    with pytest.raises(ConfigError, match="matches 2 modules"):
        check_peft_config(cfg | {"rank_pattern": {"q_proj": 3}}, names[:3])
    with pytest.raises(ConfigError, match="target_modules entry"):
        check_peft_config(cfg, names)
    with pytest.raises(ConfigError, match="absent"):
        plan.to_peft_config(module_names=["model.layers.1.self_attn.q_proj"])


def test_plan_round_trip_and_bad_plans(tmp_path):
    plan = recommend_ranks(analysis(make_row("a", PLANTED), make_row("b", PLANTED, layer=1, role="v")),
                           RankPolicy(energy=0.9, roles=("q", "v"), rslora=True))
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["peft_config"]["use_rslora"] is True and data["totals"]["params"] == plan.total_params
    data["modules"][0]["rank"] = 33
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="exceeds min"):
        load_plan(path)
    with pytest.raises(ConfigError, match="No plan"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="more than once"):
        m = plan.modules[0]
        RankPlan(modules=(m, m))
    with pytest.raises(ConfigError, match="positive integer"):
        ModuleRank("a", "q", 0, (4, 4), 0, 1.0, 0.0, 0.0, 0, "rank")


def test_analysis_from_directory(tmp_path):
    (tmp_path / "analysis.json").write_text(json.dumps(analysis(make_row("a", PLANTED))))
    plan = recommend_ranks(tmp_path, RankPolicy())
    assert plan.base == {"path": "base", "fingerprint": "abc"} and plan.modules[0].rank == 3
    with pytest.raises(ConfigError, match="No analysis"):
        recommend_ranks(tmp_path / "nope", RankPolicy())


# ---------------------------------------------------------------------------- PEFT as the referee


def _plan_rows(model, prefix=""):
    """Rows for every linear/Conv1D module of a tiny model (heads excluded), with varied planted ranks."""
    from transformers.pytorch_utils import Conv1D

    from spectra.checkpoints.architectures import module_info

    rows = []
    for i, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name.endswith(("lm_head", "classifier")):
            continue
        conv1d = isinstance(module, Conv1D)
        out_f, in_f = (module.nf, module.weight.shape[0]) if conv1d else tuple(module.weight.shape)
        info = module_info(prefix + name)
        sv = [1.0] * (1 + i % 4) + [0.0] * (min(out_f, in_f) - 1 - i % 4)
        rows.append(make_row(prefix + name, sv, shape=(out_f, in_f), role=info.role, layer=info.layer, conv1d=conv1d))
        if name.endswith("c_attn"):  # split projections of the fused tensor: never targeted
            rows.append(make_row(prefix + name + "[q]", sv[:32], role="q", layer=info.layer, conv1d=True,
                                 fused_name=prefix + name))
    return rows


@pytest.mark.parametrize(("family", "head", "prefix", "task_type", "rslora"), [
    ("llama", True, "", "CAUSAL_LM", False),
    ("llama", True, "", "CAUSAL_LM", True),
    ("gpt2", True, "", "CAUSAL_LM", False),
    ("bert", False, "bert.", None, True),  # checkpoint names carry "bert.", BertModel's modules do not
])
def test_every_pattern_key_hits_exactly_its_module_in_peft(tmp_path, family, head, prefix, task_type, rslora):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from tests.models import build_model

    model = build_model(family, head=head)
    plan = recommend_ranks(analysis(*_plan_rows(model, prefix)), RankPolicy(energy=0.99, rslora=rslora))
    assert len({m.rank for m in plan.modules}) == 4  # patterns are really exercised
    module_names = [n for n, _ in model.named_modules()]
    cfg = plan.to_peft_config(module_names=module_names, task_type=task_type)
    assert cfg["rank_pattern"] and all(k.startswith("^") for k in cfg["rank_pattern"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = get_peft_model(model, LoraConfig.from_pretrained(tmp_path))

    lora = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    expected = {prefix_free: m for m in plan.modules
                for prefix_free in [m.name[len(prefix):] if m.name.startswith(prefix) else m.name]}
    assert set(lora) == set(expected)
    for name, layer in lora.items():
        assert layer.r["default"] == expected[name].rank, name
        assert layer.scaling["default"] == pytest.approx(plan.policy.scaling(expected[name].rank)), name
    # negative control: the same ranks under bare suffix keys collide across layers
    bare = cfg | {"rank_pattern": {k.rsplit(".", 1)[-1]: v for k, v in cfg["rank_pattern"].items()}}
    with pytest.raises(ConfigError):
        check_peft_config(bare, module_names)


# ---------------------------------------------------------------------------- functional policy


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
            "modules": [{"name": n} for n in (modules or [])]}


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
