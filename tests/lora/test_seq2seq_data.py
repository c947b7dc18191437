"""Task seq2seq_lm's data path: truncation that keeps the closing special tokens, length-grouped batches that count
both sides' padding, and the advice a decoder-only model gets for source/target records.

The references are the checkpoint tokenizer's own ``truncation=True`` (T5's and BART's, built offline from a word
list), and padded-token counts taken from the batches themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectra.lora.data import IGNORE_INDEX, LENGTH_GROUP, TokenizedData, batch_indices, collate, prepare_data
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
WORDS = ("a", "b", "c", "d", "e", "f", "g", "h")


def with_tokenizer(family: str, folder):
    """A tiny T5 or BART checkpoint saved with a tokenizer of its family (vocabulary < the model's 64 ids)."""
    import transformers as tf

    path = save(build_model(family), folder, "safetensors")
    if family == "t5":  # a unigram vocabulary; T5 appends </s> (id 1)
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
        tokenizer = tf.T5Tokenizer(vocab=pieces, extra_ids=0)
    else:  # byte-level BPE without merges; BART wraps a text in <s> … </s> (ids 0 and 2)
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "Ġ": 5} | {
            w: 6 + i for i, w in enumerate(WORDS)}
        tokenizer = tf.BartTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_truncated_sources_and_targets_keep_their_closing_special_tokens(family, tmp_path):
    """Cut at max_length, a target still ends with </s> (so the decoder learns to stop) and a source keeps its own
    special tokens: what the tokenizer's own truncation (text_target for targets) gives. Short texts are whole."""
    model, tokenizer = with_tokenizer(family, tmp_path / family)
    long_text, short_text = " ".join(WORDS * 2), "a b"
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"source": long_text, "target": long_text}) + "\n"
                    + json.dumps({"source": short_text, "target": short_text}) + "\n")
    _, tokens, _, _, _ = prepare_data(model, data, max_length=6)
    whole = tokenizer(text_target=long_text)["input_ids"]
    assert len(whole) > 6 and whole[:6][-1] != tokenizer.eos_token_id  # negative control: a slice loses </s>
    assert tokens.targets[0] == tokenizer(text_target=long_text, truncation=True, max_length=6)["input_ids"]
    assert len(tokens.targets[0]) == 6 and tokens.targets[0][-1] == tokenizer.eos_token_id
    assert tokens.ids[0] == tokenizer(long_text, truncation=True, max_length=6)["input_ids"]
    assert tokens.ids[0][-1] == tokenizer.eos_token_id
    if family == "bart":
        assert tokens.ids[0][0] == tokens.targets[0][0] == tokenizer.bos_token_id
    assert tokens.ids[1] == tokens.targets[1] == tokenizer(short_text)["input_ids"]  # nothing to cut


def pairs_of_lengths(sources, targets) -> TokenizedData:
    """Source/target examples of the given lengths (ids 1, 2, …; the values do not matter to padding)."""
    return TokenizedData([list(range(1, s + 1)) for s in sources], None, "seq2seq_lm", pad_token_id=0,
                         targets=[list(range(1, t + 1)) for t in targets])


def padded_tokens(data: TokenizedData, groups) -> int:
    """Pad positions of the batches `groups`, both sides, counted in what collate builds."""
    total = 0
    for index in groups:
        batch = collate(data, index)
        total += int((batch["attention_mask"] == 0).sum()) + int((batch["labels"] == IGNORE_INDEX).sum())
    return total


def source_sorted(data: TokenizedData, batch_size: int, generator=None):
    """Batches grouped by the source's length alone (the key before seq2seq examples were sorted by both sides)."""
    n = len(data)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    key = [len(s) for s in data.ids].__getitem__
    if generator is None:
        order.sort(key=key)
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    group, out = LENGTH_GROUP * batch_size, []
    for g in range(0, n, group):
        run = sorted(order[g:g + group], key=key)
        out += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
    return out


def test_length_grouped_batches_pad_both_sides_less_than_grouping_by_the_source():
    """Short prompts, long answers of varied length: sorting by the source leaves the targets' padding as random
    batches have it; sorting by max(S, T) removes most of it, in evaluation (all sorted) and training (groups of
    LENGTH_GROUP batches). Negative control: where every source is longer than its target, the batches are the
    source-sorted ones."""
    rng = np.random.default_rng(0)
    n, size = 512, 8
    data = pairs_of_lengths(rng.integers(20, 25, n), rng.integers(2, 120, n))
    for seed in (None, 3):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        new = padded_tokens(data, batch_indices(data, size, generator=generator, by_length=True))
        old = padded_tokens(data, source_sorted(data, size, None if seed is None else
                                                torch.Generator().manual_seed(seed)))
        assert new < 0.25 * old, (seed, new, old)
    long_sources = pairs_of_lengths(rng.integers(50, 200, n), rng.integers(2, 40, n))
    for seed in (None, 3):
        grouped = batch_indices(long_sources, size, by_length=True,
                                generator=None if seed is None else torch.Generator().manual_seed(seed))
        by_source = source_sorted(long_sources, size, None if seed is None else torch.Generator().manual_seed(seed))
        assert sorted(grouped) == sorted(by_source)  # the same batches (training shuffles their order)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_source_target_records_for_a_decoder_only_model_get_advice_that_works(llama_base, tmp_path, suffix):
    """Calibrating a decoder-only model reads the file as texts; source/target records are refused, naming the file,
    with what each kind of model reads. Following the advice (each pair joined into one text) calibrates, on the
    joined texts' tokens; an encoder-decoder reads the pairs as they are (tested in test_seq2seq)."""
    from spectra.calibration import CalibrationConfig, collect_calibration
    from spectra.errors import ConfigError

    pairs = [("copy 1", "1"), ("copy 22 please", "22 22")]
    data = tmp_path / f"p{suffix}"
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs) if suffix == ".jsonl"
                    else "source,target\n" + "".join(f"{s},{t}\n" for s, t in pairs))
    with pytest.raises(ConfigError) as err:
        collect_calibration(llama_base, data, config=CalibrationConfig())
    where = f"data file {data}" + (", line 1" if suffix == ".jsonl" else "")
    assert str(err.value).startswith(where) and "which an encoder-decoder (T5, BART) reads" in str(err.value)
    joined = ('{"text": source + " " + target}' if suffix == ".jsonl" else 'a column text of source + " " + target')
    assert f"a decoder-only model or an encoder reads one text: join each pair into one, {joined}." in str(err.value)
    texts = [f"{s} {t}" for s, t in pairs]
    data.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts) if suffix == ".jsonl"
                    else "text\n" + "".join(f"{x}\n" for x in texts))
    calibration = collect_calibration(llama_base, data, config=CalibrationConfig())
    assert calibration.source["task"] == "causal_lm"
    assert calibration.tokens("model.layers.0.self_attn.q_proj.weight") == sum(len(x.encode()) for x in texts)
