"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and Qwen3.5's tower): vision roles, the fused qkv split, the merger as projector,
pairing through the hub's names, extraction; Qwen3-VL-MoE's experts in both stored layouts.

Each model is built tiny from config (a 2-block vision tower of width 16, a 2-layer GQA language model of width 32),
its weights on the 2⁻¹² grid of :mod:`tests.models`, so planted updates come back exactly. As in
test_more_architectures.py the references are the models themselves: roles, layers and stacks read off their
submodules; the rows of ``attn.qkv`` that spectra calls q, k and v checked against the query, key and value that
the model's own attention computes; transformers' loading for the expert layouts; PEFT's loading, merge and forward
for the extracted adapters.

What was wrong: the vision tower's ``attn.qkv`` was never split (its layout unknown to spectra; Qwen2-VL's
``vision_config`` names its width ``embed_dim`` and its heads ``num_heads``, its ``hidden_size`` being the language
model's), ``attn.proj`` was role other, Qwen3-VL's ``mlp.linear_fc1``/``linear_fc2`` other, and the merger
(``visual.merger``, Qwen3-VL's ``visual.deepstack_merger_list.N`` too), which maps the tower's features into the
language model, counted as the vision tower's. Qwen2-VL and Qwen2.5-VL checkpoints store the hub's names
(``visual.…``, ``model.layers.N…``), which transformers 5 loads as ``model.visual.…`` and
``model.language_model.layers.N…``; Qwen3-VL stores the model's own. Qwen3-VL-MoE's hub checkpoints store the
experts (E, in, out), which spectra read as (out, in); extract refused its experts and the adapter reader a LoRA on
them (transformers transposes such experts on loading, which spectra's placement did not read).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spectra.checkpoints.architectures import fused_projections, module_info
from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.lora.extract import extract_adapter
from tests.checkpoints.test_adapter_pairing import check_renamed_against_merge
from tests.checkpoints.test_more_architectures import _planted, _planted_pair, linears, pair
from tests.checkpoints.test_pairing import F64, assert_exact
from tests.lora.test_extract import merged_state
from tests.models import add_to_parameter, low_rank, on_grid, random_adapter

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Qwen3-VL's tower beside an MoE language model (Qwen3-VL-MoE), a hybrid linear-attention one (Qwen3.5), both (-MoE);
# the Omni models' thinkers: Qwen2.5-Omni's tower (Qwen2.5-VL's, attn.q, k and v Linears), Qwen3-Omni's (Qwen3-VL's)
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")
TOWERS = (*FAMILIES, "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", *OMNI)
QKV_TOWERS = tuple(f for f in TOWERS if f != "qwen2_5_omni")  # the towers with a fused attn.qkv
WIDTH, HEADS = 16, 2  # the vision tower's width and heads: attn.qkv is (3·16, 16)
IMAGE_TOKEN, VISION_START = 60, 62
GRID_THW = torch.tensor([[1, 4, 8]])  # an image of 4 × 8 patches of 3·1·2·2 values: 8 tokens after the 2 × 2 merge


def tiny(family: str):
    """A tiny Qwen-VL ForConditionalGeneration with eager attention (so its attention inputs can be captured)."""
    import transformers as tf

    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, rope_parameters=rope)
    patches = dict(depth=2, num_heads=HEADS, patch_size=2, spatial_merge_size=2, temporal_patch_size=1)
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=61, vision_start_token_id=VISION_START)
    if family == "qwen2_vl":  # fc1/fc2 MLP; embed_dim is the tower's width, hidden_size the merger's output
        config = tf.Qwen2VLConfig(text_config=text, vision_config=patches | dict(embed_dim=WIDTH, hidden_size=32,
                                  mlp_ratio=2), **tokens)
        cls = tf.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":  # gated MLP; window attention in block 0, full in block 1
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=patches | dict(
            hidden_size=WIDTH, intermediate_size=24, out_hidden_size=32, window_size=8, fullatt_block_indexes=[1]),
            **tokens)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family in ("qwen3_vl", "qwen3_vl_moe"):  # linear_fc1/fc2 MLP, position embedding, a deepstack merger
        text |= dict(head_dim=8, rope_parameters=rope | dict(mrope_interleaved=True))
        vision = patches | dict(hidden_size=WIDTH, intermediate_size=24, out_hidden_size=32,
                                num_position_embeddings=16, deepstack_visual_indexes=[0])
        if family == "qwen3_vl":
            config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen3VLForConditionalGeneration
        else:  # 3 experts of width 12 (gate_up_proj (3, 24, 32), down_proj (3, 32, 12)) and a router, mlp.gate
            text |= dict(moe_intermediate_size=12, num_experts=3, num_experts_per_tok=2)
            config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen3VLMoeForConditionalGeneration
    elif family in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's tower; a Gated DeltaNet layer, then a full-attention one
        text |= dict(head_dim=8, rope_parameters=rope | dict(mrope_interleaved=True, partial_rotary_factor=0.5),
                     layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                     linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
        vision = patches | dict(hidden_size=WIDTH, intermediate_size=24, out_hidden_size=32,
                                num_position_embeddings=16)
        if family == "qwen3_5":
            config = tf.Qwen3_5Config(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen3_5ForConditionalGeneration
        else:
            text |= dict(moe_intermediate_size=12, shared_expert_intermediate_size=12, num_experts=3,
                         num_experts_per_tok=2)
            config = tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **tokens)
            cls = tf.Qwen3_5MoeForConditionalGeneration
    elif family in OMNI:  # the thinker alone (the whole model adds a talker and a vocoder): its tower and LM
        audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=24, num_mel_bins=8,
                     output_dim=32, n_window=4)
        if family == "qwen2_5_omni":
            vision = patches | dict(hidden_size=WIDTH, intermediate_size=24, out_hidden_size=32, window_size=8,
                                    fullatt_block_indexes=[1])
            config = tf.Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio, **tokens)
            cls = tf.Qwen2_5OmniThinkerForConditionalGeneration
        else:
            text |= dict(head_dim=8, moe_intermediate_size=12, num_experts=3, num_experts_per_tok=2,
                         rope_parameters=rope | dict(mrope_interleaved=True))
            vision = patches | dict(hidden_size=WIDTH, intermediate_size=24, out_hidden_size=32,
                                    num_position_embeddings=16, deepstack_visual_indexes=[0])
            config = tf.Qwen3OmniMoeThinkerConfig(text_config=text, vision_config=vision, audio_config=audio)
            cls = tf.Qwen3OmniMoeThinkerForConditionalGeneration
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    return on_grid(cls, config)


def stored(family: str, name: str) -> str:
    """A module's name in the checkpoint: Qwen2-VL and Qwen2.5-VL save the hub's names, Qwen3-VL the model's; the
    Omni models' hub checkpoints (the whole model's) name the thinker's tower thinker.visual.…"""
    if family in OMNI:
        return name.replace("model.visual.", "thinker.visual.", 1)
    if family.startswith("qwen3"):
        return name
    return name.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)


def pixels():
    return torch.randn(32, 12, generator=torch.Generator().manual_seed(0))


def inputs():
    """A whole multimodal batch: a vision-start token, the image's 8 tokens, text."""
    ids = torch.tensor([[1, VISION_START] + [IMAGE_TOKEN] * 8 + [3, 4, 5]])
    return dict(input_ids=ids, pixel_values=pixels(), image_grid_thw=GRID_THW,
                mm_token_type_ids=(ids == IMAGE_TOKEN).int())


# -- roles, layers and stacks -----------------------------------------------------------------------------------------

VISION_ROLES = {"attn.qkv": "qkv", "attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.proj": "o", "mlp.fc1": "up",
                "mlp.fc2": "down", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
                "mlp.linear_fc1": "up", "mlp.linear_fc2": "down"}
TEXT_ROLES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
              "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down", "mlp.gate": "other"}  # a router


def _expected(model, *, text: bool = True) -> dict[str, tuple[str, int | None, str | None]]:
    """Every Linear → (role, layer, stack), read off the model's own block, layer and merger lists (the language
    model's too, with `text`); a deepstack merger's layer is its index in its list, the last layer's merger has none."""
    visual, out = model.model.visual, {"lm_head": ("head", None, None)} if text else {}
    stacks = [("model.visual.blocks", visual.blocks, VISION_ROLES, "vision")]
    if text:
        stacks.append(("model.language_model.layers", model.model.language_model.layers, TEXT_ROLES, None))
    for prefix, layers, roles, stack in stacks:
        for i, layer in enumerate(layers):
            for path, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    out[f"{prefix}.{i}.{path}"] = (roles[path], i, stack)
    mergers = [("model.visual.merger", visual.merger, None)]
    for attribute, merger_list in visual.named_children():  # Qwen3-VL's deepstack mergers, Qwen3-Omni's
        if attribute in ("deepstack_merger_list", "merger_list"):
            mergers += [(f"model.visual.{attribute}.{i}", m, i) for i, m in enumerate(merger_list)]
    for prefix, merger, layer in mergers:
        for path, module in merger.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"{prefix}.{path}"] = ("projector", layer, "projector")
    return out


@pytest.mark.parametrize("family", TOWERS)
def test_every_linear_gets_its_role_layer_and_stack(family, tmp_path):
    """By the model's names and by the checkpoint's (Qwen2-VL's visual.…, model.layers.N…), the saved config's.
    Qwen3.5's language model (Gated DeltaNet layers beside full attention) has a test of its own, the Omni thinkers'
    language model and audio tower are not this file's: their tower only (by the whole model's config too)."""
    model = tiny(family)
    config = json.loads((pair(tmp_path, model, model)[0] / "config.json").read_text())
    text = not family.startswith("qwen3_5") and family not in OMNI
    expected = _expected(model, text=text)
    names = [n for n in linears(model) if text or n.startswith("model.visual.")]
    assert sorted(names) == sorted(expected)  # the reference covers every Linear
    for name in names:
        for as_named in (name, stored(family, name)):
            info = module_info(as_named, config)
            assert (info.role, info.layer, info.stack) == expected[name], as_named
    vision_roles = {role for role, _, stack in expected.values() if stack == "vision"}
    attention = {"q", "k", "v"} if family == "qwen2_5_omni" else {"qkv"}
    assert vision_roles == attention | {"o", "up", "down"} | ({"gate"} if "2_5" in family else set())
    visual = model.model.visual
    deepstack = sum(len(m) for n, m in visual.named_children() if n.endswith("merger_list"))  # after block 0
    assert sum(stack == "projector" for _, _, stack in expected.values()) == 2 * (1 + deepstack)
    assert deepstack == (1 if family.startswith(("qwen3_vl", "qwen3_omni")) else 0)
    assert {layer for _, layer, stack in expected.values() if stack == "projector"} == {None, *range(deepstack)}
    if family in OMNI:  # the whole model's config.json: the thinker's, nested
        whole = {"model_type": family, "thinker_config": config}
        assert all(module_info(stored(family, n), whole) == module_info(n, config) for n in names)


@pytest.mark.parametrize("family", QKV_TOWERS)
def test_vision_qkv_split_by_the_hubs_configs(family):
    """The hub's config.json holds a vision_config with no model_type (Qwen2.5-VL-7B's) or the whole model's: the split
    is the same. Qwen2-VL's hidden_size (32 here) is the merger's output, not the tower's width (embed_dim, 16)."""
    model = tiny(family)
    config = model.config.to_dict()
    name = "model.visual.blocks.1.attn.qkv"
    split = [(p.role, p.rows) for p in fused_projections(name, "qkv", 3 * WIDTH, config)]
    assert split == [("q", slice(0, 16)), ("k", slice(16, 32)), ("v", slice(32, 48))]
    vision = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    for hub in (config | {"vision_config": vision}, config | {"vision_config": vision | {"model_type": family}}):
        assert [(p.role, p.rows) for p in fused_projections(stored(family, name), "qkv", 3 * WIDTH, hub)] == split
    if family == "qwen2_vl":  # negative control: sized by hidden_size, the blocks do not add up to 48 rows
        wrong = config | {"vision_config": config["vision_config"] | {"embed_dim": 32}}
        assert fused_projections(name, "qkv", 3 * WIDTH, wrong) == []
    if family in OMNI:  # the whole model's config.json nests the thinker's: thinker_config.vision_config
        whole = {"model_type": family, "thinker_config": config}
        assert [(p.role, p.rows) for p in fused_projections(stored(family, name), "qkv", 3 * WIDTH, whole)] == split
        wrong = {"model_type": family, "thinker_config": config | {"vision_config": vision | {"hidden_size": 32}}}
        assert fused_projections(stored(family, name), "qkv", 3 * WIDTH, wrong) == []  # negative control
    text_q = "model.language_model.layers.0.self_attn.q_proj"
    assert fused_projections(text_q, module_info(text_q, config).role, 32, config) == []


def _capture_qkv(monkeypatch, model, attention: str):
    """(query, key, value) of the vision attention at `attention` as its forward computes them from attn.qkv, before
    the rotary embedding turns query and key: (seq, heads, head_dim) each, the value gathered from the attention
    function's per-window calls."""
    modeling = __import__(type(model).__module__, fromlist=["_"])
    target, seen, active = model.get_submodule(attention), {"v": []}, []
    hooks = (target.register_forward_pre_hook(lambda *_: active.append(True)),
             target.register_forward_hook(lambda *_: active.clear()))
    rotary, attend = modeling.apply_rotary_pos_emb_vision, modeling.eager_attention_forward

    def capture_rotary(q, k, *args, **kwargs):
        if active:
            seen.update(q=q.detach().clone(), k=k.detach().clone())
        return rotary(q, k, *args, **kwargs)

    def capture_attention(module, query, key, value, *args, **kwargs):
        if module is target:
            seen["v"].append(value.detach().clone())  # (1, heads, window, head_dim)
        return attend(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb_vision", capture_rotary)
    monkeypatch.setattr(modeling, "eager_attention_forward", capture_attention)
    with torch.no_grad():
        model.model.visual(pixels(), grid_thw=GRID_THW)
    monkeypatch.undo()
    for hook in hooks:
        hook.remove()
    return seen["q"], seen["k"], torch.cat(seen["v"], dim=2)[0].transpose(0, 1)


@pytest.mark.parametrize("family", QKV_TOWERS)
@pytest.mark.parametrize("block", [0, 1])  # Qwen2.5-VL: window attention, then full
def test_vision_qkv_rows_are_the_query_key_and_value_the_model_computes(monkeypatch, family, block):
    """An update planted in the rows fused_projections calls q (k, v) changes, in the model's forward, the query (key,
    value) by exactly x @ ΔWᵀ, x the attention's input, and leaves the other two bit for bit."""
    base = tiny(family)
    attention = f"model.visual.blocks.{block}.attn"
    name = attention + ".qkv"
    seen = {}
    handle = base.get_submodule(attention).register_forward_pre_hook(
        lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    with torch.no_grad():
        base.model.visual(pixels(), grid_thw=GRID_THW)
    handle.remove()
    x = seen["x"]  # (seq, width); Qwen2.5-VL's in window order
    projections = fused_projections(name, "qkv", 3 * WIDTH, base.config.to_dict())
    assert [p.role for p in projections] == ["q", "k", "v"]
    before = _capture_qkv(monkeypatch, base, attention)
    for seed, proj in enumerate(projections, 1):
        delta = low_rank(WIDTH, WIDTH, 1, seed=seed)
        tuned = copy.deepcopy(base)
        add_to_parameter(tuned, name + ".weight", delta, rows=proj.rows)
        after = _capture_qkv(monkeypatch, tuned, attention)
        for i, role in enumerate("qkv"):
            if role == proj.role:
                expected = (x @ delta.float().T).view(x.shape[0], HEADS, WIDTH // HEADS)
                torch.testing.assert_close(after[i] - before[i], expected, rtol=0, atol=1e-6, msg=role)
            else:
                assert torch.equal(after[i], before[i]), (proj.role, role)


# -- Qwen3.5's Gated DeltaNet ------------------------------------------------------------------------------------------

DELTANET = "model.language_model.layers.0.linear_attn"  # tiny()'s: 2 key heads of 8, 4 value heads of 8
DELTANET_SPLIT = [("q", slice(0, 16)), ("k", slice(16, 32)), ("v", slice(32, 64))]


def _capture_deltanet(monkeypatch, model) -> tuple[torch.Tensor, ...]:
    """(query, key, value) that layer 0's Gated DeltaNet hands its gated delta rule, after its depthwise convolution."""
    modeling = __import__(type(model).__module__, fromlist=["_"])
    rule, seen = modeling.torch_chunk_gated_delta_rule, []

    def capture(query, key, value, *args, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return rule(query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", capture)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 3, 4, 5, 7, 2]]))
    monkeypatch.undo()
    (captured,) = seen  # one linear-attention layer
    return captured


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_deltanet_in_proj_qkv_rows_are_the_query_key_and_value_it_computes(monkeypatch, family):
    """linear_attn.in_proj_qkv is role qkv, split [q; k; v] by text_config's linear key and value heads (16, 16, 32
    rows: 2 key heads, 4 value heads, of 8), by the whole model's config and the text model's; in_proj_z, a, b stay
    other, out_proj is o. An update planted in the rows called q (k, v) changes the query (key, value) the forward
    hands its gated delta rule and leaves the other two bit for bit (the convolution between is per channel). It was
    role other, unsplit."""
    base = tiny(family)
    config = base.config.to_dict()
    name = DELTANET + ".in_proj_qkv"
    assert [module_info(f"{DELTANET}.{leaf}", config).role for leaf in ("in_proj_qkv", "in_proj_z", "in_proj_a",
                                                                        "in_proj_b", "out_proj")] == \
        ["qkv", "other", "other", "other", "o"]
    text = config["text_config"]
    for cfg in (config, text):
        assert [(p.role, p.rows) for p in fused_projections(name, "qkv", 64, cfg)] == DELTANET_SPLIT
    assert fused_projections(name, "qkv", 64, text | {"linear_num_value_heads": 2}) == []  # sizes that do not add up
    assert fused_projections(name, "qkv", 64, text | {"model_type": "qwen3_next"}) == []  # another family's layout
    before = _capture_deltanet(monkeypatch, base)
    for seed, (role, rows) in enumerate(DELTANET_SPLIT, 1):
        tuned = copy.deepcopy(base)
        add_to_parameter(tuned, name + ".weight", low_rank(rows.stop - rows.start, 32, 1, seed=seed), rows=rows)
        after = _capture_deltanet(monkeypatch, tuned)
        for i, other in enumerate("qkv"):
            assert torch.equal(after[i], before[i]) == (other != role), (role, other)


def test_deltanet_pairing_splits_in_proj_qkv_and_extracts(tmp_path):
    """Planted k and v rows of a Qwen3.5 in_proj_qkv come back exactly as in_proj_qkv[k] and [v] (q zero); an adapter
    extracted for --roles v takes the fused module whole, and PEFT's merge is the fine-tune (1e-6)."""
    base = tiny("qwen3_5")
    name = DELTANET + ".in_proj_qkv"
    tuned, deltas = _planted(base, {name: ((16, 64), 2)})
    b, t = pair(tmp_path, base, tuned)
    seen = assert_exact(Pairing(b, t, F64), deltas | {f"{name}[k]": deltas[name][16:32],
                                                      f"{name}[v]": deltas[name][32:]})
    assert [(seen[f"{name}[{r}]"].role, seen[f"{name}[{r}]"].shape, seen[f"{name}[{r}]"].layer) for r in "qkv"] == \
        [("q", (16, 32), 0), ("k", (16, 32), 0), ("v", (32, 32), 0)]
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("v",), progress=False)
    assert name in {m.name for m in result.modules}
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


# -- pairing and extraction --------------------------------------------------------------------------------------------

def _planted_modules(family: str) -> dict:
    """module (the model's name) → (rows of its (out, in) weight or None, rank)."""
    up = {"qwen2_vl": "mlp.fc1", "qwen2_5_vl": "mlp.up_proj", "qwen3_vl": "mlp.linear_fc1"}[family]
    merger = "model.visual.merger." + ("linear_fc2" if family == "qwen3_vl" else "mlp.2")
    planted = {"model.visual.blocks.0.attn.qkv": ((0, 16), 1),  # q rows only
               "model.visual.blocks.1.attn.qkv": ((32, 48), 2),  # v rows only
               "model.visual.blocks.1.attn.proj": (None, 2),
               f"model.visual.blocks.0.{up}": (None, 1),
               merger: (None, 2),
               "model.language_model.layers.1.self_attn.q_proj": (None, 2)}
    if family == "qwen3_vl":
        planted["model.visual.deepstack_merger_list.0.linear_fc1"] = (None, 1)
    return planted


@pytest.fixture(scope="module", params=FAMILIES)
def planted_pair(request, tmp_path_factory):
    family = request.param
    return family, *_planted_pair(tmp_path_factory.mktemp(family), tiny(family), _planted_modules(family))


def test_pairing_is_the_planted_update_with_the_vision_qkv_split(planted_pair):
    family, base, _, planted, b, t = planted_pair
    deltas = {stored(family, name): d for name, d in planted.items()}
    qkv0, qkv1 = (stored(family, f"model.visual.blocks.{i}.attn.qkv") for i in (0, 1))
    expected = deltas | {f"{qkv0}[q]": deltas[qkv0][:16], f"{qkv1}[v]": deltas[qkv1][32:]}  # [k], …: zero
    seen = assert_exact(Pairing(b, t, F64), expected)
    assert [(seen[f"{qkv0}[{r}]"].role, seen[f"{qkv0}[{r}]"].shape, seen[f"{qkv0}[{r}]"].stack,
             seen[f"{qkv0}[{r}]"].fused_name) for r in "qkv"] == [(r, (16, 16), "vision", qkv0) for r in "qkv"]
    reference = _expected(base)  # by the model's names: the checkpoint's read as the modules they load into
    for name in planted:
        d = seen[stored(family, name)]
        assert (d.role, d.layer, d.stack) == reference[name], name
    assert {seen[n].stack for n in deltas if "merger" in n} == {"projector"}
    picked = {d.name for d in Pairing(b, t, PairingOptions(roles=("o",), vectors=False, load=False))
              if "visual" in d.name}
    assert picked == {stored(family, f"model.visual.blocks.{i}.attn.proj") for i in (0, 1)}


def test_extracted_adapter_merges_to_the_planted_update_and_runs_as_the_fine_tune(planted_pair, tmp_path):
    """Rank 2 is exact on these rank ≤ 2 updates: PEFT loads the adapter under the model's names (model.visual.…),
    merges it to the tuned model, and the unmerged adapter's logits on an image and text are the fine-tune's."""
    from peft import PeftModel

    family, base, tuned, deltas, b, t = planted_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q", "k", "v", "o", "up", "projector"), progress=False)
    assert result.model_class == type(base).__name__
    assert set(deltas) <= {m.name for m in result.modules}  # the model's names, as PEFT finds the modules
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        logits, expected, original = (m(**inputs()).logits for m in (peft_model, tuned, base))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert float((original - expected).abs().max()) > 1e-3  # negative control: the fine-tune moves the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_on_the_vision_tower_merger_and_language_model_equals_peft_merge(family, tmp_path):
    """A PEFT LoRA on the model's modules (model.visual.…, model.language_model.…) paired with a base that stores
    Qwen2-VL's hub names: each ΔW, the qkv's q, k and v too, is PEFT's merge minus the base."""
    base = tiny(family)
    b = pair(tmp_path, base, base)[0]
    merger = "linear_fc1" if family == "qwen3_vl" else "mlp.0"
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4,
                                target_modules=["qkv", "attn.proj", f"merger.{merger}", "q_proj"])
    yielded = check_renamed_against_merge(base, b, tmp_path / "ad", peft_model, tmp_path)
    qkv = stored(family, "model.visual.blocks.0.attn.qkv")
    assert {qkv, f"{qkv}[q]", f"{qkv}[v]", stored(family, f"model.visual.merger.{merger}"),
            stored(family, "model.language_model.layers.1.self_attn.q_proj")} <= set(yielded)
    assert len(yielded) == 2 * (1 + 3 + 1) + 1 + 2  # per block qkv, its split and proj; the merger; two q_proj


# -- Qwen3-VL-MoE's experts ------------------------------------------------------------------------------------------

MOE = "model.language_model.layers.{}.mlp.experts.{}"


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """A tiny Qwen3-VL-MoE and a fine-tune of three experts, a q_proj and the tower's q, saved as transformers 5
    saves it (experts (E, out, in)) and as the hub stores it (experts (E, in, out)): (base, tuned, {layout: (base
    dir, tuned dir)}, {ΔW name: ΔW})."""
    root = tmp_path_factory.mktemp("qwen3-vl-moe")
    base = tiny("qwen3_vl_moe")
    tuned = copy.deepcopy(base)
    dgate, dup, ddown = low_rank(12, 32, 2, seed=1), low_rank(12, 32, 1, seed=2), low_rank(32, 12, 2, seed=3)
    add_to_parameter(tuned, MOE.format(1, "gate_up_proj"), dgate, expert=2, rows=slice(0, 12))
    add_to_parameter(tuned, MOE.format(0, "gate_up_proj"), dup, expert=0, rows=slice(12, 24))
    add_to_parameter(tuned, MOE.format(0, "down_proj"), ddown, expert=1)
    dq, dqkv = low_rank(32, 32, 2, seed=4), low_rank(16, 16, 1, seed=5)  # attention's, the tower's q rows
    add_to_parameter(tuned, "model.language_model.layers.1.self_attn.q_proj.weight", dq)
    add_to_parameter(tuned, "model.visual.blocks.0.attn.qkv.weight", dqkv, rows=slice(0, 16))
    zeros = torch.zeros(12, 32, dtype=torch.float64)
    planted = {MOE.format(1, "2.gate_up_proj"): torch.cat([dgate, zeros]), MOE.format(1, "2.gate_up_proj[gate]"): dgate,
               MOE.format(0, "0.gate_up_proj"): torch.cat([zeros, dup]), MOE.format(0, "0.gate_up_proj[up]"): dup,
               MOE.format(0, "1.down_proj"): ddown, "model.language_model.layers.1.self_attn.q_proj": dq,
               "model.visual.blocks.0.attn.qkv": torch.cat([dqkv, torch.zeros(32, 16, dtype=torch.float64)]),
               "model.visual.blocks.0.attn.qkv[q]": dqkv}
    return base, tuned, _layouts(root, base, tuned), planted


def _transposed_experts(folder, to):
    """A copy of a saved checkpoint with every 3-D expert tensor stored (E, in, out), as Qwen3-VL-MoE's hub holds it."""
    import shutil

    from safetensors.torch import load_file, save_file

    to.mkdir(parents=True)
    shutil.copy(folder / "config.json", to / "config.json")
    state = load_file(folder / "model.safetensors")
    state = {k: v.transpose(1, 2).contiguous() if ".experts." in k else v for k, v in state.items()}
    save_file(state, to / "model.safetensors", metadata={"format": "pt"})
    return to


def _layouts(root, base, tuned) -> dict[str, tuple]:
    """{layout: (base dir, tuned dir)}: as transformers 5 saves them, and with every expert transposed (the hub's)."""
    saved = pair(root / "t5", base, tuned)
    return {"transformers 5": saved, "hub": tuple(_transposed_experts(d, root / "hub" / d.name) for d in saved)}


@pytest.mark.parametrize("layout", ["transformers 5", "hub"])
def test_qwen3_vl_moe_experts_are_read_as_the_model_holds_them_in_either_layout(moe_pair, layout):
    """transformers loads both layouts into the same model (it transposes where the stored shape is the transpose of
    its own); each expert's ΔW comes out (out, in) as the model holds it, gate rows [0, 12) and up [12, 24) of
    gate_up_proj[e]. The hub's (E, 32, 24) was read as stored: a (32, 24) 'gate_up' split into halves of hidden rows."""
    import transformers as tf

    base, tuned, layouts, planted = moe_pair
    b, t = layouts[layout]
    for folder, model in ((b, base), (t, tuned)):  # the reference: transformers reads the layout as this model
        loaded = tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    seen = assert_exact(Pairing(b, t, F64), planted)
    assert {seen[n].shape for n in seen if ".experts." in n and "gate_up_proj[" in n} == {(12, 32)}
    assert {seen[n].shape for n in seen if n.endswith("down_proj")} == {(32, 12)}
    d = seen[MOE.format(1, "2.gate_up_proj[gate]")]
    assert (d.role, d.layer, d.expert, d.stack) == ("gate", 1, 2, None)
    assert {seen[n].conv1d for n in seen if ".experts." in n} == {layout == "hub"}


@pytest.mark.parametrize("layout", ["transformers 5", "hub"])
def test_qwen3_vl_moe_experts_extract_onto_the_parameters_and_peft_merges_to_the_fine_tune(moe_pair, layout,
                                                                                          tmp_path):
    """The experts' LoRA is written on the model's gate_up_proj and down_proj (target_parameters, as PhiMoE's), from
    either stored layout: PEFT's own merge is the fine-tune (rank 2 is exact on these rank ≤ 2 updates; 1e-6 on
    2⁻¹²-grid weights), the PEFT model's logits are the fine-tune's, and spectra reads the adapter back as the planted
    updates. Extract refused the experts by name (it resolved no parameter for a stored 3-D tensor, and placement
    did not read transformers' transposing converter)."""
    import json

    from peft import PeftModel

    base, tuned, layouts, planted = moe_pair
    b, t = layouts[layout]
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("gate", "up", "down", "q"), progress=False)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(MOE.format(i, p) for i in (0, 1)
                                                         for p in ("gate_up_proj", "down_proj"))
    names = {m.name for m in result.modules}
    assert {MOE.format(1, "2.gate_up_proj"), MOE.format(0, "1.down_proj")} <= names  # each expert by its own name
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)
    ids = torch.tensor([[1, 5, 9, 3, 4, 5, 7, 2]])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        logits, expected, original = (m(input_ids=ids).logits for m in (peft_model, tuned, base))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert float((original - expected).abs().max()) > 1e-3  # negative control: the fine-tune moves the logits
    read = {d.name: d.delta for d in Pairing(b, tmp_path / "ad", PairingOptions(vectors=False))}
    for name, delta in planted.items():
        if "visual" not in name:  # the tower's q is role qkv here, not extracted
            torch.testing.assert_close(read[name], delta.float(), rtol=0, atol=1e-6, msg=name)


def test_qwen3_vl_moe_adapter_on_the_experts_reads_as_peft_merges_it(moe_pair, tmp_path):
    """A PEFT adapter on the experts (target_parameters) against either stored layout: each expert's ΔW (out, in) is
    PEFT's merge minus the base, the model's gate_up_proj[e] and down_proj[e]. It was refused: placement did not read
    transformers' transposing converter."""
    base, _, layouts, _ = moe_pair
    peft_model = random_adapter(base, tmp_path / "experts", r=2, lora_alpha=4, target_modules=["q_proj"],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    merged, state = peft_model.merge_and_unload().state_dict(), base.state_dict()
    for b, _ in layouts.values():
        yielded = {d.name: d for d in Pairing(b, tmp_path / "experts", PairingOptions(vectors=False))}
        assert len(yielded) == 2 + 2 * 3 * (3 + 1)  # two q_proj; per layer and expert gate_up, [gate], [up], down
        for layer in (0, 1):
            for e in range(3):
                for proj in ("gate_up_proj", "down_proj"):
                    key = MOE.format(layer, proj)
                    delta = yielded[MOE.format(layer, f"{e}.{proj}")].delta
                    torch.testing.assert_close(delta, merged[key][e] - state[key][e], rtol=1e-5, atol=1e-6)
                gate = yielded[MOE.format(layer, f"{e}.gate_up_proj[gate]")].delta
                torch.testing.assert_close(gate, merged[MOE.format(layer, "gate_up_proj")][e, :12]
                                           - state[MOE.format(layer, "gate_up_proj")][e, :12], rtol=1e-5, atol=1e-6)
        q = "model.language_model.layers.1.self_attn.q_proj"
        torch.testing.assert_close(yielded[q].delta, merged[q + ".weight"] - state[q + ".weight"], rtol=1e-5,
                                   atol=1e-6)


def test_qwen2_vl_plan_ranks_reach_the_models_modules(tmp_path):
    """A plan from analyze names Qwen2-VL's modules as stored (visual.…, model.layers.N…); the adapter's
    rank_pattern and target_modules name the model's (model.visual.…, model.language_model.…), so PEFT gives each
    module its planted rank (1 where the plan's default r is 2) and the merge is the fine-tune."""
    from peft import PeftModel

    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks

    base = tiny("qwen2_vl")
    planted = _planted_modules("qwen2_vl")
    tuned, _ = _planted(base, planted)
    b, t = pair(tmp_path, base, tuned)
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("q", "v", "o", "up", "projector"), noise=False, energy=0.99))
    ranks = {m.name: m.rank for m in plan.modules if m.rank}
    assert ranks == {stored("qwen2_vl", name): rank for name, (_, rank) in planted.items()}
    extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    adapted = {name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
               for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {name: rank for name, (_, rank) in planted.items()}
    state = peft_model.merge_and_unload().state_dict()
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


def test_qwen2_vl_analysis_reports_the_towers_projections_and_the_projector_apart(tmp_path):
    """The per-role table of analyze: the tower's q and v (rows of its qkv), o (attn.proj, which was other) and up
    each at its planted rank, the merger under the projector (it was the tower's), the language model's q apart."""
    from spectra.analysis import analyze
    from spectra.report.tables import summary_rows

    base = tiny("qwen2_vl")
    tuned, _ = _planted(base, _planted_modules("qwen2_vl"))
    analysis = analyze(*pair(tmp_path, base, tuned), cache_dir=False, progress=False).to_dict()
    table = {(e["stack"], e["role"]): (e["modules"], e["energy_rank_0.99"]["median"]) for e in summary_rows(analysis)}
    assert table == {(None, "q"): (1, 2), ("vision", "q"): (1, 1), ("vision", "v"): (1, 2), ("vision", "o"): (1, 2),
                     ("vision", "up"): (1, 1), ("vision", "qkv"): (2, 1.5), ("projector", "projector"): (1, 2)}
