"""A table of positions whose rows are a fixed sinusoid (Marian, Pegasus, CTRL, RoFormer, TIPSv2's and VideoPrism's
text towers) is refused past its rows as a learned table is, and the refusal says which it is: it said "its table of
learned positions" of Marian's frozen sinusoid. The tiny model built from the config is the reference: its tensors
of positions are no trainable parameter (a frozen embedding or a buffer), where BERT's, GPT-2's and BART's are, and
it fails past its 32 rows."""

from __future__ import annotations

import math
import re

import pytest
import torch

from spectra.checkpoints.positions import position_limit, resolve_max_length
from spectra.errors import ConfigError

_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=32)
_SEQ2SEQ = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
                pad_token_id=0, decoder_start_token_id=0)


def _config(family: str):
    """A transformers config of `family` with 32 positions and a few thousand parameters."""
    import transformers as tf

    if family in ("marian", "pegasus", "bart"):
        return tf.AutoConfig.for_model(family, **_SEQ2SEQ)
    if family == "ctrl":
        return tf.CTRLConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, dff=48, n_positions=32)
    if family == "roformer":
        return tf.RoFormerConfig(**_SMALL, embedding_size=32)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    return tf.AutoConfig.for_model(family, **_SMALL)  # bert, tipsv2_text_model, videoprism_text_model


def _model(family: str):
    import transformers as tf

    config = _config(family)
    torch.manual_seed(0)
    if family == "videoprism_text_model":  # no AutoModel class
        return tf.VideoPrismTextModel(config).eval()
    return tf.AutoModel.from_config(config).eval()


def _position_tensors(model) -> dict[str, bool]:
    """Name → whether it is a trainable parameter, of the model's tensors of positions (not its position ids)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: isinstance(t, torch.nn.Parameter) and t.requires_grad for name, t in tensors
            if re.search(r"pos|(^|\.)wpe\.", name) and not name.endswith("_ids")}  # GPT-2: wpe


def _runs(model, length: int) -> bool:
    ids = torch.full((1, length), 5)
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    try:
        with torch.no_grad():
            model(input_ids=ids, **extra)
    except (RuntimeError, IndexError, ValueError):  # no position to embed
        return False
    return True


@pytest.mark.parametrize("family", ["marian", "pegasus", "ctrl", "roformer", "tipsv2_text_model",
                                    "videoprism_text_model"])
def test_a_fixed_sinusoidal_table_is_refused_and_named_as_fixed(family):
    model = _model(family)
    tensors = _position_tensors(model)
    assert tensors and not any(tensors.values()), tensors  # the reference: no weight of positions it learns
    assert _runs(model, 32) and not _runs(model, 40)
    saved = _config(family).to_dict()
    limit = position_limit(saved)
    assert (limit.length, limit.positions, limit.table, limit.learned, limit.fixed) == (
        32, "learned", True, False, f"model_type = {family}")  # a table, of no trained weights
    with pytest.raises(ConfigError) as refused:
        resolve_max_length(40, saved)
    assert (f"max_length (--max-length) 40 is more than the model can take: its table of fixed sinusoidal positions "
            f"(model_type = {family}) covers 32 tokens ({limit.source} in its config.json), and a longer sequence "
            "has no position to embed.") in str(refused.value)
    assert "learned" not in str(refused.value)


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_a_learned_table_is_still_named_as_learned(family):
    """Negative control: a table of trained weights is not called fixed."""
    model = _model(family)
    tensors = _position_tensors(model)
    assert tensors and all(tensors.values()), tensors  # the reference: its positions are weights it learns
    assert _runs(model, 32) and not _runs(model, 40)
    saved = _config(family).to_dict()
    limit = position_limit(saved)
    assert (limit.length, limit.positions, limit.fixed) == (32, "learned", "")
    with pytest.raises(ConfigError, match=re.escape(f"40 is more than the model can take: its table of learned "
                                                    f"positions covers 32 tokens ({limit.source} in")):
        resolve_max_length(40, saved, option="seq_len (--seq-len)" if family == "gpt2" else "max_length")


def test_a_sinusoid_initialised_table_that_is_trained_is_learned():
    """DistilBERT's sinusoidal_pos_embds starts its table at a sinusoid, which transformers 5 then trains: learned,
    not fixed (a key read as fixed would call a trained table fixed)."""
    import transformers as tf

    config = tf.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=48, n_layers=1, n_heads=4,
                                 max_position_embeddings=32, sinusoidal_pos_embds=True)
    model = tf.DistilBertModel(config)
    weight = model.embeddings.position_embeddings.weight
    assert weight.requires_grad  # the reference: a weight it learns, whose first rows are the sinusoid
    assert torch.allclose(weight[1, :2].detach(), torch.tensor([math.sin(1.0), math.cos(1.0)]))
    assert position_limit(config.to_dict()).fixed == ""

