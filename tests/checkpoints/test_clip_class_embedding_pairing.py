"""Pairing a CLIP fine-tune gives its vision tower's class token (``vision_model.embeddings.class_embedding``, a 1-D
parameter of CLIPVisionEmbeddings) role other, not embed: it is no token table (:func:`vector_info`).

The reference is transformers' CLIPModel built from a tiny config and a fine-tune of every parameter; negative control:
the token embedding (an nn.Embedding's weight) stays embed and a q_proj's bias keeps its owner's role q.
"""

from __future__ import annotations

import torch

from spectra.checkpoints.pairing import Pairing


def test_clip_class_embedding_pairs_as_other(tmp_path):
    import transformers as tf

    config = tf.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = tf.CLIPModel(config)
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
