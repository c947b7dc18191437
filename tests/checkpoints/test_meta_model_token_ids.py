"""targets.meta_model builds a config whose token ids lie outside its vocabulary (a tiny config that keeps its
family's pad_token_id) without them: they stop nn.Embedding but change no parameter. The memory model had this retry
to itself, so spectra train's early refusal of DoRA/QLoRA on parameter targets, which asks meta_model, skipped such
configs (and refused only after loading the data and the weights)."""

from __future__ import annotations

import json

import pytest

from spectra.checkpoints.targets import meta_model
from spectra.errors import ConfigError


def _mixtral(**ids) -> dict:
    import transformers as tf

    config = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=64)
    return config.to_dict() | {"architectures": ["MixtralForCausalLM"]} | ids


def test_token_ids_outside_the_vocabulary_build_the_same_model():
    """GLM's own pad_token_id (151329) of a 64-token vocabulary: built, with the parameters of the same config with
    in-vocabulary ids; the negative control, transformers itself, refuses to build it with that id."""
    import torch
    import transformers as tf

    glm = tf.GlmConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=64).to_dict()
    assert glm["pad_token_id"] >= 64
    with pytest.raises(Exception), torch.device("meta"):
        tf.GlmForCausalLM(tf.GlmConfig(**{k: v for k, v in glm.items() if k != "model_type"}))
    built = meta_model(glm, "GlmForCausalLM")
    inside = meta_model(glm | dict(pad_token_id=0, bos_token_id=0, eos_token_id=0), "GlmForCausalLM")
    assert built is not None and inside is not None
    assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in inside.named_parameters()}


@pytest.mark.parametrize("pad_token_id", [0, 151329])
def test_trains_early_refusal_reaches_configs_with_such_ids(pad_token_id, tmp_path):
    """DoRA with roles that take a Mixtral's fused experts is refused from config.json, before data and weights
    are read, whether or not its pad_token_id lies in the vocabulary (it was skipped when it did not)."""
    from spectra.lora.train import TrainConfig, refuse_before_loading

    (tmp_path / "config.json").write_text(json.dumps(_mixtral(pad_token_id=pad_token_id)))
    with pytest.raises(ConfigError, match="target_parameters"):
        refuse_before_loading(tmp_path, TrainConfig(method="dora", rank=4, roles=("gate",)))
