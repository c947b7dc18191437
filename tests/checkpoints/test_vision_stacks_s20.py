"""Vision models' stacks and layers, held to transformers' own classes built from tiny configs.

What was wrong (session 20):

1. SAM (SamModel, SAM-HQ, SAM 2): its vision encoder was the vision stack, but its prompt encoder and mask decoder
   (a two-way transformer) were the language model's, though SAM holds none: an analysis of SAM reported a
   "language model" stack. They are now the ``mask_decoder`` stack (its layers numbered from 0 again), the rest of
   the model (its shared positional embedding) vision, and ``--stacks mask_decoder`` selects them.
2. Hierarchical backbones (Swin, SwinV2, Donut-Swin, MaskFormer-Swin, PVTv2: ``layers.S.blocks.B``; ConvNeXt,
   FocalNet, Hiera, ResNet …: ``stages.S.layers.B``; PVT, SegFormer …: ``block.S.B``): a module's layer was its
   stage's number S (Swin) or its block's number within its stage B (ConvNeXt), so a layer × role heatmap showed
   one row per stage, or mixed the first blocks of every stage. A block's layer is now its place among all the
   stack's blocks, ``sum(depths[:S]) + B``, as transformers' module order gives it.
3. An analysis.json written before spectra gave a vision-only model its stack (no ``stack`` in its rows) read back
   as the language model's: its rows now get the stack a new run gives them (:func:`spectra.groups.rows_with_stacks`).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from spectra.checkpoints import architectures
from spectra.checkpoints.architectures import (STACK_NAMES, STACKS, ModuleInfo, module_info, parse_stacks,
                                               role_selected, stack_selected)
from spectra.groups import model_type_of, rows_with_stacks


def _tiny_sam():
    import transformers as tf

    vision = tf.SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                                mlp_dim=32, image_size=64, patch_size=16, global_attn_indexes=[1], window_size=2,
                                num_pos_feats=4, initializer_range=0.02)  # its default 1e-10: weights near 0
    prompt = tf.SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = tf.SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, mlp_dim=16,
                                      iou_head_hidden_dim=8)
    torch.manual_seed(0)
    return tf.SamModel(tf.SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


def _meta(model_type: str):
    """transformers' model of `model_type` from its default config, on the meta device (names and structure only)."""
    import transformers as tf

    config = tf.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return tf.AutoModel.from_config(config)


def _expected_stack(name: str) -> str:
    top = name.split(".")[0]
    return "mask_decoder" if top in ("prompt_encoder", "mask_decoder") else "vision"


# ---------------------------------------------------------------------------------------------------------- 1. SAM


def test_sam_has_no_language_stack():
    """Every weight of a tiny SamModel: its vision encoder and shared positional embedding vision, its prompt encoder
    and mask decoder mask_decoder (they were None, the language model); the two-way transformer's layers keep their
    own numbers and roles (q, k, v, o, up, down)."""
    model = _tiny_sam()
    config = model.config.to_dict()
    names = [n for n, t in model.state_dict().items() if t.ndim >= 2]
    assert any(n.startswith("mask_decoder.transformer.layers.1.") for n in names)
    for tensor in names:
        name = tensor.removesuffix(".weight")
        assert module_info(name, config).stack == _expected_stack(name), name
    assert module_info("mask_decoder.transformer.layers.1.self_attn.q_proj", config) == ModuleInfo(
        "q", 1, None, "mask_decoder")
    assert module_info("mask_decoder.transformer.layers.0.mlp.lin2", config) == ModuleInfo(
        "down", 0, None, "mask_decoder")
    assert module_info("vision_encoder.layers.1.attn.qkv", config) == ModuleInfo("qkv", 1, None, "vision")
    # the two-way transformer's cross-attentions (tokens over the image, the image over the tokens) are
    # cross-attention's roles, apart from the layer's self-attention q (its three q_proj had shared one cell);
    # --roles q still takes them, as PEFT's target_modules=["q_proj"] does
    layer = "mask_decoder.transformer.layers.1"
    roles = {n: module_info(n, config).role for n in
             (f"{layer}.cross_attn_token_to_image.q_proj", f"{layer}.cross_attn_image_to_token.k_proj",
              f"{layer}.cross_attn_token_to_image.v_proj", f"{layer}.cross_attn_image_to_token.out_proj",
              "mask_decoder.transformer.final_attn_token_to_image.q_proj")}
    assert list(roles.values()) == ["xq", "xk", "xv", "xo", "xq"]
    assert role_selected("xq", ("q",)) and not role_selected("q", ("xq",))
    cells = {}
    for tensor in names:
        info = module_info(tensor.removesuffix(".weight"), config)
        if info.layer is not None and info.role in ("q", "k", "v", "o"):
            cells.setdefault((info.stack, info.layer, info.role), []).append(tensor)
    assert all(len(c) == 1 for c in cells.values()), cells  # a self-attention projection per cell
    # without config.json the names still say it: SAM's parts are no language model's
    assert module_info("prompt_encoder.mask_embed.conv1").stack == "mask_decoder"


@pytest.mark.parametrize("model_type", ["sam_hq", "sam2", "sam3_tracker"])
def test_sam_family_has_no_language_stack(model_type):
    """SAM-HQ, SAM 2 and SAM 3's tracker (one image: no memory) from transformers' default configs: every weight is
    vision or mask_decoder, by the same rule as SAM's."""
    model = _meta(model_type)
    config = model.config.to_dict()
    stacks = {}
    for tensor, parameter in model.named_parameters():
        name = tensor.removesuffix(".weight")
        stacks[name] = module_info(name, config).stack
        assert stacks[name] == _expected_stack(name), (model_type, name)
    assert set(stacks.values()) == {"vision", "mask_decoder"}


def test_mask_decoder_is_a_stack_a_selection_names():
    """--stacks mask_decoder parses, is in the names every --stacks lists, selects SAM's decoder and not its tower."""
    assert "mask_decoder" in STACKS and STACK_NAMES == ("language", *STACKS)
    assert parse_stacks("vision, mask_decoder") == ("vision", "mask_decoder")
    assert stack_selected("mask_decoder", parse_stacks("mask_decoder"))
    assert not stack_selected("vision", parse_stacks("mask_decoder"))
    assert not stack_selected("mask_decoder", parse_stacks("language"))


def _planted_sam_pair(path):
    """A tiny SAM saved as base and tuned, the tuned one's mask-decoder layer-1 q_proj and vision layer-0 MLP lin1
    moved by planted ranks 2 and 1."""
    base = _tiny_sam()
    base.save_pretrained(path / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q = base.get_parameter("mask_decoder.transformer.layers.1.self_attn.q_proj.weight")  # (8, 8)
        q += 0.1 * torch.randn(8, 2, generator=gen) @ torch.randn(2, 8, generator=gen)
        lin1 = base.get_parameter("vision_encoder.layers.0.mlp.lin1.weight")  # (32, 16)
        lin1 += 0.1 * torch.randn(32, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    base.save_pretrained(path / "tuned")
    return path / "base", path / "tuned"


def test_analyze_reports_a_sam_pair_without_a_language_stack(tmp_path):
    """spectra analyze on a tiny SAM pair: the rows are vision and mask_decoder, the report's stacks and per-role
    table say so ("mask_decoder q", no "language model"), and a rank plan selects the decoder by --stacks."""
    from spectra.analysis import analyze
    from spectra.errors import ConfigError
    from spectra.ranks.policy import RankPolicy
    from spectra.ranks.recommend import recommend_ranks
    from spectra.report.tables import stack_label, stacks_of

    base, tuned = _planted_sam_pair(tmp_path)
    result = analyze(base, tuned, cache_dir=False, progress=False)
    analysis = result.to_dict()
    rows = {r["name"]: r for r in result.matrices()}
    assert stacks_of(analysis) == ["vision", "mask_decoder"]
    assert {r.get("stack") for r in rows.values()} == {"vision", "mask_decoder"}
    assert rows["mask_decoder.transformer.layers.1.self_attn.q_proj"]["energy_rank"]["0.99"] == 2
    assert rows["mask_decoder.transformer.layers.1.self_attn.q_proj"]["stack"] == "mask_decoder"
    labels = {s["label"] for s in result.role_summary()}
    assert "mask_decoder q" in labels and "q" not in labels  # no language model's q
    assert "language model" not in {stack_label(s, stacks_of(analysis)) for s in stacks_of(analysis)}
    report = result.write_report(tmp_path / "report")
    text = (report / "report.md").read_text() if report.is_dir() else report.read_text()
    assert "mask_decoder" in text and "language model" not in text
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, stacks="mask_decoder"))
    ranks = {m.name: m.rank for m in plan.modules}
    assert ranks["mask_decoder.transformer.layers.1.self_attn.q_proj"] == 2
    assert not any(n.startswith("vision_encoder.") for n in ranks)
    with pytest.raises(ConfigError, match="its stacks are vision, mask_decoder"):
        recommend_ranks(analysis, RankPolicy(energy=0.99, stacks="language"))


# ----------------------------------------------------------------------------------- 2. hierarchical backbones


def _blocks_in_order(model: nn.Module, depths: list[int]) -> tuple[list[str], list[list[str]]]:
    """The reference, from the model's structure and config alone (no name rule): the container whose children are
    the len(depths) stages, each stage's list of depths[S] blocks; (stage names, block names per stage), in
    transformers' module order."""
    lists = (nn.ModuleList, nn.Sequential)
    outer = next(m for m in model.modules() if isinstance(m, lists) and len(m) == len(depths)
                 and all(any(isinstance(x, lists) and len(x) == d for x in stage.modules())
                         for stage, d in zip(m, depths)))
    names = {id(m): n for n, m in model.named_modules()}
    stages, blocks = [], []
    for stage, depth in zip(outer, depths):
        inner = next(x for x in stage.modules() if isinstance(x, lists) and len(x) == depth)
        stages.append(names[id(stage)])
        blocks.append([names[id(b)] for b in inner])
    return stages, blocks


@pytest.mark.parametrize("model_type", sorted(architectures._STAGE_LAYOUTS))
def test_a_hierarchical_backbones_layer_is_its_blocks_place_in_the_stack(model_type):
    """Every parameter inside a stage of transformers' model (default config, meta device): its layer is the place
    of its block among all the stack's blocks in module order; a stage's module outside its blocks (Swin's
    downsample, ConvNeXt's downsampling_layer) that of the stage's block next to it in module order. The blocks of
    one stage (Swin: they had the stage's number) and the first blocks of every stage (ConvNeXt: their number within
    the stage) are different rows of a layer × role table."""
    model = _meta(model_type)
    config = model.config.to_dict()
    depths = list(config[architectures._STAGE_LAYOUTS[model_type][1]])
    stages, blocks = _blocks_in_order(model, depths)
    flat = [b for stage in blocks for b in stage]
    order = [n for n, _ in model.named_modules()]
    checked, layers = 0, set()
    for tensor, _ in model.named_parameters():
        module = tensor.rpartition(".")[0]
        s = next((i for i, stage in enumerate(stages) if module.startswith(stage + ".")), None)
        if s is None:
            continue
        block = next((b for b in blocks[s] if module == b or module.startswith(b + ".")), None)
        if block is None:  # the stage's own module: beside its first block if it runs before them, else its last
            block = blocks[s][0] if order.index(module) < order.index(blocks[s][0]) else blocks[s][-1]
        assert module_info(module, config).layer == flat.index(block), (model_type, module)
        checked += 1
        layers.add(flat.index(block))
    assert checked and layers == set(range(sum(depths))), model_type  # every block is a layer of its own


def test_swin_layers_from_a_tiny_saved_model(tmp_path):
    """A tiny SwinModel (depths 2, 3, 2) saved: its checkpoint names read as blocks 0…6 in order, the patch merging
    (downsample) of a stage beside its last block; without config.json the names alone keep the stage's number (no
    depths to count with), which is the old reading and the negative control."""
    import transformers as tf
    from safetensors import safe_open

    model = tf.SwinModel(tf.SwinConfig(embed_dim=8, depths=[2, 3, 2], num_heads=[1, 1, 2], image_size=32,
                                       patch_size=4, window_size=2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = [n.removesuffix(".weight") for n in f.keys()
                 if n.endswith("intermediate.dense.weight") or ".reduction." in n]  # the hub's names, as saved
    layers = {n: module_info(n, config).layer for n in names}
    blocks = [(n.split(".")[2], n.split(".")[4]) for n in names if n.endswith("intermediate.dense")]  # (S, B)
    assert sorted(blocks, key=lambda sb: tuple(map(int, sb))) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1"),
                                                                  ("1", "2"), ("2", "0"), ("2", "1")]
    assert [layers[f"encoder.layers.{s}.blocks.{b}.intermediate.dense"] for s, b in
            sorted(blocks, key=lambda sb: tuple(map(int, sb)))] == list(range(7))
    assert layers["encoder.layers.0.downsample.reduction"] == 1 and layers["encoder.layers.1.downsample.reduction"] == 4
    assert module_info("encoder.layers.1.blocks.2.intermediate.dense", config) == ModuleInfo("up", 4, None, "vision")
    # negative control: without the depths, stage numbers, under which blocks 0 and 1 of stage 0 were one row
    assert {module_info(n).layer for n in names if n.startswith("encoder.layers.0.blocks.")} == {0}


def test_a_nested_backbones_decoder_keeps_its_layers():
    """Donut (VisionEncoderDecoder: a donut-swin encoder, an MBart decoder) and MaskFormer (a Swin backbone, a DETR
    decoder): the backbone's blocks count over its stages, the decoder's layers.N stay N (its names match a Swin
    stage's layers.S. too)."""
    donut = {"model_type": "vision-encoder-decoder", "is_encoder_decoder": True,
             "encoder": {"model_type": "donut-swin", "depths": [2, 2, 14, 2]}, "decoder": {"model_type": "mbart"}}
    assert module_info("encoder.encoder.layers.2.blocks.3.attention.self.query", donut) == ModuleInfo(
        "q", 7, None, "encoder")
    assert module_info("decoder.model.decoder.layers.3.self_attn.q_proj", donut).layer == 3
    assert module_info("decoder.model.decoder.layers.3.self_attn_layer_norm", donut).layer == 3
    maskformer = {"model_type": "maskformer", "backbone_config": {"model_type": "swin", "depths": [2, 2, 6, 2]}}
    backbone = "model.pixel_level_module.encoder.model.encoder.layers"
    assert module_info(f"{backbone}.3.blocks.1.output.dense", maskformer).layer == 11
    assert module_info(f"{backbone}.2.downsample.reduction", maskformer).layer == 9
    assert module_info("model.transformer_module.decoder.layers.5.self_attn.q_proj", maskformer).layer == 5


# ---------------------------------------------------------------------- 3. analysis.json written before stacks


def _old_vit_analysis() -> dict:
    """An analysis.json as spectra wrote it for a ViT before vision-only models had a stack: no row names one."""
    row = {"kind": "matrix", "shape": [32, 32], "layer": 0, "expert": None, "fro_norm": 0.5,
           "energy_rank": {"0.9": 2, "0.99": 2}, "singular_values": [0.4, 0.3], "base_tensor": None}
    names = {"encoder.layer.0.attention.attention.query": "q", "encoder.layer.0.attention.attention.value": "v",
             "encoder.layer.0.intermediate.dense": "up"}
    modules = [{**row, "name": n, "role": r, "base_tensor": f"{n}.weight"} for n, r in names.items()]
    return {"schema_version": 1, "config": {"thresholds": [0.9, 0.99]}, "base": {"path": "b"}, "tuned": {"path": "t"},
            "versions": {}, "timings": {}, "pairing": {"entries": 3, "config_model_type": "vit"}, "modules": modules}


def test_rows_of_an_old_vit_analysis_read_as_vision():
    """The rows of an old ViT analysis read as the vision stack (by pairing.config_model_type, as single_stack reads
    config.json); an old Gemma 3's tower rows by their names; an LM's and an unknown model's rows keep none (the
    language model), and a row that names a stack keeps it."""
    old = _old_vit_analysis()
    assert model_type_of(old) == "vit"
    assert {r.get("stack") for r in rows_with_stacks(old["modules"], model_type_of(old))} == {"vision"}
    assert all("stack" not in r for r in old["modules"])  # the analysis itself is not changed
    gemma = [{"name": "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"},
             {"name": "language_model.model.layers.0.self_attn.q_proj"}]
    assert [r.get("stack") for r in rows_with_stacks(gemma, "gemma3")] == ["vision", None]
    llama = [{"name": "model.layers.0.self_attn.q_proj"}]
    assert rows_with_stacks(llama, "llama") == llama and rows_with_stacks(llama, None) == llama
    assert "stack" not in rows_with_stacks(old["modules"], None)[0]  # negative control: no model type, no vision
    assert rows_with_stacks([{"name": "x.layers.0.q_proj", "stack": "encoder"}], "vit")[0]["stack"] == "encoder"
    assert model_type_of({"modules": []}) is None


# ------------------------------------------------------------------------------------------ every other model


_SAM_TYPES = frozenset({"sam", "sam_hq", "sam2", "sam3_tracker", "edgetam"})


@pytest.mark.slow
def test_the_changes_touch_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device: a module's layer differs from the name's old reading only
    in a model whose config (or its backbone's, encoder's, vision tower's) is a hierarchical type of
    _STAGE_LAYOUTS; its stack only under a SAM-style prompt_encoder, mask_decoder or mask_downsample (mask_decoder)
    or in a model of the SAM types (the rest vision)."""
    from tests.models import meta_models, quiet_transformers

    rules = tuple(r for r in architectures._STACK_REGEXES if r[1] != "mask_decoder")
    assert len(rules) == len(architectures._STACK_REGEXES) - 1
    relayered, restacked = set(), set()
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            names = [n for n, _ in model.named_modules() if n]
            now = {n: module_info(n, config) for n in names}
            with monkeypatch.context() as patch:
                patch.setattr(architectures, "_staged_layer", lambda name, config: None)
                patch.setattr(architectures, "_STACK_REGEXES", rules)
                patch.setattr(architectures, "_VISION_ONLY", architectures._VISION_ONLY - _SAM_TYPES)
                before = {n: module_info(n, config) for n in names}
            nested = [config.get(k) for k in ("backbone_config", "encoder", "vision_config")]
            staged = {c.get("model_type") for c in (config, *nested) if isinstance(c, dict)} & set(
                architectures._STAGE_LAYOUTS)
            for n in names:
                if now[n].layer != before[n].layer:
                    assert staged, (model_type, n, before[n].layer, now[n].layer)
                    relayered.add(model_type)
                if now[n].stack != before[n].stack:
                    # a video tracker's mask_downsample (its mask prompt's, into the prompt encoder): session 21
                    sam = {"prompt_encoder", "mask_decoder", "mask_downsample"} & set(n.split("."))
                    assert sam or model_type in _SAM_TYPES, (model_type, n, before[n].stack, now[n].stack)
                    assert now[n].stack in ("mask_decoder", "vision"), (model_type, n)
                    restacked.add(model_type)
    assert {"swin", "convnext", "segformer"} <= relayered, sorted(relayered)
    assert {"sam", "sam2"} <= restacked, sorted(restacked)
