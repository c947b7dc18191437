"""attention_bias, mlp_bias and head_dim as each Llama-like family reads them. Many families' models build their
linears without reading attention_bias or mlp_bias (Mistral's, Qwen2's fixed q/k/v biases, Gemma's and Apertus' MLPs,
…): counted by the key, such a config.json was refused (Apertus with mlp_bias, Hunyuan, EXAONE 4, Cohere, StableLM)
or, for the families read without building the model, miscounted. A config.json may also leave head_dim and
attention_bias to the family, whose defaults need not be Llama's (Seed-OSS: head_dim 128, attention_bias true;
Gemma: head_dim 256): read as h / heads and no bias, Seed-OSS's was refused. Checked against the models transformers
builds from tiny configs (their base models' parameters) and, for Seed-OSS's defaults and Apertus' mlp_bias, what
autograd saves in a block (tests/memory/test_memory.py's block_saved)."""

from __future__ import annotations

import pytest

from spectra.memory import model_shape
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, block_saved, lora_on_roles

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
# Seed-OSS's defaults drop out 10 % (refused: test_memory_llama_variants); MiniMax's default layers include linear
# attention (refused), so its tiny model has attention layers only; StarCoder2's use_bias (default true) biases every
# linear whatever the two keys say, so its tiny model has none
_OWN = {"seed_oss": dict(attention_dropout=0.0, residual_dropout=0.0),
        "minimax": dict(layer_types=["full_attention", "full_attention"]), "starcoder2": dict(use_bias=False)}
_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "helium",
             "ernie4_5", "ministral", "smollm3", "glm", "olmo", "olmo2", "olmo3", "starcoder2", "stablelm", "arcee",
             "seed_oss", "hunyuan_v1_dense", "exaone4", "cohere", "cohere2", "apertus", "mixtral", "phimoe",
             "granitemoe", "minimax", "qwen3_moe", "qwen2_vl_text", "qwen2_5_vl_text"]
_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def _config(family: str, **overrides):
    import transformers as tf

    return tf.AutoConfig.for_model(family, **(_SMALL | _OWN.get(family, {}) | overrides))


def _base_params(config) -> int:
    import transformers as tf

    return sum(p.numel() for p in tf.AutoModel.from_config(config).parameters())


def _counted(config: dict) -> int:
    shape = model_shape(config)
    return shape.params - shape.head_params


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
@pytest.mark.parametrize("family", _FAMILIES)
def test_bias_keys_count_what_the_family_builds(family, key):
    """With the key set, the count is the base model's, and it adds what the key adds to the model built (nothing
    where the family ignores it). Negative control: where the family ignores the key, counting it as Llama does (the
    tables of families that ignore it emptied) refuses the config or counts it wrong."""
    import spectra.memory.shape as shape_module
    from spectra.errors import ConfigError

    config = _config(family, head_dim=8, **{key: True})
    built = _base_params(config)
    assert _counted(config.to_dict()) == built
    without = _config(family, head_dim=8, **{key: False})
    assert _counted(config.to_dict()) - _counted(without.to_dict()) == built - _base_params(without)
    if built == _base_params(without):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shape_module, f"_{key.upper()}_IGNORED", frozenset())
            try:
                assert _counted(config.to_dict()) != built
            except ConfigError as err:
                assert "holds" in str(err)  # the count check's refusal, naming both counts


@pytest.mark.parametrize("family", ["seed_oss", "gemma", "qwen3", "llama", "apertus", "arcee", "cohere"])
def test_keys_left_to_the_family_are_its_defaults(family):
    """A config.json without head_dim, attention_bias and mlp_bias counts what the family builds from its defaults
    (Seed-OSS: head_dim 128 and q/k/v biased; Gemma and Qwen3: head_dim 256 and 128). Negative control for those:
    read as h / heads with no bias (what had refused Seed-OSS), the count is off."""
    config = _config(family)
    text = {k: v for k, v in config.to_dict().items() if k not in ("head_dim", "attention_bias", "mlp_bias")}
    assert _counted(text) == _base_params(config)
    if family in ("seed_oss", "gemma", "qwen3"):
        llama_reading = text | {"head_dim": 32 // 4, "attention_bias": False}
        assert model_shape(llama_reading | {"model_type": "llama"}).params != model_shape(text).params


def _left_out(config) -> dict:
    """The config as a config.json that leaves head_dim and attention_bias to the family."""
    return {k: v for k, v in config.to_dict().items() if k not in ("head_dim", "attention_bias")}


def _block(family: str, method: str, precision: str, read=None, **overrides) -> dict[str, int]:
    import torch

    def build(layers):
        import transformers as tf

        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(_config(family, num_hidden_layers=layers, **overrides))

    return block_saved(build, lambda model, method, roles: lora_on_roles(model, method, _MODULES, roles), method,
                       precision, "sdpa", read=read)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "method", "precision", "read", "overrides"), [
    # Seed-OSS as its config.json may say it: head_dim (128) and attention_bias (true) left to the family
    ("seed_oss", "full", "bf16", _left_out, {}), ("seed_oss", "lora", "bf16", _left_out, {}),
    ("seed_oss", "lora", "fp32", _left_out, {}), ("seed_oss", "dora", "bf16", _left_out, {}),
    # Apertus with mlp_bias (which its MLP ignores)
    ("apertus", "full", "bf16", None, dict(head_dim=8, mlp_bias=True)),
    ("apertus", "lora", "bf16", None, dict(head_dim=8, mlp_bias=True)),
    ("apertus", "dora", "fp32", None, dict(head_dim=8, mlp_bias=True))])
def test_a_blocks_activations_are_what_autograd_saves(family, method, precision, read, overrides):
    """One block's saved bytes per sequence are what autograd saves (head_dim 128: Q, K and V 16 times wider than
    h / heads would make them)."""
    block = _block(family, method, precision, read, **overrides)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
def test_seed_oss_read_with_llamas_head_dim_is_wrong():
    """Negative control: Seed-OSS's block modelled with head_dim h / heads misses what autograd saves."""
    def as_llama(config):
        return _left_out(config) | {"head_dim": 32 // 4}

    measured = _block("seed_oss", "lora", "bf16", _left_out)["measured"]
    assert _block("seed_oss", "lora", "bf16", as_llama)["modelled"] != measured


def test_cli_memory_reads_a_seed_oss_config_that_leaves_the_keys_out(tmp_path):
    """The user's path: `spectra memory <folder>` on a Seed-OSS config.json without head_dim and attention_bias
    (refused before, naming both parameter counts) prints the parameters transformers builds from it."""
    import json

    import transformers as tf
    from typer.testing import CliRunner

    from spectra.cli import app

    config = _config("seed_oss")
    (tmp_path / "config.json").write_text(json.dumps(_left_out(config)))
    run = CliRunner().invoke(app, ["memory", str(tmp_path), "--rank", "8", "--json"])
    assert run.exit_code == 0, run.output
    built = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
    assert json.loads(run.output)["params"] == built
