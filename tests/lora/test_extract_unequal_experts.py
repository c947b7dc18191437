"""Experts of different shapes in one model at ``--rank full``: Qwen3-Omni-MoE's thinker and talker.

PEFT 0.21 converts per-expert checkpoint names (``…experts.3.gate_proj``) into LoRAs on the fused parameters at the
adapter's one global r and lora_alpha. Full rank is min(d_in, d_out) per expert: the thinker's experts (12 × 32 here)
and the talker's (8 × 16) differ, so no one r fits both. extract refused ("the plan gives the fused experts different
ranks", with no plan at all); it now writes such experts onto their parameters (target_parameters) at their own
ranks, as it does a plan's per-projection ranks, and PEFT's merge gives back the fine-tune.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.models import moved

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROLES = ("gate", "up", "down")


def tiny_omni_moe():
    """A whole Qwen3-Omni-MoE (thinker, talker, code2wav) of one layer per stack, width 32 (talker 16); the thinker's
    experts are 12 wide, the talker's 8. Its checkpoint stores each expert's gate_proj/up_proj/down_proj."""
    import transformers as tf

    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2], mrope_interleaved=True)
    common = dict(num_hidden_layers=1, head_dim=8, vocab_size=64, num_experts=3, num_experts_per_tok=2,
                  rope_parameters=rope)
    text = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                moe_intermediate_size=12, **common)
    audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=24, num_mel_bins=8,
                 output_dim=32, n_window=4, downsample_hidden_size=8)
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0])
    talker_text = dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                       moe_intermediate_size=8, shared_expert_intermediate_size=8, **common)
    code = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, vocab_size=64, num_code_groups=2)
    talker = dict(text_config=talker_text, code_predictor_config=code, num_code_groups=2, thinker_hidden_size=32,
                  spatial_merge_size=2)  # the talker reads it, its config does not default it (transformers 5.24)
    code2wav = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=24,
                    num_hidden_layers=1, decoder_dim=16, num_quantizers=2, codebook_size=64, upsample_rates=[2, 2],
                    upsampling_ratios=[2, 2])
    config = tf.Qwen3OmniMoeConfig(thinker_config=dict(text_config=text, audio_config=audio, vision_config=vision),
                                   talker_config=talker, code2wav_config=code2wav)
    torch.manual_seed(0)
    model = tf.Qwen3OmniMoeForConditionalGeneration(config).eval()
    # transformers 5.24 leaves some talker expert weights uninitialised (torch.empty: NaN/Inf now and then); every
    # parameter is drawn again, so the checkpoint is finite and the same on every run
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def omni_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    base = tiny_omni_moe()
    tuned = moved(base, seed=1)
    base.save_pretrained(root / "b")
    tuned.save_pretrained(root / "t")
    return base, tuned, root / "b", root / "t"


EXPERTS = {"thinker.model.language_model.layers.0.mlp.experts": 12, "talker.model.layers.0.mlp.experts": 8}


def test_full_rank_experts_of_two_shapes_are_written_on_their_parameters_and_merge_to_the_fine_tune(omni_pair,
                                                                                                     tmp_path):
    from peft import PeftModel
    from peft.utils.other import get_pattern_key

    from spectra.lora.train import quiet_peft

    base, tuned, b, t = omni_pair
    from safetensors import safe_open

    with safe_open(b / "model.safetensors", "pt") as fh:
        assert "talker.model.layers.0.mlp.experts.2.gate_proj.weight" in fh.keys()  # stored one expert at a time
    extract_adapter(b, t, "full", tmp_path / "full", roles=ROLES, progress=False)
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    for holder, width in EXPERTS.items():  # gate and up fused: 2·width per expert; down: width
        assert {f"{holder}.gate_up_proj", f"{holder}.down_proj"} <= set(config["target_parameters"])
        ranks = {p: config["rank_pattern"].get(get_pattern_key(list(config["rank_pattern"]), p), config["r"])
                 for p in (f"{holder}.gate_up_proj", f"{holder}.down_proj")}  # looked up as PEFT does
        assert ranks == {f"{holder}.gate_up_proj": 2 * width, f"{holder}.down_proj": width}
    assert not any(".experts." in m for m in config["target_modules"])
    model = copy.deepcopy(base)
    with quiet_peft(model, tmp_path / "full"):  # PEFT calls the parameters' pattern keys unmatched, and applies them
        merged = PeftModel.from_pretrained(model, str(tmp_path / "full")).merge_and_unload().state_dict()
    want = tuned.state_dict()
    for holder in EXPERTS:
        for leaf in ("gate_up_proj", "down_proj"):
            name = f"{holder}.{leaf}"
            torch.testing.assert_close(merged[name], want[name], rtol=1e-5, atol=2e-6, msg=name)
            assert not torch.allclose(base.state_dict()[name], want[name])


def test_one_rank_for_every_expert_is_left_to_peft_to_convert(omni_pair, tmp_path):
    """Negative control: at --rank 4 every expert takes one r, so their per-expert names stay for PEFT to convert."""
    _, _, b, t = omni_pair
    extract_adapter(b, t, 4, tmp_path / "r4", roles=ROLES, progress=False)
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert "talker.model.layers.0.mlp.experts.0.gate_proj" in config["target_modules"]
    assert not any(p.endswith((".experts.gate_up_proj", ".experts.down_proj"))
                   for p in config.get("target_parameters", []))
