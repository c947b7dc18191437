"""The built-in byte tokenizer never gives a text's byte the end-of-sequence id: a text ends in exactly one.

Before, byte ``b`` became ``1 + b mod (V − 1)`` whatever the EOS id, so BART's 0x01 (id 2) and T5's NUL (id 1), and in
the tiny 64-id vocabulary also BART's ``@`` and T5's ``?``, became a second EOS: BART's and T5's sequence classifiers
then refuse the batch ("All examples must have the same number of <eos> tokens"). The references are transformers'
own classifiers built from config: their forward counts the EOS ids of every row.
"""

from __future__ import annotations

import json

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.data import ByteTokenizer, collate, prepare_data
from tests.models import on_grid, save, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# family -> (classifier class, texts holding bytes whose old id was the model's EOS id)
CASES = {"bart": ("BartForSequenceClassification", ["ab\x01cd", "who @ here"]),
         "t5": ("T5ForSequenceClassification", ["ab\x00cd", "why?"])}
CONTROLS = ["plain text", "more words"]  # bytes none of which had the EOS id


def _old_ids(text: str, vocab: int, eos: int) -> list[int]:
    """The ids before the fix: 1 + b mod (V − 1), then the EOS id."""
    return [1 + b % (vocab - 1) for b in text.encode()] + [eos]


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_text_holding_the_eos_byte_is_accepted_by_bart_and_t5_classifiers(tmp_path, family):
    """A batch with the colliding bytes and controls: every row holds the EOS id exactly once, as its last non-padding
    token; transformers' classifier takes the batch. The control texts' ids are unchanged, and the colliding texts'
    differ from the old ids only where a colliding byte stood. Negative control: the old ids of the same texts make the
    same classifier refuse the batch."""
    import transformers as tf

    name, texts = CASES[family]
    base = save(on_grid(getattr(tf, name), tiny_config(family)), tmp_path / family, "safetensors")
    config = json.loads((base / "config.json").read_text())
    eos, vocab = config["eos_token_id"], config["vocab_size"]
    records = [{"text": t, "label": i % 2} for i, t in enumerate(texts + CONTROLS)]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, tokens, _, _, tokenizer = prepare_data(base, data, task="seq_cls", max_length=16)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id == eos
    for ids, record in zip(tokens.ids, records):
        old = _old_ids(record["text"], vocab, eos)
        assert ids[-1] == eos and ids.count(eos) == 1, record
        if record["text"] in CONTROLS:
            assert ids == old  # unchanged
        else:
            assert old.count(eos) == 2  # the case: a second EOS before
            changed = [i for i, (a, b) in enumerate(zip(ids, old)) if a != b]
            assert changed and all(old[i] == eos and ids[i] == tokenizer.eos_substitute for i in changed)
    model = on_grid(getattr(tf, name), tiny_config(family))
    batch = collate(tokens, range(len(records)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[0] == len(records) and bool(torch.isfinite(logits).all())
    rows = [row[row != tokenizer.pad_token_id] for row in batch["input_ids"]]
    assert all(int(r[-1]) == eos and int((r == eos).sum()) == 1 for r in rows)
    # negative control: the old ids (padded with 0 as collate pads), refused by transformers' own check
    old_rows = [_old_ids(r["text"], vocab, eos) for r in records]
    width = max(map(len, old_rows))
    old_batch = torch.tensor([r + [0] * (width - len(r)) for r in old_rows])
    with pytest.raises(ValueError, match="same number of <eos> tokens"):
        model(input_ids=old_batch, attention_mask=(old_batch != 0).long())


@pytest.mark.parametrize("vocab, eos", [(64, 1), (64, 2), (64, 63), (257, 1), (300, 1), (300, 256), (300, 299)])
def test_no_byte_takes_the_eos_id(vocab, eos):
    """Every byte's id lies in [1, V) and is not the EOS id; with more than 257 ids every byte keeps a distinct id
    (lossless) and only the colliding one moves (to 257); an EOS id past the bytes' moves nothing."""
    tok = ByteTokenizer(vocab, eos_token_id=eos)
    table = [tok.encode(chr(b))[0] for b in range(128)] + [tok.encode(bytes([0xC3, b]).decode())[1]
                                                           for b in range(128, 192)]
    table += [tok._byte_ids[b] for b in range(192, 256)]  # lead bytes: not alone in a text, the table's
    assert all(tok.encode(chr(b))[-1] == eos for b in range(128))
    assert all(0 < i < vocab and i != eos for i in table)
    old = [1 + b % (vocab - 1) for b in range(256)]
    moved = [b for b in range(256) if table[b] != old[b]]
    assert all(old[b] == eos for b in moved) and len(moved) == old.count(eos)
    if vocab > 257:
        assert len(set(table)) == 256
        assert tok.eos_substitute == (257 if eos <= 256 else None)


def test_without_an_eos_id_the_ids_are_unchanged():
    """Negative control: no end-of-sequence id, no substitute: 1 + b mod (V − 1) for every byte, as before."""
    for vocab in (2, 64, 257, 300):
        tok = ByteTokenizer(vocab)
        assert tok.eos_substitute is None
        assert tok.encode("a\x00\x01@?~ é") == [1 + b % (vocab - 1) for b in "a\x00\x01@?~ é".encode()]


def test_a_two_id_vocabulary_has_no_room_for_an_eos():
    """Padding and the EOS id would leave no id for the bytes: refused, named."""
    with pytest.raises(ConfigError, match="vocab_size 2"):
        ByteTokenizer(2, eos_token_id=1)
