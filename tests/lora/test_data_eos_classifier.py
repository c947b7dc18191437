"""A classifier that reads its input's end-of-sequence token (BART's, T5's: ``eos_mask``) gets texts that end in it
from the built-in byte tokenizer; every other classifier's texts stay their bytes alone.

Before, ``spectra train`` on a BartForSequenceClassification without a saved tokenizer failed on its first forward
pass: "Each example must contain at least one <eos> token". The references are transformers' own classes: their
forward (which refuses an input without the eos) and their source (which classes read an eos_mask).
"""

from __future__ import annotations

import inspect
import json

import pytest

from spectra.lora.data import EOS_POOLED_CLASSIFIERS, ByteTokenizer, prepare_data
from spectra.lora.train import TrainConfig, train_adapter
from tests.models import build_model, on_grid, save, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _labelled(path, n: int = 8):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"text {i}" + " more" * (i % 3), "label": i % 2}) + "\n")
    return path


@pytest.mark.parametrize("family, cls", [("bart", "BartForSequenceClassification"),
                                         ("t5", "T5ForSequenceClassification")])
def test_a_classifier_that_pools_at_eos_trains_on_byte_tokens(tmp_path, monkeypatch, family, cls):
    """A tiny BART (T5) sequence classifier, no tokenizer saved: spectra's train path runs (it raised ValueError
    before), and every row of input_ids its forward sees holds config.eos_token_id exactly once, as its last
    non-padding token, after the text's bytes."""
    import transformers as tf

    klass = getattr(tf, cls)
    base = save(on_grid(klass, tiny_config(family)), tmp_path / family, "safetensors")
    eos = json.loads((base / "config.json").read_text())["eos_token_id"]
    data = _labelled(tmp_path / "labelled.jsonl")
    task, tokens, _, _, tokenizer = prepare_data(base, data, task="seq_cls", max_length=12)
    assert task == "seq_cls" and isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id == eos
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for ids, record in zip(tokens.ids, records):
        assert ids == [1 + b % 63 for b in record["text"].encode()][:11] + [eos]
    seen = []
    forward = klass.forward

    def recording(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(klass, "forward", recording)
    train_adapter(base, data, TrainConfig(rank=2, batch_size=4, epochs=1, max_length=12, eval_fraction=0.0,
                                          task="seq_cls"), tmp_path / "adapter", progress=False)
    rows = [row for batch in seen for row in batch]
    assert len(rows) >= len(records)
    for row in rows:
        kept = row[row != tokenizer.pad_token_id]
        assert int(kept[-1]) == eos and int((row == eos).sum()) == 1


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_other_classifiers_token_ids_are_unchanged(tmp_path, family):
    """Negative control: a BERT (GPT-2) classifier without a tokenizer reads each text as its bytes alone (1 + byte),
    no end-of-sequence id appended, as before."""
    base = save(build_model(family), tmp_path / family, "safetensors")
    data = _labelled(tmp_path / "labelled.jsonl")
    _, tokens, _, _, tokenizer = prepare_data(base, data, task="seq_cls", max_length=12)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id is None
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert tokens.ids == [[1 + b % (vocab - 1) for b in r["text"].encode()][:12] for r in records]


def test_the_eos_pooled_set_is_transformers_classifiers_that_read_an_eos_mask():
    """EOS_POOLED_CLASSIFIERS is exactly the model types whose AutoModelForSequenceClassification class's forward
    builds an eos_mask from config.eos_token_id (read from transformers' source)."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    pooled = set()
    for model_type, name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.items():
        cls = getattr(tf, name, None)
        if cls is None:
            continue
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if "eos_mask" in source:
            pooled.add(model_type)
    assert pooled == EOS_POOLED_CLASSIFIERS
