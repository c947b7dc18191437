"""QLoRA's bytes outside the blocks: bitsandbytes converts every nn.Linear and Conv1D outside transformers' keep list
(``get_keys_to_not_convert``: the output embedding, tied weights, the last parameter's module), so BERT's pooler.dense
is stored in 4 bits although the memory model counted it in 16 (with the embeddings, norms and biases): the weights
were 6,144 bytes over and the constants 1,160 short on a BERT of hidden size 64. GPT-2's tied head stays in 16 bits.
Reference: the model saved and loaded back by bitsandbytes (tests.models.load_4bit)."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory


def _model(family: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=64,
                                                bos_token_id=0, eos_token_id=0))
    config = tf.AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=40, vocab_size=64, pad_token_id=1)
    return tf.AutoModel.from_config(config)  # BertModel, RobertaModel: the base model the memory model counts


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta"])
def test_qlora_bytes_are_what_bitsandbytes_loads(family, double_quant, tmp_path):
    """The estimate's weights and quantisation constants equal the bytes of the model bitsandbytes loads; the
    linears it leaves in 16 bits are those the memory model does (GPT-2's tied lm_head, none of BERT's)."""
    import bitsandbytes as bnb
    import torch

    from tests.models import load_4bit

    model = _model(family)
    loaded, constants = load_4bit(model, tmp_path, double_quant=double_quant)
    est = estimate_memory(model.config.to_dict(), method="qlora", rank_plan_or_rank=4, double_quant=double_quant)
    assert est.weights == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert est.quant_constants == constants
    kept = [n for n, m in loaded.named_modules() if type(m) is torch.nn.Linear]
    assert kept == (["lm_head"] if family == "gpt2" else [])
    if family != "gpt2":  # the negative control: the pooler is what bitsandbytes converted
        assert isinstance(loaded.pooler.dense, bnb.nn.Linear4bit)
