"""The built-in byte tokenizer closes an encoder–decoder's texts with the model's end-of-sequence id, as T5's tokenizer
closes source and target with ``</s>``: a T5 trained on its targets is taught to stop. A causal LM's texts get none,
as transformers' causal tokenizers add none at the end."""

from __future__ import annotations

import json

import pytest

from spectra.errors import ConfigError
from spectra.lora.data import ByteTokenizer, load_tokenizer, prepare_data
from spectra.lora.train import TrainConfig, train_adapter
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _pairs(path, n: int = 8):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"source": f"copy {i}" + " please" * (i % 3), "target": f"{i} " * (1 + i % 4)}) + "\n")
    return path


def test_a_t5_trained_on_byte_tokens_sees_every_target_end_in_its_eos(tmp_path, monkeypatch):
    """Every label row a tiny T5 (no tokenizer saved: the byte fallback) is trained on ends in config.eos_token_id
    (T5's 1), after the target's bytes; each source ends in it too. Before, the targets' last label was their last
    byte: the decoder never learnt to stop."""
    from transformers import T5ForConditionalGeneration

    base = save(build_model("t5"), tmp_path / "t5", "safetensors")
    eos = json.loads((base / "config.json").read_text())["eos_token_id"]
    assert eos == 1
    data = _pairs(tmp_path / "pairs.jsonl")
    _, tokens, _, _, tokenizer = prepare_data(base, data, max_length=8)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id == eos
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for source, target, record in zip(tokens.ids, tokens.targets, records):
        assert target[-1] == source[-1] == eos
        # the bytes are kept up to max_length - 1, then the end (as transformers truncates with special tokens)
        assert target[:-1] == [1 + b % 63 for b in record["target"].encode()][:7]
    seen = []
    forward = T5ForConditionalGeneration.forward

    def recording(self, *args, **kwargs):
        if kwargs.get("labels") is not None:
            seen.append(kwargs["labels"].clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T5ForConditionalGeneration, "forward", recording)
    train_adapter(base, data, TrainConfig(rank=2, batch_size=4, epochs=1, max_length=8, eval_fraction=0.0),
                  tmp_path / "adapter", progress=False)
    rows = [row for labels in seen for row in labels]
    assert len(rows) >= len(records)  # every example trained on (and any evaluation)
    for row in rows:
        kept = row[row != -100]  # padding is ignored
        assert int(kept[-1]) == eos and int((kept == eos).sum()) == 1


def test_only_an_encoder_decoders_byte_texts_get_an_end():
    """load_tokenizer's byte fallback: seq2seq_lm ends each text in the given id (or, without a valid one, the last
    id); causal_lm and seq_cls add nothing (negative control), as before. Truncation keeps the end."""
    assert load_tokenizer("/nonexistent", vocab_size=64, task="seq2seq_lm", eos_token_id=1).encode("ab") == [35, 36, 1]
    assert load_tokenizer("/nonexistent", vocab_size=64, task="seq2seq_lm").encode("ab") == [35, 36, 63]
    assert load_tokenizer("/nonexistent", vocab_size=64, task="seq2seq_lm", eos_token_id=0).eos_token_id == 63
    for task in ("causal_lm", "seq_cls"):
        assert load_tokenizer("/nonexistent", vocab_size=64, task=task, eos_token_id=1).encode("ab") == [35, 36]
    assert ByteTokenizer(300, eos_token_id=2).encode("abcd", max_length=3) == [98, 99, 2]
    assert ByteTokenizer(300).encode("abcd", max_length=3) == [98, 99, 100]
    with pytest.raises(ConfigError, match=r"eos_token_id 64: .* \[1, 64\)"):
        ByteTokenizer(64, eos_token_id=64)


def test_a_causal_lms_byte_texts_have_no_end(tmp_path):
    """A Llama without a tokenizer reads its texts' bytes only (prepare_data, task causal_lm)."""
    base = save(build_model("llama"), tmp_path / "llama", "safetensors")
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ("hello there", "general kenobi")) + "\n")
    _, tokens, _, _, tokenizer = prepare_data(base, data, max_length=32)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id is None
    assert sorted(tokens.ids) == sorted([1 + b % 63 for b in t.encode()] for t in ("hello there", "general kenobi"))
