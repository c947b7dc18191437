"""``spectra memory --method qlora`` on a sequence classifier counts the head in 16 (here 32) bits, as train loads it.

bitsandbytes' default keep list stores RoBERTa's ``classifier.dense``/``out_proj`` and BERT's ``classifier`` in 4 bits,
and PEFT cannot train a copy (modules_to_save) of a 4-bit layer, so ``spectra train`` now keeps the head it saves out
of 4 bits (``llm_int8_skip_modules``), and the estimate, which had counted the head in NF4 and said in a note that
train could not run this, counts what train loads. The reference: the bytes of the model ``spectra train`` loads
(:func:`spectra.lora.train.load_model`, float32 outside its Linear4bit modules) and its quantisation constants.
"""

from __future__ import annotations

import pytest
import torch

from spectra.memory import estimate_memory
from tests.models import save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _classifier(family: str):
    """A classifier 64 wide (bitsandbytes' 4-bit layers need ≥ 64 input features) of 3 labels, its class named."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 num_labels=3)
    if family == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(max_position_embeddings=40, **small))
    elif family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(max_position_embeddings=40, **small))
    else:
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, pad_token_id=0,
                                                                 tie_word_embeddings=False, **small))
    model.config.architectures = [type(model).__name__]
    return model


def _constants(model) -> int:
    """Bytes of each Linear4bit's double-quantised constants: absmax, code, the absmax's absmax, code and offset."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax,
                                                                 state.state2.code, state.offset))
    return total


@pytest.mark.parametrize("family", ["roberta", "bert", "llama"])
def test_qlora_classifier_bytes_are_what_train_loads(family, tmp_path):
    """The estimate's weights (less the head's trainable copy) and constants equal the bytes of the model train
    loads; RoBERTa's had counted its two head linears in NF4 (and BERT's classifier), 4 bytes a weight short each
    and their constants over. No note says train cannot run it (it had)."""
    from spectra.lora.train import load_model

    model = _classifier(family)
    base = save(model, tmp_path / "base", "safetensors")
    loaded = load_model(base, task="seq_cls", quantize=True, num_labels=3)
    est = estimate_memory(model.config.to_dict(), method="qlora", rank_plan_or_rank=4, seq_len=16, precision="fp32")
    copy = est.trainable_params - est.adapter // 4  # the head's trainable copy, in the base's fp32
    assert est.weights - 4 * copy == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert est.quant_constants == _constants(loaded)
    assert not any("cannot run" in n for n in est.notes)


def test_peft_cannot_train_a_4bit_head(tmp_path):
    """Why the head is kept whole, against PEFT: get_peft_model with SEQ_CLS on the RoBERTa classifier loaded by
    bitsandbytes' default keep list (the head in 4 bits) fails on the head's trainable copy."""
    from peft import LoraConfig, get_peft_model

    from tests.models import load_4bit

    loaded, _ = load_4bit(_classifier("roberta"), tmp_path)
    with pytest.raises(RuntimeError, match="floating point dtype can require gradients"):
        get_peft_model(loaded, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
