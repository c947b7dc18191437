"""QLoRA of a vision-language model whose vision tower (or projector) is narrower than bitsandbytes' 64 input features.

spectra refused it: its width check took every 4-bit layer, the tower's too, though text batches never run the
tower. The check now takes the layers text runs through; the tower stays in 4 bits (as transformers quantises it and
spectra's memory estimate counts it), unrun. The referees: bitsandbytes' own layer types on the loaded model, and
the trained adapter's eval loss against the loss of the language model alone run through transformers.
"""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, load_model, train_adapter
from tests.lora.conftest import random_text
from tests.models import on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QLORA = dict(method="qlora", rank=2, max_steps=2, batch_size=8, lr=1e-2, max_length=16)


def _vlm(family: str, text_width: int):
    """A Qwen2-VL (tower width 32) or a LLaVA (CLIP tower and projector input 16) around a language model of
    `text_width`."""
    import transformers as tf

    if family == "qwen2_vl":
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 4])
        text = dict(hidden_size=text_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, rope_parameters=rope)
        vision = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=1, embed_dim=32,
                      hidden_size=text_width, mlp_ratio=1)
        return on_grid(tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig(
            text_config=text, vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62))
    text = tf.LlamaConfig(hidden_size=text_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14, projection_dim=16)
    return on_grid(tf.LlavaForConditionalGeneration, tf.LlavaConfig(vision_config=vision, text_config=text,
                                                                     image_token_id=63))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_towers")
    return random_text(root / "train.txt", chars=16 * 16, seed=4), random_text(root / "eval.txt", chars=16 * 6, seed=5)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_narrow_tower_stays_4_bit_and_unrun_and_qlora_trains_the_language_model(family, text, tmp_path):
    """The tower's (and LLaVA's projector's) narrow layers are bitsandbytes Linear4bit on the loaded model; QLoRA
    trains, and its eval loss moved off the base's, which transformers' own forward of the 4-bit model on text gives
    (the tower never runs: a narrow 4-bit layer would fail its first forward)."""
    import bitsandbytes as bnb

    from spectra.lora.data import prepare_data
    from spectra.lora.train import evaluate

    base = save(_vlm(family, 64), tmp_path / "base", "safetensors")
    quantized = load_model(base, task="causal_lm", quantize=True)
    narrow = [n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features < 64]
    assert narrow and all(".language_model." not in n for n in narrow), narrow
    train, held = text
    result = train_adapter(base, train, TrainConfig(**QLORA), tmp_path / "ad", eval_data=held, progress=False)
    _, _, eval_data, _, _ = prepare_data(base, train, eval_data=held, max_length=16)
    before = evaluate(quantized, eval_data, batch_size=8)["loss"]
    assert torch.isfinite(torch.tensor(result.final_eval["loss"])) and result.final_eval["loss"] != pytest.approx(
        before, rel=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_narrow_language_model_is_still_refused_naming_its_layer(family, text, tmp_path):
    """Negative control: a language model of width 32 (its layers are run) is refused before training, naming a
    language-model layer and the way out."""
    base = save(_vlm(family, 32), tmp_path / "base", "safetensors")
    with pytest.raises(ConfigError, match=r"model\.language_model\.layers\.0\.self_attn\.q_proj has 32 input features"
                                          r"; 4-bit .* --method lora or dora"):
        train_adapter(base, text[0], TrainConfig(**QLORA), tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()
