"""A (1, N) parameter or buffer of its own is a vector of N; a layer's (1, N) weight stays a matrix.

What was wrong (audit s21, item 3): BART's ``final_logits_bias``, a (1, vocab) buffer added to the logits, was paired
as a 1 × vocab matrix of role other. The rule the README gives for parameters that are no layer's weight (a class
token (1, 1, d) is a vector) drops leading singleton dimensions; a (1, N) tensor had not been read through it. The
control: a one-output head, ``nn.Linear(d, 1)``, stores a (1, d) ``classifier.weight``, a matrix a LoRA adapts, and
stays one. References: the saved tensors' differences in float64 numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from spectra.analysis import analyze
from spectra.checkpoints.pairing import Pairing
from tests.models import build_model


def _stored(path, name) -> np.ndarray:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return f.get_tensor(name).astype(np.float64)


def _save_pair(root, base, change):
    base.save_pretrained(root / "base")
    with torch.no_grad():
        change(base)
    base.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def bart_pair(tmp_path_factory):
    """A tiny BART whose fine-tune changed final_logits_bias (1, 64) and layer 0's encoder q_proj."""
    gen = torch.Generator().manual_seed(5)

    def change(model):
        model.final_logits_bias += torch.randn(model.final_logits_bias.shape, generator=gen)
        q = model.model.encoder.layers[0].self_attn.q_proj.weight
        q += 0.01 * torch.randn(q.shape, generator=gen)

    return _save_pair(tmp_path_factory.mktemp("bart"), build_model("bart"), change)


def test_final_logits_bias_is_a_vector(bart_pair):
    base, tuned = bart_pair
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert list(f.get_slice("final_logits_bias").get_shape()) == [1, 64]  # stored (1, vocab)
    entries = {e.name: e for e in Pairing(base, tuned).entries}
    bias = entries["final_logits_bias"]
    assert (bias.kind, bias.shape) == ("vector", (64,))
    rows = {r["name"]: r for r in analyze(base, tuned, cache_dir=False, progress=False).to_dict()["modules"]}
    row = rows["final_logits_bias"]
    assert (row["kind"], row["shape"]) == ("vector", [64])
    delta = _stored(tuned, "final_logits_bias") - _stored(base, "final_logits_bias")
    assert row["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    assert not any(r["kind"] == "matrix" and r["shape"][0] == 1 for r in rows.values())


def test_a_one_output_head_stays_a_matrix(tmp_path):
    """The control: DistilBERT with num_labels=1 (a regression head, nn.Linear(32, 1)): classifier.weight (1, 32) is a
    matrix of role head, measured as one, its ΔW's single singular value the norm of the change."""
    import transformers as tf

    config = tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48,
                                 max_position_embeddings=32, num_labels=1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)

    def change(model):
        model.classifier.weight += torch.randn(model.classifier.weight.shape, generator=gen)

    base, tuned = _save_pair(tmp_path, tf.DistilBertForSequenceClassification(config).eval(), change)
    entries = {e.name: e for e in Pairing(base, tuned).entries}
    assert (entries["classifier"].kind, entries["classifier"].shape) == ("matrix", (1, 32))
    assert entries["classifier.bias"].kind == "vector"
    rows = {r["name"]: r for r in analyze(base, tuned, cache_dir=False, progress=False).to_dict()["modules"]}
    row = rows["classifier"]
    assert (row["kind"], row["shape"]) == ("matrix", [1, 32])
    delta = _stored(tuned, "classifier.weight") - _stored(base, "classifier.weight")
    assert row["singular_values"][0] == pytest.approx(np.linalg.svd(delta, compute_uv=False)[0], rel=1e-5)
