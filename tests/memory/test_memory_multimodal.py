"""QLoRA and DoRA of a multimodal config's language model (stacks that leave the towers unadapted), and stacks on a
config whose projector has linear layers (LLaVA). QLoRA and DoRA had been refused on every multimodal config, and
tests/memory/test_memory.py checked ``language,vision == all-linear`` only on Gemma 3, whose projector has no Linear."""

from __future__ import annotations

import copy

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, train_lora_config


def _trained(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("stacks", [None, ("language",)])
def test_qlora_of_a_multimodal_language_model_stores_what_bitsandbytes_holds(stacks, tmp_path):
    """Gemma3ForConditionalGeneration in 4 bits: bitsandbytes converts the vision tower's Linears too (not its
    MultiheadAttention's out_proj, a Linear subclass, nor the LM head), so the estimate's weights and NF4 constants
    are the loaded model's bytes. Trainable parameters are PEFT's on spectra train's QLoRA LoraConfig (the language
    model's linears), and the activations are the text_config's alone (text-only batches never run the tower).
    The towers' 4-bit linears are those bitsandbytes converted, not every tower linear."""
    import bitsandbytes as bnb
    from peft import get_peft_model

    from tests.models import build_model, load_4bit

    model = build_model("gemma3_multimodal")
    config = model.config.to_dict()
    loaded, constants = load_4bit(model, tmp_path)
    est = estimate_memory(config, method="qlora", rank_plan_or_rank=4, batch=2, seq_len=16, stacks=stacks)
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert est.weights == held and est.quant_constants == constants
    assert any(".vision_tower." in name for name, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    trained = get_peft_model(copy.deepcopy(model), train_lora_config(model, "qlora"))
    text = estimate_memory(config["text_config"], method="qlora", rank_plan_or_rank=4, batch=2, seq_len=16)
    assert est.trainable_params == _trained(trained) == text.trainable_params
    assert est.activations == text.activations and est.gradients == text.gradients
    towers_4bit = sorted(tuple(m.weight.quant_state.shape) for name, m in loaded.named_modules()
                         if isinstance(m, bnb.nn.Linear4bit) and ".language_model." not in name)
    assert sorted(model_shape(config).tower_quantised) == towers_4bit  # the out_proj of its attention head: no
    assert len(model_shape(config).tower_linears) > len(towers_4bit)


@_PEFT_PATTERN_WARNING
def test_dora_of_a_multimodal_language_model_is_its_text_models():
    """DoRA with the default stacks (or language): PEFT's trainable count on train's DoRA LoraConfig, and the text
    model's activations and workspace (the largest adapted module is the language model's); the weights hold the
    towers too."""
    from peft import get_peft_model

    from tests.models import build_model

    model = build_model("gemma3_multimodal")
    config = model.config.to_dict()
    est = estimate_memory(config, method="dora", rank_plan_or_rank=4, batch=2, seq_len=16, stacks=("language",))
    text = estimate_memory(config["text_config"], method="dora", rank_plan_or_rank=4, batch=2, seq_len=16)
    trained = get_peft_model(copy.deepcopy(model), train_lora_config(model, "dora"))
    assert est.trainable_params == _trained(trained) == text.trainable_params
    assert (est.activations, est.workspace, est.dora_magnitude) == (text.activations, text.workspace,
                                                                    text.dora_magnitude)
    assert est.weights > text.weights
    assert estimate_memory(config, method="dora", rank_plan_or_rank=4, batch=2, seq_len=16) == est


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_qlora_and_dora_on_a_towers_linears_are_still_refused_naming_the_stack(method):
    """Stacks that adapt the vision tower under QLoRA or DoRA: refused, the message naming the stack and the way out;
    roles that select none of the tower's linears adapt nothing there and are estimated."""
    from tests.models import build_model

    config = build_model("gemma3_multimodal").config.to_dict()
    with pytest.raises(ConfigError, match=f"{method} on the vision stack's linears .*Leave vision out of stacks"):
        estimate_memory(config, method=method, rank_plan_or_rank=4, stacks=("language", "vision"))
    for kwargs in (dict(layers_to_transform=0), dict(method="lora", layers_to_transform=0)):
        with pytest.raises(ConfigError, match="multimodal"):
            estimate_memory(config, **({"method": method} | kwargs), rank_plan_or_rank=4)


def _llava():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from tests.lora.test_vlm import tiny_vlm

    return tiny_vlm("llava")


@_PEFT_PATTERN_WARNING
def test_stacks_of_a_llava_count_what_train_adapts_and_all_linear_adds_the_projector():
    """LLaVA's multi_modal_projector holds two Linears (linear_1, linear_2; stack projector, role projector), which
    Gemma 3's has none of, so there ``language,vision == all-linear`` could not tell whether a projector is counted.
    Here each stack selection's count is PEFT's on spectra train's LoraConfig for the same stacks, and PEFT's
    all-linear is ``language,vision,projector`` exactly (the projector's role is a block role: it had none, and was
    left out) and exceeds ``language,vision`` by the projector's adapters. The towers' adapters get no gradient on
    text-only batches."""
    from peft import LoraConfig, get_peft_model

    from spectra.lora.train import TrainConfig, lora_config

    model = _llava()
    config = model.config.to_dict()
    r = 4
    projector = [m for name, m in model.named_modules() if "multi_modal_projector" in name
                 and type(m).__name__ == "Linear"]
    assert len(projector) == 2
    projector_params = sum(r * (m.in_features + m.out_features) for m in projector)
    everything = ("language", "vision", "projector")
    for stacks in (everything, ("language", "vision"), ("language",), None):
        trained = lora_config(model, TrainConfig(rank=r, stacks=stacks), task="causal_lm")
        est = estimate_memory(config, rank_plan_or_rank=r, precision="fp32", stacks=stacks)
        assert est.trainable_params == _trained(get_peft_model(copy.deepcopy(model), trained)), stacks
    all_linear = _trained(get_peft_model(copy.deepcopy(model), LoraConfig(r=r, target_modules="all-linear")))
    est = estimate_memory(config, rank_plan_or_rank=r, precision="fp32", stacks=everything)
    assert all_linear == est.trainable_params
    towers = estimate_memory(config, rank_plan_or_rank=r, precision="fp32", stacks=("language", "vision"))
    assert all_linear - towers.trainable_params == projector_params > 0
    assert est.gradients == estimate_memory(config, rank_plan_or_rank=r, precision="fp32").gradients
