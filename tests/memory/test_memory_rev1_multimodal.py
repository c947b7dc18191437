"""Qwen2-VL's and Qwen2.5-VL's language models (qwen2_vl_text, qwen2_5_vl_text: Qwen2's blocks, q/k/v biased, sliding
by layer_types) are estimated; they had been refused, their biases uncounted ("blocks differ"). PaliGemma, whose top
level keeps a hidden_size of its own, is refused as the multimodal config it is, not for a missing key. Checked
against the models transformers builds and what autograd saves (tests/memory/test_memory.py's measurement) on tiny configs."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, saved_bytes, train_lora_config

_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
            "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


def _tiny(family: str, layers: int, **text):
    """A tiny config: text hidden size 32 (4 heads of 8, GQA 2), one vision block, mrope sections of the head."""
    import transformers as tf

    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2)
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=32, intermediate_size=24)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    return getattr(tf, _CLASSES[family][0])(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, rope_parameters=rope, **text),
        vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)


def _built(family: str, config, device=None):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return getattr(tf, _CLASSES[family][1])(config)


@pytest.mark.parametrize("family", _CLASSES)
def test_parameters_are_what_transformers_builds(family):
    """The family's default config (Qwen2-VL's: 819,200 q/k/v bias parameters had been left out, and the config
    refused) and a tiny one: every parameter of the model built on the meta device, the towers included. Negative
    control: the biases are what the count had lacked."""
    import transformers as tf

    for config in (getattr(tf, _CLASSES[family][0])(), _tiny(family, 2)):
        model = _built(family, config, "meta")
        shape = model_shape(config.to_dict())
        assert shape.params == sum(p.numel() for p in model.parameters())
        biases = sum(p.numel() for name, p in model.named_parameters()
                     if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and ".language_model." in name)
        assert biases == shape.layers * (shape.q_dim + 2 * shape.kv_dim) > 0


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "method", "precision", "text"), [
    ("qwen2_vl", "lora", "fp32", {}), ("qwen2_vl", "full", "bf16", {}), ("qwen2_5_vl", "lora", "bf16", {}),
    # every text layer slides by a window of 8 under 16 tokens: sdpa gets the mask, K and V repeated
    ("qwen2_vl", "lora", "fp32", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0))])
def test_a_text_blocks_activations_are_what_autograd_saves(family, method, precision, text):
    """One language-model block's bytes per text-only step (double difference over 1 and 2 text layers, batch 2 and
    3), measured and modelled; mrope's rotary tables, like Llama's, are shared by the layers."""
    import torch
    from peft import get_peft_model

    measured, modelled = {}, {}
    for layers in (1, 2):
        config = _tiny(family, layers, **text)
        model = _built(family, config).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
        if method != "full":
            model = get_peft_model(model, train_lora_config(model, method))
        model.train()
        for batch in (2, 3):
            ids = torch.randint(0, 60, (batch, 16), generator=torch.Generator().manual_seed(1))  # no image tokens
            measured[layers, batch] = saved_bytes(model, lambda m: m(input_ids=ids, labels=ids).loss)
            modelled[layers, batch] = estimate_memory(config.to_dict(), method=method, rank_plan_or_rank=4,
                                                      batch=batch, seq_len=16, precision=precision).activations
    block = {k: d[2, 3] - d[1, 3] - d[2, 2] + d[1, 2] for k, d in (("measured", measured), ("modelled", modelled))}
    assert block["modelled"] == block["measured"] > 0, block


def test_sliding_text_layers_cache_what_dynamic_cache_holds():
    """Qwen2-VL's text layers slide by layer_types (use_sliding_window, from max_window_layers on): the tokens its
    DynamicCache holds. Without use_sliding_window none slides."""
    import torch

    config = _tiny("qwen2_vl", 3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = _built("qwen2_vl", config)
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    shape = model_shape(config.to_dict())
    assert shape.windows == (0, 4, 4)
    assert shape.cached_tokens(16) * 2 * shape.kv_dim * 2 * 4 == held  # K and V, batch 2, fp32
    assert not model_shape(_tiny("qwen2_vl", 3).to_dict()).windows


def test_paligemma_is_refused_as_a_multimodal_config_the_model_does_not_read():
    """PaliGemma's top level keeps hidden_size (its projection's width) beside text_config: it was refused as a config
    that "lacks 'num_hidden_layers'". Its text_config alone, as the message says, is estimated."""
    import transformers as tf

    config = tf.PaliGemmaConfig().to_dict()
    with pytest.raises(ConfigError, match="model_type paligemma: a multimodal config whose top level carries") as err:
        estimate_memory(config)
    assert "lacks" not in str(err.value) and "Pass the text_config alone" in str(err.value)
    assert estimate_memory(config["text_config"]).training_total > 0
