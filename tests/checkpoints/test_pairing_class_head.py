"""A classifier fine-tuned into another class count: its head is set aside, every other tensor analysed.

What was wrong (session 21): a sequence classifier of 2 labels fine-tuned into 3 (the head re-initialised) was refused
whole by `spectra analyze` on ``classifier.bias`` ((2,) vs (3,)), while ``classifier.weight`` alone would have been
paired as a "resized vocabulary", ΔW over 2 rows that are not updates of the base's. The head (weight and bias) is now
left out with a note naming both tensors and both shapes, listed "only in" BASE and TUNED as a head new in TUNED is,
and the adapter carries it saved whole. References: float64 numpy differences of the stored tensors; the fine-tuned
model's own logits (transformers). Controls: a non-head weight of another shape is still refused naming the tensor;
from_pretrained(BASE, num_labels=3) without ignore_mismatched_sizes fails on BASE's own 2-class head.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.errors import PairingError
from tests.cli.test_cli import run

_KINDS = ("distilbert", "bert")


def class_pair(root, kind: str, *, base_labels: int | None = 2, tuned_labels: int = 3, scale: float = 0.02):
    """A tiny `kind` (distilbert/bert) sequence classifier of `base_labels` classes (None: DistilBertForMaskedLM, no
    head) and one fine-tuned from it into `tuned_labels` classes: every Linear of the body moved by a rank-2 update,
    a new head. Returns (base dir, tuned dir, the fine-tuned model)."""
    import transformers as tf

    if kind == "distilbert":
        def config(**labels):
            return tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                       max_position_embeddings=32, **labels)
        cls, body = tf.DistilBertForSequenceClassification, "distilbert"
    else:
        def config(**labels):
            return tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=32, **labels)
        cls, body = tf.BertForSequenceClassification, "bert"
    torch.manual_seed(0)
    base = (tf.DistilBertForMaskedLM(config()) if base_labels is None else cls(config(num_labels=base_labels))).eval()
    base.save_pretrained(root / "base")
    tuned = cls(config(num_labels=tuned_labels)).eval()
    getattr(tuned, body).load_state_dict(getattr(base, body).state_dict())
    if kind == "distilbert" and base_labels is not None:
        tuned.pre_classifier.load_state_dict(base.pre_classifier.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in getattr(tuned, body).modules():
            if isinstance(module, torch.nn.Linear):
                out_features, in_features = module.weight.shape
                module.weight += scale * (torch.randn(out_features, 2, generator=gen)
                                          @ torch.randn(2, in_features, generator=gen))
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", tuned


def _note(pairing) -> str:
    (note,) = [n for n in pairing.notes if n.startswith("classifier: a classification head")]
    return note


@pytest.mark.parametrize("kind", _KINDS)
def test_every_other_delta_is_the_float64_difference_and_the_head_is_named(tmp_path, kind):
    base, tuned, _ = class_pair(tmp_path, kind)
    pairing = Pairing(base, tuned, PairingOptions(dtype="float64"))
    note = _note(pairing)
    for part in ("2 classes in BASE and 3 in TUNED", "classifier.weight (2, 32) in BASE, (3, 32) in TUNED",
                 "classifier.bias (2,) in BASE, (3,) in TUNED", "no ΔW", "modules_to_save=classifier"):
        assert part in note, note
    assert sorted(pairing.only_in_base) == sorted(pairing.only_in_tuned) == ["classifier.bias", "classifier.weight"]
    b, t = load_numpy(base / "model.safetensors"), load_numpy(tuned / "model.safetensors")
    records = list(pairing)
    assert not any(r.name.startswith("classifier") for r in records)
    paired = {r.base_tensor for r in records}
    assert paired == set(b) - {"classifier.weight", "classifier.bias"}, sorted(set(b) ^ paired)
    moved = 0
    for r in records:
        want = t[r.base_tensor].astype(np.float64) - b[r.base_tensor].astype(np.float64)
        assert r.added_rows == 0
        np.testing.assert_array_equal(r.delta.numpy(), want.reshape(r.delta.shape), err_msg=r.name)
        moved += bool(np.any(want))
    assert moved >= 12  # the body's attention and MLP matrices


def test_a_non_head_weight_of_another_shape_is_still_refused(tmp_path):
    base, tuned, _ = class_pair(tmp_path, "distilbert")
    state = load_file(tuned / "model.safetensors")
    name = "distilbert.transformer.layer.0.ffn.lin1.weight"
    state[name] = torch.zeros(40, 32)  # another model's MLP
    save_file(state, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PairingError, match=rf"tensor {name} has shape \(48, 32\) .* but \(40, 32\)"):
        Pairing(base, tuned)


def test_a_resized_vocabulary_is_still_paired_over_its_shared_rows(tmp_path):
    """Control of the rule that tells a class head from a vocabulary: an untied LM head with the embedding's rows
    (GPT-2's lm_head, 64 rows, 8 added in TUNED) stays a resized vocabulary, paired over its shared rows."""
    import transformers as tf

    config = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    model.save_pretrained(tmp_path / "tuned")
    pairing = Pairing(tmp_path / "base", tmp_path / "tuned")
    assert not any(n.startswith("classifier") or "classification head" in n for n in pairing.notes)
    assert any(n.startswith("lm_head: vocabulary resized, 8 rows added") for n in pairing.notes), pairing.notes
    assert {e.name: e.added_rows for e in pairing.entries}["lm_head"] == 8


@pytest.mark.parametrize("kind", _KINDS)
def test_analyze_recommend_extract_give_the_tuned_logits(tmp_path, kind, monkeypatch, capsys):
    import transformers as tf
    from peft import PeftModel

    base, tuned, fine_tuned = class_pair(tmp_path, kind)
    code, out, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "-o", tmp_path / "an")
    assert code == 0, err
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    text = json.dumps(analysis)
    assert "classification head of 2 classes in BASE and 3 in TUNED" in text
    assert not any(m["name"].startswith("classifier") for m in analysis["modules"])
    code, out, err = run(monkeypatch, capsys, "recommend", tmp_path / "an", "-o", tmp_path / "plan.json")
    assert code == 0, err
    saved = "pre_classifier,classifier" if kind == "distilbert" else "classifier"
    code, out, err = run(monkeypatch, capsys, "extract", base, tuned, "--plan", tmp_path / "plan.json",
                         "--modules-to-save", saved, "-o", tmp_path / "ad")
    assert code == 0, err
    assert "num_labels=3" in out, out  # the load hint
    cls = getattr(tf, json.loads((tuned / "config.json").read_text())["architectures"][0])
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # BASE stores its own 2-class head
        cls.from_pretrained(base, num_labels=3)
    model = cls.from_pretrained(base, num_labels=3, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(model, tmp_path / "ad").eval()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(input_ids=x).logits, fine_tuned(input_ids=x).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
