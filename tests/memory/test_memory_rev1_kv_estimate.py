"""The estimate's KV cache is what transformers' DynamicCache holds after a forward (tests/memory/test_memory_rev1_kv_cache.py
reads it): every token in a full-attention layer, the last window − 1 in a sliding one."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory
from tests.memory.test_memory_moe_own_experts import _config as _own_experts_config
from tests.memory.test_memory_rev1_kv_cache import CASES, _cache_bytes, _config_json


@pytest.mark.parametrize("name", CASES)
def test_the_kv_cache_is_what_dynamic_cache_holds(name):
    """Windows of 4 under 16 tokens. The estimate had counted every token in every layer (tiny Gemma 3: 12288 bytes
    against the cache's 3968; Qwen3-MoE with use_sliding_window 4096 against 1792)."""
    import torch

    config = _config_json(name)
    held = _cache_bytes(config, 2, 16, torch.float32)
    estimate = estimate_memory(config, method="lora", rank_plan_or_rank=2, batch=2, seq_len=16, precision="fp32")
    assert estimate.kv_cache == held > 0
    assert estimate.inference_total - estimate.kv_cache == estimate.weights + estimate.adapter


def test_the_kv_cache_in_bf16_and_a_window_beyond_the_sequence():
    """bf16 halves it; a window longer than the sequence keeps every token."""
    import torch

    for config, precision, dtype in ((_config_json("gemma2"), "bf16", torch.bfloat16),
                                     (_config_json("mistral", sliding_window=32), "fp32", torch.float32)):
        held = _cache_bytes(config, 3, 16, dtype)
        assert estimate_memory(config, batch=3, seq_len=16, precision=precision).kv_cache == held


def test_deepseek_caches_its_latent():
    """DeepSeek-V3 (no sliding layers) caches its latent and rotary key per token and layer, as before."""
    import torch

    config = _own_experts_config("deepseek_v3", q_lora_rank=None).to_dict()
    held = _cache_bytes(config, 2, 16, torch.float32)
    estimate = estimate_memory(config, rank_plan_or_rank=2, batch=2, seq_len=16, precision="fp32", attention="eager")
    assert estimate.kv_cache == held
