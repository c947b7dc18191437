"""A plan's captured energy as a share of the whole update, not only of the modules it targets.

Audit s19: `recommend` headed Gemma 2's plan "98.4% of ΔW energy captured" while its tied embedding, left out (embed is
no default role), held 74% of ‖ΔW‖²: ``total_energy`` is a share of the targeted modules' Σ‖ΔW‖_F² alone. The plan
now says the targeted modules' share of the whole update (``coverage``) and what it captures of that whole
(``whole_energy``), over every analysed matrix; vectors (norms, biases) are not counted, as in verify. The referee
is a float64 sum of ‖ΔW‖_F² and numpy SVDs over the planted pair's own parameters.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spectra.ranks import RankPolicy, recommend_ranks
from spectra.ranks.plan import load_plan, save_plan
from tests.models import planted_models, save

PLANTED = {"model.embed_tokens.weight": 3,  # tied to lm_head, role embed: left out by default
           "model.layers.0.self_attn.q_proj.weight": 2, "model.layers.1.mlp.up_proj.weight": 4}
BIAS = "model.layers.0.self_attn.v_proj.bias"  # a vector: in no share
ALL_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "embed")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("whole-update")
    base, tuned = planted_models("qwen2", PLANTED)
    with torch.no_grad():
        dict(tuned.named_parameters())[BIAS] += 0.5  # larger than every matrix's update: counted, it would show
    b, t = save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")
    deltas = {n.removesuffix(".weight"): (p.detach().double() - dict(base.named_parameters())[n].detach().double())
              .numpy() for n, p in tuned.named_parameters() if p.ndim == 2}  # tied: one embed_tokens, no lm_head
    return analyze(b, t, cache_dir=False, progress=False), deltas


def _reference(deltas, ranks: dict[str, int]) -> tuple[float, float, float]:
    """(targeted share captured, coverage, whole share captured) in float64 from the ΔWs themselves."""
    fro2 = {n: float(np.sum(d * d)) for n, d in deltas.items()}
    captured = {n: float(np.sum(np.linalg.svd(deltas[n], compute_uv=False)[:r] ** 2)) for n, r in ranks.items()}
    whole, targeted = math.fsum(fro2.values()), math.fsum(fro2[n] for n in ranks)
    return math.fsum(captured.values()) / targeted, targeted / whole, math.fsum(captured.values()) / whole


def test_the_whole_update_counts_the_left_out_embedding(pair, tmp_path):
    analysis, deltas = pair
    plan = recommend_ranks(analysis, RankPolicy(rank=1))  # rank 1 of flat spectra: half of q's, a quarter of up's
    ranks = {m.name: m.rank for m in plan.modules}
    assert set(ranks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    assert "model.embed_tokens" in {m.name for m in plan.left_out}
    energy, coverage, whole = _reference(deltas, ranks)
    assert plan.total_energy == pytest.approx(energy, rel=1e-5)  # 2/6: of the targeted modules only
    assert plan.coverage == pytest.approx(coverage, rel=1e-5)  # 6/9: the embedding holds the other 3/9
    assert plan.whole_energy == pytest.approx(whole, rel=1e-5)  # 2/9
    assert plan.whole_fro2 == pytest.approx(math.fsum(float(np.sum(d * d)) for d in deltas.values()), rel=1e-5)
    assert coverage == pytest.approx(6 / 9, rel=1e-3) and whole < energy  # the planted numbers, and they differ
    saved = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())["totals"]
    assert saved["coverage"] == pytest.approx(coverage, rel=1e-5)
    assert saved["whole_energy"] == pytest.approx(whole, rel=1e-5)
    again = load_plan(tmp_path / "plan.json")  # read back: the left-out modules' norms give the same shares
    assert (again.coverage, again.whole_energy) == (plan.coverage, plan.whole_energy)


def test_a_plan_of_every_changed_module_covers_the_whole_update(pair):
    """Negative control: with embed in the roles nothing changed is left out, so the two shares are one."""
    analysis, deltas = pair
    plan = recommend_ranks(analysis, RankPolicy(rank=1, roles=ALL_ROLES))
    ranks = {m.name: m.rank for m in plan.modules}
    assert "model.embed_tokens" in ranks and all(m.fro_norm == 0.0 for m in plan.left_out)
    energy, coverage, whole = _reference(deltas, {n: r for n, r in ranks.items() if n in deltas})
    assert coverage == pytest.approx(1.0) and plan.coverage == pytest.approx(1.0, rel=1e-12)
    assert plan.whole_energy == pytest.approx(plan.total_energy, rel=1e-12)
    assert plan.whole_energy == pytest.approx(whole, rel=1e-5)
