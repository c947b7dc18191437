"""model_inputs of an encoder–decoder's batch: the decoder's inputs built by the model's own rule, no loss.

The reference is transformers' own forward given the labels (the model shifts them into its decoder inputs): the
logits must be bit-identical, for the bare model and behind a PEFT adapter, and no loss is computed.
"""

from __future__ import annotations

import pytest
import torch

from spectra.lora.data import ByteTokenizer, collate, model_inputs, tokenize
from tests.models import build_model, on_grid

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PAIRS = [("copy 1", "1"), ("copy 22 please", "22 22 22"), ("copy 3 please please", "3 3")]


def tiny(family: str):
    """T5 and BART from tests.models; mBART (its decoder starts with the target's last token, the language id) and
    M2M100 (no prepare_decoder_input_ids_from_labels) at the same size."""
    import transformers as tf

    if family in ("t5", "bart"):
        return build_model(family)
    size = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32, vocab_size=64)
    if family == "mbart":
        return on_grid(tf.MBartForConditionalGeneration, tf.MBartConfig(**size))
    return on_grid(tf.M2M100ForConditionalGeneration, tf.M2M100Config(**size, encoder_layerdrop=0.0,
                                                                      decoder_layerdrop=0.0))


def pairs_batch():
    data = tokenize([{"source": s, "target": t} for s, t in PAIRS], ByteTokenizer(64), task="seq2seq_lm",
                    max_length=32)
    batch = collate(data, list(range(len(data))))
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()  # both sides padded
    return batch


@pytest.mark.parametrize("family", ["t5", "bart", "mbart", "m2m100"])
def test_decoder_inputs_give_the_logits_of_a_forward_given_the_labels_without_its_loss(family):
    from peft import LoraConfig, get_peft_model

    batch = pairs_batch()
    model = tiny(family).eval()
    peft_model = get_peft_model(tiny(family).eval(), LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q", "v"] if family == "t5" else ["q_proj", "v_proj"],
        init_lora_weights=False)).eval()  # random A and B: the adapter changes the logits
    keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
    logits = []
    with torch.no_grad():
        for m in (model, peft_model):
            given_labels = m(**{k: batch[k] for k in keys})  # the model shifts the labels itself
            inputs = model_inputs(batch, m)
            out = m(**inputs)
            assert torch.equal(out.logits, given_labels.logits), family
            assert given_labels.loss is not None
            if family == "m2m100":  # no prepare_decoder_input_ids_from_labels: the labels go in, a loss comes out
                assert "labels" in inputs and out.loss is not None
            else:
                assert "labels" not in inputs and out.loss is None, family
            logits.append(out.logits)
    assert not torch.equal(*logits)  # negative control: the adapter is in the forward pass


def test_mbart_decoder_inputs_are_its_own_shift_not_the_start_token_one():
    """Negative control for one rule of shifting: mBART's decoder starts with the target's last token; the T5/BART
    rule ([decoder_start_token_id] + target[:-1]) gives it other inputs, and other logits."""
    batch = pairs_batch()
    model = tiny("mbart").eval()
    inputs = model_inputs(batch, model)
    labels = batch["labels"]
    assert model.config.decoder_start_token_id is None  # mBART's config has none: BART's (its </s>, 2) stands in
    t5_rule = torch.cat([torch.full_like(labels[:, :1], model.config.eos_token_id), labels[:, :-1]], 1)
    t5_rule = t5_rule.masked_fill(t5_rule == -100, model.config.pad_token_id)
    last = (labels != -100).sum(1) - 1  # (B,) the position of each target's last token
    assert torch.equal(inputs["decoder_input_ids"][:, 0], labels.gather(1, last[:, None])[:, 0])
    assert not torch.equal(inputs["decoder_input_ids"], t5_rule)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**(inputs | {"decoder_input_ids": t5_rule})).logits)
