"""Session 21's checks of how `spectra memory` reads a config: every family's blocks compared with transformers' base
model built from the config (the families read by their own rules had skipped it, so a config setting what their
rules do not describe was counted wrong), Helium's attention whose heads do not span hidden_size refused (its o_proj
is hidden_size × hidden_size: the forward fails), and one rule for a key config.json leaves out."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory, model_shape

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64)


def _built(config) -> int:
    """Parameters of transformers' base model built from ``config`` (a transformers config)."""
    import transformers as tf

    return sum(p.numel() for p in tf.AutoModel.from_config(config).parameters())


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_described_family_with_cross_attention_is_refused_not_miscounted(family):
    """GPT-2's and BERT's add_cross_attention builds a cross-attention sublayer in every block (GPT-2's crossattention
    and ln_cross_attn; BERT's crossattention), which the memory model does not describe. These families skipped the
    check against the built model, so the config was counted without them (GPT-2: 28,544 parameters of the base
    model's 37,120). Refused now, naming both counts. Negative control: without cross-attention the count is the
    built model's and the config is estimated."""
    import transformers as tf

    sizes = dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64, bos_token_id=0, eos_token_id=0) \
        if family == "gpt2" else dict(_SMALL, is_decoder=True)
    plain = tf.AutoConfig.for_model(family, **sizes)
    crossed = tf.AutoConfig.for_model(family, **sizes, add_cross_attention=True)
    shape = model_shape(plain.to_dict())
    assert shape.params - shape.head_params == _built(plain)
    assert estimate_memory(plain.to_dict(), method="lora", rank_plan_or_rank=4).activations > 0
    with pytest.raises(ConfigError, match=rf"holds {_built(crossed)} parameters, spectra's memory model counts "
                                          rf"{shape.params - shape.head_params} "):
        model_shape(crossed.to_dict())


def test_helium_whose_heads_do_not_span_hidden_size_is_refused():
    """HeliumAttention builds o_proj as hidden_size × hidden_size whatever num_attention_heads × head_dim: a config
    where they differ builds (a model of 13,920 parameters) but its forward fails on o_proj, so it cannot be trained.
    It was estimated with o_proj of (hidden_size, heads·head_dim): 14,944 parameters, neither the model's nor a
    trainable one. Refused naming the keys and values; so is a config.json that leaves head_dim out where
    HeliumConfig's default (128) does not span hidden_size. Negative control: heads × head_dim = hidden_size is
    estimated with the built model's count."""
    import torch
    import transformers as tf

    wide = tf.HeliumConfig(**_SMALL, head_dim=16)
    model = tf.HeliumForCausalLM(wide)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"num_attention_heads 4 × head_dim 16 = 64, not hidden_size 32"):
        model_shape(wide.to_dict())
    with pytest.raises(ConfigError, match=r"num_attention_heads 4 × head_dim 128 = 512, not hidden_size 32"):
        model_shape(_SMALL | {"model_type": "helium"})  # head_dim left to HeliumConfig
    spanning = tf.HeliumConfig(**_SMALL, head_dim=8)
    shape = model_shape(spanning.to_dict())
    assert shape.params == sum(p.numel() for p in tf.HeliumForCausalLM(spanning).parameters())


def test_a_key_left_out_is_read_as_the_family_fills_it_in():
    """One rule for a key config.json leaves out (shape._family_value): the value transformers' config class holds
    built from the config (Llama's head_dim from hidden_size / num_attention_heads, Seed-OSS's default 128), its
    default where the class cannot be built from the config, the fallback where it has no such key."""
    from spectra.memory.shape import _family_value

    assert _family_value(_SMALL | {"head_dim": 4}, "llama", "head_dim") == 4
    assert _family_value(_SMALL, "llama", "head_dim") == 8
    assert _family_value(_SMALL, "seed_oss", "head_dim") == 128
    assert _family_value(_SMALL, "seed_oss", "residual_dropout") == 0.1
    assert _family_value(_SMALL | {"hidden_act": "no_such_activation"}, "seed_oss", "attention_bias") is True
    assert _family_value(_SMALL, "llama", "no_such_key", "fallback") == "fallback"
    assert _family_value(_SMALL, "not_in_transformers", "head_dim", 7) == 7
