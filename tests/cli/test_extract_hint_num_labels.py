"""`spectra extract`'s load hint, followed as printed, loads an adapter whose saved head has TUNED's class count.

What was wrong (audit s21, item 1): the hint said "load onto a DistilBertForSequenceClassification with
PeftModel.from_pretrained(model, …)" for a classifier fine-tuned with 3 labels from a base whose config has 2; built
from BASE as it is, PEFT refuses the saved 3×32 classifier. The hint now names num_labels and the call that builds the
model. The reference is the fine-tuned model's own logits; a fine-tune of the base config's class count gets no
num_labels (the control).
"""

from __future__ import annotations

import re

import torch
from typer.testing import CliRunner

from spectra.cli import app
from tests.lora.test_extract_head_num_labels import _classifier_pair, _inputs


def _extract(base, tuned, out) -> str:
    run = CliRunner().invoke(app, ["extract", str(base), str(tuned), "--rank", "full", "--modules-to-save",
                                   "pre_classifier,classifier", "-o", str(out), "-q"], env={"COLUMNS": "1000"})
    assert run.exit_code == 0, run.output
    return run.output


def test_following_the_printed_hint_gives_the_fine_tune(tmp_path):
    import transformers as tf
    from peft import PeftModel

    base, tuned, fine_tuned = _classifier_pair(tmp_path, tuned_labels=3)
    output = _extract(base, tuned, tmp_path / "ad")
    built = re.search(r"built with the fine-tune's classes, (\w+)\.from_pretrained\('([^']+)', num_labels=(\d+), "
                      r"ignore_mismatched_sizes=True\),",
                      output)
    assert built, output
    cls, path, labels = built.groups()
    (adapter,) = re.findall(r"with peft\.PeftModel\.from_pretrained\(model, '([^']+)'\)\)", output)
    assert (cls, path, labels) == ("DistilBertForSequenceClassification", str(base), "3")
    model = getattr(tf, cls).from_pretrained(path, num_labels=int(labels), ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(model, adapter).eval()
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, fine_tuned(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_a_head_of_the_base_configs_classes_gets_the_plain_hint(tmp_path):
    base, tuned, _ = _classifier_pair(tmp_path, tuned_labels=2)
    output = _extract(base, tuned, tmp_path / "ad")
    assert "num_labels" not in output
    assert "(load onto a DistilBertForSequenceClassification with peft.PeftModel.from_pretrained(model, " in output
