"""Which MoE routers renormalise their top-k weights: Qwen3-MoE's by norm_topk_prob, Mixtral's always (its router
reads no norm_topk_prob, whatever config.json carries). Checked against what autograd saves (tests/memory/test_memory.py's
measurement) on tiny Mixtral models."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, _loss, _tiny_config, saved_bytes, train_lora_config
from tests.memory.test_memory_moe_own_experts import _config


def _mixtral(layers: int, **extra) -> dict:
    import transformers as tf

    config = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=64)
    return config.to_dict() | extra


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("method", ["full", "lora"])
def test_mixtral_renormalises_whatever_norm_topk_prob_says(method):
    """A Mixtral config.json carrying norm_topk_prob false: a block's bytes per sequence (double difference over 1 and
    2 layers, batch 2 and 3) at bf16, measured and modelled, and the same as without the key. The estimate had
    dropped the normalisation's (4k + 4) bytes a token (29376 against 29568 under full fine-tuning)."""
    import torch
    import transformers as tf
    from peft import get_peft_model

    measured, modelled, without = {}, {}, {}
    for layers in (1, 2):
        config = _mixtral(layers, norm_topk_prob=False)
        torch.manual_seed(0)
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**config)).to(torch.bfloat16)
        if method != "full":
            model = get_peft_model(model, train_lora_config(model, method))
        model.train()
        for batch in (2, 3):
            measured[layers, batch] = saved_bytes(model, lambda m: _loss(m, batch, 16))
            options = dict(method=method, rank_plan_or_rank=4, batch=batch, seq_len=16, precision="bf16")
            modelled[layers, batch] = estimate_memory(config, **options).activations
            without[layers, batch] = estimate_memory(_mixtral(layers), **options).activations
    block = {k: d[2, 3] - d[1, 3] - d[2, 2] + d[1, 2]
             for k, d in (("measured", measured), ("modelled", modelled), ("without", without))}
    assert block["modelled"] == block["measured"] == block["without"] > 0, block


def test_only_qwen3_moe_reads_norm_topk_prob():
    """Qwen3-MoE's router honours norm_topk_prob (its default, false, where config.json leaves it out); Mixtral's and
    MiniMax's renormalise whatever it says."""
    qwen3 = _config("qwen3_moe").to_dict()
    assert not model_shape(qwen3 | {"norm_topk_prob": False}).routing_norm
    assert model_shape(qwen3 | {"norm_topk_prob": True}).routing_norm
    assert not model_shape({k: v for k, v in qwen3.items() if k != "norm_topk_prob"}).routing_norm
    assert model_shape(_mixtral(1, norm_topk_prob=False)).routing_norm
    assert model_shape(_tiny_config("minimax_full").to_dict() | {"norm_topk_prob": False}).routing_norm
