"""The memory model against hand-computed values and against transformers/PEFT parameter counts."""

from __future__ import annotations

import json

import pytest

from spectra.errors import CheckpointError, ConfigError
from spectra.memory import estimate_memory, format_bytes, load_config, model_shape

# literal config.json fields of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "tie_word_embeddings": False, "max_position_embeddings": 4096}
LLAMA2_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
              "tie_word_embeddings": False, "max_position_embeddings": 4096}

# by hand: embed + head 2·V·h; per layer q,k,v,o + 3 MLP matrices + 2 RMSNorms; final norm
P7 = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096
P70 = 2 * 32000 * 8192 + 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192) + 8192


def test_parameter_counts_of_llama2():
    assert P7 == 6_738_415_616 and P70 == 68_976_648_192  # the published 6.74B and 68.98B
    assert model_shape(LLAMA2_7B).params == P7
    assert model_shape(LLAMA2_70B).params == P70


def test_weights_in_16_bits():
    assert 70e9 * 2 / 2**30 == pytest.approx(130.4, abs=0.05)  # the "140 GB" of the rule of thumb
    est = estimate_memory(LLAMA2_70B, method="full", precision="bf16")
    assert est.weights == 2 * P70 == 137_953_296_384
    assert format_bytes(est.weights) == "128 GiB"
    assert format_bytes(1017 * 2**20) == "1017 MiB" and format_bytes(1023.4 * 2**10) == "1023 KiB"
    assert format_bytes(999.7 * 2**20) == "1000 MiB" and format_bytes(999.4 * 2**20) == "999 MiB"
    assert format_bytes(2048 * 2**30) == "2048 GiB" and format_bytes(1.5 * 2**20) == "1.5 MiB"
    assert estimate_memory(LLAMA2_7B, method="lora", precision="fp32").weights == 4 * P7


def test_full_fine_tuning_mixed_precision_is_16_bytes_per_parameter():
    est = estimate_memory(LLAMA2_7B, method="full", precision="mixed", optimizer="adamw")
    assert (est.weights, est.gradients, est.optimizer_states) == (2 * P7, 2 * P7, 12 * P7)
    assert est.trainable_params == P7 and est.adapter == 0
    pure = estimate_memory(LLAMA2_7B, method="full", precision="bf16", optimizer="adamw")
    assert pure.optimizer_states == 4 * P7  # PyTorch AdamW keeps moments in the parameter dtype
    assert estimate_memory(LLAMA2_7B, method="full", precision="bf16", optimizer="sgd").optimizer_states == 0


def test_lora_rank16_all_linear_on_7b():
    est = estimate_memory(LLAMA2_7B, method="lora", rank_plan_or_rank=16)
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert est.trainable_params == 32 * per_layer == 39_976_960  # the familiar "40M" of r=16 all-linear
    assert (est.adapter, est.gradients, est.optimizer_states) == (4 * 39_976_960, 4 * 39_976_960, 8 * 39_976_960)
    assert est.dora_magnitude == 0 and est.quant_constants == 0
    dora = estimate_memory(LLAMA2_7B, method="dora", rank_plan_or_rank=16)
    mags = 32 * (4 * 4096 + 2 * 11008 + 4096)
    assert dora.dora_magnitude == 4 * mags and dora.trainable_params == 39_976_960 + mags
    qv = estimate_memory(LLAMA2_7B, method="lora", rank_plan_or_rank=8, roles=("q", "v"))
    assert qv.trainable_params == 32 * 2 * 8 * 8192  # the LoRA paper's setting: 4.2M


def test_qlora_weights_and_double_quantised_constants():
    est = estimate_memory(LLAMA2_7B, method="qlora", rank_plan_or_rank=16)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert est.weights == linear // 2 + (P7 - linear) * 2 == 3_762_823_168
    # per tensor: n/64 one-byte absmax, one fp32 per 256 of those, NF4 code, second-level code, offset
    small = 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 64 + 1024 + 4
    large = 4096 * 11008 // 64 + 4 * (4096 * 11008 // 64 // 256) + 64 + 1024 + 4
    assert est.quant_constants == 32 * (4 * small + 3 * large) == 103_013_248
    assert est.quant_constants * 8 / linear == pytest.approx(0.127, abs=1e-3)  # QLoRA §3: 0.127 bits/param
    big = estimate_memory(LLAMA2_70B, method="qlora", rank_plan_or_rank=16)
    assert 34e9 < big.weights + big.quant_constants < 37e9  # "70B in 4 bits is ~35 GB before anything else"


def test_kv_cache_and_gqa():
    assert estimate_memory(LLAMA2_7B, batch=1, seq_len=4096).kv_cache == 2 * 32 * 4096 * 4096 * 2 == 2**31
    assert estimate_memory(LLAMA2_70B, batch=1, seq_len=4096).kv_cache == 2 * 80 * 1024 * 4096 * 2


def test_activations_by_hand_for_7b():
    est = estimate_memory(LLAMA2_7B, method="full", batch=1, seq_len=2048, precision="bf16")
    per_token_layer = 4 * 4096 + 2 * 4096 + 2 * 4096 + 4 * 11008  # norms+inputs, Q/O, K/V, SwiGLU
    head = 2048 * 32000 * (2 + 8)
    assert est.activations == 2048 * 2 * 32 * per_token_layer + head + 2048 * 4096 * 2
    assert est.activations_checkpointed == 2048 * 2 * (32 * 4096 + per_token_layer) + head + 2048 * 4096 * 2
    assert est.training_total == (est.weights + est.gradients + est.optimizer_states
                                  + est.activations_checkpointed)
    assert not estimate_memory(LLAMA2_7B, method="full", gradient_checkpointing=False).training_total \
        < est.training_total


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_layer_activations_agree_with_korthikanti(attention):
    # arXiv:2205.05198: s·b·h·(34 + 5·a·s/h) bytes per layer; without dropout (2 masks of 1 byte,
    # and the dropout output of the attention matrix) that is s·b·h·32 + 2·a·s²·b
    s, b, h, a = 1024, 2, 768, 12
    cfg = {"model_type": "gpt2", "n_embd": h, "n_head": a, "n_positions": 1024, "vocab_size": 50257}
    one = estimate_memory(cfg | {"n_layer": 1}, method="full", batch=b, seq_len=s, attention=attention)
    two = estimate_memory(cfg | {"n_layer": 2}, method="full", batch=b, seq_len=s, attention=attention)
    expected = s * b * h * 32 + (2 * a * s * s * b if attention == "eager" else 0)
    assert two.activations - one.activations == expected


@pytest.mark.parametrize(("family", "head"), [("llama", True), ("qwen2", True), ("gpt2", True),
                                              ("bert", False), ("mixtral", True), ("phi3", True), ("gemma", True)])
def test_parameter_count_matches_transformers(family, head):
    from tests.models import build_model

    model = build_model(family, head=head)
    config = model.config.to_dict()
    assert model_shape(config).params == sum(p.numel() for p in model.parameters())
    if family == "gemma":  # Gemma's hub config.json has no tie_word_embeddings: GemmaConfig ties by default
        config.pop("tie_word_embeddings")
        assert model_shape(config).params == sum(p.numel() for p in model.parameters())


def test_lora_activations_per_module_by_precision():
    """PEFT casts a 16-bit input to the fp32 adapter and keeps that copy for lora_A, plus A·x (r) for lora_B;
    with fp32 activations lora_A keeps the layer input itself (already counted): only the r values are new."""
    tokens, modules = 2048, 32 * 7  # every block linear of Llama-2-7B
    inputs = 32 * (4 * 4096 + 2 * 4096 + 11008)  # Σ d_in over the adapted modules: q k v o gate up | down
    for precision, per_token in (("bf16", 4 * (inputs + 16 * modules)), ("fp32", 4 * 16 * modules)):
        full = estimate_memory(LLAMA2_7B, method="full", precision=precision, seq_len=tokens)
        lora = estimate_memory(LLAMA2_7B, method="lora", precision=precision, seq_len=tokens, rank_plan_or_rank=16)
        assert lora.activations - full.activations == tokens * per_token, precision


def test_an_expert_adapter_sees_only_its_routed_tokens():
    mixtral = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "num_local_experts": 8,
               "num_experts_per_tok": 2}
    est = {roles: estimate_memory(mixtral, method="lora", seq_len=100, rank_plan_or_rank=4, roles=roles)
           for roles in (("q",), ("q", "gate"))}
    gate = 100 * 4 * (64 + 4) * 8 * 2 / 8  # 8 experts' gates, each on 2/8 of the tokens
    assert est[("q", "gate")].activations - est[("q",)].activations == pytest.approx(gate, abs=1)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trainable_parameters_match_peft(method):
    from peft import LoraConfig, get_peft_model

    from tests.models import build_model

    for family in ("llama", "phi3"):  # Phi-3: LoRA adapts the fused qkv_proj and gate_up_proj Linears
        model = build_model(family)
        est = estimate_memory(model, method=method, rank_plan_or_rank=4)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=method == "dora"))
        assert est.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad), family


def test_rank_plan_input():
    from spectra.ranks import recommend_ranks, RankPolicy
    from tests.ranks.rows import analysis, make_row

    rows = [make_row("model.layers.0.self_attn.q_proj", [1.0] * 3 + [0.0] * 29, layer=0),
            make_row("model.layers.1.mlp.down_proj", [1.0] * 5 + [0.0] * 27, shape=(32, 64), role="down", layer=1)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=1.0))
    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 128}
    est = estimate_memory(cfg, method="lora", rank_plan_or_rank=plan)
    assert est.trainable_params == plan.total_params == 3 * 64 + 5 * 96


def test_load_config_forms_and_errors(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert load_config(tmp_path) == LLAMA2_7B == load_config(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="No config.json"):
        load_config(tmp_path / "missing" / "config.json")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="offline"):
        load_config("spectra-test/no-such-model")


@pytest.mark.parametrize("kwargs", [dict(method="adalora"), dict(precision="int8"), dict(optimizer="lion"),
                                    dict(batch=0), dict(rank_plan_or_rank=0), dict(rank_plan_or_rank=8192),
                                    dict(roles=("nope",)), dict(attention="flash")])
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        estimate_memory(LLAMA2_7B, **kwargs)
    with pytest.raises(ConfigError, match="lacks"):
        estimate_memory({"model_type": "llama", "hidden_size": 8})


def test_families_unlike_llama_are_refused_not_miscounted():
    from tests.models import build_model

    with pytest.raises(ConfigError, match="model_type gpt_neox"):
        model_shape(build_model("gpt_neox").config.to_dict())  # read as Llama-like it was 25 % too large


def test_dora_counts_its_saved_outputs_and_its_identity_workspace():
    """PEFT's DoRA keeps each module's base output (16-bit) and LoRA output (fp32): 6 B per token and output
    feature more than LoRA (measured 6.05 on a bf16 Llama); its B·A goes through an fp32 d_in² identity."""
    lora = estimate_memory(LLAMA2_7B, method="lora", rank_plan_or_rank=16, gradient_checkpointing=False)
    dora = estimate_memory(LLAMA2_7B, method="dora", rank_plan_or_rank=16, gradient_checkpointing=False)
    h, i, layers, tokens = 4096, 11008, 32, 2048
    d_out = 4 * h + 2 * i + h  # q, k, v, o (no GQA in 7B), gate, up, down
    assert dora.activations - lora.activations == layers * tokens * 6 * d_out
    assert dora.workspace == 4 * (i * i + 4 * i * h)  # the largest module: down_proj, d_in = 11008


@pytest.mark.parametrize(("config", "match"), [
    ({"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 100, "num_experts": 8, "moe_intermediate_size": 32}, "num_experts"),
    ({"model_type": "albert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 100, "type_vocab_size": 2}, "albert"),
])
def test_configs_the_model_would_count_wrong_are_refused(config, match):
    with pytest.raises(ConfigError, match=match):  # counted as dense Llama / as BERT before
        estimate_memory(config, method="lora", rank_plan_or_rank=4)


def test_phimoe_has_separate_qkv_and_fused_roles_take_their_parts():
    phimoe = {"model_type": "phimoe", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "num_local_experts": 4}
    est = estimate_memory(phimoe, method="lora", rank_plan_or_rank=4, roles=("q", "k", "v"))
    assert est.trainable_params == 2 * 4 * ((64 + 64) + 2 * (64 + 32))  # q 64×64, k and v 32×64, per layer
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 128}
    est = estimate_memory(gpt2, method="lora", rank_plan_or_rank=4, roles=("q", "v"))  # c_attn holds both
    assert est.trainable_params == 2 * 4 * (64 + 3 * 64)
