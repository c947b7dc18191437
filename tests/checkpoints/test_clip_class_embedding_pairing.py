"""Pairing a CLIP fine-tune gives its vision tower's class token (``vision_model.embeddings.class_embedding``, a 1-D
parameter of CLIPVisionEmbeddings) role other, not embed: it is no token table (:func:`vector_info`).

The reference is transformers' CLIPModel built from a tiny config and a fine-tune of every parameter; negative control:
the token embedding (an nn.Embedding's weight) stays embed and a q_proj's bias keeps its owner's role q.
"""

from __future__ import annotations

import torch

from spectra.checkpoints.pairing import Pairing
from tests.models import tiny_clip


def test_clip_class_embedding_pairs_as_other(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "tuned")
    entries = {e.name: e for e in Pairing(tmp_path / "base", tmp_path / "tuned").entries}
    token = entries["vision_model.embeddings.class_embedding"]
    assert (token.kind, token.info.role, token.info.stack) == ("vector", "other", "vision")
    assert entries["text_model.embeddings.token_embedding"].info.role == "embed"
    assert entries["text_model.encoder.layers.0.self_attn.q_proj.bias"].info.role == "q"
