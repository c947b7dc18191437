"""A rank plan of DeepSeek's router, which PEFT adapts through its fp32 weight (a ParamWrapper): the weight it merges
stays fp32. Checked against what autograd saves on the PEFT model built from the plan's own config (tests/
test_memory.py's measurement), on a tiny config."""

from __future__ import annotations

import copy

from spectra.memory import estimate_memory
from spectra.ranks import ModuleRank, RankPlan
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, _loss, saved_bytes
from tests.memory.test_memory_moe_own_experts import _model


def _planned(name: str, layer: int, shape: tuple[int, int], role: str, rank: int = 2) -> ModuleRank:
    return ModuleRank(name=name, role=role, layer=layer, shape=shape, rank=rank, alpha=2.0 * rank, energy=1.0,
                      energy_upper=1.0, params=rank * sum(shape), reason="energy")


def _peft_of_plan(model, plan: RankPlan):
    """The PEFT model of the plan's own LoraConfig (RankPlan.to_peft_config on the model), in training mode."""
    from peft import LoraConfig, get_peft_model

    config = plan.to_peft_config(model=model)
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    return get_peft_model(copy.deepcopy(model), LoraConfig(**fields)).train(), config


@_PEFT_PATTERN_WARNING
def test_a_planned_deepseek_router_keeps_its_merged_weight_in_fp32():
    """DeepSeek-V3's router weight stays fp32 under a bf16 model (from_pretrained's _keep_in_fp32_modules_strict), so
    the weight its ParamWrapper merges does too: an MoE layer's bytes (3 layers less 2) at bf16, measured against
    modelled. Counted at bf16 it was 2·E·h = 192 bytes short (42188 against 42380)."""
    import torch

    measured, modelled = {}, {}
    for layers in (2, 3):
        model = _model("deepseek_v3", num_hidden_layers=layers, first_k_dense_replace=1)
        routers = [_planned(f"model.layers.{n}.mlp.gate", n, tuple(block.mlp.gate.weight.shape), "other")
                   for n, block in enumerate(model.model.layers) if n >= 1]
        # an adapter before the MoE layers, so that their input requires grad
        o_proj = model.model.layers[0].self_attn.o_proj.weight
        plan = RankPlan(modules=(*routers, _planned("model.layers.0.self_attn.o_proj", 0, tuple(o_proj.shape), "o")))
        model = model.to(torch.bfloat16)
        for block in model.model.layers[1:]:
            block.mlp.gate.float()  # as from_pretrained keeps it
        peft_model, peft_config = _peft_of_plan(model, plan)
        assert "model.layers.1.mlp.gate.weight" in peft_config["target_parameters"]
        assert peft_model.base_model.model.model.layers[1].mlp.gate.base_layer.weight.dtype == torch.float32
        measured[layers] = saved_bytes(peft_model, lambda m: _loss(m, 2, 16))
        modelled[layers] = estimate_memory(model.config.to_dict(), method="lora", rank_plan_or_rank=plan, batch=2,
                                           seq_len=16, precision="bf16").activations
    assert modelled[3] - modelled[2] == measured[3] - measured[2] > 0
