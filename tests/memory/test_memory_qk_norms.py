"""Qwen3 (an RMSNorm on each head's Q and K), OLMo 2 / OLMo 3 (RMSNorms on Q and K across all heads, and each
sublayer's output normalised before the residual instead of its input) and OLMo (LayerNorms without weights on the
fp32 input; clip_qkv clamps Q, K and V in place). All four were refused ("holds 17600
parameters, spectra's memory model counts 17568"). Checked against the models transformers builds from tiny configs:
their parameters, PEFT's trainable count, bitsandbytes' 4-bit load, and what autograd saves for backward (one block's
bytes by tests/memory/test_memory.py's measurement: the double difference of models of 1 and 2 blocks at batch 2
and 3)."""

from __future__ import annotations

import pytest

from spectra.memory import model_shape
from tests.memory.test_memory import (_PEFT_PATTERN_WARNING, block_saved, check_cli_memory, check_qlora_storage,
                                      check_trainable_gradients_and_states, lora_on_roles, per_sequence_saved)

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_CAUSAL_LM = {"qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM",
              "olmo": "OlmoForCausalLM"}
# what target_modules names a role (all-linear: every one)
_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def _config(family: str, **overrides):
    import transformers as tf

    return tf.AutoConfig.for_model(family, **(_SMALL | overrides))


def _model(family: str, **overrides):
    import torch
    import transformers as tf

    if "layer_types" in overrides:  # the first layers' types
        overrides["layer_types"] = overrides["layer_types"][:overrides.get("num_hidden_layers", 2)]
    torch.manual_seed(0)
    return getattr(tf, _CAUSAL_LM[family])(_config(family, **overrides))


def _peft(model, method: str, roles=None, layers=None):
    return lora_on_roles(model, method, _MODULES, roles, layers)


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "olmo3"])
def test_parameters_are_what_transformers_builds(family):
    """Every parameter of the causal LM (q_norm, k_norm: head_dim each for Qwen3, q_dim and kv_dim for OLMo 2), the
    base model's count the guard compares, and tied embeddings counted once. Negative control: the same config read
    as Llama is off by the Q/K norms."""
    from spectra.memory.shape import _refuse_other_blocks

    for tied in (False, True):
        model = _model(family, tie_word_embeddings=tied)
        config = model.config.to_dict()
        shape = model_shape(config)
        assert shape.params == sum(p.numel() for p in model.parameters())
        _refuse_other_blocks(config, family, shape)  # the base model's own count agrees too
        norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight")))
        as_llama = model_shape(config | {"model_type": "llama"})
        assert norms > 0 and shape.params - as_llama.params == norms


def test_olmo_counts_norms_without_weights():
    """OLMo (v1): its LayerNorms have no weight nor bias (OlmoLayerNorm), so the model holds only embeddings and
    linears; read as Llama it would count 2·h per layer and h more. Its clip_qkv changes no parameter."""
    from spectra.memory.shape import _refuse_other_blocks

    for overrides in ({}, _CLIP, dict(tie_word_embeddings=True)):
        model = _model("olmo", **overrides)
        config = model.config.to_dict()
        shape = model_shape(config)
        assert shape.params == sum(p.numel() for p in model.parameters())
        _refuse_other_blocks(config, "olmo", shape)
        assert model_shape(config | {"model_type": "llama"}).params - shape.params == (2 * 2 + 1) * 32
        assert shape.clip_qkv == ("clip_qkv" in overrides)


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("family", ["qwen3", "olmo2", "olmo"])
def test_trainable_parameters_gradients_and_states_count_the_norms(family, method):
    """Full fine-tuning trains the Q/K norms' weights: the estimate's gradients and AdamW states (fp32) are the bytes
    of the gradients one backward leaves and of the moments torch's AdamW keeps after one step. LoRA and DoRA on
    all-linear train PEFT's count (norms frozen)."""
    model = check_trainable_gradients_and_states(_model(family), method, _peft)
    if method == "full" and family != "olmo":
        assert any(n.endswith("q_norm.weight") for n, p in model.named_parameters() if p.grad is not None)


def _block(family: str, method: str, precision: str, attention: str, roles=None, **overrides) -> dict[str, int]:
    """One block's saved bytes per sequence, measured and modelled: :func:`tests.memory.test_memory.block_saved`."""
    return block_saved(lambda layers: _model(family, num_hidden_layers=layers, **overrides), _peft, method,
                       precision, attention, roles)


_SLIDING = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)  # Qwen3: every layer slides by 8
_OLMO3_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "sliding_attention"])
_CLIP = dict(clip_qkv=8.0)  # OLMo-7B-0424's


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "method", "precision", "attention", "roles", "overrides"), [
    ("qwen3", "full", "bf16", "sdpa", None, {}), ("qwen3", "full", "fp32", "eager", None, {}),
    ("qwen3", "lora", "bf16", "sdpa", None, {}), ("qwen3", "lora", "fp32", "sdpa", None, {}),
    ("qwen3", "lora", "bf16", "eager", None, {}), ("qwen3", "dora", "fp32", "sdpa", None, {}),
    ("qwen3", "lora", "bf16", "sdpa", ("q", "v"), {}), ("qwen3", "lora", "bf16", "sdpa", ("k",), {}),
    ("qwen3", "lora", "bf16", "sdpa", None, _SLIDING), ("qwen3", "full", "bf16", "sdpa", None, _SLIDING),
    ("olmo2", "full", "bf16", "sdpa", None, {}), ("olmo2", "full", "fp32", "sdpa", None, {}),
    ("olmo2", "full", "bf16", "eager", None, {}), ("olmo2", "lora", "bf16", "sdpa", None, {}),
    ("olmo2", "lora", "fp32", "sdpa", None, {}), ("olmo2", "lora", "fp32", "eager", None, {}),
    ("olmo2", "dora", "bf16", "sdpa", None, {}), ("olmo2", "lora", "bf16", "sdpa", ("o", "down"), {}),
    ("olmo2", "lora", "bf16", "sdpa", ("q",), {}), ("olmo2", "lora", "bf16", "sdpa", ("up",), {}),
    ("olmo3", "lora", "bf16", "sdpa", None, _OLMO3_SLIDING), ("olmo3", "full", "bf16", "sdpa", None, _OLMO3_SLIDING),
    ("olmo3", "lora", "fp32", "sdpa", None, {}),
    # OLMo (v1): LayerNorms without weights on the fp32 input; clip_qkv clamps Q, K and V in place
    ("olmo", "full", "bf16", "sdpa", None, {}), ("olmo", "full", "fp32", "eager", None, {}),
    ("olmo", "lora", "bf16", "sdpa", None, {}), ("olmo", "lora", "fp32", "sdpa", None, {}),
    ("olmo", "dora", "bf16", "sdpa", None, {}), ("olmo", "lora", "bf16", "sdpa", ("o", "down"), {}),
    ("olmo", "lora", "bf16", "sdpa", None, _CLIP), ("olmo", "full", "bf16", "sdpa", None, _CLIP),
    ("olmo", "lora", "fp32", "sdpa", ("v",), _CLIP), ("olmo", "lora", "bf16", "eager", None, _CLIP),
    ("olmo", "full", "fp32", "eager", None, _CLIP)])
def test_a_blocks_activations_are_what_autograd_saves(family, method, precision, attention, roles, overrides):
    """Qwen3's q_norm and k_norm keep their fp32 input and a 1/rms per head; OLMo 2's one 1/rms a token over q_dim and
    kv_dim, its RMSNorms apply their weight to the fp32 normalised input (kept for the weight's gradient under full
    fine-tuning), and its block normalises the attention's and the MLP's outputs, not their inputs. Sliding layers
    (Qwen3's use_sliding_window, OLMo 3's layer_types) under a window the sequence reaches keep the mask and K, V
    repeated. OLMo's weightless LayerNorms keep their fp32 input, mean and 1/std; its clip_qkv's in-place clamps a
    copy of each of Q, K and V (unmodelled: 128 bytes a token short at bf16)."""
    block = _block(family, method, precision, attention, roles, **overrides)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
def test_olmo2_read_with_llamas_norm_placement_is_wrong():
    """Negative control: the same OLMo 2 block modelled with input norms (Llama's placement) and per-head Q/K norms
    (Qwen3's) misses what autograd saves."""
    import dataclasses

    import spectra.memory.estimate as estimate_module

    measured = _block("olmo2", "lora", "bf16", "sdpa")["measured"]
    real = estimate_module.model_shape

    def misread(config, **kwargs):
        return dataclasses.replace(real(config, **kwargs), output_norms_only=False, qk_norm_across_heads=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate_module, "model_shape", misread)
        assert _block("olmo2", "lora", "bf16", "sdpa")["modelled"] != measured


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "olmo"])
def test_qlora_storage_is_what_bitsandbytes_holds(family, tmp_path):
    """bitsandbytes quantises the block linears and keeps the Q/K norms (and every other norm) in bf16: the
    estimate's weights and constants are the loaded model's bytes."""
    check_qlora_storage(_model(family, hidden_size=64, intermediate_size=128, head_dim=16), tmp_path)


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "olmo"])
def test_cli_memory_estimates_a_saved_model(family, tmp_path):
    """The user's path: `spectra memory <folder> --rank 8` on a model saved by save_pretrained (refused before)."""
    check_cli_memory(_model(family), tmp_path)


def test_sliding_layers_are_read_as_the_family_builds_them():
    """Qwen3 slides only with use_sliding_window, from layer max_window_layers on (Qwen3Config's layer_types); OLMo 3
    slides its sliding_attention layers (by default three of every four). The block tests above run them under a
    window the sequence reaches; this checks the estimate reads them at all."""
    assert model_shape(_config("qwen3", **_SLIDING).to_dict()).windows == (8, 8)
    assert model_shape(_config("qwen3", sliding_window=8).to_dict()).windows == ()  # use_sliding_window off
    assert model_shape(_config("qwen3", **(_SLIDING | dict(max_window_layers=1))).to_dict()).windows == (0, 8)
    assert model_shape(_config("olmo3", sliding_window=8, num_hidden_layers=4).to_dict()).windows == (8, 8, 8, 0)


def _per_sequence(family: str, precision: str, roles, layers, **overrides) -> dict[str, int]:
    """Saved bytes of a 3-layer LoRA model at batch 3 less batch 2 (one sequence's), measured and modelled."""
    return per_sequence_saved(_model(family, num_hidden_layers=3, **overrides), _peft, precision, roles, layers)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "precision", "roles", "layers", "overrides"), [
    ("qwen3", "bf16", ("k",), [1], {}), ("qwen3", "fp32", ("q", "down"), [1, 2], {}),
    ("qwen3", "bf16", tuple(_MODULES), [2], {}), ("olmo2", "bf16", ("o",), [1], {}),
    ("olmo2", "fp32", ("up",), [1, 2], {}), ("olmo2", "bf16", ("q",), [2], {}),
    ("olmo2", "bf16", tuple(_MODULES), [1], {}),
    ("olmo", "bf16", ("v",), [1], _CLIP), ("olmo", "fp32", ("o", "gate"), [2], {})])
def test_blocks_before_the_first_adapted_module_keep_nothing(family, precision, roles, layers, overrides):
    """The first adapted layer keeps only what follows its first adapted module: with OLMo 2's norms after each
    sublayer, an adapted o_proj makes the attention's output norm keep its input and the MLP after it everything;
    an adapted k_proj makes only k_norm (not q_norm) keep its tensors. Per sequence, less all-linear LoRA on every
    layer's (the head's tensors cancel)."""
    part = _per_sequence(family, precision, roles, layers, **overrides)
    whole = _per_sequence(family, precision, None, None, **overrides)
    assert whole["modelled"] - part["modelled"] == whole["measured"] - part["measured"] > 0, (part, whole)
