"""JetMoE (a mixture of attention experts beside one shared kv_proj, and a mixture of MLP experts, 3-D
JetMoeParallelExperts weights): its parameters, the weights bitsandbytes' 4-bit load holds, what `spectra train`
adapts (kv_proj, and under LoRA the four expert weights a layer through PEFT's ParamWrapper), their gradients and
AdamW states, and the KV cache are estimated, checked against transformers' JetMoeForCausalLM built from a tiny
config, PEFT and bitsandbytes; its activations are left out with a note (the routers' sorts, gathers and index_adds
are not described). It had been refused whole."""

from __future__ import annotations

import dataclasses

import pytest

from spectra.memory import estimate_memory, model_shape
from tests.memory.test_memory import (_PEFT_PATTERN_WARNING, check_kv_cache, check_qlora_storage,
                                      check_trainable_gradients_and_states, train_lora_config)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SIZES = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
             intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)


def _config(**overrides):
    from transformers import JetMoeConfig

    return JetMoeConfig(**(SIZES | overrides))


def _model(**overrides):
    import torch
    from transformers import JetMoeForCausalLM

    torch.manual_seed(0)
    return JetMoeForCausalLM(_config(**overrides))


def _train_peft(model, method: str, roles=None, layers=None):
    """PEFT's model under the LoraConfig `spectra train` builds for JetMoE (its own target selection)."""
    from peft import get_peft_model

    return get_peft_model(model, train_lora_config(model, method))


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False), dict(num_local_experts=3,
                                                                                 num_experts_per_tok=1)])
def test_parameters_are_what_transformers_builds(overrides):
    """Every parameter of JetMoeForCausalLM (tied head once). Negative control: the same sizes read as a Mixtral
    (num_attention_heads heads of q/k/v/o, SwiGLU experts) count otherwise."""
    import torch
    from transformers import JetMoeForCausalLM

    config = _config(**overrides)
    with torch.device("meta"):
        model = JetMoeForCausalLM(config)
    shape = model_shape(config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.kv_dim == SIZES["num_key_value_heads"] * SIZES["kv_channels"]
    as_mixtral = {key: config.to_dict()[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                          "intermediate_size", "num_local_experts",
                                                          "num_experts_per_tok", "tie_word_embeddings")}
    as_mixtral |= {"model_type": "mixtral", "num_attention_heads": config.num_attention_heads,
                   "num_key_value_heads": config.num_key_value_heads, "head_dim": config.kv_channels}
    assert model_shape(as_mixtral).params != shape.params


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_trainable_gradients_and_states_are_what_peft_and_adamw_hold(method):
    """What `spectra train` adapts, as PEFT builds it from train's LoraConfig: under LoRA kv_proj (lora.Linear) and
    the attention and MLP experts' 3-D weights (ParamWrappers, rank 4 per expert); under DoRA kv_proj alone (PEFT's
    ParamWrapper takes no DoRA); full fine-tuning every parameter. Negative control: under LoRA the experts'
    adapters are counted beside kv_proj's (rank 4 · (64 + 32) a layer), as PEFT builds them."""
    model = check_trainable_gradients_and_states(_model(), method, _train_peft)
    if method == "lora":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("experts.input_linear" in n for n in names) and any("mlp.output_linear" in n for n in names)
        est = estimate_memory(_config().to_dict(), method="lora", rank_plan_or_rank=4)
        assert est.trainable_params > 2 * 4 * (64 + 32)


def test_qlora_storage_is_what_bitsandbytes_holds(tmp_path):
    """bitsandbytes' 4-bit load quantises kv_proj and both routers (nn.Linear) and leaves the 3-D experts, the
    embeddings and the norms in bf16: the estimate's weights and constants are the loaded model's bytes. Negative
    control: the experts counted as quantised is off."""
    model = _model()
    check_qlora_storage(model, tmp_path / "base")
    est = estimate_memory(model.config.to_dict(), method="qlora", rank_plan_or_rank=4)
    import spectra.memory.estimate as estimate_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate_module, "_UNQUANTISED", frozenset({"router"}))
        assert estimate_memory(model.config.to_dict(), method="qlora", rank_plan_or_rank=4).weights != est.weights


def test_kv_cache_is_what_dynamic_cache_holds():
    """kv_proj's K and V, num_key_value_heads heads each (the attention repeats them top-k times after the cache)."""
    check_kv_cache(_model())


def test_activations_are_left_out_with_the_reason():
    """Routing's saved tensors are not described: no activations and no training total, a note saying why (eager
    alike); the rest estimated. Negative control: a Mixtral of the same sizes has its activations."""
    from transformers import MixtralConfig

    for attention in ("sdpa", "eager"):
        est = estimate_memory(_config().to_dict(), method="lora", rank_plan_or_rank=4, attention=attention)
        assert est.activations is None and est.training_total is None and est.weights > 0 and est.kv_cache > 0
        assert any("mixtures of attention and MLP experts" in note for note in est.notes)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2).to_dict()
    assert estimate_memory(config, method="lora", rank_plan_or_rank=4).activations > 0
    shape = model_shape(_config().to_dict())
    from spectra.memory.activations import _activations_refused

    assert _activations_refused(dataclasses.replace(shape, attention_experts=False), "eager") is None


@_PEFT_PATTERN_WARNING
def test_a_plan_trains_what_its_peft_config_does():
    """A plan of one MLP expert's output_linear, one attention expert's input_linear (query) and the shared kv_proj,
    at rank 2: the estimate's trainable count is what PEFT builds from the plan's peft_config (each planned expert's
    3-D weight a ParamWrapper of rank 2 per expert, of its own shape; kv_proj a lora.Linear). It had read the query
    experts' weight as an MLP's gate_up (hidden × 2·intermediate) (negative control: that count is not PEFT's)."""
    from peft import LoraConfig, get_peft_model

    from spectra.ranks.plan import ModuleRank, RankPlan

    model = _model()
    rows = (("model.layers.1.mlp.output_linear.2", "down", 1, (64, 64)),
            ("model.layers.0.self_attention.experts.input_linear.1", "q", 0, (16, 64)),
            ("model.layers.0.self_attention.kv_proj", "other", 0, (32, 64)))
    plan = RankPlan(tuple(ModuleRank(name=name, role=role, layer=layer, shape=shape, rank=2, alpha=4.0, energy=1.0,
                                     energy_upper=1.0, params=2 * sum(shape), reason="test")
                          for name, role, layer, shape in rows))
    from spectra.errors import PeftConfigWarning

    with pytest.warns(PeftConfigWarning, match="one rank for all its experts"):  # each expert's parameter whole
        config = {k: v for k, v in plan.to_peft_config(model=model).items() if k != "peft_type"}
    peft = get_peft_model(model, LoraConfig(**config))
    built = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    est = estimate_memory(_config().to_dict(), method="lora", rank_plan_or_rank=plan)
    assert est.trainable_params == built
    experts, h, i = SIZES["num_local_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    as_gate_up = 2 * experts * (64 + 64) + 2 * experts * (h + 2 * i) + 2 * (32 + 64)
    assert as_gate_up != built
