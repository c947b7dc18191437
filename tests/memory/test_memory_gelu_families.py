"""Families with LayerNorms, GELU MLPs (no gate) and, most of them, parallel attention and MLP: GPT-NeoX (Pythia;
use_parallel_residual, one fused query_key_value of each head's Q, K and V side by side, partial rotary
embeddings concatenated with the rest of the head), Phi (phi-1/phi-2: one LayerNorm feeding both branches, biased
q/k/v/dense, a biased head), StarCoder2 (Llama's attention with biases, LayerNorms, a GELU MLP, sliding windows), Falcon
(parallel_attn; the new decoder architecture's K/V heads, broadcast to every query head before transformers
5.25, ln_attn/ln_mlp; multi-query; FalconLinear; an always materialised causal mask), StableLM (Llama's SwiGLU
with LayerNorms, partial rotary, use_parallel_residual). `spectra memory` refused the first four by model_type ("its blocks differ from Llama's,
GPT-2's and BERT's") and StableLM by its parameter count. Checked against the models transformers builds from tiny configs on the CPU: their parameters,
PEFT's trainable count, the gradients and AdamW states one step leaves, bitsandbytes' 4-bit load, and what autograd
saves for backward (one block's bytes per sequence: the double difference of models of 1 and 2 blocks at batch 2 and
3, tests/memory/test_memory.py's measurement).

At bf16 the CPU's LayerNorm keeps its two statistics in bf16, CUDA's (as modelled) in fp32: a bf16 block measured
here keeps 4 bytes a token less per LayerNorm that runs than modelled, which the bf16 cases check exactly; the
others run at fp32, where the two agree."""

from __future__ import annotations

import dataclasses

import pytest

from spectra.memory import estimate_memory, model_shape
from spectra.memory.shape import _falcon_views
from tests.memory.test_memory import (_PEFT_PATTERN_WARNING, block_saved, check_cli_memory, check_kv_cache,
                                      check_qlora_storage, check_refused_and_miscounted,
                                      check_trainable_gradients_and_states, layer_saved, lora_on_roles,
                                      per_sequence_saved)

_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)
# each family's tiny configs: its default layout, then the variants its configs take
_VARIANTS = {
    "gpt_neox": [{}, dict(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=True,
                          attention_bias=False), dict(hidden_act="gelu_new")],
    "phi": [{}, dict(num_key_value_heads=2, tie_word_embeddings=True, partial_rotary_factor=1.0, hidden_act="gelu")],
    "starcoder2": [dict(num_key_value_heads=2), dict(num_key_value_heads=2, use_bias=False, sliding_window=8,
                                                     tie_word_embeddings=False, hidden_act="gelu_new"),
                   dict(num_key_value_heads=1, sliding_window=8)],  # one K/V head under a mask
    # Falcon-40B's new decoder architecture (2 K/V heads, broadcast to 4 before transformers 5.25; ln_attn and
    # ln_mlp); Falcon-7B's multi-query attention (one LayerNorm); a sequential multi-head block with biases; the new
    # architecture with one LayerNorm (Falcon2-11B's layout), one K/V head (Falcon2-11B has 8), NewGELU, untied head
    "falcon": [dict(new_decoder_architecture=True, num_kv_heads=2), {},
               dict(multi_query=False, parallel_attn=False, bias=True),
               dict(new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1, activation="gelu_new",
                    tie_word_embeddings=False)],
}
_VARIANTS |= {
    # StableLM: Llama's SwiGLU with LayerNorms with biases and partial rotary (torch.cat); sequential (StableLM 3B's
    # default) and parallel on one LayerNorm (use_parallel_residual, StableLM 2's) with q/k/v biases, tied
    "stablelm": [dict(num_key_value_heads=2), dict(num_key_value_heads=2, use_parallel_residual=True,
                                                   use_qkv_bias=True, partial_rotary_factor=1.0,
                                                   tie_word_embeddings=True)],
}
_PARALLEL = ["gpt_neox", "phi", "falcon"]  # the families whose (default) blocks are parallel
_CASES = [(family, i) for family, variants in _VARIANTS.items() for i in range(len(variants))]
# target_modules of a role, as PEFT names the family's modules
_MODULES = {"gpt_neox": {"qkv": "query_key_value", "o": "dense", "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
            "phi": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense", "up": "fc1", "down": "fc2"},
            "starcoder2": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "c_fc", "down": "c_proj"},
            "falcon": {"qkv": "query_key_value", "o": "dense", "up": "dense_h_to_4h", "down": "dense_4h_to_h"},
            "stablelm": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                         "up": "up_proj", "down": "down_proj"}}


def _config(family: str, variant: int = 0, **overrides):
    import transformers as tf

    return tf.AutoConfig.for_model(family, **(_SMALL | _VARIANTS[family][variant] | overrides))


def _model(family: str, variant: int = 0, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(_config(family, variant, **overrides))


def _peft(model, method: str, roles=None, layers=None):
    return lora_on_roles(model, method, _MODULES[model.config.model_type], roles, layers)


@pytest.mark.parametrize(("family", "variant"), _CASES)
def test_parameters_are_what_transformers_builds(family, variant):
    """Every parameter of the causal LM (tied head once), and the base model's count, which model_shape compares
    (it builds the meta model for every family). Negative control: the same config read as Llama
    (its keys are Llama's) is off."""
    import transformers as tf

    from spectra.memory.shape import _refuse_other_blocks

    model = _model(family, variant)
    config = model.config.to_dict()
    shape = model_shape(config)
    assert shape.family == family
    assert shape.params == sum(p.numel() for p in model.parameters())
    base = tf.AutoModel.from_config(model.config)
    assert shape.params - shape.head_params == sum(p.numel() for p in base.parameters())
    _refuse_other_blocks(config, family, shape)
    assert model_shape(config | {"model_type": "llama"}).params != shape.params


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("family", list(_VARIANTS))
def test_trainable_parameters_gradients_and_states(family, method):
    """The estimate's trainable count is PEFT's on all-linear (or the whole model), and its gradients and AdamW
    states (fp32) the bytes one backward and one step leave."""
    check_trainable_gradients_and_states(_model(family), method, _peft)


def _block(family: str, variant: int, method: str, precision: str, attention: str, roles=None,
           use_cache: bool = True, misread=None) -> dict[str, int]:
    """One block's saved bytes per sequence of 16 tokens, measured and modelled (``misread``: a negative control),
    and its LayerNorms (``layer_norms``): :func:`tests.memory.test_memory.block_saved`."""
    return block_saved(lambda layers: _model(family, variant, num_hidden_layers=layers), _peft, method, precision,
                       attention, roles, use_cache=use_cache, misread=misread)


_BLOCK_CASES = [
    # GPT-NeoX: parallel (two LayerNorms on the block's input), sequential with full rotary, NewGELU
    ("gpt_neox", 0, "full", "fp32", "sdpa", True), ("gpt_neox", 0, "lora", "fp32", "sdpa", True),
    ("gpt_neox", 0, "full", "fp32", "eager", True), ("gpt_neox", 0, "lora", "fp32", "sdpa", False),
    ("gpt_neox", 0, "dora", "fp32", "sdpa", True), ("gpt_neox", 0, "lora", "bf16", "sdpa", True),
    ("gpt_neox", 0, "full", "bf16", "sdpa", True), ("gpt_neox", 0, "lora", "bf16", "eager", True),
    ("gpt_neox", 1, "full", "fp32", "sdpa", True), ("gpt_neox", 1, "lora", "fp32", "sdpa", True),
    ("gpt_neox", 1, "dora", "fp32", "eager", True), ("gpt_neox", 1, "full", "fp32", "sdpa", False),
    ("gpt_neox", 2, "full", "fp32", "sdpa", True), ("gpt_neox", 2, "lora", "fp32", "eager", True),
    # Phi: one LayerNorm whose output both branches read; GQA, tied head, full rotary, fused GELU
    ("phi", 0, "full", "fp32", "sdpa", True), ("phi", 0, "lora", "fp32", "sdpa", True),
    ("phi", 0, "full", "fp32", "eager", True), ("phi", 0, "lora", "fp32", "sdpa", False),
    ("phi", 0, "dora", "fp32", "sdpa", True), ("phi", 0, "lora", "fp32", "eager", True),
    ("phi", 0, "lora", "bf16", "sdpa", True), ("phi", 0, "full", "bf16", "sdpa", True),
    ("phi", 1, "full", "fp32", "sdpa", True), ("phi", 1, "lora", "fp32", "sdpa", True),
    ("phi", 1, "full", "fp32", "eager", True), ("phi", 1, "lora", "fp32", "eager", False),
    # StarCoder2: Llama's attention (GQA, biases), LayerNorms, a GELU MLP; every layer slides by sliding_window (8
    # under 16 tokens: sdpa keeps the mask and K, V repeated)
    ("starcoder2", 0, "full", "fp32", "sdpa", True), ("starcoder2", 0, "lora", "fp32", "sdpa", True),
    ("starcoder2", 0, "full", "fp32", "eager", True), ("starcoder2", 0, "dora", "fp32", "sdpa", True),
    ("starcoder2", 0, "lora", "bf16", "sdpa", True), ("starcoder2", 1, "full", "fp32", "sdpa", True),
    ("starcoder2", 1, "lora", "fp32", "sdpa", True), ("starcoder2", 1, "lora", "fp32", "eager", True),
    # one K/V head under the sliding mask: repeat_kv's stride-0 view keeps K and V at one head (not Q's size)
    ("starcoder2", 2, "full", "fp32", "sdpa", True), ("starcoder2", 2, "lora", "fp32", "sdpa", False),
    ("starcoder2", 2, "lora", "bf16", "sdpa", True),
    # Falcon: sdpa always gets its materialised mask and o reads its output. Before transformers 5.25: V a copy (new
    # architecture) or a view of the fused output; multi-query under sdpa runs its math kernel (fp32 Q, K and V
    # broadcast, probabilities). From 5.25: Q, K, V views of the fused output, K and V repeated to every head (one
    # K/V head, variants 1 and 3: a view that keeps V's, the whole fused output without the cache)
    ("falcon", 1, "full", "fp32", "sdpa", True), ("falcon", 1, "lora", "bf16", "sdpa", True),
    ("falcon", 1, "lora", "fp32", "sdpa", False), ("falcon", 1, "dora", "fp32", "sdpa", True),
    ("falcon", 1, "full", "bf16", "sdpa", True), ("falcon", 1, "dora", "bf16", "sdpa", False),
    ("falcon", 0, "full", "fp32", "sdpa", True), ("falcon", 0, "lora", "fp32", "sdpa", True),
    ("falcon", 0, "lora", "fp32", "sdpa", False), ("falcon", 0, "dora", "fp32", "sdpa", True),
    ("falcon", 0, "lora", "fp32", "eager", True), ("falcon", 0, "lora", "bf16", "sdpa", True),
    ("falcon", 0, "full", "bf16", "eager", True),
    ("falcon", 1, "full", "fp32", "eager", True), ("falcon", 1, "lora", "fp32", "eager", True),
    ("falcon", 1, "dora", "fp32", "eager", False), ("falcon", 1, "lora", "bf16", "eager", True),
    ("falcon", 2, "full", "fp32", "sdpa", True), ("falcon", 2, "lora", "fp32", "sdpa", True),
    ("falcon", 2, "lora", "fp32", "sdpa", False), ("falcon", 2, "dora", "fp32", "eager", True),
    ("falcon", 3, "full", "fp32", "sdpa", True), ("falcon", 3, "lora", "fp32", "sdpa", True),
    ("falcon", 3, "lora", "fp32", "eager", False),
    # StableLM: sequential, and parallel on one LayerNorm (gate/up read the attention's input)
    ("stablelm", 0, "full", "fp32", "sdpa", True), ("stablelm", 0, "lora", "fp32", "sdpa", True),
    ("stablelm", 0, "full", "fp32", "eager", True), ("stablelm", 0, "lora", "bf16", "sdpa", True),
    ("stablelm", 1, "full", "fp32", "sdpa", True), ("stablelm", 1, "lora", "fp32", "sdpa", True),
    ("stablelm", 1, "full", "fp32", "eager", True), ("stablelm", 1, "dora", "fp32", "sdpa", False),
    ("stablelm", 1, "lora", "bf16", "eager", True),
]


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "variant", "method", "precision", "attention", "use_cache"), _BLOCK_CASES)
def test_a_blocks_activations_are_what_autograd_saves(family, variant, method, precision, attention, use_cache):
    """A parallel block's two norms read one input (kept once, beside each norm's statistics) and its MLP's input
    requires grad only from the block's input; the fused query_key_value's V is a view that keeps the whole output
    (without the cache; with it the cache's copy of V), Q and K come out of a torch.cat, and so o's input is a copy
    of sdpa's output; a fused GELU keeps its input, NewGELU four tensors. bf16: the CPU's LayerNorm statistics, 4
    bytes a token per norm that runs, short of the model (CUDA's fp32 ones)."""
    block = _block(family, variant, method, precision, attention, use_cache=use_cache)
    cpu_statistics = 16 * 4 * block["layer_norms"] if precision == "bf16" else 0
    assert block["modelled"] - cpu_statistics == block["measured"] > 0, block


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize("family", _PARALLEL)
def test_a_parallel_block_read_as_sequential_is_wrong(family):
    """Negative control: the same parallel block modelled as a sequential one (its MLP reading the attention's
    output) misses what autograd saves, under LoRA on o alone (the MLP then keeps nothing) and full fine-tuning."""
    def misread(shape):
        return dataclasses.replace(shape, parallel=False)

    o_only = _block(family, 0, "lora", "fp32", "sdpa", roles=("o",))
    assert o_only["modelled"] == o_only["measured"] > 0
    assert _block(family, 0, "lora", "fp32", "sdpa", roles=("o",), misread=misread)["modelled"] != o_only["measured"]
    full = _block(family, 0, "full", "fp32", "sdpa", misread=misread)
    assert full["modelled"] != full["measured"]


def _per_sequence(family: str, roles, layers) -> dict[str, int]:
    """Saved bytes of a 3-layer fp32 LoRA model at batch 3 less batch 2 (one sequence's), measured and modelled."""
    return per_sequence_saved(_model(family, num_hidden_layers=3), _peft, "fp32", roles, layers)


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "roles", "layers"), [
    ("gpt_neox", ("o",), [1]), ("gpt_neox", ("up",), [1, 2]), ("gpt_neox", ("down",), [2]),
    ("gpt_neox", ("qkv", "down"), [1]), ("phi", ("o",), [1]), ("phi", ("up", "k"), [1, 2]),
    ("phi", ("down",), [2]), ("starcoder2", ("o",), [1]), ("starcoder2", ("up",), [1, 2]),
    ("falcon", ("o",), [1]), ("falcon", ("up", "qkv"), [1, 2]), ("stablelm", ("o",), [1]),
    ("stablelm", ("gate", "v"), [1, 2])])
def test_blocks_before_the_first_adapted_module_keep_nothing(family, roles, layers):
    """The first adapted layer keeps what follows its first adapted module: in a parallel block an adapted o or
    down makes the other branch keep nothing (the block's input requires no grad). Per sequence, less all-linear
    LoRA on every layer's (the head's tensors cancel)."""
    part = _per_sequence(family, roles, layers)
    whole = _per_sequence(family, None, None)
    assert whole["modelled"] - part["modelled"] == whole["measured"] - part["measured"] > 0, (part, whole)


@pytest.mark.parametrize("family", ["gpt_neox", "phi", "starcoder2", "stablelm"])
def test_qlora_storage_is_what_bitsandbytes_holds(family, tmp_path):
    """bitsandbytes quantises the block linears and keeps the embeddings, norms, biases and head in bf16: the
    estimate's weights and constants are the loaded model's bytes."""
    check_qlora_storage(_model(family, hidden_size=64, intermediate_size=128), tmp_path)


@pytest.mark.parametrize("family", list(_VARIANTS))
def test_cli_memory_estimates_a_saved_model(family, tmp_path):
    """The user's path: `spectra memory <folder> --rank 8` on a model saved by save_pretrained (refused before)."""
    check_cli_memory(_model(family), tmp_path)


def test_an_activation_the_model_does_not_describe_is_refused():
    """An MLP activation whose saved tensors are unchecked (gelu_fast) is refused naming it, not counted as GELU."""
    from spectra.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_act 'gelu_fast'"):
        model_shape(_config("gpt_neox", hidden_act="gelu_fast").to_dict())


def test_phi_with_qk_layernorm_is_refused():
    """Phi's qk_layernorm (LayerNorms on each head's Q and K: weights and saved tensors not described) is refused
    naming it; its count would be off by the norms' weights (the negative control)."""
    check_refused_and_miscounted(_config("phi", qk_layernorm=True), "qk_layernorm")


@_PEFT_PATTERN_WARNING
def test_starcoder2s_sliding_window_is_read():
    """StarCoder2 masks every layer by sliding_window when it is set (create_sliding_window_causal_mask). Negative
    control: a window beyond the sequence gets no mask, and both the estimate and autograd are lower."""
    assert model_shape(_config("starcoder2", 1).to_dict()).windows == (8, 8)
    assert model_shape(_config("starcoder2", 0).to_dict()).windows == ()
    masked = _block("starcoder2", 1, "lora", "fp32", "sdpa")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_VARIANTS, "starcoder2", [_VARIANTS["starcoder2"][1] | dict(sliding_window=17)])
        unmasked = _block("starcoder2", 0, "lora", "fp32", "sdpa")
    assert unmasked["modelled"] == unmasked["measured"] < masked["measured"] == masked["modelled"]


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("roles", "precision"), [(("o",), "fp32"), (("qkv",), "bf16"), (("up", "o"), "fp32"),
                                                  (("qkv",), "fp32")])
def test_falcon_multi_query_by_role(roles, precision):
    """Falcon-7B's block under sdpa with LoRA on some roles: o alone keeps no attention tensors (their inputs
    require no grad) but its input; qkv the kernel's (before transformers 5.25 the math kernel's, from it the fused
    kernel's of Q against one K/V head repeated as a view)."""
    block = _block("falcon", 1, "lora", precision, "sdpa", roles)
    cpu_statistics = 16 * 4 * block["layer_norms"] if precision == "bf16" else 0
    assert block["modelled"] - cpu_statistics == block["measured"] > 0, block


@pytest.mark.skipif(_falcon_views(), reason="transformers >= 5.25 repeats Falcon-7B's K/V head before sdpa, which "
                    "runs a fused kernel (test_falcon_multi_query_under_sdpa_keeps_one_kv_head)")
def test_falcon_multi_query_under_sdpa_is_the_math_kernels():
    """Falcon-7B's multi-query attention hands sdpa one K/V head against every query head without enable_gqa: sdpa
    runs its math kernel, which keeps Q scaled, K and V broadcast to every query head and the s×s probabilities, all
    fp32 at 16 bits too, and neither its output nor the mask (o reads a copy): estimated, not left out with a note
    (block cases above; roles below). Negative control: the fused kernel's tensors (Q, K, V as sdpa gets them, its
    output, the logsumexp and the mask), which the estimate would have given, are not autograd's; the new decoder
    architecture (K and V broadcast before sdpa) still runs a fused kernel (checked above)."""
    import spectra.memory.activations as activations

    config = _config("falcon", 1).to_dict()
    est = estimate_memory(config, method="lora", rank_plan_or_rank=4)
    assert est.activations > 0 and est.training_total > 0
    assert not any("multi-query" in note for note in est.notes)
    for precision in ("bf16", "fp32"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(activations, "_sdpa_math", lambda shape, attention: False)
            block = _block("falcon", 1, "lora", precision, "sdpa")
        assert block["modelled"] - 16 * 4 * block["layer_norms"] * (precision == "bf16") != block["measured"]


@_PEFT_PATTERN_WARNING
@pytest.mark.skipif(not _falcon_views(), reason="before transformers 5.25 Falcon-7B's attention runs sdpa's math "
                    "kernel (test_falcon_multi_query_under_sdpa_is_the_math_kernels)")
@pytest.mark.parametrize("variant", [1, 3])
def test_falcon_multi_query_under_sdpa_keeps_one_kv_head(variant):
    """From transformers 5.25 Falcon's one K/V head (Falcon-7B's multi-query, the new architecture with one) goes
    to sdpa repeated to every query head under the materialised mask: repeat_kv's stride-0 view, so sdpa keeps the
    rotated K at one head and V's view of the fused output, and the block is the fused kernel's (not the math
    kernel's). Negative controls: modelled as copies of Q's size (as more K/V heads repeat), or as the math kernel
    before 5.25, the block is off."""
    import spectra.memory.activations as activations

    block = _block("falcon", variant, "lora", "fp32", "sdpa", use_cache=False)
    assert block["modelled"] == block["measured"] > 0, block
    real = activations._qkv_bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(activations, "_qkv_bytes",
                      lambda shape, p, cache, masked=False: 3 * p * shape.q_dim if masked else real(shape, p, cache))
        assert _block("falcon", variant, "lora", "fp32", "sdpa", use_cache=False)["modelled"] != block["measured"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(activations, "_sdpa_math", lambda shape, attention: attention == "sdpa")
        assert _block("falcon", variant, "lora", "fp32", "sdpa", use_cache=False)["modelled"] != block["measured"]


@_PEFT_PATTERN_WARNING
@pytest.mark.parametrize(("family", "variant", "method", "use_cache"), [
    ("falcon", 1, "lora", True), ("falcon", 1, "lora", False), ("falcon", 1, "full", True),
    ("falcon", 3, "lora", True), ("falcon", 3, "dora", False), ("starcoder2", 2, "lora", True),
    ("starcoder2", 2, "full", False), ("starcoder2", 0, "lora", True)])
def test_eager_at_batch_1_keeps_one_kv_head_once(family, variant, method, use_cache):
    """Eager attention at batch 1 (`spectra memory`'s default) with one K/V head: torch.matmul folds repeat_kv's
    stride-0 view without a copy, so the products keep K and V at one head (the cache's copies, or K's rotation and
    V's view of the fused output: all of it) where from batch 2 they keep copies of Q's size. One block, measured
    against the estimate at batch 1 (fp32); StarCoder2's two K/V heads (variant 0) copy at any batch. Negative
    control: K and V counted at Q's size at batch 1 too, the one-head blocks are off."""
    import spectra.memory.activations as activations

    if family == "falcon" and not _falcon_views():
        pytest.skip("before transformers 5.25 Falcon's attention keeps 16 bytes a layer beside, whatever the tokens "
                    "(not modelled), and a new-architecture block with one K/V head without the cache its V at one "
                    "head (modelled at Q's size: README)")

    def build(layers):
        return _model(family, variant, num_hidden_layers=layers)

    def misread(patch, module):
        patch.setattr(module, "_eager_qkv_bytes",
                      lambda shape, p, cache, batch, *, q_kept, k, v: p * shape.q_dim * (q_kept + k + v))

    block = layer_saved(build, _peft, method, "fp32", "eager", batch=1, use_cache=use_cache)
    assert block["modelled"] == block["measured"] > 0, block
    copied = layer_saved(build, _peft, method, "fp32", "eager", batch=1, use_cache=use_cache, misread=misread)
    one_head = model_shape(_config(family, variant).to_dict()).kv_dim * 4 == 32  # 4 heads of 8 in _SMALL
    assert (copied["modelled"] != block["measured"]) == one_head, copied
    assert activations._eager_qkv_bytes  # the name the negative control patches


@_PEFT_PATTERN_WARNING
def test_falcons_attention_read_as_phi_3s_is_wrong():
    """Negative control: Falcon's block modelled without its materialised mask and with o reading a copy of sdpa's
    output (as other fused, rotary projections) misses what autograd saves."""
    def misread(shape):
        return dataclasses.replace(shape, falcon_attention=False)

    assert _block("falcon", 0, "lora", "fp32", "sdpa", misread=misread)["modelled"] != \
        _block("falcon", 0, "lora", "fp32", "sdpa")["measured"]


@pytest.mark.parametrize(("overrides", "match"), [
    (dict(alibi=True), "alibi"), (dict(new_decoder_architecture=True, parallel_attn=False), "cannot run"),
    (dict(hidden_act="gelu"), None)])
def test_falcon_layouts_the_model_does_not_describe_are_refused(overrides, match):
    """Falcon-RW's ALiBi and a layout FalconDecoderLayer cannot run are refused naming the key."""
    from spectra.errors import ConfigError

    config = _config("falcon", 0, **overrides).to_dict()
    if match is None:  # Falcon's key is activation: hidden_act changes nothing
        assert model_shape(config).mlp_saved == 1
        return
    with pytest.raises(ConfigError, match=match):
        model_shape(config)


def test_bitsandbytes_leaves_falcons_linears_in_16_bits(tmp_path):
    """transformers' 4-bit load converts exactly nn.Linear modules; Falcon's are FalconLinear (a subclass), so it
    quantises none of them (what a QLoRA estimate of Falcon must not assume: /tmp/s19/memarch-extra.patch)."""
    import torch

    from tests.models import load_4bit

    model = _model("falcon", hidden_size=64, intermediate_size=128)
    loaded, constants = load_4bit(model, tmp_path)
    assert constants == 0
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert held == 2 * sum(p.numel() for p in model.parameters())  # every weight in bf16
    assert any(type(m).__name__ == "FalconLinear" for m in loaded.modules())
    assert not any(type(m) is torch.nn.Linear for m in loaded.transformer.h.modules())


def test_stablelm_with_qk_layernorm_is_refused():
    """StableLM 2 12B's qk_layernorm (a LayerNorm per head on Q and K) is refused naming it; its count would be off
    by the norms' weights (the negative control)."""
    import transformers as tf

    from spectra.errors import ConfigError

    config = _config("stablelm", 1, qk_layernorm=True)
    with pytest.raises(ConfigError, match="qk_layernorm"):
        model_shape(config.to_dict())
    built = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
    assert built != model_shape(config.to_dict() | {"qk_layernorm": False}).params


@pytest.mark.parametrize(("family", "variant"), _CASES)
def test_the_kv_cache_is_what_transformers_caches(family, variant):
    """The inference KV cache is the bytes of transformers' DynamicCache after a forward: Falcon's new architecture
    caches K and V broadcast to every query head before transformers 5.25 and num_kv_heads heads from it, its
    multi-query layout one head each, StarCoder2's sliding layers the last window − 1 tokens."""
    check_kv_cache(_model(family, variant))
