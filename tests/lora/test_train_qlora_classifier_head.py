"""QLoRA on a sequence classifier keeps the head PEFT trains in full out of 4 bits, and trains it.

``spectra train --method qlora`` on a RoBERTa or BERT classifier failed in ``get_peft_model`` (only Tensors of floating
point dtype can require gradients): bitsandbytes' default keep list (transformers' ``get_keys_to_not_convert``: the
output embedding, tied weights, the last parameter's module) leaves RoBERTa's ``classifier.dense``/``out_proj`` and
BERT's ``classifier`` to be stored in 4 bits, and PEFT cannot train a copy (modules_to_save) of a 4-bit layer. train's
load now names the head in ``llm_int8_skip_modules`` with transformers' own list (which that option replaces). The
referees: bitsandbytes' own layer types on the model train loads (``isinstance`` over ``named_modules``), the stored
checkpoint's weights, and transformers' default conversion on the causal LM path, which is unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from spectra.checkpoints.targets import bnb_4bit_linears, meta_model
from spectra.lora.train import TrainConfig, load_model, qlora_kept_modules, train_adapter
from spectra.lora.verify import bnb_4bit_modules, nf4_round_trip
from tests.lora.conftest import classification_jsonl
from tests.models import save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# 64 wide: bitsandbytes' 4-bit layers need ≥ 64 input features
_SMALL = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=40, num_labels=3)
# the head each class holds beside its base model (written out), and one linear of its first block
_HEADS = {"roberta": {"classifier.dense", "classifier.out_proj"}, "bert": {"classifier"}, "llama": {"score"}}
_BLOCK = {"roberta": "roberta.encoder.layer.0.attention.self.query",
          "bert": "bert.encoder.layer.0.attention.self.query", "llama": "model.layers.0.self_attn.q_proj"}


def _classifier(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**_SMALL))
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**_SMALL))
    return tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0, tie_word_embeddings=False))


def _base(family: str, tmp_path):
    model = _classifier(family)
    model.config.architectures = [type(model).__name__]
    return model, save(model, tmp_path / "base", "safetensors")


def _4bit(model) -> set[str]:
    import bitsandbytes as bnb

    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("family", list(_HEADS))
def test_the_head_loads_whole_the_blocks_in_4_bits_and_every_rule_agrees(family, tmp_path):
    """On the model train loads, the head's linears are plain ``nn.Linear`` and the blocks' ``Linear4bit``;
    ``bnb_4bit_linears`` (what memory and verify count by) names exactly its Linear4bit modules, and verify's W₀ rule
    leaves the head's weight as stored, bit for bit what the loaded head holds. Negative control: transformers' own
    keep list (no keep) converts RoBERTa's and BERT's head (Llama's score is its last module, kept anyway)."""
    model, base = _base(family, tmp_path)
    loaded = load_model(base, task="seq_cls", quantize=True, num_labels=3)
    modules = dict(loaded.named_modules())
    converted = _4bit(loaded)
    assert all(type(modules[name]) is torch.nn.Linear for name in _HEADS[family])
    assert _BLOCK[family] in converted and not converted & _HEADS[family]

    config = json.loads((base / "config.json").read_text())
    assert bnb_4bit_linears(meta_model(config), keep=qlora_kept_modules(meta_model(config), "seq_cls")) == converted
    default = bnb_4bit_linears(meta_model(config))  # transformers' rule alone: what the load had done
    assert (default & _HEADS[family]) == (set() if family == "llama" else _HEADS[family])

    stored = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rounded = bnb_4bit_modules(stored, config, "seq_cls")
    assert {n for n, r in rounded.items() if r} == converted
    for name in _HEADS[family]:  # verify's W₀: the stored weight, which the loaded head holds exactly
        assert torch.equal(modules[name].weight.detach(), stored[name])
        assert not torch.equal(nf4_round_trip(stored[name]), stored[name])  # the round trip would have moved it


@pytest.mark.parametrize("family", list(_HEADS))
def test_qlora_trains_a_classifier_and_its_head(family, tmp_path, monkeypatch):
    """train_adapter with method qlora takes its steps (it had failed in get_peft_model on RoBERTa and BERT), and the
    head's trainable copy moved off the checkpoint's head, while the blocks stay 4-bit under their LoRA."""
    import spectra.lora.train as train_module

    model, base = _base(family, tmp_path)
    wrapped = []
    real = train_module.wrap_model
    monkeypatch.setattr(train_module, "wrap_model", lambda *a, **k: wrapped.append(real(*a, **k)) or wrapped[-1])
    data = classification_jsonl(tmp_path / "train.jsonl", n=12)
    result = train_adapter(base, data, TrainConfig(method="qlora", rank=2, max_steps=2, batch_size=4, lr=1e-2,
                                                   max_length=16, eval_fraction=0),
                           tmp_path / "ad", progress=False)
    assert result.steps == 2
    (peft_model,) = wrapped
    stored = dict(model.named_parameters())
    head = {n: p for n, p in peft_model.named_parameters() if ".modules_to_save.default." in n}
    assert head and all(p.requires_grad and p.dtype == torch.float32 for p in head.values())
    for name, p in head.items():
        prefix, _, rest = name.removeprefix("base_model.model.").partition(".modules_to_save.default.")
        assert not torch.equal(p.detach(), stored[f"{prefix}.{rest}"]), name  # trained
    block = "base_model.model." + _BLOCK[family]
    assert any(n in (block, block + ".base_layer") for n in _4bit(peft_model))  # the blocks' linears stay 4-bit


def test_a_causal_lm_keeps_transformers_keep_list(tmp_path):
    """Negative control: the causal-LM QLoRA path is as before: no skip list of spectra's (transformers' own rule),
    the untied lm_head (the output embedding) left a plain Linear as transformers leaves it, the blocks 4-bit, and
    ``bnb_4bit_linears`` with no keep names exactly that model's Linear4bit modules."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=False))
    base = save(model, tmp_path / "base", "safetensors")
    loaded = load_model(base, task="causal_lm", quantize=True)
    assert loaded.hf_quantizer.quantization_config.llm_int8_skip_modules is None
    assert type(loaded.lm_head) is torch.nn.Linear and "model.layers.0.self_attn.q_proj" in _4bit(loaded)
    config = json.loads((base / "config.json").read_text())
    assert qlora_kept_modules(meta_model(config), "causal_lm") == []
    assert bnb_4bit_linears(meta_model(config)) == _4bit(loaded)
