"""The kind of positions a config.json gives its model where no key names it: its family's (model_type's), for
``spectra train --max-length`` and ``spectra memory --seq-len`` alike. The model built from the config is the
reference: a learned table fails one token past it, rotary positions run past."""

from __future__ import annotations

import json

import pytest
import torch

from spectra.checkpoints.positions import _ROTARY_KEYS, position_limit, resolve_max_length
from spectra.errors import ConfigError
from tests.models import tiny_config


def _saved(tmp_path, family: str, *, drop=()) -> tuple:
    """(folder, config.json dict) of a tiny `family` model with 32 positions, `drop` keys removed from the file."""
    config = tiny_config(family)
    key = "n_positions" if family == "gpt2" else "max_position_embeddings"
    setattr(config, key, 32)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved = {k: v for k, v in saved.items() if k not in drop}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return tmp_path, saved


def _runs(folder, length: int) -> bool:
    """Whether transformers' model of the config.json in `folder` runs `length` tokens."""
    import transformers as tf

    model = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(folder)).eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.full((1, length), 5))
    except (RuntimeError, IndexError):  # no position to embed
        return False
    return True


def test_a_llama_config_without_rope_keys_is_rotary_as_its_family(tmp_path):
    """A Llama config.json of its required keys alone (no rope_parameters/rope_theta) was read as a table of learned
    positions, so `spectra train --max-length 64` was refused at max_position_embeddings 32, while its model runs
    64 tokens (and spectra memory, reading the family, took it)."""
    from spectra.lora.data import prepare_data

    folder, saved = _saved(tmp_path / "llama", "llama", drop=_ROTARY_KEYS)
    assert not set(_ROTARY_KEYS) & set(saved) and saved["model_type"] == "llama"
    limit = position_limit(saved)
    assert (limit.length, limit.positions, limit.learned) == (32, "rotary", False)
    assert _runs(folder, 64)  # the reference: rotary positions run past the configured 32
    data = tmp_path / "train.txt"
    data.write_text("plain text to cut into blocks " * 20)
    notes = []
    _, tokens, *_ = prepare_data(folder, data, max_length=64, notes=notes)  # train's path
    assert max(len(ids) for ids in tokens.ids) == 64
    assert notes == ["max_length (--max-length) 64 is beyond the 32 positions the model is configured for "
                     "(max_position_embeddings = 32 in its config.json); its rotary positions run past them, but it "
                     "was not trained on sequences this long."]


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gpt2_and_bert_stay_learned_when_their_family_is_asked(family, tmp_path):
    """Negative control: their families' defaults name no rotary key, so a longer length is still refused, and
    their models fail at it."""
    folder, saved = _saved(tmp_path, family)
    assert position_limit(saved).positions == "learned"
    assert not _runs(folder, 33)
    with pytest.raises(ConfigError, match="33 is more than the model can take: its table of learned positions"):
        resolve_max_length(33, saved)


def test_the_configs_own_keys_decide_before_the_family():
    """Keys the config holds decide: ESM's "absolute" beside a rope_theta, a Llama's explicit rope keys; an unknown
    model_type (or none) without keys is read as learned, the safe side (a refusal, not a crash)."""
    assert position_limit({"model_type": "esm", "max_position_embeddings": 34, "pad_token_id": 1, "rope_theta": 1e4,
                           "position_embedding_type": "absolute"}).positions == "learned"
    assert position_limit({"model_type": "llama", "max_position_embeddings": 32,
                           "position_embedding_type": "absolute"}).positions == "learned"
    assert position_limit({"model_type": "no_such_family", "max_position_embeddings": 32}).positions == "learned"
    assert position_limit({"max_position_embeddings": 32}).positions == "learned"
    assert position_limit({"max_position_embeddings": 32, "rope_theta": 1e4}).positions == "rotary"


def test_train_and_memory_read_a_llama_config_without_rope_keys_alike(tmp_path):
    """One rule: the note spectra memory gives for --seq-len 64 is train's for --max-length 64, in its own option."""
    from spectra.memory import estimate_memory

    _, saved = _saved(tmp_path, "llama", drop=_ROTARY_KEYS)
    train_notes, memory_notes = [], []
    assert resolve_max_length(64, saved, notes=train_notes) == 64
    estimate = estimate_memory(saved, seq_len=64)
    memory_notes = [n for n in estimate.notes if n.startswith("seq_len")]
    assert estimate.seq_len == 64
    assert memory_notes == [n.replace("max_length (--max-length)", "seq_len (--seq-len)") for n in train_notes]
