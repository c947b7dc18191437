"""``spectra memory`` on a classifier's config counts the class config.json names, and an int rank counts the head
``spectra train`` trains in full.

A sequence classifier holds its own head in place of the base model's (RobertaForSequenceClassification: no pooler,
a ``classifier`` with ``dense`` and ``out_proj``; a Llama classifier: ``score``, no LM head), and PEFT trains a copy of
that head whole (modules_to_save) beside the LoRA of an int rank as well as of a plan. The references are
transformers' own classes built from tiny configs (``sum(p.numel())``) and PEFT's model as ``spectra train`` wraps it
(:func:`spectra.lora.train.wrap_model`) in bf16: its trainable tensors, their gradients and AdamW's state after a step.
"""

from __future__ import annotations

import pytest
import torch

from spectra.memory import estimate_memory
from tests.models import tiny_config


def _roberta_config():
    import transformers as tf

    return tf.RobertaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, num_labels=3)


def _classifier(family: str, arch: str):
    """(config.json dict, the model of class ``arch`` built from it) for a tiny ``family`` config."""
    import transformers as tf

    config = _roberta_config() if family == "roberta" else tiny_config(family)
    config.architectures = [arch]
    if family == "llama":
        config.pad_token_id = 0  # a decoder classifier pools at the last token before the padding
    torch.manual_seed(0)
    return config.to_dict(), getattr(tf, arch)(config)


CLASSES = [("roberta", "RobertaForSequenceClassification"), ("bert", "BertForSequenceClassification"),
           ("llama", "LlamaForSequenceClassification")]


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("family, arch", CLASSES + [("bert", "BertForTokenClassification")])
def test_parameters_are_those_of_the_class_config_names(family, arch, method):
    """RoBERTa's count had held BertModel's pooler (h² + h) and not the head's out_proj (h·labels + labels: 195 at
    h = 64, 3 labels); a Llama classifier's, the LM head it does not have."""
    config, model = _classifier(family, arch)
    est = estimate_memory(config, method=method, rank_plan_or_rank=4 if method == "lora" else None, seq_len=16)
    assert est.params == sum(p.numel() for p in model.parameters())
    if method == "full":
        assert est.trainable_params == est.params


@pytest.mark.parametrize("family, arch", CLASSES)
def test_int_rank_counts_the_head_train_saves(family, arch):
    from spectra.lora.train import TrainConfig, wrap_model

    config, model = _classifier(family, arch)
    peft_model = wrap_model(model.to(torch.bfloat16), TrainConfig(rank=4), task="seq_cls")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    head = [p for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    assert head  # train saves the head whole
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.ndim > 0)  # the moments, not the step count

    est = estimate_memory(config, rank_plan_or_rank=4, seq_len=16, precision="bf16")
    assert est.trainable_params == sum(p.numel() for p in trainable)
    # the frozen base (its head among it) and the head's copy in bf16, the LoRA in fp32 (PEFT's autocast)
    assert est.weights + est.adapter == sum(p.numel() * p.element_size() for p in peft_model.parameters())
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert est.optimizer_states == states
    assert any("trained in full by PEFT for SEQ_CLS" in n and "spectra train" in n for n in est.notes)


def test_token_classifier_counts_the_head_peft_saves():
    """PEFT's TOKEN_CLS model adds ``classifier`` to modules_to_save as SEQ_CLS does."""
    from peft import LoraConfig, get_peft_model

    config, model = _classifier("bert", "BertForTokenClassification")
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="TOKEN_CLS"))
    est = estimate_memory(config, rank_plan_or_rank=4, seq_len=16)
    assert est.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_no_head_without_a_classifier_class():
    """Negative controls: a base model and a causal LM name no head PEFT trains in full; their counts are the
    base model's as before, with no note."""
    for family, arch in (("roberta", "RobertaModel"), ("llama", "LlamaForCausalLM")):
        config, model = _classifier(family, arch)
        est = estimate_memory(config, rank_plan_or_rank=4, seq_len=16)
        assert est.params == sum(p.numel() for p in model.parameters())
        assert not any("trained in full" in n for n in est.notes)
