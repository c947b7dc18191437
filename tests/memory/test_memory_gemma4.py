"""Gemma 4's dense language model (gemma4_text), as transformers' Gemma4TextModel builds and runs it: Gemma 3's blocks
with full-attention layers of their own head size (global_head_dim) and, under attention_k_eq_v, their own KV heads
and no v_proj (k_proj, role kv, gives K and V), V normalised per head by an RMSNorm without weight (v_norm), and
Gemma4RMSNorm's x·pow(mean(x²) + eps, −0.5), which keeps one fp32 value a row more than Gemma 3's rsqrt. Counted
against the models transformers builds from tiny configs (parameters, PEFT's trainable count, gradients and AdamW
states, the KV cache) and measured against autograd (one block's saved bytes: tests/memory/test_memory.py's
block_saved).
Per-layer embeddings, KV sharing and the MoE block are refused naming their keys. It had all been refused ("Gemma 4's
blocks differ from Gemma 3's")."""

from __future__ import annotations

import dataclasses

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import (_PEFT_PATTERN_WARNING, block_saved, check_kv_cache,
                                      check_trainable_gradients_and_states, lora_on_roles)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LAYER_TYPES = ["sliding_attention", "full_attention"]
K_EQ_V = dict(attention_k_eq_v=True, num_global_key_value_heads=1)
_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def _config(**overrides):
    """A tiny Gemma 4 language model's config (num_experts: null, as Gemma4TextConfig writes it); its sliding window
    (32) beyond the 16 tokens measured unless overridden."""
    from transformers import Gemma4TextConfig

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, global_head_dim=16, layer_types=LAYER_TYPES, sliding_window=32,
                 vocab_size_per_layer_input=64, hidden_size_per_layer_input=0, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    return Gemma4TextConfig(**(sizes | overrides))


def _text(**overrides) -> dict:
    return _config(**overrides).to_dict()


def _model(**overrides):
    import torch
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(0)
    return Gemma4ForCausalLM(_config(**overrides))


def _peft(model, method: str, roles=None, layers=None):
    return lora_on_roles(model, method, _MODULES, roles, layers)


@pytest.mark.parametrize("overrides", [{}, K_EQ_V, dict(attention_bias=True), dict(K_EQ_V, attention_bias=True),
                                       dict(tie_word_embeddings=False, final_logit_softcapping=30.0),
                                       dict(num_hidden_layers=3, layer_types=[*LAYER_TYPES, "full_attention"]),
                                       dict(num_hidden_layers=1, layer_types=["full_attention"])])
def test_parameters_are_what_transformers_builds(overrides):
    """Every parameter of Gemma4ForCausalLM and of the base model the guard builds; the full-attention layers' linears
    their own (no v_proj under attention_k_eq_v). Negative control: the same config read as Gemma 3's text model (one
    head size for every layer, a v_proj everywhere) counts otherwise."""
    import torch
    from transformers import Gemma4ForCausalLM

    config = _config(**overrides)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(config)
    shape = model_shape(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    linears = {name.partition("layers.")[2]: tuple(m.weight.shape) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name}
    modules = {role: ("mlp." if role in ("gate", "up", "down") else "self_attn.") + name
               for role, name in (_MODULES | {"kv": "k_proj"}).items()}
    modelled = {f"{layer}.{modules[role]}": (o, i) for layer in range(shape.layers)
                for role, o, i in shape.block(layer).linears}
    assert modelled == linears
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "tie_word_embeddings", "attention_bias")
    as_gemma3 = {key: config.to_dict()[key] for key in keys} | {"model_type": "gemma3_text"}
    assert model_shape(as_gemma3).params != shape.params


def test_the_multimodal_config_is_its_language_model_and_towers():
    """gemma4's image-text-to-text config: its language model as above plus a vision tower, counted off
    Gemma4ForConditionalGeneration on the meta device (the guard compares the whole)."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8)
    config = Gemma4Config(text_config=_text(**K_EQ_V), vision_config=vision)
    shape = model_shape(config.to_dict())
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.tower_params > 0 and shape.global_linears == model_shape(_text(**K_EQ_V)).global_linears


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_trainable_gradients_and_states_are_what_peft_and_adamw_hold(method):
    model = check_trainable_gradients_and_states(_model(**K_EQ_V), method, _peft)
    if method == "lora":  # k_proj of the full-attention layer, role kv: adapted as all-linear adapts it
        assert any("layers.1.self_attn.k_proj.lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("overrides", [{}, K_EQ_V, dict(sliding_window=8)])
def test_kv_cache_is_what_dynamic_cache_holds(overrides):
    """Each layer's K and V at its own width (the full-attention layer's head_dim 16, one KV head under
    attention_k_eq_v); a sliding layer's last window − 1 tokens."""
    check_kv_cache(_model(**overrides))


def _block(kind: str, method: str, precision: str, attention: str, roles=None, *, misread=None, **overrides):
    """One block's saved bytes per sequence (block_saved): the sliding layer's ([full] against [sliding, full]) or the
    full-attention layer's ([full] against [full, full])."""
    first = "sliding_attention" if kind == "sliding" else "full_attention"

    def build(layers: int):
        return _model(num_hidden_layers=layers, layer_types=[first, "full_attention"][-layers:], **overrides)

    return block_saved(build, _peft, method, precision, attention, roles, misread=misread)


_CASES = [("full", "lora", "bf16", "sdpa", {}), ("full", "lora", "fp32", "sdpa", K_EQ_V),
          ("full", "lora", "bf16", "sdpa", K_EQ_V), ("full", "full", "bf16", "sdpa", K_EQ_V),
          ("full", "full", "fp32", "eager", K_EQ_V), ("full", "dora", "fp32", "sdpa", K_EQ_V),
          ("full", "lora", "bf16", "eager", dict(K_EQ_V, attention_bias=True)),
          ("sliding", "lora", "bf16", "sdpa", K_EQ_V), ("sliding", "full", "fp32", "sdpa", {}),
          ("sliding", "lora", "bf16", "sdpa", dict(sliding_window=8)),  # masked: the mask and K, V repeated
          ("sliding", "full", "bf16", "eager", dict(final_logit_softcapping=30.0))]


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("kind", "method", "precision", "attention", "overrides"), _CASES)
def test_a_blocks_activations_are_what_autograd_saves(kind, method, precision, attention, overrides):
    block = _block(kind, method, precision, attention, **overrides)
    assert block["modelled"] == block["measured"], block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("kind", "precision", "roles", "overrides"), [
    ("sliding", "bf16", ("v",), {}), ("full", "fp32", ("v",), {}), ("full", "fp32", ("k",), K_EQ_V),
    ("full", "bf16", ("k",), K_EQ_V), ("sliding", "fp32", ("k",), K_EQ_V), ("full", "bf16", ("q", "down"), K_EQ_V),
    ("full", "fp32", ("o",), K_EQ_V), ("sliding", "bf16", ("up",), K_EQ_V)])
def test_from_the_first_adapted_module_on(kind, precision, roles, overrides):
    """LoRA on some roles (PEFT's target_modules; k_proj is role kv in the full-attention layer under
    attention_k_eq_v, whose LoRA output is K and V): the block keeps what follows its adapted modules."""
    block = _block(kind, "lora", precision, "sdpa", roles, **overrides)
    assert block["modelled"] == block["measured"], block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_negative_controls(precision):
    """Without v_norm's tensors, or with Gemma 3's RMSNorm (one fp32 value a row fewer), the block's saved bytes are
    not autograd's."""
    for misread in (lambda s: dataclasses.replace(s, v_norm=False),
                    lambda s: dataclasses.replace(s, norm="rms_fp32")):
        block = _block("full", "lora", precision, "sdpa", misread=misread, **K_EQ_V)
        assert block["modelled"] != block["measured"], block


@pytest.mark.parametrize(("overrides", "key"), [
    (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input"),
    (dict(num_kv_shared_layers=1, num_hidden_layers=3, layer_types=[*LAYER_TYPES, "full_attention"]),
     "num_kv_shared_layers"),
    (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16), "enable_moe_block")])
def test_what_is_not_modelled_is_refused_naming_its_key(overrides, key):
    """Per-layer embeddings, KV sharing and the MoE block: refused naming the key, and (the negative control) the
    model transformers builds with it holds another count than the estimate of the same config without it."""
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = _text(**overrides)
    with pytest.raises(ConfigError, match=rf"model_type gemma4_text: {key} .*Gemma 4's dense text models"):
        estimate_memory(config, method="lora", rank_plan_or_rank=4)
    with torch.device("meta"):
        built = sum(p.numel() for p in Gemma4ForCausalLM(Gemma4TextConfig(**config)).parameters())
    off = {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "enable_moe_block": False}[key]
    assert built != model_shape(config | {key: off}).params


def test_a_config_json_leaving_per_layer_input_out_gets_the_familys_default():
    """Gemma4TextConfig's hidden_size_per_layer_input defaults to 256: a config.json without it has per-layer
    embeddings, and is refused for them."""
    config = _text()
    del config["hidden_size_per_layer_input"]
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input 256"):
        model_shape(config)


def test_the_kv_role_is_adapted_by_v_and_k():
    """The full-attention layer's k_proj under attention_k_eq_v is role kv, which --roles v and --roles k both adapt
    (as spectra train does); the sliding layer's k_proj is k (negative control)."""
    from spectra.checkpoints.architectures import module_info, role_selected

    config = _text(**K_EQ_V)
    role = module_info("model.layers.1.self_attn.k_proj", config).role
    assert role == "kv" and role_selected(role, ("v",)) and role_selected(role, ("k",))
    assert module_info("model.layers.0.self_attn.k_proj", config).role == "k"
    est = estimate_memory(config, method="lora", rank_plan_or_rank=4, roles=("v",))
    # v_proj (32 → 16) in the sliding layer, k_proj (32 → 16) in the full one: 4·(32 + 16) each
    assert est.trainable_params == 2 * 4 * (32 + 16)


def test_gemma3_is_still_estimated():
    """Gemma 3's text model, the closest family, is estimated as before."""
    from tests.models import tiny_config

    est = estimate_memory(tiny_config("gemma3").to_dict(), method="lora", rank_plan_or_rank=4)
    assert est.trainable_params > 0 and est.activations > 0


def test_heads_wider_than_flash_attention_takes_are_left_out_under_sdpa():
    """A Gemma 4 of global_head_dim 512 (Gemma 4 31B's): FlashAttention takes heads of at most 256, so CUDA's sdpa
    runs another kernel, unchecked: the activations are left out with a note naming the head size, the rest
    estimated; eager is estimated. Negative control: global_head_dim 256 under sdpa is estimated."""
    config = _text(global_head_dim=512, **K_EQ_V)
    est = estimate_memory(config, method="lora", rank_plan_or_rank=4)
    assert est.activations is None and est.kv_cache > 0 and est.weights > 0
    assert any("heads of 512 values (its full-attention layers' global_head_dim) under sdpa" in note
               for note in est.notes)
    assert estimate_memory(config, method="lora", rank_plan_or_rank=4, attention="eager").activations > 0
    assert estimate_memory(_text(global_head_dim=256, **K_EQ_V), method="lora", rank_plan_or_rank=4).activations > 0


def test_qlora_storage_is_what_bitsandbytes_holds(tmp_path):
    """bitsandbytes' 4-bit load of Gemma 4 (every block Linear, the full-attention layer's of its own shapes, in NF4;
    embeddings and norms in bf16): the estimate's weights and constants are the loaded model's bytes. Negative
    control: every layer read with the sliding layers' linears is off."""
    from tests.memory.test_memory import check_qlora_storage

    model = _model(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, global_head_dim=32,
                   **K_EQ_V)
    check_qlora_storage(model, tmp_path / "base")
    shape = model_shape(model.config.to_dict())
    assert shape.linear_params != shape.layers * sum(o * i for _, o, i in shape.linears)


def test_cli_memory(tmp_path):
    """The user's path: `spectra memory <folder> --rank 8` on a saved Gemma 4."""
    from tests.memory.test_memory import check_cli_memory

    check_cli_memory(_model(**K_EQ_V), tmp_path / "base")


def test_a_rank_plan_on_gemma4_is_estimated_per_layer():
    """A plan of the sliding layer's v_proj and the full-attention layer's k_proj (role kv, its own shape): its
    trainable count is its modules' (a plan's module shapes are checked against each layer's own linears; negative
    control: the full layer's k_proj at the sliding layers' k_proj shape is refused as another model's)."""
    from spectra.ranks.plan import ModuleRank, RankPlan

    config = _text(attention_k_eq_v=True, num_global_key_value_heads=2)  # the full layer's k_proj: 2·16 × 32

    def plan(full_shape):
        rows = (("model.layers.0.self_attn.v_proj", "v", 0, (16, 32), 4),
                ("model.layers.1.self_attn.k_proj", "kv", 1, full_shape, 2))
        return RankPlan(tuple(ModuleRank(name=name, role=role, layer=layer, shape=shape, rank=rank, alpha=2.0 * rank,
                                         energy=1.0, energy_upper=1.0, params=rank * sum(shape), reason="test")
                              for name, role, layer, shape, rank in rows))

    est = estimate_memory(config, method="lora", rank_plan_or_rank=plan((32, 32)))
    assert est.trainable_params == 4 * (32 + 16) + 2 * (32 + 32) and est.activations > 0
    with pytest.raises(ConfigError, match="another model"):  # the sliding layers' k_proj shape
        estimate_memory(config, method="lora", rank_plan_or_rank=plan((16, 32)))
