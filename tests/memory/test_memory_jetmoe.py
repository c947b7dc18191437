"""JetMoE (a mixture of attention experts beside one shared kv_proj, and a mixture of MLP experts, 3-D
JetMoeParallelExperts weights): its parameters, the weights bitsandbytes' 4-bit load holds, what `spectra train`
adapts (kv_proj, and under LoRA the four expert weights a layer through PEFT's ParamWrapper), their gradients and
AdamW states, the KV cache, and the activations (the routers' indices, the routed copies, the index_adds' sources,
attention over k·num_key_value_heads heads), checked against transformers' JetMoeForCausalLM built from a tiny
config, PEFT, bitsandbytes and autograd's saved tensors. It had been refused whole, then estimated without its
activations."""

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


def _block(method: str, precision: str, attention: str, *, seq_len: int = 16, batches=(2, 3),
           misread=None) -> dict[str, int]:
    """One block's saved bytes per sequence of ``seq_len`` tokens, measured (autograd's saved tensors) and modelled:
    the double difference of models of 1 and 2 blocks at two batch sizes, which cancels the embeddings, the head,
    the loss and what is kept per layer whatever the tokens. ``misread``: a change to the shape the estimate reads
    (a negative control)."""
    import torch

    import spectra.memory.estimate as estimate_module
    from tests.memory.test_memory import _loss, saved_bytes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    real = estimate_module.model_shape
    measured, modelled = {}, {}
    for layers in (1, 2):
        model = _model(num_hidden_layers=layers)
        model.config._attn_implementation = attention
        config = model.config.to_dict()
        model = model.to(dtype)
        model = (model if method == "full" else _train_peft(model, method)).train()
        for batch in batches:
            measured[layers, batch] = saved_bytes(model, lambda m: _loss(m, batch, seq_len))
            with pytest.MonkeyPatch.context() as patch:
                if misread:
                    patch.setattr(estimate_module, "model_shape", lambda c, **kw: misread(real(c, **kw)))
                modelled[layers, batch] = estimate_memory(config, method=method, rank_plan_or_rank=4, batch=batch,
                                                          seq_len=seq_len, precision=precision,
                                                          attention=attention).activations
    one, two = batches
    return {kind: (d[2, two] - d[1, two] - d[2, one] + d[1, one]) // (two - one)
            for kind, d in (("measured", measured), ("modelled", modelled))}


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("method", "precision", "attention", "seq_len", "batches"), [
    ("full", "fp32", "sdpa", 16, (2, 3)), ("full", "bf16", "eager", 16, (2, 3)), ("full", "fp32", "eager", 24, (1, 3)),
    ("lora", "bf16", "sdpa", 16, (2, 3)), ("lora", "fp32", "sdpa", 24, (1, 3)), ("lora", "bf16", "eager", 16, (2, 3)),
    ("lora", "fp32", "eager", 24, (1, 3)), ("dora", "fp32", "sdpa", 16, (2, 3)), ("dora", "bf16", "eager", 24, (1, 3))])
def test_a_blocks_activations_are_what_autograd_saves(method, precision, attention, seq_len, batches):
    """One block's bytes per sequence (the block's input requires grad: the second of two), measured against
    autograd's saved tensors at two sequence lengths and batch sizes: the routers' top-k indices, softmax and sorting
    and row indices; the routed copies' products (their inputs where a weight trains: full fine-tuning, or the
    experts' ParamWrappers under LoRA); the MoA's index_add source; sdpa's Q, K, V (repeated k times), output and
    logsumexp over k·num_key_value_heads heads, or eager's products and fp32 softmax (which grow with the sequence);
    SwiGLU's gate_up output and silu; each mixture's product by the gates and its index_add's source. DoRA adapts
    kv_proj alone, so the queries keep no grad of their own. It had no activations at all (refused)."""
    block = _block(method, precision, attention, seq_len=seq_len, batches=batches)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
def test_a_block_read_with_one_expert_a_token_is_wrong():
    """Negative control: the same block modelled as routing each token to one expert (Q and the attention over
    num_key_value_heads heads, one routed copy a token) misses what autograd saves."""
    block = _block("lora", "bf16", "sdpa", misread=lambda shape: dataclasses.replace(
        shape, experts_per_token=1, heads=shape.heads // shape.experts_per_token, q_dim=shape.kv_dim))
    assert block["modelled"] != block["measured"], block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("method", "precision"), [("lora", "bf16"), ("lora", "fp32"), ("dora", "fp32")])
def test_the_first_block_keeps_only_what_follows_its_adapters(method, precision):
    """The first block's input requires no grad (the embedding is frozen): it keeps only what follows its adapted
    modules (the query experts' ParamWrapper under LoRA, kv_proj's DoRA: no router indices, no routed copies of its
    input). Per sequence (batch 3 less batch 2) of a 1-block model, less the same model under
    enable_input_require_grads (its block's input requiring grad, as the block test above checks it), so that the
    head and the loss cancel; measured against autograd and modelled (input_require_grads)."""
    import torch

    from tests.memory.test_memory import _loss, saved_bytes

    measured, modelled = {}, {}
    for hooked in (False, True):
        model = _model(num_hidden_layers=1)
        config = model.config.to_dict()
        model = _train_peft(model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[precision]), method).train()
        if hooked:
            model.enable_input_require_grads()
        saved = [saved_bytes(model, lambda m: _loss(m, batch, 16)) for batch in (2, 3)]
        measured[hooked] = saved[1] - saved[0]
        estimates = [estimate_memory(config, method=method, rank_plan_or_rank=4, batch=batch, seq_len=16,
                                     precision=precision, input_require_grads=hooked).activations for batch in (2, 3)]
        modelled[hooked] = estimates[1] - estimates[0]
    assert modelled[True] - modelled[False] == measured[True] - measured[False] > 0, (modelled, measured)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_weights_peft_merges_are_kept_per_layer(precision):
    """PEFT's ParamWrapper merges W + s·B·A into each expert weight in every forward; the products keep that merged
    weight for their input's gradient (and at bf16 the factors cast for the merge): one layer's bytes at batch 2,
    from models of 1 and 2 layers, whatever the tokens plus the block's per-token bytes."""
    import torch

    from tests.memory.test_memory import _loss, saved_bytes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    measured, modelled = [], []
    for layers in (1, 2):
        model = _model(num_hidden_layers=layers)
        config = model.config.to_dict()
        model = _train_peft(model.to(dtype), "lora").train()
        measured.append(saved_bytes(model, lambda m: _loss(m, 2, 16)))
        modelled.append(estimate_memory(config, method="lora", rank_plan_or_rank=4, batch=2, seq_len=16,
                                        precision=precision).activations)
    assert modelled[1] - modelled[0] == measured[1] - measured[0]


def test_activations_are_estimated_without_a_note_of_refusal():
    """The activations and the training total are given, eager alike, with no note leaving them out."""
    for attention in ("sdpa", "eager"):
        est = estimate_memory(_config().to_dict(), method="lora", rank_plan_or_rank=4, attention=attention)
        assert est.activations > 0 and est.training_total > est.weights > 0 and est.kv_cache > 0
        assert not any("activations not estimated" in note for note in est.notes)


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
