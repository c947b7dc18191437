"""DoRA's per-step tensors on Linear layers: PEFT's DoraLinearLayer scales each output feature by m / ‖W + s·ΔW‖
once a step, and autograd keeps the norm and m / norm (fp32, d_out each) for every adapted Linear, and m / norm − 1
where the module's input requires grad (bytes per step, whatever the tokens: 10·d_out a module on average across a
2-layer model, which the per-token model and its tests, differences over batches, did not see). Checked as DoRA less
LoRA on the same modules at one batch (the blocks' own tensors cancel) against what autograd saves
(tests/memory/test_memory.py's saved_bytes), on tiny Llama (sequential), Phi (parallel), GPT-2 (Conv1D) and
DeepSeek-V3 (latent attention) models built from config."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory
from tests.memory.test_memory import _loss, saved_bytes

_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False),
    "phi": dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0,
                bos_token_id=0, eos_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0),
}
_MODULES = {"llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                      "up": "up_proj", "down": "down_proj"},
            "phi": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense", "up": "fc1", "down": "fc2"},
            "gpt2": {"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"}}


def _saved(family: str, method: str, precision: str, roles, batch: int) -> int:
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**_CONFIGS[family]))
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    model.config._attn_implementation = "sdpa"
    targets = [_MODULES[family][role] for role in roles]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, use_dora=method == "dora",
                                             fan_in_fan_out=family == "gpt2")).train()
    return saved_bytes(model, lambda m: _loss(m, batch, 16))


def _modelled(family: str, method: str, precision: str, roles, batch: int) -> int:
    return estimate_memory(_CONFIGS[family], method=method, rank_plan_or_rank=4, batch=batch, seq_len=16,
                           precision=precision, roles=roles, gradient_checkpointing=False).activations


def _dora_less_lora(kind, family: str, precision: str, roles, batch: int) -> int:
    return kind(family, "dora", precision, roles, batch) - kind(family, "lora", precision, roles, batch)


_CASES = [("llama", "fp32", ("q",)), ("llama", "bf16", ("q",)), ("llama", "fp32", ("o",)),
          ("llama", "bf16", ("down",)), ("llama", "fp32", ("up", "down")), ("llama", "bf16", ("v", "o")),
          ("llama", "fp32", ("gate",)), ("llama", "bf16", ("q", "k", "v", "o", "gate", "up", "down")),
          ("phi", "fp32", ("down",)), ("phi", "fp32", ("q", "up")), ("phi", "fp32", ("o", "down")),
          ("phi", "bf16", ("q", "k", "v", "o", "up", "down")),
          ("gpt2", "fp32", ("qkv",)), ("gpt2", "fp32", ("o", "up")), ("gpt2", "fp32", ("qkv", "o", "up", "down"))]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("family", "precision", "roles"), _CASES)
def test_dora_less_lora_is_what_autograd_saves(family, precision, roles):
    """At batch 1 and 2: DoRA less LoRA on the same modules, measured and modelled, agree to the byte; the per-step
    part is the same at both batches (the per-token part, (p + 4)·d_out, grows by a sequence)."""
    for batch in (1, 2):
        measured = _dora_less_lora(_saved, family, precision, roles, batch)
        assert _dora_less_lora(_modelled, family, precision, roles, batch) == measured > 0, batch


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("family", "roles"), [("llama", ("q",)), ("llama", ("up", "down")), ("phi", ("q", "up")),
                                               ("gpt2", ("qkv", "o", "up", "down"))])
def test_dora_without_its_per_step_tensors_or_with_them_everywhere_is_wrong(family, roles, monkeypatch):
    """Negative controls: without the per-step tensors (the model before), or with m / norm − 1 counted for every
    module (as if every base output required grad, the first adapted layer's q too), the model misses autograd."""
    import spectra.memory.activations as activations

    measured = _dora_less_lora(_saved, family, "fp32", roles, 1)
    real = activations._dora_step_bytes
    for wrong in (lambda modules, grad, parallel=False: 0,
                  lambda modules, grad, parallel=False: real(modules, True, parallel)):
        monkeypatch.setattr(activations, "_dora_step_bytes", wrong)
        assert _dora_less_lora(_modelled, family, "fp32", roles, 1) != measured


def test_the_per_step_tensors_are_rounding_on_a_7b_model():
    """The scale of it: on Llama-2-7B at rank 16 on every linear, 2048 tokens, the per-step tensors are 12 bytes an
    output feature (8 on layer 0's q, k, v, whose input requires no grad): 10.8 MB, under 0.1 % of DoRA's
    activations."""
    from tests.memory.test_memory import LLAMA2_7B

    h, i, layers = 4096, 11008, 32
    d_out = 4 * h + 2 * i + h
    one = estimate_memory(LLAMA2_7B, method="dora", rank_plan_or_rank=16, batch=1, gradient_checkpointing=False)
    two = estimate_memory(LLAMA2_7B, method="dora", rank_plan_or_rank=16, batch=2, gradient_checkpointing=False)
    per_step = 2 * one.activations - two.activations  # the part that does not grow with the batch
    lora = [estimate_memory(LLAMA2_7B, method="lora", rank_plan_or_rank=16, batch=b, gradient_checkpointing=False)
            for b in (1, 2)]
    assert per_step - (2 * lora[0].activations - lora[1].activations) == layers * 12 * d_out - 4 * 3 * h
    assert layers * 12 * d_out < 0.001 * one.activations


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("roles", [("q",), ("k",), ("o",), None])
def test_dora_less_lora_on_deepseeks_latent_attention(roles):
    """DeepSeek-V3's latent attention (q_a → q_b, kv_a → kv_b: q_b's input requires grad only where q_a is adapted),
    with LoRA as spectra train builds it and its routers in fp32 as from_pretrained keeps them, at bf16 and batch 1:
    DoRA less LoRA, measured and modelled, agree."""
    import torch
    from peft import get_peft_model

    from tests.memory.test_memory import train_lora_config
    from tests.memory.test_memory_moe_own_experts import _model

    kept = {}
    for method in ("lora", "dora"):
        model = _model("deepseek_v3")
        config = model.config
        model = model.to(torch.bfloat16)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.float()
        model = get_peft_model(model, train_lora_config(model, method, roles)).train()
        kept[method] = (saved_bytes(model, lambda m: _loss(m, 1, 16)),
                        estimate_memory(config, method=method, rank_plan_or_rank=4, batch=1, seq_len=16,
                                        precision="bf16", roles=roles).activations)
    assert kept["dora"][1] - kept["lora"][1] == kept["dora"][0] - kept["lora"][0] > 0
