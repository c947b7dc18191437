"""Rank plans over an MoE's dense MLPs, which PEFT would rewrite into fused expert targets, so the plan's peft_config
adapts them through their weights (target_parameters, a ParamWrapper): Qwen3-MoE's dense layers, DeepSeek's dense
and shared-expert MLPs. Checked against what autograd saves on the PEFT model built from the plan's own config
(tests/memory/test_memory.py's measurement), on tiny configs."""

from __future__ import annotations

import dataclasses

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory
from spectra.ranks import RankPlan
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, _loss, saved_bytes
from tests.memory.test_memory_moe_own_experts import _model
from tests.memory.test_memory_rev1_plans import _peft_of_plan, _planned

# (name, config overrides): every MLP dense (Qwen3-MoE's mlp_only_layers), a dense layer then an MoE one (DeepSeek)
_DENSE_MLPS = [("qwen3_moe", dict(mlp_only_layers=[0, 1])), ("deepseek_v3", dict(first_k_dense_replace=1))]


def _mlp_plan(model, *, query: bool = False) -> RankPlan:
    """Each layer's dense MLP, or its shared experts, at rank 2; ``query``: and layer 0's query projection, a
    lora.Linear, so that every model keeps the rotary tables (which the estimate leaves out) from layer 0 on."""
    modules = []
    if query:
        attention = model.model.layers[0].self_attn
        has_q_proj = getattr(attention, "q_proj", None) is not None
        projection, role = ("q_proj", "q") if has_q_proj else ("q_a_proj", "q_a")  # DeepSeek's latent query
        weight = getattr(attention, projection).weight
        modules.append(_planned(f"model.layers.0.self_attn.{projection}", 0, tuple(weight.shape), role))
    for layer, block in enumerate(model.model.layers):
        holder = getattr(block.mlp, "shared_experts", None) if hasattr(block.mlp, "experts") else block.mlp
        if holder is None:
            continue
        prefix = f"model.layers.{layer}.mlp" + ("" if holder is block.mlp else ".shared_experts")
        for projection, role in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            weight = getattr(holder, projection).weight
            modules.append(_planned(f"{prefix}.{projection}", layer, tuple(weight.shape), role))
    return RankPlan(modules=tuple(modules))


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("name", "overrides"), _DENSE_MLPS)
def test_a_plans_dense_mlps_are_the_weights_its_peft_config_adapts(name, overrides, precision):
    """A layer's bytes (2 layers less 1, at batch 2: the merged weights W + s·B·A each layer keeps included) and a
    block's per sequence (the double difference over batch 2 and 3). The plan's modules had been counted as
    lora.Linear modules, while the plan's peft_config adapts their weights (checked here: target_parameters):
    Qwen3-MoE's 2-layer model at fp32 111492 bytes measured, 99456 estimated; a block 26368 against 26752."""
    import torch

    measured, modelled = {}, {}
    for layers in (1, 2):
        model = _model(name, num_hidden_layers=layers, **overrides)
        plan = _mlp_plan(model, query=True)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
            for block in model.model.layers:
                if name.startswith("deepseek") and hasattr(block.mlp, "experts"):
                    block.mlp.gate.float()  # DeepSeek's router, as from_pretrained keeps it
        peft_model, peft_config = _peft_of_plan(model, plan)
        assert peft_config["target_modules"] == [plan.modules[0].name]  # the query projection
        assert sorted(peft_config["target_parameters"]) == sorted(f"{m.name}.weight" for m in plan.modules[1:])
        for batch in (2, 3):
            measured[layers, batch] = saved_bytes(peft_model, lambda m: _loss(m, batch, 16))
            modelled[layers, batch] = estimate_memory(model.config.to_dict(), method="lora", rank_plan_or_rank=plan,
                                                      batch=batch, seq_len=16, precision=precision).activations
    per_layer = {k: d[2, 2] - d[1, 2] for k, d in (("measured", measured), ("modelled", modelled))}
    block = {k: d[2, 3] - d[1, 3] - d[2, 2] + d[1, 2] for k, d in (("measured", measured), ("modelled", modelled))}
    assert per_layer["modelled"] == per_layer["measured"] > 0, per_layer
    assert block["modelled"] == block["measured"] > 0, block
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert estimate_memory(model.config.to_dict(), method="lora", rank_plan_or_rank=plan).trainable_params == trainable


@pytest.mark.parametrize(("name", "overrides"), _DENSE_MLPS)
def test_dora_on_a_plans_dense_mlps_is_refused_as_the_plan_refuses_it(name, overrides):
    """PEFT's ParamWrapper takes no DoRA: the plan's own peft_config refuses it, and so does the estimate (it gave a
    total). A plan of attention modules alone is estimated under DoRA (negative control)."""
    import torch

    with torch.device("meta"):
        model = _model(name, num_hidden_layers=2, **overrides)
    plan = _mlp_plan(model)
    dora = RankPlan(modules=plan.modules, policy=dataclasses.replace(plan.policy, use_dora=True))
    with pytest.raises(ConfigError, match="target_parameters"):
        dora.to_peft_config(model=model)
    with pytest.raises(ConfigError, match=r"target_parameters\), which takes no DoRA"):
        estimate_memory(model.config.to_dict(), method="dora", rank_plan_or_rank=plan)
    o_proj = model.model.layers[0].self_attn.o_proj.weight
    attention = RankPlan(modules=(_planned("model.layers.0.self_attn.o_proj", 0, tuple(o_proj.shape), "o"),))
    assert estimate_memory(model.config.to_dict(), method="dora", rank_plan_or_rank=attention).training_total > 0
