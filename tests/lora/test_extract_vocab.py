"""extract on a fine-tune whose vocabulary was resized: what the adapter holds, and the model it loads onto."""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.models import build_model, resized_bert_mlm, save
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """A Llama of 64 tokens and its fine-tune with 16 tokens added (resize_token_embeddings) and every matrix moved."""
    root = tmp_path_factory.mktemp("resized")
    base = build_model("llama")
    vocab = base.get_input_embeddings().weight.shape[0]
    tuned = copy.deepcopy(base)
    tuned.resize_token_embeddings(vocab + 16, mean_resizing=False)
    tuned = perturbed(tuned, seed=1)
    return base, tuned, vocab, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def _load(model, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))


def test_a_lora_of_the_resized_embedding_says_it_covers_the_shared_rows(resized, tmp_path):
    """The embedding LoRA covered the shared rows only and the added rows were dropped with no note."""
    base, tuned, vocab, b, t = resized
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q", "embed"), progress=False)
    assert result.vocab_size is None
    embed = [n for n in result.notes if n.startswith("model.embed_tokens:")]
    assert embed and f"the LoRA covers the {vocab} shared rows" in embed[0] and "16 rows added in TUNED" in embed[0]
    assert any(n.startswith("lm_head:") and "not in the adapter" in n for n in result.notes)
    merged = _load(base, tmp_path / "ad").merge_and_unload()  # onto the base as it is: the shared rows, exact
    torch.testing.assert_close(merged.get_input_embeddings().weight, tuned.get_input_embeddings().weight[:vocab],
                               rtol=1e-5, atol=2e-6)
    grown = copy.deepcopy(base)
    grown.resize_token_embeddings(vocab + 16)
    with pytest.raises(RuntimeError, match="size mismatch"):  # negative control: not onto the resized model
        _load(grown, tmp_path / "ad")


def test_modules_saved_whole_from_a_resized_vocabulary_load_after_resizing(resized, tmp_path):
    """--modules-to-save embed_tokens,lm_head: the printed hint (PeftModel.from_pretrained(model, …)) failed unless
    the user first called resize_token_embeddings(N); the result and the hint now name N."""
    base, tuned, vocab, b, t = resized
    result = extract_adapter(b, t, 2, tmp_path / "ad", modules_to_save=("embed_tokens", "lm_head"), progress=False)
    assert result.vocab_size == vocab + 16
    assert sum(f"resize_token_embeddings({vocab + 16})" in n for n in result.notes) == 2
    with pytest.raises(RuntimeError, match="size mismatch"):  # negative control: the base as it is refuses it
        _load(base, tmp_path / "ad")
    grown = copy.deepcopy(base)
    grown.resize_token_embeddings(result.vocab_size)
    model = _load(grown, tmp_path / "ad")
    for get in ("get_input_embeddings", "get_output_embeddings"):  # TUNED's rows, all of them
        torch.testing.assert_close(getattr(model, get)().weight, getattr(tuned, get)().weight)


def test_a_lora_and_a_saved_matrix_of_a_resized_vocabulary_are_refused(resized, tmp_path, monkeypatch, capsys):
    """A LoRA over the base's rows and a saved head of TUNED's rows load onto no model: refused before any work."""
    *_, b, t = resized
    with pytest.raises(ConfigError, match="no model loads both"):
        extract_adapter(b, t, 2, tmp_path / "ad", roles=("q", "embed"), modules_to_save=("lm_head",), progress=False)
    assert not (tmp_path / "ad").exists()
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "--modules-to-save",
                         "embed_tokens,lm_head", "-q", "-o", tmp_path / "cli")
    assert code == 0, err
    assert "resized to the fine-tune's vocabulary, model.resize_token_embeddings(80)" in out
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "-q", "-o", tmp_path / "plain")
    assert code == 0 and "resize_token_embeddings" not in out and "--modules-to-save holds the whole" in err, err


@pytest.mark.parametrize("moved", [True, False])
def test_a_resized_vocabulary_bias_that_changed_is_left_out(tmp_path, moved):
    """BERT's cls.predictions.bias, resized with the vocabulary (paired over its shared entries), is a vector no LoRA
    holds: moved, it is named as left out and the adapter is not complete (the exemption of a resized vocabulary's
    matrices, which _resized_vocabulary's notes cover, had let "lossless" be printed without it). Control: unmoved,
    nothing is left out and the embedding saved whole makes the adapter complete."""
    pair = resized_bert_mlm(tmp_path, bias=moved)
    result = extract_adapter(pair.base, pair.tuned, "full", tmp_path / "ad", roles=("q",),
                             modules_to_save=("word_embeddings",), progress=False)
    assert result.left_out_vectors == (["cls.predictions.bias"] if moved else [])
    assert result.complete is not moved and result.vocab_size == 108
    assert any(n.startswith("rank full is not lossless") and "cls.predictions.bias" in n
               for n in result.notes) is moved
