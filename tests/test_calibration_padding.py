"""Padding never counts in a module's activation moments, whatever layout the module reads its input in: (B, T, in)
as the blocks run, (B·T, in) where a module reads the stream flattened (Qwen2-MoE's shared expert), (B, 1, T, in)
with a head axis of one (DeepSeek-V3's kv_b_proj under MLA). Checked as batched against one example at a time,
which pads nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectra.calibration import CalibrationConfig, _unpadded, collect_calibration
from tests.models import save, tiny_moe


def _qwen2_moe():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                               shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, vocab_size=64)
    return tf.Qwen2MoeForCausalLM(config).eval()


@pytest.mark.parametrize(("family", "flattened"), [
    ("qwen2_moe", "model.layers.1.mlp.shared_expert.down_proj.weight"),
    ("deepseek_v3", "model.layers.0.self_attn.kv_b_proj.weight")])
def test_padding_is_left_out_of_flattened_and_head_axis_inputs(family, flattened, tmp_path):
    """Every module's token count and covariance are the same batched (8 texts of 2–13 characters, padded to the
    longest) as one at a time, to float32 round-off. The batch pads (its texts differ in length): with the mask
    applied to (B, T, in) inputs alone, the flattened and head-axis modules counted the padding (104 tokens against
    68 here; checked by reverting)."""
    model = _qwen2_moe() if family == "qwen2_moe" else tiny_moe(family)
    base = save(model, tmp_path / "base", "safetensors")
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(2, 14, size=8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n))}) + "\n"
                            for n in lengths))
    batched = collect_calibration(base, data, config=CalibrationConfig(batch_size=8, max_length=16))
    one_by_one = collect_calibration(base, data, config=CalibrationConfig(batch_size=1, max_length=16))
    assert len(set(lengths)) > 1  # the batch pads its shorter texts
    assert batched.tokens(flattened) == one_by_one.tokens(flattened) < 8 * 16
    for name in one_by_one.groups:
        assert batched.tokens(name) == one_by_one.tokens(name), name
        torch.testing.assert_close(batched.covariance(name), one_by_one.covariance(name), rtol=1e-5, atol=1e-7)
    assert not any("padding counted" in note for note in batched.notes)


def test_an_input_laid_out_otherwise_is_taken_whole_and_named():
    """A layout that does not hold the batch's tokens in (B, T) order (a routed expert's gathered rows) cannot be
    masked: taken whole, and the module recorded where the batch pads (collect_calibration's note names it);
    a batch without padding records nothing."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    x = torch.arange(6 * 4, dtype=torch.float32).reshape(2, 3, 4)
    unmasked: dict = {}
    torch.testing.assert_close(_unpadded(x, mask, "m", unmasked), x.reshape(6, 4)[mask.reshape(-1)])
    torch.testing.assert_close(_unpadded(x.reshape(6, 4), mask, "m", unmasked), x.reshape(6, 4)[mask.reshape(-1)])
    torch.testing.assert_close(_unpadded(x[:, None], mask, "m", unmasked), x.reshape(6, 4)[mask.reshape(-1)])
    assert not unmasked
    gathered = x.reshape(6, 4)[[0, 2, 5]]  # (3, in)
    assert _unpadded(gathered, mask, "experts.0", unmasked) is gathered
    assert unmasked == {"experts.0": (3,)}
    assert _unpadded(gathered, torch.ones_like(mask), "experts.1", unmasked) is gathered
    assert "experts.1" not in unmasked
