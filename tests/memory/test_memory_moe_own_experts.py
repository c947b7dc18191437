"""MoE families with expert sizes of their own and dense layers between the MoE ones: Qwen3-MoE (mlp_only_layers,
decoder_sparse_step) and DeepSeek-V2/V3 (multi-head latent attention, shared experts, first_k_dense_replace). Both
were refused ("a mixture of experts configured by num_experts or moe_intermediate_size"). Checked against the models
transformers builds from tiny configs, PEFT's count on spectra train's LoraConfig, bitsandbytes' 4-bit load and what
autograd saves (tests/memory/test_memory.py's measurement)."""

from __future__ import annotations

import copy

import pytest

from spectra.errors import ConfigError
from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import _PEFT_PATTERN_WARNING, _loss, block_saved, saved_bytes, train_lora_config

_SMALL = dict(hidden_size=32, num_attention_heads=4, vocab_size=64)
_MLA = dict(moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=3, num_experts_per_tok=2,
            n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8)
# (model_type, config fields): dense layers where the family puts them, and the attention variants
CONFIGS = {
    "qwen3_moe": ("qwen3_moe", dict(intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
                                    num_experts=3, num_experts_per_tok=2, mlp_only_layers=[0])),
    "qwen3_moe_step": ("qwen3_moe", dict(intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2,
                                         head_dim=8, num_experts=3, num_experts_per_tok=2, decoder_sparse_step=2,
                                         attention_bias=True, num_hidden_layers=4)),
    "deepseek_v3": ("deepseek_v3", dict(intermediate_size=40, first_k_dense_replace=1, q_lora_rank=16, **_MLA)),
    "deepseek_v3_no_q_lora": ("deepseek_v3", dict(intermediate_size=40, first_k_dense_replace=2, q_lora_rank=None,
                                                  attention_bias=True, num_hidden_layers=3, **_MLA)),
    "deepseek_v2": ("deepseek_v2", dict(intermediate_size=40, first_k_dense_replace=1, q_lora_rank=None,
                                        mlp_bias=True, **_MLA)),
}
_CAUSAL_LM = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
              "deepseek_v2": "DeepseekV2ForCausalLM"}


def _config(name: str, **overrides):
    import transformers as tf

    model_type, fields = CONFIGS[name]
    return tf.AutoConfig.for_model(model_type, **({"num_hidden_layers": 2} | _SMALL | fields | overrides))


def _model(name: str, **overrides):
    import torch
    import transformers as tf

    config = _config(name, **overrides)
    torch.manual_seed(0)
    return getattr(tf, _CAUSAL_LM[config.model_type])(config)


def _trained(peft_model) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_are_what_transformers_builds(name):
    """Every parameter of the causal LM transformers builds from the config (on the meta device), and each layer's
    MLP as the family decides it: dense (Qwen3-MoE's mlp_only_layers and the layers decoder_sparse_step skips,
    DeepSeek's first first_k_dense_replace), else routed experts (beside DeepSeek's shared ones). Negative
    control: counting every layer as an MoE layer is off by the dense layers' difference."""
    import torch

    with torch.device("meta"):
        model = _model(name)
    shape = model_shape(model.config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    for layer, block in enumerate(model.model.layers):
        routed = hasattr(block.mlp, "experts")
        assert (shape.block(layer).experts > 1) == routed, layer
        if routed:
            assert shape.block(layer).experts == block.mlp.experts.gate_up_proj.shape[0]
    assert shape.dense_layers
    every_layer_moe = sum(o * i for _, o, i in shape.linears) * shape.layers
    assert every_layer_moe != shape.linear_params


def test_other_moe_configured_by_num_experts_is_still_refused():
    """Qwen2-MoE (a shared expert with a gate of its own) and OLMoE stay refused: the memory model does not describe
    them."""
    import transformers as tf

    config = tf.Qwen2MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                               shared_expert_intermediate_size=16, vocab_size=64)
    with pytest.raises(ConfigError, match="model_type qwen2_moe: a mixture of experts configured by num_experts"):
        estimate_memory(config.to_dict())


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("method", "roles"), [
    ("lora", None), ("lora", ("down",)), ("lora", ("q", "k", "v", "o")), ("lora", ("gate", "up")),
    ("dora", None), ("qlora", None), ("dora", ("o",))])
@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "deepseek_v2"])
def test_an_int_rank_trains_what_spectra_train_adapts(name, method, roles):
    """The trainable parameters equal PEFT's on the LoraConfig spectra train builds for the same method and roles:
    attention Linears, routed experts as fused parameters, and the dense layers' and shared experts' MLPs through
    their weights (target_parameters; PEFT would rewrite their names into the experts). DoRA and QLoRA leave every
    parameter target out of the default roles, and the estimate's notes carry train's note that says so."""
    from peft import get_peft_model

    model = _model(name)
    try:
        config = train_lora_config(model, method, roles)
    except ConfigError as trained:  # e.g. roles of DeepSeek's MLA attention that train does not take: refused alike
        with pytest.raises(ConfigError) as estimated:
            estimate_memory(model.config.to_dict(), method=method, rank_plan_or_rank=4, roles=roles)
        assert str(estimated.value) == str(trained.value)
        return
    est = estimate_memory(model.config.to_dict(), method=method, rank_plan_or_rank=4, roles=roles)
    assert est.trainable_params == _trained(get_peft_model(copy.deepcopy(model), config)) > 0
    if method in ("dora", "qlora") and roles is None:
        assert any("are not adapted" in note and "target_parameters" in note for note in est.notes), est.notes


# ---------------------------------------------------------------------------- Qwen3-MoE's activations


def _block(name: str, method: str, roles, precision: str, attention: str = "sdpa", *, fp32_routers: bool = False,
           **overrides) -> dict[str, int]:
    """One block's saved bytes per sequence, measured and modelled (:func:`tests.memory.test_memory.block_saved`),
    with LoRA as spectra train builds it. ``fp32_routers``: DeepSeek's routers kept in fp32, as from_pretrained
    keeps them (_keep_in_fp32_modules_strict)."""
    from peft import get_peft_model

    def routers_in_fp32(model):
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.float()

    return block_saved(lambda layers: _model(name, num_hidden_layers=layers, **overrides),
                       lambda model, method, roles: get_peft_model(model, train_lora_config(model, method, roles)),
                       method, precision, attention, roles, prepare=routers_in_fp32 if fp32_routers else None)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("method", "roles", "precision", "attention", "overrides"), [
    # an MoE block (layer 1; layer 0 dense in both models): Q/K norms, the router's weights in p, renormalised
    # only with norm_topk_prob
    ("full", None, "bf16", "sdpa", {}), ("lora", None, "bf16", "sdpa", {}), ("lora", None, "fp32", "sdpa", {}),
    ("lora", ("q", "v"), "bf16", "sdpa", {}), ("lora", None, "bf16", "eager", {}),
    ("full", None, "fp32", "sdpa", dict(norm_topk_prob=True)), ("lora", None, "bf16", "sdpa", dict(norm_topk_prob=True)),
    # a dense block (mlp_only_layers [1]; layer 0 routed): its MLP adapted through its weights, which keeps inputs
    ("full", None, "bf16", "sdpa", dict(mlp_only_layers=[1])), ("lora", None, "bf16", "sdpa", dict(mlp_only_layers=[1])),
    ("lora", None, "fp32", "sdpa", dict(mlp_only_layers=[1])), ("lora", ("down",), "bf16", "sdpa", dict(mlp_only_layers=[1])),
    ("lora", ("up",), "bf16", "sdpa", dict(mlp_only_layers=[1])), ("dora", None, "bf16", "sdpa", dict(mlp_only_layers=[1]))])
def test_a_qwen3_moe_blocks_activations_are_what_autograd_saves(method, roles, precision, attention, overrides):
    """Mixtral's routing counted for Qwen3-MoE is 16 bytes a token over at bf16 without norm_topk_prob (no
    renormalisation, weights cast to bf16); a dense layer's MLP adapted through its weights keeps its inputs (a
    block was 144 bytes a token short before they were counted)."""
    block = _block("qwen3_moe", method, roles, precision, attention, **overrides)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_dense_layers_merged_weights_are_kept_per_layer(precision):
    """PEFT's ParamWrapper on a dense layer's gate/up/down weight merges W + s·B·A in every forward and the product
    keeps it: one layer's bytes at batch 2, from models of 1 and 2 layers (layer 1 dense), per-layer terms
    included."""
    import torch
    from peft import get_peft_model

    measured, modelled = [], []
    for layers in (1, 2):
        model = _model("qwen3_moe", num_hidden_layers=layers, mlp_only_layers=[1])
        config = model.config
        model = get_peft_model(model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[precision]),
                               train_lora_config(model)).train()
        measured.append(saved_bytes(model, lambda m: _loss(m, 2, 16)))
        modelled.append(estimate_memory(config, method="lora", rank_plan_or_rank=4, batch=2, seq_len=16,
                                        precision=precision).activations)
    assert modelled[1] - modelled[0] == measured[1] - measured[0]


# ---------------------------------------------------------------------------- storage: 4-bit, fp32 routers, cache


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_qlora_storage_is_what_bitsandbytes_holds(name, tmp_path):
    """bitsandbytes quantises the nn.Linear modules (attention, dense MLPs, DeepSeek's shared experts) and leaves
    the fused routed experts and the routers in 16 bits (DeepSeek's routers in fp32: transformers keeps them so);
    the estimate's weights and constants are the loaded model's bytes, and its note says which stay unquantised.
    Negative control: the model's bf16 bytes, had the experts been quantised, are not."""
    import torch

    from tests.models import load_4bit

    model = _model(name, hidden_size=64, intermediate_size=128, moe_intermediate_size=64)
    config = model.config
    loaded, constants = load_4bit(model, tmp_path)
    est = estimate_memory(config.to_dict(), method="qlora", rank_plan_or_rank=4)
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert est.weights == held and est.quant_constants == constants
    experts = sum(p.numel() for n, p in loaded.named_parameters() if ".experts." in n or n.endswith("mlp.gate.weight"))
    routers = sum(p.numel() for p in loaded.parameters() if p.dtype == torch.float32)  # DeepSeek's, kept in fp32
    kept = f"the experts in bf16, the routers ({routers:,}) in fp32" if routers else "stay in bf16"
    assert any(f"({experts:,} parameters" in note and kept in note for note in est.notes), est.notes
    assert held < estimate_memory(config.to_dict(), method="lora", rank_plan_or_rank=4).weights


def test_deepseek_keeps_its_routers_in_fp32_and_caches_its_latents(tmp_path):
    """from_pretrained in bf16 keeps DeepSeek's router weights in fp32 (_keep_in_fp32_modules_strict): the
    estimate's weights are the loaded model's bytes. Its DynamicCache holds the compressed latent and the rotary key
    per token and layer (kv_lora_rank + qk_rope_head_dim), not K and V per head: the estimate's KV cache is the
    cache's bytes after a forward of batch 2 × 16 (2·kv per token would be 4× more here)."""
    import torch

    model = _model("deepseek_v3")
    config = model.config
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    est = estimate_memory(config.to_dict(), method="lora", rank_plan_or_rank=4, batch=2, seq_len=16)
    assert est.weights == sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert any(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        cache = loaded(input_ids=torch.zeros(2, 16, dtype=torch.long), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert est.kv_cache == held


def test_deepseeks_sdpa_activations_are_refused_where_q_and_v_heads_differ():
    """DeepSeek's own configs give Q and K heads of qk_nope + qk_rope = 192 values and V heads of 128: FlashAttention
    takes one head size, so sdpa runs another kernel (the CPU's math kernel keeps the s×s probabilities; CUDA's
    memory-efficient one is unchecked here). Those activations, and so the training total, are None, the rows leave
    them out and the notes say why and that eager attention is estimated; the rest is estimated."""
    config = _config("deepseek_v3", v_head_dim=4).to_dict()
    for checkpointing in (True, False):
        est = estimate_memory(config, method="lora", rank_plan_or_rank=4, gradient_checkpointing=checkpointing)
        assert est.activations is None and est.activations_checkpointed is None and est.training_total is None
        assert not any(name.startswith(("activations", "training")) for name, _ in est.rows())
        assert est.gradients == 4 * est.trainable_params > 0 and est.to_dict()["training_total"] is None
        assert any("multi-head latent attention under sdpa" in note and "attention='eager'" in note
                   for note in est.notes)
    eager = estimate_memory(config, method="lora", rank_plan_or_rank=4, attention="eager")
    assert eager.activations > 0 and eager.training_total > 0
    assert not any("not estimated" in note for note in eager.notes)
    equal = estimate_memory(_config("deepseek_v3").to_dict(), method="lora", rank_plan_or_rank=4)  # 8 and 8
    assert equal.activations > 0


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("name", "method", "roles", "precision", "attention", "overrides"), [
    # an MoE block (layer 1): MLA, the sigmoid router (normalised), routed and shared experts
    ("deepseek_v3", "full", None, "fp32", "eager", {}), ("deepseek_v3", "full", None, "bf16", "eager", {}),
    ("deepseek_v3", "full", None, "bf16", "sdpa", {}), ("deepseek_v3", "lora", None, "bf16", "sdpa", {}),
    ("deepseek_v3", "lora", None, "fp32", "eager", {}), ("deepseek_v3", "lora", ("o",), "bf16", "eager", {}),
    ("deepseek_v3", "lora", ("q", "k", "v", "o"), "bf16", "eager", dict(v_head_dim=4)),
    ("deepseek_v3", "dora", None, "bf16", "sdpa", {}),
    # a dense block (first_k_dense_replace 2), its MLP adapted through its weights
    ("deepseek_v3", "lora", None, "bf16", "sdpa", dict(first_k_dense_replace=2)),
    # q_proj instead of q_a/q_b (V2-Lite's layout)
    ("deepseek_v3_no_q_lora", "full", None, "bf16", "eager", {}),
    # V2: an fp32 softmax router, unnormalised; group_limited_greedy keeps its group mask
    ("deepseek_v2", "full", None, "fp32", "eager", {}), ("deepseek_v2", "lora", None, "bf16", "sdpa", {}),
    ("deepseek_v2", "full", None, "bf16", "sdpa", dict(topk_method="group_limited_greedy", n_group=3, topk_group=2))])
def test_a_deepseek_blocks_activations_are_what_autograd_saves(name, method, roles, precision, attention, overrides):
    """MLA keeps its latents' norms, Q, K (fresh), V (kv_b's whole output under sdpa, a copy under eager from batch
    2: test_deepseeks_eager_v_at_batch_1_is_kv_bs_whole_output) and
    o_proj reads a copy; while the model was being written, a 1/rms counted for the absent Q latent (q_proj) put
    V2 4 bytes a token over, eager's V counted as kv_b's whole output 32 over."""
    block = _block(name, method, roles, precision, attention, fp32_routers=True, **overrides)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("name", "method", "overrides"), [
    ("deepseek_v3", "full", {}), ("deepseek_v3", "lora", dict(v_head_dim=4)), ("deepseek_v2", "full", {}),
    ("deepseek_v3_no_q_lora", "lora", {})])
def test_deepseeks_eager_v_at_batch_1_is_kv_bs_whole_output(name, method, overrides):
    """Under eager at batch 1 (`spectra memory`'s default) probabilities·V keeps V as the strided view of kv_b's
    output it is (torch.matmul folds (1, heads) without a copy), so kv_b's whole output, K's part too; from batch
    2 a copy of V. One block at batch 1 less at batch 2 (fp32, where DeepSeek's routers are in fp32 anyway),
    measured and modelled (:func:`tests.memory.test_memory.layer_saved`). Negative control: V counted as a copy at
    batch 1 too is off by heads·qk_nope_head_dim·4 bytes a token."""
    from peft import get_peft_model

    import spectra.memory.activations as activations
    from tests.memory.test_memory import layer_saved

    def build(layers):
        return _model(name, num_hidden_layers=layers, **overrides)

    def adapted(model, method, roles):
        return get_peft_model(model, train_lora_config(model, method, roles))

    def as_batch_2(patch, module):
        real = module._mla_bytes
        patch.setattr(module, "_mla_bytes", lambda *a, **kw: real(*a, **(kw | {"batch": 2})))

    one, two = (layer_saved(build, adapted, method, "fp32", "eager", batch=b, use_cache=True) for b in (1, 2))
    assert two["modelled"] - one["modelled"] == two["measured"] - one["measured"] > 0, (one, two)
    copied = layer_saved(build, adapted, method, "fp32", "eager", batch=1, use_cache=True, misread=as_batch_2)
    config = build(1).config
    assert one["modelled"] - copied["modelled"] == 16 * 4 * config.num_attention_heads * config.qk_nope_head_dim
    assert activations._mla_bytes  # the name the negative control patches


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("name", "overrides"), [("deepseek_v3", {}), ("deepseek_v3", dict(first_k_dense_replace=2)),
                                                 ("deepseek_v2", {})])
def test_deepseeks_merged_weights_are_kept_per_layer(name, overrides):
    """The shared experts' and dense MLPs' weights that train adapts through PEFT's ParamWrapper, and the routed
    experts', are merged in every forward and kept: one layer's bytes at batch 2 (fp32, so the router's fp32
    weight is no cast copy), from models of 1 and 2 layers, per-layer terms included."""
    from peft import get_peft_model

    measured, modelled = [], []
    for layers in (1, 2):
        model = _model(name, num_hidden_layers=layers, **overrides)
        config = model.config
        model = get_peft_model(model, train_lora_config(model)).train()
        measured.append(saved_bytes(model, lambda m: _loss(m, 2, 16)))
        modelled.append(estimate_memory(config, method="lora", rank_plan_or_rank=4, batch=2, seq_len=16,
                                        precision="fp32").activations)
    assert modelled[1] - modelled[0] == measured[1] - measured[0]


def test_cli_json_carries_the_notes_and_no_activations_for_deepseek_under_sdpa(tmp_path):
    """`spectra memory --json` writes the notes and null activations and training total for DeepSeek under sdpa
    (Q heads wider than V's; the table's rows leave them out; tests/memory/test_memory_cli_notes.py checks the notes printed
    under the table)."""
    import json

    from typer.testing import CliRunner

    from spectra.cli import app

    (tmp_path / "config.json").write_text(json.dumps(_config("deepseek_v3", v_head_dim=4).to_dict()))
    run = CliRunner().invoke(app, ["memory", str(tmp_path), "--rank", "4", "--json"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.output)
    assert data["activations"] is None and data["training_total"] is None and data["weights"] > 0
    assert any("not estimated" in note for note in data["notes"])
    table = CliRunner().invoke(app, ["memory", str(tmp_path), "--rank", "4"])
    assert table.exit_code == 0 and "inference total" in table.output and "training total" not in table.output
