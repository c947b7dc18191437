"""Llama-like families that `spectra memory` refused by their parameter count (transformers' base model holds another
number than Llama's count of the config): Arcee (AFM: an MLP of up_proj → ReLU² → down_proj, no gate), Seed-OSS
(q/k/v biased by attention_bias, o_proj by attention_out_bias), Hunyuan dense (an RMSNorm on each head's Q and K
after the rotation) and EXAONE 4 (per-head Q/K norms, each sublayer's output normalised instead of its input, sliding
layers by layer_types, no rotation in its full-attention layers), Cohere and Cohere 2 (Command R: a parallel block
on one CohereLayerNorm, a weight without bias computed by elementwise fp32 ops; Cohere 2 slides by layer_types),
Apertus (up_proj → xIELU → down_proj, xIELU's two learned scalars a layer, per-head Q/K norms; xIELU as transformers'
Python fallback runs it, without the xielu CUDA wheel). Checked against the models transformers builds from
tiny configs: their parameters, PEFT's trainable count, gradients and AdamW states, bitsandbytes' 4-bit load, and
what autograd saves for backward (one block's bytes per sequence: the double difference of models of 1 and 2 blocks
at batch 2 and 3, tests/memory/test_memory.py's measurement). RMSNorms: bf16 and fp32 agree exactly on the CPU."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import model_shape
from tests.memory.test_memory import (_PEFT_PATTERN_WARNING, block_saved, check_cli_memory, check_kv_cache,
                                      check_qlora_storage, check_refused_and_miscounted,
                                      check_trainable_gradients_and_states, lora_on_roles, per_sequence_saved)

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
# Seed-OSS's defaults drop out 10 % (the masks left out, as every family's, with a note: test below); its blocks
# are checked without dropout
_OWN = {"seed_oss": dict(attention_dropout=0.0, residual_dropout=0.0)}
_FAMILIES = ["arcee", "seed_oss", "hunyuan_v1_dense", "exaone4", "cohere", "cohere2", "apertus"]
_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}


def _config(family: str, **overrides):
    import transformers as tf

    return tf.AutoConfig.for_model(family, **(_SMALL | _OWN.get(family, {}) | overrides))


def _model(family: str, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(_config(family, **overrides))


def _peft(model, method: str, roles=None, layers=None):
    return lora_on_roles(model, method, _MODULES, roles, layers)


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True)])
@pytest.mark.parametrize("family", _FAMILIES)
def test_parameters_are_what_transformers_builds(family, overrides):
    """Every parameter of the causal LM (tied head once) and the base model's count, which model_shape compares.
    Negative control: the same config read as Llama is off (what had refused it)."""
    import transformers as tf

    model = _model(family, **overrides)
    config = model.config.to_dict()
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    base = tf.AutoModel.from_config(model.config)
    assert shape.params - shape.head_params == sum(p.numel() for p in base.parameters())
    try:  # every family's config is checked against the model transformers builds from it: LlamaModel's count
        as_llama = model_shape(config | {"model_type": "llama"}).params
    except ConfigError as refused:  # (Apertus' xIELU scalars, which LlamaModel builds too) refuses it
        assert "LlamaModel built from this config holds" in str(refused)
        as_llama = None
    assert as_llama != shape.params


@pytest.mark.parametrize("overrides", [dict(attention_bias=False, attention_out_bias=True, mlp_bias=True),
                                       dict(attention_bias=True, attention_out_bias=False)])
def test_seed_oss_biases(overrides):
    """Seed-OSS biases q/k/v by attention_bias and o_proj by attention_out_bias alone; mlp_bias its MLP."""
    model = _model("seed_oss", **overrides)
    assert model_shape(model.config.to_dict()).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("family", _FAMILIES)
def test_trainable_parameters_gradients_and_states(family, method):
    """The trainable count is PEFT's on all-linear (or the whole model), the gradients and AdamW states (fp32) the
    bytes one backward and one step leave."""
    check_trainable_gradients_and_states(_model(family), method, _peft)


def _block(family: str, method: str, precision: str, attention: str, roles=None, modelled: bool = True,
           **overrides) -> dict[str, int]:
    """One block's saved bytes per sequence of 16 tokens, measured and modelled (unless not ``modelled``: a config
    the estimate refuses): :func:`tests.memory.test_memory.block_saved`."""
    return block_saved(lambda layers: _model(family, num_hidden_layers=layers, **overrides), _peft, method,
                       precision, attention, roles, estimated=modelled)


_SLIDING = dict(sliding_window=8)  # EXAONE 4: its first three of every four layers slide (by 8 under 16 tokens)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "method", "precision", "attention", "overrides"), [
    (family, method, precision, attention, {}) for family in _FAMILIES
    for method, precision, attention in (("full", "bf16", "sdpa"), ("lora", "bf16", "sdpa"),
                                         ("full", "fp32", "eager"), ("lora", "fp32", "sdpa"),
                                         ("dora", "bf16", "sdpa"))] + [
    ("exaone4", "full", "bf16", "sdpa", _SLIDING), ("exaone4", "lora", "bf16", "sdpa", _SLIDING),
    ("exaone4", "lora", "fp32", "eager", _SLIDING), ("arcee", "lora", "bf16", "eager", dict(mlp_bias=True)),
    ("seed_oss", "full", "fp32", "sdpa", dict(attention_out_bias=True)),
    # Cohere 2: its sliding layers (the first three of four, by 8 under 16 tokens), and full layers without rotation
    ("cohere2", "full", "bf16", "sdpa", _SLIDING), ("cohere2", "lora", "fp32", "sdpa", _SLIDING),
    ("cohere2", "lora", "bf16", "sdpa", dict(sliding_window=8, sliding_window_pattern=1)),
    ("cohere", "lora", "bf16", "sdpa", dict(attention_bias=True)),
    ("cohere", "full", "fp32", "sdpa", dict(tie_word_embeddings=False))])
def test_a_blocks_activations_are_what_autograd_saves(family, method, precision, attention, overrides):
    """Arcee's ReLU² keeps one tensor (relu's output, which the square reads); Hunyuan's Q/K norms after the
    rotation keep their fp32 input and a 1/rms per head, as Qwen3's before it; EXAONE 4 normalises Q and K per head
    and each sublayer's output (OLMo 2's placement), and its sliding layers under a window the sequence reaches keep
    the mask and K, V repeated."""
    block = _block(family, method, precision, attention, **overrides)
    assert block["modelled"] == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("family", ["hunyuan_v1_dense", "exaone4"])
def test_qk_norms_left_out_is_wrong(family):
    """Negative control: the same block modelled without its Q/K norms (as Llama's) misses what autograd saves."""
    import dataclasses

    import spectra.memory.estimate as estimate_module

    real = estimate_module.model_shape
    measured = _block(family, "lora", "bf16", "sdpa")["measured"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate_module, "model_shape",
                      lambda config, **kw: dataclasses.replace(real(config, **kw), qk_norm=False))
        assert _block(family, "lora", "bf16", "sdpa")["modelled"] != measured


def _per_sequence(family: str, roles, layers) -> dict[str, int]:
    return per_sequence_saved(_model(family, num_hidden_layers=3), _peft, "bf16", roles, layers)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "roles", "layers"), [
    ("arcee", ("down",), [1]), ("arcee", ("q", "up"), [1, 2]), ("hunyuan_v1_dense", ("k",), [1]),
    ("exaone4", ("o",), [2]), ("seed_oss", ("v", "gate"), [1]), ("cohere", ("o",), [1]),
    ("cohere", ("up", "k"), [1, 2]), ("apertus", ("down",), [1]), ("apertus", ("up",), [1, 2])])
def test_blocks_before_the_first_adapted_module_keep_nothing(family, roles, layers):
    """The first adapted layer keeps what follows its first adapted module (per sequence, less all-linear LoRA on
    every layer's, so the head's tensors cancel)."""
    part = _per_sequence(family, roles, layers)
    whole = _per_sequence(family, None, None)
    assert whole["modelled"] - part["modelled"] == whole["measured"] - part["measured"] > 0, (part, whole)


@pytest.mark.parametrize("family", _FAMILIES)
def test_qlora_storage_is_what_bitsandbytes_holds(family, tmp_path):
    """bitsandbytes quantises the block linears and keeps the rest in bf16: the estimate's weights and constants
    are the loaded model's bytes."""
    check_qlora_storage(_model(family, hidden_size=64, intermediate_size=128, head_dim=16), tmp_path)


@pytest.mark.parametrize("family", _FAMILIES)
def test_cli_memory_estimates_a_saved_model(family, tmp_path):
    """The user's path: `spectra memory <folder> --rank 8` on a model saved by save_pretrained (refused before)."""
    check_cli_memory(_model(family), tmp_path)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_seed_oss_with_its_default_dropout_is_estimated_noting_the_masks(precision):
    """SeedOssConfig drops out 10 % by default (attention_dropout, residual_dropout 0.1), so a config.json that leaves
    the keys out trains with dropout: estimated as every family with dropout is (the masks left out: GPT-2's,
    BERT's), with a note naming each key and its value. It had been refused. The estimate is the one without
    dropout; against autograd, with residual dropout a block keeps beyond it exactly the two masks a layer (on the
    CPU a tensor of the activations' dtype: p·hidden_size a token each; on CUDA a byte a value, as the note says).
    Negative control: with both keys at 0 there is no note."""
    from spectra.memory import estimate_memory

    left_out = _SMALL | {"model_type": "seed_oss"}  # a config.json without the dropout keys
    no_dropout = left_out | dict(attention_dropout=0.0, residual_dropout=0.0)
    kwargs = dict(method="lora", rank_plan_or_rank=4, batch=2, seq_len=16, precision=precision)
    est, est_without = estimate_memory(left_out, **kwargs), estimate_memory(no_dropout, **kwargs)
    assert est.activations == est_without.activations > 0 and est.training_total == est_without.training_total
    assert [note for note in est.notes if note.startswith("dropout left out: attention_dropout 0.1, "
                                                          "residual_dropout 0.1 (the seed_oss config's")]
    assert not any("dropout" in note for note in est_without.notes)
    block = _block("seed_oss", "lora", precision, "sdpa", residual_dropout=0.1)
    p, h, tokens = {"bf16": 2, "fp32": 4}[precision], _SMALL["hidden_size"], 16
    assert block["measured"] - block["modelled"] == 2 * p * h * tokens, block


def test_exaone4s_sliding_layers_are_read():
    """EXAONE 4 slides the layers its layer_types names (by default three of every four, by sliding_window)."""
    assert model_shape(_config("exaone4", num_hidden_layers=4, **_SLIDING).to_dict()).windows == (8, 8, 8, 0)


@_PEFT_PATTERN_WARNING
def test_cohere_read_as_sequential_or_with_a_layernorm_is_wrong():
    """Negative controls: Cohere's block modelled as a sequential one, or with a plain LayerNorm (input and two
    statistics) for its CohereLayerNorm, misses what autograd saves."""
    import dataclasses

    import spectra.memory.estimate as estimate_module

    real = estimate_module.model_shape
    measured = _block("cohere", "full", "bf16", "sdpa")["measured"]
    for change in (dict(parallel=False, norms=2), dict(norm="layer")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(estimate_module, "model_shape",
                          lambda config, change=change, **kw: dataclasses.replace(real(config, **kw), **change))
            assert _block("cohere", "full", "bf16", "sdpa")["modelled"] != measured, change


def test_cohere_with_qk_norm_is_refused():
    """Command R+'s use_qk_norm (LayerNorms on each head's Q and K) is refused naming it; its count would be off by
    the norms' weights (the negative control)."""
    check_refused_and_miscounted(_config("cohere", use_qk_norm=True), "use_qk_norm")


@_PEFT_PATTERN_WARNING
def test_apertus_xielu_read_as_a_plain_activation_is_wrong():
    """Negative control: Apertus' block modelled without xIELU's bool mask and alpha_n's saved factor misses what
    autograd saves, under LoRA and full fine-tuning (which trains the two scalars)."""
    import dataclasses

    import spectra.memory.estimate as estimate_module

    real = estimate_module.model_shape
    for method in ("lora", "full"):
        measured = _block("apertus", method, "bf16", "sdpa")["measured"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(estimate_module, "model_shape",
                          lambda config, **kw: dataclasses.replace(real(config, **kw), xielu=False))
            assert _block("apertus", method, "bf16", "sdpa")["modelled"] != measured, method


@pytest.mark.parametrize(("family", "overrides"), [(family, {}) for family in _FAMILIES]
                         + [("exaone4", _SLIDING), ("cohere2", _SLIDING)])
def test_the_kv_cache_is_what_transformers_caches(family, overrides):
    """The inference KV cache is the bytes of transformers' DynamicCache after a forward (sliding layers: the last
    window − 1 tokens)."""
    check_kv_cache(_model(family, **overrides))
