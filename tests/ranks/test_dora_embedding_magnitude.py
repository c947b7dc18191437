"""DoRA's magnitude on an embedding table has one value per column of the table (PEFT's DoraEmbeddingVariant),
its width, not its vocabulary: ``RankPlan.total_params``, recommend's budget and ``spectra memory`` count it so,
by one rule (:func:`spectra.ranks.plan.adapter_dims`). Reference: PEFT's own ``get_peft_model`` on a tiny Llama
built from its config."""

from __future__ import annotations

import warnings

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, recommend_ranks
from tests.ranks.rows import PLANTED, analysis, make_row

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# hidden 32, 4 heads of 8, 2 kv heads: q (32, 32), v (16, 32); a 64-row table of width 32
CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
ROWS = (make_row("model.embed_tokens", PLANTED, shape=(64, 32), role="embed", layer=None),
        make_row("model.layers.0.self_attn.q_proj", PLANTED, shape=(32, 32), role="q"),
        make_row("model.layers.0.self_attn.v_proj", PLANTED, shape=(16, 32), role="v"))
ROLES = ("embed", "q", "v")


def _plan(**policy):
    return recommend_ranks(analysis(*ROWS), RankPolicy(energy=0.99, noise=False, roles=ROLES, **policy))


def _peft_trainable(plan) -> int:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    config = {k: v for k, v in plan.to_peft_config().items() if k != "peft_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _memory_trainable(plan, method: str) -> int:
    from spectra.memory import estimate_memory

    config = dict(transformers.LlamaConfig(**CONFIG).to_dict(), model_type="llama")
    return estimate_memory(config, method=method, rank_plan_or_rank=plan, batch=1, seq_len=8).trainable_params


def test_dora_plan_on_embedding_counts_the_tables_width():
    plan = _plan(use_dora=True)
    assert [(m.name, m.rank) for m in plan.modules] == [("model.embed_tokens", 4),
                                                         ("model.layers.0.self_attn.q_proj", 4),
                                                         ("model.layers.0.self_attn.v_proj", 4)]
    lora = 4 * (64 + 32) + 4 * (32 + 32) + 4 * (32 + 16)
    magnitudes = 32 + 32 + 16  # the table's width 32 (not its 64 rows), q's 32 outputs, v's 16
    assert plan.total_params == lora + magnitudes == _peft_trainable(plan) == _memory_trainable(plan, "dora")


def test_budget_at_the_dora_plans_count_admits_it():
    full = _plan(use_dora=True)
    at = _plan(use_dora=True, budget_params=full.total_params)
    assert [m.rank for m in at.modules] == [m.rank for m in full.modules]
    assert at.total_params == full.total_params == _peft_trainable(at)
    # one parameter less no longer buys it: the budget is tight at exactly the count
    below = _plan(use_dora=True, budget_params=full.total_params - 1)
    assert below.total_params < full.total_params and "budget" in {m.reason for m in below.modules}


def test_lora_plan_unchanged():
    plan = _plan()
    assert plan.total_params == 4 * (64 + 32) + 4 * (32 + 32) + 4 * (32 + 16)
    assert plan.total_params == _peft_trainable(plan) == _memory_trainable(plan, "lora")
    assert [m.rank for m in _plan(budget_params=plan.total_params).modules] == [4, 4, 4]


def test_budget_below_the_magnitudes_refused():
    with pytest.raises(ConfigError):
        _plan(use_dora=True, budget_params=32 + 32 + 16)
