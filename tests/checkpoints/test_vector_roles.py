"""A vector's role is its owner's, except under a module whose name reads as an embedding table: CLIP's
``vision_model.embeddings.class_embedding`` is role other, not embed.

What was wrong (audit s19): a vector took the role of the module that holds it, and CLIP's CLIPVisionEmbeddings is named
``embeddings``, the name role rules read as XLM's or Mamba's token table (role embed), so the class token, no token
table, was role embed. The reference is transformers' CLIPModel built from a tiny config: an nn.Embedding holds no
vector, so none of its 1-D parameters may take a table's role, and each other vector keeps its owner's (a q_proj's bias
is q). Negative control: the token embedding itself (an nn.Embedding's weight) stays embed, the position table pos_embed.
"""

from __future__ import annotations

import pytest
import torch

from spectra.checkpoints.architectures import module_info, vector_info
from tests.models import tiny_clip


@pytest.fixture(scope="module")
def clip():
    model = tiny_clip()
    return model, model.config.to_dict()


def test_clip_class_embedding_is_other(clip):
    model, config = clip
    assert vector_info("vision_model.embeddings.class_embedding", config).role == "other"
    assert vector_info("vision_model.embeddings.class_embedding", config).stack == "vision"  # its stack kept
    # the model's own types: no vector lies in an nn.Embedding; every vector's owner is some other module, whose role
    # it keeps unless that module's name reads as a table
    vectors = [n for n, p in model.named_parameters() if p.dim() <= 1]
    assert "vision_model.embeddings.class_embedding" in vectors
    for name in vectors:
        owner = name.rpartition(".")[0]
        assert not isinstance(model.get_submodule(owner) if owner else model, torch.nn.Embedding)
        role = vector_info(name, config).role
        assert role not in ("embed", "pos_embed"), name
        if module_info(owner, config).role not in ("embed", "pos_embed"):
            assert vector_info(name, config) == module_info(owner, config), name
    assert vector_info("text_model.encoder.layers.0.self_attn.q_proj.bias", config).role == "q"


def test_clip_tables_keep_their_roles(clip):
    """Negative control: the tables are the model's nn.Embedding modules, and keep their roles."""
    model, config = clip
    for name, role in (("text_model.embeddings.token_embedding", "embed"),
                       ("text_model.embeddings.position_embedding", "pos_embed"),
                       ("vision_model.embeddings.position_embedding", "pos_embed")):
        assert isinstance(model.get_submodule(name), torch.nn.Embedding)
        assert module_info(name, config).role == role
