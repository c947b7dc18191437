"""Rank plans of a multimodal model (a tiny Qwen2-VL: a 2-layer vision tower of width 16, a merger, a 2-layer
language model of width 32). A plan of the whole model (recommend's default: the vision tower's and the merger's
modules too) was refused as "made from an analysis of another model", its tower modules compared with the language
model's blocks (visual.blocks.0.attn.proj 16×16 against o_proj 32×32); a plan of the language model alone was refused
as holding tower modules it has none of. Both are estimated now, as the int rank on the same stacks is, and a plan of
another model's tower is refused naming that tower's stack."""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.checkpoints.architectures import module_info
from spectra.errors import ConfigError
from spectra.memory import estimate_memory
from spectra.ranks import ModuleRank, RankPlan
from tests.checkpoints.test_qwen_vl import tiny
from tests.memory.test_memory import _PEFT_PATTERN_WARNING

RANK = 2


def _plan(model, stacks=(None, "vision", "projector"), rank: int = RANK, resize: str | None = None) -> RankPlan:
    """A plan at ``rank`` of every Linear of ``model`` in ``stacks`` (None: the language model), the LM head aside;
    ``resize``: that module's shape planned one row wider (a plan of another model's)."""
    modules = []
    for name, module in model.named_modules():
        info = module_info(name)
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and info.stack in stacks:
            shape = tuple(module.weight.shape)
            if name == resize:
                shape = (shape[0] + 1, shape[1])
            modules.append(ModuleRank(name=name, role=info.role, layer=info.layer, shape=shape, rank=rank,
                                      alpha=2.0 * rank, energy=1.0, energy_upper=1.0, params=rank * sum(shape),
                                      reason="energy"))
    return RankPlan(modules=tuple(modules))


def _peft_trainable(model, plan: RankPlan) -> int:
    """Trainable parameters of PEFT's model on the plan's own LoraConfig (RankPlan.to_peft_config on the model)."""
    from peft import LoraConfig, get_peft_model

    config = plan.to_peft_config(model=model)
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**fields))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _model(family: str):
    if family == "qwen2_vl":
        return tiny(family)
    if family == "llava":  # a projector of two Linears
        from tests.memory.test_memory_multimodal import _llava

        return _llava()
    from tests.models import build_model

    return build_model(family)  # Gemma 3's: a SigLIP tower, a projector of no Linear


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3_multimodal"])
def test_a_plan_of_a_multimodal_model_is_estimated_as_the_int_rank_on_its_stacks(family):
    """A plan of the language model alone is the int rank's estimate (the language model's linears, the default
    stacks); a plan of every stack is the int rank's on the stacks it names (language,vision and the projector where
    it has Linears), the towers' adapters held but given no gradient. Trainable parameters are PEFT's on each plan's
    own LoraConfig."""
    model = _model(family)
    config = model.config.to_dict()
    kwargs = dict(batch=2, seq_len=16, precision="fp32")
    language, everything = _plan(model, stacks=(None,)), _plan(model)
    assert len(everything.modules) > len(language.modules) > 0
    by_plan = estimate_memory(config, rank_plan_or_rank=language, **kwargs)
    assert by_plan == estimate_memory(config, rank_plan_or_rank=RANK, **kwargs)
    assert by_plan.trainable_params == _peft_trainable(model, language)
    whole = estimate_memory(config, rank_plan_or_rank=everything, **kwargs)
    stacks = sorted({module_info(m.name).stack or "language" for m in everything.modules})
    assert "vision" in stacks and ("projector" in stacks) == (family != "gemma3_multimodal")
    assert whole == estimate_memory(config, rank_plan_or_rank=RANK, stacks=tuple(stacks), **kwargs)
    assert whole.trainable_params == _peft_trainable(model, everything) > by_plan.trainable_params
    assert whole.gradients == by_plan.gradients and whole.activations == by_plan.activations  # text-only batches


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_qlora_and_dora_of_a_plan_with_tower_modules_are_refused_naming_the_stacks(method):
    """As the int rank's stacks are: QLoRA's and DoRA's tower adapters are not modelled. The language model's plan is
    estimated, as the int rank is."""
    model = tiny("qwen2_vl")
    config = model.config.to_dict()
    with pytest.raises(ConfigError, match=f"{method} on the projector, vision stack's linears \\(the plan's "
                                          "modules\\).*--stacks language"):
        estimate_memory(config, method=method, rank_plan_or_rank=_plan(model))
    language = _plan(model, stacks=(None,))
    assert (estimate_memory(config, method=method, rank_plan_or_rank=language)
            == estimate_memory(config, method=method, rank_plan_or_rank=RANK))


def test_a_plan_of_another_models_tower_is_refused_naming_the_tower():
    """A tower module of another shape is judged by the tower's own linears (its stack, its role), never by the
    language model's blocks; a tower module on a config without that tower is refused naming the stack."""
    model = tiny("qwen2_vl")
    config = model.config.to_dict()
    other = _plan(model, resize="model.visual.blocks.0.attn.proj")
    with pytest.raises(ConfigError, match=r"model\.visual\.blocks\.0\.attn\.proj is 17×16, and this qwen2_vl .* "
                                          r"config's vision stack has o linears of 16×16"):
        estimate_memory(config, rank_plan_or_rank=other)
    with pytest.raises(ConfigError, match=r"visual\.merger\.mlp\.0 is a linear of the projector stack, and this "
                                          r"qwen2 config has no projector stack"):
        text = config["text_config"] | {"model_type": "qwen2"}
        estimate_memory(text, rank_plan_or_rank=_plan(model, stacks=("projector",)))
