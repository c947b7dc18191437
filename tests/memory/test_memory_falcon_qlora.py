"""QLoRA on Falcon is refused: transformers' bitsandbytes load converts exactly nn.Linear modules and Falcon's block
linears are FalconLinear (a subclass), so it quantises none of them (tests/memory/test_memory_gelu_families.py checks
the load); the estimate had counted them in NF4 with their constants."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory


def test_qlora_on_falcon_is_refused_naming_the_class():
    import transformers as tf

    config = tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                             new_decoder_architecture=True, num_kv_heads=2).to_dict()
    with pytest.raises(ConfigError, match="FalconLinear"):
        estimate_memory(config, method="qlora", rank_plan_or_rank=4)
    assert estimate_memory(config, method="lora", rank_plan_or_rank=4).weights > 0  # the control: LoRA is estimated
    gpt_neox = tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=64).to_dict()
    assert estimate_memory(gpt_neox, method="qlora", rank_plan_or_rank=4).quant_constants > 0


def test_memory_and_train_refuse_by_one_rule():
    """memory's refusal is the shared rule's reason (spectra.checkpoints.targets.qlora_unquantised), which spectra
    train refuses the same run by (tests/lora/test_train_qlora_falcon.py); a Llama passes it (negative control)."""
    import transformers as tf

    from spectra.checkpoints.targets import meta_model, qlora_unquantised

    config = tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                             new_decoder_architecture=True, num_kv_heads=2).to_dict()
    reason = qlora_unquantised(meta_model(config, "FalconForCausalLM"))
    assert reason is not None and "FalconLinear (e.g. transformer.h.0.self_attention.query_key_value)" in reason
    with pytest.raises(ConfigError) as err:
        estimate_memory(config, method="qlora", rank_plan_or_rank=4)
    assert str(err.value).startswith(reason) and "--method lora" in str(err.value)
    llama = tf.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           vocab_size=64).to_dict()
    assert qlora_unquantised(meta_model(llama, "LlamaForCausalLM")) is None
    assert estimate_memory(llama, method="qlora", rank_plan_or_rank=4).quant_constants > 0
