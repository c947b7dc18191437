"""The tokens transformers' DynamicCache holds after a forward (ModelShape.cached_tokens): every token in a
full-attention layer, the last window − 1 in a sliding one (DynamicSlidingWindowLayer). Checked on tiny models of the
families whose layers slide, built from the config.json dict the memory model reads."""

from __future__ import annotations

import pytest

from spectra.memory import model_shape
from tests.memory.test_memory import _tiny_config

_FULL, _SLIDING = "full_attention", "sliding_attention"
# (family, config.json overrides): windows of 4 under sequences of 16; the config class fills in what is left out
# (Gemma 2's and Gemma 3's alternating layer_types, Qwen2's from use_sliding_window and max_window_layers)
CASES = {
    "mistral": ("mistral", dict(sliding_window=4)),
    "mixtral": ("mixtral", dict(sliding_window=4)),
    "phi3": ("phi3", dict(sliding_window=4)),
    "ministral": ("ministral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3)),
    "gemma2": ("gemma2", dict(sliding_window=4, num_hidden_layers=3)),
    "gemma3_text": ("gemma3", dict(sliding_window=4, num_hidden_layers=6)),  # 5 sliding layers, then a full one
    "smollm3": ("smollm3", dict(sliding_window=4)),
    "qwen3_moe": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4)),
    "llama": ("llama", {}),  # negative control: no window, every token in every layer
}


def _config_json(name: str, **overrides) -> dict:
    family, fields = CASES[name]
    config = _tiny_config(family).to_dict()
    if "num_hidden_layers" in fields:  # the family's layer_types for these layers, as a config.json without them
        config.pop("layer_types", None)
    return config | fields | overrides


def _cache_bytes(config: dict, batch: int, seq_len: int, dtype) -> int:
    """Bytes of the keys and values in the DynamicCache of one forward of the causal LM built from ``config``."""
    import torch
    import transformers as tf

    fields = {k: v for k, v in config.items() if k != "model_type"}
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(config["model_type"], **fields)).to(dtype)
    ids = torch.randint(0, config["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert type(cache).__name__ == "DynamicCache"
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("seq_len", [16, 2])
@pytest.mark.parametrize("name", CASES)
def test_the_cached_tokens_are_what_dynamic_cache_holds(name, seq_len):
    """16 tokens: a sliding layer keeps 3 (window − 1); 2 tokens: all of them. Negative control: every token in every
    layer, as the KV cache was estimated (tiny Gemma 3: 12288 bytes against the cache's 3968), is more where a
    window is shorter than the sequence; Llama's (no window) is every token."""
    import torch

    config = _config_json(name)
    held = _cache_bytes(config, 2, seq_len, torch.float32)
    shape = model_shape(config)
    per_token = 2 * shape.kv_dim * 2 * 4  # K and V, batch 2, fp32
    assert shape.cached_tokens(seq_len) * per_token == held > 0
    every_token = shape.layers * seq_len * per_token
    assert (held < every_token) == (name != "llama" and seq_len > 3)
