"""A byte budget charges a classifier's head what ``spectra memory`` counts for it.

PEFT trains the head in full (modules_to_save) in the base's dtype: a bf16 copy, its gradient and AdamW's two
moments, 8 bytes a parameter, where the LoRA's fp32 parameters take 16 (``RankPolicy.bytes_per_param``). The budget
had charged the head 16 bytes a parameter too, so a byte budget of exactly what memory says a plan's trainable state
takes trimmed that plan. The reference is ``estimate_memory`` of the plan (the head's copy, the adapter, gradients and
optimizer states, bf16 and AdamW), itself checked against PEFT and torch's AdamW in tests/memory.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory
from spectra.ranks import RankPolicy, recommend_ranks
from tests.ranks.test_plan_task_heads import planted_pair


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """(config.json dict, analysis) of a tiny RoBERTa classifier pair with planted ranks."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("budget_head")
    base_dir, tuned_dir = planted_pair("roberta", root, head=False)
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    return json.loads((base_dir / "config.json").read_text()), result


def _state_bytes(config: dict, plan) -> int:
    """The plan's trainable state as memory counts it (bf16, AdamW): the head's copy, the adapter, DoRA magnitudes,
    gradients and optimizer states."""
    est = estimate_memory(config, rank_plan_or_rank=plan, seq_len=16, precision="bf16", optimizer="adamw")
    bare = estimate_memory(config, rank_plan_or_rank=dataclasses.replace(plan, modules_to_save=()), seq_len=16,
                           precision="bf16", optimizer="adamw")
    return (est.weights - bare.weights) + est.adapter + est.dora_magnitude + est.gradients + est.optimizer_states


def test_a_byte_budget_of_what_memory_counts_admits_the_plan(roberta):
    config, result = roberta
    free = recommend_ranks(result, RankPolicy(energy=0.99))
    assert free.saved_params > 0
    state = _state_bytes(config, free)
    lora = free.total_params - free.saved_params
    assert state == 16 * lora + 8 * free.saved_params  # memory's own rule for a bf16 head

    fits = recommend_ranks(result, RankPolicy(energy=0.99, budget_bytes=state))
    assert [m.rank for m in fits.modules] == [m.rank for m in free.modules]
    assert _state_bytes(config, fits) == state

    # negative control: a byte less and the budget binds, and what it keeps fits in it as memory counts it
    short = recommend_ranks(result, RankPolicy(energy=0.99, budget_bytes=state - 1))
    assert sum(m.rank for m in short.modules) < sum(m.rank for m in free.modules)
    assert any(m.reason == "budget" for m in short.modules)
    assert _state_bytes(config, short) <= state - 1


def test_a_byte_budget_below_the_head_is_refused_in_bytes(roberta):
    _, result = roberta
    head = recommend_ranks(result, RankPolicy(energy=0.99)).saved_params
    with pytest.raises(ConfigError, match=rf"budget_bytes, {8 * head:,} bytes.*above {8 * head:,} bytes"):
        recommend_ranks(result, RankPolicy(energy=0.99, budget_bytes=8 * head))
    recommend_ranks(result, RankPolicy(energy=None, budget_bytes=8 * head + 16 * 1000))  # room for LoRA: a plan
