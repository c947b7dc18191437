"""Training data for the adapter trainer: read text / JSON lines, tokenise, batch.

Three tasks:

- ``causal_lm``: a ``.txt`` file is one token stream cut into blocks of
  ``max_length`` tokens (the usual language-modelling recipe); a ``.jsonl`` file holds
  one example per line, ``{"text": ...}``, each truncated to ``max_length``.
- ``seq_cls``: a ``.jsonl`` file with ``{"text": ..., "label": ...}`` per line; labels
  are integers or strings (see :func:`label_ids` for how they meet the model's head).
- ``seq2seq_lm``: an encoder–decoder (T5, BART) reads ``source`` and learns to write
  ``target``: a ``.jsonl`` file with ``{"source": ..., "target": ...}`` per line, each
  side truncated to ``max_length`` tokens by the tokenizer, which keeps the closing ``</s>``
  (a decoder that never sees it is never taught to stop). The labels are the target's token ids (padding
  -100); the model builds its decoder inputs from them (shifted right after its
  ``decoder_start_token_id``), so the loss is the mean cross-entropy over target tokens.

A ``.csv`` or ``.tsv`` file holds the same records as a table whose header row names the
columns ``text`` and (for classification) ``label``, or ``source`` and ``target``. Any
other extension is refused: a table or a binary format read as plain text would train on
the wrong thing in silence.

Tokenisation uses the checkpoint's own tokenizer when the directory has one. Tiny
test models built from config have none; they get :class:`ByteTokenizer`, a
deterministic byte-level tokenizer that needs no files and no network.

An example is at most ``max_length`` tokens, and never more than the model's positions
cover (:func:`resolve_max_length`): left unset, it is :data:`DEFAULT_MAX_LENGTH` or the
model's limit when that is shorter (with a note); a length the model cannot take (more
than its table of positions, learned or fixed) is refused. An encoder–decoder's source and target
are each cut at ``max_length``, so it must fit both stacks' positions (BART's learned
``max_position_embeddings``; T5's relative positions have no limit).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# the one rule of a sequence length, shared with spectra memory (and spectra.lora.data's names for its callers)
from spectra.checkpoints.positions import (  # noqa: F401
    DEFAULT_MAX_LENGTH,
    PositionLimit,
    check_max_length,
    position_limit,
    resolve_max_length,
)
from spectra.checkpoints.targets import configured_labels  # noqa: F401 - shared with spectra.ranks, name kept here
from spectra.errors import ConfigError

TASKS = ("causal_lm", "seq_cls", "seq2seq_lm")
SEQ2SEQ_FIELDS = ("source", "target")  # the fields of a sequence-to-sequence record
IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips (padding)
DECODER_MASK = "decoder_attention_mask"  # the batch key that marks an encoder-decoder's batch (collate)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
DATA_FORMATS = ('a .txt file (plain text), a .jsonl file of {"text": ...} (or {"text": ..., "label": ...} for '
                'classification, {"source": ..., "target": ...} for an encoder-decoder) records, or a .csv/.tsv file '
                "whose header row names the columns text (and label), or source and target")
# what a reader of one text (decoder-only model, encoder) is told of source/target records: what each model reads
_PAIRS_ADVICE = ("sequence-to-sequence data, which an encoder-decoder (T5, BART) reads with task auto or seq2seq_lm; a "
                 "decoder-only model or an encoder reads one text: join each pair into one, {joined}.")
SEQ2SEQ_FORMAT = ('a .jsonl file of {"source": ..., "target": ...} records, or a .csv/.tsv file whose header row '
                  "names the columns source and target")


# ---------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes → token ids, for models that ship without a tokenizer.

    Id 0 is padding; byte ``b`` maps to ``1 + b`` when the vocabulary holds 257 ids or
    more (lossless), else to ``1 + b mod (vocab_size − 1)``. No files, no training, the
    same ids on every machine. With an end-of-sequence id, no byte maps to it: the bytes
    whose id it would be (T5's ``1``: NUL; BART's ``2``: 0x01; in a 64-id vocabulary also
    ``?`` for T5, ``@`` for BART) take :attr:`eos_substitute` instead, the first id past the
    bytes' (257) when the vocabulary has one, else the id after the end-of-sequence one
    (which another byte shares: such a vocabulary is lossy already). A text then ends in
    exactly one end-of-sequence id, which BART's and T5's classifiers count.

    Parameters
    ----------
    vocab_size : int
        The model's ``config.vocab_size`` (at least 2).
    eos_token_id : int, optional
        Appended to every text, as T5's tokenizer closes source and target with ``</s>``: an
        encoder–decoder's targets must end in it, or the decoder is never taught to stop
        (generation ends at the model's ``eos_token_id``). None (default): nothing appended,
        as transformers' tokenizers add nothing at the end of a causal LM's text (GPT-2's,
        Llama's) and spectra reads a causal LM's or a classifier's text without special tokens
        there too. :func:`load_tokenizer` gives one for ``seq2seq_lm``, and for ``seq_cls`` of a
        classifier that reads its input's end-of-sequence token (BART's). It shares an id with
        a byte (T5's ``1``: byte 0, NUL, in a lossless vocabulary).
    """

    name = "byte-level (built in)"

    def __init__(self, vocab_size: int, *, eos_token_id: int | None = None):
        if vocab_size < 2:
            raise ConfigError(f"vocab_size {vocab_size}: a byte tokenizer needs at least 2 ids (padding + one byte).")
        if eos_token_id is not None and not 0 < eos_token_id < vocab_size:
            raise ConfigError(f"eos_token_id {eos_token_id}: the byte tokenizer's end-of-sequence id must lie in "
                              f"[1, {vocab_size}) (0 is padding).")
        if eos_token_id is not None and vocab_size < 3:
            raise ConfigError(f"vocab_size {vocab_size}: a byte tokenizer with an end-of-sequence id needs at least 3 "
                              "ids (padding, the end-of-sequence id, one for the bytes).")
        self.vocab_size = int(vocab_size)
        self.pad_token_id = 0
        self.eos_token_id = eos_token_id
        self._byte_ids = [1 + b % (self.vocab_size - 1) for b in range(256)]  # byte -> id, before the EOS rule
        self.eos_substitute = None
        if eos_token_id is not None and eos_token_id in self._byte_ids:
            spare = 257 if self.vocab_size > 257 else None  # an id no byte has (eos ≤ 256 here, so not it either)
            self.eos_substitute = spare or (eos_token_id + 1 if eos_token_id + 1 < self.vocab_size else 1)
            self._byte_ids = [self.eos_substitute if i == eos_token_id else i for i in self._byte_ids]

    def encode(self, text: str, *, max_length: int | None = None, target: bool = False) -> list[int]:
        """The ids of ``text``'s bytes and the end-of-sequence id if there is one, at most ``max_length`` of them
        (the end kept, as transformers' truncation keeps special tokens); ``target`` changes nothing here."""
        ids = [self._byte_ids[b] for b in text.encode("utf-8")]
        if self.eos_token_id is None:
            return ids[:max_length]
        return ids[:None if max_length is None else max(max_length - 1, 0)] + [self.eos_token_id]


class _HFTokenizer:
    """A transformers tokenizer behind the same small interface as :class:`ByteTokenizer`."""

    def __init__(self, tokenizer, *, special_tokens: bool):
        self._tok = tokenizer
        self._special = special_tokens
        self.name = type(tokenizer).__name__
        pad = tokenizer.pad_token_id
        if pad is None:  # GPT-2/Llama tokenizers have no pad token; the mask hides it anyway
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            # named as the tokenizer's pad token, so the copy saved with an adapter pads batches as training did
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
        self.pad_token_id = int(pad)

    def encode(self, text: str, *, max_length: int | None = None, target: bool = False) -> list[int]:
        """``text``'s ids, cut by the tokenizer itself to ``max_length`` so the special tokens stay.

        A slice of the ids would cut T5's closing ``</s>`` (BERT's ``[SEP]``, BART's ``</s>``) off
        a long text, and a decoder trained on such targets is never taught to stop. ``target``:
        the text is a decoder's target (``text_target``), for tokenizers that mark targets
        with their own special tokens (mBART's and NLLB's target language).
        """
        text_arg = {"text_target" if target else "text": text}
        encoded = self._tok(**text_arg, add_special_tokens=self._special, truncation=max_length is not None,
                            max_length=max_length)
        return list(encoded["input_ids"])

    def save(self, folder: Path) -> None:
        self._tok.save_pretrained(folder)


# Model types whose sequence classifier reads the hidden state at the input's last end-of-sequence token (BART's
# eos_mask: "Each example must contain at least one <eos> token"): BART, mBART, PLBART, MVP, BigBird-Pegasus and T5's
# family. The byte tokenizer closes their classification texts with the model's eos_token_id, as their tokenizers
# close every text with </s>; every other classifier's text stays its bytes alone. tests/lora/test_data_eos_classifier.py
# holds this set to the transformers classes whose forward reads an eos_mask.
EOS_POOLED_CLASSIFIERS = frozenset({"bart", "mbart", "plbart", "mvp", "bigbird_pegasus", "t5", "mt5", "umt5"})


def load_tokenizer(model_dir: str | Path, *, vocab_size: int | None, task: str, eos_token_id: int | None = None,
                   model_type: str | None = None):
    """The checkpoint's tokenizer when ``model_dir`` holds one, else a :class:`ByteTokenizer`.

    Parameters
    ----------
    model_dir : str or path
        Local model directory.
    vocab_size : int or None
        The model's vocabulary size (for the byte fallback; see :func:`vocab_size`). None
        (the config declares none) is refused where the fallback is needed.
    task : {"causal_lm", "seq_cls", "seq2seq_lm"}
        Classification and sequence-to-sequence add the tokenizer's special tokens ([CLS] …
        [SEP]; T5's closing ``</s>``, which the decoder learns to end with); language
        modelling of a cut stream does not. The byte fallback closes each text of
        ``seq2seq_lm`` with an end-of-sequence id, T5-style: ``eos_token_id``, and each text of
        ``seq_cls`` for a classifier that pools at its end-of-sequence token
        (:data:`EOS_POOLED_CLASSIFIERS`: BART's, T5's).
    eos_token_id : int, optional
        The model's (``config.eos_token_id``) for the byte fallback of ``seq2seq_lm``; None, or
        one outside the vocabulary or equal to padding (0): the last id, ``vocab_size − 1``.
    model_type : str, optional
        The model's ``config.model_type``: whether the byte fallback closes a classification text
        with ``eos_token_id`` (:data:`EOS_POOLED_CLASSIFIERS`).
    """
    folder = Path(model_dir)
    if folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return _HFTokenizer(AutoTokenizer.from_pretrained(str(folder)),
                            special_tokens=task in ("seq_cls", "seq2seq_lm"))
    if vocab_size is None:
        raise ConfigError(f"{folder / 'config.json'} declares no vocab_size (nor text_config.vocab_size), and the "
                          "model ships no tokenizer: spectra's built-in byte tokenizer needs the vocabulary size. "
                          "Save the model's tokenizer beside it (tokenizer.save_pretrained).")
    if task != "seq2seq_lm" and not (task == "seq_cls" and model_type in EOS_POOLED_CLASSIFIERS):
        return ByteTokenizer(vocab_size)
    valid = isinstance(eos_token_id, int) and 0 < eos_token_id < vocab_size
    return ByteTokenizer(vocab_size, eos_token_id=eos_token_id if valid else vocab_size - 1)


# ---------------------------------------------------------------------------- records


def read_records(path: str | Path, *, task: str) -> list[dict]:
    """Read a ``.txt``, ``.jsonl`` (``.json``), ``.csv`` or ``.tsv`` data file into records.

    Records are ``{"text"[, "label"]}``, or ``{"source", "target"}`` for ``seq2seq_lm``
    (see :func:`seq2seq_records`). A ``.txt`` file becomes a single record (its whole text,
    for stream cutting); it is only valid for ``causal_lm``. A ``.csv``/``.tsv`` file's
    header row names its columns: ``text`` and, for classification, ``label``, or ``source``
    and ``target`` (others are ignored); a label column of integers only holds class ids, as
    integer labels of a ``.jsonl`` file do, and an empty label cell is no label.

    Parameters
    ----------
    path : str or path
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        ``seq_cls``: every record needs a label. ``seq2seq_lm``: every record needs string
        ``source`` and ``target`` fields. ``auto``: the first record decides the kind: one
        with ``source`` or ``target`` and no ``text`` makes every record a source/target
        pair; otherwise, as ``seq_cls`` when any record has a label (a file with some
        labels is a classification file with records missing theirs, not a
        language-modelling one), and records without any label are language modelling.
        ``causal_lm`` reads labels where they are and checks nothing about them.

    Raises
    ------
    ConfigError
        Missing file, another extension, invalid JSON or a malformed table row (with the
        line number), records without ``text`` (or without ``source`` or ``target``, named);
        for ``seq_cls`` (and ``auto`` once a record has a label), a record without ``label``
        (the first by line, and how many) or with one that is neither integer nor string; an
        empty file.
    """
    check_task(task)
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"data file {path} {what}; pass {DATA_FORMATS}.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if task == "seq_cls":
            raise ConfigError(f"data file {path}: classification needs labelled records, not plain text; pass "
                              f"{DATA_FORMATS}.")
        if task == "seq2seq_lm":
            raise ConfigError(f"data file {path}: a sequence-to-sequence model (task seq2seq_lm) learns to write a "
                              f"target from a source, not plain text; pass {SEQ2SEQ_FORMAT}.")
        text = _read_text(path)
        if not text.strip():
            raise ConfigError(f"data file {path} is empty.")
        return [{"text": text, "stream": True}]
    if suffix in (".jsonl", ".json"):
        rows = _json_lines(path, task=task)
    elif suffix in _TABLE_DELIMITERS:
        rows = _table_rows(path, _TABLE_DELIMITERS[suffix], task=task)
    else:
        raise ConfigError(f"data file {path}: {path.suffix or 'a name without extension'} is not a data format "
                          f"spectra reads; pass {DATA_FORMATS}. Rename a plain-text file to .txt.")
    if not rows:
        raise ConfigError(f"data file {path} holds no records.")
    if "source" in rows[0][1]:  # source/target pairs (checked per line as they were read): no labels to check
        return [record for _, record in rows]
    unlabelled = [number for number, record in rows if "label" not in record]
    if task == "seq_cls" or (task == "auto" and len(unlabelled) < len(rows)):
        _check_labels(path, rows, unlabelled)
    return [record for _, record in rows]


def _check_labels(path: Path, rows: list[tuple[int, dict]], unlabelled: list[int]) -> None:
    """Refuse classification rows without a label (the first by line, and how many) or with one of another type."""
    if unlabelled:
        empty = " (an empty label cell is no label)" if path.suffix.lower() in _TABLE_DELIMITERS else ""
        raise ConfigError(f"data file {path}, line {unlabelled[0]}: no \"label\"{empty}; {len(unlabelled)} of "
                          f"{len(rows)} records have none. Classification needs a label on every record; to train "
                          "a language model on the text alone, drop the labels or pass task causal_lm "
                          "(--task causal_lm).")
    for number, record in rows:
        if not isinstance(record["label"], (int, str)):
            raise ConfigError(f"data file {path}, line {number}: classification records need a \"label\" "
                              f"(integer or string), not {json.dumps(record['label'])}.")
        if isinstance(record["label"], str) and not record["label"].strip():  # as an empty table cell is
            raise ConfigError(f"data file {path}, line {number}: an empty \"label\" is no label; classification "
                              "needs one on every record.")


def seq2seq_records(records: Sequence[Mapping]) -> bool:
    """Whether :func:`read_records` read source/target pairs (``seq2seq_lm``), not texts."""
    return bool(records) and "source" in records[0]


def _is_seq2seq(fields, task: str) -> bool:
    """Whether a file whose first record (or header row) has ``fields`` holds source/target pairs."""
    return task == "seq2seq_lm" or (task == "auto" and "text" not in fields
                                    and any(f in fields for f in SEQ2SEQ_FIELDS))


def _pair(path: Path, number: int, record: Mapping, *, what: str = "field") -> dict:
    """The ``{"source", "target"}`` of a record, or the error naming the file, the line and the field missing."""
    for name in SEQ2SEQ_FIELDS:
        value = record.get(name)
        if not isinstance(value, str):
            found = f"no \"{name}\" {what}" if value is None else f'"{name}" is {json.dumps(value)}, not a string'
            raise ConfigError(f"data file {path}, line {number}: {found}; sequence-to-sequence records (task "
                              "seq2seq_lm, what an encoder-decoder such as T5 or BART trains on) need string "
                              f"\"source\" and \"target\" {what}s.")
    return {name: record[name] for name in SEQ2SEQ_FIELDS}


def _json_lines(path: Path, *, task: str = "auto") -> list[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSON-lines file (see :func:`read_records` for ``task``)."""
    rows = []
    pairs = None  # decided by the first record
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data file {path}, line {number}: not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise ConfigError(f"data file {path}, line {number}: each line must be a JSON object, not "
                              f"{type(record).__name__}.")
        if pairs is None:
            pairs = _is_seq2seq(record, task)
        if pairs:
            record = _pair(path, number, record)
        elif not isinstance(record.get("text"), str):
            hint = (' A record of "source" and "target" is '
                    + _PAIRS_ADVICE.format(joined='{"text": source + " " + target}')
                    if "source" in record or "target" in record else "")
            raise ConfigError(f"data file {path}, line {number}: each line must be an object with a string "
                              f'"text" field.{hint}')
        rows.append((number, record))
    return rows


def _table_rows(path: Path, delimiter: str, *, task: str) -> list[tuple[int, dict]]:
    """(line number, record) of each row of a ``.csv``/``.tsv`` file with a header row.

    The line number is the row's last line (a quoted field may span lines). A label
    column of integers only becomes integer labels (class ids).
    """
    kind = "CSV" if delimiter == "," else "TSV"
    # an Excel-saved table starts with a byte-order mark, which would make the first column "\ufefftext"
    # A TSV is read unquoted (GLUE's files are): csv's quoting would take a text that opens with '"' for a
    # quoted field and swallow tabs and rows up to the next quote, in silence. A whole field in quotes, as
    # pandas writes a text holding one, is unquoted afterwards (_unquote).
    tsv = delimiter == "\t"
    reader = csv.DictReader(io.StringIO(_read_text(path).removeprefix("\ufeff")), delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    rows = []
    try:
        header = reader.fieldnames or []
        if _is_seq2seq(header, task):
            return _table_pairs(path, reader, tsv=tsv)
        if "text" not in header or (task == "seq_cls" and "label" not in header):
            needed = "text and label" if task == "seq_cls" else "text (and label, for classification)"
            pairs = (" Columns source and target are " + _PAIRS_ADVICE.format(joined='a column text of source + " " '
                                                                              "+ target")
                     if "text" not in header and any(f in header for f in SEQ2SEQ_FIELDS) else "")
            raise ConfigError(f"data file {path}: the header row names the columns {header}; it must name "
                              f"{needed}.{pairs}")
        for row in reader:
            _check_width(path, reader, row, delimiter)
            if row["text"] is None:  # a short row: DictReader fills the missing fields with None
                raise ConfigError(f"data file {path}, line {reader.line_num}: no text field; each row needs the "
                                  f"{len(header)} fields the header names.")
            record = {"text": _unquote(row["text"]) if tsv else row["text"]}
            label = row.get("label") or ""  # None: a short row; "": an empty cell. Neither is a label ("0" is)
            label = _unquote(label) if tsv else label
            if label:
                record["label"] = label
            rows.append((reader.line_num, record))
    except csv.Error as err:
        raise ConfigError(f"data file {path}, line {reader.line_num}: not valid {kind} ({err}).") from None
    labels = [r["label"] for _, r in rows if "label" in r]
    if labels and all(re.fullmatch(r"\s*-?\d+\s*", v) for v in labels):  # a table holds every cell as a string
        for _, record in rows:
            if "label" in record:
                record["label"] = int(record["label"])
    return rows


def _table_pairs(path: Path, reader: csv.DictReader, *, tsv: bool) -> list[tuple[int, dict]]:
    """(line number, {"source", "target"}) of each row of a table whose header names those columns."""
    header = reader.fieldnames or []
    missing = [name for name in SEQ2SEQ_FIELDS if name not in header]
    if missing:
        raise ConfigError(f"data file {path}: the header row names the columns {header}; sequence-to-sequence data "
                          "(task seq2seq_lm) needs the columns source and target.")
    rows = []
    for row in reader:
        _check_width(path, reader, row, "\t" if tsv else ",")
        record = _pair(path, reader.line_num, row, what="column")  # a short row leaves a field None
        rows.append((reader.line_num, {k: _unquote(v) for k, v in record.items()} if tsv else record))
    return rows


def _check_width(path: Path, reader: csv.DictReader, row: dict, delimiter: str) -> None:
    """Refuse a table row with more fields than its header names (DictReader keeps the extra ones under None)."""
    if None in row:
        header = reader.fieldnames or []
        raise ConfigError(f"data file {path}, line {reader.line_num}: {len(header) + len(row[None])} fields under a "
                          f"header of {len(header)}; " + ("a TSV text cannot hold a tab or a line break (save it as "
                          ".jsonl)." if delimiter == "\t" else f"quote a text that holds the delimiter ({delimiter!r}) "
                          "in double quotes."))


def _unquote(field: str) -> str:
    """A TSV field wrapped whole in double quotes, with "" for each quote inside (pandas' quoting), as its text."""
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in field[1:-1].replace('""', ""):
        return field[1:-1].replace('""', '"')
    return field


def label_ids(records: Sequence[Mapping], *, label2id: Mapping[str, int] | None = None,
              num_labels: int | None = None, min_labels: int = 0, source: str = "data"
              ) -> tuple[list[int], list[str]]:
    """Map the records' labels to ids; return the ids and the label names by id.

    The names' count is the classifier's size. One rule for both kinds of label: labels
    that are the model's own classes keep its head; labels that define a new set of
    classes get a new head.

    - Integer labels are class ids of the model's head, used as they are. The names are
      ``"0"`` … ``str(n - 1)`` with ``n = max(min_labels, max label + 1)``, so a head of
      ``min_labels`` classes that the labels fit is kept. With ``num_labels`` (a trained
      head of that size) a label ≥ ``num_labels`` is refused rather than the head replaced.
    - String labels go through ``label2id`` when given (the model's own label names;
      another name is refused), else they are a new label set, ids in sorted order.

    Parameters
    ----------
    records : sequence of mapping
        Records with a ``label``.
    label2id : mapping, optional
        Label name → id (the model's names, or the training labels for an eval file).
    num_labels : int, optional
        Fixed number of classes: integer labels must lie in ``[0, num_labels)``.
    min_labels : int
        Integer labels get at least this many classes (the model's configured ``num_labels``).
    source : str
        What the records came from, for errors.
    """
    raw = [r["label"] for r in records]
    if any(isinstance(v, bool) for v in raw):
        raise ConfigError(f"{source}: labels true/false are neither class ids nor names; write them as 0/1 or as "
                          "strings (\"yes\"/\"no\").")
    if all(isinstance(v, int) for v in raw):
        if min(raw) < 0:
            raise ConfigError(f"{source}: label {min(raw)} is negative; integer labels are class ids 0, 1, ….")
        count = max(raw) + 1
        if num_labels is not None and count > num_labels:
            raise ConfigError(f"{source}: label {max(raw)} is outside the model's {num_labels} classes "
                              f"(0…{num_labels - 1}): integer labels are ids of its trained classifier head, which is "
                              "kept, not replaced. To train a new head for other classes, write the labels as "
                              "strings, or start from a checkpoint without a classification head.")
        names = [str(i) for i in range(max(count, num_labels or 0, min_labels))]
        return list(raw), names
    if any(isinstance(v, int) for v in raw):
        raise ConfigError(f"{source}: labels mix integers and strings; use one kind.")
    if label2id:
        unknown = sorted({v for v in raw if v not in label2id})
        if unknown:
            raise ConfigError(f"{source}: label(s) {unknown[:5]} are not among the model's labels "
                              f"{sorted(label2id)[:10]}.")
        names = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
        return [int(label2id[v]) for v in raw], names
    names = sorted(set(raw))
    if len(names) < 2:
        raise ConfigError(f"{source}: every record has the label {names[0]!r}; classification needs at least two "
                          "classes (with one, transformers would train a regressor).")
    index = {name: i for i, name in enumerate(names)}
    return [index[v] for v in raw], names


# ---------------------------------------------------------------------------- tokenised data


@dataclass
class TokenizedData:
    """Examples as token-id lists, ready to batch.

    Attributes
    ----------
    ids : list of list of int
        One token-id list per example, each at most ``max_length`` long (``seq2seq_lm``: the
        source, the encoder's input).
    labels : list of int or None
        Class ids (``seq_cls``); None for language modelling.
    task : str
    pad_token_id : int
    max_length : int or None
        The length examples were cut at (:func:`tokenize` sets it).
    targets : list of list of int or None
        ``seq2seq_lm``: the target's token ids per example (at least one, at most
        ``max_length``), what the decoder learns to write; None for the other tasks.
    """

    ids: list[list[int]]
    labels: list[int] | None
    task: str
    pad_token_id: int
    max_length: int | None = None
    targets: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, fraction: float, *, seed: int, source: str = "data") -> tuple["TokenizedData", "TokenizedData"]:
        """(train, held-out) with ``fraction`` of the examples held out, by a seeded permutation.

        ``held_out_count(len(self), fraction)`` examples are held out: at least one, and at
        least one is left to train on. ``source`` names the data in errors.
        """
        n_eval = held_out_count(len(self), fraction, source=source)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self._subset(sorted(order[n_eval:])), self._subset(sorted(order[:n_eval]))

    def first(self, n: int) -> "TokenizedData":
        """The first ``n`` examples (all of them when there are fewer)."""
        return self._subset(list(range(min(n, len(self)))))

    def _subset(self, index: list[int]) -> "TokenizedData":
        labels = None if self.labels is None else [self.labels[i] for i in index]
        targets = None if self.targets is None else [self.targets[i] for i in index]
        return TokenizedData([self.ids[i] for i in index], labels, self.task, self.pad_token_id, self.max_length,
                             targets)


def held_out_count(n: int, fraction: float, *, source: str = "data") -> int:
    """Examples to hold out of ``n``: ``round(fraction·n)``, at least 1 and at most ``n − 1``.

    A tiny data set still gets one eval and one train example (``round`` alone holds out
    none of 2–4 examples at the default 0.1). Half-way cases round to even, as Python does.

    Raises
    ------
    ConfigError
        ``fraction`` outside (0, 1), or fewer than 2 examples (nothing left to train on).
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"eval_fraction {fraction} must lie in (0, 1) to hold out part of {source}.")
    if n < 2:
        raise ConfigError(f"eval_fraction {fraction}: {source} holds {n} example, too few to hold one out and "
                          "train on the rest; pass eval data (--eval-data), or set eval_fraction to 0 "
                          "(--eval-fraction 0) to train without evaluation.")
    return min(max(1, round(fraction * n)), n - 1)


def tokenize(records: Sequence[Mapping], tokenizer, *, task: str, max_length: int,
             labels: Sequence[int] | None = None) -> TokenizedData:
    """Tokenise records: cut text streams into ``max_length`` blocks, truncate the rest.

    A record is truncated by the checkpoint's tokenizer (its own ``truncation=True``), so the
    special tokens it adds stay: BERT's closing ``[SEP]``, T5's and BART's ``</s>``.
    ``seq2seq_lm`` truncates source and target (``text_target``) to ``max_length`` tokens each
    and drops a record whose target has no token (nothing to learn to write); an empty source is one
    padding token, as an empty classification text is.

    Parameters
    ----------
    records : sequence of mapping
        From :func:`read_records`.
    tokenizer : ByteTokenizer or the checkpoint's tokenizer (see :func:`load_tokenizer`)
    task : {"causal_lm", "seq_cls", "seq2seq_lm"}
    max_length : int
        Tokens per example; for a model, :func:`resolve_max_length` gives the length it can take.
    labels : sequence of int, optional
        Class ids for ``seq_cls`` (from :func:`label_ids`).
    """
    check_task(task, auto=False)
    if max_length < 2:
        raise ConfigError(f"max_length {max_length}: need at least 2 tokens per example.")
    if task == "seq2seq_lm":
        return _tokenize_pairs(records, tokenizer, max_length=max_length)
    if seq2seq_records(records):
        raise ConfigError(f"task {task}: the records are source/target pairs, which task seq2seq_lm trains (an "
                          "encoder-decoder); give text records for this task.")
    ids: list[list[int]] = []
    for record in records:
        # a stream is cut into blocks below; a record is cut by the tokenizer, which keeps its special tokens
        tokens = tokenizer.encode(record["text"], max_length=None if record.get("stream") else max_length)
        if record.get("stream"):
            # a text file: one stream, cut into blocks; a short tail (< 2 tokens) cannot be trained on
            ids += [tokens[i:i + max_length] for i in range(0, len(tokens), max_length)
                    if len(tokens[i:i + max_length]) >= 2]
        elif task == "seq_cls":
            ids.append(tokens or [tokenizer.pad_token_id])
        elif len(tokens) >= 2:  # language modelling needs a next token to predict
            ids.append(tokens)
    if task == "seq_cls" and (labels is None or len(labels) != len(ids)):
        raise ConfigError("classification data needs one label per record.")
    if not ids:
        raise ConfigError("the data tokenises to no example of at least 2 tokens; add text.")
    return TokenizedData(ids, list(labels) if labels is not None else None, task, tokenizer.pad_token_id, max_length)


def _tokenize_pairs(records: Sequence[Mapping], tokenizer, *, max_length: int) -> TokenizedData:
    """:func:`tokenize` of source/target pairs."""
    if not seq2seq_records(records):
        raise ConfigError('task seq2seq_lm: the records hold no "source" and "target" pairs; an encoder-decoder '
                          f"learns to write a target from a source: pass {SEQ2SEQ_FORMAT}.")
    ids, targets = [], []
    for record in records:
        target = tokenizer.encode(record["target"], max_length=max_length, target=True)  # ends with </s> (T5, BART)
        if target:
            ids.append(tokenizer.encode(record["source"], max_length=max_length) or [tokenizer.pad_token_id])
            targets.append(target)
    if not ids:
        raise ConfigError("the data tokenises to no example with a target token; add target text.")
    return TokenizedData(ids, None, "seq2seq_lm", tokenizer.pad_token_id, max_length, targets)


LENGTH_GROUP = 8  # batches per length-sorted group: 2× fewer padded tokens than random batches on short texts


def batch_indices(data: TokenizedData, batch_size: int, *, generator: torch.Generator | None = None,
                  by_length: bool = False) -> list[list[int]]:
    """Example indices of each batch.

    Parameters
    ----------
    data : TokenizedData
    batch_size : int
    generator : torch.Generator, optional
        Shuffles the examples (training); None keeps their order (evaluation).
    by_length : bool
        Put examples of similar length (:func:`example_lengths`) together, so a batch pads
        less. When shuffling, each run of ``LENGTH_GROUP`` batches is sorted by length and
        the batches of the epoch are then shuffled (the length-grouped sampling of Hugging
        Face's ``group_by_length``, with groups small enough that batches stay mixed in
        content); otherwise every example is sorted by length (for sums over examples, which
        the order does not change).

    Returns
    -------
    list of list of int
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be ≥ 1.")
    n = len(data)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    if not by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    length = example_lengths(data)
    if generator is None:
        order.sort(key=length.__getitem__)
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    group = LENGTH_GROUP * batch_size
    out = []
    for g in range(0, n, group):
        run = sorted(order[g:g + group], key=length.__getitem__)
        out += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def example_lengths(data: TokenizedData) -> list[int]:
    """The length each example is sorted by when batches are grouped by length (:func:`batch_indices`).

    The tokens of a text; for ``seq2seq_lm``, the longer of the source and the target,
    ``max(S, T)``. A batch pads its sources to the widest source and its targets to the
    widest target, so it pads little when both widths are close to each example's own;
    examples of similar ``max(S, T)`` have both sides under the batch's largest key. The
    source alone (Hugging Face's ``group_by_length`` reads ``input_ids`` only) leaves the
    targets in random order, which is most of the padding where targets vary more than
    sources (short prompts, long answers); the sum ``S + T`` puts a long source with a short
    target beside a short source with a long target, each padding the other's short side.
    Sorting by ``max(S, T)`` is no help only where the two lengths are anti-correlated (long
    sources have short targets and the reverse, in one data set), where the source alone
    sorts both.
    """
    if data.targets is None:
        return [len(ids) for ids in data.ids]
    return [max(len(source), len(target)) for source, target in zip(data.ids, data.targets)]


def collate(data: TokenizedData, index: Sequence[int]) -> dict[str, torch.Tensor]:
    """One batch of the examples ``index``, right-padded to its own longest example.

    Keys: ``input_ids`` and ``attention_mask`` (B, T), and ``labels``: (B, T) token
    targets with padding set to -100 for ``causal_lm`` (the model shifts them), (B,)
    class ids for ``seq_cls``. ``seq2seq_lm``: ``input_ids`` and ``attention_mask`` are the
    source's (B, S), ``labels`` the target's ids (B, T) with padding -100, from which the
    model builds its decoder inputs (shifted right; :func:`model_inputs`), and ``decoder_attention_mask`` (B, T)
    marks the target tokens (it changes no real position's output under the decoder's
    causal mask: padding follows every real token).
    """
    width = max(len(data.ids[i]) for i in index)
    input_ids = torch.full((len(index), width), data.pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(index), width), dtype=torch.long)  # (B, T)
    for row, i in enumerate(index):
        seq = data.ids[i]
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    if data.task == "seq2seq_lm":
        width = max(len(data.targets[i]) for i in index)
        labels = torch.full((len(index), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, i in enumerate(index):
            labels[row, :len(data.targets[i])] = torch.tensor(data.targets[i], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "decoder_attention_mask": (labels != IGNORE_INDEX).long()}
    if data.task == "causal_lm":
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # (B, T)
    else:
        labels = torch.tensor([data.labels[i] for i in index], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def model_inputs(batch: Mapping[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``model``'s forward pass that returns the logits of a :func:`collate` batch.

    A decoder-only model or a classifier reads ``input_ids`` and ``attention_mask``. An
    encoder–decoder (a batch with ``decoder_attention_mask``) also reads its decoder's
    inputs, the target shifted right, built by the model's own
    ``prepare_decoder_input_ids_from_labels`` (what its forward does with ``labels``: T5 and
    BART put ``decoder_start_token_id`` first, mBART the target's last token, its language
    id), so the logits are those of a forward given the labels, without the loss it would
    compute and nobody reads (a (B, T, V) cross-entropy per eval batch). A model without
    that method (M2M100, Blenderbot) is given the labels, and builds its inputs and a loss.
    The training loss (``model(**batch).loss``) passes the whole batch instead.

    Parameters
    ----------
    batch : mapping
        From :func:`collate`.
    model : torch.nn.Module
        The model (or PEFT model) the batch is for.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if DECODER_MASK in batch:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            inputs["labels"] = batch["labels"]
        else:
            inputs["decoder_input_ids"] = prepare(labels=batch["labels"])  # (B, T)
        inputs[DECODER_MASK] = batch[DECODER_MASK]
    return inputs


def predicted_targets(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) paired position by position: the prediction of each target token and the token.

    Causal LM: position t predicts token t + 1, so (B, T-1, V) and (B, T-1). Sequence to
    sequence (a batch with ``decoder_attention_mask``): the decoder's position t already
    predicts target token t (its inputs are the targets shifted right), so both as they
    are, (B, T, V) and (B, T). Padding keeps the label -100.
    """
    labels = batch["labels"]
    if DECODER_MASK in batch:
        return logits, labels
    return logits[:, :-1], labels[:, 1:]


def batches(data: TokenizedData, batch_size: int, *, generator: torch.Generator | None = None,
            by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``data``: :func:`collate` of each index list of :func:`batch_indices`."""
    for index in batch_indices(data, batch_size, generator=generator, by_length=by_length):
        yield collate(data, index)


def check_task(task: str, *, option: str = "task", auto: bool = True) -> None:
    """Refuse a task that is not one of :data:`TASKS`, or ``auto`` where ``auto`` is allowed.

    The one check of the option: the configs (``TrainConfig``, ``VerifyConfig``,
    ``CalibrationConfig``, ``SweepConfig``) and :func:`read_records` take ``auto``;
    :func:`tokenize` needs the task decided (``auto=False``).

    Parameters
    ----------
    task : str
    option : str
        How the user set it, for the error: ``task (--task)``, ``calibration task``.
    auto : bool
        Whether ``auto`` (decided later from the model and the data) is allowed.

    Raises
    ------
    ConfigError
        Naming the option, the value and the tasks allowed.
    """
    allowed = (("auto",) if auto else ()) + TASKS
    if task not in allowed:
        raise ConfigError(f"{option} {task!r} is not {', '.join(allowed[:-1])} or {allowed[-1]}.")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 "
                          f"and pass {DATA_FORMATS}.") from None


# ---------------------------------------------------------------------------- one call


def prepare_tokenizer(model_dir: str | Path, *, task: str, max_length: int | None,
                      option: str = "max_length (--max-length)", notes: list[str] | None = None):
    """What tokenising for the model in ``model_dir`` takes: its config, the tokens per example, its tokenizer.

    Training and calibration data (:func:`prepare_data`, ``collect_calibration``) and
    verification's eval data are all tokenised through this one call.

    Parameters
    ----------
    model_dir : str or path
        Local model directory with ``config.json`` (and a tokenizer if it ships one).
    task : {"causal_lm", "seq_cls", "seq2seq_lm"}
        As :func:`load_tokenizer` takes it.
    max_length : int or None
        The length asked for, resolved against the model's positions by :func:`resolve_max_length`.
    option : str
        How the user set ``max_length``, for its error and the notes (which start with it).
    notes : list of str, optional
        Receives the notes of :func:`resolve_max_length`.

    Returns
    -------
    model_config : dict
        The model's ``config.json``.
    max_length : int
        Tokens per example.
    tokenizer
        The checkpoint's tokenizer, or a :class:`ByteTokenizer` of its :func:`vocab_size`.
    """
    folder = Path(model_dir)
    model_config = read_model_config(folder)
    max_length = resolve_max_length(max_length, model_config, option=option, notes=notes)
    eos = model_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # some configs list several; the first ends a text
    return model_config, max_length, load_tokenizer(folder, vocab_size=vocab_size(model_config), task=task,
                                                    eos_token_id=eos, model_type=model_config.get("model_type"))


def read_model_config(model_dir: str | Path) -> dict:
    """The ``config.json`` of a model directory, as a dict."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def vocab_size(model_config: Mapping) -> int | None:
    """The token ids a model embeds: the config's ``vocab_size``, else its ``text_config``'s, else None.

    A multimodal config (Gemma 3's ``Gemma3ForConditionalGeneration``) keeps the language
    model's ``vocab_size`` in ``text_config`` only; the top level's wins where both have one.
    """
    for scope in (model_config, model_config.get("text_config") or {}):
        value = scope.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def resolve_task(task: str, model_config: Mapping, records: Sequence[Mapping] | None, *, data, model) -> str:
    """The task of ``records`` for the model of ``model_config``; ``auto`` decided.

    ``auto``: ``seq2seq_lm`` for an encoder–decoder (``is_encoder_decoder`` in its
    config.json: T5, BART), else ``seq_cls`` when the records are labelled, else ``causal_lm``.
    Called before the data is read (``records`` None), it decides only the first, so the
    file is read as the model needs it (:func:`read_records`), and refuses ``seq2seq_lm``
    for a model that is no encoder–decoder.

    Raises
    ------
    ConfigError
        Task ``seq2seq_lm``, or source/target records, for a model that is no encoder–decoder
        (naming the data file, the model and its ``model_type``).
    """
    pairs = records is not None and seq2seq_records(records)
    if (pairs or task == "seq2seq_lm") and not model_config.get("is_encoder_decoder"):
        what = (f"data file {data} holds source/target records (sequence-to-sequence)" if pairs
                else "task seq2seq_lm (--task seq2seq_lm) is for an encoder-decoder")
        raise ConfigError(f"{what}, but {model} is no encoder-decoder (model_type {model_config.get('model_type')!r}; "
                          "its config.json does not set is_encoder_decoder): a decoder-only model or an encoder "
                          "reads one text. Give it {\"text\": ...} records (and \"label\", for classification), "
                          "each source and target joined into one text, or use an encoder-decoder such as T5 or BART "
                          "for source/target pairs.")
    if task == "auto" and model_config.get("is_encoder_decoder"):
        return "seq2seq_lm"  # an encoder-decoder reads its records as source/target pairs
    if task == "auto" and records is not None:
        return "seq_cls" if "label" in records[0] else "causal_lm"
    return task


def prepare_data(model_dir: str | Path, data, *, task: str = "auto", max_length: int | None = None, eval_data=None,
                 eval_fraction: float = 0.0, seed: int = 0, notes: list[str] | None = None):
    """Read and tokenise training data (and eval data) for the model in ``model_dir``.

    Parameters
    ----------
    model_dir : str or path
        Local model directory (config.json, and a tokenizer if it ships one).
    data : str or path
        Training data file.
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        ``auto``: ``seq2seq_lm`` for an encoder–decoder (see :func:`resolve_task`), else
        classification when every record has a ``label``, language modelling when none has;
        a file with some labels is refused (see :func:`read_records`). Source/target records
        for a model that is no encoder–decoder are refused.
    max_length : int, optional
        Tokens per example; None: :data:`DEFAULT_MAX_LENGTH`, or the model's position limit
        when shorter. A length beyond a table of positions (learned or fixed) is refused (see
        :func:`resolve_max_length`); the data records the length used (``max_length``).
    eval_data : str or path, optional
        Held-out data; otherwise ``eval_fraction`` of ``data`` is held out (0: none).
    eval_fraction : float
        Share of the examples held out when there is no ``eval_data``: at least one, and at
        least one left to train on (:func:`held_out_count`); data of a single example is
        refused unless this is 0.
    seed : int
        Seed of the held-out split.
    notes : list of str, optional
        Receives the notes of :func:`resolve_max_length` (the default cut to the model's limit).

    Returns
    -------
    task : str
    train : TokenizedData
    held_out : TokenizedData or None
    label_names : list of str or None
        The classifier's classes by id (see :func:`label_ids`): a checkpoint saved as a
        sequence classifier keeps its head when integer labels fit it and refuses labels
        beyond it; a base model's new head has ``max(configured num_labels, max label + 1)``
        classes.
    tokenizer
    """
    model_config = read_model_config(model_dir)
    task = resolve_task(task, model_config, None, data=data, model=model_dir)  # how to read the file
    records = read_records(data, task=task)  # auto: every record labelled, or none (a mix is refused)
    task = resolve_task(task, model_config, records, data=data, model=model_dir)
    model_config, max_length, tokenizer = prepare_tokenizer(model_dir, task=task, max_length=max_length, notes=notes)
    names = None
    labels = None
    if task == "seq_cls":
        classes = configured_labels(model_config)
        # integer labels index the head: a trained head fixes their range, a new one grows to fit them
        labels, names = label_ids(records, label2id=model_label2id(model_config), source=str(data),
                                  num_labels=classes if has_classifier(model_config) else None, min_labels=classes)
    train = tokenize(records, tokenizer, task=task, max_length=max_length, labels=labels)
    held_out = None
    if eval_data is not None:
        held_out = tokenize_file(eval_data, tokenizer, task=task, max_length=max_length, label_names=names)
    elif eval_fraction > 0:
        train, held_out = train.split(eval_fraction, seed=seed, source=f"data file {data}")
    return task, train, held_out, names, tokenizer


def tokenize_file(path, tokenizer, *, task: str, max_length: int, label_names: Sequence[str] | None = None
                  ) -> TokenizedData:
    """Tokenise an eval file, mapping string labels through ``label_names`` (the training labels).

    Raises
    ------
    ConfigError
        A label that is not one of ``label_names`` (by name, or by id for an integer).
    """
    records = read_records(path, task=task)
    labels = None
    if task == "seq_cls":  # string labels go through the training names, "0", "1", … included
        mapping = None
        if label_names is not None:
            _check_trained_classes(records, label_names, source=str(path))
            mapping = {n: i for i, n in enumerate(label_names)}
        labels, _ = label_ids(records, label2id=mapping, source=str(path))
    return tokenize(records, tokenizer, task=task, max_length=max_length, labels=labels)


def _check_trained_classes(records: Sequence[Mapping], label_names: Sequence[str], *, source: str) -> None:
    """Refuse an eval label that is not a class of training: a name of ``label_names``, or an id below its length.

    Whatever the head (the checkpoint's, or one new to a bare base), it has outputs for
    these classes only, so the label is what is wrong, and the message says so.
    """
    for record in records:
        value = record["label"]
        known = value in label_names if isinstance(value, str) else 0 <= value < len(label_names)
        if not known:
            shown = ", ".join(label_names[:10]) + (", …" if len(label_names) > 10 else "")
            raise ConfigError(f"{source}: label {value!r} is not among the {len(label_names)} classes seen in "
                              f"training ({shown}); eval data must use the training data's labels.")


def model_label2id(model_config: Mapping) -> dict[str, int] | None:
    """A config's ``label2id`` when it names real labels (not transformers' LABEL_0, LABEL_1 defaults)."""
    label2id = model_config.get("label2id")
    if not label2id or all(str(k).startswith("LABEL_") for k in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}


def has_classifier(model_config: Mapping) -> bool:
    """Whether the checkpoint was saved as a sequence classifier, so holds a trained head.

    Read from ``architectures`` (``BertForSequenceClassification``, …), which
    ``save_pretrained`` writes; a base model (``BertModel``, ``LlamaForCausalLM``) has none.
    """
    return any(str(a).endswith("ForSequenceClassification") for a in model_config.get("architectures") or ())
