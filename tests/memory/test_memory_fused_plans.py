"""The memory estimate of an MoE plan counts what PEFT trains on the fused expert parameters: the rank the plan's own
``peft_config`` gives each (Σ over gate and up of the largest expert rank), not the largest per-expert sum, which
undercounts where experts change different projections (rev1 F1)."""

import copy
import dataclasses
import json
import warnings

import pytest

from spectra.memory import estimate_memory

pytestmark = [pytest.mark.filterwarnings("ignore::spectra.errors.PeftConfigWarning"),
              pytest.mark.filterwarnings("ignore:.*pattern.*:UserWarning")]


def _peft_trains(base, plan, tmp_path, config=None) -> int:
    """Trainable parameters of ``get_peft_model`` on a copy of ``base`` with the plan's saved ``peft_config``."""
    from peft import LoraConfig, get_peft_model

    from spectra.ranks.plan import save_plan

    cfg = json.loads(save_plan(plan, tmp_path / "plan.json", model_config=config).read_text())["peft_config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _split_experts_pair(tmp_path):
    """Tiny Mixtral whose experts change different projections: in each layer experts 0 and 2 their gate (rank 2)
    alone, expert 1 its up (rank 3) alone; every expert's down at rank 1."""
    from tests.models import add_to_parameter, build_model, low_rank, save

    base = build_model("mixtral")
    tuned, seed = copy.deepcopy(base), 0
    for layer in (0, 1):
        experts = f"model.layers.{layer}.mlp.experts"
        for expert, (gate, up) in enumerate(((2, 0), (0, 3), (2, 0))):
            for rows, rank in ((slice(0, 48), gate), (slice(48, 96), up)):
                if rank:
                    seed += 1
                    add_to_parameter(tuned, f"{experts}.gate_up_proj", low_rank(48, 32, rank, seed=seed), rows=rows,
                                     expert=expert)
            seed += 1
            add_to_parameter(tuned, f"{experts}.down_proj", low_rank(32, 48, 1, seed=seed), expert=expert)
    return base, save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")


def _largest_expert_sum(plan) -> int:
    """The old count (the negative control): each fused parameter at the largest over experts of the ranks summed
    over the projections it holds."""
    per_expert = {}
    for m in plan.modules:
        head, _, tail = m.name.partition(".experts.")
        expert = tail.partition(".")[0]
        key = (head, m.role == "down")
        per_expert.setdefault(key, {}).setdefault(expert, 0)
        per_expert[key][expert] += m.rank
    return sum(max(ranks.values()) * 3 * (48 + 32 + (48 if not down else 0))
               for (_, down), ranks in per_expert.items())


def test_a_plan_made_with_the_config_counts_what_peft_trains(tmp_path):
    """recommend's path: the analysed base has its config.json, so the plan records the fused parameters."""
    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks

    base, b, t = _split_experts_pair(tmp_path)
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.99))
    assert {f.name.rpartition(".")[2]: f.rank for f in plan.fused} == {"gate_up_proj": 5, "down_proj": 1}
    trained = _peft_trains(base, plan, tmp_path)
    est = estimate_memory(json.loads((b / "config.json").read_text()), method="lora", rank_plan_or_rank=plan)
    assert est.trainable_params == trained == plan.total_params == 4320
    # negative control: gate_up at max(2, 3) = 3 per layer, as memory counted it, is 2,784
    assert _largest_expert_sum(plan) == 2784 != trained


def test_a_plan_without_fused_records_counts_what_peft_trains(tmp_path):
    """An older or config-less plan (no ``fused``), hand-edited so one expert's up outranks another's: memory asks
    the plan's peft_config rule on the model, and counts what PEFT trains (not the plan's own total)."""
    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks
    from tests.models import planted_mixtral_pair

    base, b, t = planted_mixtral_pair(tmp_path)
    data = analyze(b, t, cache_dir=False, progress=False).to_dict() | {"base": None}
    plan = recommend_ranks(data, RankPolicy(energy=0.99))
    assert plan.fused == ()
    edit = {"model.layers.1.block_sparse_moe.experts.0.w3": 2, "model.layers.1.block_sparse_moe.experts.1.w3": 1}
    plan = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=edit.get(m.name, m.rank))
                                                   for m in plan.modules))
    config = json.loads((b / "config.json").read_text())
    trained = _peft_trains(base, plan, tmp_path, config)
    est = estimate_memory(config, method="lora", rank_plan_or_rank=plan)
    assert est.trainable_params == trained == 4144
    assert plan.total_params != trained  # the plan made without the config undercounts; memory does not


def test_a_dense_plan_is_unchanged(tmp_path):
    """Control: a Llama plan has no fused parameter; memory counts each module at its rank, as PEFT trains it."""
    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks
    from tests.models import planted_models, save

    base, tuned = planted_models("llama", {"model.layers.0.self_attn.q_proj.weight": 2,
                                         "model.layers.1.mlp.down_proj.weight": 3})
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.99))
    assert plan.fused == () and plan.modules
    est = estimate_memory(json.loads((b / "config.json").read_text()), method="lora", rank_plan_or_rank=plan)
    assert est.trainable_params == _peft_trains(base, plan, tmp_path) == plan.total_params
