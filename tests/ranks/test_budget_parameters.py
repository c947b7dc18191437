"""A byte budget in parameters: a LoRA parameter takes ``bytes_per_param``, a parameter of the head PEFT trains in
full what ``spectra memory`` counts for a bf16 head (:data:`SAVED_BYTES_PER_PARAM`), not 16.

The reference for the head's bytes is ``estimate_memory`` on a tiny RoBERTa classifier (its head's copy, gradient
and AdamW moments: checked against PEFT and torch's AdamW in tests/memory/test_memory_task_class_heads.py).
"""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory
from spectra.ranks.budget import SAVED_BYTES_PER_PARAM, budget_parameters


def test_saved_bytes_are_memorys_for_a_bf16_head():
    import transformers as tf

    config = tf.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=40, num_labels=3,
                              architectures=["RobertaForSequenceClassification"]).to_dict()
    est = estimate_memory(config, rank_plan_or_rank=4, seq_len=16, precision="bf16", optimizer="adamw")
    lora = est.adapter // 4
    head = est.trainable_params - lora
    assert head == 32 * 32 + 32 + 32 * 3 + 3  # classifier.dense and out_proj
    copy = est.weights - 2 * est.params  # the trainable copy beside the frozen bf16 model
    head_bytes = copy + (est.gradients - 4 * lora) + (est.optimizer_states - 8 * lora)
    assert head_bytes == SAVED_BYTES_PER_PARAM * head
    assert 16 * lora + SAVED_BYTES_PER_PARAM * head == est.adapter + copy + est.gradients + est.optimizer_states


@pytest.mark.parametrize("budget_bytes, head", [(16_000, 0), (16_000, 1155), (16_007, 999), (9_240, 1155)])
def test_a_byte_budget_fits_exactly(budget_bytes, head):
    budget = budget_parameters(None, budget_bytes, 16.0, head)
    lora = budget - head  # what allocate_budget may spend beyond its fixed cost, the head
    assert 16 * lora + SAVED_BYTES_PER_PARAM * head <= budget_bytes < 16 * (lora + 1) + SAVED_BYTES_PER_PARAM * head
    if not head:  # without a head: budget_bytes // bytes_per_param, RankPolicy.budget
        assert budget == budget_bytes // 16


def test_parameter_budgets_and_none_are_as_given():
    assert budget_parameters(5_000, None, 16.0, 1155) == 5_000  # a parameter counts one, the head's too
    assert budget_parameters(None, None, 16.0, 1155) is None
    assert budget_parameters(None, 8 * 1155, 16.0, 1155) == 1155  # nothing left for LoRA: the caller refuses
    assert budget_parameters(None, 100, 16.0, 1155) == 1155
