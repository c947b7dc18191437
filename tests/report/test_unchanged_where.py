"""`spectra analyze` names the unchanged matrices it leaves out, each where it lies.

What was wrong (audit s21, item 2): a DistilBERT classifier fine-tune leaving its two embeddings and layer 1's v_lin
unchanged printed "3 unchanged matrices are left out (ΔW = 0; every embed, pos_embed matrix)": only the roles with no
changed matrix were named, which read as if all three were embeddings. The reference is the pair as built: which
Linear weights the fine-tune left alone. The control leaves v_lin alone in no layer.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from spectra.cli import app


def _pair(root, untouched: tuple[str, ...]):
    """A tiny DistilBertForSequenceClassification and a fine-tune that moved every Linear weight but `untouched`."""
    import transformers as tf

    config = tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                 max_position_embeddings=32)
    torch.manual_seed(0)
    model = tf.DistilBertForSequenceClassification(config).eval()
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in untouched:
                module.weight += 0.01 * torch.randn(module.weight.shape, generator=gen)
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _analyze(base, tuned, out) -> str:
    run = CliRunner().invoke(app, ["analyze", str(base), str(tuned), "-o", str(out), "--no-cache"],
                             env={"COLUMNS": "1000"})
    assert run.exit_code == 0, run.output
    return " ".join(run.output.split())


@pytest.mark.parametrize("untouched, said", [
    (("distilbert.transformer.layer.1.attention.v_lin",),
     "3 unchanged matrices are left out (ΔW = 0; every embed, pos_embed matrix; v of layer 1)."),
    (("distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.1.attention.q_lin",
      "distilbert.transformer.layer.1.attention.k_lin"),
     "5 unchanged matrices are left out (ΔW = 0; every embed, pos_embed, q matrix; k of layer 1)."),
    ((), "2 unchanged matrices are left out (ΔW = 0; every embed, pos_embed matrix)."),  # the control
])
def test_the_printed_line_names_each_unchanged_matrix(tmp_path, untouched, said):
    base, tuned = _pair(tmp_path, untouched)
    assert said in _analyze(base, tuned, tmp_path / "r")
