"""A model that holds no language model is one stack of its own: a ViT's (DeiT's, Swin's, DINOv2's, a CLIP vision
tower saved alone …) modules are the vision stack, a Wav2Vec2's the audio stack; CLIP's ``visual_projection`` is the
vision tower's (its ``text_projection`` the text model's); SAM's MLP ``lin1``/``lin2`` are up/down; a
SequenceSummary's ``summary`` (XLM, FlauBERT, XLNet) is a task head.

What was wrong (audit s19, item 5): every module of a ViTModel was in the language stack, so ``recommend --stacks
vision`` on its analysis was refused ("its stacks are language"), and CLIPVisionModelWithProjection's
``visual_projection`` was the language model's: its report read "0 layers (language model), 2 layers (vision)".

The references are transformers' own classes built from tiny configs and saved: their checkpoint names and
``config.json`` are what spectra reads. Full CLIP (text and vision towers) is the negative control that keeps both
stacks; an ordinary LM (Llama) keeps the stack None.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from spectra.checkpoints import architectures
from spectra.checkpoints.architectures import ModuleInfo, module_info, single_stack
from spectra.errors import ConfigError


def _saved(model, path):
    """(checkpoint tensor names, config.json) as save_pretrained writes them."""
    from safetensors import safe_open

    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    return names, json.loads((path / "config.json").read_text())


def _stacks(names, config) -> dict[str, str | None]:
    """Tensor name → its module's stack (a vector's owner's, as pairing asks)."""
    return {n: module_info(n.removesuffix(".weight"), config).stack for n in names}


def _vit():
    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          image_size=16, patch_size=8)
    return tf.ViTModel(config)


def _clip_vision():
    import transformers as tf

    config = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=8, projection_dim=16)
    return tf.CLIPVisionModelWithProjection(config)


def _clip():
    import transformers as tf

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def test_a_vit_is_the_vision_stack(tmp_path):
    names, config = _saved(_vit(), tmp_path)
    stacks = _stacks(names, config)
    assert set(stacks.values()) == {"vision"}, stacks
    assert module_info("encoder.layer.1.attention.attention.query", config) == ModuleInfo("q", 1, None, "vision")
    # negative control: the same names without the config are the language model's, as before
    assert {module_info(n.removesuffix(".weight")).stack for n in names} == {None}


def test_clip_vision_with_projection_is_one_vision_stack(tmp_path):
    names, config = _saved(_clip_vision(), tmp_path)
    assert "visual_projection.weight" in names
    stacks = _stacks(names, config)
    assert set(stacks.values()) == {"vision"}, {n: s for n, s in stacks.items() if s != "vision"}


def test_full_clip_keeps_its_two_stacks(tmp_path):
    """The negative control: CLIPModel's text tower and text_projection stay the language model's (None), its
    vision tower and visual_projection are vision."""
    names, config = _saved(_clip(), tmp_path)
    assert single_stack(config) is None
    stacks = _stacks(names, config)
    assert stacks["visual_projection.weight"] == "vision"
    assert stacks["text_projection.weight"] is None
    assert {s for n, s in stacks.items() if n.startswith("vision_model.")} == {"vision"}
    assert {s for n, s in stacks.items() if n.startswith("text_model.")} == {None}


def test_an_ordinary_lm_keeps_the_language_stack():
    from tests.models import tiny_config

    config = tiny_config("llama").to_dict()
    assert single_stack(config) is None
    assert module_info("model.layers.0.self_attn.q_proj", config).stack is None


def test_wav2vec2_is_the_audio_stack(tmp_path):
    import transformers as tf

    config = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                               conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                               num_conv_pos_embedding_groups=2, vocab_size=16)
    names, saved = _saved(tf.Wav2Vec2ForCTC(config), tmp_path)
    stacks = _stacks(names, saved)
    assert set(stacks.values()) == {"audio"}, stacks
    q = next(n for n in names if n.endswith("layers.0.attention.q_proj.weight"))
    assert module_info(q.removesuffix(".weight"), saved).role == "q"


def test_an_encoder_decoder_keeps_its_encoder_and_decoder():
    """DETR (vision, but an encoder–decoder) and Whisper keep their two stacks, which their layer numbers need."""
    assert single_stack({"model_type": "detr", "is_encoder_decoder": True}) is None
    assert module_info("model.encoder.layers.0.self_attn.q_proj",
                       {"model_type": "whisper", "is_encoder_decoder": True}).stack == "encoder"


def test_a_multimodal_classifier_is_not_vision_only():
    """ShieldGemma 2 classifies images with a Gemma 3 language model: its language model stays the stack None."""
    config = {"model_type": "shieldgemma2", "architectures": ["ShieldGemma2ForImageClassification"]}
    assert module_info("model.language_model.layers.0.self_attn.q_proj", config).stack is None
    clip_classifier = {"model_type": "clip", "architectures": ["CLIPForImageClassification"]}
    assert module_info("classifier", clip_classifier) == ModuleInfo("head", None, None, "vision")


def test_single_stack_types_are_transformers_encoder_only_models():
    """Every model type named vision- or audio-only is one transformers knows, whose config holds no text config and
    is no encoder–decoder; and every model type ending _vision_model, _vision_encoder or _audio_encoder too (the
    suffixes single_stack reads)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    named = architectures._VISION_ONLY | architectures._AUDIO_ONLY
    assert named <= set(CONFIG_MAPPING_NAMES), sorted(named - set(CONFIG_MAPPING_NAMES))
    by_suffix = {t for t in CONFIG_MAPPING_NAMES if t.endswith(("_vision_model", "_vision_encoder", "_audio_encoder"))}
    assert by_suffix  # the suffixes name towers transformers holds
    for model_type in sorted(named | by_suffix):
        config = CONFIG_MAPPING[model_type]().to_dict()  # its defaults, as a tower saved alone writes them
        assert not config.get("is_encoder_decoder"), model_type
        assert not isinstance(config.get("text_config"), dict), model_type
        assert single_stack(config) in ("vision", "audio"), model_type


def test_recommend_plans_a_vit_vision_stack(tmp_path):
    """`recommend --stacks vision` on a ViT's analysis plans its planted q (refused before: "its stacks are
    language"); --stacks language is refused, naming the stack it holds."""
    from spectra.analysis import analyze
    from spectra.ranks.policy import RankPolicy
    from spectra.ranks.recommend import recommend_ranks

    base = _vit()
    tuned = _vit()
    tuned.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = tuned.get_parameter("layers.0.attention.q_proj.weight")  # saved as encoder.layer.0.attention.attention.query
        q += 0.1 * torch.randn(32, 2, generator=gen) @ torch.randn(2, 32, generator=gen)
    _saved(base, tmp_path / "base")
    _saved(tuned, tmp_path / "tuned")
    analysis = analyze(tmp_path / "base", tmp_path / "tuned", cache_dir=False, progress=False).to_dict()
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, stacks="vision"))
    ranks = {m.name: m.rank for m in plan.modules}
    assert ranks["encoder.layer.0.attention.attention.query"] == 2
    with pytest.raises(ConfigError, match="its stacks are vision"):
        recommend_ranks(analysis, RankPolicy(energy=0.99, stacks="language"))


@pytest.mark.parametrize("name, role", [
    ("vision_encoder.layers.0.mlp.lin1", "up"), ("vision_encoder.layers.0.mlp.lin2", "down"),  # SAM's tower
    ("mask_decoder.transformer.layers.0.mlp.lin1", "up"),  # its two-way transformer
    ("sequence_summary.summary", "head"), ("transformer.sequence_summary.summary", "head"),  # XLM, FlauBERT
    ("multiple_choice_head.summary", "head"),  # GPT-2's double heads
    ("distilbert.transformer.layer.0.ffn.lin1", "up"), ("transformer.ffns.0.lin2", "down"),  # unchanged
])
def test_roles_of_sam_mlps_and_sequence_summaries(name, role):
    assert module_info(name).role == role


def test_sam_vision_mlp_modules_are_up_and_down():
    """SAM's vision encoder built from config: lin1 maps hidden → mlp_dim (up), lin2 back (down), vision stack."""
    import transformers as tf

    config = tf.SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, mlp_dim=48, global_attn_indexes=[1], window_size=2)
    model = tf.SamVisionModel(config)
    saved = model.config.to_dict()
    linears = {n: m for n, m in model.named_modules() if n.endswith((".lin1", ".lin2"))}
    assert linears
    for name, linear in linears.items():
        info = module_info(name, saved)
        assert info.stack == "vision"
        assert info.role == ("up" if linear.out_features == 48 else "down"), name


def test_xlm_sequence_summary_is_its_classifier():
    """XLMForSequenceClassification's sequence_summary.summary is hidden → num_labels: the model's classifier."""
    import transformers as tf

    config = tf.XLMConfig(vocab_size=64, emb_dim=32, n_layers=1, n_heads=4, num_labels=3)
    model = tf.XLMForSequenceClassification(config)
    summary = model.get_submodule("sequence_summary.summary")
    assert summary.out_features == 3
    assert module_info("sequence_summary.summary", model.config.to_dict()).role == "head"


# The role rules this file tests (their patterns) → the role each gives
_NEW_RULES = {r"(sequence_summary|multiple_choice_head)\.summary": "head", r"mlp\.lin1": "up", r"mlp\.lin2": "down"}


@pytest.mark.slow
def test_the_rules_change_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device: each Linear's role with and without this file's role rules
    differs only where a module ends in one (other → its role, and a lin1 maps hidden → a wider output, lin2 back);
    each module's stack with and without single_stack differs only in a model of a vision- or audio-only type, where
    every module then is of its stack."""
    from tests.models import meta_models, quiet_transformers, role_rules_without

    kept = role_rules_without(_NEW_RULES)
    changed, single = set(), set()
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            now = {n: module_info(n, config) for n in linears}
            with monkeypatch.context() as patch:
                patch.setattr(architectures, "_ROLE_REGEXES", kept)
                patch.setattr(architectures, "single_stack", lambda config: None)
                before = {n: module_info(n, config) for n in linears}
            for n, linear in linears.items():
                if now[n].role != before[n].role:
                    pattern = next((p for p in _NEW_RULES if re.search(rf"(^|\.){p}$", n)), None)
                    assert pattern is not None, (model_type, n, before[n].role, now[n].role)
                    assert (before[n].role, now[n].role) == ("other", _NEW_RULES[pattern]), (model_type, n)
                    if now[n].role in ("up", "down"):
                        wider = linear.out_features > linear.in_features
                        assert wider == (now[n].role == "up"), (model_type, n)
                    changed.add(now[n].role)
                if now[n].stack != before[n].stack:
                    stack = single_stack(config)
                    assert stack is not None and before[n].stack is None and now[n].stack == stack, (model_type, n)
                    single.add(model_type)
    assert changed == {"up", "down"}  # SAM's MLPs; no default class holds a SequenceSummary (the XLM test above does)
    assert {"vit", "wav2vec2"} <= single, sorted(single)
