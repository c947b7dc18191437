"""Gemma 4 is refused by spectra's memory model with what its blocks hold beyond Gemma 3's, read off the config and
checked against transformers' Gemma4TextModel built from a tiny config; its config.json's num_experts (null in a
dense Gemma 4) had it refused as an MoE of its own expert sizes."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LAYER_TYPES = ["sliding_attention", "full_attention"]


def _text(**overrides) -> dict:
    """A tiny Gemma 4 language model's config.json, as Gemma4TextConfig writes it (num_experts: null)."""
    from transformers import Gemma4TextConfig

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, global_head_dim=16, layer_types=LAYER_TYPES,
                 vocab_size_per_layer_input=64, hidden_size_per_layer_input=0, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    return Gemma4TextConfig(**(sizes | overrides)).to_dict()


def test_gemma4_is_refused_for_its_own_blocks_not_as_an_moe():
    config = _text()
    assert "num_experts" in config and config["num_experts"] is None and not config["enable_moe_block"]
    with pytest.raises(ConfigError) as refused:
        estimate_memory(config, method="lora", rank_plan_or_rank=4)
    message = str(refused.value)
    assert message.startswith("model_type gemma4_text: Gemma 4's blocks differ from Gemma 3's")
    assert "mixture of experts" not in message and "this config also sets" not in message  # a plain dense Gemma 4
    assert "global_head_dim" in message and "v_norm" in message


def test_the_refusal_names_what_the_config_adds_as_transformers_builds_it():
    """attention_k_eq_v, per-layer embeddings and KV sharing are named from the config; each as transformers'
    Gemma4TextModel built from it holds it: no v_proj in the full-attention layer (whose k_proj spectra's roles read
    as kv, which --roles v takes, as train would), a per-layer table and two Linears a block, no k/v projections in
    the shared layer."""
    import torch
    from transformers import Gemma4TextConfig, Gemma4TextModel

    from spectra.checkpoints.architectures import module_info, role_selected

    config = _text(attention_k_eq_v=True, hidden_size_per_layer_input=8, num_kv_shared_layers=1,
                   num_global_key_value_heads=1, num_hidden_layers=3, layer_types=[*LAYER_TYPES, "full_attention"])
    with pytest.raises(ConfigError) as refused:
        estimate_memory(config, method="lora", rank_plan_or_rank=4)
    message = str(refused.value)
    for named in ("attention_k_eq_v", "role kv", "hidden_size_per_layer_input 8", "num_kv_shared_layers 1"):
        assert named in message, named
    with torch.device("meta"):
        model = Gemma4TextModel(Gemma4TextConfig(**config))
    names = {name for name, _ in model.named_modules()}
    assert {"layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"} <= names  # sliding: its own v_proj
    assert "layers.1.self_attn.k_proj" in names and model.layers[1].self_attn.v_proj is None  # full: k is v
    assert not {"layers.2.self_attn.k_proj", "layers.2.self_attn.v_proj"} & names  # shared: none
    assert {"layers.0.per_layer_input_gate", "layers.0.per_layer_projection", "embed_tokens_per_layer"} <= names
    role = module_info("model.layers.1.self_attn.k_proj", config).role
    assert role == "kv" and role_selected(role, ("v",)) and role_selected(role, ("k",))
    assert module_info("model.layers.0.self_attn.k_proj", config).role == "k"  # negative control: sliding


def test_a_multimodal_gemma4_is_refused_by_its_language_model():
    from transformers import Gemma4Config

    config = Gemma4Config(text_config=_text(attention_k_eq_v=True)).to_dict()
    with pytest.raises(ConfigError, match=r"model_type gemma4_text: Gemma 4's blocks .* attention_k_eq_v"):
        estimate_memory(config, method="lora", rank_plan_or_rank=4)


def test_gemma3_is_still_estimated():
    """Negative control: Gemma 3's text model, the closest family described, is estimated as before."""
    from tests.models import tiny_config

    est = estimate_memory(tiny_config("gemma3").to_dict(), method="lora", rank_plan_or_rank=4)
    assert est.trainable_params > 0 and est.activations > 0
