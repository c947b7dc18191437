"""A plan that adapts a position or token-type table (role pos_embed): its LoRA's tensors and the blocks it makes
keep theirs, against what autograd saves (tests/memory/test_memory.py's saved_bytes) on tiny GPT-2 and BERT models
built from config, each run through the plan's own PEFT config."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory
from spectra.ranks import RankPolicy, recommend_ranks
from tests.memory.test_memory import saved_bytes
from tests.ranks.rows import analysis, make_row

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SEQ = 16
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 32,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "architectures": ["GPT2LMHeadModel"]}
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 32, "type_vocab_size": 2,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "architectures": ["BertModel"]}


def _plan(rows, roles):
    return recommend_ranks(analysis(*rows), RankPolicy(energy=1.0, roles=roles))


def _row(name, shape, role, layer, **kwargs):
    return make_row(name, [1.0] * 4 + [0.0] * (min(shape) - 4), shape=shape, role=role, layer=layer, **kwargs)


GPT2_QKV = _row("transformer.h.1.attn.c_attn", (96, 32), "qkv", 1, conv1d=True)
GPT2_WPE = _row("transformer.wpe", (32, 32), "pos_embed", None)
BERT_Q = _row("encoder.layer.1.attention.self.query", (32, 32), "q", 1)
BERT_TABLES = [_row("embeddings.position_embeddings", (32, 32), "pos_embed", None),
               _row("embeddings.token_type_embeddings", (2, 32), "pos_embed", None)]


def _saved(config: dict, plan, batch: int) -> int:
    """Bytes autograd saves for one fp32 LoRA step of the plan's own PEFT config on the model built from config."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = getattr(tf, config["architectures"][0])(tf.AutoConfig.for_model(**config))
    model.config._attn_implementation = "sdpa"
    fields = plan.to_peft_config(model=model, task_type=None)
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in fields.items() if k != "peft_type"})).train()
    ids = torch.randint(0, 64, (batch, SEQ), generator=torch.Generator().manual_seed(1))
    if config["model_type"] == "bert":  # BertModel: no head, a loss on its output
        return saved_bytes(peft_model, lambda m: m(input_ids=ids).last_hidden_state.square().mean())
    return saved_bytes(peft_model, lambda m: m(input_ids=ids, labels=ids).loss)


def _modelled(config: dict, plan, batch: int) -> int:
    return estimate_memory(config, method="lora", rank_plan_or_rank=plan, batch=batch, seq_len=SEQ, precision="fp32",
                           gradient_checkpointing=False).activations


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_gpt2_plan_with_wpe_counts_what_autograd_saves():
    """wpe's LoRA makes every block's input require grad (block 0 keeps its tensors, block 1 its all) and keeps
    its lookup by the (1, s) positions, 4·r·s, and GPT-2's position ids, 8·s, whatever the batch. Modelled and
    measured differences (with wpe − without) are equal at batch 2 and 3, so both the per-token and the per-step
    parts are exact. Before: wpe was counted as a Linear of the hidden size (4·(r + h) per token), the blocks
    before layer 1 keeping nothing: 2,304 bytes a sequence against 51,840 measured."""
    without, with_wpe = _plan([GPT2_QKV], ("qkv",)), _plan([GPT2_QKV, GPT2_WPE], ("qkv", "pos_embed"))
    assert [m.role for m in with_wpe.modules] == ["qkv", "pos_embed"]
    for batch in (2, 3):
        measured = _saved(GPT2, with_wpe, batch) - _saved(GPT2, without, batch)
        assert _modelled(GPT2, with_wpe, batch) - _modelled(GPT2, without, batch) == measured > 0
    # negative control: the plan without wpe is counted as before (values of the model before the change)
    assert [_modelled(GPT2, without, batch) for batch in (2, 3)] == [120320, 180480]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_bert_plan_with_its_position_and_token_type_tables_counts_what_autograd_saves():
    """BERT's position table is looked up by (1, s) positions, its token-type table by (b, s) ids: per sequence
    (batch 3 less batch 2: its buffers' ids cancel), the token-type table's lookup, 4·r per token, and every
    block's tensors, against autograd."""
    without, with_tables = _plan([BERT_Q], ("q",)), _plan([BERT_Q, *BERT_TABLES], ("q", "pos_embed"))
    ranks = {m.name: m.rank for m in with_tables.modules}
    assert ranks["embeddings.token_type_embeddings"] == 2 and ranks["embeddings.position_embeddings"] == 4

    def per_sequence(count, plan):
        return count(BERT, plan, 3) - count(BERT, plan, 2)

    measured = per_sequence(_saved, with_tables) - per_sequence(_saved, without)
    assert per_sequence(_modelled, with_tables) - per_sequence(_modelled, without) == measured > 0
