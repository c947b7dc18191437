"""JetMoE is refused by spectra's memory model with its own reason (a mixture of attention experts, a shared
kv_proj, JetMoeParallelExperts), each part checked against transformers' JetMoeModel built from a tiny config; it had
been refused by the generic parameter-count check ("its blocks differ from the families the memory model
describes")."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
             intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)


def test_jetmoe_is_refused_for_its_attention_experts_with_what_transformers_builds():
    import torch
    from transformers import JetMoeConfig, JetMoeModel

    config = JetMoeConfig(**SIZES)
    with pytest.raises(ConfigError) as refused:
        estimate_memory(config.to_dict(), method="lora", rank_plan_or_rank=4)
    message = str(refused.value)
    assert message.startswith("model_type jetmoe: a mixture of attention experts")
    assert "counts" not in message  # not the generic count refusal
    with torch.device("meta"):
        model = JetMoeModel(config)
    attention, mlp = model.layers[0].self_attention, model.layers[0].mlp
    kv = SIZES["num_key_value_heads"] * SIZES["kv_channels"]
    e, h, i = SIZES["num_local_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    # what the message names: attention experts' 3-D weights, their router, the shared kv_proj, the MLP experts
    assert tuple(attention.experts.input_linear.weight.shape) == (e, kv, h)
    assert tuple(attention.experts.output_linear.weight.shape) == (e, h, kv)
    assert tuple(attention.experts.router.layer.weight.shape) == (e, h)
    assert tuple(attention.kv_proj.weight.shape) == (2 * kv, h)
    assert tuple(mlp.input_linear.weight.shape) == (e, 2 * i, h) and tuple(mlp.bias.shape) == (h,)
    assert attention.num_heads == SIZES["num_key_value_heads"] * SIZES["num_experts_per_tok"]
    for name in ("num_experts_per_tok", "num_local_experts", "kv_proj", "JetMoeParallelExperts"):
        assert name in message, name


def test_mixtral_is_still_estimated():
    """Negative control: a Mixtral-style MoE of the same sizes is estimated."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2).to_dict()
    assert estimate_memory(config, method="lora", rank_plan_or_rank=4).trainable_params > 0
