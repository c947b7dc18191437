"""Budgets on transformers-5 MoE experts: the plan's totals are what PEFT trains on the fused expert parameters.

PEFT adapts Mixtral's ``mlp.experts.gate_up_proj`` (experts × 2·ffn × hidden) and ``down_proj`` at one rank for all
experts, r·E·(d1 + d2) parameters. The reference is PEFT itself (``get_peft_model`` on the plan's ``peft_config``)
for the cost, and float64 SVDs of the models' own tensors with an exact dynamic program for the allocation.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spectra.errors import PeftConfigWarning
from spectra.ranks import RankPolicy, allocate_budget, recommend_ranks, save_plan
from tests.models import build_model, peft_wrapped, save

pytestmark = pytest.mark.filterwarnings(
    # PEFT 0.21 reports pattern keys of target_parameters as unmatched, and applies them
    "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

EXPERT_DECAY = (0.35, 0.6, 0.85)  # per expert: its spectrum's decay, so experts of one projection want other ranks


def _decaying(shape, *, seed, decay, scale=0.05):
    """(out, in) float64 update with singular values scale·decayⁱ over its full rank."""
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    return (u * (scale * decay ** torch.arange(k, dtype=torch.float64))) @ v.T


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(base model, tuned model, plan of no budget's analysis, folder): a decaying update in every attention matrix and
    every expert's gate, up and down, except layer 1 expert 2's up (unchanged: left out, yet PEFT trains its rows)."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("mixtral_fused")
    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(params.items())):
            if p.ndim == 2 and "self_attn" in name:
                p += _decaying(tuple(p.shape), seed=i, decay=0.6).float()
            elif p.ndim == 3:
                for e, decay in enumerate(EXPERT_DECAY):
                    if "gate_up" in name:
                        half = p.shape[1] // 2
                        p[e, :half] += _decaying((half, p.shape[2]), seed=100 * i + e, decay=decay).float()
                        if not ("layers.1." in name and e == 2):
                            p[e, half:] += _decaying((half, p.shape[2]), seed=100 * i + e + 50,
                                                     decay=decay ** 2).float()
                    else:
                        p[e] += _decaying(tuple(p.shape[1:]), seed=100 * i + e, decay=decay).float()
    b, t = save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")
    result = analyze(b, t, cache_dir=False, progress=False)
    result.save(root / "analysis.json")
    return base, tuned, json.loads((root / "analysis.json").read_text()), root


def _peft_trainable(base, config: dict) -> tuple[int, dict]:
    """What get_peft_model trains with ``config`` on ``base``, and the rank of each adapted fused parameter."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    ranks = {name: layer.r["default"] for name, layer in peft_wrapped(model).items() if ".experts." in name}
    return sum(p.numel() for p in model.parameters() if p.requires_grad), ranks


def _saved(plan, path: Path) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PeftConfigWarning)
        save_plan(plan, path)
    data = json.loads(path.read_text())
    assert data["peft_config_notes"] == [str(w.message) for w in caught if w.category is PeftConfigWarning]
    return data


@pytest.mark.parametrize("budget", [2500, 6000, 9000])
def test_the_budget_holds_for_what_peft_trains(mixtral, tmp_path, budget):
    """--budget 6000 planned 5,984 parameters, and its peft_config trained 8,160 (each fused parameter at the
    largest per-expert gate + up sum, its B over both halves uncounted). Now totals.params == PEFT's count ≤ budget."""
    base, _, data, _ = mixtral
    plan = recommend_ranks(data, RankPolicy(energy=None, budget_params=budget))
    saved = _saved(plan, tmp_path / "plan.json")
    trained, ranks = _peft_trainable(base, saved["peft_config"])
    assert saved["totals"]["params"] == plan.total_params == trained <= budget
    assert trained > 0.9 * budget  # the budget is spent, not dodged
    assert not any("so PEFT trains" in note for note in saved["peft_config_notes"])  # nothing to approximate
    assert {f.name: f.rank for f in plan.fused} == ranks and len(ranks) == 4  # PEFT's r of every fused parameter
    for f in plan.fused:
        members = [m for m in plan.modules if f".layers.{f.name.split('.')[2]}." in m.name and ".experts." in m.name
                   and (m.role == "down") == f.name.endswith("down_proj")]
        assert len({(m.role, m.rank) for m in members}) == len({m.role for m in members})  # experts share a rank
        assert f.params == f.rank * f.shape[0] * (f.shape[1] + f.shape[2])


def _spectra64(base, tuned) -> dict:
    """Σ_{i≤r} σᵢ² (r = 0…k) of every adapted update, float64 SVD of the models' own tensors, by decision:
    an attention matrix, or one projection (gate, up, down) of all experts in a layer."""
    b, t = base.state_dict(), tuned.state_dict()
    cums = {}

    def cum(delta):
        s = torch.linalg.svdvals(delta.double())
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s * s, 0)])

    for name in b:
        delta = t[name].double() - b[name].double()
        if delta.ndim == 2 and "self_attn" in name:
            cums[name] = (sum(delta.shape), [cum(delta)])
        elif delta.ndim == 3:
            experts, d1, d2 = delta.shape
            if "gate_up" in name:
                for part, rows in (("gate", slice(0, d1 // 2)), ("up", slice(d1 // 2, d1))):
                    cums[f"{name}[{part}]"] = (experts * (d1 + d2), [cum(delta[e, rows]) for e in range(experts)])
            else:
                cums[name] = (experts * (d1 + d2), [cum(delta[e]) for e in range(experts)])
    return cums


def _optimum(cums: dict, budget: int) -> float:
    """Exact max Σ captured σ² over one rank ≥ 1 per decision, Σ rank·cost ≤ budget (DP over cost in units of the
    costs' gcd); an expert whose update is 0 adds nothing but is paid for."""
    unit = math.gcd(*(c for c, _ in cums.values()))
    cap = budget // unit
    best = torch.full((cap + 1,), -math.inf, dtype=torch.float64)
    best[0] = 0.0
    for cost, curves in cums.values():
        k = min(len(c) for c in curves) - 1
        nxt = torch.full_like(best, -math.inf)
        for r in range(1, k + 1):
            step = r * cost // unit
            if step > cap:
                break
            gain = float(sum(c[r] for c in curves))
            nxt[step:] = torch.maximum(nxt[step:], best[:cap + 1 - step] + gain)
        best = nxt
    return float(best.max())


@pytest.mark.parametrize("budget", [2500, 6000])
def test_the_allocation_is_within_its_gap_of_the_exact_optimum_at_peft_cost(mixtral, budget):
    """Float64 reference: the plan's captured energy is its ranks' Σσ² (from the models' tensors), and an exact
    optimum over the same decisions at PEFT's cost beats it by at most budget_gap."""
    base, tuned, data, _ = mixtral
    plan = recommend_ranks(data, RankPolicy(energy=None, budget_params=budget))
    cums = _spectra64(base, tuned)
    rank_of = {}
    for m in plan.modules:
        layer = m.layer
        if m.role in ("gate", "up"):
            key = f"model.layers.{layer}.mlp.experts.gate_up_proj[{m.role}]"
        elif m.role == "down":
            key = f"model.layers.{layer}.mlp.experts.down_proj"
        else:
            key = m.name + ".weight"
        assert rank_of.setdefault(key, m.rank) == m.rank, key  # one rank per decision
    assert set(rank_of) == set(cums)
    total = sum(float(c[-1]) for _, curves in cums.values() for c in curves)
    captured = sum(float(c[rank_of[key]]) for key, (_, curves) in cums.items() for c in curves)
    assert plan.total_energy == pytest.approx(captured / total, rel=1e-5)
    assert sum(rank_of[k] * cost for k, (cost, _) in cums.items()) == plan.total_params  # PEFT's cost
    optimum = _optimum(cums, budget) / total
    assert captured / total <= optimum + 1e-6
    assert optimum - captured / total <= plan.budget_gap + 1e-6


def test_without_a_budget_experts_share_the_largest_rank_and_left_out_rows_are_counted(mixtral, tmp_path):
    """An energy plan: every expert of a projection at the largest rank its experts ask (each meets its own target),
    and layer 1's unchanged expert-2 up rows, which PEFT trains at the up rank, counted as padding."""
    base, tuned, data, _ = mixtral
    plan = recommend_ranks(data, RankPolicy(energy=0.9))
    cums = _spectra64(base, tuned)
    for m in plan.modules:
        assert m.energy >= 0.9 - 1e-6, m.name
    gate = [m for m in plan.modules if m.layer == 1 and m.role == "gate"]
    ranks = [int(torch.searchsorted(c, 0.9 * c[-1] * (1 - 1e-9))) for c in
             cums["model.layers.1.mlp.experts.gate_up_proj[gate]"][1]]  # each expert's own τ = 0.9 rank, float64
    assert len(set(ranks)) > 1 and {m.rank for m in gate} == {max(ranks)}
    assert sum("one rank for all experts" in m.reason for m in gate) == sum(r < max(ranks) for r in ranks)
    assert "model.layers.1.block_sparse_moe.experts.2.w3" in {m.name for m in plan.left_out}
    fused = {f.name: f for f in plan.fused}
    up = next(m.rank for m in plan.modules if m.layer == 1 and m.role == "up")
    assert fused["model.layers.1.mlp.experts.gate_up_proj"].padding == up * (96 + 32)
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].padding == 0
    saved = _saved(plan, tmp_path / "plan.json")
    assert saved["totals"]["params"] == plan.total_params == _peft_trainable(base, saved["peft_config"])[0]
    note = next(n for n in saved["peft_config_notes"] if "layers.1.mlp.experts.gate_up_proj" in n)
    assert "experts.2.w3" in note and f"{up * 128:,} parameters, counted in the plan's total" in note


def test_negative_control_a_plan_made_without_the_model_undercounts_and_says_so(mixtral, tmp_path):
    """Without the model's config (no base path), experts are planned one by one at r·(d_in + d_out): the plan's
    total stays within budget, PEFT's count does not, and peft_config_notes name the difference."""
    base, _, data, root = mixtral
    unplaced = {**data, "base": None}
    plan = recommend_ranks(unplaced, RankPolicy(energy=None, budget_params=6000))
    assert plan.fused == () and plan.total_params <= 6000
    with pytest.warns(PeftConfigWarning):
        save_plan(plan, tmp_path / "plan.json", model_config=json.loads((root / "base" / "config.json").read_text()))
    saved = json.loads((tmp_path / "plan.json").read_text())
    trained, _ = _peft_trainable(base, saved["peft_config"])
    assert trained > 6000 >= plan.total_params
    assert any("gate_up_proj" in n and "so PEFT trains" in n for n in saved["peft_config_notes"])
    # given the config, the same rows plan at PEFT's cost
    placed = recommend_ranks(unplaced, RankPolicy(energy=None, budget_params=6000),
                             model_config=json.loads((root / "base" / "config.json").read_text()))
    assert placed.fused and placed.total_params <= 6000


def test_round_trip_keeps_the_fused_parameters(mixtral, tmp_path):
    from spectra.ranks.plan import RankPlan, load_plan

    plan = recommend_ranks(mixtral[2], RankPolicy(energy=None, budget_params=6000))
    assert RankPlan.from_dict(plan.to_dict()) == plan
    saved = _saved(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").total_params == plan.total_params == saved["totals"]["params"]


@pytest.mark.parametrize("budget", [1500, 4000])
def test_dense_llama_control_nothing_changes(tmp_path, budget):
    """No fused parameter: the plan is the per-module allocation (its config changes nothing), and its totals are
    PEFT's count as before."""
    from spectra.analysis import analyze

    base = build_model("llama")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(tuned.named_parameters())):
            if p.ndim == 2 and "layers" in name:
                p += _decaying(tuple(p.shape), seed=i, decay=0.5 + 0.04 * i).float()
    b, t = save(base, tmp_path / "base", "safetensors"), save(tuned, tmp_path / "tuned", "safetensors")
    data = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(data, RankPolicy(energy=None, budget_params=budget))
    # the per-module allocation, by hand: every matrix of a layer its own decision at r·(d_in + d_out)
    rows = [r for r in data.to_dict()["modules"] if r.get("kind", "matrix") == "matrix" and r["role"] not in
            ("embed", "head") and r["fro_norm"] > 0]
    cums = [np.concatenate([[0.0], np.cumsum(np.square(r["singular_values"]))]) for r in rows]
    result = allocate_budget([list(range(1, len(c))) for c in cums], [list(c[1:]) for c in cums],
                             [sum(r["shape"]) for r in rows], budget)
    assert plan.fused == () and {m.name: m.rank for m in plan.modules} == {
        r["name"]: rank for r, rank in zip(rows, result.ranks)}
    assert all(m.params == m.rank * sum(m.shape) for m in plan.modules)
    saved = _saved(plan, tmp_path / "plan.json")
    assert saved["totals"]["params"] == plan.total_params == _peft_trainable(base, saved["peft_config"])[0] <= budget
