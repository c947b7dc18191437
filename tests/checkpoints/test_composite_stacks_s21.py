"""Roles, stacks, layers and fused splits of composite models, held to transformers' own classes from tiny configs.

What was wrong (session 21):

1. A ModernBERT inside a composite model (ModernVBERT's, ColModernVBERT's, PE-Audio's, PE-Video's and
   PE-Audio-Video's ``text_model``, sized by the composite config's ``text_config``) kept its ``attn.Wqkv`` whole:
   the composite's model type named no fused layout. It is now q, k and v as a ModernBERT's own, checked against the
   q, k, v that ModernBERT's attention forward computes. ColModernVBERT's ``vlm.connector`` is the projector stack,
   as ModernVBERT's ``model.connector`` is.
2. SAM video trackers (SAM 2 video, SAM 3 tracker video, EdgeTAM video): the memory attention and the memory
   encoder were the "language model", though a tracker holds none; SAM 3's detector (its DETR encoder and decoder)
   too, beside its real language model, a CLIP text encoder. They are now the ``memory_attention``,
   ``memory_encoder``, ``geometry_encoder`` (SAM 3's box and point prompt encoder), ``detr_encoder`` and
   ``detr_decoder`` stacks (a tracker's mask-prompt downsampler the ``mask_decoder`` stack), and their
   cross-attentions roles xq … xo; no (stack, role, layer) cell holds two parts' modules.
3. An analysis.json written before stacks existed, of an encoder–decoder (Whisper, T5), read its encoder as the
   language model: a reader knew the model type but not ``is_encoder_decoder``. An old Swin's (ConvNeXt's) rows
   kept the stage's (block's) number as their layer: they are renumbered as a new run numbers them.
4. DeBERTa-v2's ``pos_query_proj`` and ``pos_key_proj`` (without ``share_att_key``) were ``other``: they compute what
   ``query_proj`` and ``key_proj`` compute on the position embeddings under ``share_att_key``, roles q and k.
"""

from __future__ import annotations

import re

import pytest
import torch

from spectra.checkpoints.architectures import (ENCODER_DECODER_MODEL_TYPES, STACK_NAMES, fused_projections,
                                               module_info, parse_stacks)
from spectra.groups import rows_with_stacks

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24, vocab_size=64,
             max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
             sep_token_id=2)


def _meta(cls_name: str, config):
    import transformers as tf

    with torch.device("meta"):
        return getattr(tf, cls_name)._from_config(config)


# ------------------------------------------------------------------------------------- 1. ModernBERT in a composite


def _captured_qkv(monkeypatch):
    """q (before rotary), k (before rotary) and v as ModernBERT's attention forward computes them, each flattened
    to (batch, seq, heads·head_dim)."""
    from transformers.models.modernbert import modeling_modernbert as module

    from tests.checkpoints.test_modernbert_dbrx_roles_s20b import _captured

    return _captured(module, monkeypatch)


def _check_text_model_split(model, text_model, prefix, monkeypatch):
    """The composite `model`'s text ModernBERT (`text_model`, named `prefix` in its module tree): spectra's split
    of its Wqkv, read with the composite's config.json, gives the q, k and v of the attention's own forward."""
    config = model.config.to_dict()
    name = f"{prefix}.layers.0.attn.Wqkv"
    modules = dict(model.named_modules())
    assert modules[name] is text_model.layers[0].attn.Wqkv  # the name is the model's own
    info = module_info(name, config)
    assert (info.role, info.layer, info.stack) == ("qkv", 0, None)
    weight = modules[name].weight.detach().double()
    projections = fused_projections(name, info.role, weight.shape[0], config)
    assert [p.role for p in projections] == ["q", "k", "v"]

    text_model.double().eval()
    text_model.config._attn_implementation = "eager"
    seen = _captured_qkv(monkeypatch)
    x = torch.randn(2, 5, weight.shape[1], dtype=torch.float64)
    position = text_model.rotary_emb(x, torch.arange(5)[None].expand(2, -1), layer_type="full_attention")
    with torch.no_grad():
        text_model.layers[0].attn(x, position_embeddings=position, attention_mask=None)
    for p in projections:
        assert torch.allclose(x @ weight[p.rows].T, seen[p.role], atol=1e-12), (name, p.role)
    rows = {p.role: p.rows for p in projections}
    assert not torch.allclose(x @ weight[rows["k"]].T, seen["q"])  # negative control: k's rows are no queries


def test_modernvbert_text_wqkv_splits_as_its_modernbert_forward(monkeypatch):
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = tf.ModernVBertModel(tf.ModernVBertConfig(text_config=_TEXT, vision_config=vision))
    _check_text_model_split(model, model.text_model, "text_model", monkeypatch)
    config = model.config.to_dict()
    # the vision tower (SigLIP's q_proj) and the connector keep their stacks; the connector is the projector
    assert module_info("vision_model.encoder.layers.0.self_attn.q_proj", config).stack == "vision"
    assert module_info("connector.modality_projection.proj", config).stack == "projector"


def test_pe_audio_text_wqkv_splits_as_its_modernbert_forward(monkeypatch):
    import transformers as tf

    torch.manual_seed(0)
    audio = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8)
    model = tf.PeAudioModel(tf.PeAudioConfig(text_config=_TEXT, audio_config=audio))
    _check_text_model_split(model, model.text_model, "text_model", monkeypatch)
    # the audio encoder's attention is sized by its own config: q_proj, role q, stack audio; no fused split there
    info = module_info("audio_encoder.layers.0.self_attn.q_proj", model.config.to_dict())
    assert (info.role, info.stack) == ("q", "audio")


def test_colmodernvbert_text_wqkv_and_connector(monkeypatch):
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.ColModernVBertConfig(vlm_config={"model_type": "modernvbert", "text_config": _TEXT,
                                                 "vision_config": vision})
    model = tf.ColModernVBertForRetrieval(config)
    text_model = model.vlm.text_model if hasattr(model.vlm, "text_model") else model.vlm.model.text_model
    prefix = next(n for n, m in model.named_modules() if m is text_model)
    _check_text_model_split(model, text_model, prefix, monkeypatch)
    connector = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".connector." in n)
    info = module_info(connector, model.config.to_dict())
    assert (info.role, info.stack) == ("projector", "projector")


@pytest.mark.parametrize("cls_name", ["PeVideoConfig", "PeAudioVideoConfig"])
def test_pe_video_configs_split_their_text_wqkv_as_the_text_config_sizes_it(cls_name):
    """PE-Video's models need timm to build (its vision tower): their config.json alone, whose text_config is the
    ModernBERT's. The split is the standalone ModernBERT's of that text_config; a Wqkv of other rows is not split."""
    import transformers as tf

    config = getattr(tf, cls_name)(text_config=_TEXT).to_dict()
    alone = tf.ModernBertConfig(**_TEXT).to_dict()
    name = "text_model.layers.0.attn.Wqkv"
    ours = fused_projections(name, "qkv", 96, config)
    assert [(p.role, p.rows) for p in ours] == [(p.role, p.rows) for p in fused_projections(name, "qkv", 96, alone)]
    assert [p.rows for p in ours] == [slice(0, 32), slice(32, 64), slice(64, 96)]
    assert fused_projections(name, "qkv", 100, config) == []  # negative control: rows the config does not size


# ---------------------------------------------------------------------------------------- 2. SAM video and SAM 3

# Each top-level part of a tracker or of SAM 3, by the class transformers builds it from → its stack
_PART_STACKS = {
    "VisionModel": "vision", "VisionEncoder": "vision", "VisionNeck": "vision", "PromptEncoder": "mask_decoder",
    "MaskDecoder": "mask_decoder", "GeometryEncoder": "geometry_encoder", "MemoryAttention": "memory_attention",
    "MemoryEncoder": "memory_encoder", "PerceiverResampler": "memory_encoder", "DETREncoder": "detr_encoder",
    "DETRDecoder": "detr_decoder", "DotProductScoring": "detr_decoder", "CLIPTextModelWithProjection": None,
    "MobileCLIPTextModel": None, "TextModel": None,
}


def _part_stack(model, name: str):
    """The stack of module `name` by the class of the model's part that holds it (its first segment, or its second
    under SAM 3 video's detector_model and tracker_model): independent of spectra's name rules."""
    parts = name.split(".")
    depth = 2 if parts[0] in ("detector_model", "tracker_model") and len(parts) > 1 else 1
    owner = model.get_submodule(".".join(parts[:depth]))
    cls = type(owner).__name__
    found = [stack for key, stack in _PART_STACKS.items() if cls.lower().endswith(key.lower())]
    if found:
        return found[0]
    # a bare layer at the top: a mask prompt's downsampler (the prompt encoder's input), the object pointer's MLP
    # (into the memory bank), the memory's temporal positions' projection (read by the memory attention)
    leaf = parts[depth - 1]
    return {"mask_downsample": "mask_decoder", "object_pointer_proj": "memory_encoder",
            "temporal_positional_encoding_projection_layer": "memory_attention", "tracker_neck": "vision",
            "text_projection": None}[leaf]


@pytest.mark.parametrize("model_type,cls_name", [("sam2_video", "Sam2VideoModel"),
                                                 ("sam3_tracker_video", "Sam3TrackerVideoModel"),
                                                 ("edgetam_video", "EdgeTamVideoModel"), ("sam3", "Sam3Model"),
                                                 ("sam3_video", "Sam3VideoModel")])
def test_sam_trackers_and_sam3_stacks_follow_their_parts(model_type, cls_name):
    import transformers as tf

    model = _meta(cls_name, tf.AutoConfig.for_model(model_type))
    config = model.config.to_dict()
    weights = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    got = {n: module_info(n, config).stack for n in weights}
    wrong = {n: (got[n], _part_stack(model, n)) for n in weights if got[n] != _part_stack(model, n)}
    assert not wrong, list(wrong.items())[:5]
    # no cell of a layer × role table holds two parts' modules (SAM 3 video: the geometry encoder's layers and the
    # tracker's mask decoder's are both numbered from 0)
    cells: dict = {}
    for n in weights:
        info = module_info(n, config)
        if info.role != "other":
            parts = n.split(".")
            part = ".".join(parts[:2]) if parts[0] in ("detector_model", "tracker_model") else parts[0]
            cells.setdefault((info.stack, info.role, info.layer), set()).add(part)
    assert not {cell: parts for cell, parts in cells.items() if len(parts) > 1}
    # an analysis.json written before these stacks (no stack on its rows) reads them as a new run records them
    rows = rows_with_stacks([{"name": n} for n in weights], model_type)
    assert [r.get("stack") for r in rows] == [got[n] for n in weights]
    language = {n for n in weights if got[n] is None}
    if model_type.startswith("sam3") and model_type != "sam3_tracker_video":
        assert language and all("text_encoder." in n or n.endswith("text_projection") for n in language)
    else:
        assert not language  # a tracker holds no language model
    # memory attention's layers are numbered from 0 in their stack; its cross-attention over the memory is xq … xo
    if model_type != "sam3":
        prefix = "tracker_model." if model_type == "sam3_video" else ""
        for proj, role in (("self_attn.q_proj", "q"), ("cross_attn_image.q_proj", "xq"), ("cross_attn_image.k_proj",
                                                                                          "xk")):
            info = module_info(f"{prefix}memory_attention.layers.1.{proj}", config)
            assert (info.role, info.layer, info.stack) == (role, 1, "memory_attention")
    else:
        for proj, role in (("self_attn.q_proj", "q"), ("text_cross_attn.q_proj", "xq"),
                           ("vision_cross_attn.v_proj", "xv")):
            info = module_info(f"detr_decoder.layers.1.{proj}", config)
            assert (info.role, info.layer, info.stack) == (role, 1, "detr_decoder")
        assert module_info("detr_encoder.layers.0.cross_attn.q_proj", config).stack == "detr_encoder"


def test_the_new_stacks_are_selectable():
    for stack in ("memory_attention", "memory_encoder", "geometry_encoder", "detr_encoder", "detr_decoder"):
        assert stack in STACK_NAMES and parse_stacks(stack) == (stack,)


# ------------------------------------------------------------------------------------------- 3. old analysis.json


def _tiny(family: str):
    import transformers as tf

    if family == "whisper":
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=24, decoder_ffn_dim=24, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
            vocab_size=64, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if family == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                                         num_decoder_layers=2, num_heads=4, vocab_size=64,
                                                         relative_attention_num_buckets=8, decoder_start_token_id=0))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=24, vocab_size=64, max_position_embeddings=16))
    raise ValueError(family)


@pytest.mark.parametrize("family", ["whisper", "t5", "bert"])
def test_an_old_analysis_reads_its_stacks_as_a_new_run_records_them(family):
    """Rows of an analysis.json written before stacks (name and layer, no stack) of a tiny Whisper, T5 and BERT: the
    stacks rows_with_stacks gives them are those module_info gives a new run with the whole config.json; Whisper's
    and T5's encoders are the encoder (BERT's encoder.layer.N, an encoder-only model's one stack, stays the
    language model's: the negative control)."""
    model = _tiny(family)
    config = model.config.to_dict()
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    new = {n: module_info(n, config).stack for n in names}
    old_rows = [{"name": n, "role": module_info(n, config).role} for n in names]
    read = rows_with_stacks(old_rows, config["model_type"])
    assert {r["name"]: r.get("stack") for r in read} == new
    encoder = {n for n in names if n.split(".")[0] == "encoder" or n.startswith("model.encoder.")}
    if family == "bert":
        assert set(new.values()) == {None}
    else:
        assert encoder and {new[n] for n in encoder} == {"encoder"} and None in new.values()


@pytest.mark.parametrize("model_type", ["whisper", "t5", "bart", "mt5", "bert", "gpt2", "vit", "llama"])
def test_encoder_decoder_model_types_are_transformers_defaults(model_type):
    import transformers as tf

    assert (model_type in ENCODER_DECODER_MODEL_TYPES) == bool(tf.AutoConfig.for_model(model_type).is_encoder_decoder)


@pytest.mark.slow
def test_encoder_decoder_model_types_are_every_transformers_default():
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from tests.models import quiet_transformers

    found = set()
    with quiet_transformers():
        for model_type in CONFIG_MAPPING_NAMES:
            try:
                config = tf.AutoConfig.for_model(model_type)
            except Exception:
                continue
            if getattr(config, "is_encoder_decoder", False):
                found.add(model_type)
    assert found == ENCODER_DECODER_MODEL_TYPES


def _block_order(model, stages, blocks):
    """Every block's module-name prefix → its place among the stack's blocks, in the order the model runs them."""
    order, i = {}, 0
    for s, stage in enumerate(stages(model)):
        for b, block in enumerate(blocks(stage)):
            order[next(n for n, m in model.named_modules() if m is block)] = i
            i += 1
    return order


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_an_old_staged_backbone_analysis_is_renumbered_over_its_whole_stack(family):
    import transformers as tf

    if family == "swin":
        config = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 3, 1], num_heads=[1, 1, 1],
                               window_size=2)
        model = tf.SwinModel(config)
        order = _block_order(model, lambda m: m.encoder.layers, lambda stage: stage.blocks)
        old_layer = lambda n: int(re.search(r"layers\.(\d+)\.", n).group(1))  # noqa: E731 (the stage, as read)
    else:
        config = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 3], num_stages=2, num_channels=3)
        model = tf.ConvNextModel(config)
        order = _block_order(model, lambda m: m.encoder.stages, lambda stage: stage.layers)
        old_layer = lambda n: int(re.search(r"\.layers\.(\d+)\.", n).group(1))  # noqa: E731 (the block, as read)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n.startswith(prefix + ".") for prefix in order)]
    truth = {n: next(i for prefix, i in order.items() if n.startswith(prefix + ".")) for n in names}
    assert sorted(set(truth.values())) == list(range(sum(config.depths)))
    old = [{"name": n, "role": "other", "layer": old_layer(n), "stack": "vision"} for n in names]
    assert any(r["layer"] != truth[r["name"]] for r in old)  # the old numbering is not the new one
    assert {r["name"]: r["layer"] for r in rows_with_stacks(old, config.model_type)} == truth
    assert {n: module_info(n, config.to_dict()).layer for n in names} == truth  # as a new run numbers them
    # negative controls: a file of the new numbering reads as written; one whose names lack a stage is not guessed
    new = [{**r, "layer": truth[r["name"]]} for r in old]
    assert rows_with_stacks(new, config.model_type) == new
    first = min(truth, key=truth.get).split(".layers." if family == "swin" else ".stages.")[0]
    partial = [r for r in old if not re.search(r"(layers|stages)\.0\.", r["name"])]
    assert first and rows_with_stacks(partial, config.model_type) == partial
    # an analysis that selected modules may lack blocks of a stage: its rows keep their layers (review: block 0 of
    # every stage alone had been renumbered 0, 1, 2, … as if each stage held one block)
    firsts = [r for r in old if re.search(r"(blocks|layers)\.0\.", r["name"].split(".layers.", 1)[-1]
                                          if family == "swin" else r["name"].split(".stages.", 1)[-1])]
    for selected in ({"layers": [0, 9]}, {"include": "blocks.0|layers.0"}, {"exclude": "blocks.1"}):
        assert rows_with_stacks(firsts, config.model_type, selected) == firsts
        assert rows_with_stacks(old, config.model_type, selected) == old
    assert rows_with_stacks(old, config.model_type, {"layers": None, "include": None}) != old


# --------------------------------------------------------------------------------------------------- 4. DeBERTa-v2


def test_deberta_v2_position_projections_are_q_and_k_as_their_shared_counterparts():
    """Without share_att_key, pos_key_proj and pos_query_proj project the relative-position embeddings to keys and
    queries; with it, key_proj and query_proj (roles k, q) project those same embeddings themselves."""
    import transformers as tf

    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=64,
                  max_position_embeddings=16, relative_attention=True, pos_att_type=["p2c", "c2p"],
                  position_buckets=4)
    inputs = {}
    for shared in (False, True):
        torch.manual_seed(0)
        model = tf.DebertaV2Model(tf.DebertaV2Config(share_att_key=shared, **common)).eval()
        attention = model.encoder.layer[0].attention.self
        for proj in ("query_proj", "key_proj", "pos_query_proj", "pos_key_proj"):
            if hasattr(attention, proj):
                getattr(attention, proj).register_forward_hook(
                    lambda m, args, out, key=(shared, proj): inputs.setdefault(key, []).append(args[0]))
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 7, 9, 2]]))
        names = {n.rpartition(".")[2]: n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        roles = {proj: module_info(names[proj], model.config.to_dict()).role for proj in names if "proj" in proj}
        rel = model.encoder.get_rel_embedding()
        if not shared:
            assert roles == {"query_proj": "q", "key_proj": "k", "value_proj": "v", "pos_query_proj": "q",
                             "pos_key_proj": "k"}
            for proj in ("pos_query_proj", "pos_key_proj"):  # each reads the position embeddings, no token
                (x,) = inputs[(False, proj)]
                assert torch.equal(x[0], rel[: x.shape[1]])
        else:
            assert "pos_key_proj" not in names
            for proj in ("query_proj", "key_proj"):  # the tokens, then the position embeddings
                assert len(inputs[(True, proj)]) == 2 and torch.equal(inputs[(True, proj)][1][0], rel[: inputs[(True, proj)][1].shape[1]])


# Module-name segments the session-21 rules read, → the model types that hold them in transformers 5.24
_NEW_SEGMENTS = {"cross_attn_image", "text_cross_attn", "vision_cross_attn", "memory_attention", "memory_encoder",
                 "spatial_perceiver", "object_pointer_proj", "temporal_positional_encoding_projection_layer",
                 "geometry_encoder", "detr_encoder", "detr_decoder", "dot_product_scoring", "tracker_neck",
                 "mask_downsample"}
_SAM_FAMILIES = {"sam2_video", "sam3_tracker_video", "edgetam_video", "sam3", "sam3_video", "sam3_lite_text"}


@pytest.mark.slow
def test_the_new_names_are_only_the_sam_families_and_deberta_v2s():
    """Every transformers class built on the meta device: a module named by a segment the new stack and
    cross-attention rules read is a SAM video tracker's or SAM 3's; a pos_query_proj or pos_key_proj (roles q, k) a
    DeBERTa-v2's or SEW-D's disentangled attention; a ModernBERT Wqkv (ModernBertAttention) split into q, k, v in
    every model that holds one (the composites whose text model is a ModernBERT)."""
    from tests.models import meta_models, quiet_transformers

    seen, modernbert = set(), set()
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            for n, module in model.named_modules():
                segments = set(n.split("."))
                if segments & _NEW_SEGMENTS:
                    assert model_type in _SAM_FAMILIES, (model_type, n)
                    seen.add(model_type)
                if segments & {"pos_query_proj", "pos_key_proj"}:
                    assert type(module).__name__ == "Linear" and model_type in ("deberta-v2", "sew-d"), (model_type, n)
                    assert module_info(n, config).role == {"pos_query_proj": "q", "pos_key_proj": "k"}[n.split(".")[-1]]
                if type(module).__name__ == "ModernBertAttention":
                    weight = module.Wqkv.weight
                    split = fused_projections(f"{n}.Wqkv", "qkv", weight.shape[0], config)
                    assert [p.role for p in split] == ["q", "k", "v"], (model_type, n)
                    modernbert.add(model_type)
    assert {"sam2_video", "sam3", "edgetam_video"} <= seen, sorted(seen)
    assert {"modernbert", "modernvbert", "pe_audio"} <= modernbert, sorted(modernbert)
