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


ENCODER_DECODER = {"model_type": "bart", "is_encoder_decoder": True}


@pytest.mark.parametrize("name, config, role, layer, stack", [
    # Gemma 3 (Gemma3ForConditionalGeneration): two stacks both numbered from 0, as stored and as the model names them
    ("language_model.model.layers.0.self_attn.q_proj", None, "q", 0, None),
    ("vision_tower.encoder.layers.0.self_attn.q_proj", None, "q", 0, "vision"),
    ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", None, "q", 0, "vision"),
    ("multi_modal_projector.mm_input_projection_weight", None, "other", None, "projector"),
    ("visual.blocks.0.attn.qkv", None, "qkv", 0, "vision"),  # Qwen2-VL
    ("vision_model.transformer.layers.3.self_attn.q_proj", None, "q", 3, "vision"),  # Mllama: two vision stacks
    ("vision_model.global_transformer.layers.3.self_attn.q_proj", None, "q", 3, "vision_global"),
    ("audio_tower.layers.2.self_attn.k_proj", None, "k", 2, "audio"),  # Qwen2-Audio
    # encoder–decoder models: config.json's is_encoder_decoder tells their encoder from an encoder-only model
    ("model.encoder.layers.0.self_attn.q_proj", ENCODER_DECODER, "q", 0, "encoder"),  # BART, Whisper, Marian
    ("model.decoder.layers.0.self_attn.q_proj", ENCODER_DECODER, "q", 0, None),
    ("encoder.block.1.layer.0.SelfAttention.q", {"is_encoder_decoder": True}, "other", 1, "encoder"),  # T5
    ("decoder.bert.encoder.layer.0.attention.self.query", {"is_encoder_decoder": True}, "q", 0, None),  # bert2bert
    # one stack: nothing changes for ordinary models
    ("model.layers.3.self_attn.q_proj", None, "q", 3, None),
    ("model.decoder.layers.0.self_attn.q_proj", {"model_type": "opt"}, "q", 0, None),  # OPT: decoder only
    ("bert.encoder.layer.0.attention.self.query", {"model_type": "bert"}, "q", 0, None),
    ("model.encoder.layers.0.self_attn.q_proj", None, "q", 0, None),  # no config: not told apart, as before
])
def test_stacks(name, config, role, layer, stack):
    info = module_info(name, config)
    assert (info.role, info.layer, info.stack) == (role, layer, stack)
