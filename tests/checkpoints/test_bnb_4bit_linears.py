"""spectra.checkpoints.targets.bnb_4bit_linears: the modules transformers' bitsandbytes path stores in NF4, asked of
transformers on the meta device; the one rule spectra.lora.verify (W₀'s NF4 round trip) and spectra memory (a
multimodal model's towers under QLoRA) follow. Reference: the Linear4bit modules of the model bitsandbytes loads."""

from __future__ import annotations

import pytest


def _built(family: str):
    import torch
    import transformers as tf

    from tests.models import tiny_config

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=32, vocab_size=64))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=64,
                                                bos_token_id=0, eos_token_id=0))
    return tf.Gemma3ForConditionalGeneration(tiny_config("gemma3_multimodal"))


@pytest.mark.parametrize("family", ["gpt2", "bert", "gemma3_multimodal"])
def test_the_modules_bitsandbytes_converts(family, tmp_path):
    """Equal to the Linear4bit modules of the model saved and loaded back in 4 bits (GPT-2's tied lm_head left out,
    BERT's pooler converted, the vision tower's and projector's Linears converted)."""
    import bitsandbytes as bnb

    from spectra.checkpoints.targets import bnb_4bit_linears, meta_model
    from tests.models import load_4bit

    model = _built(family)
    loaded, _ = load_4bit(model, tmp_path)
    stored = {n for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    config = model.config.to_dict()
    assert bnb_4bit_linears(meta_model(config, type(model).__name__)) == stored != set()


def test_memory_counts_a_multimodal_models_towers_by_it():
    """spectra memory's towers under QLoRA: the (out, in) of the towers' modules bnb_4bit_linears names."""
    from spectra.checkpoints.targets import bnb_4bit_linears, meta_model
    from spectra.memory import model_shape
    from tests.models import tiny_config

    config = tiny_config("gemma3_multimodal").to_dict()
    model = meta_model(config, "Gemma3ForConditionalGeneration")
    sizes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if type(m).__name__ == "Linear"}
    converted = bnb_4bit_linears(model)
    towers = sorted(sizes[n] for n in converted if ".language_model." not in f".{n}." and not n.startswith("lm_head"))
    assert sorted(model_shape(config).tower_quantised) == towers != []
