"""Every transformers model type, built on the meta device from its default config: the kind of positions its model
has (a table of positions, computed sinusoids, rotary, relative, none) is the kind :func:`position_limit` reads from
its ``config.to_dict()``, wherever it reads a limit. This is the ground truth of the rules in
``spectra/checkpoints/positions.py``; the families it found wrong are pinned, on tiny models that run, in
``test_positions_families.py``."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch

from spectra.checkpoints.positions import position_limit

# the classes tried for a model type, in this order: the text heads first, then the bare model
_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
             "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_MAPPING_NAMES")
# a module path in a vision, audio or other non-text tower, whose positions are not the tokens' (a ViT's patch table,
# Whisper's audio frames, a diffusion head's timestep embedding)
_NOT_TEXT = re.compile(r"(^|\.)[^.]*(vision|visual|image|audio|speech|acoustic|pixel|video|patch|vit|sam|qformer|bbox|"
                       r"conditioning|timestep|timestamp)[^.]*(\.|$)", re.I)
# the last part of a module's or tensor's name that holds positions: position_embeddings, embed_positions, wpe, pos_emb
_POSITIONAL = re.compile(r"position|(^|_)pos(_|$)|pos_?emb|pos_enc|^wpe$", re.I)
# a sinusoid module that grows its table past max_position_embeddings (M2M100SinusoidalPositionalEmbedding's
# make_weights, FSMT's, TrOCR's), read from its class's source
_GROWS = re.compile(r"max_pos\s*>\s*self\.weights?\.size|\+ cache_length > self\.weights\.size|self\.weights is None")

# Model types whose class cannot be built offline from transformers' default config: a library not installed here
# (timm, natten, detectron2, torchaudio), or defaults that do not build (a key left None: rope_theta, vocab_size,
# pad_token_id; layer lists that no longer match two layers; no prediction_length for the time-series models).
# Of the text models among them, position_limit reads Ministral, Nemotron, HunYuan, dots1, LFM2-MoE, Chameleon, Gemma 3n
# and the VLMs as rotary (their rope keys), ESM as its "absolute" table (tests/lora/test_data.py builds it tiny, and
# test_positions_families.py its null), MusicGen's decoder as a computed sinusoid (its module grows the table: read
# from its source), DBRX with no limit.
_UNBUILT = {
    # timm, natten, detectron2 or torchaudio is missing
    "conditional_detr", "dab-detr", "deformable_detr", "detr", "dinat", "edgetam", "edgetam_vision_model", "fast_vlm",
    "gemma3n", "gemma3n_vision", "higgs_audio_v2_tokenizer", "layoutlmv2", "omdet-turbo", "pe_audio_video",
    "pe_audio_video_encoder", "pe_video", "pe_video_encoder", "perception_lm", "table-transformer", "timm_backbone",
    "timm_wrapper",
    # the default config does not build
    "autoformer", "aya_vision", "chameleon", "cohere_compass", "cohere_compass_text", "dbrx", "deepseek_ocr2",
    "diffusion_gemma", "dots1", "esm", "gemma4_assistant", "granite4_vision", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "hunyuan_vl", "hunyuan_vl_text", "informer", "lfm2_moe", "ministral", "moonshine_streaming", "musicgen",
    "musicgen_melody", "nemotron", "pp_ocrv6_medium_det", "t5gemma2_encoder", "time_series_transformer",
}
# Model types whose model the rule reads otherwise, and why that is accepted
_DISAGREE = {
    # BLIP-2's Q-Former embeds learned queries, no token positions; its config's max_position_embeddings is unused.
    # Read as a table: a longer length is refused, the safe side, for a model nobody trains with --max-length.
    "blip_2_qformer": ("learned", "none"),
    # a speech encoder with Shaw's table of relative distances clamped at context_size, not a text model
    "granite_speech5_encoder": ("learned", "relative"),
    # audio codecs: their rope_parameters, read as rotary, belong to no module this scan sees; no text to cut
    "neucodec": ("rotary", "none"),
    "xcodec2": ("rotary", "none"),
    # Ovis2.5's vision tower (transformers 5.25): a learned patch table of max_position_embeddings rows beside its
    # axial rotary; read as rotary at that length: patches, not text, and no --max-length reaches it
    "ovis2_5_vision": ("rotary", "learned"),
}


def _classes(model_type: str) -> list[str]:
    """Names of transformers' model classes of `model_type`, in the order of :data:`_MAPPINGS` (none: a config
    without a model of its own, a tokenizer's, a processor's)."""
    import transformers as tf
    from transformers.models.auto import modeling_auto

    names = []
    for mapping in _MAPPINGS:
        found = getattr(modeling_auto, mapping).get(model_type)
        for name in found if isinstance(found, (list, tuple)) else [found]:
            if name and hasattr(tf, name) and name not in names:
                names.append(name)
    return names


def _build(model_type: str):
    """(model on the meta device, its config dict) of `model_type`, or None where no class builds from its default
    config: each of :func:`_classes` in turn, with at most two layers and then with all, from the config and then
    from its text_config."""
    import transformers as tf

    for name in _classes(model_type):
        for shrink in (True, False):
            for text in (False, True):
                try:
                    config = tf.AutoConfig.for_model(model_type)
                    if text:
                        if getattr(config, "text_config", None) is None:
                            continue
                        config = config.text_config
                    for c in (config, getattr(config, "text_config", None)) if shrink else ():
                        for key in ("num_hidden_layers", "num_layers", "n_layer", "decoder_layers", "encoder_layers"):
                            if isinstance(getattr(c, key, None), int) and getattr(c, key) > 2:
                                setattr(c, key, 2)
                    with torch.device("meta"):
                        return getattr(tf, name)._from_config(config), config.to_dict()
                except Exception:  # a class that needs more than its default config: the next try
                    continue
    return None


def _grows(module) -> bool:
    """Whether a sinusoid module computes positions past its table: its class grows the table, or it holds none."""
    try:
        source = inspect.getsource(type(module))
    except (OSError, TypeError):
        return False
    holds_nothing = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    return bool(_GROWS.search(source)) or "Sinusoid" in type(module).__name__ and holds_nothing


def _model_positions(model) -> tuple[str, list[str], int | None]:
    """(kind, evidence, rows of its smallest table of positions) of the text part of `model`: ``learned`` (an
    embedding, parameter or buffer of positions: a fixed table), ``sinusoidal`` (computed for any length),
    ``rotary``, ``relative`` (a bias or table of distances) or ``none``, in that order of precedence."""
    rotary, relative, sinusoidal, learned, rows = [], [], [], [], []
    for name, module in model.named_modules():
        if not name or _NOT_TEXT.search(name) or any(name.startswith(r + ".") for r in rotary):
            continue
        kind, leaf = type(module).__name__, name.rpartition(".")[2]
        if re.search(r"rotary|rope", f"{kind}.{leaf}", re.I):
            rotary.append(name)
        elif re.search(r"relative|rel_pos|rel_emb|rel_logits|position_bias", f"{kind}.{leaf}", re.I):
            relative.append(name)
        elif _POSITIONAL.search(leaf) or "Sinusoid" in kind or "Positional" in kind:
            if _grows(module):
                sinusoidal.append(name)
            elif isinstance(module, torch.nn.Embedding) or any(True for _ in module.parameters()) or any(
                    True for _ in module.buffers()):
                learned.append(name)
                if isinstance(module, torch.nn.Embedding):
                    rows.append(module.num_embeddings)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:  # GPT-style parameters, CTRL's buffer
        owner, _, leaf = name.rpartition(".")
        if _NOT_TEXT.search(name) or any(name.startswith(r + ".") for r in rotary) or leaf.endswith("_ids"):
            continue
        if re.search(r"pos_enc|position_emb|pos_emb|wpe", leaf) and not any(
                owner == m or owner.startswith(m + ".") for m in learned):
            learned.append(name)
    for kind, evidence in (("learned", learned), ("sinusoidal", sinusoidal), ("rotary", rotary),
                           ("relative", relative)):
        if evidence:
            return kind, evidence, min(rows, default=None)
    return "none", [], None


@pytest.mark.slow
def test_every_transformers_model_has_the_positions_its_config_is_read_as():
    """Where position_limit reads a limit from a default config, the model's positions are of its kind (and a table
    has at least its rows), but for the types in :data:`_DISAGREE`; every type that does not build is in
    :data:`_UNBUILT`. Found when written: Jamba, Zamba, Nemotron-H(-Omni), NeMo SpeechLM, GLM-5-Next read as a table
    with none; Zamba2 and GraniteMoeHybrid as rotary with none; M2M100, NLLB-MoE, XGLM, Kosmos-2(.5), FSMT,
    Pegasus-X, SeamlessM4T(v2) as a table where they compute their sinusoids; Inkling's relative bias as a table."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    unbuilt, wrong, short, built, compared = set(), {}, {}, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()
        try:
            for model_type in sorted(t for t in CONFIG_MAPPING_NAMES if _classes(t)):
                made = _build(model_type)
                if made is None:
                    unbuilt.add(model_type)
                    continue
                model, config = made
                built += 1
                limit = position_limit(config)
                if limit is None:  # no limit read: nothing refused, nothing to compare
                    continue
                compared += 1
                kind, evidence, rows = _model_positions(model)
                if kind != limit.positions:
                    wrong[model_type] = (limit.positions, kind)
                if limit.table and rows is not None and limit.length > rows:  # learned or fixed
                    short[model_type] = (limit.length, rows)
                del model
        finally:
            tf.utils.logging.set_verbosity(verbosity)
    assert built > 550 and compared > 300, (built, compared)
    assert unbuilt - _UNBUILT == set()  # a new type that does not build: build it, or list it with its reason
    assert wrong == {t: _DISAGREE[t] for t in wrong if t in _DISAGREE} and set(wrong) <= set(_DISAGREE), wrong
    assert short == {}  # a limit longer than the table it indexes: a crash, not a refusal
