"""An adapter saving a classifier head of another class count says which num_labels to build the model with.

What was wrong (audit s21, item 1): `extract --modules-to-save pre_classifier,classifier` of a DistilBERT classifier
fine-tuned with 3 labels from a DistilBertForMaskedLM (its config: transformers' default of 2), said to load onto a DistilBertForSequenceClassification built from
BASE, which PEFT refuses (classifier 3×32 in the adapter, 2×32 in the model). The result now carries TUNED's class
count (``num_labels``), and the model built with it loads the adapter. References: the fine-tuned model's own logits;
the control is the model built from BASE's config as it is, which PEFT refuses, and a pair of one class count, whose
result asks for nothing.
"""

from __future__ import annotations

import pytest
import torch

from spectra.lora.extract import extract_adapter


def _classifier_pair(root, *, tuned_labels: int):
    """A tiny DistilBertForMaskedLM (its config 2 classes, transformers' default) and a classifier fine-tuned from
    it with `tuned_labels` classes: the body's attention and MLP moved by a rank-2 update each, a new head."""
    import transformers as tf

    def config(**labels):
        return tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                   max_position_embeddings=32, **labels)

    torch.manual_seed(0)
    base = tf.DistilBertForMaskedLM(config()).eval()
    base.save_pretrained(root / "base")
    tuned = tf.DistilBertForSequenceClassification(config(num_labels=tuned_labels)).eval()  # its own head
    tuned.distilbert.load_state_dict(base.distilbert.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in tuned.distilbert.named_modules():
            if isinstance(module, torch.nn.Linear):
                out_features, in_features = module.weight.shape
                module.weight += 0.05 * (torch.randn(out_features, 2, generator=gen)
                                         @ torch.randn(2, in_features, generator=gen))
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", tuned


def _inputs():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


def test_a_head_of_more_classes_asks_for_num_labels(tmp_path):
    import transformers as tf
    from peft import PeftModel

    base, tuned, fine_tuned = _classifier_pair(tmp_path, tuned_labels=3)
    result = extract_adapter(base, tuned, "full", tmp_path / "ad", modules_to_save=("pre_classifier", "classifier"),
                             progress=False)
    assert (result.model_class, result.num_labels) == ("DistilBertForSequenceClassification", 3)
    assert not any("modules_to_save:" in n and "TUNED" in n for n in result.notes)  # num_labels fits every tensor
    # the control: built from BASE's config as it is (2 classes), PEFT refuses the saved 3×32 classifier
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(tf.DistilBertForSequenceClassification.from_pretrained(base), tmp_path / "ad")
    model = tf.DistilBertForSequenceClassification.from_pretrained(base, num_labels=result.num_labels)
    model = PeftModel.from_pretrained(model, tmp_path / "ad").eval()
    x = _inputs()
    with torch.no_grad():
        got, want = model(input_ids=x).logits, fine_tuned(input_ids=x).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_head_of_the_base_configs_classes_asks_for_nothing(tmp_path):
    base, tuned, _ = _classifier_pair(tmp_path, tuned_labels=2)
    result = extract_adapter(base, tuned, "full", tmp_path / "ad", modules_to_save=("pre_classifier", "classifier"),
                             progress=False)
    assert result.num_labels is None


def test_a_head_no_num_labels_fits_gets_a_note(tmp_path):
    """A TUNED config.json that says 2 classes beside a 3×32 classifier: no num_labels read off the configs fits, so
    nothing is asked for and a note names the tensor and both shapes."""
    import json

    base, tuned, _ = _classifier_pair(tmp_path, tuned_labels=3)
    config = json.loads((tuned / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "LABEL_0", "1": "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    (tuned / "config.json").write_text(json.dumps(config))
    result = extract_adapter(base, tuned, "full", tmp_path / "ad", modules_to_save=("pre_classifier", "classifier"),
                             progress=False)
    assert result.num_labels is None
    (note,) = [n for n in result.notes if n.startswith("modules_to_save: classifier.")]
    assert "is 3×32 in TUNED but 2×32 in a DistilBertForSequenceClassification built from the base's config" in note
