"""Module names → roles, layers and experts, across the naming schemes checkpoints use."""

from __future__ import annotations

import pytest

from spectra.checkpoints.architectures import module_info


@pytest.mark.parametrize("name, role, layer, expert", [
    ("model.layers.3.self_attn.q_proj", "q", 3, None),
    ("transformer.h.0.attn.c_attn", "qkv", 0, None),
    ("layers.0.attention.wq", "q", 0, None),  # Meta's original (consolidated) checkpoints
    ("layers.0.attention.wk", "k", 0, None),
    ("layers.0.attention.wv", "v", 0, None),
    ("layers.0.attention.wo", "o", 0, None),
    ("layers.5.feed_forward.w1", "gate", 5, None),
    ("layers.5.feed_forward.w3", "up", 5, None),
    ("layers.5.feed_forward.w2", "down", 5, None),
    ("model.layers.1.block_sparse_moe.experts.2.w1", "gate", 1, 2),
    ("encoder.block.0.layer.1.DenseReluDense.wo", "other", 0, None),  # T5's MLP output is not attention's
])
def test_roles(name, role, layer, expert):
    info = module_info(name)
    assert (info.role, info.layer, info.expert) == (role, layer, expert)
