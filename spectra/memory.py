"""The memory model of fine-tuning: full, LoRA, QLoRA and DoRA, component by component.

``estimate_memory(config, method=..., rank_plan_or_rank=..., ...)`` reads only a model's
``config.json`` (no weights), so it answers for a 70B model as fast as for a tiny one. Every
figure is in bytes; every formula and assumption is stated where it is computed.

What is *not* counted: the CUDA context and kernels (≈ 0.3–1 GiB), allocator fragmentation and
caching, framework buffers (rotary tables, attention masks), dropout masks (LLM fine-tuning
usually runs with dropout 0), communication buffers of distributed training, and data-loader
memory. Read the totals as the floor a device must hold.

The activations are checked tensor by tensor against what autograd saves on tiny transformers 5
models on the CPU (tests/test_memory.py). Where a CUDA kernel could differ, the model follows
the kernel a bf16 run gets (FlashAttention): sdpa's output takes Q's memory layout, so Phi-3's
o_proj reads a copy (CUDA's memory-efficient kernel, which fp32 runs get, returns the layout
o_proj wants: q·p per token less under full fine-tuning), and an MoE's experts run on
grouped_mm (transformers' fallback where it is missing, on GPUs before Ampere, old torch or
torch.compile outside bf16, keeps every expert's input, frozen or not). A bf16 LayerNorm keeps
fp32 statistics, as on CUDA (the CPU keeps them in bf16: PhiMoE's LayerNorms are checked at fp32).

References
----------
.. [1] Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
       Models", arXiv:1910.02054 (mixed-precision Adam: 2 + 2 + 12 bytes per parameter).
.. [2] Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
       arXiv:2205.05198 (activations per layer: s·b·h·(34 + 5·a·s/h) bytes for GPT).
.. [3] Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314
       (NF4, block 64; double quantisation: 8-bit constants in blocks of 256).
.. [4] Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
.. [5] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from spectra.checkpoints.architectures import missing_stacks, parse_stacks, role_selected, stack_selected
from spectra.errors import CheckpointError, ConfigError
from spectra.ranks import RankPlan

METHODS = ("full", "lora", "qlora", "dora")
PRECISIONS = ("fp32", "bf16", "fp16", "mixed")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
ATTENTIONS = ("sdpa", "eager")
# LoRA's usual targets: every linear layer of the blocks ("all-linear", as QLoRA recommends [3]); an MoE's are
# what spectra train adapts (_trained_moe_adapters)
DEFAULT_ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")

NF4_BLOCK = 64          # weights per NF4 absmax constant [3]
DQ_BLOCK = 256          # absmax constants per second-level fp32 constant with double quantisation [3]
ADAM8_BLOCK = 256       # bitsandbytes' blockwise 8-bit optimizer states: one fp32 absmax per 256


# ---------------------------------------------------------------------------- the model from config.json


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from ``config.json``.

    ``linears`` lists one block's linear layers as ``(role, out, in)``, MoE experts expanded, with
    the roles of ``spectra.checkpoints.architectures`` (``q k v o qkv gate up down``; ``router``).
    ``other_params`` counts everything that is not a block linear nor the LM head (embeddings,
    norms, biases, pooler): QLoRA keeps these in 16 bits, like transformers' bitsandbytes path.
    """

    family: str
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    q_dim: int
    intermediate: int
    vocab: int
    # "rms": an RMSNorm that up-casts its input to fp32 (Llama-like); "rms_fp32": one that also applies
    # its weight in fp32 (Gemma); "layer": LayerNorm (GPT-2, BERT)
    norm: str
    mlp_saved: int  # intermediate-sized tensors the MLP's activation keeps for backward, per expert
    softmax_fp32: bool  # eager attention takes its softmax in fp32 and casts it back (Llama-like)
    experts_per_token: int
    experts: int  # experts per MoE layer (1: a dense model)
    linears: tuple[tuple[str, int, int], ...]
    other_params: int
    head_params: int
    causal: bool
    norms: int = 2  # norms per block; Gemma 2 also normalises each sublayer's output before the residual (4)
    attn_softcap: bool = False  # Gemma 2 caps the attention logits (tanh): eager keeps the tanh too
    logit_softcap: bool = False  # Gemma 2 caps the final logits (tanh), which keeps its output
    sdpa: bool = True  # transformers runs the family with sdpa (Gemma 2 only with eager)
    rotary: bool = False  # rotary position embeddings (Llama-like): Q and K are fresh tensors, not views
    qk_norm: bool = False  # Gemma 3 normalises each head's Q and K (RMSNorm over head_dim) before the rotation
    sparsemixer: bool = False  # PhiMoE routes by SparseMixer (two masked softmaxes), not Mixtral's softmax top-k
    topk_softmax: bool = False  # GraniteMoE takes the softmax of the top-k logits, not the top-k of the softmax
    input_jitter: bool = False  # PhiMoE's input_jitter_noise: in training its MLP input is multiplied by noise
    # Qwen3-MoE's router: Mixtral's (top-k of an fp32 softmax), but renormalising the k weights only with
    # norm_topk_prob (routing_norm) and casting them to the activations' dtype (routing_cast)
    routing_cast: bool = False
    routing_norm: bool = True
    # an MoE's router, when adapted, is adapted through its weight (a PEFT ParamWrapper, target_parameters), no LoRA
    # module being able to run on it (Mixtral's MixtralTopKRouter, PhiMoE's tuple-returning Linear): _moe_adapters
    router_parameter: bool = False
    # a multimodal config (a nested text_config: Gemma 3's Gemma3ForConditionalGeneration) is its language model
    # plus other towers (vision tower, projector), counted off transformers' model on the meta device
    # (_with_other_towers): held in w, never run on text-only batches, so no activations, gradients or states
    tower_params: int = 0
    # their linear modules, (role, out, in, stack) each, which an int rank adapts where stacks name their stack (as
    # spectra train does; its default stacks are those text runs through); stack as architectures names it ("vision")
    tower_linears: tuple[tuple[str, int, int, str | None], ...] = ()
    # the (out, in) of the towers' linears that bitsandbytes stores in 4 bits under QLoRA, as transformers picks them
    # (exactly nn.Linear or Conv1D, outside get_keys_to_not_convert: not a MultiheadAttention's out_proj)
    tower_quantised: tuple[tuple[int, int], ...] = ()
    # each layer's sliding attention window (0: full attention; empty: none slides): transformers masks a layer whose
    # window a sequence reaches (seq_len ≥ window), and sdpa then keeps the mask and K, V repeated (_sliding_windows)
    windows: tuple[int, ...] = ()
    # GLM rotates part of each head and concatenates the rest (torch.cat): Q, and so sdpa's output, come out
    # (b, heads, s, d)-contiguous and o_proj reads a copy (_o_input_copied)
    rotary_cat: bool = False
    # MoE families whose layers differ: the layers whose MLP is dense (Qwen3-MoE's mlp_only_layers and those
    # decoder_sparse_step skips, DeepSeek's first first_k_dense_replace), and such a block's linears and MLP width
    # (:meth:`block`); ``linears`` and ``intermediate`` are then the MoE layers'
    dense_layers: tuple[int, ...] = ()
    dense_linears: tuple[tuple[str, int, int], ...] = ()
    dense_intermediate: int = 0
    # DeepSeek's shared experts: a SwiGLU MLP of this width that every token runs beside the routed experts
    shared_intermediate: int = 0
    # parameters transformers keeps in fp32 whatever the dtype asked (_keep_in_fp32_modules_strict: DeepSeek's
    # routers), counted in ``params`` too
    fp32_params: int = 0
    # values per token and layer that the KV cache holds (0: K and V, 2·kv_dim; DeepSeek's MLA caches its compressed
    # latent and the rotary key, kv_lora_rank + qk_rope_head_dim)
    cache_width: int = 0
    # DeepSeek's multi-head latent attention: (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    # v_head_dim); empty for attention by q/k/v projections (_mla_bytes)
    mla: tuple[int, ...] = ()
    # DeepSeek's routers: logits of the input cast to fp32 times an fp32 weight; V3's by sigmoid scores (V2's by an
    # fp32 softmax), and V2's group_limited_greedy masks the groups it drops (a bool per expert and token)
    router_fp32: bool = False
    router_sigmoid: bool = False
    router_group_mask: bool = False

    @property
    def fused_qkv(self) -> bool:
        """One linear computes Q, K and V (GPT-2's c_attn, Phi-3's qkv_proj), which are views of its output."""
        return any(role == "qkv" for role, _, _ in self.linears)

    def block(self, layer: int) -> ModelShape:
        """The shape of block ``layer``: this one, or for a dense layer of an MoE (``dense_layers``) one without
        experts, of ``dense_linears`` and ``dense_intermediate``."""
        if layer not in self.dense_layers:
            return self
        return dataclasses.replace(self, linears=self.dense_linears, intermediate=self.dense_intermediate,
                                   experts=1, experts_per_token=1, shared_intermediate=0, router_parameter=False,
                                   dense_layers=())

    @property
    def linear_params(self) -> int:
        """The blocks' weight matrices (experts expanded, routers included), every layer's own."""
        moe = sum(o * i for _, o, i in self.linears)
        dense = sum(o * i for _, o, i in self.dense_linears)
        return (self.layers - len(self.dense_layers)) * moe + len(self.dense_layers) * dense

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params + self.head_params + self.tower_params


def model_shape(config: Mapping) -> ModelShape:
    """Read a Llama-like (Llama, Mistral, Qwen2, Mixtral …), GPT-2 or BERT ``config.json`` dict.

    Other ``model_type`` values with Llama's (GPT-2's, BERT's) keys are read as Llama-like (stated in the
    result's ``family``) where transformers' base model built from the config holds the parameters
    counted, and refused where it holds others or cannot be built from the config (:func:`_refuse_other_blocks`);
    a model_type this transformers does not know is read as before. Parameter counts match ``sum(p.numel())`` of the
    transformers model (tied weights once); BERT counts ``BertModel`` (encoder + pooler, no task head). A
    multimodal config (a nested ``text_config``: Gemma 3's) is its language model plus the other towers' parameters,
    held frozen (:func:`_with_other_towers`).
    """
    cfg = dict(config)
    mtype = str(cfg.get("model_type", "")).lower()
    if isinstance(cfg.get("text_config"), Mapping) and "hidden_size" not in cfg:
        return _with_other_towers(cfg, mtype)
    if cfg.get("is_encoder_decoder"):  # T5, BART, Whisper: two stacks and cross-attention, and none of Llama's keys
        raise ConfigError(f"model_type {mtype or '?'}: an encoder-decoder (an encoder, a decoder with cross-attention "
                          "over it), which spectra's memory model does not describe; it reads decoder-only "
                          "Llama-like and GPT-2 configs, and BERT encoders. `spectra train --task seq2seq_lm` trains "
                          "it, but its memory is not estimated.")
    # the base model on the meta device, built at most once (MoE adapters and the parameter check both read it)
    base_model = functools.cache(functools.partial(_meta_model_for, cfg, mtype))
    try:
        if mtype not in _OWN_EXPERT_SIZES and ("num_experts" in cfg and "num_local_experts" not in cfg
                                               or "moe_intermediate_size" in cfg):
            raise ConfigError(f"model_type {mtype}: a mixture of experts configured by num_experts or "
                              "moe_intermediate_size (Qwen2-MoE, OLMoE, …: expert sizes of their own, shared "
                              "experts), which spectra's memory model does not describe; it reads Mixtral-style MoE "
                              "(num_local_experts, experts of intermediate_size), Qwen3-MoE and DeepSeek-V2/V3.")
        if mtype in _MOE_COUNTED_WRONG:
            raise ConfigError(f"model_type {mtype}: {_MOE_COUNTED_WRONG[mtype]}, which spectra's memory model "
                              "would count wrong; it reads Mixtral-style MoE (Mixtral, MiniMax, PhiMoE, GraniteMoE).")
        # a config.json without layer_types gets the family's (MiniMax: lightning attention every other layer)
        layer_types = cfg.get("layer_types") or (getattr(_config_object(mtype), "layer_types", None) if mtype else None)
        other_layers = sorted(set(layer_types or ()) - _ATTENTION_LAYERS)
        if other_layers and mtype != "gpt2" and "n_embd" not in cfg and "type_vocab_size" not in cfg:
            raise ConfigError(f"model_type {mtype}: layers of type {', '.join(map(str, other_layers))} beside "
                              "attention (MiniMax's lightning attention, …), whose weights and activations spectra's "
                              "memory model does not describe; it reads models of attention layers "
                              f"({', '.join(sorted(_ATTENTION_LAYERS))}).")
        if mtype in _NOT_LLAMA_LIKE:
            raise ConfigError(f"model_type {mtype}: its blocks differ from Llama's, GPT-2's and BERT's (parallel "
                              "attention, other MLPs, …), which spectra's memory model does not describe; it reads "
                              "Llama-like (Llama, Mistral, Qwen2, Gemma, Phi-3, Mixtral …), GPT-2 and BERT configs.")
        if mtype == "gpt2" or "n_embd" in cfg:
            shape = _gpt2(cfg)
        elif mtype == "bert" or "type_vocab_size" in cfg:
            shape = _bert(cfg)
        elif mtype in _MLA:
            shape = _deepseek(cfg, mtype, base_model)
        else:
            shape = _llama(cfg, mtype, base_model)
    except KeyError as err:
        raise ConfigError(f"config.json of model_type {mtype or '?'} lacks {err}; spectra's memory model reads "
                          "Llama-like, GPT-2 and BERT configs.") from None
    if mtype and mtype not in _COUNTED_RIGHT:
        _refuse_other_blocks(cfg, mtype, shape, base_model)
    return shape


def _with_other_towers(cfg: dict, mtype: str) -> ModelShape:
    """A multimodal config (Gemma 3's ``Gemma3ForConditionalGeneration``: a ``text_config`` beside a
    ``vision_config``) read as its language model, from ``text_config``, plus the other towers (vision tower,
    multi-modal projector): their parameters and linear modules are counted off transformers' image-text-to-text
    model built from the config on the meta device, as everything outside ``language_model`` and the LM head.

    Text-only batches are assumed: the vision tower never runs, so it keeps no activations, and LoRA modules
    on its linears (``stacks`` naming it, as ``spectra train --stacks`` does) get no gradient (AdamW makes no
    states for them). The whole model built
    must hold what the language model is counted to hold plus the towers, else refused naming both counts."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from spectra.checkpoints.architectures import module_info

    text = model_shape(cfg["text_config"])
    model_class, model = _meta_model_for(cfg, mtype, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
    if model is None:
        raise ConfigError(f"model_type {mtype or '?'}: a config with a text_config whose other towers this "
                          "transformers cannot build (no image-text-to-text class for it), so spectra's memory "
                          "model cannot count them; pass the text_config alone to estimate the language model.")

    def outside(name: str) -> bool:  # a tower's: neither the language model nor the LM head
        return ".language_model." not in f".{name}." and name.partition(".")[0] != "lm_head"

    towers = sum(p.numel() for name, p in model.named_parameters() if outside(name))  # tied weights once
    _refuse_unless_built_holds(model, text.params + towers, mtype=mtype, model_class=model_class,
                               counted_as=f"(its {text.family} language model {text.params}, the other towers "
                                          f"{towers})")
    linears, quantised = [], []
    kept = _not_quantised(model)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and outside(name):
            out, d_in = module.weight.shape if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
            info = module_info(name)
            linears.append((info.role, int(out), int(d_in), info.stack))
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and name not in kept:
                quantised.append((int(out), int(d_in)))
    return dataclasses.replace(text, family=f"{mtype} ({text.family} language model; vision tower and projector "
                                            "held frozen, not run: text-only batches)",
                               tower_params=towers, tower_linears=tuple(linears), tower_quantised=tuple(quantised))


def _not_quantised(model) -> set[str]:
    """The modules transformers' bitsandbytes path leaves unconverted whatever their type
    (``transformers.quantizers.base.get_keys_to_not_convert``: the output embedding, tied weights, the module of
    the last parameter); empty where this transformers lacks it."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return set()
    return set(get_keys_to_not_convert(model))


def _meta_model_for(cfg: dict, mtype: str, mapping: str = "MODEL_MAPPING_NAMES"):
    """transformers' class for ``mtype`` in ``mapping`` (a name in ``transformers.models.auto.modeling_auto``;
    default the base model: no LM head) and that class built from ``cfg`` on the meta device (shapes only, no
    weights), as ``(class name, model)``; the model is None where this transformers has no such class or cannot
    build it from the config (token ids outside the vocabulary aside: :func:`spectra.checkpoints.targets.meta_model`).

    Costs transformers' modelling import, ~0.8 s once per process, then 10-30 ms a build (Llama-2-70B's,
    Mixtral-8x7B's); :func:`model_shape` builds at most one base model a config, none for :data:`_COUNTED_RIGHT`'s
    dense families."""
    from transformers.models.auto import modeling_auto

    from spectra.checkpoints.targets import meta_model

    model_class = getattr(modeling_auto, mapping).get(mtype)
    if not isinstance(model_class, str):
        return model_class, None
    return model_class, meta_model(cfg, model_class)


def _refuse_unless_built_holds(model, counted: int, *, mtype: str, model_class: str, counted_as: str) -> None:
    """Refuse, naming both counts, where ``model`` (transformers' ``model_class`` built from the config) holds
    another number of parameters than the ``counted`` ones (what they are: ``counted_as``)."""
    built = sum(p.numel() for p in model.parameters())  # parameters() yields a tied or shared tensor once
    if built != counted:
        raise ConfigError(f"model_type {mtype}: transformers' {model_class} built from this config holds {built} "
                          f"parameters, spectra's memory model counts {counted} {counted_as}, so it would count "
                          "them wrong.")


def _refuse_other_blocks(cfg: dict, mtype: str, shape: ModelShape, base_model=None) -> None:
    """Refuse a ``model_type`` outside :data:`_COUNTED_RIGHT` whose base model, built by transformers from the config
    on the meta device (:func:`_meta_model_for`; ``base_model()`` returns it where already built), holds another
    number of parameters than ``shape`` counts: its blocks differ from those the memory model describes (Qwen3's
    and OLMo 2's Q/K norms, Cohere's LayerNorms without a residual norm pair, JetMoE's attention experts, …). The
    base model (``MODEL_MAPPING_NAMES``: no LM head, tied embeddings once, buffers not counted) is compared with
    ``shape.params`` less its head.

    Equal counts do not prove equal activations (a family may scale or normalise in ways with no weights), but
    unequal ones prove the estimate wrong. Where this transformers has no class for ``mtype``, nothing to compare
    against: the config is read as before. Where it has one but cannot build it from the config (token ids outside
    the vocabulary aside: :func:`_meta_model_for`), refused: the blocks cannot be checked. Tiny GLM-4, GLM, SmolLM3
    and OpenAI privacy-filter configs, whose family's pad_token_id lies outside a vocabulary of 64, had been read
    as Llama-like so."""
    base_class, model = base_model() if base_model is not None else _meta_model_for(cfg, mtype)
    if model is None:
        if isinstance(base_class, str):
            raise ConfigError(f"model_type {mtype}: transformers' {base_class} cannot be built from this config (on "
                              "the meta device), so spectra's memory model cannot check that its blocks are ones it "
                              f"describes ({_LLAMA_LIKE_DESCRIBED}; Mixtral-style MoE; GPT-2; BERT) and will not read "
                              "it as Llama-like; transformers' AutoConfig.for_model and "
                              f"{base_class}(config) show what fails.")
        return
    _refuse_unless_built_holds(model, shape.params - shape.head_params, mtype=mtype, model_class=base_class,
                               counted_as="(no LM head): its blocks differ from the families the memory model "
                                          f"describes ({_LLAMA_LIKE_DESCRIBED}; Mixtral-style MoE: Mixtral, PhiMoE, "
                                          "GraniteMoE, MiniMax; GPT-2; BERT)")


# the dense Llama-like families the memory model is checked on, as its refusals list them
_LLAMA_LIKE_DESCRIBED = ("Llama-like: Llama, Mistral, Qwen2, Gemma, Phi-3, Granite, Helium, ERNIE 4.5, Ministral, "
                         "SmolLM3, GLM")


def _llama(cfg: dict, mtype: str, base_model) -> ModelShape:
    """A Llama-like config; ``base_model()``: :func:`_meta_model_for`'s, built when first asked (MoE only)."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    experts = cfg.get("num_local_experts") or (cfg.get("num_experts") if mtype in _OWN_EXPERT_SIZES else None) or 1
    dense_inter, dense_layers = inter, ()
    if experts > 1 and mtype in _OWN_EXPERT_SIZES:  # Qwen3-MoE: experts of moe_intermediate_size, some layers dense
        inter, dense_layers = cfg["moe_intermediate_size"], _qwen_moe_dense_layers(cfg, mtype, layers)
    if mtype in _FUSED_PROJECTIONS:  # Phi-3: qkv_proj and gate_up_proj are single Linears (what LoRA adapts)
        attention = (("qkv", q_dim + 2 * kv_dim, h), ("o", h, q_dim))
        dense = (("gate_up", 2 * inter, h), ("down", h, inter))
    else:
        attention = (("q", q_dim, h), ("k", kv_dim, h), ("v", kv_dim, h), ("o", h, q_dim))
        dense = (("gate_up", 2 * dense_inter, h), ("down", h, dense_inter)) if mtype in _FUSED_MLP \
            else (("gate", dense_inter, h), ("up", dense_inter, h), ("down", h, dense_inter))
    linears = attention + (_routed(experts, inter, h) if experts > 1 else dense)
    # ERNIE 4.5's use_bias puts a bias on every linear of the block (Llama's attention_bias and mlp_bias together)
    every_bias = mtype in _USE_BIAS and bool(cfg.get("use_bias", False))
    attention_bias = bool(cfg.get("attention_bias", False)) or every_bias
    qkv_bias = attention_bias or mtype in ("qwen2", "qwen2_moe")
    bias = (q_dim + 2 * kv_dim if qkv_bias else 0) + (h if attention_bias and mtype not in _FUSED_MLP else 0)
    bias += (2 * inter + h) * experts if cfg.get("mlp_bias", False) or every_bias else 0
    tied = bool(cfg.get("tie_word_embeddings", getattr(_config_object(mtype), "tie_word_embeddings", False)))
    # Gemma 2's and Gemma 3's blocks normalise each sublayer's input and output (input, post-attention, pre- and
    # post-feedforward norms); Gemma 2 caps attention and final logits by tanh (config.json may leave the caps to
    # Gemma2Config's defaults, 50 and 30; null turns them off), Gemma 3 normalises Q and K per head instead
    norms = 4 if mtype in _FOUR_NORMS else 2
    caps = {key: (cfg[key] if key in cfg else getattr(_config_object(mtype), key, None) if mtype == "gemma2" else None)
            is not None for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    qk_norm = mtype in _QK_NORMS
    norm = "layer" if mtype in _LAYER_NORMS else "rms_fp32" if mtype.startswith("gemma") or mtype in _NORM_WEIGHT_FP32 \
        else "rms"
    norm_params = 2 * h if norm == "layer" else h  # a LayerNorm has a bias beside its weight
    # embed + per-layer norm weights (Gemma 3's q_norm and k_norm: head_dim each) and biases + final norm
    other = vocab * h + layers * (norms * norm_params + 2 * head_dim * qk_norm + bias) + norm_params
    head = (0 if tied else vocab * h) + (vocab if cfg.get("lm_head_bias", False) else 0)  # PhiMoE's head has a bias
    return ModelShape(family=mtype or "llama-like", hidden=h, layers=layers, heads=heads, kv_dim=kv_dim,
                      q_dim=q_dim, intermediate=inter, vocab=vocab, norm=norm, mlp_saved=3, softmax_fp32=True,
                      experts_per_token=(2 if mtype in _SPARSEMIXER else cfg.get("num_experts_per_tok", 1))
                      if experts > 1 else 1, experts=experts,
                      linears=linears, other_params=other, head_params=head, causal=True,
                      norms=norms, attn_softcap=caps["attn_logit_softcapping"],
                      logit_softcap=caps["final_logit_softcapping"], sdpa=mtype not in _EAGER_ONLY, rotary=True,
                      qk_norm=qk_norm, sparsemixer=mtype in _SPARSEMIXER, topk_softmax=mtype in _TOPK_SOFTMAX,
                      input_jitter=mtype in _SPARSEMIXER and bool(cfg.get("input_jitter_noise", 0.0)),
                      windows=_sliding_windows(cfg, mtype, layers), rotary_cat=mtype in _FUSED_MLP,
                      routing_cast=mtype in _OWN_EXPERT_SIZES,
                      routing_norm=bool(cfg.get("norm_topk_prob", getattr(_config_object(mtype), "norm_topk_prob", True))),
                      dense_layers=dense_layers, dense_linears=attention + dense if dense_layers else (),
                      dense_intermediate=dense_inter if dense_layers else 0,
                      **(_moe_adapters(base_model()[1], experts, h) if experts > 1 else {}))


def _deepseek(cfg: dict, mtype: str, base_model) -> ModelShape:
    """A DeepSeek-V2 or -V3 config, as transformers 5's DeepseekV2/V3Model holds it.

    Multi-head latent attention (MLA, arXiv:2405.04434): Q through ``q_a_proj`` (h → q_lora_rank), an RMSNorm and
    ``q_b_proj`` (→ heads·(qk_nope + qk_rope)), or one ``q_proj`` where q_lora_rank is null (V2-Lite);
    ``kv_a_proj_with_mqa`` (h → kv_lora_rank + qk_rope), an RMSNorm on the latent and ``kv_b_proj`` (kv_lora_rank
    → heads·(qk_nope + v_head_dim)); ``o_proj`` (heads·v_head_dim → h); ``attention_bias`` biases q_a, kv_a and o.
    The first ``first_k_dense_replace`` layers have a dense SwiGLU MLP of ``intermediate_size``, the others
    ``n_routed_experts`` routed experts of ``moe_intermediate_size`` (fused gate_up_proj and down_proj), a router
    whose weight transformers keeps in fp32 (``_keep_in_fp32_modules_strict``; V3's score-correction bias is a
    buffer) and shared experts, one SwiGLU MLP of ``moe_intermediate_size·n_shared_experts`` (V2: ``mlp_bias``
    biases it and the dense MLP). The KV cache holds the latent and the rotary key, kv_lora_rank + qk_rope per
    token and layer.

    The activations are modelled as autograd saves them (:func:`_mla_bytes`, :func:`_moe_bytes`): checked with
    eager attention, and with sdpa where Q's head size equals V's; where it does not (DeepSeek's own configs: 192
    against 128) sdpa's activations are refused (:func:`_activations_refused`).
    """
    h, layers, heads, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["vocab_size"]
    q_lora, kv_lora = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    inter, moe_inter = cfg["intermediate_size"], cfg["moe_intermediate_size"]
    experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg["num_experts"]
    shared = moe_inter * cfg.get("n_shared_experts", 1)
    first_dense = min(cfg.get("first_k_dense_replace") or 0, layers)
    q_dim = heads * (nope + rope)
    query = (("q_a", q_lora, h), ("q_b", q_dim, q_lora)) if q_lora else (("q", q_dim, h),)
    attention = query + (("kv_a", kv_lora + rope, h), ("kv_b", heads * (nope + v_dim), kv_lora), ("o", h, heads * v_dim))
    swiglu = lambda width: (("gate", width, h), ("up", width, h), ("down", h, width))  # noqa: E731
    attention_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    # biases (q_a, kv_a, o), the attention's RMSNorms (on Q's and KV's latents) and the block's two
    per_layer = (((q_lora or 0) + kv_lora + rope + h) if attention_bias else 0) + (q_lora or 0) + kv_lora + 2 * h
    dense_bias, moe_bias = (2 * inter + h, 2 * shared + h) if mlp_bias else (0, 0)
    other = vocab * h + layers * per_layer + first_dense * dense_bias + (layers - first_dense) * moe_bias + h
    tied = bool(cfg.get("tie_word_embeddings", getattr(_config_object(mtype), "tie_word_embeddings", False)))
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=heads, kv_dim=heads * (nope + rope), q_dim=q_dim,
                      intermediate=moe_inter, vocab=vocab, norm="rms", mlp_saved=3, softmax_fp32=True,
                      experts_per_token=cfg.get("num_experts_per_tok") or 1, experts=experts,
                      linears=attention + swiglu(shared) + _routed(experts, moe_inter, h), other_params=other,
                      head_params=0 if tied else vocab * h, causal=True, rotary=True,
                      dense_layers=tuple(range(first_dense)), dense_linears=attention + swiglu(inter),
                      dense_intermediate=inter, shared_intermediate=shared,
                      fp32_params=(layers - first_dense) * experts * h, cache_width=kv_lora + rope,
                      mla=(q_lora or 0, kv_lora, nope, rope, v_dim), router_fp32=True,
                      router_sigmoid=mtype == "deepseek_v3",
                      router_group_mask=mtype == "deepseek_v2" and cfg.get("topk_method") == "group_limited_greedy",
                      routing_norm=bool(cfg.get("norm_topk_prob", getattr(_config_object(mtype), "norm_topk_prob",
                                                                          False))) and mtype == "deepseek_v3",
                      **_moe_adapters(base_model()[1], experts, h))


def _routed(experts: int, inter: int, hidden: int) -> tuple[tuple[str, int, int], ...]:
    """An MoE layer's routed experts, as transformers 5 holds them (fused 3-D gate_up_proj and down_proj parameters,
    expanded per expert: roles of :data:`_UNQUANTISED`), and its router's (experts, hidden) weight."""
    return (("routed gate_up", 2 * inter, hidden), ("routed down", hidden, inter)) * experts \
        + (("router", experts, hidden),)


def _qwen_moe_dense_layers(cfg: dict, mtype: str, layers: int) -> tuple[int, ...]:
    """The layers of a Qwen3-MoE whose MLP is dense, as Qwen3MoeDecoderLayer decides: those in ``mlp_only_layers``
    and those ``decoder_sparse_step`` skips (layer + 1 not a multiple of it); defaults from the family's config."""
    family = _config_object(mtype)
    only = cfg.get("mlp_only_layers", getattr(family, "mlp_only_layers", None)) or ()
    step = cfg.get("decoder_sparse_step", getattr(family, "decoder_sparse_step", 1)) or 1
    return tuple(layer for layer in range(layers) if layer in only or (layer + 1) % step)


def _moe_adapters(model, experts: int, hidden: int) -> dict[str, bool]:
    """How PEFT adapts a plan's MoE router, read off the family's base model built from the config on the meta
    device: ``router_parameter`` of :class:`ModelShape`.

    The rule extract, plans and the adapter pairing follow (:func:`spectra.checkpoints.targets.lora_can_wrap`): a
    router no LoRA module can wrap and run is adapted through its weight (a ParamWrapper). Mixtral's
    MixtralTopKRouter is no Linear; PhiMoE's PhimoeTopKRouter is an nn.Linear whose forward returns a tuple (a LoRA
    module on it merges but fails in every forward; spectra's plans and extracted adapters adapt its weight). An
    int rank adapts no router (``spectra train``'s roles never take one: :func:`_trained_moe_adapters`).

    ``model`` is the family's base model on the meta device (:func:`_meta_model_for`, which states its cost), None
    where this transformers cannot build it. The router is the child of the first module holding ``experts`` whose
    weight is (experts, hidden). Where there is no model or no such router, a LoRA module on it (as on a plain
    nn.Linear router).
    """
    import torch

    from spectra.checkpoints.targets import lora_can_wrap

    if model is None:
        return {"router_parameter": False}
    for module in model.modules():
        if isinstance(getattr(module, "experts", None), torch.nn.Module):
            for name, child in module.named_children():
                weight = getattr(child, "weight", None)
                if name != "experts" and weight is not None and tuple(weight.shape) == (experts, hidden):
                    return {"router_parameter": not lora_can_wrap(child)}
            break
    return {"router_parameter": False}


def _sliding_windows(cfg: dict, mtype: str, layers: int) -> tuple[int, ...]:
    """Each layer's sliding attention window as transformers 5 builds the family's masks (0: full attention), or ()
    where no layer slides. Mistral-style families (:data:`_SLIDING_EVERY_LAYER`) slide every layer by
    ``sliding_window`` when it is set; families with ``layer_types`` (:data:`_SLIDING_BY_LAYER_TYPE`) slide their
    ``sliding_attention`` layers (the config class fills in ``layer_types`` and the window where config.json leaves
    them out: Ministral's, Gemma 3's, Qwen2's from use_sliding_window); other families ignore a ``sliding_window``."""
    if mtype in _SLIDING_EVERY_LAYER:
        window = cfg.get("sliding_window")
        return (int(window),) * layers if window else ()
    if mtype in _SLIDING_WHEN_USED:  # its config keeps sliding_window only with use_sliding_window
        window = getattr(_config_object(mtype, cfg), "sliding_window", None)
        return (int(window),) * layers if window else ()
    if mtype not in _SLIDING_BY_LAYER_TYPE:
        return ()
    window, layer_types = cfg.get("sliding_window"), cfg.get("layer_types")
    if "sliding_window" not in cfg or not layer_types:  # what the family fills in
        filled = _config_object(mtype, cfg)
        window = getattr(filled, "sliding_window", None) if "sliding_window" not in cfg else window
        layer_types = layer_types or getattr(filled, "layer_types", None)
    if not window or not layer_types:
        return ()
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in layer_types[:layers])
    return windows + (0,) * (layers - len(windows)) if any(windows) else ()


def _config_object(mtype: str, cfg: Mapping | None = None):
    """transformers' config of ``mtype`` built from ``cfg`` (what the family fills in where config.json is silent;
    without ``cfg``, the family's defaults: Gemma ties its embeddings, Llama does not), None where this transformers
    cannot build it. Read a key the config lacks as ``getattr(_config_object(mtype), key, fallback)``."""
    try:
        import transformers

        return transformers.AutoConfig.for_model(mtype, **{k: v for k, v in (cfg or {}).items() if k != "model_type"})
    except Exception:  # no transformers, an unknown model_type, a config its strict validation refuses
        return None


# MoE families with expert sizes of their own (moe_intermediate_size) and dense layers between the MoE ones: Qwen3-MoE
# (Llama-like blocks with Q/K norms), DeepSeek-V2/V3 (multi-head latent attention, shared experts: _MLA)
_OWN_EXPERT_SIZES = frozenset({"qwen3_moe", "deepseek_v2", "deepseek_v3"})
_MLA = frozenset({"deepseek_v2", "deepseek_v3"})
# what bitsandbytes leaves in 16 bits in an MoE block: the routed experts (3-D parameters, no nn.Linear) and the router
_UNQUANTISED = frozenset({"routed gate_up", "routed down", "router"})
_FUSED_PROJECTIONS = frozenset({"phi3"})  # PhiMoE has separate q/k/v (transformers' PhimoeForCausalLM)
# GLM: Phi-3's fused gate_up_proj beside separate q/k/v (attention_bias biases them, never o_proj), its rotary
# embeddings on part of each head (partial_rotary_factor: Q and K are fresh tensors all the same)
_FUSED_MLP = frozenset({"glm"})
_FOUR_NORMS = frozenset({"gemma2", "gemma3_text"})  # blocks that normalise each sublayer's input and output
_QK_NORMS = frozenset({"gemma3_text", "qwen3_moe"})  # an RMSNorm on each head's Q and K (q_norm, k_norm), before the rotation
_LAYER_NORMS = frozenset({"phimoe"})  # Llama-like blocks normalised by LayerNorm (weight and bias), not RMSNorm
# RMSNorms that apply their weight to the fp32 normalised input (Gemma's families too, by name): full fine-tuning
# keeps that fp32 tensor for the weight's gradient (Helium)
_NORM_WEIGHT_FP32 = frozenset({"helium"})
_USE_BIAS = frozenset({"ernie4_5"})  # config key use_bias: a bias on every linear of the block
# families whose every attention layer slides by config.sliding_window when it is set (MistralModel's mask) and those
# that slide the layers layer_types names sliding_attention (_sliding_windows); the others ignore sliding_window
_SLIDING_EVERY_LAYER = frozenset({"mistral", "mixtral", "phi3", "phimoe", "minimax"})
_SLIDING_WHEN_USED = frozenset({"qwen3_moe"})
_SLIDING_BY_LAYER_TYPE = frozenset({"ministral", "qwen2", "gemma2", "gemma3_text", "smollm3"})
# MoE routers that pick their two experts by SparseMixer (PhiMoE; two experts whatever num_experts_per_tok says)
_SPARSEMIXER = frozenset({"phimoe"})
# MoE routers that weight their top-k experts by a softmax over those k logits (GraniteMoeTopKRouter)
_TOPK_SOFTMAX = frozenset({"granitemoe"})
# families transformers 5 cannot run with sdpa (Gemma2ForCausalLM refuses it: its attention logits are capped);
# asked for none, it falls back to eager, and so does the estimate
_EAGER_ONLY = frozenset({"gemma2"})
# MoE families with Mixtral's config keys (num_local_experts) whose blocks hold more than the model describes
_MOE_COUNTED_WRONG = {
    "gpt_oss": "attention sinks, attention and expert biases and clamped SwiGLU experts, and transformers runs it "
               "with eager attention only (the estimate assumes the attention asked for; a block's activations were "
               "12-30 % under autograd's)",
    "granitemoeshared": "a shared MLP beside the experts (shared_intermediate_size), whose weights and activations "
                        "are not counted, nor the two Linears in it that all-linear adapts",
    "granitemoehybrid": "Mamba layers beside attention (layer_types) and a shared MLP beside the experts",
    "minimax_m2": "Q and K normalised across all heads (q_norm, k_norm over heads·head_dim) and a sigmoid router with "
                  "a score-correction bias",
    "openai_privacy_filter": "a bidirectional encoder for token classification (no causal mask, no LM head) with "
                             "GPT-OSS's blocks: attention sinks, attention and expert biases",
}
# families whose config the memory model reads as transformers builds them (checked by tests/test_memory.py against
# the base model built from a tiny config, and against autograd): model_shape skips building the meta model for them
_COUNTED_RIGHT = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "bert",
                            "mixtral", "phimoe", "granitemoe", "minimax", "granite", "helium", "ernie4_5",
                            "ministral", "smollm3", "glm"})
# layer_types of attention layers (a sliding or chunked window stores what full attention does per token)
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# families with Llama's config keys but other blocks: read as Llama-like they would be counted wrong
# (ALBERT has BERT's keys but one set of layer weights shared by every layer)
_NOT_LLAMA_LIKE = frozenset({"gpt_neox", "gptj", "gpt_neo", "bloom", "falcon", "opt", "phi", "mpt",
                             "starcoder2", "albert"})


def _gpt2(cfg: dict) -> ModelShape:
    h, layers, heads, vocab = cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]
    inter, positions = cfg.get("n_inner") or 4 * h, cfg.get("n_positions", 1024)
    linears = (("qkv", 3 * h, h), ("o", h, h), ("up", inter, h), ("down", h, inter))
    # transformers' NewGELU ("gelu_new", GPT-2's default) is written out in elementwise ops that keep the input,
    # tanh's output, x/2 and 1 + tanh; a fused GELU or ReLU keeps one tensor
    mlp_saved = 4 if cfg.get("activation_function", "gelu_new") == "gelu_new" else 1
    per_layer = 3 * h + h + inter + h + 4 * h  # biases of c_attn, c_proj, c_fc, mlp.c_proj; ln_1, ln_2
    other = vocab * h + positions * h + layers * per_layer + 2 * h  # wte, wpe, blocks, ln_f; head tied to wte
    return ModelShape(family="gpt2", hidden=h, layers=layers, heads=heads, kv_dim=h, q_dim=h, intermediate=inter,
                      vocab=vocab, norm="layer", mlp_saved=mlp_saved, softmax_fp32=False, experts_per_token=1,
                      experts=1, linears=linears, other_params=other, head_params=0, causal=True)


def _bert(cfg: dict) -> ModelShape:
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    linears = (("q", h, h), ("k", h, h), ("v", h, h), ("o", h, h), ("up", inter, h), ("down", h, inter))
    per_layer = 4 * h + inter + h + 4 * h  # biases of q, k, v, attention.output.dense; intermediate; output; 2 LN
    embeddings = (vocab + cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)) * h + 2 * h
    other = embeddings + layers * per_layer + h * h + h  # + pooler.dense
    return ModelShape(family="bert", hidden=h, layers=layers, heads=heads, kv_dim=h, q_dim=h, intermediate=inter,
                      vocab=vocab, norm="layer", mlp_saved=1, softmax_fp32=False, experts_per_token=1, experts=1,
                      linears=linears, other_params=other, head_params=0, causal=False)


def load_config(config_or_model: Any) -> dict:
    """A ``config.json`` dict from a dict, a transformers config or model, a path, or a hub id.

    A hub id downloads ``config.json`` only (``huggingface_hub.hf_hub_download``); offline, the
    error says so and asks for a local file.
    """
    if isinstance(config_or_model, Mapping):
        return dict(config_or_model)
    if hasattr(config_or_model, "config") and hasattr(config_or_model.config, "to_dict"):
        config_or_model = config_or_model.config
    if hasattr(config_or_model, "to_dict"):
        return config_or_model.to_dict()
    if not isinstance(config_or_model, (str, os.PathLike)):
        raise ConfigError(f"Cannot read a model config from {type(config_or_model).__name__}: pass a dict, "
                          "a path to config.json (or its folder) or a hub id.")
    path = Path(config_or_model)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        text = str(config_or_model)
        if path.suffix == ".json" or text.startswith((".", "/", "~")) or text.count("/") > 1:
            raise CheckpointError(f"No config.json at {path}.")
        path = _download_config(text)
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as err:  # UnicodeDecodeError (a weights file given for the config) included
        raise CheckpointError(f"{path} is not valid JSON ({err}); pass config.json, its folder or a hub id.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a JSON object (a model config), not {type(data).__name__}.")
    return data


def _download_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(f"Could not get config.json of hub model {repo_id!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). If offline, pass a local "
                              "config.json or its folder instead.") from None


# ---------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component. ``training_total``/``inference_total`` add the relevant ones.

    ``activations`` is without gradient checkpointing, ``activations_checkpointed`` with it;
    ``training_total`` uses the one the estimate was asked for. Both are None where the memory
    model does not describe the blocks' activations (DeepSeek's), and then so is ``training_total``:
    ``notes`` says why. ``workspace`` holds transient buffers (QLoRA's dequantised weight, DoRA's
    dense update) of the largest module. ``notes``: what the estimate leaves out or adapts
    otherwise than asked, and why (an MoE's experts that QLoRA or DoRA does not adapt).
    """

    method: str
    precision: str
    optimizer: str
    batch: int
    seq_len: int
    gradient_checkpointing: bool
    attention: str
    double_quant: bool
    use_cache: bool
    params: int
    trainable_params: int
    weights: int
    quant_constants: int
    adapter: int
    dora_magnitude: int
    gradients: int
    optimizer_states: int
    activations: int | None
    activations_checkpointed: int | None
    workspace: int
    kv_cache: int
    notes: tuple[str, ...] = ()

    @property
    def training_total(self) -> int | None:
        act = self.activations_checkpointed if self.gradient_checkpointing else self.activations
        if act is None:
            return None
        return (self.weights + self.quant_constants + self.adapter + self.dora_magnitude + self.gradients
                + self.optimizer_states + act + self.workspace)

    @property
    def inference_total(self) -> int:
        """Weights (+ adapter, unmerged) and the KV cache for ``batch`` sequences of ``seq_len``."""
        return self.weights + self.quant_constants + self.adapter + self.dora_magnitude + self.kv_cache

    def rows(self) -> list[tuple[str, int]]:
        """``(component, bytes)`` in reading order, the two totals last (for tables); a component not estimated
        (None: DeepSeek's activations, and so the training total) is left out, ``notes`` saying why."""
        act = "activations (checkpointed)" if self.gradient_checkpointing else "activations"
        rows = [("weights", self.weights), ("quant constants", self.quant_constants), ("adapter", self.adapter),
                ("DoRA magnitudes", self.dora_magnitude), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states),
                (act, self.activations_checkpointed if self.gradient_checkpointing else self.activations),
                ("workspace", self.workspace), ("training total", self.training_total),
                ("KV cache (inference)", self.kv_cache), ("inference total", self.inference_total)]
        return [(name, n) for name, n in rows if n is not None]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"training_total": self.training_total,
                                           "inference_total": self.inference_total}


def estimate_memory(config_or_model: Any, *, method: str = "lora", rank_plan_or_rank: RankPlan | int | None = 16,
                    batch: int = 1, seq_len: int = 2048, precision: str | None = None, optimizer: str = "adamw",
                    gradient_checkpointing: bool = True, roles: tuple[str, ...] | None = None,
                    stacks: tuple[str, ...] | None = None, attention: str = "sdpa", double_quant: bool = True,
                    use_cache: bool = True,
                    layers_to_transform: int | tuple[int, ...] | None = None,
                    input_require_grads: bool = False) -> MemoryEstimate:
    """Estimate the memory of fine-tuning (and serving) a model, by component, in bytes.

    Parameters
    ----------
    config_or_model : dict, str, PathLike, PretrainedConfig or model
        ``config.json`` as a dict, its path or folder, a hub id (downloads config.json only),
        or a transformers config/model.
    method : {"full", "lora", "qlora", "dora"}
        Default "lora".
    rank_plan_or_rank : RankPlan or int or None
        The adapter: a plan (its modules and ranks) or one rank for the modules of ``roles``.
        Ignored for ``full``. Default 16.
    batch, seq_len : int
        Sequences per step and tokens per sequence. Defaults 1 and 2048.
    precision : {"fp32", "bf16", "fp16", "mixed"}
        Dtype of the model's weights and activations. ``"mixed"`` is bf16 weights and
        activations with fp32 master weights in the optimizer [1]_. Default: "mixed" for
        ``full`` (how full fine-tuning is run: 16 bytes per parameter with AdamW; pure bf16
        Adam states, 8 bytes, lose small updates), "bf16" for the adapters (a frozen bf16
        base, the adapter in fp32).
    optimizer : {"adamw", "adamw_8bit", "sgd"}
        Default "adamw".
    gradient_checkpointing : bool
        Which activation figure ``training_total`` uses. Default True.
    roles : tuple of str, optional
        Roles that an int rank targets, as ``spectra train --roles`` takes them. Default: every linear layer of
        the blocks. On an MoE the targets are what ``spectra train`` adapts, asked of its own target selection
        (:func:`spectra.lora.train.peft_targets`): the roles' Linear modules and the routed experts' fused
        ``gate_up_proj`` (gate or up; at r) and ``down_proj`` (down), never a router; with DoRA or QLoRA the
        default roles leave the experts out, and roles that ask for them are refused, as train does.
    stacks : tuple of str, optional
        Stacks whose modules of ``roles`` an int rank targets (``architectures.STACK_NAMES``), as ``spectra train
        --stacks`` takes them; default the language model alone, as train's default (the stacks text runs through:
        a multimodal model's vision tower and projector are left unadapted). The estimate is of text-only batches,
        which run the language model alone, so ``language`` must be among them; ``("language", "vision")`` adds
        the vision tower's linears of ``roles`` (their adapters get no gradient). A stack the config lacks is
        refused.
    layers_to_transform : int or tuple of int, optional
        The layers that an int rank adapts (PEFT's ``layers_to_transform``). Default: all. A
        plan adapts the layers it names.
    attention : {"sdpa", "eager"}
        transformers' ``attn_implementation``. ``"sdpa"`` assumes a fused kernel (FlashAttention or
        memory-efficient on CUDA, the flash kernel on CPU), which is what an unpadded batch gets: it
        keeps Q, K, V, its output and an fp32 logsumexp, no s×s matrix; a layer whose sliding
        window the sequence reaches (seq_len ≥ window: Mistral's, Ministral's, Gemma 3's sliding
        layers) gets a mask, which sdpa keeps in the activations' dtype (s·p per token), with K and
        V repeated to every head. ``"eager"`` keeps the
        attention probabilities, ``heads·s`` values per token per layer: in fp32 and again in the
        activation dtype for Llama-like models (softmax in fp32, cast back), once for GPT-2 and BERT;
        Gemma 2 also keeps its logit cap's tanh (p). A family transformers runs only eagerly (Gemma 2,
        whose capped logits sdpa refuses) is estimated with "eager" whatever is asked, as transformers
        falls back when asked for no implementation; the result's ``attention`` says so.
        Default "sdpa".
    double_quant : bool
        QLoRA only: bitsandbytes' double quantisation of the NF4 absmax constants
        (``bnb_4bit_use_double_quant``, what ``spectra train`` uses) [3]_. Default True.
    use_cache : bool
        transformers' ``use_cache`` in training without checkpointing: decoders then build a
        ``DynamicCache`` in every forward, whose ``torch.cat`` copies K and V. Where Q, K and V are
        views of one fused projection without rotary embeddings (GPT-2's ``c_attn``), sdpa keeps
        the whole projection through Q and the two copies besides: 2·kv·p per token per layer
        more than without the cache. Elsewhere the copies replace tensors of their size.
        Checkpointing turns the cache off (transformers does), whatever this says. Default True,
        what a model's config and ``Trainer`` leave on.
    input_require_grads : bool
        The embedding's output requires grad (transformers' ``enable_input_require_grads``, which
        PEFT's ``prepare_model_for_kbit_training`` calls for reentrant checkpointing, its default).
        Then every block keeps its tensors; without it the blocks before the first adapted layer
        keep nothing, as no tensor there requires grad. Default False.

    Returns
    -------
    MemoryEstimate

    Notes
    -----
    With N parameters, w bytes per weight (4 fp32, else 2), p bytes per activation (4 fp32,
    else 2), n_A trainable adapter parameters, L layers, b·s tokens:

    * weights: N·w; QLoRA stores the block linears in NF4, 0.5 byte each, the rest (embeddings,
      norms, biases, LM head, which transformers leaves unquantised) in w. bitsandbytes replaces
      nn.Linear modules only: an MoE's fused experts (3-D parameters) and router stay in w.
    * quant_constants (QLoRA): per linear of n weights, ⌈n/64⌉ absmax constants and the 16-entry
      fp32 NF4 code. Without double quantisation the absmax are fp32: 4.5 bits per weight in all.
      Double-quantised [3]_ they are 1 byte each plus one fp32 per 256 of them, with a 256-entry
      fp32 code and an fp32 offset per tensor: 4.127 bits per weight.
    * adapter: n_A = Σ r·(d_in + d_out) (+ Σ d_out DoRA magnitudes [4]_), kept in fp32 (PEFT's
      ``autocast_adapter_dtype``), 4 bytes each. An MoE's fused experts take r·E·(d_in + d_out)
      per parameter, as PEFT adapts them (``_adapter_modules``).
    * gradients: one per trainable parameter in its dtype (full: w, adapters: 4).
    * optimizer_states: AdamW two moments in the parameter's dtype (PyTorch's ``zeros_like``);
      ``mixed`` full fine-tuning adds the fp32 master copy: 12 bytes/param, ZeRO's K = 12 [1]_.
      ``adamw_8bit``: 2·(1 + 4/256) bytes/param (bitsandbytes blockwise). ``sgd``: none.
    * activations: the tensors autograd saves for backward, each storage once, per token per
      block (``_block_bytes``). Autograd keeps a tensor only for a gradient, so under LoRA the
      blocks before the first adapted layer keep nothing (the frozen embedding's output needs
      none; ``input_require_grads`` makes it) and that layer keeps what follows its first
      adapted module. A block whose input requires grad keeps: each RMSNorm its input up-cast
      to fp32 and the fp32 1/rms (4h + 4), a LayerNorm its input and two fp32 statistics
      (p·h + 8), two norms per block (Gemma 2: four, the sublayers' outputs normalised too);
      attention Q, K, V and its output (sdpa; a fused projection's views keep its whole output,
      ``_qkv_bytes``), or Q, K and V repeated to every head and the probabilities (eager);
      the MLP's activation its inputs and output (SwiGLU: gate, silu(gate), up). A frozen
      linear keeps nothing: only full fine-tuning keeps the linears' inputs (and RMSNorm's
      normalised input, for its weight). With a fused GELU and no dropout that is [2]_'s
      34·s·b·h bytes per GPT layer less the two dropout masks, plus LayerNorm's statistics.
      Each LoRA/DoRA/QLoRA module adds its input cast to the adapter's fp32 for ``lora_A`` (a
      fresh copy per module from a 16-bit input; from fp32 activations the input itself, once
      per tensor) and A·x, 4·r; DoRA also the base and LoRA outputs, (p + 4)·d_out. An MoE MLP
      (transformers' grouped_mm experts) keeps its routing and, per routed copy of a token, the
      experts' tensors (``_moe_bytes``); PEFT adapts its fused experts and router by merging
      W + s·B·A into the weight in every forward, so each layer also keeps the merged weights
      (E·out·in·p per adapted parameter, whatever the tokens). The peak then comes at the loss,
      with the final norm and, per logit, the logits (p), their fp32 up-cast when p < 4 (4) and
      the fp32 log-softmax the loss keeps (4) (Gemma 2's final logit cap also its tanh's output,
      p), or in a block's backward, with an MLP-wide gradient (p·i) in flight. Not counted:
      token ids and labels, the rotary tables.
    * activations with checkpointing (transformers checkpoints each block, non-reentrant): the
      inputs b·s·h·p of the blocks from the first adapted one, then the larger of the loss's
      tensors and one block recomputed in backward (its saved tensors and the p·i in flight).
    * workspace: QLoRA dequantises one weight at a time (largest linear × p); DoRA forms
      B·A and W + s·B·A of the largest module (2 × out·in × 4).
    * kv_cache (decoder models, inference): 2·L·kv·b·s·p; encoders have none.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}.")
    if precision is None:
        precision = "mixed" if method == "full" else "bf16"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {ATTENTIONS} (transformers' attn_implementation), "
                          f"got {attention!r}.")
    for name, flag in (("double_quant", double_quant), ("use_cache", use_cache),
                       ("input_require_grads", input_require_grads)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}.")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    cfg = load_config(config_or_model)
    shape = model_shape(cfg)
    if attention == "sdpa" and not shape.sdpa:
        attention = "eager"  # what transformers runs when asked for no implementation (the result says so)
    # the causal LM spectra train loads (AutoModelForCausalLM), on the meta device: built only for an MoE's int rank
    train_model = functools.partial(_meta_model_for, cfg, str(cfg.get("model_type", "")).lower(),
                                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    notes: list[str] = []
    adapter_modules = _adapter_modules(shape, method, rank_plan_or_rank, roles, layers_to_transform,
                                       parse_stacks(stacks), train_model, notes=notes)
    if method == "qlora" and shape.experts > 1:
        routed = sum(o * i for block in map(shape.block, range(shape.layers)) for role, o, i in block.linears
                     if role in _UNQUANTISED)
        notes.append(f"QLoRA: bitsandbytes quantises nn.Linear modules only, so the routed experts and routers "
                     f"({routed:,} parameters: fused 3-D expert tensors and router weights) stay in "
                     f"{'fp32' if precision == 'fp32' else precision}")
    return _estimate(shape, method, adapter_modules, batch, seq_len, precision, optimizer,
                     gradient_checkpointing, attention, double_quant, use_cache, input_require_grads, notes)


class _Adapter(NamedTuple):
    """One adapted module: a PEFT ``lora.Linear`` (``experts`` 0), or a ``ParamWrapper`` on a parameter
    (``target_parameters``: an MoE's fused experts, ``experts`` of them at ``rank`` each, or a router's weight
    that no LoRA module can run on, 1: ``ModelShape.router_parameter``), which merges W + s·B·A into the weight
    in every forward instead of running lora_A on the input."""

    layer: int | None
    role: str | None
    rank: int
    d_in: int
    d_out: int
    experts: int = 0
    tower: bool = False  # on another tower's linear (a vision tower's): not run on text-only batches, no gradient

    @property
    def params(self) -> int:
        return self.rank * max(self.experts, 1) * (self.d_in + self.d_out)


def _adapter_modules(shape: ModelShape, method: str, plan_or_rank: Any, roles: tuple[str, ...] | None,
                     layers_to_transform: int | tuple[int, ...] | None = None,
                     stacks: tuple[str, ...] | None = None, train_model=None, *,
                     notes: list[str] | None = None) -> list[_Adapter]:
    """Every adapted module, as PEFT adapts it; empty for full fine-tuning.

    An MoE's experts are fused parameters in transformers 5 (gate_up_proj: experts × 2·ffn × hidden,
    down_proj), which PEFT adapts as ``target_parameters`` at one rank for all experts: a plan's
    experts at the largest over experts of gate's + up's rank (as spectra's PEFT config writes
    them) and of down's; a plan's router that no LoRA module can run (Mixtral's, PhiMoE's, GraniteMoE's) is
    its weight at its planned rank, as the plan's ``peft_config`` adapts it (``_block_adapter``). An int rank on
    an MoE adapts what ``spectra train`` adapts for the same method, roles and stacks
    (:func:`_trained_moe_adapters`, which asks train's target selection on the model built from the config on
    the meta device; ``train_model`` builds it): every block role's Linear modules and the experts' fused
    parameters at r each (gate_up_proj at r, not 2·r), never a router; DoRA and QLoRA leave the experts out of the
    default roles.
    """
    _check_stacks(shape, method, plan_or_rank, stacks)
    if method == "full":
        if layers_to_transform is not None:  # it would be ignored: every layer trains
            raise ConfigError("layers_to_transform picks the layers an adapter adapts; full fine-tuning trains "
                              "every layer.")
        return []
    if layers_to_transform is None:
        layers = range(shape.layers)
    else:
        layers = (layers_to_transform,) if isinstance(layers_to_transform, int) else tuple(layers_to_transform)
        if isinstance(plan_or_rank, RankPlan):
            raise ConfigError("layers_to_transform goes with an int rank; a rank plan adapts the layers it names.")
        if not layers or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < shape.layers
                                 for n in layers):
            raise ConfigError(f"layers_to_transform must name layers of this {shape.layers}-layer model "
                              f"(0 … {shape.layers - 1}), got {layers_to_transform!r}.")
    h, i, experts = shape.hidden, shape.intermediate, shape.experts
    if shape.tower_params and (isinstance(plan_or_rank, RankPlan) or layers_to_transform is not None):
        raise ConfigError(f"{shape.family}: spectra's memory model estimates full fine-tuning and an int rank on "
                          "every layer of a multimodal model; a plan's tower modules and the tower layers "
                          "layers_to_transform picks are not modelled. Pass the text_config alone to estimate the "
                          "language model.")
    adapted_towers = sorted({stack for role, _, _, stack in shape.tower_linears if stacks is not None
                             and stack_selected(stack, stacks) and role_selected(role, DEFAULT_ROLES if roles is None
                                                                                 else tuple(roles))}, key=str)
    if method in ("qlora", "dora") and adapted_towers:
        raise ConfigError(f"{shape.family}: {method} on the {', '.join(map(str, adapted_towers))} stack's linears "
                          f"(stacks {','.join(stacks)}) is not modelled: "
                          + ("a LoRA module on a 4-bit tower linear (QLoRA)" if method == "qlora"
                             else "DoRA's weight norms and transients on the tower's linears")
                          + f". Leave {', '.join(map(str, adapted_towers))} out of stacks (the default adapts the "
                            "language model alone) or estimate lora.")
    if isinstance(plan_or_rank, RankPlan):
        modules, fused = [], {}  # fused: (layer, parameter) -> expert -> rank summed over the modules it holds
        for m in plan_or_rank.modules:
            expert = m.name.partition(".experts.")[2].partition(".")[0]
            if experts > 1 and expert.isdigit():
                parameter = "down" if m.role == "down" else "gate_up"
                ranks = fused.setdefault((m.layer, parameter), {})
                ranks[expert] = ranks.get(expert, 0) + m.rank
            else:
                modules.append(_block_adapter(shape, m.layer, _planned_role(shape, m), m.rank, m.shape[1], m.shape[0]))
        for (layer, parameter), ranks in fused.items():
            d_in, d_out = (i, h) if parameter == "down" else (h, 2 * i)
            modules.append(_Adapter(layer, parameter, max(ranks.values()), d_in, d_out, experts))
        _refuse_dora_on_parameters(shape, method, modules)
        return modules
    if not isinstance(plan_or_rank, int) or isinstance(plan_or_rank, bool) or plan_or_rank < 1:
        raise ConfigError(f"method {method!r} needs a RankPlan or a positive int rank, got {plan_or_rank!r}.")
    r = plan_or_rank
    if experts > 1:  # what spectra train adapts, asked of its own target selection
        return _trained_moe_adapters(shape, method, r, roles, stacks, layers, train_model, notes=notes)
    wanted = DEFAULT_ROLES if roles is None else tuple(roles)
    block: list[_Adapter] = []
    for role, o, d_in in shape.linears:
        if not role_selected(role, wanted):
            continue
        if r > min(o, d_in):  # PEFT takes any rank
            raise ConfigError(f"rank {r} exceeds min(d_in, d_out) = {min(o, d_in)} of the {role} "
                              f"projection ({o}×{d_in}).")
        block.append(_Adapter(None, role, r, d_in, o))
    if not block:
        raise ConfigError(f"No linear layer of this {shape.family} model has a role in {wanted}; roles here: "
                          f"{sorted({r for r, _, _ in shape.linears})}.")
    modules = [m._replace(layer=layer) for layer in sorted(set(layers)) for m in block]
    if shape.tower_linears:  # layers_to_transform refused above
        for role, o, d_in, stack in shape.tower_linears:  # the other towers' linears of the roles, where stacks name them
            if stacks is not None and role_selected(role, wanted) and stack_selected(stack, stacks):
                modules.append(_Adapter(None, role, r, d_in, o, tower=True))
    return modules


def _trained_moe_adapters(shape: ModelShape, method: str, rank: int, roles: tuple[str, ...] | None,
                          stacks: tuple[str, ...] | None, layers, train_model, *,
                          notes: list[str] | None = None) -> list[_Adapter]:
    """An MoE's adapters at an int ``rank``: what ``spectra train`` adapts for the same method, roles and stacks,
    asked of its own target selection (:func:`spectra.lora.train.peft_targets`, as ``lora_config`` runs it) on the
    causal LM it loads, built from the config on the meta device (``train_model()``: :func:`_meta_model_for`'s), in
    ``layers``.

    Every Linear of the roles (default: every block role) is a ``lora.Linear`` at ``rank``; the routed experts'
    fused ``gate_up_proj`` (for gate or up, whole: at ``rank``, as a fused module is) and ``down_proj`` are PEFT
    ParamWrappers at ``rank`` per expert (``target_parameters``); a router is never adapted (no block role). DoRA and
    QLoRA leave the experts out of the default roles (PEFT's ParamWrapper takes neither) and refuse roles that ask
    for them, with train's own error (:func:`spectra.lora.train._fit_method`)."""
    from spectra.checkpoints.architectures import module_info
    from spectra.lora.train import TrainConfig, peft_targets

    model = train_model()[1] if train_model is not None else None
    if model is None:
        raise ConfigError(f"{shape.family}: transformers cannot build this MoE from its config on the meta device, "
                          "so spectra's memory model cannot ask which modules and expert parameters `spectra train` "
                          "adapts; estimate with a rank plan (--plan) instead.")
    config = TrainConfig(method=method, rank=rank, roles=None if roles is None else tuple(roles), stacks=stacks)
    modules, parameters = peft_targets(model, config, notes=notes)  # train's notes: what it leaves out, and why
    wanted, adapters = set(layers), []
    for name in modules:
        info, weight = module_info(name), model.get_submodule(name).weight
        d_out, d_in = weight.shape
        if rank > min(d_out, d_in):
            raise ConfigError(f"rank {rank} exceeds min(d_in, d_out) = {min(d_out, d_in)} of {name} "
                              f"({d_out}×{d_in}).")
        adapters.append(_Adapter(info.layer, info.role, rank, int(d_in), int(d_out)))
    for name in parameters:
        info, weight = module_info(name), model.get_parameter(name)
        if weight.dim() == 2:  # a Linear PEFT would rewrite (a dense layer's or shared experts' MLP): its weight
            d_out, d_in = weight.shape
            role = module_info(name.removesuffix(".weight")).role  # the module's role, not its weight's
            adapters.append(_Adapter(info.layer, role, rank, int(d_in), int(d_out), 1))
            continue
        if weight.dim() != 3 or info.role not in ("gate_up", "down"):
            raise ConfigError(f"{shape.family}: `spectra train` adapts {name} through its weight "
                              "(target_parameters), which spectra's memory model does not describe.")
        count, d_out, d_in = weight.shape  # PEFT's ParamWrapper: (experts, out, in), one rank-r update each
        adapters.append(_Adapter(info.layer, info.role, rank, int(d_in), int(d_out), int(count)))
    return [m for m in adapters if m.layer in wanted]


def _check_stacks(shape: ModelShape, method: str, plan_or_rank: Any, stacks: tuple[str, ...] | None) -> None:
    """Refuse a stack selection the memory model would ignore or cannot describe: with full fine-tuning or a plan
    (which adapts the modules it names), without the language model (text-only batches run it alone: an adapter
    elsewhere would train nothing), or naming a stack the config lacks."""
    if stacks is None:
        return
    if method == "full":
        raise ConfigError("stacks pick the modules an adapter adapts; full fine-tuning trains every weight.")
    if isinstance(plan_or_rank, RankPlan):
        raise ConfigError("stacks go with an int rank; a rank plan adapts the modules it names (plan the stacks "
                          "with `spectra recommend --stacks`).")
    if not stack_selected(None, stacks):
        raise ConfigError(f"stacks {','.join(stacks)}: spectra's memory model estimates training on text-only "
                          "batches, which run the language model alone, so an adapter without the language model's "
                          "modules is not modelled. Add language (e.g. language,vision) or leave stacks out.")
    lacking = missing_stacks(stacks, {None, *(stack for *_, stack in shape.tower_linears)})
    if lacking:
        raise ConfigError(f"{lacking}; leave it out.")


def _block_adapter(shape: ModelShape, layer: int | None, role: str | None, rank: int, d_in: int,
                   d_out: int) -> _Adapter:
    """A block's module adapted on its own (not fused experts), by a plan or an int rank: a ``lora.Linear``, or
    for a router whose weight PEFT adapts as a parameter (``ModelShape.router_parameter``: what the plan's
    ``peft_config`` makes of it, and all-linear where it reaches the router) a ``ParamWrapper``."""
    wrapped = role == "router" and shape.router_parameter
    return _Adapter(layer, role, rank, d_in, d_out, 1 if wrapped else 0)


def _planned_role(shape: ModelShape, module) -> str | None:
    """The memory model's role of a planned module: ``router`` for an MoE's router, which analyses name ``other``
    (Mixtral's and PhiMoE's ``block_sparse_moe.gate``): a block's (experts, hidden) weight outside its experts."""
    if shape.experts > 1 and module.role == "other" and module.layer is not None \
            and tuple(module.shape) == (shape.experts, shape.hidden):
        return "router"
    return module.role


def _refuse_dora_on_parameters(shape: ModelShape, method: str, modules: list[_Adapter]) -> None:
    wrapped = sorted({m.role for m in modules if m.experts})
    if wrapped and method == "dora":
        raise ConfigError(f"PEFT adapts this {shape.family} model's {', '.join(wrapped)} as parameters "
                          "(target_parameters), which takes no DoRA: pass roles without them (e.g. q,k,v,o) or "
                          "plan LoRA.")


def _quant_constants(numel: int, double_quant: bool) -> int:
    """Bytes of bitsandbytes' NF4 constants for one weight of ``numel`` elements [3]_."""
    blocks = math.ceil(numel / NF4_BLOCK)
    code = 16 * 4  # the NF4 code: 16 fp32 values per tensor
    if not double_quant:
        return 4 * blocks + code  # one fp32 absmax per block
    # absmax quantised to 1 byte, one fp32 per 256 of them, their 256-entry fp32 code and an fp32 offset
    return blocks + 4 * math.ceil(blocks / DQ_BLOCK) + code + 256 * 4 + 4


def _norm_bytes(shape: ModelShape, p: int, full: bool, width: int | None = None) -> int:
    """Bytes per token that one norm keeps for backward; ``full``: its weight is trained. ``width``: a norm per
    head over head_dim (Gemma 3's q_norm, k_norm) of ``width`` = heads·head_dim values a token, instead of the
    hidden size."""
    h = shape.hidden if width is None else width
    groups = 1 if width is None else width // (shape.q_dim // shape.heads)  # 1/rms per token, or per head
    if shape.norm == "layer":
        return p * h + 8  # LayerNorm keeps its input, its mean and 1/std (fp32)
    # transformers' RMSNorm up-casts its input to fp32 and keeps it, with the fp32 1/rms (b, s, 1); the weight's
    # gradient needs the normalised input, in p (Gemma's in fp32)
    return 4 * h + 4 * groups + ((4 if shape.norm == "rms_fp32" else p) * h if full else 0)


def _qkv_bytes(shape: ModelShape, p: int, cache: bool, masked: bool = False) -> int:
    """Bytes per token of the Q, K and V that sdpa keeps, each storage once.

    ``cache``: transformers' DynamicCache (``use_cache`` in training) concatenates K and V into
    copies. A fused projection's Q, K and V are views of its output, kept whole by any view
    sdpa keeps: GPT-2's Q (beside the cache's copies of K and V), Phi-3's V without the cache
    (its rotary embeddings make Q and K fresh tensors). ``masked``: the layer gets a mask (a
    sliding window the sequence reaches), with which transformers does not ask sdpa for GQA
    but repeats K and V to every query head (``repeat_kv``): fresh copies of Q's size.
    """
    q, kv = shape.q_dim, shape.kv_dim
    if masked and kv < q:
        return 3 * p * q
    if not shape.fused_qkv:
        return p * (q + 2 * kv)
    whole = q + 2 * kv  # the fused projection's output
    if shape.rotary:
        return p * (q + kv + (kv if cache else whole))
    return p * (whole + (2 * kv if cache else 0))


def _o_input_copied(shape: ModelShape, attention: str) -> bool:
    """Whether o_proj reads a copy of the attention output rather than the tensor sdpa keeps.

    transformers makes the output (b, s, heads, d)-contiguous for o_proj. Eager attention's
    is (b, heads, s, d), so a copy. sdpa's takes Q's layout (CPU flash kernel; CUDA's
    FlashAttention and cuDNN allocate it like Q): Llama's rotary Q keeps q_proj's (b, s, heads, d)
    layout, so no copy; Phi-3's, rotated from a strided view of qkv_proj's output, comes out
    (b, heads, s, d), so o_proj's input is a copy; so is GLM's, whose Q comes out of a torch.cat
    (``rotary_cat``). GPT-2's strided Q gets a (b, s, heads, d) output: no copy. (CUDA's
    memory-efficient kernel always returns (b, s, heads, d).)
    """
    return attention == "eager" or (shape.fused_qkv and shape.rotary) or shape.rotary_cat


def _block_bytes(shape: ModelShape, p: int, attention: str, seq_len: int, *, full: bool, cache: bool,
                 grad: bool = True, adapted: list[_Adapter] = (), masked: bool = False) -> tuple[int, bool, bool, int]:
    """Bytes per token that one block's autograd graph keeps for backward (each storage once), lora.Linear
    adapters aside.

    Autograd keeps a tensor only for a gradient it will compute, so what a block keeps follows
    which of its tensors require grad: ``grad``, its input does (full fine-tuning, or an adapted
    module earlier in the model), and ``adapted``, its adapted modules, whose outputs do. A
    block before the first adapted one keeps nothing; the first adapted one keeps what follows
    its first adapted module (its input norm keeps nothing). ``full``: the block's weights
    are trained, so each linear keeps its input (a frozen linear needs only its weight) and
    each RMSNorm its normalised input. ``masked``: transformers passes the layer a mask (its
    sliding window is within the sequence): sdpa converts the boolean (b, 1, s, s) mask to Q's
    dtype and keeps it, s·p per token (CUDA's memory-efficient kernel, which a mask gets, pads s
    to a multiple of 16: not counted, so on CUDA this is short by up to 15·p per token where s is
    not a multiple of 16; unchecked, no GPU here), and K, V repeated to every head (:func:`_qkv_bytes`); eager adds the
    mask to its logits, which keeps nothing. Against what transformers 5 saves (tests/test_memory.py):
    exact for Llama, Qwen2, Gemma, Gemma 2, Gemma 3, Phi-3, GPT-2, BERT, Mixtral (transformers'
    default grouped_mm experts), PhiMoE, GraniteMoE, Granite, Helium, ERNIE 4.5, Ministral, SmolLM3
    and GLM, sliding layers masked or not, from the first adapted layer on too.

    Returns the bytes, whether the block keeps o_proj's input already (sdpa keeps its output and
    o_proj reads that tensor), whether the block's output requires grad, and the bytes it keeps
    per layer whatever the tokens: the weights that PEFT's ParamWrappers merge (W + s·B·A, kept by
    the product that needs them for its input's gradient) and the factors they cast to p.
    """
    h, q, heads, s = shape.hidden, shape.q_dim, shape.heads, seq_len
    inter = shape.intermediate * shape.experts_per_token
    g = grad or full
    roles = {m.role for m in adapted if not m.experts}  # PEFT lora.Linear modules
    # PEFT ParamWrappers: an MoE's router and fused experts; a dense MLP's weights (Qwen3-MoE's dense layers,
    # DeepSeek's dense and shared MLPs, which spectra train adapts through their weights)
    wrapped = {m.role: m for m in adapted if m.experts > 1 or m.role == "router"}
    weights = {m.role: m for m in adapted if m.experts == 1 and m.role != "router"}

    def norm(requires_grad: bool) -> int:  # a norm keeps its tensors when its input requires grad
        return _norm_bytes(shape, p, full) if requires_grad else 0

    def hit(*names: str) -> bool:
        return bool(roles.intersection(names))

    post_norm = shape.family == "bert"  # BERT normalises after each sublayer, the others before (Gemma 2: both)
    total = 0 if post_norm else norm(g)
    if shape.mla:  # DeepSeek's multi-head latent attention
        attention_bytes, attention_grad = _mla_bytes(shape, p, attention, s, full=full, grad=g, hit=hit)
        total += attention_bytes
        qg = kg = vg = False  # (its own)
    else:  # attention: Q, K, V require grad from the block's input or their own adapter
        qg, kg, vg = g or hit("q", "qkv"), g or hit("k", "qkv"), g or hit("v", "qkv")
    if shape.qk_norm:  # Gemma 3's q_norm and k_norm: RMSNorms over head_dim, one 1/rms per head
        total += _norm_bytes(shape, p, full, q) * qg + _norm_bytes(shape, p, full, shape.kv_dim) * kg
    scores = qg or kg  # Q·Kᵀ and the probabilities
    if shape.mla:
        o_input_kept = False  # o_proj reads a copy of the (b, heads, s, v) output
    elif attention == "sdpa":  # the kernel keeps Q, K, V, its output and the fp32 logsumexp for any of their grads
        attention_grad = scores or vg
        if attention_grad:
            total += _qkv_bytes(shape, p, cache, masked) + p * q + 4 * heads + (p * s if masked else 0)
        o_input_kept = attention_grad and not _o_input_copied(shape, attention)
    else:
        attention_grad = scores or vg
        # Q·Kᵀ keeps K repeated to every head (for Q's grad) and Q (for K's); probabilities·V keeps V repeated
        # (for the probabilities' grad) and the probabilities (for V's)
        total += p * q * (qg + kg + scores)
        if shape.softmax_fp32:  # Llama-like: softmax in fp32, cast back to p (the same tensor when p = 4)
            if scores:
                total += heads * s * (4 + (p if shape.attn_softcap else 0))  # Gemma 2: tanh(logits / cap) too
            if vg and (p < 4 or not scores):
                total += heads * s * p
        elif scores or vg:  # GPT-2, BERT: one softmax in p
            total += heads * s * p
        o_input_kept = False  # transformers copies eager's (b, heads, s, d) output for o_proj
    o_grad = attention_grad or hit("o")
    if shape.norms == 4:  # Gemma 2 normalises the attention's output
        total += norm(o_grad)
    mid = g or o_grad  # the residual stream after attention
    total += norm(mid)  # Llama's post_attention_layernorm, GPT-2's ln_2, Gemma 2's pre-feedforward, BERT's
    per_layer = 0
    # the MLP's activation: SwiGLU keeps gate and up for gate's grad, silu(gate) for up's; a fused gate_up keeps
    # its whole output; GPT-2's and BERT's GELU its inputs (one tensor, or gelu_new's four)
    if shape.experts > 1:
        moe, per_layer, down = _moe_bytes(shape, p, full=full, grad=mid, router=hit("router"), wrapped=wrapped,
                                          lora=roles, weights=weights)
        total += moe
    elif any(role in ("gate", "gate_up") for role, _, _ in shape.linears):
        mlp, per_layer, down = _swiglu_bytes(p, h, inter, full=full, grad=mid, lora=roles, weights=weights)
        total += mlp
    else:
        activation = mid or hit("up")
        total += p * shape.mlp_saved * inter * activation
        down = activation or hit("down")
        total += p * (h + inter) if full else 0  # the inputs of up and down
    if shape.norms == 4:  # Gemma 2 normalises the MLP's output
        total += norm(down)
    out = mid or down
    if post_norm:
        total += norm(out)
    if full and not shape.mla:  # the inputs of q/k/v (one tensor) and o (sdpa's output, or a copy)
        total += p * (h + (q if _o_input_copied(shape, attention) else 0))
    return total, o_input_kept, out, per_layer


def _swiglu_bytes(p: int, h: int, width: int, *, full: bool, grad: bool, lora: set[str],
                  weights: dict) -> tuple[int, int, bool]:
    """Bytes per token that a SwiGLU MLP of ``width`` keeps (down(silu(gate(x))·up(x)); a fused gate_up alike), the
    bytes it keeps per layer, and whether its output requires grad.

    SwiGLU keeps gate and up for gate's grad and silu(gate) for up's when its input (``grad``) or a projection's
    adapter makes them require grad; full fine-tuning also the inputs of gate/up (one tensor) and down. ``lora``:
    roles of its lora.Linear modules; ``weights``: its ParamWrappers by role, each a weight W + s·B·A merged in every
    forward, which requires grad, so its product keeps its input (as full fine-tuning's does) and, where that input
    requires grad, the merged weight (p·out·in per layer).
    """
    gate = grad or bool(lora & {"gate", "gate_up"}) or "gate" in weights
    up = grad or bool(lora & {"up", "gate_up"}) or "up" in weights
    activation = gate or up
    total = p * width * (2 * gate + up)
    if full:
        total += p * (h + width)
    else:
        total += p * h * bool({"gate", "up"} & set(weights)) + p * width * ("down" in weights)
    per_layer = sum(p * m.d_in * m.d_out * (activation if role == "down" else grad) for role, m in weights.items()
                    if role in ("gate", "up", "down"))
    return total, per_layer, activation or "down" in lora or "down" in weights


def _mla_bytes(shape: ModelShape, p: int, attention: str, s: int, *, full: bool, grad: bool, hit) -> tuple[int, bool]:
    """Bytes per token that DeepSeek's multi-head latent attention keeps (arXiv:2405.04434, as transformers 5 runs
    it), and whether its output requires grad; ``grad``: its input does; ``hit(*roles)``: a lora.Linear adapts one.

    Q = q_b(RMSNorm(q_a(x))) (or q_proj(x)), split into a part without and one with rotary embeddings; the latent
    kv_a(x) splits into c (kv_lora_rank, RMSNorm'd) and the rotary key shared by the heads; kv_b(c) gives each
    head's K part and V (a view of kv_b's output). Each RMSNorm keeps its fp32 input and 1/rms when its input
    requires grad. The rotation (of the table's cos and sin) and the concatenations keep nothing per token; K is a
    fresh (b, heads, s, nope + rope) tensor and Q a concatenation, so o_proj reads a copy of the attention's output.
    sdpa (where Q's head size is V's: :func:`_activations_refused`) keeps Q, K, V (kv_b's whole output), its output
    and the fp32 logsumexp; eager keeps Q for K's grad, K for Q's, V for the probabilities', the fp32 softmax and
    its cast to p (as Llama's). Full fine-tuning also keeps the inputs of q_a/kv_a (one tensor), q_b, kv_b and o,
    and each latent norm's normalised input.
    """
    q_lora, kv_lora, nope, rope, v_dim = shape.mla
    heads, h = shape.heads, shape.hidden
    qk, kv_out, o_in = heads * (nope + rope), heads * (nope + v_dim), heads * v_dim

    def latent_norm(width: int, stored: int, requires_grad: bool) -> int:  # stored: the storage its input views
        return (4 * (width if p < 4 else stored) + 4 + (p * width if full else 0)) * requires_grad

    # at fp32 the norm keeps its input itself, and c is a view of kv_a's whole output (c and the rotary key)
    total = latent_norm(kv_lora, kv_lora + rope, grad or hit("kv_a"))
    total += latent_norm(q_lora, q_lora, grad or hit("q_a")) if q_lora else 0  # none before q_proj
    qg = grad or hit("q_a", "q_b", "q")
    kvg = grad or hit("kv_a", "kv_b")  # K (its latent part and the rotary key) and V
    if attention == "sdpa":
        total += (p * (2 * qk + kv_out + o_in) + 4 * heads) * (qg or kvg)
    else:
        scores = qg or kvg  # V, a strided view of kv_b's output, reaches the matmul as a copy
        total += p * qk * (kvg + qg) + p * o_in * scores
        total += heads * s * (4 * scores + p * (kvg and (p < 4 or not scores)))
    if full:
        total += p * (h + q_lora + kv_lora + o_in)
    return total, qg or kvg


def _moe_bytes(shape: ModelShape, p: int, *, full: bool, grad: bool, router: bool, wrapped: dict,
               lora: set[str] = frozenset(), weights: dict | None = None) -> tuple[int, int, bool]:
    """Bytes per token that an MoE MLP keeps as transformers 5 runs it (grouped_mm experts, its default), the
    bytes it keeps per layer, and whether its output requires grad.

    ``grad``: its input requires grad; ``router``: a lora.Linear adapts the router; ``wrapped``:
    PEFT ParamWrappers by role (``router``, ``gate_up``, ``down``), which make the weight they merge
    require grad, so the product keeps its input, as full fine-tuning's does. With k experts per
    token, S = k·tokens routed copies:

    * router (Mixtral's): its input (p·h) for a trained weight; for its logits' grad the fp32
      softmax (4·E), the top-k indices (8·k) and the weights' normalisation (4·k + 4). PhiMoE's
      SparseMixer (arXiv:2409.12136) picks its two experts one after the other, each by a softmax
      over the logits with the experts out of reach masked: per pick the mask (E, bool), the
      softmax (p·E), the gather's index (8) and the pick's weight (p) its custom backward keeps.
      GraniteMoE's takes the top-k of the fp32 logits (indices, 8·k) and their softmax (4·k),
      cast to weights in p. With ``input_jitter_noise`` (Phi-3.5-MoE's config: 0.01) the block and
      then its router multiply the MLP's input by uniform noise in place, and each product keeps
      its noise (p·h);
    * dispatch: the indices of three gathers (the routed copies of the input, their weights, the
      way back), 8·k each, when what they gather requires grad;
    * experts per routed copy: gate_up's input (p·h) for a trained weight, its output (p·2i) and
      silu(gate) (p·i), down's input (p·i) for a trained weight, and the product by the routing
      weight its two factors (p·h, and the weight: fp32, SparseMixer's and GraniteMoE's in p).

    Per layer: grouped_mm's offsets (4·E) and each ParamWrapper's merged weight in p (E·out·in,
    when the product needs it for its input's gradient), beside the factors it casts to p for
    the merge when p < 4 (E·r·(in + out)).
    """
    h, i, k, experts = shape.hidden, shape.intermediate, shape.experts_per_token, shape.experts
    router_w, gate_up_w, down_w = (full or role in wrapped for role in ("router", "gate_up", "down"))
    logits = grad or router_w or router  # the router's logits, and so the routing weights, require grad
    experts_in = grad or gate_up_w  # gate_up's output
    down_out = experts_in or down_w
    if shape.sparsemixer:
        routing, weight = k * (experts * (1 + p) + 8 + p), p
    elif shape.topk_softmax:
        routing, weight = 12 * k, p
    else:  # Mixtral's: an fp32 softmax (DeepSeek-V3: sigmoid), the top-k indices, normalised; Qwen3-MoE, DeepSeek
        # normalise only with norm_topk_prob (DeepSeek-V2 never) and Qwen3-MoE casts the weights to p; DeepSeek-V2's
        # group_limited_greedy keeps the mask of the groups it drops
        routing = 4 * experts + 8 * k + (4 * k + 4) * shape.routing_norm + experts * shape.router_group_mask
        weight = p if shape.routing_cast else 4
    jitter = 2 * p * h * shape.input_jitter  # the two noise tensors
    # the router's input for its trained weight: DeepSeek's takes it cast to fp32 (a copy when p < 4; at fp32 the
    # input itself, which its shared experts keep)
    router_input = (4 * h if p < 4 else 0) if shape.router_fp32 else p * h
    total = router_input * router_w + (routing + 8 * k + p * h * k) * logits + (8 * k + jitter) * grad
    total += p * h * k * gate_up_w + 3 * p * i * k * experts_in + p * i * k * down_w
    total += weight * k * down_out + 8 * k * (logits or down_out)
    per_layer = 4 * experts if (grad or gate_up_w or down_w) else 0
    for role, m in wrapped.items():
        needed = {"router": grad, "gate_up": grad, "down": experts_in}[role]  # the input of its product
        per_layer += p * max(m.experts, 1) * m.d_in * m.d_out * needed
        if p < 4 and m.experts > 1:  # PEFT casts the experts' factors to the weight's dtype for one baddbmm
            per_layer += p * m.experts * m.rank * (m.d_in + m.d_out)
    shared_out = False
    if shape.shared_intermediate:  # DeepSeek's shared experts: a SwiGLU MLP on every token, added to the experts'
        shared, shared_layer, shared_out = _swiglu_bytes(p, h, shape.shared_intermediate, full=full, grad=grad,
                                                         lora=lora, weights=weights or {})
        total, per_layer = total + shared, per_layer + shared_layer
    return total, per_layer, logits or down_out or shared_out


# the tensor a module reads, by role: modules that read one tensor share it when LoRA keeps it as is (fp32)
_INPUT_OF = {"q": "attention input", "k": "attention input", "v": "attention input", "qkv": "attention input",
             "o": "attention output", "gate": "mlp input", "up": "mlp input", "gate_up": "mlp input",
             "router": "mlp input", "q_a": "attention input", "kv_a": "attention input"}


def _adapter_bytes(modules: list[_Adapter], p: int, o_input_kept: bool, dora: bool) -> int:
    """Bytes per token that one layer's adapted modules add to its saved tensors.

    PEFT runs ``lora_A`` on its input cast to the adapter's fp32 and keeps that: a fresh copy per
    module from a 16-bit input; with fp32 activations the input itself, kept once however many
    modules read it, and not at all for ``o`` when the block keeps its input already
    (``o_input_kept``: sdpa keeps its output and o_proj reads it, not a copy). ``lora_B``
    keeps A·x (r values). DoRA also keeps each module's base output (p) and LoRA output (fp32)
    for its magnitude/direction backward: (p + 4)·d_out.
    """
    total, shared = 0, set()
    for m in modules:
        if m.experts:  # a ParamWrapper merges its update into the weight: the block's own terms count it
            continue
        total += 4 * m.rank + ((p + 4) * m.d_out if dora else 0)
        if m.role == "embed":  # PEFT's Embedding looks A up by token id: it keeps the ids, no input
            continue
        source = _INPUT_OF.get(m.role)
        if p < 4 or source is None:
            total += 4 * m.d_in
        elif source not in shared and not (source == "attention output" and o_input_kept):
            shared.add(source)
            total += 4 * m.d_in
    return total


def _activations_refused(shape: ModelShape, attention: str) -> str | None:
    """Why the activations cannot be estimated for this attention, or None. sdpa on multi-head latent attention
    whose Q and K heads are wider than V's (DeepSeek's 192 against 128): FlashAttention takes one head size, so
    CUDA runs another kernel, and the CPU's flash kernel does not take it either (it falls back to the math kernel,
    which keeps the s×s probabilities): what CUDA's kernel keeps is unchecked here."""
    if not shape.mla or attention != "sdpa":
        return None
    _, _, nope, rope, v_dim = shape.mla
    if nope + rope == v_dim:
        return None
    return (f"{shape.family}'s multi-head latent attention under sdpa: its Q and K heads of {nope + rope} values "
            f"against V's {v_dim} keep FlashAttention from running it (CUDA picks the memory-efficient kernel, the "
            "CPU the math one, which keeps the s×s probabilities), and what that kernel saves has not been checked "
            "against autograd; attention='eager' (--attention eager) is estimated. The weights, adapter, gradients, "
            "optimizer states and KV cache are estimated")


def _activations(shape: ModelShape, blocks: list[ModelShape], method: str, adapter_modules: list[_Adapter], p: int,
                 tokens: int, seq_len: int, attention: str, use_cache: bool,
                 input_require_grads: bool) -> tuple[int, int]:
    """(activations without, with gradient checkpointing), bytes: see :func:`estimate_memory`'s notes. ``blocks``:
    each layer's :meth:`ModelShape.block`."""
    # activations, bytes per token: the blocks, the adapters (by layer), the final norm and the LM head
    full, dora = method == "full", method == "dora"
    by_layer: dict = {}
    for module in adapter_modules:
        if not module.tower:  # another tower's modules never run on text-only batches
            by_layer.setdefault(module.layer, []).append(module)
    # blocks keep tensors from the first one whose input or adapters require grad: all with full fine-tuning,
    # a trained embedding or enable_input_require_grads, else from the first adapted layer (autograd keeps
    # nothing before it; non-reentrant checkpointing keeps no input there either)
    grad = full or input_require_grads or any(module.role == "embed" and not module.tower for module in adapter_modules)
    per_token = recomputed = 0
    kept_inputs = per_layer = 0
    for layer in range(shape.layers):
        modules = by_layer.get(layer, [])
        if not (grad or modules):
            continue
        # sdpa gets a mask in a layer whose sliding window the sequence reaches (transformers' masking_utils)
        masked = attention == "sdpa" and bool(shape.windows) and 0 < shape.windows[layer] <= seq_len
        # transformers builds a DynamicCache in a decoder's training forward while use_cache is on; under
        # checkpointing it turns the cache off
        block, o_kept, out, merged = _block_bytes(blocks[layer], p, attention, seq_len, full=full, grad=grad,
                                                  cache=use_cache and shape.causal, adapted=modules, masked=masked)
        again, o_kept_again, _, _ = _block_bytes(blocks[layer], p, attention, seq_len, full=full, grad=grad,
                                                 cache=False, adapted=modules, masked=masked)
        per_token += block + _adapter_bytes(modules, p, o_kept, dora)
        per_layer += merged
        recomputed = max(recomputed, tokens * (again + _adapter_bytes(modules, p, o_kept_again, dora)) + merged)
        kept_inputs += 1
        grad = out
    head = final = 0
    if shape.causal:
        h = shape.hidden
        if grad:  # the final norm, and the head's input for its gradient
            final = _norm_bytes(shape, p, full) + (p * h if full else 0)
        # at the loss: the logits (p), their fp32 up-cast (a no-op when p = 4) and the fp32 log-softmax
        # the loss keeps (measured peaks of 10.0 and 8.0 bytes per logit at bf16 and fp32); Gemma 2's cap
        # cap·tanh(logits / cap) keeps the tanh's output beside the logits it returns (p)
        head = tokens * shape.vocab * (p + (4 if p < 4 else 0) + 4 + (p if shape.logit_softcap else 0))
    # the peak comes at the loss (every block's tensors, the final norm's and the head's) or in a block's
    # backward, by when the head's are freed and a gradient of the MLP's width is in flight (measured: the
    # checkpointed peak of a block recomputed in backward exceeds its saved tensors by 1.0–1.2 of these)
    in_flight = max(p * (block.intermediate * block.experts_per_token + block.shared_intermediate) for block in blocks)
    final += _adapter_bytes(by_layer.get(None, []), p, False, dora)  # modules outside the blocks: a LoRA head
    at_loss = tokens * final + head
    activations = tokens * per_token + per_layer + max(at_loss, tokens * in_flight)
    activations_ckpt = (tokens * kept_inputs * shape.hidden * p  # the block inputs that checkpointing keeps
                        + max(at_loss, recomputed + tokens * in_flight))
    return activations, activations_ckpt


def _estimate(shape: ModelShape, method: str, adapter_modules: list, batch: int, seq_len: int, precision: str,
              optimizer: str, checkpointing: bool, attention: str, double_quant: bool,
              use_cache: bool, input_require_grads: bool, notes: list[str] = ()) -> MemoryEstimate:
    w = 4 if precision == "fp32" else 2          # bytes per frozen/base weight
    p = 4 if precision == "fp32" else 2          # bytes per activation
    tokens = batch * seq_len
    n = shape.params

    # weights and QLoRA constants: bitsandbytes replaces only nn.Linear modules (an MoE's fused experts and its
    # router, a parameter or a Linear subclass, stay in w); parameters transformers keeps in fp32 take 4 bytes
    quant = 0
    blocks = [shape.block(layer) for layer in range(shape.layers)]
    if method == "qlora":
        quantised = [(o, i) for block in blocks for role, o, i in block.linears if role not in _UNQUANTISED]
        nf4 = sum(o * i for o, i in quantised + list(shape.tower_quantised))  # the towers' too (never run: no workspace)
        weights = math.ceil(nf4 / 2) + (n - nf4) * w
        quant = sum(_quant_constants(o * i, double_quant) for o, i in quantised + list(shape.tower_quantised))
    else:
        weights = n * w
    weights += shape.fp32_params * (4 - w)

    # adapters (fp32), DoRA magnitudes, trainable count
    adapter_params = sum(m.params for m in adapter_modules)
    dora_params = sum(m.d_out for m in adapter_modules) if method == "dora" else 0
    trainable = n - shape.tower_params if method == "full" else adapter_params + dora_params
    # what a text-only step gives a gradient (and AdamW states): not the adapters on another tower's linears
    stepped = trainable - sum(m.params for m in adapter_modules if m.tower)

    # gradients and optimizer states
    if method == "full":
        grad_bytes = w
        opt_bytes = {"adamw": 2 * w, "adamw_8bit": 2 * (1 + 4 / ADAM8_BLOCK), "sgd": 0}[optimizer]
        if precision == "mixed":
            opt_bytes = 4 + (8 if optimizer == "adamw" else opt_bytes)  # fp32 master copy (+ fp32 moments)
    else:
        grad_bytes = 4
        opt_bytes = {"adamw": 8, "adamw_8bit": 2 * (1 + 4 / ADAM8_BLOCK), "sgd": 0}[optimizer]
    gradients = stepped * grad_bytes
    optimizer_states = math.ceil(stepped * opt_bytes)
    if method == "full" and w < 4:  # an fp32 parameter's gradient and AdamW moments are fp32 too (its own master)
        gradients += shape.fp32_params * (4 - w)
        optimizer_states += shape.fp32_params * ({"adamw": 8, "sgd": 0}.get(optimizer, opt_bytes) - opt_bytes)

    notes = list(notes)
    refused = _activations_refused(shape, attention)
    if refused:  # said, not guessed: no activations, so no training total
        activations = activations_ckpt = None
        notes.append(f"activations not estimated: {refused}")
    else:
        activations, activations_ckpt = _activations(shape, blocks, method, adapter_modules, p, tokens, seq_len,
                                                     attention, use_cache, input_require_grads)

    # transient workspace of the largest module
    workspace = 0
    if method == "qlora":
        workspace += max(o * i for o, i in quantised) * p
    if method == "dora":
        # PEFT forms B·A as lora_B(lora_A(I)) with an fp32 d_in×d_in identity, beside fp32 copies of the
        # base weight and of W + s·B·A and their norms: ~4·(d_in² + 4·d_in·d_out) for the largest module
        # (a 704→256 DoRA Linear peaked at 4.90 MB, this gives 4.87 MB)
        workspace += max((4 * (m.d_in * m.d_in + 4 * m.d_in * m.d_out) for m in adapter_modules), default=0)

    kv_cache = shape.layers * (shape.cache_width or 2 * shape.kv_dim) * tokens * p if shape.causal else 0
    return MemoryEstimate(method=method, precision=precision, optimizer=optimizer, batch=batch, seq_len=seq_len,
                          gradient_checkpointing=checkpointing, attention=attention, double_quant=double_quant,
                          use_cache=use_cache,
                          params=n, trainable_params=trainable, weights=weights, quant_constants=quant,
                          adapter=adapter_params * 4, dora_magnitude=dora_params * 4, gradients=gradients,
                          optimizer_states=optimizer_states, activations=activations,
                          activations_checkpointed=activations_ckpt, workspace=workspace, kv_cache=kv_cache,
                          notes=tuple(notes))


def format_bytes(n: float) -> str:
    """Bytes as GiB/MiB/KiB with three significant figures (1 GiB = 2³⁰ bytes); 1000 or more of a
    unit as a whole number ("1017 MiB", "2048 GiB", not "1.02e+03 MiB")."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if abs(value) >= 999.5 else f"{value:.3g} {unit}"  # .3g: 999.5 → 1e+03
    return f"{int(n)} B"
