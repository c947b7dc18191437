"""Data for the trainer (spectra.lora.data): batching order, length grouping, padding, the held-out split,
labels against the model's head."""

import json

import numpy as np
import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.data import (LENGTH_GROUP, TokenizedData, batch_indices, batches, collate, held_out_count,
                               label_ids, prepare_data)


def _data(n=200, seed=0, task="seq_cls"):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 48, size=n)
    ids = [list(range(1, int(k) + 1)) for k in lengths]
    labels = [int(i % 8) for i in range(n)] if task == "seq_cls" else None
    return TokenizedData(ids, labels, task, pad_token_id=0)


def _padded_tokens(data, groups):
    return sum(len(g) * max(len(data.ids[i]) for i in g) for g in groups)


def test_plain_order_is_the_seeded_permutation():
    data = _data()
    groups = batch_indices(data, 16, generator=torch.Generator().manual_seed(3))
    expected = torch.randperm(len(data), generator=torch.Generator().manual_seed(3)).tolist()
    assert [i for g in groups for i in g] == expected  # unchanged from before length grouping existed
    assert [i for g in batch_indices(data, 16) for i in g] == list(range(len(data)))


def test_length_grouped_training_batches():
    data = _data()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    grouped = batch_indices(data, 16, generator=gen(), by_length=True)
    assert sorted(i for g in grouped for i in g) == list(range(len(data)))  # every example once per epoch
    assert grouped == batch_indices(data, 16, generator=gen(), by_length=True)  # deterministic under a seed
    assert grouped != batch_indices(data, 16, generator=torch.Generator().manual_seed(6), by_length=True)
    assert all(len(g) <= 16 for g in grouped)
    plain = batch_indices(data, 16, generator=gen())
    # lengths uniform on 2..47: random batches pad to ~45 tokens, grouped ones to about the mean
    assert _padded_tokens(data, grouped) < 0.75 * _padded_tokens(data, plain)
    # each batch's examples come from one run of LENGTH_GROUP batches of the shuffled order
    order = torch.randperm(len(data), generator=gen()).tolist()
    run_of = {i: pos // (LENGTH_GROUP * 16) for pos, i in enumerate(order)}
    assert all(len({run_of[i] for i in g}) == 1 for g in grouped)
    runs = [run_of[g[0]] for g in grouped]
    assert runs != sorted(runs)  # ...and the batches are shuffled across runs, not served run by run


def test_evaluation_batches_sorted_by_length():
    data = _data()
    groups = batch_indices(data, 32, by_length=True)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(data)))
    lengths = [len(data.ids[i]) for i in flat]
    assert lengths == sorted(lengths)


def test_collate_pads_and_masks():
    data = TokenizedData([[5, 6, 7], [8]], [1, 0], "seq_cls", pad_token_id=0)
    batch = collate(data, [1, 0])
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    lm = TokenizedData([[5, 6, 7], [8, 9]], None, "causal_lm", pad_token_id=0)
    assert collate(lm, [0, 1])["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert [b["input_ids"].shape[1] for b in batches(lm, 1)] == [3, 2]


def test_bad_batch_size():
    with pytest.raises(ConfigError, match="batch_size"):
        batch_indices(_data(10), 0)


# ---------------------------------------------------------------------------- held-out split


@pytest.mark.parametrize("n, fraction, expected", [
    (2, 0.1, 1), (3, 0.1, 1), (5, 0.1, 1),  # round() alone would hold out none
    (2, 0.9, 1), (4, 0.9, 3),  # ...and here leave none to train on
    (10, 0.25, 2), (20, 0.1, 2), (100, 0.1, 10),  # otherwise round(f·n), half-way to even as Python rounds
])
def test_held_out_count_keeps_one_eval_and_one_train_example(n, fraction, expected):
    assert held_out_count(n, fraction) == expected
    train, held = _data(n).split(fraction, seed=0)
    assert (len(train), len(held)) == (n - expected, expected)
    assert sorted(train.ids + held.ids) == sorted(_data(n).ids)  # a partition of the examples


def test_one_example_cannot_be_split():
    with pytest.raises(ConfigError, match=r"eval_fraction 0\.1: data file x\.jsonl holds 1 example.*--eval-fraction 0"):
        _data(1).split(0.1, seed=0, source="data file x.jsonl")


def test_tiny_data_files_get_one_eval_example(llama_base, tmp_path):
    for n in (2, 3, 5):
        path = tmp_path / f"n{n}.jsonl"
        path.write_text("".join(json.dumps({"text": f"some text {i}"}) + "\n" for i in range(n)))
        _, train, held, _, _ = prepare_data(llama_base, path, eval_fraction=0.1)
        assert (len(train), len(held)) == (n - 1, 1)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "some text"}) + "\n")
    with pytest.raises(ConfigError, match=f"eval_fraction.*{one}"):
        prepare_data(llama_base, one, eval_fraction=0.1)
    _, train, held, _, _ = prepare_data(llama_base, one, eval_fraction=0.0)  # no evaluation asked: fine
    assert len(train) == 1 and held is None


# ---------------------------------------------------------------------------- labels and the head


def test_integer_labels_keep_a_head_they_fit_and_are_refused_beyond_it():
    records = [{"label": v} for v in (0, 1, 1, 0)]
    assert label_ids(records, min_labels=3) == ([0, 1, 1, 0], ["0", "1", "2"])  # the 3-class head's names
    assert label_ids(records, num_labels=3, min_labels=3)[1] == ["0", "1", "2"]
    assert label_ids(records + [{"label": 4}], min_labels=3)[1] == ["0", "1", "2", "3", "4"]  # a new head grows
    with pytest.raises(ConfigError, match=r"train\.jsonl: label 3 is outside the model's 3 classes"):
        label_ids(records + [{"label": 3}], num_labels=3, min_labels=3, source="train.jsonl")
    with pytest.raises(ConfigError, match="negative"):
        label_ids(records + [{"label": -1}])
    # string labels are their own label set, whatever the head's size: one class is still refused
    with pytest.raises(ConfigError, match="at least two classes"):
        label_ids([{"label": "pos"}] * 3, num_labels=3)


def test_boolean_labels_are_refused_as_such():
    from spectra.lora.data import label_ids

    # they were "labels mix integers and strings" (bools are ints to Python), with no string in sight
    with pytest.raises(ConfigError, match="true/false"):
        label_ids([{"label": True}, {"label": False}], source="bools.jsonl")
    ids, names = label_ids([{"label": 1}, {"label": 0}], source="ints.jsonl")
    assert ids == [1, 0] and names == ["0", "1"]


# ---------------------------------------------------------------------------- file formats


def _write_table(path, rows, delimiter):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_tables_read_as_the_same_records_as_json_lines(llama_base, tmp_path, suffix, delimiter):
    """A .csv/.tsv was one plain-text stream (the header and labels trained as text, task causal_lm)."""
    from spectra.lora.data import read_records

    texts = ["good, really", "bad\tone", 'say "meh"\non two lines', "good again", "bad again", "fine"]
    if suffix == ".tsv":  # no tab or line break in a TSV field; a quoted one (csv.writer's, pandas') is unquoted
        texts[1:3] = ["bad one", 'say "meh" in quotes']
    reference = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in reference))
    table = _write_table(tmp_path / f"train{suffix}", [["id", "text", "label"]]
                         + [[i, r["text"], r["label"]] for i, r in enumerate(reference)], delimiter)
    assert read_records(table, task="seq_cls") == read_records(jsonl, task="seq_cls") == reference
    task, train, _, names, _ = prepare_data(llama_base, table)
    expected = prepare_data(llama_base, jsonl)
    assert (task, train.ids, train.labels, names) == (expected[0], expected[1].ids, expected[1].labels, expected[3])
    assert task == "seq_cls" and names == ["0", "1"]  # an integer column holds class ids, as in .jsonl
    # string labels stay names; a BOM (Excel's UTF-8) is not part of the first column's name
    named = tmp_path / f"named{suffix}"
    named.write_text("\ufeff" + _write_table(tmp_path / f"n{suffix}", [["text", "label"], ["a b", "pos"], ["c", "2"]],
                                             delimiter).read_text(), encoding="utf-8")
    assert read_records(named, task="seq_cls") == [{"text": "a b", "label": "pos"}, {"text": "c", "label": "2"}]
    # a text column alone is language modelling, one example per row (not one stream)
    lm = _write_table(tmp_path / f"lm{suffix}", [["text"], ["some text"], ["more text"]], delimiter)
    assert read_records(lm, task="causal_lm") == [{"text": "some text"}, {"text": "more text"}]
    assert prepare_data(llama_base, lm)[0] == "causal_lm"


def test_a_tsv_is_read_unquoted(tmp_path):
    """GLUE-style TSVs are not quoted: a text opening with '"' made csv's reader swallow the tabs and rows up to the
    next quote (5 rows read as 2, in silence). Whole-field quotes (pandas' quoting) are still removed."""
    from spectra.lora.data import read_records

    path = tmp_path / "glue.tsv"
    path.write_text('text\tlabel\n" a quote…\t1\nsecond row\t0\nthird row\t1\n"fourth" row\t0\n"fifth ""x"""\t1\n')
    assert read_records(path, task="seq_cls") == [
        {"text": '" a quote…', "label": 1}, {"text": "second row", "label": 0}, {"text": "third row", "label": 1},
        {"text": '"fourth" row', "label": 0}, {"text": 'fifth "x"', "label": 1}]
    broken = tmp_path / "broken.tsv"
    broken.write_text('text\tlabel\nfine\t1\na\ttab inside\t0\n')
    with pytest.raises(ConfigError, match=r"broken\.tsv, line 3: 3 fields under a header of 2; a TSV text cannot "
                                          "hold a tab"):
        read_records(broken, task="seq_cls")


def test_bad_tables_are_named_by_line(tmp_path):
    from spectra.lora.data import read_records

    no_text = tmp_path / "a.csv"
    no_text.write_text("sentence,label\nhello,1\n")
    with pytest.raises(ConfigError, match=r"a\.csv: the header row names the columns \['sentence', 'label'\]; "
                                          "it must name text"):
        read_records(no_text, task="causal_lm")
    no_label = tmp_path / "b.csv"
    no_label.write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"b\.csv.*must name text and label"):
        read_records(no_label, task="seq_cls")
    assert read_records(no_label, task="causal_lm") == [{"text": "hello"}]
    unquoted = tmp_path / "c.csv"
    unquoted.write_text("text,label\nfine,1\nhello, world,0\n")  # the comma splits the text
    with pytest.raises(ConfigError, match=r"c\.csv, line 3: 3 fields under a header of 2; quote"):
        read_records(unquoted, task="seq_cls")
    empty_label = tmp_path / "d.csv"
    empty_label.write_text('text,label\nfine,1\n"two\nlines",\n')
    with pytest.raises(ConfigError, match=r"d\.csv, line 4: no \"label\" \(an empty label cell is no label\); 1 of 2 "
                                          "records have none"):
        read_records(empty_label, task="seq_cls")
    header_only = tmp_path / "e.tsv"
    header_only.write_text("text\tlabel\n")
    with pytest.raises(ConfigError, match="holds no records"):
        read_records(header_only, task="seq_cls")


def _mixed_files(tmp_path):
    """A .jsonl (a blank line, then line 3 unlabelled) and a .csv (line 4 empty), each labelling the others."""
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps({"text": "zero is a label", "label": 0}) + "\n\n"  # line 2 blank, as editors count
                     + json.dumps({"text": "no label here"}) + "\n" + json.dumps({"text": "one", "label": 1}) + "\n"
                     + json.dumps({"text": "nor here"}) + "\n")
    table = tmp_path / "mixed.csv"
    table.write_text('text,label\nfalse is a name,false\n"zero, as text",0\nempty cell,\nlast,"0"\n')
    return jsonl, table


def test_some_records_without_a_label_are_refused_by_line(llama_base, tmp_path):
    """A classification file with one unlabelled record was trained as a language model, every label dropped."""
    from spectra.lora.data import read_records

    jsonl, table = _mixed_files(tmp_path)
    for task in ("auto", "seq_cls"):
        with pytest.raises(ConfigError, match=rf"data file {jsonl}, line 3: no \"label\"; 2 of 4 records have none\. "
                                              r"Classification needs a label on every record.*--task causal_lm"):
            read_records(jsonl, task=task)
        with pytest.raises(ConfigError, match=rf"data file {table}, line 4: no \"label\" \(an empty label cell is no "
                                              r"label\); 1 of 4 records have none"):
            read_records(table, task=task)
    with pytest.raises(ConfigError, match=rf"{jsonl}, line 3: no \"label\""):
        prepare_data(llama_base, jsonl)  # what `spectra train` calls
    # the same file as eval data of a classifier names it too
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError, match=rf"{jsonl}, line 3: no \"label\"; 2 of 4"):
        prepare_data(llama_base, train, eval_data=jsonl)
    # negative controls: asked for a language model, the labels are read and ignored; 0, "0" and "false" are labels
    assert prepare_data(llama_base, jsonl, task="causal_lm")[0] == "causal_lm"
    table.write_text(table.read_text().replace("empty cell,", "empty cell,0"))
    assert [r["label"] for r in read_records(table, task="auto")] == ["false", "0", "0", "0"]
    task, tokens, _, names, _ = prepare_data(llama_base, table)
    assert task == "seq_cls" and names == ["0", "false"] and tokens.labels == [1, 0, 0, 0]
    jsonl.write_text("".join(json.dumps({"text": t, "label": 0 if "zero" in t else 1}) + "\n"
                             for t in ("zero one", "one", "zero two")))
    assert prepare_data(llama_base, jsonl)[2] is None and prepare_data(llama_base, jsonl)[1].labels == [0, 1, 0]
    # no record labelled: a language model, as before
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("some text", "more text")))
    assert prepare_data(llama_base, jsonl)[0] == "causal_lm"


def test_a_label_of_another_type_is_named(tmp_path):
    from spectra.lora.data import read_records

    path = tmp_path / "typed.jsonl"
    path.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"text": "b", "label": None}) + "\n")
    for task in ("auto", "seq_cls"):  # a null label is a label key: refused as such, not taken for a missing one
        with pytest.raises(ConfigError, match=rf"{path}, line 2: classification records need a \"label\" \(integer or "
                                              r"string\), not null"):
            read_records(path, task=task)
    path.write_text(json.dumps({"text": "a", "label": "pos"}) + "\n" + json.dumps({"text": "b", "label": " "}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 2: an empty \"label\" is no label"):  # as an empty cell
        read_records(path, task="auto")  # (it had been a class named " ")
    path.write_text(json.dumps({"text": "a", "label": "pos"}) + "\n" + json.dumps({"text": "b", "label": 0}) + "\n")
    assert [r["label"] for r in read_records(path, task="auto")] == ["pos", 0]  # 0 is a label


@pytest.mark.parametrize("name", ["train.md", "train.parquet", "train"])
def test_other_extensions_are_refused_with_the_formats(tmp_path, name):
    from spectra.lora.data import read_records

    path = tmp_path / name
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(ConfigError, match=rf"{name}: .* is not a data format spectra reads; pass a \.txt file.*"
                                          r"\.jsonl.*\.csv/\.tsv.*Rename a plain-text file to \.txt"):
        read_records(path, task="causal_lm")
    # the same bytes as .txt are one language-modelling stream, as every plain-text file was
    txt = tmp_path / "same.txt"
    txt.write_text(path.read_text())
    assert read_records(txt, task="causal_lm") == [{"text": "text,label\nhello,1\n", "stream": True}]


# ---------------------------------------------------------------------------- eval labels


def test_eval_label_outside_the_training_classes_is_named(llama_base, tmp_path):
    """A causal-LM base trained for classification has a new head: the eval label is what is wrong."""
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(8)))
    held.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 3}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError) as err:
        prepare_data(llama_base, train, eval_data=held)
    assert str(err.value) == (f"{held}: label 2 is not among the 2 classes seen in training (0, 1); eval data must "
                              "use the training data's labels.")
    named_train, named_held = tmp_path / "named.jsonl", tmp_path / "named_eval.jsonl"
    named_train.write_text("".join(json.dumps({"text": f"item {i}", "label": ["neg", "pos"][i % 2]}) + "\n"
                                   for i in range(8)))
    named_held.write_text(json.dumps({"text": "item", "label": "pos"}) + "\n"
                          + json.dumps({"text": "item", "label": "meh"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{named_held}: label 'meh' is not among the 2 classes seen in training "
                                          r"\(neg, pos\)"):
        prepare_data(llama_base, named_train, eval_data=named_held)
    # negative control: eval labels among the training classes pass, by id or by name
    held.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(6)))
    assert prepare_data(llama_base, train, eval_data=held)[2].labels == [0, 1, 0, 1, 0, 1]


# ---------------------------------------------------------------------------- tokenizer


def test_a_tokenizer_without_pad_token_is_saved_with_the_one_batches_used(tmp_path):
    """A saved copy of a tokenizer with no pad token (GPT-2, Llama) pads with the id training padded with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from spectra.lora.data import load_tokenizer

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "good": 2, "bad": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "b")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "b")).pad_token_id is None  # the checkpoint's: no pad
    tokenizer = load_tokenizer(tmp_path / "b", vocab_size=4, task="seq_cls")
    assert tokenizer.pad_token_id == 1 and tokenizer.encode("good bad") == [2, 3]  # eos pads; encoding unchanged
    tokenizer.save(tmp_path / "ad")
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "ad"))
    assert saved.pad_token_id == 1
    assert saved(["good bad good", "bad"], padding=True)["input_ids"] == [[2, 3, 2], [3, 1, 1]]


def test_a_long_classification_text_keeps_its_closing_sep(tmp_path):
    """Cut at max_length, a BERT-style [CLS] … [SEP] text keeps [SEP], as the tokenizer's own truncation does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from spectra.lora.data import load_tokenizer, tokenize

    words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5},
                                       unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    hf = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]")
    hf.save_pretrained(tmp_path / "b")
    text = "good bad good bad good"
    assert hf(text)["input_ids"][:4] == [2, 4, 5, 4]  # negative control: a slice of the ids loses [SEP]
    data = tokenize([{"text": text, "label": 1}, {"text": "bad", "label": 0}],
                    load_tokenizer(tmp_path / "b", vocab_size=6, task="seq_cls"), task="seq_cls", max_length=4,
                    labels=[1, 0])
    assert data.ids == [hf(text, truncation=True, max_length=4)["input_ids"], [2, 5, 3]] and data.ids[0] == [2, 4, 5, 3]


# ---------------------------------------------------------------------------- sequence length


def _config_dir(path, config):
    """A model directory holding only config.json: all that tokenising for it reads."""
    config.save_pretrained(path)
    return path


def _roberta_config():
    import transformers as tf

    # position ids start after the padding id 1: 34 rows hold 32 tokens
    return tf.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                            max_position_embeddings=34, pad_token_id=1, vocab_size=64)


def _positions_config(family):
    """A tiny config of `family` with 32 positions, of the kind :data:`POSITIONS` gives."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64,
                 max_position_embeddings=32)
    if family == "roberta":
        return _roberta_config()
    if family == "deberta_v2":  # transformers' default: the absolute table, added to the input
        return tf.DebertaV2Config(**small)
    if family == "deberta_v2_relative":  # DeBERTa-v3's configs: relative attention only
        return tf.DebertaV2Config(**small, position_biased_input=False, relative_attention=True, position_buckets=8)
    if family == "deberta_relative":
        return tf.DebertaConfig(**small, position_biased_input=False, relative_attention=True)
    if family in ("esm", "esm_rotary"):  # position ids start after the padding id 1, as RoBERTa's: 34 hold 32
        return tf.EsmConfig(**small | {"max_position_embeddings": 34}, pad_token_id=1, mask_token_id=2,
                            position_embedding_type="rotary" if family == "esm_rotary" else "absolute")
    if family == "bert_relative_key":  # transformers 5 ignores the key: BERT adds its absolute table all the same
        return tf.BertConfig(**small, position_embedding_type="relative_key")
    if family == "granite_nope":  # Granite 4.0-H: no position encoding, a rope_parameters beside it all the same
        return tf.GraniteMoeHybridConfig(**small | {"num_hidden_layers": 2}, num_key_value_heads=2, num_local_experts=2,
                                         num_experts_per_tok=1, shared_intermediate_size=48, mamba_n_heads=4,
                                         mamba_d_head=16, layer_types=["attention", "attention"],
                                         position_embedding_type="nope")
    from tests.models import tiny_config

    return tiny_config(family)


POSITIONS = {"bert": "learned", "gpt2": "learned", "roberta": "learned", "gpt_neox": "rotary",
             "deberta_v2": "learned", "deberta_v2_relative": "relative", "deberta_relative": "relative",
             "esm": "learned", "esm_rotary": "rotary", "bert_relative_key": "learned", "granite_nope": "none"}


@pytest.mark.parametrize("family", list(POSITIONS))
def test_position_limit_is_the_longest_sequence_the_model_takes(family, tmp_path):
    """The model itself is the reference: `length` tokens run, one more fails, except where positions run past."""
    import transformers as tf

    from spectra.lora.data import position_limit

    config = _positions_config(family)
    saved = json.loads((_config_dir(tmp_path, config) / "config.json").read_text())
    limit = position_limit(saved)
    assert (limit.length, limit.positions) == (32, POSITIONS[family])
    assert limit.learned == (POSITIONS[family] == "learned")
    model = tf.AutoModel.from_config(config).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, limit.length), 5))
        if limit.learned:
            with pytest.raises((RuntimeError, IndexError)):  # no position to embed
                model(input_ids=torch.full((1, limit.length + 1), 5))
        else:  # rotary or relative: runs past the configured positions
            model(input_ids=torch.full((1, limit.length + 1), 5))
    assert position_limit({"model_type": "t5", "d_model": 32}) is None  # relative positions: no table to fit


def test_default_length_is_cut_to_a_short_position_table(llama_base, tmp_path):
    """BERT/GPT-2 with 32 positions: the default 128 had made 45-token examples, a crash in the model."""
    from tests.models import tiny_config

    records = tmp_path / "cls.jsonl"
    records.write_text("".join(json.dumps({"text": f"example {i} " + "word " * 20, "label": i % 3}) + "\n"
                               for i in range(6)))
    stream = tmp_path / "train.txt"
    stream.write_text("plain text to cut into blocks " * 20)
    bert = _config_dir(tmp_path / "bert", tiny_config("bert"))
    gpt2 = _config_dir(tmp_path / "gpt2", tiny_config("gpt2"))
    for folder, data in ((bert, records), (gpt2, stream), (gpt2, records)):
        notes = []
        _, tokens, held, *_ = prepare_data(folder, data, eval_fraction=0.5, notes=notes)
        lengths = [len(ids) for ids in tokens.ids + held.ids]
        assert max(lengths) == 32 == tokens.max_length == held.max_length, (folder, data)  # truncated / cut to fit
        (note,) = notes
        table = "max_position_embeddings" if folder == bert else "n_positions"  # GPT-2's name for it
        assert "cut at 32 tokens, not the default 128" in note and f"({table} = 32 in its config.json)" in note
        assert note.startswith("max_length (--max-length): examples are cut")  # the option that was left unset
    # negative control: a position table longer than the default leaves it at 128, without a note
    notes = []
    _, tokens, *_ = prepare_data(llama_base, stream, notes=notes)
    assert tokens.max_length == 128 == max(len(ids) for ids in tokens.ids) and notes == []


def test_explicit_length_beyond_the_positions_is_refused_by_option_value_and_limit(tmp_path):
    from tests.models import tiny_config

    data = tmp_path / "train.txt"
    data.write_text("plain text to cut into blocks " * 20)
    bert = _config_dir(tmp_path / "bert", tiny_config("bert"))
    with pytest.raises(ConfigError, match=r"^max_length \(--max-length\) 33 is more than the model can take: its "
                                          r"table of learned positions covers 32 tokens \(max_position_embeddings = "
                                          r"32 in its config\.json\)"):
        prepare_data(bert, data, max_length=33)
    assert prepare_data(bert, data, max_length=32)[1].max_length == 32  # the limit itself is asked for: as asked
    roberta = _config_dir(tmp_path / "roberta", _roberta_config())
    with pytest.raises(ConfigError, match=r"33 .* covers 32 tokens \(max_position_embeddings = 34, less the 2"):
        prepare_data(roberta, data, max_length=33)
    # rotary positions run past the configured ones: kept as asked, with a note
    neox = _config_dir(tmp_path / "neox", tiny_config("gpt_neox"))
    notes = []
    _, tokens, *_ = prepare_data(neox, data, max_length=64, notes=notes)
    assert max(len(ids) for ids in tokens.ids) == 64
    assert len(notes) == 1 and notes[0].startswith("max_length (--max-length) 64 is beyond the 32 positions")


_POSITION_SOURCES = {"esm_rotary": "max_position_embeddings = 34, less the 2 ids its position ids start after "
                                    "(pad_token_id + 1)"}


@pytest.mark.parametrize("family", ["deberta_v2_relative", "deberta_relative", "esm_rotary", "granite_nope"])
def test_length_beyond_positions_that_run_past_them_is_kept(family, tmp_path):
    """DeBERTa without its absolute table (position_biased_input false) ran 64 tokens at 32 positions, yet
    --max-length 64 was refused: "its table of learned positions covers 32". The model is the reference."""
    import transformers as tf

    from spectra.lora.data import resolve_max_length

    config = _positions_config(family)
    saved = json.loads((_config_dir(tmp_path, config) / "config.json").read_text())
    notes = []
    assert resolve_max_length(64, saved, notes=notes) == 64
    source = _POSITION_SOURCES.get(family, "max_position_embeddings = 32")
    runs_past = {"esm_rotary": "its rotary positions run past them",
                 "granite_nope": "it encodes no positions (position_embedding_type = nope): nothing in it stops at "
                                 "them"}.get(
        family, "it has no table of absolute positions (position_biased_input = false): its relative positions run "
                 "past them")
    assert notes == [f"max_length (--max-length) 64 is beyond the 32 positions the model is configured for "
                     f"({source} in its config.json); {runs_past}, but it was not trained on sequences this long."]
    with torch.no_grad():
        tf.AutoModel.from_config(config).eval()(input_ids=torch.full((1, 64), 5))


@pytest.mark.parametrize("family", ["deberta_v2", "bert_relative_key", "esm"])
def test_length_beyond_a_learned_table_is_refused_whatever_else_the_config_says(family, tmp_path):
    """DeBERTa's default absolute table, BERT's position_embedding_type relative_key (which transformers 5 ignores)
    and ESM's absolute positions (whose config.json carries a rope_theta all the same: it was taken for rotary and
    kept, a crash in the model) fail at 64 tokens, so the length is refused."""
    import transformers as tf

    from spectra.lora.data import resolve_max_length

    config = _positions_config(family)
    saved = json.loads((_config_dir(tmp_path, config) / "config.json").read_text())
    with pytest.raises(ConfigError, match="64 is more than the model can take: its table of learned positions covers "
                                          "32 tokens"):
        resolve_max_length(64, saved)
    with torch.no_grad(), pytest.raises((RuntimeError, IndexError)):
        tf.AutoModel.from_config(config).eval()(input_ids=torch.full((1, 64), 5))


def _configs():
    from spectra.calibration import CalibrationConfig
    from spectra.lora.train import TrainConfig
    from spectra.lora.verify import VerifyConfig
    from spectra.sweep import SweepConfig

    return {"train": (TrainConfig, "max_length (--max-length)"), "verify": (VerifyConfig, "VerifyConfig max_length"),
            "calibration": (CalibrationConfig, "calibration max_length"),
            "sweep": (SweepConfig, "max_length (--max-length)")}


@pytest.mark.parametrize("config", ["train", "verify", "calibration", "sweep"])
@pytest.mark.parametrize("max_length", [1, 0, 2.5, 64.0, "64", True])
def test_every_config_refuses_a_max_length_that_is_not_an_integer_of_two_or_more(config, max_length):
    """TrainConfig took max_length 1 (tokenize then refused it), CalibrationConfig and SweepConfig 2.5 (no type
    check): each config now calls check_max_length, one refusal in the same words naming its option."""
    import re

    cls, option = _configs()[config]
    message = f"{option} {max_length!r} must be an integer ≥ 2 (tokens per example), or unset for"
    with pytest.raises(ConfigError, match=re.escape(message)):
        cls(max_length=max_length)
    assert cls(max_length=2).max_length == 2 and cls().max_length is None  # negative controls


@pytest.mark.parametrize("option", ["max_length (--max-length)", "VerifyConfig max_length", "calibration max_length"])
def test_the_default_length_note_starts_with_the_option_it_was_called_with(tmp_path, option):
    """It started "max_length:" whatever the option, so `analyze --calibration` printed "calibration: max_length: …"
    for a length no --max-length option sets."""
    from spectra.lora.data import prepare_tokenizer
    from tests.models import tiny_config

    notes = []
    _, length, _ = prepare_tokenizer(_config_dir(tmp_path, tiny_config("gpt2")), task="causal_lm", max_length=None,
                                     option=option, notes=notes)
    (note,) = notes
    assert length == 32 and note.startswith(f"{option}: examples are cut at 32 tokens, not the default 128")


def test_the_byte_tokenizer_takes_the_vocabulary_a_multimodal_config_keeps_in_text_config(tmp_path):
    """Gemma 3's multimodal config.json has no top-level vocab_size: the byte tokenizer fell back to 256 ids whatever
    the language model embeds. The text_config's is read; a top-level one still wins; none at all is refused."""
    from spectra.lora.data import ByteTokenizer, prepare_tokenizer
    from tests.models import tiny_config

    multimodal = _config_dir(tmp_path / "mm", tiny_config("gemma3_multimodal"))
    saved = json.loads((multimodal / "config.json").read_text())
    assert "vocab_size" not in saved and saved["text_config"]["vocab_size"] == 300
    tokenizer = prepare_tokenizer(multimodal, task="causal_lm", max_length=None)[2]
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == 300
    llama = _config_dir(tmp_path / "llama", tiny_config("llama"))
    assert prepare_tokenizer(llama, task="causal_lm", max_length=None)[2].vocab_size == 64  # the top level's
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text(json.dumps({"vocab_size": 48, "text_config": {"vocab_size": 300}}))
    assert prepare_tokenizer(both, task="causal_lm", max_length=None)[2].vocab_size == 48
    (both / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 8}}))
    with pytest.raises(ConfigError, match=r"declares no vocab_size \(nor text_config.vocab_size\), and the model "
                                          "ships no tokenizer"):
        prepare_tokenizer(both, task="causal_lm", max_length=None)


def test_an_encoder_decoder_cuts_source_and_target_at_its_learned_positions(tmp_path):
    """BART's learned positions (32 here) bound source and target alike; T5's relative positions bound neither."""
    from tests.models import tiny_config

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": "source words " * 8, "target": "target words " * 8}) + "\n"
                            for _ in range(4)))
    bart = _config_dir(tmp_path / "bart", tiny_config("bart"))
    notes = []
    task, tokens, *_ = prepare_data(bart, data, notes=notes)
    assert task == "seq2seq_lm" and tokens.max_length == 32
    assert {len(i) for i in tokens.ids} == {len(t) for t in tokens.targets} == {32}  # 104 bytes each, cut
    assert len(notes) == 1 and "max_position_embeddings = 32" in notes[0]
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 64 is more than the model can take"):
        prepare_data(bart, data, max_length=64)
    t5 = _config_dir(tmp_path / "t5", tiny_config("t5"))
    notes = []
    _, tokens, *_ = prepare_data(t5, data, max_length=300, notes=notes)  # no table of positions to outrun
    # 104 bytes each and the end-of-sequence id the byte tokenizer closes an encoder-decoder's texts with
    assert {len(i) for i in tokens.ids} == {len(t) for t in tokens.targets} == {105} and notes == []


def test_an_encoder_decoder_with_a_table_per_stack_is_limited_by_the_shorter(tmp_path):
    """LED's encoder takes 64 positions, its decoder 16 (here): one max_length cuts source and target, so 16 binds.
    The model is the reference: 16 target tokens run, 17 fail. It had no limit (no max_position_embeddings key)."""
    import transformers as tf

    from spectra.lora.data import position_limit, resolve_max_length

    config = tf.LEDConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=64,
                          max_encoder_position_embeddings=64, max_decoder_position_embeddings=16, attention_window=[8])
    saved = json.loads((_config_dir(tmp_path, config) / "config.json").read_text())
    limit = position_limit(saved)
    assert (limit.length, limit.positions) == (16, "learned")
    assert limit.source == "max_decoder_position_embeddings = 16, the shorter of the encoder's and the decoder's"
    model = tf.LEDForConditionalGeneration(config).eval()
    with torch.no_grad():
        model(input_ids=torch.full((1, 16), 5), labels=torch.full((1, 16), 5))
        with pytest.raises(IndexError):  # no decoder position to embed
            model(input_ids=torch.full((1, 16), 5), labels=torch.full((1, 17), 5))
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 17 is more than the model can take"):
        resolve_max_length(17, saved)
    one = {k: v for k, v in saved.items() if k != "max_decoder_position_embeddings"}  # a config naming one stack's
    assert position_limit(one).source == "max_encoder_position_embeddings = 64"


def test_one_task_check_names_the_option_and_the_tasks_it_allows(tmp_path):
    """read_records takes auto (and its error says so); tokenize needs a decided task; the configs name their option."""
    from spectra.lora.data import check_task, read_records, tokenize
    from spectra.lora.train import TrainConfig

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    with pytest.raises(ConfigError) as err:
        read_records(data, task="causal")
    assert str(err.value) == "task 'causal' is not auto, causal_lm, seq_cls or seq2seq_lm."
    with pytest.raises(ConfigError) as err:
        tokenize([{"text": "hello there"}], None, task="auto", max_length=8)
    assert str(err.value) == "task 'auto' is not causal_lm, seq_cls or seq2seq_lm."
    with pytest.raises(ConfigError) as err:
        TrainConfig(task="seq2seq")
    assert str(err.value) == "task (--task) 'seq2seq' is not auto, causal_lm, seq_cls or seq2seq_lm."
    for task in ("auto", "causal_lm", "seq_cls", "seq2seq_lm"):  # negative control: every task passes
        check_task(task)
    assert read_records(data, task="auto") == [{"text": "hello there"}]
