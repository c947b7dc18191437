"""T5-family config.json files carry a stray ``n_positions`` (t5-small's and flan-t5's 512) though their models have
no table of positions, only a relative bias over ``relative_attention_num_buckets`` distances: a longer
``--max-length`` is kept with a note, not refused as past a learned table (rev1 F2). The reference is the tiny model
built from the same keys: it runs 40 tokens at n_positions 16, where GPT-2 at n_positions 16 fails (negative control).
MPNet, which has the bucket key beside a learned table, stays learned."""

from __future__ import annotations

import pytest
import torch

from spectra.checkpoints.positions import position_limit, resolve_max_length
from spectra.errors import ConfigError

# t5-small's config.json (https://huggingface.co/google-t5/t5-small), written out by hand less task_specific_params
T5_SMALL = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
            "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_heads": 8, "num_layers": 6, "output_past": True, "pad_token_id": 0,
            "relative_attention_num_buckets": 32, "vocab_size": 32128}
_TINY = {"d_model": 32, "d_ff": 48, "d_kv": 8, "num_heads": 4, "num_layers": 1, "num_decoder_layers": 1,
         "vocab_size": 64, "n_positions": 16, "decoder_start_token_id": 0, "pad_token_id": 0}


def test_t5_smalls_config_runs_past_its_n_positions_with_a_note():
    limit = position_limit(T5_SMALL)
    assert (limit.length, limit.source, limit.positions) == (512, "n_positions = 512", "relative")
    assert "relative_attention_num_buckets = 32" in limit.why
    notes = []
    assert resolve_max_length(600, T5_SMALL, notes=notes) == 600
    assert len(notes) == 1 and "600" in notes[0] and "relative_attention_num_buckets = 32" in notes[0], notes
    assert resolve_max_length(None, T5_SMALL) == 128  # the default is kept


@pytest.mark.parametrize("family", ["t5", "mt5", "longt5", "umt5", "switch_transformers", "pop2piano"])
def test_each_t5_family_with_a_stray_n_positions_is_relative(family):
    """Every config class of the family declares the bucket key and no table key: a stray n_positions (LongT5's
    hub configs carry one too) does not bind. The bucket key comes from the family's defaults where the file lacks
    it."""
    import transformers as tf

    config = {"model_type": family, "n_positions": 16}
    assert position_limit(config).positions == "relative"
    assert "relative_attention_num_buckets" in position_limit(config).why
    assert resolve_max_length(40, config) == 40
    if family in ("t5", "mt5", "umt5"):  # the reference: the model built from the keys runs 40 tokens
        cls = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
               "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration),
               "umt5": (tf.UMT5Config, tf.UMT5ForConditionalGeneration)}[family]
        model = cls[1](cls[0](**_TINY)).eval()
        assert not [n for n, _ in model.named_parameters() if "position" in n and "relative" not in n]
        ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_gpt2s_n_positions_stays_a_learned_table():
    """Negative control: GPT-2's n_positions is its table's rows; 40 tokens at 16 are refused, and the model built
    from the same keys fails at 40."""
    import transformers as tf

    config = {"model_type": "gpt2", "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 64}
    assert position_limit(config).positions == "learned"
    with pytest.raises(ConfigError, match="n_positions = 16"):
        resolve_max_length(40, config)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(**{k: v for k, v in config.items() if k != "model_type"})).eval()
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.zeros(1, 40, dtype=torch.long))


def test_mpnets_bucket_key_beside_its_table_stays_learned():
    """Control: MPNet has relative_attention_num_buckets and a table of max_position_embeddings learned positions
    (its config class declares it): the table binds."""
    config = {"model_type": "mpnet", "max_position_embeddings": 32, "relative_attention_num_buckets": 32,
              "pad_token_id": 1}
    limit = position_limit(config)
    assert limit.positions == "learned" and limit.length == 30
    with pytest.raises(ConfigError):
        resolve_max_length(40, config)


def test_an_unknown_family_with_the_bucket_key_stays_learned():
    """Where transformers has no config class to say the family declares no table, the refusal errs on the side of a
    crash."""
    assert position_limit({"model_type": "not-a-family", "n_positions": 16,
                           "relative_attention_num_buckets": 32}).positions == "learned"
