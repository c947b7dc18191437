"""Module names → roles, layers and experts, across the naming schemes checkpoints use."""

from __future__ import annotations

import pytest

from spectra.checkpoints.architectures import (STACK_NAMES, STACKS, missing_stacks, module_info, parse_stacks,
                                              role_selected, stack_selected)
from spectra.errors import ConfigError


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
    # T5's MLP output is not attention's o: it was role other for that; it is the MLP's down projection
    ("encoder.block.0.layer.1.DenseReluDense.wo", "down", 0, None),
    ("encoder.block.0.layer.1.DenseReluDense.wi", "up", 0, None),
    ("decoder.block.1.layer.2.DenseReluDense.wi_0", "gate", 1, None),  # T5 v1.1, Flan-T5: gated
    ("decoder.block.1.layer.2.DenseReluDense.wi_1", "up", 1, None),
    ("decoder.block.1.layer.0.SelfAttention.k", "k", 1, None),
    ("decoder.block.1.layer.1.EncDecAttention.q", "xq", 1, None),  # cross-attention, a role of its own
    ("decoder.block.1.layer.1.EncDecAttention.o", "xo", 1, None),
    ("encoder.block.0.layer.0.TransientGlobalSelfAttention.v", "v", 0, None),  # LongT5
    ("shared", "embed", None, None),  # T5's token embedding, read by encoder and decoder
    ("model.shared", "embed", None, None),  # BART's
    ("model.decoder.layers.0.encoder_attn.v_proj", "xv", 0, None),  # BART, mBART, Marian, Pegasus, Whisper
    ("model.decoder.layers.0.encoder_attn.out_proj", "xo", 0, None),
    ("model.encoder.layers.1.fc1", "up", 1, None),
    ("model.decoder.layers.1.fc2", "down", 1, None),  # also OPT's, whose decoder-only names read alike
    ("decoder.bert.encoder.layer.0.crossattention.self.key", "xk", 0, None),  # bert2bert (EncoderDecoderModel)
    ("decoder.bert.encoder.layer.0.crossattention.output.dense", "xo", 0, None),
    ("language_model.model.layers.3.cross_attn.q_proj", "xq", 3, None),  # Mllama's cross-attention layers
    # decoder-only names that look alike keep their roles
    ("model.layers.0.mlp.fc1", "up", 0, None),  # Phi-2
    ("transformer.h.0.mlp.c_proj", "down", 0, None),
    ("model.layers.0.self_attn.o_proj", "o", 0, None),
    ("model.layers.0.mlp.shared_expert.down_proj", "down", 0, None),  # Qwen2-MoE: not T5's shared embedding
    ("model.layers.0.mlp.shared_expert_gate", "other", 0, None),
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
    ("multi_modal_projector.mm_input_projection_weight", None, "other", None, "projector"),  # a bare parameter
    ("multi_modal_projector.mm_soft_emb_norm", None, "other", None, "projector"),  # a projector's norm stays other
    ("visual.blocks.0.attn.qkv", None, "qkv", 0, "vision"),  # Qwen2-VL
    ("vision_model.transformer.layers.3.self_attn.q_proj", None, "q", 3, "vision"),  # Mllama: two vision stacks
    ("vision_model.global_transformer.layers.3.self_attn.q_proj", None, "q", 3, "vision_global"),
    ("audio_tower.layers.2.self_attn.k_proj", None, "k", 2, "audio"),  # Qwen2-Audio
    # BLIP-2 / InstructBLIP: the Q-Former's layer 0 is not the language model's layer 0 (nor, under a T5 language
    # model's is_encoder_decoder, its encoder's)
    ("qformer.encoder.layer.0.attention.output.dense", None, "o", 0, "qformer"),
    ("qformer.encoder.layer.0.attention.attention.query", {"is_encoder_decoder": True}, "q", 0, "qformer"),
    ("qformer.embeddings.word_embeddings", None, "embed", None, "qformer"),  # InstructBLIP's instruction embeddings
    ("language_model.model.decoder.layers.0.self_attn.q_proj", None, "q", 0, None),  # BLIP-2 with OPT
    ("language_model.encoder.block.0.layer.0.SelfAttention.q", {"is_encoder_decoder": True}, "q", 0, "encoder"),
    ("language_projection", None, "projector", None, "projector"),
    # projectors as stored and as transformers-5 multimodal classes name them, under their model. wrapper
    ("multi_modal_projector.linear_1", None, "projector", None, "projector"),  # LLaVA
    ("model.multi_modal_projector.linear_1", None, "projector", None, "projector"),
    ("model.connector.modality_projection.proj", None, "projector", None, "projector"),  # Idefics3, SmolVLM
    ("model.mm_projector.0", None, "projector", None, "projector"),  # LLaVA-1.5's original checkpoints
    # a projector's words deeper in a name are the language model's own modules
    ("model.layers.0.mlp.connector", None, "other", 0, None),
    ("model.layers.2.self_attn.mm_projector", None, "other", 2, None),
    ("language_model.model.layers.1.multi_modal_projector", None, "other", 1, None),
    # encoder–decoder models: config.json's is_encoder_decoder tells their encoder from an encoder-only model
    ("model.encoder.layers.0.self_attn.q_proj", ENCODER_DECODER, "q", 0, "encoder"),  # BART, Whisper, Marian
    ("model.decoder.layers.0.self_attn.q_proj", ENCODER_DECODER, "q", 0, None),
    ("encoder.block.1.layer.0.SelfAttention.q", {"is_encoder_decoder": True}, "q", 1, "encoder"),  # T5
    ("decoder.block.1.layer.1.EncDecAttention.q", {"is_encoder_decoder": True}, "xq", 1, None),
    ("model.decoder.layers.0.encoder_attn.q_proj", ENCODER_DECODER, "xq", 0, None),  # not the self-attention's q
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


def _multimodal(kind):
    """A tiny multimodal model of `kind` on the meta device: its module names, no weights."""
    import torch
    import transformers as tf

    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128,
                   encoder_hidden_size=32)
    with torch.device("meta"):
        if kind == "blip2":
            return tf.Blip2ForConditionalGeneration(tf.Blip2Config(vision_config=vision, qformer_config=qformer,
                                                                   text_config=text, num_query_tokens=4))
        if kind == "instructblip":
            return tf.InstructBlipForConditionalGeneration(tf.InstructBlipConfig(
                vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4))
        if kind == "llava":
            return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
                text_config=text, vision_config=dict(model_type="clip_vision_model", **vision), image_token_index=127))
        return tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(text_config=text, vision_config=vision,
                                                                     image_token_id=127, scale_factor=2))


# The model's own submodules are the reference: each Linear lies in the stack of the submodule holding it.
_SUBMODULE_STACKS = {"vision_model": "vision", "vision_tower": "vision", "qformer": "qformer",
                     "language_projection": "projector", "multi_modal_projector": "projector",
                     "connector": "projector", "language_model": None, "text_model": None, "lm_head": None}


@pytest.mark.parametrize("kind", ["blip2", "instructblip", "llava", "idefics3"])
def test_multimodal_stacks_follow_the_models_submodules(kind):
    """BLIP-2's qformer.encoder.layer.0… had no stack, so its layer 0 shared a cell with the language model's."""
    import torch

    model = _multimodal(kind)
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            submodule = name.removeprefix("model.").split(".")[0]
            info = module_info(name, model.config.to_dict())
            assert info.stack == _SUBMODULE_STACKS[submodule], name
            seen.add(info.stack)
    assert None in seen and "projector" in seen and "vision" in seen
    assert ("qformer" in seen) == (kind in ("blip2", "instructblip"))


# -- selecting by stack -----------------------------------------------------------------------------------------------

def _selected(model, roles, stacks) -> set[str]:
    """The Linears a selection takes, as every command decides it: its role (role_selected) and its stack."""
    import torch

    config = model.config.to_dict()
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and role_selected((info := module_info(name, config)).role, roles, name)
            and stack_selected(info.stack, stacks)}


def _linears(model, prefix: str, *suffixes: str) -> set[str]:
    import torch

    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and name.startswith(prefix) and name.endswith(suffixes)}


def _meta(cls_name: str, config):
    import torch
    import transformers as tf

    with torch.device("meta"):
        return getattr(tf, cls_name)(config)


def test_a_vlms_language_q_and_v_leave_its_vision_towers_alone():
    """Qwen2-VL: --roles q,v takes the vision tower's fused attn.qkv too (its LoRA adapts q, k and v together), as
    PEFT's target_modules would; --stacks language keeps the language model's q_proj and v_proj alone, --stacks
    vision the tower's qkv alone. The reference is the model's own submodules (model.language_model.…,
    model.visual.blocks.…)."""
    import transformers as tf

    model = _meta("Qwen2VLForConditionalGeneration", tf.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64),
        vision_config=dict(depth=2, num_heads=2, embed_dim=16, hidden_size=32, mlp_ratio=2)))
    language = _linears(model, "model.language_model.", "q_proj", "v_proj")
    vision = _linears(model, "model.visual.blocks.", "attn.qkv")
    assert len(language) == 4 and len(vision) == 2
    assert _selected(model, ("q", "v"), None) == language | vision  # negative control: roles alone take both
    assert _selected(model, ("q", "v"), parse_stacks("language")) == language
    assert _selected(model, ("q", "v"), parse_stacks("vision")) == vision
    assert _selected(model, ("q", "v"), parse_stacks("language,vision")) == language | vision
    merger = _linears(model, "model.visual.merger.", "")
    assert merger and _selected(model, ("projector",), parse_stacks("projector")) == merger
    assert _selected(model, ("projector",), parse_stacks("language,vision")) == set()  # only the projector holds it


def test_blip2_qformer_selected_apart_from_its_vision_tower_and_language_model():
    """BLIP-2's Q-Former (qformer.…) is a stack of its own: its self- and cross-attention query and value (roles q, v,
    xq, xv: q takes xq) and nothing of the vision tower (whose qkv --roles q also takes) or of the OPT decoder."""
    model = _multimodal("blip2")
    qformer = _linears(model, "qformer.", ".query", ".value")
    assert len(qformer) == 2 * 2 + 2 * 1  # 2 layers' self-attention; cross-attention every 2nd layer (1)
    assert _selected(model, ("q", "v"), parse_stacks("qformer")) == qformer
    everything = _selected(model, ("q", "v"), None)
    assert everything > qformer | _linears(model, "vision_model.", "self_attn.qkv")  # negative control
    assert _selected(model, ("q", "v"), parse_stacks("language")) == _linears(model, "language_model.", "q_proj",
                                                                                "v_proj")


def test_t5_encoder_and_decoder_by_the_names_its_reports_print():
    """T5's report names its stacks encoder and decoder (the language model): --stacks decoder reads as language. The
    decoder's q includes its cross-attention's EncDecAttention.q (role xq); the encoder is known by config.json's
    is_encoder_decoder, without which encoder.block.N reads as an ordinary model's one stack."""
    import transformers as tf

    model = _meta("T5ForConditionalGeneration", tf.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                             num_decoder_layers=2, num_heads=4, vocab_size=64))
    encoder = _linears(model, "encoder.", "SelfAttention.q")
    decoder = _linears(model, "decoder.", "SelfAttention.q", "EncDecAttention.q")
    assert len(encoder) == 2 and len(decoder) == 4
    assert parse_stacks("decoder") == ("language",)
    assert _selected(model, ("q",), parse_stacks("encoder")) == encoder
    assert _selected(model, ("q",), parse_stacks("decoder")) == decoder
    assert _selected(model, ("xq",), parse_stacks("decoder")) == _linears(model, "decoder.", "EncDecAttention.q")
    assert _selected(model, ("q",), parse_stacks("vision")) == set()
    assert module_info(next(iter(encoder))).stack is None  # negative control: without its config, no encoder


def test_parse_stacks_spells_and_refuses():
    assert parse_stacks(None) is None
    assert parse_stacks(" Vision , language model,decoder") == ("vision", "language")
    assert parse_stacks(("encoder", "decoder")) == ("encoder", "language")
    assert STACK_NAMES == ("language", *STACKS)
    with pytest.raises(ConfigError, match=r"--stacks: unknown stack\(s\) visoin; choose from language, encoder, "
                                          "vision"):
        parse_stacks("visoin,language", option="--stacks")
    with pytest.raises(ConfigError, match="no stack named"):
        parse_stacks(" , ")
    assert stack_selected(None, ("language",)) and not stack_selected("vision", ("language",))
    assert stack_selected("vision", None) and stack_selected(None, None)


def test_missing_stacks_notes_some_and_refuses_all():
    assert missing_stacks(None, {None}) is None
    assert missing_stacks(("language", "vision"), {None, "vision", "projector"}) is None
    assert missing_stacks(("language", "vision"), {None}) == ("stacks: the model has no vision stack (its stacks: "
                                                              "language)")
    with pytest.raises(ConfigError, match="stacks vision: the model has no module of that stack; its stacks are "
                                          "language, encoder"):
        missing_stacks(("vision",), {"encoder", None})
