"""The memory estimate of a classifier's plan counts the head PEFT trains in full, as PEFT holds it.

For SEQ_CLS, get_peft_model wraps the head in a ModulesToSaveWrapper: a trainable copy in the base's dtype (PEFT
upcasts only its LoRA layers), with its gradients and AdamW's two moments. The reference is PEFT on a bf16 tiny
RoBERTa-for-sequence-classification and torch's AdamW after one step.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from spectra.memory import estimate_memory
from spectra.ranks import RankPolicy, recommend_ranks, save_plan
from tests.ranks.test_plan_task_heads import _model, planted_pair, relabelled_pair


@pytest.fixture(scope="module")
def roberta_plan(tmp_path_factory):
    """(config.json dict, plan, the plan's peft_config) of a tiny RoBERTa classifier pair with planted ranks."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("memory_head")
    base_dir, tuned_dir = planted_pair("roberta", root, head=False)
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    plan = recommend_ranks(result, RankPolicy(energy=0.99))
    peft_config = json.loads(save_plan(plan, root / "plan.json").read_text())["peft_config"]
    return json.loads((base_dir / "config.json").read_text()), plan, peft_config


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_memory_counts_the_head_peft_trains_in_full(roberta_plan, precision):
    from peft import LoraConfig, get_peft_model

    config, plan, peft_config = roberta_plan
    assert plan.modules_to_save and plan.saved_params > 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peft_model = get_peft_model(_model("roberta").to(dtype),
                                LoraConfig(**{k: v for k, v in peft_config.items() if k != "peft_type"}))
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    copies = [p for n, p in trainable if ".modules_to_save." in n]  # the head's trainable copy
    head_bytes = sum(p.numel() * p.element_size() for p in copies)
    for p in copies:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(copies)
    optimizer.step()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.ndim > 0)  # the moments, not the step count

    est = estimate_memory(config, rank_plan_or_rank=plan, seq_len=16, precision=precision)
    bare = estimate_memory(config, rank_plan_or_rank=dataclasses.replace(plan, modules_to_save=()), seq_len=16,
                           precision=precision)
    assert est.trainable_params == plan.total_params == sum(p.numel() for _, p in trainable)
    assert est.trainable_params - bare.trainable_params == sum(p.numel() for p in copies) == plan.saved_params
    assert est.weights - bare.weights == head_bytes  # the copy, beside the frozen original
    assert est.gradients - bare.gradients == sum(p.grad.numel() * p.grad.element_size() for p in copies)
    assert est.optimizer_states - bare.optimizer_states == state_bytes == 2 * head_bytes
    assert est.adapter == bare.adapter and est.activations == bare.activations
    assert any("trained in full by PEFT for SEQ_CLS" in note for note in est.notes)
    assert not any("trained in full" in note for note in bare.notes)  # negative control: a plan without a head


def test_full_fine_tuning_ignores_the_plan_head(roberta_plan):
    config, plan, _ = roberta_plan
    est = estimate_memory(config, method="full", rank_plan_or_rank=None, seq_len=16)
    assert not any("trained in full by PEFT" in note for note in est.notes)


@pytest.mark.parametrize("tuned_labels", [3, 2])  # 2: the negative control, the base config's own count
def test_memory_counts_a_head_fine_tuned_into_other_classes_with_tuneds(tmp_path, tuned_labels):
    """A BERT classifier of 2 classes fine-tuned into 3: the estimate of its plan (from BASE's config.json, 2
    classes) builds the model with TUNED's 3, as it is trained: its frozen head and the trainable copy PEFT saves
    are (3, hidden) + 3. The reference is PEFT's bf16 model loaded with ``num_labels=3``: its trainable count, and
    its weights' bytes outside the LoRA factors."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze

    base_dir, tuned_dir = relabelled_pair("bert", tmp_path, tuned_labels=tuned_labels)
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    plan = recommend_ranks(result, RankPolicy(energy=0.99))
    assert plan.saved_params == 32 * tuned_labels + tuned_labels  # hidden × labels + labels
    peft_config = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())["peft_config"]
    model = tf.BertForSequenceClassification.from_pretrained(base_dir, num_labels=tuned_labels,
                                                             ignore_mismatched_sizes=True).to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in peft_config.items() if k != "peft_type"}))

    est = estimate_memory(json.loads((base_dir / "config.json").read_text()), rank_plan_or_rank=plan, seq_len=16,
                          precision="bf16")
    assert est.trainable_params == plan.total_params == sum(p.numel() for p in peft_model.parameters()
                                                             if p.requires_grad)
    assert est.weights == sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters()
                              if "lora_" not in n)  # the base's frozen head of 3 classes too, and its copy
