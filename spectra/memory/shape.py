"""The model a ``config.json`` describes, as the memory model needs it: :class:`ModelShape` and :func:`model_shape`.

Each family's blocks (their linear layers, norms, attention and MoE layout) are read off the config as transformers 5
builds them; families it would count wrong are refused with the reason (:func:`model_shape`). transformers' base
model built from the config on the meta device checks the count and each block's linear layers, every family's
(:func:`_refuse_other_blocks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Mapping

from spectra.checkpoints.architectures import module_info
from spectra.errors import ConfigError
from spectra.memory.config import _config_object


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from ``config.json``.

    ``linears`` lists one block's linear layers as ``(role, out, in)``, MoE experts expanded, with
    the roles of ``spectra.checkpoints.architectures`` (``q k v o qkv gate up down``; ``router``).
    ``other_params`` counts everything that is not a block linear nor the LM head (embeddings,
    norms, biases, pooler): QLoRA keeps these in 16 bits, like transformers' bitsandbytes path, but for the
    linears among them that bitsandbytes converts (``outside_quantised``: BERT's pooler).
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
    # its weight in fp32 (Gemma); "layer": LayerNorm (GPT-2, BERT); "layer_fp32": a LayerNorm without weight or bias
    # on its input up-cast to fp32 (OLMo's OlmoLayerNorm); "cohere": CohereLayerNorm (a weight, no bias; fp32
    # elementwise ops); "gemma4": Gemma4RMSNorm (x·pow(mean(x²) + eps, −0.5) on the fp32 input: one more fp32 value
    # a row kept than rsqrt's; its weight, not 1 + weight, applied in fp32)
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
    qk_norm: bool = False  # Gemma 3, Qwen3 normalise each head's Q and K (RMSNorm over head_dim) before the rotation
    # OLMo 2 normalises Q and K across all heads instead (q_norm over q_dim, k_norm over kv_dim: one 1/rms a token)
    qk_norm_across_heads: bool = False
    # OLMo 2 normalises each sublayer's output before the residual (post_attention, post_feedforward) and not its
    # input: the attention and the MLP read the residual stream itself
    output_norms_only: bool = False
    # OLMo's clip_qkv: Q, K and V clamped in place (clamp_), which keeps a copy of each for its gradient
    clip_qkv: bool = False
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
    # (spectra.checkpoints.targets.bnb_4bit_linears: exactly nn.Linear or Conv1D, outside its keep list; not a
    # MultiheadAttention's out_proj)
    tower_quantised: tuple[tuple[int, int], ...] = ()
    # linears outside the blocks that bitsandbytes stores in 4 bits too, counted in other_params (BERT's pooler.dense:
    # the base model's last module, yet not on transformers' keep list) and run in every forward
    outside_quantised: tuple[tuple[int, int], ...] = ()
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
    # a parallel block (GPT-NeoX's use_parallel_residual, Phi's, Falcon's parallel_attn): the attention and the MLP
    # both read the block's input, through one norm (``norms`` 1: Phi, Falcon-7B) or a norm each (2: GPT-NeoX, Falcon
    # 40B/180B's ln_attn and ln_mlp), and their outputs are added to it
    parallel: bool = False
    # Falcon's new decoder architecture and multi-query layout (transformers < 5.25) index K and V out of
    # query_key_value's output into tensors of their own (copies, not views of the projection's output), the new
    # architecture's broadcast to every query head
    split_copies: bool = False
    # Falcon's Q keeps query_key_value's (b, s, heads, d) layout through its rotation, so sdpa's output does too and o
    # reads it, not a copy; and Falcon always materialises its causal mask (allow_is_causal_skip=False), which sdpa
    # keeps in the activations' dtype, as a sliding layer's (transformers' sdpa then repeats K and V to every head)
    falcon_attention: bool = False
    # sdpa runs its math kernel: Falcon-7B's one K/V head handed to it without enable_gqa (transformers < 5.25)
    sdpa_math: bool = False
    # the block linears' class where transformers' bitsandbytes load leaves it in 16 bits (it converts exactly
    # nn.Linear: Falcon's FalconLinear, a subclass), so QLoRA would quantise nothing
    unquantised_class: str = ""
    # Apertus' xIELU as transformers' Python fallback runs it (without the xielu CUDA wheel): ``mlp_saved`` p-sized
    # tensors and its torch.where's bool mask (1 byte a value), and under full fine-tuning expm1(min(x, eps)) − x for
    # alpha_n's gradient
    xielu: bool = False
    # Gemma 4's full-attention layers, a block of their own (global_head_dim, num_global_key_value_heads; with
    # attention_k_eq_v one k_proj, role kv, gives the keys and the values): those layers, their linears and their
    # (q_dim, kv_dim) (:meth:`block`); ``linears``, ``q_dim`` and ``kv_dim`` are then the sliding layers'
    global_layers: tuple[int, ...] = ()
    global_linears: tuple[tuple[str, int, int], ...] = ()
    global_dims: tuple[int, int] = (0, 0)
    # Gemma 4 normalises V per head by an RMSNorm without weight (v_norm)
    v_norm: bool = False
    # dropout probabilities the config sets (its family's defaults where config.json leaves them out) whose masks the
    # activations leave out, as (key, value): Seed-OSS's attention_dropout and residual_dropout (a note says so)
    dropouts: tuple[tuple[str, float], ...] = ()
    # JetMoE's mixture of attention experts (queries and outputs by routed experts; _jetmoe), whose blocks'
    # activations are activations._jetmoe_bytes'
    attention_experts: bool = False

    @property
    def one_kv_head(self) -> bool:
        """Multi-query attention: one K/V head for several query heads, which transformers' repeat_kv repeats as a
        stride-0 view of itself (more K/V heads are repeated into copies)."""
        return self.q_dim > self.kv_dim and self.kv_dim * self.heads == self.q_dim

    @property
    def fused_qkv(self) -> bool:
        """One linear computes Q, K and V (GPT-2's c_attn, Phi-3's qkv_proj), which are views of its output."""
        return any(role == "qkv" for role, _, _ in self.linears)

    def block(self, layer: int) -> ModelShape:
        """The shape of block ``layer``: this one, or for a dense layer of an MoE (``dense_layers``) one without
        experts, of ``dense_linears`` and ``dense_intermediate``; for a Gemma 4 full-attention layer
        (``global_layers``) one of ``global_linears`` and ``global_dims``."""
        if layer in self.global_layers:
            q_dim, kv_dim = self.global_dims
            return dataclasses.replace(self, linears=self.global_linears, q_dim=q_dim, kv_dim=kv_dim,
                                       global_layers=())
        if layer not in self.dense_layers:
            return self
        return dataclasses.replace(self, linears=self.dense_linears, intermediate=self.dense_intermediate,
                                   experts=1, experts_per_token=1, shared_intermediate=0, router_parameter=False,
                                   dense_layers=())

    def cached_tokens(self, seq_len: int) -> int:
        """Tokens of one sequence of ``seq_len`` that transformers' DynamicCache holds, summed over the layers: a
        sliding layer's (``windows``: DynamicSlidingWindowLayer) keeps the last window − 1 once the sequence is
        longer (the token the next step adds completes its window), a full-attention layer every token."""
        return sum(self._layer_cached_tokens(layer, seq_len) for layer in range(self.layers))

    def _layer_cached_tokens(self, layer: int, seq_len: int) -> int:
        window = self.windows[layer] if self.windows else 0
        # DynamicSlidingWindowLayer keeps keys[:, :, -window + 1:]: every token under a window of 1 (a slice from 0)
        return min(seq_len, window - 1) if window > 1 else seq_len

    def cached_values(self, seq_len: int) -> int:
        """Values of one sequence of ``seq_len`` that transformers' DynamicCache holds, summed over the layers:
        :meth:`cached_tokens` times K's and V's widths (``cache_width`` where set), each layer's own (Gemma 4's
        full-attention layers: :meth:`block`)."""
        if self.cache_width:
            return self.cached_tokens(seq_len) * self.cache_width
        return sum(self._layer_cached_tokens(layer, seq_len) * 2 * self.block(layer).kv_dim
                   for layer in range(self.layers))

    @property
    def linear_params(self) -> int:
        """The blocks' weight matrices (experts expanded, routers included), every layer's own."""
        moe = sum(o * i for _, o, i in self.linears)
        dense = sum(o * i for _, o, i in self.dense_linears)
        full = sum(o * i for _, o, i in self.global_linears) - moe
        return (self.layers - len(self.dense_layers)) * moe + len(self.dense_layers) * dense \
            + len(self.global_layers) * full

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params + self.head_params + self.tower_params


def model_shape(config: Mapping, *, models=None) -> ModelShape:
    """Read a Llama-like (Llama, Mistral, Qwen2, StarCoder2, Mixtral …), GPT-2, BERT, GPT-NeoX, Phi or Falcon
    ``config.json`` dict.

    Other ``model_type`` values with Llama's (GPT-2's, BERT's) keys are read as Llama-like (stated in the
    result's ``family``) where transformers' base model built from the config holds the parameters
    counted, and refused where it holds others or cannot be built from the config (:func:`_refuse_other_blocks`);
    a model_type this transformers does not know is read as before. Parameter counts match ``sum(p.numel())`` of the
    transformers model (tied weights once); BERT counts ``BertModel`` (encoder + pooler, no task head). A
    multimodal config (a nested ``text_config``: Gemma 3's) is its language model plus the other towers' parameters,
    held frozen (:func:`_with_other_towers`). ``models``: the command's :class:`~spectra.ranks.plan.MetaModels`,
    which builds the base model where needed (a model of the config built already for the plan holds it).
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
    base_model = functools.cache(functools.partial(_meta_model_for, cfg, mtype, models=models))
    if mtype in _GEMMA4_TEXT:  # before the MoE check: its config.json carries num_experts (null) whether or not
        shape = _gemma4(cfg, mtype)
        _refuse_other_blocks(cfg, mtype, shape, base_model)
        return shape
    if mtype in _OWN_DESIGN_REFUSED:  # before the key reads and the MoE check, whose reasons would not be its own
        raise ConfigError(f"model_type {mtype}: {_OWN_DESIGN_REFUSED[mtype]}, which spectra's memory model does "
                          f"not describe; it reads {_DESCRIBED}.")
    if mtype == "jetmoe":  # Mixtral's keys (num_local_experts), its own blocks
        shape = _jetmoe(cfg, mtype)
        _refuse_other_blocks(cfg, mtype, shape, base_model)
        return shape
    try:
        if mtype not in _OWN_EXPERT_SIZES and ("num_experts" in cfg and "num_local_experts" not in cfg
                                               or "moe_intermediate_size" in cfg):
            raise ConfigError(f"model_type {mtype}: a mixture of experts configured by num_experts or "
                              "moe_intermediate_size (Qwen2-MoE, OLMoE, …: expert sizes of their own, shared "
                              "experts), which spectra's memory model does not describe; it reads Mixtral-style MoE "
                              "(num_local_experts, experts of intermediate_size), Qwen3-MoE and DeepSeek-V2/V3.")
        if mtype in _MOE_COUNTED_WRONG:
            raise ConfigError(f"model_type {mtype}: {_MOE_COUNTED_WRONG[mtype]}, which spectra's memory model "
                              "would count wrong; it reads Mixtral-style MoE (Mixtral, MiniMax, PhiMoE, GraniteMoE), "
                              "Qwen3-MoE, DeepSeek-V2/V3 and JetMoE.")
        # a config.json without layer_types gets the family's (MiniMax: lightning attention every other layer)
        layer_types = cfg.get("layer_types") or (getattr(_config_object(mtype), "layer_types", None) if mtype else None)
        other_layers = sorted(set(layer_types or ()) - _ATTENTION_LAYERS)
        if other_layers and mtype != "gpt2" and "n_embd" not in cfg and "type_vocab_size" not in cfg:
            # transformers 5 calls every recurrent mixer linear_attention: Mamba's state-space layers too
            beside = "beside attention" if set(layer_types) & _ATTENTION_LAYERS else "and no attention layer"
            raise ConfigError(f"model_type {mtype}: layers of type {', '.join(map(str, other_layers))} {beside} "
                              "(linear_attention is transformers' name for a recurrent mixer: a Mamba state-space "
                              "layer, MiniMax's lightning attention, …), whose weights and activations spectra's "
                              "memory model does not describe; it reads models of attention layers "
                              f"({', '.join(sorted(_ATTENTION_LAYERS))}).")
        if mtype in _NOT_LLAMA_LIKE:
            raise ConfigError(f"model_type {mtype}: its blocks differ from Llama's, GPT-2's and BERT's (parallel "
                              "attention, other MLPs, …), which spectra's memory model does not describe; it reads "
                              f"{_DESCRIBED}.")
        if mtype in _GELU_FAMILIES:
            shape = _GELU_FAMILIES[mtype](cfg, mtype)
        elif mtype == "gpt2" or "n_embd" in cfg:
            shape = _gpt2(cfg)
        elif mtype == "bert" or "type_vocab_size" in cfg:
            shape = _bert(cfg)
        elif mtype in _MLA:
            shape = _deepseek(cfg, mtype, base_model)
        else:
            shape = _llama(cfg, mtype, base_model)
    except KeyError as err:
        if isinstance(cfg.get("text_config"), Mapping):  # PaliGemma's: its projection width as hidden_size on top
            raise ConfigError(f"model_type {mtype or '?'}: a multimodal config whose top level carries "
                              f"{', '.join(sorted(_LANGUAGE_KEYS & set(cfg)))} of its own beside its text_config, "
                              "which spectra's memory model does not read as a multimodal model (it reads those whose "
                              "text_config alone describes the language model: Gemma 3, LLaVA, Qwen2-VL, …). Pass the "
                              "text_config alone to estimate the language model.") from None
        raise _unread_config(mtype, err.args[0]) from None
    except TypeError:  # a size of another kind: a list per stage (CLAP audio's heads), a mapping (LXMERT's layers),
        # none (ESM's default vocabulary)
        raise _unread_config(mtype, None) from None
    if not all(type(n) is int for n in (shape.hidden, shape.layers, shape.heads, shape.intermediate, shape.vocab)):
        raise _unread_config(mtype, None)  # Gemma 3n's intermediate_size: a list, one width a layer
    if mtype:  # every family's, those the tests check too: a user's config may set what they do not (GPT-2's
        # add_cross_attention); ~10-30 ms a build once transformers' modelling is imported (_meta_model_for)
        _refuse_other_blocks(cfg, mtype, shape, base_model)
    return shape


def _unread_config(mtype: str, key: str | None) -> ConfigError:
    """Why a config.json whose keys the memory model could not read is refused: its ``key`` missing (None: a size of
    another kind than one int). A family transformers knows whose own default config lacks the key too (DistilBERT's
    ``dim`` for hidden_size, a vision tower's) or holds sizes of another kind (Gemma 3n's intermediate_size per
    layer) is an architecture the memory model does not describe; a config of a family whose default has the key as
    one int (or of one transformers does not know) lacks it, or holds it wrong."""
    described = f"reads {_DESCRIBED}"
    default = _config_object(mtype) if mtype else None
    default = default.to_dict() if default is not None else None
    if default is not None and (key not in default if key is not None
                                else any(type(default[k]) is not int for k in _LANGUAGE_KEYS & set(default))):
        found = ("sizes of other kinds than one number (a list per layer or stage, a mapping, none) where its hidden "
                 "size, layers, heads, MLP width and vocabulary are read" if key is None else f"no {key!r}, as "
                 f"transformers' default {mtype} config has none: it names its sizes otherwise")
        return ConfigError(f"model_type {mtype}: an architecture spectra's memory model does not describe (its "
                           f"config.json holds {found}); it {described}.")
    if key is None:
        return ConfigError(f"config.json of model_type {mtype or '?'} holds sizes of other kinds than one number "
                           "where its hidden size, layers, heads, MLP width and vocabulary are read; spectra's "
                           f"memory model {described}.")
    return ConfigError(f"config.json of model_type {mtype or '?'} lacks {key!r}; spectra's memory model {described}.")


# Gemma 4's language models: gemma4's text_config (and its assistants') read by _gemma4; gemma4_unified's refused
_GEMMA4_TEXT = frozenset({"gemma4_text", "gemma4_unified_text"})


def _gemma4(cfg: dict, mtype: str) -> ModelShape:
    """A Gemma 4 language model (``gemma4_text``), as transformers 5's Gemma4TextModel holds and runs it.

    Gemma 3's blocks (input, post-attention, pre- and post-feedforward RMSNorms; a GELU-gated MLP; Q and K normalised
    per head; sliding layers by ``layer_types``; the final logits capped by ``final_logit_softcapping``) with: the
    full-attention layers' own head size and, with ``attention_k_eq_v``, KV heads (``per_layer_config``, from
    ``global_head_dim`` and ``num_global_key_value_heads``: :meth:`ModelShape.block`); under ``attention_k_eq_v`` no
    v_proj in a full-attention layer, whose k_proj (role kv) gives K and V alike; V normalised per head by an RMSNorm
    without weight (``v_norm``); attention scaled by 1; a ``layer_scalar`` buffer (no parameter). Gemma4RMSNorm takes
    x·pow(mean(x²) + eps, −0.5) of its input up-cast to fp32 and applies its weight (not 1 + weight) in fp32
    (norm ``gemma4``). Per-layer embeddings (``hidden_size_per_layer_input``), KV sharing (``num_kv_shared_layers``),
    the MoE block (``enable_moe_block``) and bidirectional attention are refused, naming the key."""
    filled = _config_object(mtype, cfg)
    if mtype != "gemma4_text" or filled is None:
        raise ConfigError(f"model_type {mtype}: " + ("transformers' Gemma4TextConfig cannot be built from this "
                                                     "config.json, which spectra's memory model reads through it"
                                                     if mtype == "gemma4_text" else
                                                     "Gemma 4 unified's language model, whose blocks spectra's memory "
                                                     "model has not checked against transformers' (it reads "
                                                     "gemma4_text: Gemma 4's)") + ".")
    refused = {"hidden_size_per_layer_input": "per-layer embeddings (a second embedding table, a projection of the "
                                              "embeddings and two Linears per block, and the tensors they keep)",
               "num_kv_shared_layers": "the last layers reuse earlier layers' keys and values (no k/v projections "
                                       "there, use_double_wide_mlp's wider MLP, a smaller KV cache)",
               "enable_moe_block": "routed experts beside the dense MLP (Gemma4TextRouter, Gemma4TextExperts)",
               "use_bidirectional_attention": "attention without the causal mask"}
    for key, what in refused.items():
        if getattr(filled, key, None):
            raise ConfigError(f"model_type {mtype}: {key} {getattr(filled, key)!r}: {what}, whose weights and saved "
                              "tensors spectra's memory model does not describe for Gemma 4; it reads Gemma 4's "
                              f"dense text models without it ({key} 0 or null). `spectra train` trains it.")
    if filled.hidden_activation != "gelu_pytorch_tanh":
        raise ConfigError(f"model_type {mtype}: hidden_activation {filled.hidden_activation!r}, whose saved tensors "
                          "spectra's memory model does not describe for Gemma 4; it reads gelu_pytorch_tanh.")
    h, layers, heads = filled.hidden_size, filled.num_hidden_layers, filled.num_attention_heads
    inter, vocab = filled.intermediate_size, filled.vocab_size
    layer_types = list(filled.layer_types[:layers])
    bias = bool(filled.attention_bias)

    def layout(layer: int) -> tuple[int, int, bool]:  # head_dim, KV heads, whether k_proj gives V too
        per_layer = filled.per_layer_config[layer]
        return (per_layer.head_dim, per_layer.num_key_value_heads,
                bool(filled.attention_k_eq_v) and layer_types[layer] != "sliding_attention")

    def linears(head_dim: int, kv_heads: int, k_eq_v: bool) -> tuple[tuple[str, int, int], ...]:
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        keys = (("kv", kv_dim, h),) if k_eq_v else (("k", kv_dim, h), ("v", kv_dim, h))
        return (("q", q_dim, h), *keys, ("o", h, q_dim), ("gate", inter, h), ("up", inter, h), ("down", h, inter))

    layouts = [layout(layer) for layer in range(layers)]
    kinds = list(dict.fromkeys(layouts))
    if len(kinds) > 2 or len(kinds) == 2 and len({layouts[i] for i in range(layers)
                                                  if layer_types[i] == "full_attention"}) != 1:
        raise ConfigError(f"model_type {mtype}: per_layer_config gives its layers {len(kinds)} attention layouts "
                          "(head_dim, num_key_value_heads), where spectra's memory model reads Gemma 4's two: the "
                          "sliding layers' and the full-attention layers'.")
    full = {layouts[i] for i in range(layers) if layer_types[i] == "full_attention"}
    main = next((kind for kind in kinds if kind not in full), kinds[0])  # the sliding layers' (or the only one)
    other = next((kind for kind in kinds if kind != main), None)
    per_layer = 0
    for head_dim, kv_heads, k_eq_v in layouts:  # four norms of h, q_norm and k_norm of head_dim; the biases
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        per_layer += 4 * h + 2 * head_dim + ((q_dim + kv_dim * (1 if k_eq_v else 2) + h) if bias else 0)
    tied = bool(filled.tie_word_embeddings)
    window = filled.sliding_window
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in layer_types) \
        if window and "sliding_attention" in layer_types else ()
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=heads, kv_dim=main[1] * main[0],
                      q_dim=heads * main[0], intermediate=inter, vocab=vocab, norm="gemma4", mlp_saved=3,
                      softmax_fp32=True, experts_per_token=1, experts=1, linears=linears(*main),
                      other_params=vocab * h + per_layer + h, head_params=0 if tied else vocab * h, causal=True,
                      norms=4, logit_softcap=filled.final_logit_softcapping is not None, rotary=True, qk_norm=True,
                      windows=windows,
                      global_layers=tuple(i for i in range(layers) if layouts[i] == other) if other else (),
                      global_linears=linears(*other) if other else (),
                      global_dims=(heads * other[0], other[1] * other[0]) if other else (0, 0), v_norm=True)


def _jetmoe(cfg: dict, mtype: str) -> ModelShape:
    """A JetMoE config, as transformers 5's JetMoeModel holds it (read through JetMoeConfig): RMSNorms (input,
    post-attention); a mixture of attention experts (JetMoeMoA: each token's queries projected by its top
    ``num_experts_per_tok`` of ``num_local_experts`` experts, ``experts.input_linear`` (experts, kv_channels·
    num_key_value_heads, hidden) and their outputs by ``experts.output_linear``, 3-D JetMoeParallelExperts weights,
    routed by ``experts.router.layer`` (an nn.Linear), a bias after the mixture) with one ``kv_proj`` ([k; v]) shared by
    them; a mixture of MLP experts of the same kind (``mlp.input_linear`` holding gate and up, ``mlp.output_linear``,
    ``mlp.router.layer``, a bias). The head is tied unless ``tie_word_embeddings`` is false. The KV cache holds
    kv_proj's K and V (num_key_value_heads heads; attention repeats them top-k times after the cache).

    Parameters, weights (bitsandbytes quantises kv_proj and the routers, nn.Linear, not the 3-D experts), adapters,
    gradients, optimizer states, the KV cache and the activations (the routers' indices, the routed copies, the
    index_adds' sources: :func:`~spectra.memory.activations._jetmoe_bytes`) are estimated."""
    filled = _config_object(mtype, cfg)
    if filled is None:
        raise ConfigError(f"model_type {mtype}: transformers' JetMoeConfig cannot be built from this config.json, "
                          "which spectra's memory model reads through it.")
    h, layers, vocab = filled.hidden_size, filled.num_hidden_layers, filled.vocab_size
    experts, k, inter = filled.num_local_experts, filled.num_experts_per_tok, filled.intermediate_size
    kv_width = filled.kv_channels * filled.num_key_value_heads  # each attention expert's query width, K's and V's
    linears = ((("routed q", kv_width, h), ("routed o", h, kv_width)) * experts + (("other", experts, h),)
               + (("other", 2 * kv_width, h),)
               + (("routed gate_up", 2 * inter, h), ("routed down", h, inter)) * experts + (("other", experts, h),))
    other = vocab * h + layers * (2 * h + 2 * h) + h  # embed; two norms and two biases a layer; the final norm
    tied = bool(filled.tie_word_embeddings)
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=filled.num_key_value_heads * k, kv_dim=kv_width,
                      q_dim=kv_width * k, intermediate=inter, vocab=vocab, norm="rms", mlp_saved=3,
                      softmax_fp32=True, experts_per_token=k, experts=experts, linears=linears, other_params=other,
                      head_params=0 if tied else vocab * h, causal=True, rotary=True, attention_experts=True)


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
    from spectra.checkpoints.targets import bnb_4bit_linears

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
    linears, sizes = [], {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and outside(name):
            out, d_in = module.weight.shape if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
            info = module_info(name)
            linears.append((info.role, int(out), int(d_in), info.stack))
            sizes[name] = (int(out), int(d_in))
    converted = bnb_4bit_linears(model)  # last: it converts the model in place
    if converted is None:  # no bitsandbytes path to ask: exactly nn.Linear or Conv1D, no keep list
        converted = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear or isinstance(m, Conv1D)}
    quantised = [size for name, size in sizes.items() if name in converted]
    return dataclasses.replace(text, family=f"{mtype} ({text.family} language model; vision tower and projector "
                                            "held frozen, not run: text-only batches)",
                               tower_params=towers, tower_linears=tuple(linears), tower_quantised=tuple(quantised))


def _meta_model_for(cfg: dict, mtype: str, mapping: str = "MODEL_MAPPING_NAMES", *, models=None):
    """transformers' class for ``mtype`` in ``mapping`` (a name in ``transformers.models.auto.modeling_auto``;
    default the base model: no LM head) and that class built from ``cfg`` on the meta device (shapes only, no
    weights), as ``(class name, model)``; the model is None where this transformers has no such class or cannot
    build it from the config (token ids outside the vocabulary aside: :func:`spectra.checkpoints.targets.meta_model`).

    Costs transformers' modelling import, ~0.8 s once per process, then 10-30 ms a build (Llama-2-70B's,
    Mixtral-8x7B's); :func:`model_shape` builds one base model a config. ``models``
    (:class:`~spectra.ranks.plan.MetaModels`) builds it instead, where one command's other steps may have built it
    (or the causal LM holding it) already."""
    from transformers.models.auto import modeling_auto

    from spectra.checkpoints.targets import meta_model

    model_class = getattr(modeling_auto, mapping).get(mtype)
    if not isinstance(model_class, str):
        return model_class, None
    return model_class, (models or meta_model)(cfg, model_class)


def _refuse_unless_built_holds(model, counted: int, *, mtype: str, model_class: str, counted_as: str) -> None:
    """Refuse, naming both counts, where ``model`` (transformers' ``model_class`` built from the config) holds
    another number of parameters than the ``counted`` ones (what they are: ``counted_as``)."""
    built = sum(p.numel() for p in model.parameters())  # parameters() yields a tied or shared tensor once
    if built != counted:
        raise ConfigError(f"model_type {mtype}: transformers' {model_class} built from this config holds {built} "
                          f"parameters, spectra's memory model counts {counted} {counted_as}, so it would count "
                          "them wrong.")


def _refuse_other_blocks(cfg: dict, mtype: str, shape: ModelShape, base_model=None) -> None:
    """Refuse a ``model_type`` whose base model, built by transformers from the config
    on the meta device (:func:`_meta_model_for`; ``base_model()`` returns it where already built), holds another
    number of parameters than ``shape`` counts: its blocks differ from those the memory model describes (StableLM's
    LayerNorms with biases, Cohere's LayerNorms without a residual norm pair, …). The
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
                              f"describes ({_DESCRIBED}) and will not read "
                              "it as Llama-like; transformers' AutoConfig.for_model and "
                              f"{base_class}(config) show what fails.")
        return
    _refuse_unless_built_holds(model, shape.params - shape.head_params, mtype=mtype, model_class=base_class,
                               counted_as="(no LM head): its blocks differ from the families the memory model "
                                          f"describes ({_DESCRIBED})")
    _refuse_other_linears(model, shape, mtype=mtype, model_class=base_class, cfg=cfg)


def _refuse_other_linears(model, shape: ModelShape, *, mtype: str, model_class: str, cfg: dict) -> None:
    """Refuse where a block of ``model`` (transformers' ``model_class`` built from the config on the meta device)
    holds other linear layers than ``shape`` assumes: (role, out, in) of each nn.Linear (transformers' Conv1D
    alike) of the layer, roles as ``spectra.checkpoints.architectures.module_info`` reads the module names (what
    ``spectra train`` selects by), against ``shape.block(layer).linears``.

    The parameter count alone lets fused projections through: ModernBERT's Wqkv (3·h × h) and Wi (2·inter × h) hold
    what Llama's q, k, v, gate and up do, so it was counted as Llama, its adapters as seven a layer where PEFT
    wraps four (Wqkv, attn.Wo, mlp.Wi, mlp.Wo; spectra's roles select Wqkv). An MoE block is compared on its Linears
    outside the routed experts and the router (roles of :data:`_UNQUANTISED`); JetMoE's (attention experts) is not."""
    from collections import Counter

    layers: dict[int, Counter] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind == "Linear":
            out, inp = module.out_features, module.in_features
        elif kind == "Conv1D":  # GPT-2's: weight (in, out)
            inp, out = module.weight.shape
        else:
            continue
        info = module_info(name, cfg)
        if info.layer is None or info.stack is not None or info.expert is not None:
            continue
        layers.setdefault(info.layer, Counter())[(info.role, int(out), int(inp))] += 1
    if not layers:  # no block Linear read off the names: nothing to compare (the parameter count checked the rest)
        return
    for layer in range(shape.layers):
        block = shape.block(layer)
        if block.attention_experts:  # JetMoE's attention experts: 3-D parameters, checked by count
            continue
        # an MoE's routed experts (3-D parameters, no Linear) and its router are checked by count; its attention,
        # shared experts and dense layers are Linears compared here
        assumed = Counter(linear for linear in block.linears if linear[0] not in _UNQUANTISED)
        built = Counter({key: n for key, n in layers.get(layer, Counter()).items() if key[0] not in _UNQUANTISED})
        if assumed != built:
            def listed(linears: Counter) -> str:
                return ", ".join(f"{role} {o}×{i}" + (f" (×{n})" if n > 1 else "")
                                 for (role, o, i), n in sorted(linears.items())) or "none"
            raise ConfigError(f"model_type {mtype}: transformers' {model_class} built from this config holds in "
                              f"layer {layer} the linear layers {listed(built)} (by role, out×in), where spectra's "
                              f"memory model assumes {listed(assumed)}: its blocks differ from the families it "
                              f"describes ({_DESCRIBED}), so it would count the adapters (and activations) wrong "
                              "even where the parameter total agrees.")


# the dense Llama-like families the memory model is checked on, as its refusals list them, and those of its own
# functions beside GPT-2 and BERT (_GELU_FAMILIES)
_OWN_BLOCKS_DESCRIBED = "GPT-NeoX, Phi, Falcon"
_LLAMA_LIKE_DESCRIBED = ("Llama-like: Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, Granite, Helium, ERNIE 4.5, "
                         "Ministral, SmolLM3, GLM, OLMo, OLMo 2, OLMo 3, StarCoder2, StableLM, Arcee, Seed-OSS, "
                         "Hunyuan dense, EXAONE 4, Cohere, Cohere 2, Apertus")
# every family the memory model describes, as each refusal names them (one list, so none of them falls behind)
_DESCRIBED = (f"{_LLAMA_LIKE_DESCRIBED}; Mixtral-style MoE: Mixtral, PhiMoE, GraniteMoE, MiniMax; Qwen3-MoE; "
              f"DeepSeek-V2/V3; JetMoE; GPT-2; BERT; {_OWN_BLOCKS_DESCRIBED}")


def _llama(cfg: dict, mtype: str, base_model) -> ModelShape:
    """A Llama-like config; ``base_model()``: :func:`_meta_model_for`'s, built when first asked (MoE only)."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    # config.json may leave head_dim to the family, whose default need not be h / heads (Seed-OSS's and Qwen3's 128,
    # Gemma's 256: what their config classes fill in and the models build)
    head_dim = cfg.get("head_dim") or _family_value(cfg, mtype, "head_dim") or h // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    if mtype in _O_PROJ_HIDDEN and q_dim != h:
        raise ConfigError(f"model_type {mtype}: num_attention_heads {heads} × head_dim {head_dim} = {q_dim}, not "
                          f"hidden_size {h}: transformers' {mtype} attention builds o_proj as hidden_size × "
                          f"hidden_size, so its forward cannot take the attention's {q_dim}-wide output (a shape "
                          "error), and the model cannot be trained; spectra's memory model reads such configs with "
                          "num_attention_heads × head_dim = hidden_size.")
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
            else (("up", dense_inter, h), ("down", h, dense_inter)) if mtype in _PLAIN_MLP \
            else (("gate", dense_inter, h), ("up", dense_inter, h), ("down", h, dense_inter))
    linears = attention + (_routed(experts, inter, h) if experts > 1 else dense)
    # ERNIE 4.5's use_bias puts a bias on every linear of the block (Llama's attention_bias and mlp_bias together)
    every_bias = mtype in _USE_BIAS and bool(_family_value(cfg, mtype, "use_bias", False))
    # attention_bias and mlp_bias as the family reads them (its config's default where config.json leaves them out:
    # Seed-OSS biases q, k and v unless told not to), and only where its model reads them (_ATTENTION_BIAS_IGNORED,
    # _MLP_BIAS_IGNORED)
    attention_bias = (mtype not in _ATTENTION_BIAS_IGNORED and bool(_family_value(cfg, mtype, "attention_bias", False))
                      or every_bias)
    mlp_bias = mtype not in _MLP_BIAS_IGNORED and bool(_family_value(cfg, mtype, "mlp_bias", False)) or every_bias
    # StableLM biases q, k and v by use_qkv_bias (o_proj never)
    qkv_bias = attention_bias or mtype in _QKV_BIAS or mtype == "stablelm" and bool(cfg.get("use_qkv_bias", False))
    # o_proj's bias: attention_bias's (GLM's and Helium's never; Seed-OSS's by attention_out_bias)
    o_bias = bool(cfg.get("attention_out_bias", False)) if mtype == "seed_oss" \
        else attention_bias and mtype not in _NO_O_BIAS
    bias = (q_dim + 2 * kv_dim if qkv_bias else 0) + (h if o_bias else 0)
    bias += ((1 if mtype in _PLAIN_MLP else 2) * inter + h) * experts if mlp_bias else 0
    tied = bool(_family_value(cfg, mtype, "tie_word_embeddings", False))
    # Gemma 2's and Gemma 3's blocks normalise each sublayer's input and output (input, post-attention, pre- and
    # post-feedforward norms); Gemma 2 caps attention and final logits by tanh (config.json may leave the caps to
    # Gemma2Config's defaults, 50 and 30; null turns them off), Gemma 3 normalises Q and K per head instead
    norms = 4 if mtype in _FOUR_NORMS else 2
    # Seed-OSS drops out 10 % by default (attention_dropout, residual_dropout): the masks are left out as every
    # family's are (the estimate notes them)
    dropouts = tuple((key, value) for key in _DROPOUT_KEYS.get(mtype, ())
                     if (value := _family_value(cfg, mtype, key, 0.0)))
    # StableLM's use_parallel_residual: attention and MLP read one input_layernorm's output (a parallel block)
    parallel = mtype in _PARALLEL_RESIDUAL and bool(cfg.get("use_parallel_residual", False)) or mtype in _COHERE
    norms = 1 if parallel else norms
    if mtype == "stablelm" and cfg.get("qk_layernorm"):
        raise ConfigError(f"model_type {mtype}: qk_layernorm (a LayerNorm per head on Q and K, StableLM 2 12B's), "
                          "whose weights and saved tensors spectra's memory model does not describe; it reads "
                          "StableLM configs without it.")
    caps = {key: (cfg[key] if key in cfg else _family_value(cfg, mtype, key) if mtype == "gemma2" else None)
            is not None for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    qk_norm, across_heads = mtype in _QK_NORMS, mtype in _QK_NORMS_ACROSS_HEADS
    if mtype in _COHERE and cfg.get("use_qk_norm"):
        raise ConfigError(f"model_type {mtype}: use_qk_norm (Command R+'s LayerNorms on each head's Q and K), whose "
                          "saved tensors spectra's memory model does not describe; it reads Cohere configs without "
                          "it (Command R).")
    norm = "cohere" if mtype in _COHERE else "layer" if mtype in _LAYER_NORMS \
        else "layer_fp32" if mtype in _PLAIN_LAYER_NORMS \
        else "rms_fp32" if mtype.startswith("gemma") or mtype in _NORM_WEIGHT_FP32 else "rms"
    norm_params = {"layer": 2 * h, "layer_fp32": 0}.get(norm, h)  # a LayerNorm has a bias beside its weight
    # q_norm and k_norm: head_dim each (Gemma 3, Qwen3), or q_dim and kv_dim across the heads (OLMo 2)
    qk_norm_params = ((q_dim + kv_dim) if across_heads else 2 * head_dim) if qk_norm else 0
    # embed + per-layer norm weights and biases + final norm
    # Apertus' xIELU holds two learned scalars (alpha_p, alpha_n) per layer
    activation_params = 2 if mtype in _PLAIN_MLP and _family_value(cfg, mtype, "hidden_act") == "xielu" else 0
    other = vocab * h + layers * (norms * norm_params + qk_norm_params + bias + activation_params) + norm_params
    head = (0 if tied else vocab * h) + (vocab if cfg.get("lm_head_bias", False) else 0)  # PhiMoE's head has a bias
    return ModelShape(family=mtype or "llama-like", hidden=h, layers=layers, heads=heads, kv_dim=kv_dim,
                      q_dim=q_dim, intermediate=inter, vocab=vocab, norm=norm,
                      mlp_saved=_activation_saved(cfg, mtype, "hidden_act") if mtype in _PLAIN_MLP else 3,
                      softmax_fp32=True,
                      experts_per_token=(2 if mtype in _SPARSEMIXER else cfg.get("num_experts_per_tok", 1))
                      if experts > 1 else 1, experts=experts,
                      linears=linears, other_params=other, head_params=head, causal=True,
                      norms=norms, attn_softcap=caps["attn_logit_softcapping"],
                      logit_softcap=caps["final_logit_softcapping"], sdpa=mtype not in _EAGER_ONLY, rotary=True,
                      qk_norm=qk_norm, qk_norm_across_heads=across_heads,
                      output_norms_only=mtype in _OUTPUT_NORMS_ONLY,
                      clip_qkv=mtype in _PLAIN_LAYER_NORMS and cfg.get("clip_qkv") is not None,
                      sparsemixer=mtype in _SPARSEMIXER, topk_softmax=mtype in _TOPK_SOFTMAX,
                      input_jitter=mtype in _SPARSEMIXER and bool(cfg.get("input_jitter_noise", 0.0)),
                      windows=_sliding_windows(cfg, mtype, layers), rotary_cat=mtype in _ROTARY_CAT,
                      parallel=parallel, xielu=bool(activation_params),
                      routing_cast=mtype in _OWN_EXPERT_SIZES,
                      routing_norm=_routing_norm(cfg, mtype),
                      dense_layers=dense_layers, dense_linears=attention + dense if dense_layers else (),
                      dense_intermediate=dense_inter if dense_layers else 0, dropouts=dropouts,
                      **(_moe_adapters(base_model()[1], experts, h) if experts > 1 else {}))


def _routing_norm(cfg: dict, mtype: str) -> bool:
    """Whether a Llama-like MoE's router renormalises its top-k weights: Qwen3-MoE's only with ``norm_topk_prob``
    (its config's default where config.json leaves it out); Mixtral's and MiniMax's always, whatever a
    ``norm_topk_prob`` in config.json says (MixtralTopKRouter reads none)."""
    if mtype not in _OWN_EXPERT_SIZES:
        return True
    return bool(_family_value(cfg, mtype, "norm_topk_prob", True))


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
    tied = bool(_family_value(cfg, mtype, "tie_word_embeddings", False))
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
                      routing_norm=bool(_family_value(cfg, mtype, "norm_topk_prob", False)) and mtype == "deepseek_v3",
                      **_moe_adapters(base_model()[1], experts, h))


def _routed(experts: int, inter: int, hidden: int) -> tuple[tuple[str, int, int], ...]:
    """An MoE layer's routed experts, as transformers 5 holds them (fused 3-D gate_up_proj and down_proj parameters,
    expanded per expert: roles of :data:`_UNQUANTISED`), and its router's (experts, hidden) weight."""
    return (("routed gate_up", 2 * inter, hidden), ("routed down", hidden, inter)) * experts \
        + (("router", experts, hidden),)


def _qwen_moe_dense_layers(cfg: dict, mtype: str, layers: int) -> tuple[int, ...]:
    """The layers of a Qwen3-MoE whose MLP is dense, as Qwen3MoeDecoderLayer decides: those in ``mlp_only_layers``
    and those ``decoder_sparse_step`` skips (layer + 1 not a multiple of it); defaults from the family's config."""
    only = _family_value(cfg, mtype, "mlp_only_layers") or ()
    step = _family_value(cfg, mtype, "decoder_sparse_step", 1) or 1
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


# MoE families with expert sizes of their own (moe_intermediate_size) and dense layers between the MoE ones: Qwen3-MoE
# (Llama-like blocks with Q/K norms), DeepSeek-V2/V3 (multi-head latent attention, shared experts: _MLA)
_OWN_EXPERT_SIZES = frozenset({"qwen3_moe", "deepseek_v2", "deepseek_v3"})
_MLA = frozenset({"deepseek_v2", "deepseek_v3"})
# what bitsandbytes leaves in 16 bits in an MoE block: the routed experts (3-D parameters, no nn.Linear) and the router
_UNQUANTISED = frozenset({"routed gate_up", "routed down", "router", "routed q", "routed o"})  # JetMoE's q, o experts
_FUSED_PROJECTIONS = frozenset({"phi3"})  # PhiMoE has separate q/k/v (transformers' PhimoeForCausalLM)
# GLM: Phi-3's fused gate_up_proj beside separate q/k/v (attention_bias biases them, never o_proj), its rotary
# embeddings on part of each head (partial_rotary_factor: Q and K are fresh tensors all the same)
_FUSED_MLP = frozenset({"glm"})
_FOUR_NORMS = frozenset({"gemma2", "gemma3_text"})  # blocks that normalise each sublayer's input and output
# an RMSNorm on Q and K (q_norm, k_norm) before the rotation: each head's (over head_dim), or OLMo 2's across all heads
# (Hunyuan's query_layernorm and key_layernorm: per head, after the rotation)
_QK_NORMS = frozenset({"gemma3_text", "qwen3", "qwen3_moe", "olmo2", "olmo3", "hunyuan_v1_dense", "exaone4",
                       "apertus"})
_QK_NORMS_ACROSS_HEADS = frozenset({"olmo2", "olmo3"})
# blocks that normalise each sublayer's output and not its input (OLMo 2, OLMo 3: x + norm(attention(x)), the same
# for the MLP)
_OUTPUT_NORMS_ONLY = frozenset({"olmo2", "olmo3", "exaone4"})  # and EXAONE 4's
# Llama-like blocks normalised by LayerNorm (weight and bias), not RMSNorm
_LAYER_NORMS = frozenset({"phimoe", "starcoder2", "stablelm"})
# rotary embeddings on part of each head, concatenated with the rest (torch.cat): Q comes out (b, heads, s, d)
# contiguous, and so does sdpa's output, which o_proj reads as a copy (GLM; StableLM's partial_rotary_factor)
_ROTARY_CAT = frozenset({"glm", "stablelm"})
# Llama-like blocks that run attention and MLP side by side on one norm's output under use_parallel_residual
_PARALLEL_RESIDUAL = frozenset({"stablelm"})
# Cohere (Command R): a parallel block on one CohereLayerNorm (a weight, no bias, computed in fp32 by elementwise ops)
_COHERE = frozenset({"cohere", "cohere2"})  # (Cohere2: sliding layers by layer_types, no rotation in the others)
# StarCoder2's MLP: c_fc → hidden_act → c_proj, no gate (use_bias biases it and the attention's four linears)
_PLAIN_MLP = frozenset({"starcoder2", "arcee", "apertus"})  # and Arcee's (ReLU², no biases unless mlp_bias), Apertus'
_PLAIN_LAYER_NORMS = frozenset({"olmo"})  # … by a LayerNorm without weight or bias, on the input up-cast to fp32
# RMSNorms that apply their weight to the fp32 normalised input (Gemma's families too, by name): full fine-tuning
# keeps that fp32 tensor for the weight's gradient (Helium; OLMo 2 and 3, whose norm casts the product to p)
_NORM_WEIGHT_FP32 = frozenset({"helium", "olmo2", "olmo3"})
# a language model's keys, which a multimodal config's top level leaves to its text_config (PaliGemma's keeps some)
_LANGUAGE_KEYS = frozenset({"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "vocab_size"})
# Qwen2's families bias q, k and v whatever attention_bias says (Qwen2-VL's and Qwen2.5-VL's language models too)
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe", "qwen2_vl_text", "qwen2_5_vl_text"})
_USE_BIAS = frozenset({"ernie4_5", "starcoder2"})  # config key use_bias: a bias on every linear of the block
# families whose models build their linears without reading attention_bias or mlp_bias, whatever config.json says
# (Llama's, Granite's, SmolLM3's, Helium's, Arcee's and Seed-OSS's MLPs read mlp_bias; the attention of those below
# has no bias, or Qwen2's fixed one, or use_bias's): read off the models transformers builds from tiny configs with
# each key set (tests/memory/test_memory_bias_keys.py)
_ATTENTION_BIAS_IGNORED = frozenset({"mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "phi3", "ernie4_5",
                                     "ministral", "starcoder2", "stablelm", "exaone4", "mixtral", "minimax"})
_NO_O_BIAS = frozenset({"glm", "helium"})  # attention_bias biases their q, k and v, never o_proj
# the dropout keys a family's config sets by default, whose masks the estimate notes as left out
_DROPOUT_KEYS = {"seed_oss": ("attention_dropout", "residual_dropout")}
# families whose o_proj is hidden_size × hidden_size whatever num_attention_heads × head_dim (Helium's
# HeliumAttention): a config where the two differ builds, but its forward fails (refused by _llama)
_O_PROJ_HIDDEN = frozenset({"helium"})
_MLP_BIAS_IGNORED = frozenset({"mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3", "gemma", "gemma2",
                               "gemma3_text", "phi3", "ernie4_5", "ministral", "glm", "olmo", "olmo2", "olmo3",
                               "starcoder2", "stablelm", "hunyuan_v1_dense", "exaone4", "cohere", "cohere2",
                               "apertus", "mixtral", "phimoe", "granitemoe", "minimax", "qwen3_moe"})
# families whose every attention layer slides by config.sliding_window when it is set (MistralModel's mask) and those
# that slide the layers layer_types names sliding_attention (_sliding_windows); the others ignore sliding_window
_SLIDING_EVERY_LAYER = frozenset({"mistral", "mixtral", "phi3", "phimoe", "minimax", "starcoder2"})
_SLIDING_WHEN_USED = frozenset({"qwen3_moe"})
_SLIDING_BY_LAYER_TYPE = frozenset({"ministral", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3",
                                    "qwen2_vl_text", "qwen2_5_vl_text", "olmo3", "exaone4", "cohere2"})
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
# layer_types of attention layers (a sliding or chunked window stores what full attention does per token)
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# families with Llama's config keys but other blocks: read as Llama-like they would be counted wrong
# (ALBERT has BERT's keys but one set of layer weights shared by every layer)
_NOT_LLAMA_LIKE = frozenset({"gptj", "gpt_neo", "bloom", "opt", "mpt", "albert"})
# families whose own block designs the memory model does not describe, refused with what they are (read as Llama-like or
# MoE they were counted wrong or refused for a key or MoE layout that is not the gap)
_OWN_DESIGN_REFUSED = {
    "modernbert": "an encoder whose blocks fuse Q, K and V into one Linear (attn.Wqkv) and the MLP's two input halves "
                  "into another (mlp.Wi, a GLU), with attn.Wo and mlp.Wo as outputs and alternating global and local "
                  "attention (PEFT adapts these four Linears a layer, not Llama's seven)",
    "dbrx": "DBRX's blocks (d_model; one fused Wqkv; experts stored as fused w1, v1 and w2 matrices of all experts "
            "in ffn.experts.mlp; attention and MoE settings in attn_config and ffn_config)",
    "jamba": "Mamba state-space layers beside attention (attn_layer_period, attn_layer_offset), whose weights "
             "(in_proj, conv1d, x_proj, dt_proj, out_proj, A_log, D) and activations are not described (its experts, "
             "every expert_layer_period-th layer, are Mixtral-like)",
}


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
                      linears=linears, other_params=other, head_params=0, causal=False, outside_quantised=((h, h),))


# what the MLP's activation keeps for backward, in intermediate-sized tensors (ACT2FN by name): a fused GELU its input
# (tanh-approximated or not), ReLU its output; NewGELU ("gelu_new": GPT-2's, Phi's) is written out in elementwise ops
# that keep the input, tanh's output, x/2 and 1 + tanh
_ACTIVATION_SAVED = {"gelu": 1, "gelu_pytorch_tanh": 1, "relu": 1, "gelu_new": 4, "relu2": 1, "xielu": 3}


def _activation_saved(cfg: dict, mtype: str, key: str) -> int:
    """Intermediate-sized tensors that the family's MLP activation (config ``key``, its config's default where
    config.json leaves it out) keeps: :data:`_ACTIVATION_SAVED`; another is refused, naming it."""
    act = _family_value(cfg, mtype, key)
    if act not in _ACTIVATION_SAVED:
        raise ConfigError(f"model_type {mtype}: {key} {act!r}, an activation whose saved tensors spectra's memory "
                          f"model does not describe; it reads {', '.join(sorted(_ACTIVATION_SAVED))}.")
    return _ACTIVATION_SAVED[act]


def _family_value(cfg: dict, mtype: str, key: str, fallback=None):
    """``cfg[key]``, or where config.json leaves it out what the family's config class holds for it: built from
    ``cfg`` (its default, or one it derives from other keys, as Llama's head_dim from hidden_size and
    num_attention_heads), or where the class cannot be built from ``cfg`` its default; ``fallback`` where it has no
    such key (or no config class), or where the key varies by layer and the class refuses to give one value
    (transformers' heterogeneity)."""
    if key in cfg:
        return cfg[key]
    family = _filled_config(mtype, json.dumps(cfg, sort_keys=True, default=repr))
    if family is None:
        family = _config_object(mtype)
    try:
        return getattr(family, key, fallback)
    except Exception:  # a key that varies by layer
        return fallback


@functools.lru_cache(maxsize=16)
def _filled_config(mtype: str, cfg_json: str):
    """transformers' config of ``mtype`` built from a config.json (as JSON text: one build per config however many
    keys are read off it, and transformers' warnings about it said once), None where it cannot be built."""
    return _config_object(mtype, json.loads(cfg_json))


def _gpt_neox(cfg: dict, mtype: str) -> ModelShape:
    """A GPT-NeoX config (Pythia, GPT-NeoX-20B), as transformers 5's GPTNeoXModel holds and runs it.

    Each block: LayerNorms with biases (input_layernorm, post_attention_layernorm); one ``query_key_value`` (h → 3h,
    each head's Q, K and V side by side: views of its output) and ``dense``, biased by ``attention_bias``; rotary
    embeddings on part of each head (``rotary_pct``), concatenated with the rest (torch.cat, whatever the part: Q and
    K are fresh (b, heads, s, d) tensors, so o_proj reads a copy of the attention's output); an MLP
    ``dense_h_to_4h`` → ``hidden_act`` → ``dense_4h_to_h`` with biases. ``use_parallel_residual`` (default) adds
    attention(ln1(x)) and mlp(ln2(x)) to x; without it the block is sequential, as GPT-2's. The head
    (``embed_out``) is untied unless ``tie_word_embeddings``."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    bias = bool(_family_value(cfg, mtype, "attention_bias", True))
    linears = (("qkv", 3 * h, h), ("o", h, h), ("up", inter, h), ("down", h, inter))
    per_layer = 2 * 2 * h + (4 * h if bias else 0) + inter + h  # two LayerNorms; qkv and dense biases; the MLP's
    other = vocab * h + layers * per_layer + 2 * h  # embed_in, blocks, final_layer_norm
    tied = bool(_family_value(cfg, mtype, "tie_word_embeddings", False))
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=heads, kv_dim=h, q_dim=h, intermediate=inter,
                      vocab=vocab, norm="layer", mlp_saved=_activation_saved(cfg, mtype, "hidden_act"),
                      softmax_fp32=True, experts_per_token=1, experts=1, linears=linears, other_params=other,
                      head_params=0 if tied else vocab * h, causal=True, rotary=True, rotary_cat=True,
                      parallel=bool(_family_value(cfg, mtype, "use_parallel_residual", True)))


def _phi(cfg: dict, mtype: str) -> ModelShape:
    """A Phi config (phi-1, phi-1.5, phi-2), as transformers 5's PhiModel holds and runs it.

    Each block: one LayerNorm (with bias) whose output both the attention and the MLP read (a parallel block,
    ``norms`` 1); q_proj, k_proj, v_proj (``num_key_value_heads``) and ``dense``, all biased; rotary embeddings on
    ``partial_rotary_factor`` of each head, concatenated with the rest (Q and K fresh tensors, so o reads a copy);
    an MLP ``fc1`` → ``hidden_act`` (NewGELU) → ``fc2`` with biases. The head has a bias; it is untied unless
    ``tie_word_embeddings``. ``qk_layernorm`` (LayerNorms on each head's Q and K) is refused: not described."""
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    if cfg.get("qk_layernorm"):
        raise ConfigError(f"model_type {mtype}: qk_layernorm (a LayerNorm on each head's Q and K), whose weights and "
                          "saved tensors spectra's memory model does not describe for Phi; it reads Phi configs "
                          "without it (phi-1, phi-1.5, phi-2).")
    head_dim = cfg.get("head_dim") or h // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    linears = (("q", q_dim, h), ("k", kv_dim, h), ("v", kv_dim, h), ("o", h, q_dim), ("up", inter, h),
               ("down", h, inter))
    per_layer = 2 * h + q_dim + 2 * kv_dim + h + inter + h  # input_layernorm; q, k, v, dense, fc1, fc2 biases
    other = vocab * h + layers * per_layer + 2 * h  # embed_tokens, blocks, final_layernorm
    tied = bool(_family_value(cfg, mtype, "tie_word_embeddings", False))
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=heads, kv_dim=kv_dim, q_dim=q_dim,
                      intermediate=inter, vocab=vocab, norm="layer",
                      mlp_saved=_activation_saved(cfg, mtype, "hidden_act"), softmax_fp32=True, experts_per_token=1,
                      experts=1, linears=linears, other_params=other, head_params=(0 if tied else vocab * h) + vocab,
                      causal=True, norms=1, rotary=True, rotary_cat=True, parallel=True)


def _falcon_views() -> bool:
    """Whether the installed transformers runs Falcon's attention as Llama's (5.25 on): Q, K and V views of
    query_key_value's output, K and V cached and handed to attention at ``num_kv_heads`` heads (the attention
    functions repeat them to every query head under a mask), Llama's rotation; before 5.25 FalconAttention split
    them into copies and broadcast the new architecture's K and V first."""
    import transformers

    major, minor = re.match(r"(\d+)\.(\d+)", transformers.__version__).groups()
    return (int(major), int(minor)) >= (5, 25)  # 5.25's dev builds too


def _falcon(cfg: dict, mtype: str) -> ModelShape:
    """A Falcon config, as transformers 5's FalconModel holds and runs it, read through FalconConfig (which maps
    config.json's older n_layer, n_head, n_embed and fills in num_kv_heads and ffn_hidden_size).

    Each block: one fused ``query_key_value`` (``bias``) whose output holds Q, K and V: the new decoder
    architecture (Falcon-40B/180B) ``num_kv_heads`` K and V heads, the older multi-query layout (Falcon-7B,
    ``multi_query``) one K and one V head, otherwise (heads, 3, head_dim) of full multi-head attention. From
    transformers 5.25 (:func:`_falcon_views`) Q, K and V are views of it, attended as Llama's (Phi-3's fused
    projection); before, they were reshaped into tensors of their own (``split_copies``), the new architecture's K
    and V broadcast to every query head first, and Falcon-7B's one K/V head went to sdpa without enable_gqa, which
    only its math kernel takes (:func:`~spectra.memory.activations._sdpa_math`). Either way the causal mask is
    always materialised (``falcon_attention``). Rotary embeddings on whole heads; eager takes its softmax in the
    activations' dtype before 5.25, in fp32 from it. Parallel attention and MLP (``parallel_attn``) read one
    LayerNorm's output, or under the new architecture one each (``ln_attn``, ``ln_mlp``; ``num_ln_in_parallel_attn``
    2, its default); else the block is sequential with two. The MLP: ``dense_h_to_4h`` → ``activation`` →
    ``dense_4h_to_h``. The head is tied unless ``tie_word_embeddings`` is false. ALiBi (Falcon-RW's ``alibi``) is
    refused."""
    filled = _config_object(mtype, cfg)
    if filled is None:
        raise ConfigError(f"model_type {mtype}: transformers' FalconConfig cannot be built from this config.json, "
                          "which spectra's memory model reads through it (num_kv_heads, ffn_hidden_size).")
    if filled.alibi:
        raise ConfigError(f"model_type {mtype}: alibi (Falcon-RW's ALiBi attention biases: eager keeps fp32 scores "
                          "and the bias, sdpa a mask), whose saved tensors spectra's memory model does not describe; "
                          "it reads Falcon's rotary configs.")
    new, parallel = bool(filled.new_decoder_architecture), bool(filled.parallel_attn)
    lns = filled.num_ln_in_parallel_attn or (2 if new else 1)
    if (new or lns == 2) and not (new and parallel):  # FalconDecoderLayer builds norms its forward does not call
        raise ConfigError(f"model_type {mtype}: new_decoder_architecture {new}, parallel_attn {parallel}, "
                          f"num_ln_in_parallel_attn {filled.num_ln_in_parallel_attn}: a layout transformers' "
                          "FalconDecoderLayer cannot run (it calls norms it does not build).")
    h, layers, heads, vocab = filled.hidden_size, filled.num_hidden_layers, filled.num_attention_heads, \
        filled.vocab_size
    inter, head_dim, bias = filled.ffn_hidden_size, h // heads, bool(filled.bias)
    views = _falcon_views()
    if new:  # before 5.25, K and V broadcast to every query head
        qkv_out, kv_dim = (2 * filled.num_kv_heads + heads) * head_dim, filled.num_kv_heads * head_dim if views else h
    elif filled.multi_query:
        qkv_out, kv_dim = h + 2 * head_dim, head_dim
    else:
        qkv_out, kv_dim = 3 * h, h
    linears = (("qkv", qkv_out, h), ("o", h, h), ("up", inter, h), ("down", h, inter))
    norms = lns if parallel else 2
    per_layer = 2 * h * norms + ((qkv_out + h + inter + h) if bias else 0)
    other = vocab * h + layers * per_layer + 2 * h  # word_embeddings, blocks, ln_f
    tied = filled.tie_word_embeddings
    return ModelShape(family=mtype, hidden=h, layers=layers, heads=heads, kv_dim=kv_dim, q_dim=h, intermediate=inter,
                      vocab=vocab, norm="layer", mlp_saved=_activation_saved(cfg, mtype, "activation"),
                      softmax_fp32=views, experts_per_token=1, experts=1, linears=linears, other_params=other,
                      head_params=0 if tied else vocab * h, causal=True, norms=norms, rotary=True, parallel=parallel,
                      split_copies=(new or filled.multi_query) and not views, falcon_attention=True,
                      sdpa_math=filled.multi_query and not new and not views,
                      unquantised_class="FalconLinear")


# families whose blocks are read by a function of their own (parallel attention and MLP, GELU MLPs, LayerNorms)
_GELU_FAMILIES = {"gpt_neox": _gpt_neox, "phi": _phi, "falcon": _falcon}
