"""Families whose config.json holds a max_position_embeddings but whose model has no table of learned positions
(state-space hybrids, an MLA without a rotary part, GraniteMoeHybrid's position_embedding_type null, computed
sinusoids): `spectra train --max-length` and `spectra memory --seq-len` past it are kept, with a note that names the
key that decided. The tiny model built from the config is the reference: it runs 40 tokens at 32 positions, where
the negative controls (GPT-2, BERT, Marian's fixed sinusoidal table) fail."""

from __future__ import annotations

import json
import re

import pytest
import torch

from spectra.checkpoints.positions import position_limit, resolve_max_length
from spectra.errors import ConfigError

_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32)
_SEQ2SEQ = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)


def _config(family: str):
    """A transformers config of `family` with 32 positions and a few thousand parameters."""
    import transformers as tf

    if family == "jamba":  # a Mamba layer, then an attention layer with no position encoding
        return tf.JambaConfig(**_SMALL, num_hidden_layers=2, num_key_value_heads=2, attn_layer_period=2,
                              attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                              mamba_d_state=4, mamba_dt_rank=4)
    if family == "zamba":
        return tf.ZambaConfig(**_SMALL, num_hidden_layers=3, num_key_value_heads=4, attention_head_dim=16,
                              layers_block_type=["hybrid", "linear_attention", "hybrid"], mamba_d_state=4,
                              mamba_dt_rank=4, n_mamba_heads=1)
    if family == "zamba2":  # use_mem_rope false (the default) beside the rope_parameters transformers writes
        return tf.Zamba2Config(**_SMALL, num_hidden_layers=2, layers_block_type=["linear_attention", "hybrid"],
                               num_key_value_heads=4, attention_head_dim=16, mamba_d_state=4, mamba_headdim=8,
                               n_mamba_heads=8)
    if family == "nemotron_h":
        return tf.NemotronHConfig(**_SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                  layers_block_type=["linear_attention", "full_attention"], mamba_num_heads=4,
                                  mamba_head_dim=16, ssm_state_size=4, n_groups=1)
    if family == "granitemoehybrid":  # transformers' default position_embedding_type: null, beside a rope_parameters
        return tf.GraniteMoeHybridConfig(**_SMALL, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=2,
                                         num_experts_per_tok=1, shared_intermediate_size=48, mamba_n_heads=4,
                                         mamba_d_head=16, layer_types=["mamba", "attention"],
                                         position_embedding_type=None)
    if family == "glm5_next_text":  # MLA with qk_rope_head_dim 0 (the default): no rotary part
        return tf.AutoConfig.for_model(
            "glm5_next_text", **_SMALL, num_hidden_layers=2, num_key_value_heads=4, pad_token_id=0, kv_lora_rank=8,
            q_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, index_topk=8, index_head_dim=8, index_n_heads=2, index_kpool=4, linear_head_dim=8,
            linear_num_heads=4, layer_types=["linear_attention", "indexed_attention"],
            mlp_layer_types=["dense", "sparse"])
    if family == "m2m_100":  # its sinusoid grows past max_position_embeddings
        return tf.M2M100Config(**_SEQ2SEQ)
    if family == "xglm":
        return tf.XGLMConfig(vocab_size=64, d_model=32, num_layers=1, attention_heads=4, ffn_dim=48,
                             max_position_embeddings=32)
    if family == "esm_null":  # ESM adds a table only at "absolute", rotates only at "rotary"; null: neither
        return tf.EsmConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, pad_token_id=1, mask_token_id=2, position_embedding_type=None)
    if family in ("trocr", "trocr_learned"):  # a computed sinusoid, or a learned table, as the key says
        return tf.TrOCRConfig(vocab_size=64, d_model=32, decoder_layers=1, decoder_attention_heads=4,
                              decoder_ffn_dim=48, use_learned_position_embeddings=family == "trocr_learned")
    if family in ("falcon_alibi", "falcon"):  # Falcon-RW's ALiBi, or the rotary positions of Falcon's default
        return tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               alibi=family == "falcon_alibi")
    if family == "bert2bert":  # EncoderDecoderModel: a BERT encoder of 32 positions, a BERT decoder of 48
        from tests.models import tiny_config

        decoder = tiny_config("bert")
        decoder.update({"max_position_embeddings": 48, "is_decoder": True, "add_cross_attention": True})
        return tf.EncoderDecoderConfig.from_encoder_decoder_configs(tiny_config("bert"), decoder,
                                                                    decoder_start_token_id=0, pad_token_id=0)
    if family == "whisper":  # its decoder's learned table: max_target_positions (WhisperForCausalLM)
        return tf.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                decoder_ffn_dim=48, max_target_positions=32, pad_token_id=0,
                                decoder_start_token_id=0)
    if family == "marian":  # negative control: a fixed sinusoidal table of max_position_embeddings rows
        return tf.MarianConfig(**_SEQ2SEQ, pad_token_id=0, decoder_start_token_id=0)
    if family == "t5":
        return tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                           decoder_start_token_id=0)
    from tests.models import tiny_config

    return tiny_config(family)  # gpt2, bert, llama (32 positions set below)


def _with_32_positions(family: str):
    """`family`'s config with 32 positions (T5 has no such key: its relative positions have no limit)."""
    config = _config(family)
    if family == "esm_null":  # RoBERTa's layout: position ids start after the padding id 1, 34 rows hold 32
        config.max_position_embeddings = 34
    elif family not in ("t5", "bert2bert", "whisper"):
        setattr(config, "n_positions" if family == "gpt2" else "max_position_embeddings", 32)
    return config


def _saved(tmp_path, family: str, *, keep=None) -> dict:
    """The config.json dict of `family` as save_pretrained writes it (only the keys in `keep` when given)."""
    config = _with_32_positions(family)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    return saved if keep is None else {k: v for k, v in saved.items() if k in keep}


def _runs(family: str, length: int) -> bool:
    """Whether transformers' model of `family` (32 positions) runs `length` tokens: the reference."""
    import transformers as tf

    config = _with_32_positions(family)
    torch.manual_seed(0)
    classes = {"trocr": tf.TrOCRForCausalLM, "encoder-decoder": tf.EncoderDecoderModel,  # no AutoModel class
               "whisper": tf.WhisperForCausalLM}  # what spectra train loads (AutoModelForCausalLM), on tokens
    model = (classes[config.model_type](config) if config.model_type in classes
             else tf.AutoModel.from_config(config)).eval()
    ids = torch.full((1, length), 5)
    extra = {"decoder_input_ids": ids} if config.is_encoder_decoder and config.model_type != "whisper" else {}
    try:
        with torch.no_grad():
            model(input_ids=ids, **extra)
    except (RuntimeError, IndexError):  # no position to embed
        return False
    return True


# family → (kind of positions, the key that decided, as the note names it)
RUN_PAST = {
    "jamba": ("none", "a state-space hybrid, mamba_d_state = 4, with no rotary key"),
    "zamba": ("none", "a state-space hybrid, mamba_d_state = 4, with no rotary key"),
    "nemotron_h": ("none", "a state-space hybrid, ssm_state_size = 4, with no rotary key"),
    "zamba2": ("none", "use_mem_rope = false"),
    "granitemoehybrid": ("none", "position_embedding_type = null"),
    "glm5_next_text": ("none", "qk_rope_head_dim = 0"),
    "esm_null": ("none", "position_embedding_type = null"),
    "trocr": ("sinusoidal", "use_learned_position_embeddings = false"),
    "falcon_alibi": ("relative", "ALiBi, alibi = true"),
    "m2m_100": ("sinusoidal", "model_type = m2m_100"),
    "xglm": ("sinusoidal", "model_type = xglm"),
}
_NOTES = {"relative": "it has no table of absolute positions ({why}): its relative positions run past them",
          "none": "it encodes no positions ({why}): nothing in it stops at them",
          "sinusoidal": "its sinusoidal positions are computed for any length ({why}): they run past them"}


@pytest.mark.parametrize("family", list(RUN_PAST))
def test_a_model_without_a_table_of_positions_takes_a_longer_length(family, tmp_path):
    """Jamba, Zamba and Nemotron-H (no rotary key: read as a table of learned positions) and GLM-5-Next
    (qk_rope_head_dim 0) refused --max-length 40 at max_position_embeddings 32; Zamba2 (use_mem_rope false) and
    GraniteMoeHybrid (position_embedding_type null) were kept as rotary, which they are not. Their models run 40
    tokens."""
    kind, why = RUN_PAST[family]
    saved = _saved(tmp_path, family)
    limit = position_limit(saved)
    assert (limit.length, limit.positions, limit.why, limit.learned) == (32, kind, why, False)
    assert _runs(family, 40)  # the reference: nothing in the model stops at 32
    notes = []
    assert resolve_max_length(40, saved, notes=notes) == 40
    source = ("max_position_embeddings = 34, less the 2 ids its position ids start after (pad_token_id + 1)"
              if family == "esm_null" else "max_position_embeddings = 32")
    assert notes == ["max_length (--max-length) 40 is beyond the 32 positions the model is configured for "
                     f"({source} in its config.json); {_NOTES[kind].format(why=why)}, but it was not trained on "
                     "sequences this long."]


def test_granitemoehybrid_with_position_embedding_type_null_is_noted_as_encoding_no_positions(tmp_path):
    """Its model rotates only at position_embedding_type "rope": null (transformers' default) builds no rotary
    embedding, so the note said "its rotary positions run past them" of a model that has none."""
    import transformers as tf

    saved = _saved(tmp_path, "granitemoehybrid")
    assert saved["position_embedding_type"] is None and "rope_parameters" in saved
    assert tf.AutoModel.from_config(_config("granitemoehybrid")).rotary_emb is None
    notes = []
    resolve_max_length(64, saved, notes=notes)
    assert notes == ["max_length (--max-length) 64 is beyond the 32 positions the model is configured for "
                     "(max_position_embeddings = 32 in its config.json); it encodes no positions "
                     "(position_embedding_type = null): nothing in it stops at them, but it was not trained on "
                     "sequences this long."]
    rope = dict(saved, position_embedding_type="rope")  # Granite 4.0 with rotary attention: rotary, as its model
    assert position_limit(rope).positions == "rotary"
    config = _config("granitemoehybrid")
    config.position_embedding_type = "rope"
    assert tf.AutoModel.from_config(config).rotary_emb is not None


def test_a_jamba_config_of_its_required_keys_alone_reads_its_familys_mamba_keys(tmp_path):
    """The family's defaults fill in what the config.json lacks, and the note says the key is the family's."""
    saved = _saved(tmp_path, "jamba", keep={"model_type", "max_position_embeddings", "hidden_size", "vocab_size"})
    limit = position_limit(saved)
    assert (limit.positions, limit.why) == ("none", "a state-space hybrid, mamba_d_state = 16, jamba's default, with "
                                                    "no rotary key")
    assert resolve_max_length(40, saved) == 40


@pytest.mark.parametrize("family", ["gpt2", "bert", "marian", "trocr_learned", "bert2bert", "whisper"])
def test_a_table_of_positions_is_still_refused(family, tmp_path):
    """Negative controls: GPT-2's, BERT's and TrOCR's (use_learned_position_embeddings true) learned tables, and
    Marian's fixed sinusoidal one, fail past 32. A BERT2BERT EncoderDecoderModel (its tables in its encoder and
    decoder configs) and Whisper's decoder (max_target_positions) were read as having no limit, a crash at 40: their
    32 bind. The refusal names Marian's table as fixed sinusoidal positions (it said "learned positions"), the others
    as learned (test_positions_fixed.py holds the tables' weights to it)."""
    saved = _saved(tmp_path, family)
    limit = position_limit(saved)
    fixed = "model_type = marian" if family == "marian" else ""  # Marian's table is no weights it learns
    assert (limit.length, limit.positions, limit.fixed) == (32, "learned", fixed)
    key = {"gpt2": "n_positions", "whisper": "max_target_positions"}.get(family, "max_position_embeddings")
    assert limit.source == ("its encoder's max_position_embeddings = 32" if family == "bert2bert" else f"{key} = 32")
    assert _runs(family, 32) and not _runs(family, 40)
    table = "fixed sinusoidal positions (model_type = marian)" if fixed else "learned positions"
    with pytest.raises(ConfigError, match=re.escape(f"40 is more than the model can take: its table of {table} "
                                                    f"covers 32 tokens ({limit.source} in its config.json)")):
        resolve_max_length(40, saved)


def test_rotary_and_relative_controls(tmp_path):
    """Negative controls: a Llama is rotary (a rotary key, not a state-space one, decides: Bamba, Falcon-H1 too);
    T5's relative positions have no limit at all. Both models run past 32."""
    assert position_limit(_saved(tmp_path / "llama", "llama")).positions == "rotary"
    assert _runs("llama", 40)
    assert position_limit(_saved(tmp_path / "falcon", "falcon")).positions == "rotary"  # alibi false
    assert _runs("falcon", 40)
    for family in ("bamba", "falcon_h1"):  # Mamba hybrids whose attention rotates
        limit = position_limit({"model_type": family, "max_position_embeddings": 32})
        assert (limit.positions, limit.why) == ("rotary", ""), family
    assert position_limit(_saved(tmp_path / "t5", "t5")) is None
    assert _runs("t5", 40)
