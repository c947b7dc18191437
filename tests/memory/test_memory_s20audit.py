"""Audit 2 (session 20) of `spectra memory`: ModernBERT was read as Llama-like and its LoRA trainable count was off
(13,568 where PEFT's get_peft_model gives 10,496 on its four Linears a layer, 4,096 on Wqkv alone), because its fused
Wqkv and Wi hold exactly the parameters of Llama's q, k, v, gate and up, so the parameter-count check let it through.
model_shape now compares each block's Linear modules (role by name, out, in) of transformers' model built from the
config with those the memory model assumes, and refuses ModernBERT naming its fused modules. Jamba and DBRX are
refused for what they are (Mamba layers; DBRX's own blocks), not for an MoE key or a missing hidden_size.

References: PEFT's get_peft_model on transformers' models built from tiny configs; the count a Llama reading of the
ModernBERT config gives (negative control)."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import DEFAULT_ROLES, estimate_memory, model_shape
from spectra.memory import shape as shape_module

_MODERNBERT = dict(model_type="modernbert", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=128, max_position_embeddings=64, global_attn_every_n_layers=2,
                   local_attention=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                   tie_word_embeddings=True)
_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _built(config: dict, auto: str = "AutoModelForCausalLM"):
    import torch
    import transformers as tf

    cfg = dict(config)
    family = cfg.pop("model_type")
    torch.manual_seed(0)
    return getattr(tf, auto).from_config(tf.AutoConfig.for_model(family, **cfg))


def _peft_trainable(model, roles=DEFAULT_ROLES, rank: int = 8) -> int:
    """PEFT's trainable count with LoRA at ``rank`` on every block Linear whose name spectra reads as one of
    ``roles`` (what ``spectra train``'s default roles select), each named in full."""
    import torch
    from peft import LoraConfig, get_peft_model

    from spectra.checkpoints.architectures import module_info

    targets = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and module_info(name).layer is not None and module_info(name).role in roles]
    assert targets
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=targets))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_modernbert_refused_naming_its_fused_modules():
    """Before: estimated, 13,568 trainable parameters at rank 8 (a Llama reading); PEFT's are 4,096 (Wqkv alone)
    or 10,496 (every Linear). Now refused naming Wqkv and Wi."""
    with pytest.raises(ConfigError) as err:
        estimate_memory(_MODERNBERT, method="lora", rank_plan_or_rank=8)
    message = str(err.value)
    assert "modernbert" in message and "Wqkv" in message and "Wi" in message
    assert "does not describe" in message


def test_modernbert_llama_reading_is_not_peft():
    """Negative control: what the memory model counted for ModernBERT (the config read as Llama's) is neither of
    PEFT's counts, though the parameter totals agree (why the count check let it through)."""
    import transformers as tf

    base = _built(_MODERNBERT, "AutoModel")
    llama = model_shape(_MODERNBERT | {"model_type": "llama"})
    assert llama.params - llama.head_params == sum(p.numel() for p in base.parameters())  # totals agree
    counted = estimate_memory(_MODERNBERT | {"model_type": "llama"}, method="lora", rank_plan_or_rank=8)
    assert counted.trainable_params == 13_568
    every = _built(_MODERNBERT, "AutoModelForMaskedLM")  # Wqkv, attn.Wo, mlp.Wi, mlp.Wo, whatever their roles
    assert _peft_trainable(every, roles=("qkv", "o", "gate_up", "down", "other")) == 10_496
    # spectra's default roles: Wqkv alone (4,096) where attn.Wo, mlp.Wi, mlp.Wo read as 'other', all four otherwise
    assert _peft_trainable(_built(_MODERNBERT, "AutoModelForMaskedLM")) in (4_096, 10_496)
    assert isinstance(base, tf.ModernBertModel)


def test_linear_check_refuses_modernbert_without_its_named_reason(monkeypatch):
    """The generic check alone (the named refusal taken away) refuses ModernBERT: layer 0's Linears by role and
    shape are not the Llama reading's."""
    monkeypatch.delitem(shape_module._OWN_DESIGN_REFUSED, "modernbert")
    with pytest.raises(ConfigError, match=r"layer 0 the linear layers .*qkv 192×64 \(by role, out×in\), where "
                                          r"spectra's memory model assumes down 64×48, gate 48×64, k 64×64, o 64×64, "
                                          r"q 64×64, up 48×64, v 64×64"):
        model_shape(_MODERNBERT)


def test_linear_check_refuses_same_total_with_other_linears():
    """A block of the same parameter total but other Linear shapes (the ModernBERT built, compared with the Llama
    shape of its sizes) is refused by _refuse_other_linears directly; the shape of the model's own sizes passes."""
    base = _built(_MODERNBERT, "AutoModel")
    with pytest.raises(ConfigError, match="would count the adapters"):
        shape_module._refuse_other_linears(base, model_shape(_MODERNBERT | {"model_type": "llama"}),
                                           mtype="modernbert", model_class="ModernBertModel", cfg=_MODERNBERT)


_MATCHING = [
    dict(model_type="llama"),
    dict(model_type="phi3"),  # fused qkv_proj and gate_up_proj, described as such
    dict(model_type="glm"),  # fused gate_up_proj beside q, k, v
    dict(model_type="starcoder2"),  # c_fc / c_proj, biases
    dict(model_type="qwen3"),
    dict(model_type="gemma2", head_dim=8),
]


@pytest.mark.parametrize("overrides", _MATCHING, ids=lambda o: o["model_type"])
def test_linear_check_passes_described_families_and_counts_are_peft(overrides):
    """Negative control for the check: families whose blocks the memory model describes (those model_shape
    had skipped the check for at run time too) pass it on their built base model, and their LoRA trainable count at rank 8
    on the default roles is PEFT's."""
    config = _SMALL | overrides
    shape = model_shape(config)
    base = _built(config, "AutoModel")
    shape_module._refuse_other_linears(base, shape, mtype=config["model_type"], model_class="base", cfg=config)
    estimate = estimate_memory(config, method="lora", rank_plan_or_rank=8)
    assert estimate.trainable_params == _peft_trainable(_built(config))


def test_gelu_families_pass_the_linear_check():
    """GPT-NeoX (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) and GPT-2 (Conv1D, weight (in, out)) pass."""
    neox = dict(model_type="gpt_neox", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    gpt2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                bos_token_id=0, eos_token_id=0)
    for config in (neox, gpt2):
        shape_module._refuse_other_linears(_built(config, "AutoModel"), model_shape(config),
                                           mtype=config["model_type"], model_class="base", cfg=config)


def test_jamba_refused_for_its_mamba_layers():
    """Before: 'a mixture of experts configured by num_experts … (Qwen2-MoE, OLMoE …)'; its experts are
    Mixtral-like, its Mamba layers the gap."""
    config = _SMALL | dict(model_type="jamba", num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                           attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)
    with pytest.raises(ConfigError) as err:
        model_shape(config)
    message = str(err.value)
    assert "Mamba" in message and "attn_layer_period" in message
    assert "Qwen2-MoE" not in message and "num_experts or" not in message


def test_dbrx_refused_for_its_blocks_not_a_missing_key():
    """Before: "config.json of model_type dbrx lacks 'hidden_size'" (its config has d_model)."""
    config = dict(model_type="dbrx", d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                  attn_config=dict(kv_n_heads=2), ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))
    with pytest.raises(ConfigError) as err:
        model_shape(config)
    message = str(err.value)
    assert "DBRX" in message and "Wqkv" in message and "w1, v1 and w2" in message
    assert "lacks" not in message


_DENSE = ["mistral", "qwen2", "gemma", "granite", "helium", "ernie4_5", "ministral", "smollm3", "olmo", "olmo2",
          "olmo3", "arcee", "seed_oss", "hunyuan_v1_dense", "exaone4", "cohere", "cohere2", "apertus", "stablelm"]
_OWN = {"seed_oss": dict(attention_dropout=0.0, residual_dropout=0.0), "gemma": dict(head_dim=8),
        "stablelm": dict(partial_rotary_factor=0.5)}


@pytest.mark.parametrize("family", _DENSE)
def test_linear_check_passes_dense_families(family):
    """The check passes every dense family the memory model describes, those it had skipped at run time (the former
    _COUNTED_RIGHT) included: each block's Linears by role and shape are the shape's."""
    config = _SMALL | {"model_type": family} | _OWN.get(family, {})
    shape_module._refuse_other_linears(_built(config, "AutoModel"), model_shape(config), mtype=family,
                                       model_class="base", cfg=config)


@pytest.mark.parametrize("family", ["mixtral", "phimoe", "granitemoe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_linear_check_passes_moe_families(family):
    """An MoE block's Linears outside the routed experts and router (attention, DeepSeek's MLA projections and shared
    experts, its dense first layers) are the shape's."""
    base = _built(_SMALL | {"model_type": family}, "AutoModel")
    config = base.config.to_dict()  # what config.json holds (experts and MLA sizes filled in)
    shape_module._refuse_other_linears(base, model_shape(config), mtype=family, model_class="base", cfg=config)


def test_linear_check_refuses_an_moe_attention_of_other_shapes():
    """Negative control for MoE blocks: a Mixtral whose attention the shape reads with other KV heads is refused
    (the experts are not what is compared)."""
    base = _built(_SMALL | {"model_type": "mixtral"}, "AutoModel")
    config = base.config.to_dict()
    shape_module._refuse_other_linears(base, model_shape(config), mtype="mixtral", model_class="base", cfg=config)
    with pytest.raises(ConfigError, match=r"layer 0 the linear layers k 16×32, o 32×32, q 32×32, v 16×32"):
        shape_module._refuse_other_linears(base,
                                           model_shape(config | {"num_key_value_heads": 4}), mtype="mixtral",
                                           model_class="base", cfg=config)
