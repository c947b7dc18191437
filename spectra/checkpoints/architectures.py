"""Per-family tables: module name → role, layer, expert index and stack; fused layouts; Conv1D.

A *role* groups modules across layers and architectures so that results can be
compared by kind: ``q, k, v, o, qkv, q_a, q_b, kv_a, kv_b, kv, o_a, o_b, xq, xk, xv, xo, gate, up, down, gate_up,
projector, embed, pos_embed, head, other``. Unknown architectures still work: every module whose name matches no rule
gets role ``other`` and is analysed all the same.

``embed`` is a vocabulary's table, the token embedding (``embed_tokens``, ``wte``, ``word_embeddings``, ``shared``,
CLIP's ``token_embedding``, XLM's and Mamba's ``embeddings`` …); ``pos_embed`` every other embedding table, one looked
up by position or segment, not by token: a learned position table (GPT-2's ``wpe``, BERT's ``position_embeddings``,
BART's and OPT's ``embed_positions``, CLIP's and SigLIP's ``position_embedding``, Qwen3-VL's tower ``pos_embed``,
Bark's and CLVP's ``position_embeds_layer``, Kosmos-2.5's and Florence2's row and column tables), a relative-position
table (T5's ``relative_attention_bias``, DeBERTa's ``rel_embeddings``, WavLM's ``rel_attn_embed``, Wav2Vec2-BERT's
``distance_embedding``, SpeechT5's ``embed_positions.pe_k``) and a token-type (segment) table (BERT's
``token_type_embeddings``): the tables :data:`_POSITION_TABLES` names, as found in transformers' models (a table under
a name it does not know stays ``other``). They were ``other``, which ``recommend``'s default plans (every matrix but
embeddings, heads and MoE routers); ``--roles pos_embed`` takes them. A role of their own keeps ``--roles embed`` (and
what reads the token embedding: a tied head, a resized vocabulary) to the vocabulary's table, as before, and no
default of train, extract, memory or the sweep (block roles) takes either.

``q_a q_b kv_a kv_b`` are multi-head latent attention's (MLA: DeepSeek-V2, arXiv:2405.04434; DeepSeek-V3 and Kimi-K2,
MiniCPM3, LongCat-Flash, Mistral Small 4, ``glm4_moe_lite`` and the other transformers models built on its attention)
low-rank projections, by what each tensor computes (``(out, in)``; ``c`` = ``q_lora_rank``, ``d`` = ``kv_lora_rank``):

- ``q_a_proj`` (c, hidden), role ``q_a``: x → the query latent (then an RMSNorm);
- ``q_b_proj`` (heads·(nope + rope), c), role ``q_b``: the latent → every head's query. A model without a query
  latent (DeepSeek-V2-Lite: ``q_lora_rank`` None) holds a plain ``q_proj``, role ``q``. AXK2's ``q_gate_proj``
  (heads·(nope + rope + v), 2c) is role ``q_b`` too: it reads ``[RMSNorm(latent); latent]`` and returns every head's
  ``[q_h; g_h]``, the query fused with a sigmoid gate on that head's attention output (as Qwen3-Next's gated
  ``q_proj``, role ``q``, holds its gate): the gate rows have no role of their own (they gate no MLP), a LoRA on it
  adapts both, and ``--roles q`` takes it with ``q_a``;
- ``kv_a_proj_with_mqa`` (d + rope, hidden), role ``kv_a``: x → ``[the key-value latent; one rotary key]``, the
  latent normed and expanded by kv_b, the rotary key (``qk_rope_head_dim`` rows) shared by every head (the "MQA");
- ``kv_b_proj`` (heads·(nope + v), d), role ``kv_b``: the latent → every head's ``[k_nope_h; v_h]``, interleaved per
  head. A fused tensor as GPT-NeoX's query_key_value is: also analysed as projections ``k`` and ``v``
  (:func:`fused_projections`), which are what a Llama's k and v panels compare with.

``kv_a`` is kept whole: no block of its rows is a projection of any role but the rotary key's few, a single key head
that every head shares and no other model's k compares with (``qk_rope_head_dim`` = 64 of DeepSeek-V3's 576 rows);
the latent rows feed k and v alike, through kv_b. A LoRA adapts it whole either way.

DeepSeek-V4's attention (``deepseek_v4``) holds a query as MLA's (``q_a_proj``, ``q_b_proj``), one key-value head
and a grouped low-rank output (``n`` heads of width ``h``, ``g`` = ``o_groups``, ``r`` = ``o_lora_rank``):

- ``self_attn.kv_proj`` (h, hidden), role ``kv``: x → the one head that every query head attends to, read as its keys
  and as its values (``attention(q, kv, kv)``: K = V, the "shared-KV MQA"). Its rows are no [k; v] blocks, so it is
  not split: the whole is the key and the value. ``--roles k`` or ``v`` takes it, in an analysis too
  (:func:`role_named`), and a LoRA on it adapts both. Its compressor's ``compressor.kv_proj`` stays ``other``: a
  window of its outputs is pooled by ``compressor.gate_proj``'s softmax into one long-range entry (CSA's in two
  overlapping series), no token's key;
- ``o_a_proj`` (g·r, n·h/g), role ``o_a``: a grouped Linear (``DeepseekV4GroupedLinear``): the heads' outputs cut in
  g groups of n·h/g, group i mapped by rows i·r … (i+1)·r − 1 to r outputs, i.e. the block-diagonal (g·r, n·h) operator
  that these g blocks are its diagonal of. Its forward takes ``(…, g, n·h/g)``, so PEFT's ``lora.Linear`` cannot wrap
  it (it adds ``B@A@x`` of shape ``(…, g·r)``): spectra adapts its weight through ``target_parameters``, a rank-r
  update of the stored ``(g·r, n·h/g)`` matrix (every group's update then shares one input subspace);
- ``o_b_proj`` (hidden, g·r), role ``o_b``: the g·r group outputs → the residual stream.

Its checkpoints keep DeepSeek's names, which transformers renames on loading (``attn.wq_a``, ``wq_b``, ``wkv``,
``wo_a``, ``wo_b``; ``ffn.shared_experts.w1``, ``w3``, ``w2``; the top-level ``embed`` and ``head``): they get the
roles of the modules they load into.

``o_a`` and ``o_b`` are the output projection's factors, as ``q_a`` and ``q_b`` are the query's: ``--roles o`` takes
them (:func:`role_named`), and each has a role of its own because a report groups by role and layer.

Gemma 4 (``gemma4``, ``gemma4_unified``, their assistants) with ``attention_k_eq_v`` reads keys and values alike off
one projection in each full-attention layer (``use_alternative_attention``: a layer that ``layer_types`` does not
make ``sliding_attention``): it holds no ``v_proj`` there, and its ``self_attn.k_proj`` output is the keys (after
``k_norm`` and rotary embedding) and the values (after ``v_norm``). That ``k_proj`` is role ``kv``, as V4's: decided
by :func:`module_info` from the config per layer (:func:`_k_is_v`), not by the name, which a sliding layer's ``k_proj``
(role ``k``, beside its own ``v_proj``) shares.

JetMoE's ``self_attention.kv_proj`` (2·kv_heads·kv_channels, hidden) is another fused tensor: contiguous ``[k; v]``,
halves (its forward: ``kv_proj(x).chunk(2, -1)``), the same keys and values for every attention expert (its
mixture-of-attention experts hold the queries and the output: ``experts.input_linear``, ``output_linear``). It has no
fused role (``kv`` is K = V, the whole read as both): role ``other``, its rows ``k`` and ``v``
(:func:`fused_roles`, :func:`fused_projections`), as GPT-2's cross-attention ``c_attn`` holds ``xk`` and ``xv``, so
``--roles v`` analyses its value rows and adapts it whole.

A multimodal model's *projector* (the ``projector`` stack: LLaVA's ``multi_modal_projector.linear_1`` and
``linear_2``, LLaVA-1.5's ``mm_projector.N``, Idefics3's ``connector.modality_projection.proj``, BLIP-2's
``language_projection``, Qwen2-VL's ``visual.merger.mlp.N``, Qwen3-VL's ``merger.linear_fc1`` …) maps another stack's
features into the language model's. A Linear (or convolution) of that stack that no rule names gets role ``projector``
(:data:`_STACK_ROLES`), unless its name reads as a norm (``ln_q``, ``layer_norm``, ``mm_soft_emb_norm``: ``other``) or
as a bare parameter no PEFT module holds (Gemma 3's ``mm_input_projection_weight``, Idefics2's ``latents``, Aria's
``query`` and ``in_proj_weight``: ``other``, :data:`_STACK_PARAMETERS`); one a rule names keeps its role (Idefics2's
perceiver ``q_proj``, GLM-4V's merger ``gate_proj``). ``projector`` is a block role
(:data:`~spectra.checkpoints.roles.BLOCK_ROLES`: ``--roles projector``), which the default roles hold only where a
selection names the projector stack (:func:`~spectra.checkpoints.roles.default_roles`): ``--stacks projector`` adapts
a projector with the default roles, and a command that names no stack adapts none, as before it had a role (train's
default stacks are those text runs through, which never reaches a projector:
:data:`~spectra.checkpoints.adapted.TEXT_STACKS`).

In a selection, ``--roles q`` takes ``q_a`` and ``q_b`` (they compute the query and nothing else; :func:`role_named`)
and ``--roles k`` or ``v`` takes ``kv_b``'s projection of that role in an analysis, and ``kv_a`` and ``kv_b`` whole
in what adapts modules (train, extract, a plan, the memory estimate: :func:`role_selected`, :data:`FUSED_ROLES`), as
``--roles v`` takes GPT-2's ``c_attn``: a LoRA on kv_a or kv_b changes the keys and the values. PEFT matches
``target_modules`` by name suffix instead, so its ``["q_proj", "v_proj"]`` adapts no module of DeepSeek-V3 (whose
attention holds no q_proj or v_proj) and PEFT 0.21 has no default target modules for DeepSeek; spectra's roles name
what the modules compute. ``--roles q_a`` (…) takes that module alone. Reports lay the four out after ``qkv`` and
before ``o``, in the order the attention's forward meets them.

``xq xk xv xo`` are cross-attention's projections: an encoder–decoder's decoder attending to
its encoder's output (T5's ``EncDecAttention.q``, BART's ``encoder_attn.q_proj``; SAM's mask decoder's
attentions between its prompt tokens and the image embedding). They hold a
role of their own because a report groups by (stack, role) and layer, and a decoder's
self-attention q and cross-attention q of one layer are two modules with other inputs; a
``--roles q`` still takes them (:func:`role_selected`), as PEFT's ``target_modules=["q"]``
adapts both on T5.

A *stack* says which stack of layers a module belongs to, where a checkpoint holds more
than one, each numbered from 0: Gemma 3's vision tower has an ``encoder.layers.0.self_attn.q_proj``
beside its language model's ``layers.0.self_attn.q_proj``. Role and layer alone would make
them one cell of a layer × role table. ``None`` is the language model (the text decoder),
the only stack of an ordinary LM; see :data:`STACKS` for the others. A model that holds no language model is one
stack of its own, read from ``config.json`` (:func:`single_stack`): a ViT's, DINOv2's or a CLIP vision tower's
modules are ``vision``, a Wav2Vec2's ``audio``. A SAM-style segmenter (SAM, SAM-HQ, SAM 2) holds none either: its
vision encoder is ``vision``, its prompt encoder and mask decoder (a two-way transformer, its layers numbered from 0
again) ``mask_decoder``. A video tracker built on one (SAM 2 video, SAM 3 tracker video, EdgeTAM video) holds beside
them its ``memory_attention`` (the frame attending to the memory bank) and its ``memory_encoder`` (what writes the
bank: the mask's encoder, EdgeTAM's spatial perceiver, the object pointer's MLP); SAM 3 a detector, its
``detr_encoder`` and ``detr_decoder``, beside its ``geometry_encoder`` (its box and point prompts' encoder), its mask
decoder (``mask_decoder``) and its CLIP text encoder, the language model.

A layer is counted within its stack, in the order the model runs its blocks: a hierarchical backbone's (Swin's
``layers.S.blocks.B``, ConvNeXt's ``stages.S.layers.B``, PVT's ``block.S.B``) block is layer ``sum(depths[:S]) + B``
by ``config.json``'s ``depths`` (:func:`_staged_layer`), not its stage's number or its number within the stage.

A selection names stacks as the reports print them (:data:`STACK_NAMES`: ``language`` for None, which the reports
call "language model", or "decoder" beside an encoder; then ``vision``, ``encoder`` …). Every command selects a
module when its role is selected (:func:`role_selected`; pairing :func:`role_named`) and its stack is
(:func:`stack_selected`): ``--roles q,v --stacks language`` is a VLM's language-model q and v, not its vision
tower's, which ``--roles`` alone takes as PEFT's ``target_modules=["q_proj"]`` does.

Names are module names as they appear in checkpoints, without ``.weight``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from spectra.errors import ConfigError

ROLES = ("q", "k", "v", "o", "qkv", "q_a", "q_b", "kv_a", "kv_b", "kv", "o_a", "o_b", "xq", "xk", "xv", "xo", "gate",
         "up", "down", "gate_up", "projector", "embed", "pos_embed", "head", "other")
# The roles a fused module holds: a LoRA on it adapts all of them. MLA's factors hold the roles they compute: q_a and
# q_b the query, kv_a (the latent and the shared rotary key) and kv_b ([k_nope_h; v_h] per head) keys and values;
# DeepSeek-V4's kv (K = V) the keys and the values, its o_a and o_b the output.
FUSED_ROLES = {"qkv": frozenset({"q", "k", "v"}), "gate_up": frozenset({"gate", "up"}),
               "q_a": frozenset({"q"}), "q_b": frozenset({"q"}), "kv_a": frozenset({"k", "v"}),
               "kv_b": frozenset({"k", "v"}), "kv": frozenset({"k", "v"}), "o_a": frozenset({"o"}),
               "o_b": frozenset({"o"})}
# Roles whose whole module computes what other roles name, which also name it in a selection (an analysis's --roles q
# or o): MLA's query factors and DeepSeek-V4's output factors compute one role each; V4's kv computes the keys and,
# the same tensor, the values
_NAMED_BY = {"q_a": frozenset({"q"}), "q_b": frozenset({"q"}), "o_a": frozenset({"o"}), "o_b": frozenset({"o"}),
             "kv": frozenset({"k", "v"})}
# Cross-attention's role → the self-attention role that also names it in a selection.
CROSS_ROLES = {"xq": "q", "xk": "k", "xv": "v", "xo": "o"}


def role_selected(role: str, roles, name: str | None = None) -> bool:
    """Whether a module of `role` is targeted by `roles`: named itself, named by its self-attention role
    (``--roles q`` takes T5's ``EncDecAttention.q``, role ``xq``; ``--roles xq`` only cross-attention's),
    or fused with one that is (``--roles q,v`` takes GPT-2's ``c_attn``, whose LoRA adapts q, k and v together).

    With the module's `name`, a fused tensor of no fused role is taken by the roles of its rows too: GPT-2's
    cross-attention ``crossattention.c_attn`` (role ``other``, rows ``xk`` and ``xv``) by ``--roles k``, ``xv``, …"""
    parts = FUSED_ROLES.get(role, frozenset()) | (fused_roles(name) if name is not None else frozenset())
    return role_named(role, roles) or any(role_named(part, roles) for part in parts)


def fused_roles(name: str) -> frozenset:
    """The roles held by the rows of a fused tensor that has no fused role of its own, by its module name: GPT-2's
    cross-attention ``crossattention.c_attn`` holds ``xk`` and ``xv``, JetMoE's ``self_attention.kv_proj`` ``k`` and
    ``v``; empty for any other module."""
    if _CROSS_KV.search(name):
        return frozenset({"xk", "xv"})
    return frozenset({"k", "v"}) if _JETMOE_KV.search(name) else frozenset()


def parse_stacks(stacks, *, option: str = "stacks") -> tuple[str, ...] | None:
    """A stack selection checked and spelled as :data:`STACK_NAMES` do: None (every stack) stays None; a string is
    split on commas; ``decoder`` and ``language model`` are the language model's names in the reports, so read as
    ``language``. An unknown name is refused, naming `option` and the stacks spectra knows.

    >>> parse_stacks("language, vision")
    ('language', 'vision')
    >>> parse_stacks(["decoder", "encoder"])  # T5's, as its report names them
    ('language', 'encoder')
    """
    if stacks is None:
        return None
    items = stacks.split(",") if isinstance(stacks, str) else list(stacks)
    names = [LANGUAGE if str(s).strip().lower() in _LANGUAGE_ALIASES else str(s).strip().lower() for s in items]
    names = [n for n in dict.fromkeys(names) if n]
    if not names:
        raise ConfigError(f"{option}: no stack named; pass e.g. {LANGUAGE} or {LANGUAGE},vision (or leave it out "
                          "for every stack).")
    unknown = [n for n in names if n not in STACK_NAMES]
    if unknown:
        raise ConfigError(f"{option}: unknown stack(s) {', '.join(unknown)}; choose from {', '.join(STACK_NAMES)} "
                          f"({LANGUAGE}: the language model, which reports call 'language model', or 'decoder' "
                          "beside an encoder).")
    return tuple(names)


def stack_name(stack: str | None) -> str:
    """A module's stack (:attr:`ModuleInfo.stack`) as a selection names it: :data:`LANGUAGE` for None."""
    return LANGUAGE if stack is None else stack


def stack_selected(stack: str | None, stacks) -> bool:
    """Whether a module of `stack` (None: the language model) is in the selection `stacks` (as
    :func:`parse_stacks` returns it; None: every stack). The one stack rule of every command: a module is selected
    when its role is (:func:`role_selected`, :func:`role_named`) and its stack is."""
    return stacks is None or stack_name(stack) in stacks


def missing_stacks(stacks, present, *, option: str = "stacks") -> str | None:
    """Check a selection against the stacks a model holds (`present`: :attr:`ModuleInfo.stack` values).

    Raises ConfigError where the model holds none of `stacks` (nothing would be selected); returns a note naming
    those it lacks where it holds some of them, else None."""
    if stacks is None:
        return None
    held = sorted({stack_name(s) for s in present}, key=STACK_NAMES.index)
    lacking = [s for s in stacks if s not in held]
    if lacking and len(lacking) == len(stacks):
        which = "that stack" if len(stacks) == 1 else "those stacks"
        raise ConfigError(f"{option} {','.join(stacks)}: the model has no module of {which}; its stacks are "
                          f"{', '.join(held) or 'none'}.")
    if lacking:
        return f"{option}: the model has no {', '.join(lacking)} stack (its stacks: {', '.join(held)})"
    return None


def role_named(role: str, roles) -> bool:
    """Whether `roles` name a module of `role`: itself, or, for a cross-attention role, its self-attention role
    (``--roles q`` takes T5's ``EncDecAttention.q``, role ``xq``, as PEFT's ``target_modules`` do), or, for MLA's
    query factors ``q_a`` and ``q_b``, ``q``, for DeepSeek-V4's output factors ``o_a`` and ``o_b``, ``o``, and for
    its ``kv`` (K = V), ``k`` or ``v``. Pairing selects by this; :func:`role_selected` adds the fused tensors a LoRA
    target takes whole (MLA's ``kv_a`` and ``kv_b`` by ``k`` or ``v``)."""
    return (role in roles or CROSS_ROLES.get(role) in roles
            or any(named in roles for named in _NAMED_BY.get(role, ())))


# A decoder's attention over its encoder's output, by the name of its module; T5's self-attention modules. SAM's
# (SAM-HQ's, SAM 2's) mask decoder, a two-way transformer, holds beside each layer's self_attn a cross-attention of
# the prompt tokens over the image embedding (cross_attn_token_to_image, and final_attn_token_to_image after the last
# layer) and one of the image embedding over the tokens (cross_attn_image_to_token): cross-attention's roles, so that
# a layer's self-attention q is a cell of its own
# SAM 2's (SAM 3 tracker's, EdgeTAM's) video memory attention holds beside each layer's self_attn a cross_attn_image
# of the current frame over the memory bank; SAM 3's DETR decoder a text_cross_attn (queries over the prompt tokens)
# and a vision_cross_attn (queries over the image)
_CROSS_ATTENTION = (r"(encoder_attn|EncDecAttention|crossattention|cross_attn|cross_attn_token_to_image"
                    r"|cross_attn_image_to_token|final_attn_token_to_image|cross_attn_image|text_cross_attn"
                    r"|vision_cross_attn)")
# Embedding tables looked up by position or segment (role pos_embed): GPT-2's wpe, BERT's position_embeddings and
# token_type_embeddings (TAPAS's token_type_embeddings_N), LayoutLM's x_position_embeddings, CLIP's position_embedding,
# a ViT's pos_embed, GPT-1's positions_embed, BART's and OPT's embed_positions, T5's relative_attention_bias, …
# Bark's and CLVP's position_embeds_layer, WavLM's rel_attn_embed, Wav2Vec2-BERT's (SeamlessM4T-v2's, xcodec2's)
# distance_embedding, Phi-4-multimodal's audio relative_attention_bias_layer.bias_values, SpeechT5's relative
# embed_positions.pe_k, Kosmos-2.5's row_embedder/column_embedder, Florence2's and DETR's row_embeddings and
# column_embeddings
_POSITION_TABLES = (r"(wpe|\w*pos(ition)?s?_emb(eds?|eddings?)?(_table|_layer)?|\w*token_type_embeddings(_\d+)?"
                    r"|segment_emb(edding)?|embed_positions(\.pe_[kv])?|relative_attention_bias(_layer\.bias_values)?"
                    r"|rel_embeddings|rel_attn_embed|distance_embedding|(row|column)_embedd(er|ings))")
_T5_SELF_ATTENTION = r"(SelfAttention|LocalSelfAttention|TransientGlobalSelfAttention)"
# Ordered: the first rule whose pattern matches the end of the module name wins. More
# specific patterns (BERT's attention.output.dense) come before general ones (output.dense).
_ROLE_RULES: tuple[tuple[str, str], ...] = (
    # a router is no head, though SwitchTransformers' and NLLB-MoE's is named router.classifier; role other, as
    # Mixtral's block_sparse_moe.gate (a LoRA on it is no MLP's gate)
    (r"router\.classifier", "other"),
    # task heads first: RoBERTa's classifier.out_proj is a head, not an attention output
    (r"(classifier(\.dense|\.out_proj)?|score|qa_outputs)", "head"),
    # a SequenceSummary's projection (XLM's, FlauBERT's, XLNet's, ELECTRA's sequence_summary.summary; GPT-2's
    # double-heads multiple_choice_head.summary): the classifier's Linear over the pooled token (hidden → num_labels, or
    # hidden → hidden before ELECTRA's classifier), a task head as RoBERTa's classifier.dense is
    (r"(sequence_summary|multiple_choice_head)\.summary", "head"),
    # fused projections; BLIP-2's (and InstructBLIP's) vision tower self_attn.qkv; Qwen3.5's Gated DeltaNet
    # linear_attn.in_proj_qkv (its in_proj_z, in_proj_a and in_proj_b, a gate and two per-head scalars: other)
    (r"(attn\.c_attn|qkv_proj|query_key_value|Wqkv|attn\.qkv|self_attn\.qkv|linear_attn\.in_proj_qkv)", "qkv"),
    (r"(gate_up_proj)", "gate_up"),
    # ModernBERT's (and ModernBERT-decoder's) attn.Wo, the attention's output; its MLP's Wi, [gate; up] (its forward:
    # input, gate = Wi(x).chunk(2); Wo(act(input) · gate): the first half is activated, Llama's gate), and mlp.Wo, down
    (r"attn\.Wo", "o"),
    (r"mlp\.Wi", "gate_up"),
    (r"mlp\.Wo", "down"),
    # JetMoE's experts (JetMoeParallelExperts: a 3-D weight (experts, out, in), each expert's x @ W[e].T), as its
    # checkpoints and transformers name them (….weight stripped) and as spectra names one expert's slice (….3): the
    # MLP's input_linear (experts, 2·intermediate, hidden) is every expert's [gate; up] (its forward chunks the
    # output in two halves, activation(first) · second), output_linear (experts, hidden, intermediate) its down; the
    # mixture-of-attention's input_linear (experts, kv_heads·kv_channels, hidden) is each attention expert's query
    # projection, output_linear its output projection (the keys and values are kv_proj's, shared)
    # GraniteMoE's (GraniteMoeShared's, GraniteMoeHybrid's) shared expert, an nn.Linear pair as JetMoE's MLP
    # experts are one expert: shared_mlp.input_linear (2·shared_intermediate, hidden) is [gate; up] (its forward
    # chunks the output in two halves, activation(first) · second), shared_mlp.output_linear its down. Its routed
    # experts (block_sparse_moe.input_linear and output_linear, 3-D) are read per expert under the names
    # transformers 5 loads them into (block_sparse_moe.experts.3.gate_up_proj, down_proj: loaded_experts)
    (r"shared_mlp\.input_linear", "gate_up"),
    (r"shared_mlp\.output_linear", "down"),
    (r"mlp\.input_linear(\.\d+)?", "gate_up"),
    (r"mlp\.output_linear(\.\d+)?", "down"),
    (r"self_attention\.experts\.input_linear(\.\d+)?", "q"),
    (r"self_attention\.experts\.output_linear(\.\d+)?", "o"),
    # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, MiniCPM3, …): the query's and the key-value's factors
    (r"q_a_proj", "q_a"),
    (r"indexer\.q_b_proj", "other"),  # DeepSeek-V4's sparse-attention indexer scores tokens: no attention's query
    # AXK2's q_gate_proj: q_b fused with the attention's output gate (per head [q_h; g_h], as Qwen3-Next's q_proj)
    (r"(q_b_proj|q_gate_proj)", "q_b"),
    # DeepSeek-V4's KV compressors (and their indexer's): gate_proj gives the softmax weights that pool a window of
    # kv_proj's outputs into one entry, no MLP's gate
    (r"compressor\.(indexer\.)?gate_proj", "other"),
    (r"kv_a_proj_with_mqa", "kv_a"),
    (r"kv_b_proj", "kv_b"),
    # DeepSeek-V4's attention: one key-value head read as keys and values (K = V), and the grouped low-rank output's
    # two factors; its compressors' kv_proj (pooled into long-range entries) and JetMoE's self_attention.kv_proj
    # (a contiguous [k; v]: role other, its rows k and v, fused_roles) are not matched. Gemma 4's k_proj read as K = V
    # is kv too, by its config (module_info, _k_is_v)
    (r"self_attn\.kv_proj", "kv"),
    (r"o_a_proj", "o_a"),
    (r"o_b_proj", "o_b"),
    # DeepSeek-V4's checkpoints (the hub's, and transformers' save_pretrained) keep DeepSeek's names, which transformers
    # renames on loading: layers.N.attn.wq_a, wq_b, wkv, wo_a, wo_b (its attn.compressor.wkv, wgate and
    # attn.indexer.wq_b stay other: other names end them) and ffn.shared_experts.w1 (gate), w3 (up), w2 (down); the
    # routed experts' ffn.experts.N.w1 … are Mixtral's names, below
    (r"attn\.wq_a", "q_a"),
    (r"attn\.wq_b", "q_b"),
    (r"attn\.wkv", "kv"),
    (r"attn\.wo_a", "o_a"),
    (r"attn\.wo_b", "o_b"),
    (r"shared_experts\.w1", "gate"),
    (r"shared_experts\.w3", "up"),
    (r"shared_experts\.w2", "down"),
    # cross-attention, before self-attention's rules that its names match too: BART, mBART, Marian, Pegasus, Whisper
    # encoder_attn.q_proj; T5 EncDecAttention.q; BERT2BERT crossattention.self.query; Mllama, T5Gemma cross_attn.q_proj;
    # BLIP-2's Q-Former crossattention.attention.query; GPT-2's (add_cross_attention) crossattention.q_attn and c_proj,
    # its crossattention.c_attn being a fused [k; v] (role other, split into xk and xv: fused_projections)
    (rf"{_CROSS_ATTENTION}\.(q_proj|q|self\.query|attention\.query|q_attn)", "xq"),
    (rf"{_CROSS_ATTENTION}\.(k_proj|k|self\.key|attention\.key)", "xk"),
    (rf"{_CROSS_ATTENTION}\.(v_proj|v|self\.value|attention\.value)", "xv"),
    (rf"{_CROSS_ATTENTION}\.(out_proj|o_proj|o|output\.dense|c_proj)", "xo"),
    # MobileBERT's bottleneck.attention.dense (key_query_shared_bottleneck): hidden → intra_bottleneck_size, its
    # LayerNorm'd output the input of both query and key, no output projection (the o rule's attention.dense would
    # take it): a bottleneck of the layer's input, as its bottleneck.input.dense (the residual and, under
    # use_bottleneck_attention, every projection's input) and output.bottleneck.dense (back to hidden_size) are;
    # role other, no projection of one role
    (r"bottleneck\.attention\.dense", "other"),
    # attention, Llama/Mistral/Qwen2/Gemma/Phi-3/Mixtral; T5's SelfAttention.q (LongT5: Local-, TransientGlobal-);
    # BLIP-2's Q-Former (and ViT's) attention.attention.query; BLIP-2's vision tower self_attn.projection;
    # Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's vision tower blocks.N.attn.proj (after its fused attn.qkv);
    # Qwen2.5-Omni's vision tower, whose blocks.N.attn.q, k and v are three Linears
    (rf"(q_proj|self\.query|attention\.query|attention\.wq|{_T5_SELF_ATTENTION}\.q|blocks\.\d+\.attn\.q)", "q"),
    (rf"(k_proj|self\.key|attention\.key|attention\.wk|{_T5_SELF_ATTENTION}\.k|blocks\.\d+\.attn\.k)", "k"),
    (rf"(v_proj|self\.value|attention\.value|attention\.wv|{_T5_SELF_ATTENTION}\.v|blocks\.\d+\.attn\.v)", "v"),
    (r"(o_proj|out_proj|attention\.output\.dense|attention\.dense|attn\.c_proj|self_attention\.dense|attention\.wo"
     rf"|self_attn\.projection|attn\.proj|{_T5_SELF_ATTENTION}\.o)", "o"),
    # DistilBERT's attention.q_lin, k_lin, v_lin, out_lin and ffn.lin1, lin2 (XLM's and FlauBERT's: below);
    # DeBERTa-v2's (SEW-D's)
    # attention.self.query_proj, key_proj, value_proj; DeBERTa's attention.self.in_proj, per head [q_h; k_h; v_h]
    # (fused_projections); GPT-J's and CodeGen's mlp.fc_in, fc_out; ALBERT's albert_layers.N.ffn, ffn_output
    (r"attention\.q_lin", "q"),
    (r"attention\.k_lin", "k"),
    (r"attention\.v_lin", "v"),
    (r"attention\.out_lin", "o"),
    (r"ffn\.lin1", "up"),
    (r"ffn\.lin2", "down"),
    # SAM's MLP block (SamMLPBlock: lin1, act, lin2) in its vision encoder's layers and its mask decoder's two-way
    # transformer; SAM-HQ's, SegGPT's, GOT-OCR2's, DeepSeek-OCR2's and the other SAM-style towers' alike
    (r"mlp\.lin1", "up"),
    (r"mlp\.lin2", "down"),
    (r"attention\.self\.query_proj", "q"),
    (r"attention\.self\.key_proj", "k"),
    (r"attention\.self\.value_proj", "v"),
    # DeBERTa-v2's (SEW-D's) disentangled attention without share_att_key: pos_query_proj and pos_key_proj project
    # the relative-position embeddings to the position queries and keys (the p2c and c2p terms: content queries
    # against position keys, position queries against content keys). With share_att_key (DeBERTa-v3's configs)
    # query_proj and key_proj themselves project the positions, so these are a second path of the layer's q and k,
    # as Longformer's query_global is (below)
    (r"attention\.self\.pos_query_proj", "q"),
    (r"attention\.self\.pos_key_proj", "k"),
    (r"attention\.self\.in_proj", "qkv"),
    (r"mlp\.fc_in", "up"),
    (r"mlp\.fc_out", "down"),
    (r"albert_layers\.\d+\.ffn", "up"),
    (r"albert_layers\.\d+\.ffn_output", "down"),
    # XLM's and FlauBERT's layers are lists side by side, attentions.N (q_lin, k_lin, v_lin, out_lin: DistilBERT's
    # MultiHeadAttention) and ffns.N (lin1, then gelu or relu, lin2); _LAYER reads their N
    (r"attentions\.\d+\.q_lin", "q"),
    (r"attentions\.\d+\.k_lin", "k"),
    (r"attentions\.\d+\.v_lin", "v"),
    (r"attentions\.\d+\.out_lin", "o"),
    (r"ffns\.\d+\.lin1", "up"),
    (r"ffns\.\d+\.lin2", "down"),
    # Phi's (phi-1, phi-1.5, phi-2) and Persimmon's attention output self_attn.dense (Persimmon's query_key_value is
    # per head [q_h; k_h; v_h]: fused_projections)
    (r"self_attn\.dense", "o"),
    # MPNet's attention.attn.q, k, v, o (its intermediate.dense and output.dense are BERT's: up, down)
    (r"attention\.attn\.q", "q"),
    (r"attention\.attn\.k", "k"),
    (r"attention\.attn\.v", "v"),
    (r"attention\.attn\.o", "o"),
    # Longformer's (and LED's) global attention: query_global projects the global tokens' hidden states to their
    # queries, key_global and value_global every token's to the keys and values those queries attend over; the
    # output replaces the global tokens' rows of the attention's output, which attention.output.dense (o) reads. They
    # read the layer's own hidden states, as the local query, key and value do (no other stack's, as a
    # cross-attention's xk does), so they are q, k and v: a second path of one attention, compared and adapted with
    # it (a report's cell holds both, as a layer's experts share one). Untrained where no token is global (a
    # masked-LM fine-tune): their ΔW is zero, which an analysis shows as such
    (r"query_global", "q"),
    (r"key_global", "k"),
    (r"value_global", "v"),
    # LED's encoder attention is Longformer's under other names: self_attn.longformer_self_attn.query, key, value
    # (and their _global, above), its output projection self_attn.output
    (r"longformer_self_attn\.query", "q"),
    (r"longformer_self_attn\.key", "k"),
    (r"longformer_self_attn\.value", "v"),
    (r"self_attn\.output", "o"),
    # MobileBERT's extra FFNs (num_feedforward_networks − 1 per layer, before the layer's own intermediate and
    # output): ffn.N.intermediate.dense is up (the intermediate rule), ffn.N.output.dense its down
    (r"ffn\.\d+\.output\.dense", "down"),
    # AXK2's gated RMSNorm (input_layernorm, post_attention_layernorm): a low-rank mlp.fc1, fc2 whose sigmoid scales
    # the normed states, no block's MLP (its up and down)
    (r"(input|post_attention)_layernorm\.mlp\.(fc1|fc2)", "other"),
    # MLP; T5's DenseReluDense: wi (up) or, gated (v1.1, Flan-T5), wi_0 (gate) and wi_1 (up), then wo (down); BART's,
    # Whisper's, OPT's layers.N.fc1 and fc2 (an MLP's fc1 is up wherever a layer holds it directly); SwitchTransformers'
    # experts (experts.expert_N.wi, wo; never gated in transformers) and dense layers (layer.N.mlp.wi, wo); NLLB-MoE's
    # experts (experts.expert_N.fc1, fc2) and dense layers (layers.N.ffn.fc1, fc2);
    # BLIP-2's Q-Former: intermediate_query.dense and output_query.dense (the query tokens' MLP), as BERT's;
    # Qwen3-VL's and Qwen3.5's vision tower blocks.N.mlp.linear_fc1 and linear_fc2 (the merger's: projector)
    # DBRX's routed experts, read per expert as spectra names them (ffn.experts.mlp.3.w1: dbrx_experts): w1 is each
    # expert's gate (x @ w1[e].T, activated), v1 its up, w2 its down (h @ w2[e]: stored (in, out), read transposed)
    (r"ffn\.experts\.mlp\.\d+\.w1", "gate"),
    (r"ffn\.experts\.mlp\.\d+\.v1", "up"),
    (r"ffn\.experts\.mlp\.\d+\.w2", "down"),
    (r"(gate_proj|experts\.\d+\.w1|mlp\.fc_gate|feed_forward\.w1|DenseReluDense\.wi_0)", "gate"),
    (r"(up_proj|experts\.\d+\.w3|intermediate(_query)?\.dense|mlp\.c_fc|dense_h_to_4h|mlp\.(linear_)?fc1"
     r"|feed_forward\.w3|DenseReluDense\.wi(_1)?|layers\.\d+\.(ffn\.)?fc1|experts\.expert_\d+\.(wi|fc1)"
     r"|layer\.\d+\.mlp\.wi)", "up"),
    (r"(down_proj|experts\.\d+\.w2|layer\.\d+\.output(_query)?\.dense|mlp\.c_proj|dense_4h_to_h"
     r"|mlp\.(linear_)?fc2|feed_forward\.w2|DenseReluDense\.wo|layers\.\d+\.(ffn\.)?fc2|experts\.expert_\d+\.(wo|fc2)"
     r"|layer\.\d+\.mlp\.wo)", "down"),
    # embeddings and heads; T5's and BART's shared (the token embedding their encoder and decoder both read)
    (r"(embed_tokens|word_embeddings|wte|embed_in|tok_embeddings|shared|token_embedding|word_embedding|tokens_embed)",
     "embed"),
    # every other embedding table (an nn.Embedding: a LoRA on it is PEFT's Embedding LoRA, no block's Linear), by
    # its name: looked up by position or segment, not by token (the module docstring). They were other, so
    # recommend's default planned them
    (_POSITION_TABLES, "pos_embed"),
    (r"(lm_head|embed_out|classifier|score|cls\.predictions\.decoder)", "head"),
    # A vocabulary held as a module named embeddings: XLM's and FlauBERT's embeddings, Mamba's, Mamba-2's,
    # FalconMamba's, xLSTM's backbone.embeddings, RWKV's rwkv.embeddings, Nemotron-H's model.embeddings (in
    # transformers' models every weight so named is the model's input embedding: a container named embeddings, BERT's,
    # holds its tables under names of their own); XLM's language-model head pred_layer.proj (tied to it by default)
    (r"embeddings", "embed"),
    (r"pred_layer\.proj", "head"),
    # DeepSeek-V4's checkpoints' top-level embed and head (transformers' model.embed_tokens and lm_head); "^" keeps
    # any other model's ….head or ….embed module out
    (r"^embed", "embed"),
    (r"^head", "head"),
)
_ROLE_REGEXES = tuple((re.compile(rf"(^|\.){pattern}$"), role) for pattern, role in _ROLE_RULES)
# Stacks other than the language model's (None), in report order:
#   encoder        an encoder–decoder model's encoder (T5, BART, Whisper)
#   vision         a vision tower (Gemma 3, LLaVA, Qwen2-VL, Mllama's local layers, BLIP-2's ViT, CLIP's with its
#                  visual_projection), or a whole vision-only model (ViT, DINOv2, …: single_stack)
#   vision_global  Mllama's second vision stack, numbered from 0 again
#   mask_decoder   a SAM-style segmenter's prompt encoder and mask decoder (SAM's, SAM-HQ's, SAM 2's
#                  prompt_encoder.… and mask_decoder.…, whose two-way transformer's layers are numbered from 0
#                  again; a video tracker's mask_downsample, which shrinks a mask prompt for the prompt encoder),
#                  beside its vision encoder (vision): a SAM or a tracker holds no language model, SAM 3's is its
#                  text encoder
#   geometry_encoder  SAM 3's prompt encoder of boxes and points (geometry_encoder.layers.N: the prompts attending
#                  to each other and to the image), numbered from 0 again: a stack of its own, since SAM 3 video holds
#                  it beside its tracker's mask decoder, whose two-way transformer's layers are numbered alike
#   detr_encoder   SAM 3's detector encoder (detr_encoder.layers.N: the image features attending to the prompt's
#                  text and geometry tokens), numbered from 0 again
#   detr_decoder   SAM 3's detector decoder (detr_decoder.…: object queries attending to the prompt and the image,
#                  and their box, presence and reference-point heads) and its scoring of the queries against the text
#                  prompt (dot_product_scoring.…), numbered from 0 again
#   memory_attention  a video tracker's memory attention (SAM 2 video's, SAM 3 tracker video's, EdgeTAM video's
#                  memory_attention.layers.N: the current frame's features attending to the memory bank, numbered from
#                  0 again) and the projection of the memory's temporal positions it reads
#                  (temporal_positional_encoding_projection_layer)
#   memory_encoder a video tracker's memory encoder, what writes the memory bank: memory_encoder.… (the predicted
#                  mask downsampled and fused with the frame's features), EdgeTAM's spatial_perceiver.… (which
#                  compresses them, its layers numbered from 0 again) and object_pointer_proj.… (the mask decoder's
#                  output token → the object pointer kept beside them)
#   qformer        BLIP-2's and InstructBLIP's Q-Former, a BERT of its own between vision and text
#   audio          an audio tower (Qwen2-Audio), or a whole audio-only model (Wav2Vec2, HuBERT, …: single_stack)
#   projector      the layers that map another stack's features into the language model's
#   talker         an Omni model's speech decoder (Qwen2.5-Omni's, Qwen3-Omni's talker.…), beside its thinker's
#                  language model (the stack None) and numbered from 0 again
#   code_predictor Qwen3-Omni's talker's second decoder (talker.code_predictor.…), numbered from 0 again
#   vocoder        an Omni model's codes-to-waveform model (Qwen2.5-Omni's token2wav, Qwen3-Omni's code2wav, whose
#                  pre_transformer.layers.N are q, k, v, o, gate, up, down as the language model's)
STACKS = ("encoder", "vision", "vision_global", "mask_decoder", "geometry_encoder", "detr_encoder", "detr_decoder",
          "memory_attention", "memory_encoder", "qformer", "audio", "projector", "talker", "code_predictor", "vocoder")
# What a selection (``--stacks``) calls the stack None, the language model; "decoder" and "language model" are the
# names the reports give it (:func:`spectra.report.tables.stack_label`: "decoder" beside an encoder), so a user may
# type what a report shows.
LANGUAGE = "language"
_LANGUAGE_ALIASES = ("decoder", "language model", "language_model")
# Every stack a selection may name, in report order.
STACK_NAMES = (LANGUAGE, *STACKS)
# The first rule whose pattern matches wins. Tower names match a whole segment anywhere (Idefics3 nests its vision
# model under model., Gemma 3 its vision_model under vision_tower.); a projector's names are generic words, so they
# match only at the top of the name, or under the model. that transformers-5 multimodal classes wrap it in:
# LLaVA's multi_modal_projector.linear_1 (as stored) or model.multi_modal_projector.linear_1 (as transformers 5
# names it), Idefics3/SmolVLM's model.connector.modality_projection.proj, LLaVA-1.5's original model.mm_projector.0,
# BLIP-2's language_projection; a model.layers.0.mlp.connector is the language model's. Qwen2-VL's, Qwen2.5-VL's and
# Qwen3-VL's projector sits inside their vision tower (visual.merger, as stored; model.visual.merger, as transformers 5
# names it), beside Qwen3-VL's deepstack mergers (visual.deepstack_merger_list.N, feeding the language model's first
# layers; Qwen3-Omni's visual.merger_list.N): they come before the tower's rule.
_STACK_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)vision_model\.global_transformer(\.|$)", "vision_global"),
    (r"(^|\.)visual\.(merger|deepstack_merger_list|merger_list)(\.|$)", "projector"),
    # Gemma 3, PaliGemma, Llava, Pixtral: vision_tower; Mllama, Idefics, Llama 4, BLIP-2: vision_model; Qwen2-VL: visual
    (r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|image_encoder|vision_backbone)(\.|$)", "vision"),
    # a CLIP-like dual encoder's image projection into the joint embedding (CLIP's, AltCLIP's, OWL-ViT's
    # owlvit.visual_projection, GroupViT's visual_projection.N): the vision tower's output, as its text_projection is
    # the text model's (the language model's). One segment above it at most: VisualBERT's
    # embeddings.visual_projection feeds its text encoder, GIT's git.visual_projection.visual_projection.0 its decoder
    (r"^(\w+\.)?visual_projection(\.\d+)?$", "vision"),
    # SAM, SAM-HQ, SAM 2 (and the trackers built on them): the prompt encoder (points, boxes, a mask prompt) and the
    # mask decoder (a two-way transformer between the prompt tokens and the image embedding) beside vision_encoder.…
    (r"(^|\.)(prompt_encoder|mask_decoder|mask_downsample)(\.|$)", "mask_decoder"),
    # SAM 2's (SAM 3 tracker's, EdgeTAM's) video trackers: the memory attention and the memory encoder beside the
    # image model's vision encoder and mask decoder; SAM 3's detector (a DETR encoder and decoder between the vision
    # encoder and the mask decoder, its text encoder the language model); SAM 3 video's tracker_neck (the tracker's
    # feature pyramid over the shared vision backbone) is vision
    (r"(^|\.)(memory_attention|temporal_positional_encoding_projection_layer)(\.|$)", "memory_attention"),
    (r"(^|\.)(memory_encoder|spatial_perceiver|object_pointer_proj)(\.|$)", "memory_encoder"),
    (r"(^|\.)geometry_encoder(\.|$)", "geometry_encoder"),
    (r"(^|\.)detr_encoder(\.|$)", "detr_encoder"),
    (r"(^|\.)(detr_decoder|dot_product_scoring)(\.|$)", "detr_decoder"),
    (r"(^|\.)tracker_neck(\.|$)", "vision"),
    (r"(^|\.)qformer(\.|$)", "qformer"),  # BLIP-2: qformer.encoder.layer.0… beside language_model…layers.0…
    (r"(^|\.)(audio_tower|audio_model|audio_encoder)(\.|$)", "audio"),
    # ColPali's, ColQwen2's and ColModernVBERT's retrievers wrap their VLM as vlm.…
    (r"^(vlm\.)?(model\.)?(multi_modal_projector|mm_projector|connector|language_projection)(\.|$)", "projector"),
    # Qwen2.5-Omni, Qwen3-Omni: the whole model's talker.…, token2wav.… / code2wav.… beside its thinker.…
    (r"(^|\.)talker\.code_predictor(\.|$)", "code_predictor"),
    (r"(^|\.)talker(\.|$)", "talker"),
    (r"(^|\.)(token2wav|code2wav)(\.|$)", "vocoder"),
)
_STACK_REGEXES = tuple((re.compile(pattern), stack) for pattern, stack in _STACK_RULES)
# Model types (config.json's model_type) of models that hold no language model, only a vision (or an audio) encoder:
# every module is of that one stack (single_stack), which their names (ViT's encoder.layer.N…, Wav2Vec2's
# wav2vec2.encoder.layers.N…) do not say. Besides these, a model type ending in _vision_model or _vision_encoder
# (a VLM's tower config, as CLIPVisionModel saves it alone: clip_vision_model, siglip_vision_model, …) is vision, one
# ending in _audio_encoder audio. Not a multimodal model's type, whose language model is the stack None; not an
# encoder–decoder's (DETR's, Whisper's: encoder and decoder stacks). tests/checkpoints/test_single_stack.py holds the
# names to transformers' config classes.
_VISION_ONLY = frozenset({
    "vit", "vit_mae", "vit_msn", "deit", "beit", "data2vec-vision", "dinov2", "dinov2_with_registers", "dinov3_vit",
    "dinov3_convnext", "ijepa", "swin", "swinv2", "donut-swin", "maskformer-swin", "dinat", "hiera", "focalnet",
    "convnext", "convnextv2", "levit", "cvt", "pvt", "pvt_v2", "poolformer", "segformer", "swiftformer", "efficientnet",
    "mobilenet_v1", "mobilenet_v2", "mobilevit", "mobilevitv2", "regnet", "resnet", "bit", "hgnet_v2", "vitdet", "yolos",
    "dpt", "glpn", "timesformer", "videomae", "vivit", "vjepa2", "imagegpt",
    # SAM-style segmenters of one image: a vision encoder, a prompt encoder and a mask decoder (the mask_decoder stack,
    # by name), no language model; their shared positional embedding (shared_image_embedding), SAM 2's
    # no_memory_embedding are the vision stack's
    "sam", "sam_hq", "sam2", "sam3_tracker", "edgetam",
    # their video trackers: beside those stacks, the memory_attention and memory_encoder stacks (by name); the
    # memory's learned parameters (no_memory_embedding, no_object_pointer, memory_temporal_positional_encoding …)
    # are the vision stack's as SAM 2's no_memory_embedding is
    "sam2_video", "sam3_tracker_video", "edgetam_video"})
_AUDIO_ONLY = frozenset({
    "wav2vec2", "wav2vec2-conformer", "wav2vec2-bert", "hubert", "wavlm", "sew", "sew-d", "unispeech", "unispeech-sat",
    "data2vec-audio", "audio-spectrogram-transformer", "clap_audio_model", "parakeet_encoder"})
# Classes that keep a dual encoder's vision tower alone under the whole model's model type (clip, siglip, …): its
# names are vision_model.… (the vision stack by name) but its classifier's is not
_VISION_ONLY_ARCHITECTURES = frozenset({"CLIPForImageClassification", "SiglipForImageClassification",
                                        "Siglip2ForImageClassification", "MetaClip2ForImageClassification"})
# The role of a stack's module that no role rule names (it would be other): a projector's Linears (LLaVA's
# multi_modal_projector.linear_1, Qwen2-VL's visual.merger.mlp.0, BLIP-2's language_projection, …) are what the
# projector computes. Its norms (Qwen2-VL's merger.ln_q, InternVL's layer_norm, Gemma 3's mm_soft_emb_norm, Pixtral's
# norm: _NORM) stay other, as the language model's do.
_STACK_ROLES = {"projector": "projector"}
# A projector's parameters outside its Linears keep other (no module PEFT adapts, so no projector role to leave out):
# Gemma 3's mm_input_projection_weight (a bare x @ W matrix), Aria's cross-attention in_proj_weight (MultiheadAttention
# packs q, k, v in one parameter) and learned query, Idefics2's perceiver latents. Read off the name: module_info sees
# no types (tests/checkpoints/test_architectures_projector_parameters.py holds it to the models).
_STACK_PARAMETERS = re.compile(r"(^|\.)(\w+_weight|latents|query)$")
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln(_\w+)?)$")
# In an encoder–decoder model (config.json's is_encoder_decoder: T5, BART, Whisper, Marian) the first of these
# segments decides: T5's encoder.block.0 is the encoder, EncoderDecoderModel's decoder.bert.encoder.layer.0 the decoder.
# Only then: BERT's encoder.layer.N and OPT's model.decoder.layers.N are an ordinary model's one stack.
_ENCODER_DECODER = re.compile(r"(?:^|\.)(encoder|decoder)\.")
# Model types whose default config (transformers 5.24) is an encoder–decoder's (is_encoder_decoder): what a reader of
# an analysis.json, which keeps the model type but not the config, takes config.json's is_encoder_decoder to be
# (encoder_decoder_config). tests/checkpoints/test_composite_stacks_s21.py holds it to transformers' configs.
ENCODER_DECODER_MODEL_TYPES = frozenset({
    "autoformer", "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "canary", "canary_decoder", "cohere_asr",
    "conditional_detr", "d_fine", "dab-detr", "deformable_detr", "deimv2", "detr", "dia", "dia_decoder",
    "encoder-decoder", "fastspeech2_conformer", "florence2", "fsmt", "grounding-dino", "informer", "led", "longt5",
    "m2m_100", "marian", "mbart", "mm-grounding-dino", "moonshine", "moonshine_streaming", "mt5", "musicgen",
    "musicgen_melody", "mvp", "nemotron3_5_asr", "nemotron_asr_streaming", "nllb-moe", "omdet-turbo", "parakeet_rnnt",
    "parakeet_tdt", "pegasus", "pegasus_x", "pix2struct", "plbart", "pop2piano", "pp_doclayout_v2", "pp_doclayout_v3",
    "pp_doclayout_v4", "pp_formulanet", "pp_formulanet_text", "prophetnet", "rag", "rt_detr", "rt_detr_v2",
    "seamless_m4t", "seamless_m4t_v2", "speech-encoder-decoder", "speech_to_text", "speecht5", "switch_transformers",
    "t5", "t5gemma", "t5gemma2", "table-transformer", "time_series_transformer", "udop", "umt5",
    "vision-encoder-decoder", "whisper"})
# A layer's index; Qwen3-VL's deepstack mergers (deepstack_merger_list.N, Qwen3-Omni's merger_list.N) are numbered
# within the projector stack, the merger of the tower's last layer having none. XLM and FlauBERT keep a layer's
# modules in parallel lists (attentions.N, ffns.N, layer_norm1.N …), one entry per layer.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|deepstack_merger_list|merger_list|attentions|ffns)"
                    r"\.(\d+)\.")
# Hierarchical vision backbones keep their blocks in stages, each numbered from 0: Swin's (SwinV2's, Donut-Swin's,
# MaskFormer-Swin's, PVTv2's) layers.S.blocks.B, ConvNeXt's (FocalNet's, Hiera's, ResNet's, BiT's, CvT's …)
# stages.S.layers.B, PVT's (PoolFormer's, GLPN's, SegFormer's) block.S.B. _LAYER reads S (Swin, PVT) or B (ConvNeXt)
# alone, so the blocks of a stage, or the first blocks of every stage, would share one row of a layer × role table; a
# block's layer is its place in the whole stack instead, sum(depths[:S]) + B (_staged_layer), by config.json's depths
# (a model type here; the config itself, or a backbone's or an encoder's nested config). The last regex of a layout
# reads a stage's module outside its blocks (Swin's downsample, ConvNeXt's downsampling_layer): it takes the layer of
# the stage's block next to it in the model's order, the first block's where _BEFORE_BLOCKS names it (it runs before
# them), else the last's. tests/checkpoints/test_vision_stacks_s20.py holds each to transformers' module order.
_SWIN_LAYOUT = ((re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)(?:\.|$)"),), re.compile(r"(?:^|\.)layers\.(\d+)\."))
_STAGES_LAYOUT = ((re.compile(r"(?:^|\.)stages\.(\d+)\.layers\.(\d+)(?:\.|$)"),), re.compile(r"(?:^|\.)stages\.(\d+)\."))
# SegFormer's hub checkpoints keep its blocks as PVT's (block.S.B, the stage's patch_embeddings.S and layer_norm.S
# outside it), transformers 5 as stages.S.blocks.B beside stages.S.patch_embeddings and stages.S.layer_norm
_PVT_LAYOUT = ((re.compile(r"(?:^|\.)block\.(\d+)\.(\d+)(?:\.|$)"), re.compile(r"(?:^|\.)stages\.(\d+)\.blocks\.(\d+)(?:\.|$)")),
               re.compile(r"(?:^|\.)stages\.(\d+)\."))
_STAGE_LAYOUTS = {
    **dict.fromkeys(("swin", "swinv2", "donut-swin", "maskformer-swin", "pvt_v2"), (_SWIN_LAYOUT, "depths")),
    **dict.fromkeys(("convnext", "convnextv2", "dinov3_convnext", "focalnet", "hiera", "resnet", "bit", "regnet"),
                    (_STAGES_LAYOUT, "depths")),
    "cvt": (_STAGES_LAYOUT, "depth"),
    **dict.fromkeys(("pvt", "poolformer", "glpn", "segformer"), (_PVT_LAYOUT, "depths")),
}
# A stage's modules outside its blocks, as transformers names them: those that run before the blocks (a downsampling
# or patch embedding at the stage's head: ConvNeXt, DINOv3-ConvNeXt, PVTv2, SegFormer, CvT) and after them (Swin's
# and FocalNet's downsample, PVTv2's and SegFormer's layer_norm). Another name under a stage keeps _LAYER's reading.
_BEFORE_BLOCKS = re.compile(r"^(downsampling_layer|downsample_layers|patch_embeddings?|embedding)(\.|$)")
_AFTER_BLOCKS = re.compile(r"^(downsample|layer_norm)(\.|$)")
# An expert's index: Mixtral's experts.3.w1, SwitchTransformers' and NLLB-MoE's experts.expert_3.wi; JetMoE's
# per-expert records, named by their 3-D module and the index (mlp.input_linear.3,
# self_attention.experts.output_linear.3)
_EXPERT = re.compile(r"(?:^|\.)experts\.(?:expert_)?(\d+)(?:\.|$)|(?:^|\.)(?:mlp|self_attention\.experts)\."
                     r"(?:input|output)_linear\.(\d+)$|(?:^|\.)ffn\.experts\.mlp\.(\d+)\.(?:w1|v1|w2)$")

# transformers' Conv1D (weight stored (in, out)) is used by these model types.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "imagegpt", "decision_transformer", "openai-gpt"})
_CONV1D_NAMES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)$")
_MLP_PROJ = re.compile(r"(^|\.)mlp\.c_proj$")
# GPT-BigCode's self-attention c_attn (nn.Linear); its cross-attention's (add_cross_attention) is crossattention.c_attn
_BIGCODE_QKV = re.compile(r"(^|\.)attn\.c_attn$")
# 2-D weights that are no Linear's but a matrix the model multiplies from the right (x @ W), so stored (in, out):
# Gemma 3's multimodal projector, (vision hidden, text hidden).
_IN_OUT_MATRICES = {"gemma3": re.compile(r"(^|\.)multi_modal_projector\.mm_input_projection_weight$")}
# Fused qkv tensors whose rows interleave per head ([q_h; k_h; v_h] for each head h).
_HEAD_INTERLEAVED_QKV = frozenset({"gpt_neox", "bloom", "gpt_neox_japanese", "deberta", "persimmon"})
# A model whose language model is another family's, named by model type, its sizes in text_config (which the hub's
# config.json may leave to the top level): Fuyu's is a Persimmon (query_key_value per head [q_h; k_h; v_h]);
# ModernVBERT's, PE-Audio's, PE-Video's and PE-Audio-Video's text_model is a ModernBERT (AutoModel.from_config of
# their text_config, whose attn.Wqkv is contiguous [q; k; v]), as is ColModernVBERT's (its vlm_config's text_config).
# Read for the language model's modules only: a tower's are sized by its own config.
_TEXT_MODEL_TYPES = {"fuyu": "persimmon", "modernvbert": "modernbert", "pe_audio": "modernbert",
                     "pe_video": "modernbert", "pe_audio_video": "modernbert", "colmodernvbert": "modernbert"}
# 3-D expert tensors stored (experts, in, out) — the model computes x @ W[e] — instead of (experts, out, in).
# transformers marks them ``is_transposed`` (gpt-oss, OpenAI's privacy filter, Aria), except Llama 4's.
IN_OUT_EXPERT_MODEL_TYPES = frozenset({"llama4", "llama4_text", "gpt_oss", "openai_privacy_filter", "aria", "ergo",
                                       "aria_text"})
# 3-D expert tensors that transformers transposes on loading only where their shape is the transpose of the model's
# (Transpose(1, 2, check_dims=True)): Qwen3-VL-MoE's hub checkpoints store them (experts, in, out), as its first
# transformers release held them, and transformers 5 saves them (experts, out, in), as it holds them now.
_TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"qwen3_vl_moe"})
# Fused expert gate_up whose outputs alternate gate, up, gate, up, … (gpt-oss: gate_up[..., ::2], [..., 1::2]).
_INTERLEAVED_GATE_UP = frozenset({"gpt_oss"})
# Fused qkv tensors laid out as contiguous [q; k; v] blocks (GQA-aware widths). MPT's attn.Wqkv (3·d_model
# outputs, chunked in three by its forward).
# BLIP-2's and InstructBLIP's vision towers (model_type of their vision_config): one Linear, out = 3·hidden, viewed
# (3, heads, head_dim) by their attention's forward.
# Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's (and their MoE models') vision towers: attn.qkv, out = 3·width,
# viewed (seq, 3, heads, head_dim) by their attention's forward.
# Qwen3-Omni's tower (Qwen3-VL's) is its thinker's: thinker_config.vision_config in the whole model's config.json.
# _VISION_MODEL_TYPES: the vision tower's model type, by the whole model's, for configs whose vision_config does not
# name its own: the hub's Qwen2-VL and Qwen2.5-VL config.json hold a vision_config with no model_type, or with the
# whole model's (as transformers' Qwen3.5 config, which renames it, expects too).
_VISION_MODEL_TYPES = {"qwen2_vl": "qwen2_vl_vision", "qwen2_5_vl": "qwen2_5_vl_vision",
                       "qwen3_vl": "qwen3_vl_vision", "qwen3_vl_moe": "qwen3_vl_moe_vision",
                       "qwen3_5": "qwen3_5_vision", "qwen3_5_moe": "qwen3_5_moe_vision",
                       "qwen3_omni_moe": "qwen3_omni_moe_vision_encoder",
                       "qwen3_omni_moe_thinker": "qwen3_omni_moe_vision_encoder"}
_CONTIGUOUS_QKV = frozenset({"gpt2", "mpt", "modernbert", "phi3", "phimoe", "imagegpt", "decision_transformer", "blip_2_vision_model",
                             "instructblip_vision_model", "instructblipvideo_vision_model",
                             *_VISION_MODEL_TYPES.values()})
# The config key of an attention's width where it is not hidden_size: Qwen2-VL's vision_config names its tower's width
# embed_dim, its hidden_size being the merger's output (the language model's width).
_WIDTH_KEYS = {"qwen2_vl_vision": "embed_dim", "mpt": "d_model"}
_CONTIGUOUS_QKV_NAMES = re.compile(r"(^|\.)(c_attn|qkv_proj)$")
# Qwen3.5's Gated DeltaNet linear_attn.in_proj_qkv: contiguous [q; k; v] with heads of its own (text_config's
# linear_num_key_heads × linear_key_head_dim rows each for q and k, linear_num_value_heads × linear_value_head_dim for
# v), split so by its forward after a depthwise (per-channel) convolution.
_DELTANET_QKV = re.compile(r"(^|\.)linear_attn\.in_proj_qkv$")
_DELTANET_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"})
# GPT-2's cross-attention (add_cross_attention; GPT2Attention(is_cross_attention=True)): its c_attn projects the
# encoder's states to [k; v] (2·n_embd outputs, split in two by its forward), its q_attn the queries. A fused tensor
# of no fused role (ROLES has none for cross-attention's k and v): role other, its rows xk and xv.
_CROSS_KV = re.compile(r"(^|\.)crossattention\.c_attn$")
# JetMoE's self_attention.kv_proj: contiguous [k; v] (kv_proj(x).chunk(2, -1)), 2·num_key_value_heads·kv_channels
# outputs; role other, its rows k and v (no other transformers class names a module so: the slow role scan).
_JETMOE_KV = re.compile(r"(^|\.)self_attention\.kv_proj$")
_JETMOE_MODEL_TYPES = frozenset({"jetmoe"})
# JetMoE's experts (JetMoeParallelExperts, module names without .weight): a 3-D weight (experts, out, in) whose
# expert e computes F.linear(x, W[e]); no LoRA module wraps one, PEFT adapts it through target_parameters
_JETMOE_EXPERTS = re.compile(r"(^|\.)(mlp|self_attention\.experts)\.(input|output)_linear$")
# GraniteMoE's routed experts as its checkpoints store them (GraniteMoeShared's and GraniteMoeHybrid's alike):
# block_sparse_moe.input_linear.weight (experts, 2·intermediate, hidden), every expert's [gate; up] (its forward
# chunks F.linear(x, W[e]) in two halves, gate first), output_linear.weight (experts, hidden, intermediate) its down.
# transformers 5 renames them on loading into block_sparse_moe.experts.gate_up_proj and down_proj, as stored
# (conversion_mapping's WeightRenaming: no transposition), which PEFT adapts through target_parameters.
_GRANITE_EXPERTS = re.compile(r"(^|\.)block_sparse_moe\.(input|output)_linear$")
_GRANITE_MODEL_TYPES = frozenset({"granitemoe", "granitemoeshared", "granitemoehybrid"})
# DBRX's routed experts (DbrxExpertGLU): ffn.experts.mlp.w1, v1 and w2, each ONE 2-D parameter (experts·ffn, d_model)
# (no .weight). Its forward views each (experts, ffn, d_model) and takes expert e's [e]: gate x @ w1[e].T, up
# x @ v1[e].T, down h @ w2[e] (so w2[e] is the expert's down projection stored (in, out)). Read per expert by
# dbrx_experts, named ffn.experts.mlp.3.w1 (roles gate, up, down).
_DBRX_EXPERTS = re.compile(r"(^|\.)ffn\.experts\.mlp\.(w1|v1|w2)$")
# A module path under a mixture-of-experts block (experts, block_sparse_moe, moe, sparse_moe, …): a 3-D .weight
# there that no rule reads per expert is skipped with a note, never read as one flattened matrix as a convolution's
# kernel (out, in, k) is
_MOE_CONTAINER = re.compile(r"(^|\.)(\w*experts?|\w*moe\w*|\w*mixture\w*)(\.|$)", re.IGNORECASE)
# Gemma 4's key projection, which a full-attention layer of a config with attention_k_eq_v reads as keys and values
# (it holds no v_proj): role kv, decided per layer by _k_is_v
_K_AS_V = re.compile(r"(^|\.)self_attn\.k_proj$")


@dataclass(frozen=True)
class ModuleInfo:
    """What the name of one module tells: its role, layer, expert index and stack."""

    role: str
    layer: int | None  # counted within its stack
    expert: int | None
    stack: str | None = None  # None: the language model; else one of STACKS (a vision tower, an encoder, …)


def module_info(name: str, config: dict[str, Any] | None = None) -> ModuleInfo:
    """Role, layer index, expert index and stack of a module name (without ``.weight``).

    `config` (``config.json``) is needed for one thing only: whether ``encoder.`` names an
    encoder–decoder model's encoder (``is_encoder_decoder``) or an encoder-only model's one stack.

    >>> module_info("model.layers.3.self_attn.q_proj")
    ModuleInfo(role='q', layer=3, expert=None, stack=None)
    >>> module_info("transformer.h.0.attn.c_attn")
    ModuleInfo(role='qkv', layer=0, expert=None, stack=None)
    >>> module_info("vision_tower.encoder.layers.0.self_attn.q_proj")
    ModuleInfo(role='q', layer=0, expert=None, stack='vision')
    >>> module_info("model.multi_modal_projector.linear_1")  # LLaVA's projector (transformers 5's names)
    ModuleInfo(role='projector', layer=None, expert=None, stack='projector')
    """
    role = "other"
    for regex, candidate in _ROLE_REGEXES:
        if regex.search(name):
            role = candidate
            break
    stack = module_stack(name, config)
    if role == "other" and stack in _STACK_ROLES and not _NORM.search(name) and not _STACK_PARAMETERS.search(name):
        role = _STACK_ROLES[stack]  # a projector's Linear: role projector
    found = _LAYER.search(name)
    layer = _staged_layer(name, config)
    layer = int(found.group(1)) if layer is None and found else layer
    expert = _EXPERT.search(name)
    if role == "k" and stack is None and layer is not None and _K_AS_V.search(name) and _k_is_v(layer, config):
        role = "kv"  # Gemma 4's full-attention k_proj under attention_k_eq_v: its output is the keys and the values
    index = next((int(g) for g in expert.groups() if g is not None), None) if expert else None
    return ModuleInfo(role, layer, index, stack)


def _staged_layer(name: str, config: dict[str, Any] | None) -> int | None:
    """The layer of a hierarchical vision backbone's module (:data:`_STAGE_LAYOUTS`): block B of stage S is layer
    ``sum(depths[:S]) + B``, its place among every block of the stack, as a ViT's ``encoder.layer.N`` is N; a
    stage's module outside its blocks takes the layer of the stage's first block (Swin-style
    ``layers.S.patch_embedding``, ConvNeXt's ``stages.S.downsampling_layer``: they run before them) or last block
    (Swin's ``layers.S.downsample``). None where the config names no such backbone or its ``depths`` do not hold
    the name's stage and block (then :data:`_LAYER` reads the name as before).

    >>> cfg = {"model_type": "swin", "depths": [2, 2, 6, 2]}
    >>> [_staged_layer(f"encoder.layers.{s}.blocks.{b}.attention.q_proj", cfg) for s, b in ((0, 0), (1, 1), (2, 0))]
    [0, 3, 4]
    >>> _staged_layer("encoder.layers.1.downsample.reduction", cfg), _staged_layer("encoder.layers.1.blocks.0.x", None)
    (3, None)
    """
    cfg = config or {}
    staged = cfg if cfg.get("model_type") in _STAGE_LAYOUTS else None
    if staged is None:  # a backbone's (MaskFormer's, UperNet's), an encoder's (Donut's) or a vision tower's config
        nested = [(cfg.get("backbone_config"), None), (cfg.get("encoder"), "encoder"), (cfg.get("vision_config"),
                                                                                          "vision")]
        staged = next((c for c, part in nested if isinstance(c, dict) and c.get("model_type") in _STAGE_LAYOUTS
                       and (part is None or module_stack(name, cfg) == part)), None)
    if staged is None:
        return None
    (blocks, stage), key = _STAGE_LAYOUTS[staged["model_type"]]
    depths = staged.get(key)
    if not (isinstance(depths, list) and depths and all(isinstance(d, int) and d > 0 for d in depths)):
        return None
    found = next((m for m in (regex.search(name) for regex in blocks) if m is not None), None)
    if found is not None:
        s, b = int(found.group(1)), int(found.group(2))
        return sum(depths[:s]) + b if s < len(depths) and b < depths[s] else None
    found = stage.search(name)
    if found is None or int(found.group(1)) >= len(depths):
        return None
    s, rest = int(found.group(1)), name[found.end():]
    if _BEFORE_BLOCKS.match(rest):
        return sum(depths[:s])
    return sum(depths[:s]) + depths[s] - 1 if _AFTER_BLOCKS.match(rest) else None


def stage_depths(names, model_type: str | None) -> dict[str, Any] | None:
    """The ``config.json`` entries that number a hierarchical backbone's blocks over its whole stack
    (:func:`_staged_layer`: ``{"model_type": …, "depths": […]}``), read off its module `names` where the config is not
    at hand (an analysis.json keeps the names and the model type): stage S's depth is one more than the highest block
    B that a name ``…layers.S.blocks.B…`` (the layout's) holds. None for a model type of no such layout, or where a
    stage before the last one named has no block among `names` (its depth, which the later stages' numbers need, is
    unknown). Exact where the names hold every block's module, as an analysis's rows do (each block holds Linears).

    >>> stage_depths(["encoder.layers.0.blocks.1.attention.self.query", "encoder.layers.1.blocks.0.output.dense"],
    ...              "swin")
    {'model_type': 'swin', 'depths': [2, 1]}
    """
    if model_type not in _STAGE_LAYOUTS:
        return None
    (blocks, _), key = _STAGE_LAYOUTS[model_type]
    depths: dict[int, int] = {}
    for name in names:
        found = next((m for m in (regex.search(name) for regex in blocks) if m is not None), None)
        if found is not None:
            stage, block = int(found.group(1)), int(found.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if not depths or sorted(depths) != list(range(max(depths) + 1)):
        return None
    return {"model_type": model_type, key: [depths[s] for s in sorted(depths)]}


def encoder_decoder_config(model_type: str | None) -> dict[str, Any] | None:
    """A config that names `model_type` and says whether it is an encoder–decoder's
    (:data:`ENCODER_DECODER_MODEL_TYPES`): what :func:`module_stack` reads off ``config.json`` to tell an encoder's
    modules (T5's ``encoder.block.0``, Whisper's ``model.encoder.layers.0``) from the language model's, where only the
    model type is kept (an analysis.json's ``pairing.config_model_type``). None without a model type.

    >>> encoder_decoder_config("whisper"), encoder_decoder_config("bert")
    ({'model_type': 'whisper', 'is_encoder_decoder': True}, {'model_type': 'bert', 'is_encoder_decoder': False})
    """
    if not isinstance(model_type, str):
        return None
    return {"model_type": model_type, "is_encoder_decoder": model_type in ENCODER_DECODER_MODEL_TYPES}


def vector_info(name: str, config: dict[str, Any] | None = None) -> ModuleInfo:
    """:func:`module_info` of a 1-D or 0-D tensor by its full name: its owner's (``q_proj.bias`` belongs to
    ``q_proj``: role q), but role ``other`` where the owner's name reads as a table (role embed or pos_embed).

    An embedding table (nn.Embedding) holds one matrix and no vector, so a vector under a module so named is a
    parameter of a container: CLIP's ``vision_model.embeddings.class_embedding`` (CLIPVisionEmbeddings is named
    ``embeddings``, the name of XLM's and Mamba's token tables) is no token table.

    >>> vector_info("vision_model.embeddings.class_embedding").role, vector_info("model.layers.0.self_attn.q_proj.bias")
    ('other', ModuleInfo(role='q', layer=0, expert=None, stack=None))
    """
    owner = module_info(name.rpartition(".")[0], config)
    return replace(owner, role="other") if owner.role in ("embed", "pos_embed") else owner


def _k_is_v(layer: int, config: dict[str, Any] | None) -> bool:
    """Whether the language model's `layer` reads its ``k_proj`` output as keys and values, as Gemma 4's attention
    does (``use_alternative_attention = config.attention_k_eq_v and not is_sliding``, with no ``v_proj``): the text
    config (``text_config`` where it has one) sets ``attention_k_eq_v`` and ``layer_types`` does not make the layer
    ``sliding_attention``. Without ``layer_types``, Gemma 4's default pattern (every sixth layer full), and the last
    layer is full either way, as transformers' config forces it.

    >>> cfg = {"attention_k_eq_v": True, "layer_types": ["sliding_attention", "full_attention"]}
    >>> _k_is_v(0, cfg), _k_is_v(1, cfg), _k_is_v(1, {**cfg, "attention_k_eq_v": False})
    (False, True, False)
    """
    cfg = config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    if not text.get("attention_k_eq_v"):
        return False
    types = text.get("layer_types")
    if not types:
        count = text.get("num_hidden_layers")
        if not isinstance(count, int) or count < 1:
            return False
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(count)]
    types = [*types[:-1], "full_attention"]
    return layer < len(types) and types[layer] != "sliding_attention"


def module_stack(name: str, config: dict[str, Any] | None = None) -> str | None:
    """The stack of layers a module belongs to: None for the language model, else one of :data:`STACKS`.

    >>> module_stack("language_model.model.layers.0.self_attn.q_proj")  # Gemma 3's text model
    >>> module_stack("visual.blocks.0.attn.qkv")  # Qwen2-VL
    'vision'
    >>> module_stack("model.encoder.layers.0.self_attn.q_proj", {"is_encoder_decoder": True})  # BART
    'encoder'
    """
    for regex, stack in _STACK_REGEXES:
        if regex.search(name):
            return stack
    single = single_stack(config)
    if single is not None:
        return single
    if (config or {}).get("is_encoder_decoder"):
        first = _ENCODER_DECODER.search(name)
        if first is not None and first.group(1) == "encoder":
            return "encoder"
    return None


def single_stack(config: dict[str, Any] | None) -> str | None:
    """The one stack of a model that holds no language model, by its ``config.json``: ``"vision"`` for a vision-only
    model (ViT, DeiT, BEiT, Swin, ConvNeXt, DINOv2, a CLIP or SigLIP vision tower saved alone: :data:`_VISION_ONLY`),
    ``"audio"`` for an audio-only one (Wav2Vec2, HuBERT, WavLM, AST: :data:`_AUDIO_ONLY`), else None.

    An encoder–decoder model (``is_encoder_decoder``: DETR, Whisper) keeps its encoder and decoder stacks, which its
    layer numbers need.

    >>> single_stack({"model_type": "vit"}), single_stack({"model_type": "clip"}), single_stack(None)
    ('vision', None, None)
    >>> single_stack({"model_type": "clip", "architectures": ["CLIPForImageClassification"]})
    'vision'
    """
    cfg = config or {}
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or cfg.get("is_encoder_decoder"):
        return None
    if model_type in _AUDIO_ONLY or model_type.endswith("_audio_encoder"):
        return "audio"
    if model_type in _VISION_ONLY or model_type.endswith(("_vision_model", "_vision_encoder")):
        return "vision"
    architectures = cfg.get("architectures")
    if isinstance(architectures, list) and architectures and set(architectures) <= _VISION_ONLY_ARCHITECTURES:
        return "vision"
    return None


def is_conv1d(name: str, config: dict[str, Any] | None) -> bool:
    """Whether the module is a transformers ``Conv1D`` (weight stored ``(in, out)``), or another
    weight stored ``(in, out)`` (Gemma 3's ``multi_modal_projector.mm_input_projection_weight``).

    Decided by the model type in ``config.json`` when present, else by the GPT-2
    module names (``c_attn``, ``c_proj``, ``c_fc``). Without a model type, the pairing and the
    placement read those names' layout from the checkpoint's shapes first (:func:`conv1d_by_shape`:
    GPT-BigCode's nn.Linear names its modules alike), and this name rule only where none tells.
    """
    in_out = _IN_OUT_MATRICES.get((config or {}).get("model_type"))
    if in_out is not None and in_out.search(name):
        return True
    if not _CONV1D_NAMES.search(name):
        return False
    if config is None or "model_type" not in config:
        return True
    return config["model_type"] in CONV1D_MODEL_TYPES


def conv1d_by_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, bool], str | None]:
    """For checkpoints without a model type (bare ``.safetensors`` files, no ``config.json``): whether each 2-D weight
    named as GPT-2's Conv1D modules are (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``; module name without
    ``.weight`` → stored shape) is stored ``(in, out)``, GPT-2's Conv1D, or ``(out, in)``, the ``nn.Linear`` of
    GPT-BigCode (StarCoder, SantaCoder), which names its modules alike; and a note saying what was decided.

    The shapes decide where they can: a ``c_attn`` or ``c_fc`` projects to more outputs than it reads (GPT-2 stores
    c_attn ``(in, 3·in)``, c_fc ``(in, 4·in)``; GPT-BigCode ``(3·in, in)`` or, multi-query, ``(in + 2·head_dim,
    in)``, and ``(4·in, in)``), so its longer side is its outputs; the MLP's ``c_proj`` the other way round. A square
    one (the attention's ``c_proj``, ``q_attn``) follows the decision of its block's other modules (the name less its
    last two parts: ``transformer.h.0``), a block of none (or of conflicting ones) the checkpoint's majority, and a
    checkpoint where no shape tells is read as GPT-2's Conv1D, which the note then says was assumed.

    >>> conv1d_by_shape({"h.0.attn.c_attn": (144, 48), "h.0.attn.c_proj": (48, 48)})[0]
    {'h.0.attn.c_attn': False, 'h.0.attn.c_proj': False}
    """
    votes: dict[str, bool | None] = {}
    for name, shape in shapes.items():
        found = _CONV1D_NAMES.search(name)
        if found is None or len(shape) != 2:
            continue
        rows, cols = shape
        kind = found.group(2)
        if rows == cols:
            votes[name] = None
        elif kind in ("c_attn", "c_fc"):
            votes[name] = cols > rows  # (in, out) when the columns, its outputs, are the longer side
        elif kind == "c_proj" and _MLP_PROJ.search(name):
            votes[name] = rows > cols  # the MLP's c_proj reads the wide side: (4·in, in) is Conv1D's (in, out)
        else:
            votes[name] = None
    decided = [v for v in votes.values() if v is not None]
    overall = None if not decided else sum(decided) * 2 >= len(decided)
    blocks: dict[str, set] = {}
    for name, vote in votes.items():
        if vote is not None:
            blocks.setdefault(name.rsplit(".", 2)[0], set()).add(vote)
    out, assumed = {}, []
    for name, vote in votes.items():
        if vote is None:
            block = blocks.get(name.rsplit(".", 2)[0], set())
            vote = next(iter(block)) if len(block) == 1 else overall
        if vote is None:
            assumed.append(name)
            vote = True
        out[name] = vote
    if not out:
        return out, None
    if assumed:
        return out, (f"no config.json names the model type, and no tensor's shape tells GPT-2's Conv1D layout (in, "
                     f"out) from GPT-BigCode's nn.Linear (out, in): assumed GPT-2's Conv1D for {len(assumed)} "
                     f"tensor(s) ({assumed[0]}, …); pass the folder with its config.json to be sure")
    linear = sum(not v for v in out.values())
    layout = ("GPT-BigCode's nn.Linear layout (out, in)" if linear == len(out) else
              "GPT-2's Conv1D layout (in, out)" if not linear else
              f"nn.Linear (out, in) for {linear}, Conv1D (in, out) for {len(out) - linear}")
    return out, (f"no config.json names the model type: {len(out)} c_attn/c_proj/c_fc tensor(s) read in {layout}, "
                 "as their shapes say (a square one as its block's others)")


def bigcode_projections(name: str, out_features: int, in_features: int, config: dict[str, Any] | None
                        ) -> list[Projection]:
    """GPT-BigCode's ``attn.c_attn`` (an ``nn.Linear``, ``(out, in)``) rows as q, k and v, by its forward: multi-query
    (``multi_query``, its default) contiguous ``[q; k; v]``, q ``n_embd`` rows, k and v one head's (``head_dim``)
    each (``split((embed_dim, kv_dim, kv_dim))``); else per head ``[q_h; k_h; v_h]`` (``view(…, heads, 3·head_dim)``
    then split), as BLOOM's. Without a config (:func:`conv1d_by_shape` read it as nn.Linear) the shape sizes a
    multi-query one (``n_embd`` = in, k and v half the rest each); one of 3·in rows, whose head count nothing gives,
    is not split. [] for a cross-attention's ``c_attn`` ([k; v] of one head each) or sizes that do not fit.

    >>> [(p.role, p.rows) for p in bigcode_projections("h.0.attn.c_attn", 96, 64, None)]
    [('q', slice(0, 64, None)), ('k', slice(64, 80, None)), ('v', slice(80, 96, None))]
    """
    if not _BIGCODE_QKV.search(name):
        return []
    cfg = config or {}
    width, heads = cfg.get("n_embd", in_features), cfg.get("n_head")
    multi_query = cfg.get("multi_query", True) if cfg.get("model_type") else out_features != 3 * in_features
    if multi_query:
        kv = (out_features - width) // 2
        if width != in_features or kv <= 0 or width + 2 * kv != out_features or (heads and width // heads != kv):
            return []
        return [Projection("q", slice(0, width)), Projection("k", slice(width, width + kv)),
                Projection("v", slice(width + kv, out_features))]
    if not heads or out_features != 3 * width or width % heads:
        return []
    head_dim = width // heads
    return [Projection(r, tuple(row for h in range(heads) for row in range((3 * h + i) * head_dim,
                                                                         (3 * h + i + 1) * head_dim)))
            for i, r in enumerate(("q", "k", "v"))]


def experts_in_out(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> bool:
    """Whether a stored 3-D expert tensor (``…experts.gate_up_proj``, without ``.weight``) of `shape` holds each
    expert ``(in, out)``, the model computing ``x @ W[e]``, rather than ``(out, in)``.

    By the model type (:data:`IN_OUT_EXPERT_MODEL_TYPES`: always), and for Qwen3-VL-MoE by the shape, as
    transformers decides on loading: ``(in, out)`` where the stored expert is the transpose of the model's
    ``gate_up_proj`` ``(2·moe_intermediate_size, hidden_size)`` or ``down_proj`` ``(hidden_size,
    moe_intermediate_size)``, and not the model's own shape (a square one is read as the model holds it, as
    transformers loads it).
    """
    cfg = config or {}
    model_type = cfg.get("model_type")
    if model_type in IN_OUT_EXPERT_MODEL_TYPES:
        return True
    if model_type not in _TRANSPOSED_EXPERT_MODEL_TYPES or len(shape) != 3:
        return False
    text = cfg.get("text_config") or cfg
    hidden, ffn = text.get("hidden_size"), text.get("moe_intermediate_size")
    if not hidden or not ffn:
        return False
    held = {"gate_up_proj": (2 * ffn, hidden), "down_proj": (hidden, ffn)}.get(name.rpartition(".")[2])
    return held is not None and tuple(shape[1:]) != held and tuple(shape[1:]) == held[::-1]


def parallel_experts(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> bool:
    """Whether the module `name` (without ``.weight``), whose weight has `shape`, is one of JetMoE's
    ``JetMoeParallelExperts`` (the MLP's ``mlp.input_linear``, ``mlp.output_linear``, the attention experts'
    ``self_attention.experts.input_linear``, ``output_linear``): a 3-D weight ``(experts, out, in)``, expert e
    computing ``F.linear(x, W[e])``, so E matrices ``(out, in)`` (as its class stores them: never transposed),
    not one. A config of another model type says no; a config of JetMoE's whose sizes are not the weight's too
    (``num_local_experts`` experts; ``2·intermediate_size`` × ``hidden_size`` for the MLP's input_linear, …)."""
    cfg = config or {}
    if len(shape) != 3 or not _JETMOE_EXPERTS.search(name) or cfg.get("model_type") not in (None, *_JETMOE_MODEL_TYPES):
        return False
    sizes = [cfg.get(k) for k in ("num_local_experts", "hidden_size", "intermediate_size", "num_key_value_heads",
                                  "kv_channels")]
    if not all(isinstance(v, int) for v in sizes):
        return True  # no config (or an incomplete one): the name and the three dimensions decide
    experts, hidden, ffn, heads, width = sizes
    inner = 2 * ffn if name.endswith("mlp.input_linear") else ffn if ".mlp." in f".{name}" else heads * width
    held = (experts, inner, hidden) if name.endswith("input_linear") else (experts, hidden, inner)
    return tuple(shape) == held


def loaded_experts(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> str | None:
    """The parameter a stored 3-D experts weight `name` (without ``.weight``) loads into, where spectra reads it
    one (out, in) record per expert under that parameter's name (``{…experts}.{e}.{proj}``, as Qwen3-VL-MoE's
    stored experts), else None.

    GraniteMoE's ``block_sparse_moe.input_linear`` (experts, 2·intermediate, hidden) → ``block_sparse_moe.experts.
    gate_up_proj``, ``output_linear`` (experts, hidden, intermediate) → ``block_sparse_moe.experts.down_proj``
    (:data:`_GRANITE_EXPERTS`), where the config is of no other model type and, where it sizes them
    (``num_local_experts``, ``hidden_size``, ``intermediate_size``), the weight is of those sizes.

    >>> loaded_experts("model.layers.0.block_sparse_moe.input_linear", (4, 64, 32), {"model_type": "granitemoe"})
    'model.layers.0.block_sparse_moe.experts.gate_up_proj'
    """
    cfg = config or {}
    found = _GRANITE_EXPERTS.search(name)
    if len(shape) != 3 or found is None or cfg.get("model_type") not in (None, *_GRANITE_MODEL_TYPES):
        return None
    sizes = [cfg.get(k) for k in ("num_local_experts", "hidden_size", "intermediate_size")]
    if all(isinstance(v, int) for v in sizes):
        experts, hidden, ffn = sizes
        held = (experts, 2 * ffn, hidden) if found.group(2) == "input" else (experts, hidden, ffn)
        if tuple(shape) != held:
            return None
    proj = "gate_up_proj" if found.group(2) == "input" else "down_proj"
    return f"{name[:found.start(2) - 1]}.experts.{proj}"


def dbrx_experts(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> int | None:
    """The number of experts stacked in DBRX's 2-D expert parameter `name` (``…ffn.experts.mlp.w1``, ``v1``,
    ``w2``: (experts·ffn, d_model), :data:`_DBRX_EXPERTS`), by ``config.json``'s ``ffn_config.moe_num_experts``;
    0 where the name and shape are DBRX's but no config of DBRX's sizes it (the split is not guessed: the caller skips
    it with a note); None where `name` is no such parameter (another model type's config, another name or shape).

    >>> dbrx_experts("transformer.blocks.0.ffn.experts.mlp.w1", (128, 64),
    ...              {"model_type": "dbrx", "d_model": 64, "ffn_config": {"moe_num_experts": 4, "ffn_hidden_size": 32}})
    4
    """
    cfg = config or {}
    if len(shape) != 2 or not _DBRX_EXPERTS.search(name) or cfg.get("model_type") not in (None, "dbrx"):
        return None
    ffn = cfg.get("ffn_config") if isinstance(cfg.get("ffn_config"), dict) else {}
    experts, width, hidden = ffn.get("moe_num_experts"), ffn.get("ffn_hidden_size"), cfg.get("d_model")
    if cfg.get("model_type") != "dbrx" or not isinstance(experts, int) or experts < 1 or shape[0] % experts:
        return 0
    if (isinstance(width, int) and shape[0] != experts * width) or (isinstance(hidden, int) and shape[1] != hidden):
        return 0
    return experts


_DBRX_EXPERT = re.compile(r"(^|\.)ffn\.experts\.mlp\.(\d+\.)?(w1|v1|w2)$")


def dbrx_expert_refusal(name: str, model_type: str | None) -> str | None:
    """Why no per-expert LoRA goes on ``name``, one expert of DBRX's stacked 2-D expert parameters as the pairing
    names it (``…ffn.experts.mlp.3.w1``: :func:`dbrx_experts`) or the stored parameter itself
    (``…ffn.experts.mlp.w1``), else None.

    PEFT 0.21 adapts ``ffn.experts.mlp.w1`` only whole (``target_parameters``; a 2-D parameter is one (out, in)
    matrix to its ``ParamWrapper``, ``num_experts`` 1): one LoRA ``B (experts·ffn, r) · A (r, d_model)`` whose A
    every expert shares, not one rank-r LoRA per expert, so a plan or an extraction of each expert's own ΔW has no
    place there.

    >>> dbrx_expert_refusal("transformer.blocks.0.ffn.experts.mlp.3.w1", "dbrx")[:40]
    "DBRX's ffn.experts.mlp.w1 stacks every e"
    """
    found = _DBRX_EXPERT.search(name)
    if found is None or model_type not in (None, "dbrx"):
        return None
    return (f"DBRX's ffn.experts.mlp.{found.group(3)} stacks every expert's matrix in one 2-D parameter "
            "(experts·ffn, d_model), which PEFT adapts only whole (target_parameters): one rank-r LoRA whose A all "
            "experts share, not one LoRA per expert, so spectra neither plans nor extracts per-expert ranks there")


def moe_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a stored weight `name` (without ``.weight``) of `shape` is a 3-D one under a mixture-of-experts
    block (:data:`_MOE_CONTAINER`): stacked experts that no rule reads per expert are skipped, not flattened."""
    return len(shape) == 3 and any(r.search(name) for r in (_MOE_CONTAINER, _JETMOE_EXPERTS, _GRANITE_EXPERTS))


def _stack_config(name: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """The part of ``config.json`` that sizes a module's attention: a vision tower's ``vision_config`` where it
    names its own model type (BLIP-2's ``blip_2_vision_model``, whose sizes are not the language model's) or the
    whole model's type names the tower's (:data:`_VISION_MODEL_TYPES`: Qwen2-VL's hub configs), else the config
    itself. An Omni model's tower is its thinker's (``thinker_config.vision_config``)."""
    cfg = config or {}
    if module_stack(name, cfg) in ("vision", "vision_global"):
        vision = cfg.get("vision_config") or (cfg.get("thinker_config") or {}).get("vision_config")  # Qwen3-Omni
        tower = _VISION_MODEL_TYPES.get(cfg.get("model_type"))
        if isinstance(vision, dict) and tower is not None:
            return vision | {"model_type": tower}
        if isinstance(vision, dict) and vision.get("model_type"):
            return vision
    return cfg


@dataclass(frozen=True)
class Projection:
    """One projection inside a fused ``(out, in)`` tensor: its role and its output rows."""

    role: str
    rows: tuple[int, ...] | slice  # rows of the fused (out, in) matrix that belong to it


def fused_projections(name: str, role: str, out_features: int, config: dict[str, Any] | None) -> list[Projection]:
    """Split of a fused tensor's output rows into per-projection blocks.

    Returns an empty list when the layout cannot be known (then only the fused whole
    is analysed). Layouts, in the ``(out, in)`` orientation:

    - GPT-2 ``c_attn``, Phi-3 ``qkv_proj``: contiguous ``[q; k; v]``; k and v have
      ``num_key_value_heads × head_dim`` rows (GQA), q has ``num_attention_heads × head_dim``.
    - MPT's ``attn.Wqkv``: contiguous ``[q; k; v]`` of ``d_model`` rows each (its forward: ``chunk(3)``).
    - ModernBERT's ``attn.Wqkv``: contiguous ``[q; k; v]`` of ``hidden_size`` rows each (its forward:
      ``view(…, 3, -1, head_dim).unbind``); in a composite model whose text model is a ModernBERT (ModernVBERT,
      ColModernVBERT, PE-Audio, PE-Video, PE-Audio-Video: :data:`_TEXT_MODEL_TYPES`), sized by its ``text_config``.
    - DBRX's ``attn.Wqkv``: contiguous ``[q; k; v]``, q ``d_model`` rows, k and v ``attn_config.kv_n_heads ×
      head_dim`` each (its forward's ``split``).
    - GPT-BigCode's ``attn.c_attn`` (nn.Linear): multi-query contiguous ``[q; k; v]``, k and v one head each, else
      per head ``[q_h; k_h; v_h]`` (:func:`bigcode_projections`).
    - GPT-NeoX / Bloom / Persimmon ``query_key_value``, DeBERTa's ``attention.self.in_proj``: per head
      ``[q_h; k_h; v_h]`` (the output is viewed as ``(heads, 3·head_dim)`` then chunked), so q is every third block.
    - ``gate_up_proj`` (Phi-3, transformers-5 MoE experts): ``[gate; up]``, equal halves;
      gpt-oss experts alternate them (gate on even rows, up on odd).
    - BLIP-2's (InstructBLIP's) vision tower ``self_attn.qkv``: contiguous ``[q; k; v]`` of the vision
      tower's ``hidden_size`` rows each, sized by ``config.json``'s ``vision_config``.
    - Qwen2-VL's, Qwen2.5-VL's, Qwen3-VL's and Qwen3.5's vision tower ``attn.qkv``: contiguous ``[q; k; v]`` of
      the tower's width each (``vision_config``'s ``embed_dim`` for Qwen2-VL, else its ``hidden_size``),
      ``num_heads`` heads.
    - Qwen3-Omni's vision tower (its thinker's) ``attn.qkv``: as Qwen3-VL's, sized by ``thinker_config``'s
      ``vision_config``.
    - Qwen3.5's Gated DeltaNet ``linear_attn.in_proj_qkv``: contiguous ``[q; k; v]``, q and k of
      ``linear_num_key_heads × linear_key_head_dim`` rows, v ``linear_num_value_heads × linear_value_head_dim``
      (``text_config``'s).
    - GPT-2's cross-attention ``crossattention.c_attn`` (role ``other``): ``[k; v]``, equal halves, as
      projections ``xk`` and ``xv`` (its queries are ``crossattention.q_attn``, role ``xq``).
    - JetMoE's ``self_attention.kv_proj`` (role ``other``): ``[k; v]``, equal halves of
      ``num_key_value_heads × kv_channels`` rows, as projections ``k`` and ``v``.
    - MLA's ``kv_b_proj`` (role ``kv_b``): per head ``[k_nope_h; v_h]`` (the output is viewed as
      ``(heads, qk_nope_head_dim + v_head_dim)`` then split), so k is the first ``qk_nope_head_dim`` rows of every
      block of ``qk_nope_head_dim + v_head_dim``, v the rest; sized by ``config.json`` (its ``text_config``, where
      it has one).
    """
    if _CROSS_KV.search(name) and (config is None or config.get("model_type") in (None, *CONV1D_MODEL_TYPES)):
        if out_features % 2:
            return []
        half = out_features // 2
        return [Projection("xk", slice(0, half)), Projection("xv", slice(half, out_features))]
    if _JETMOE_KV.search(name) and (config is None or config.get("model_type") in (None, *_JETMOE_MODEL_TYPES)):
        return _jetmoe_kv_projections(out_features, config)
    if role == "gate_up":
        if out_features % 2:
            return []
        if (config or {}).get("model_type") in _INTERLEAVED_GATE_UP:
            return [Projection("gate", tuple(range(0, out_features, 2))),
                    Projection("up", tuple(range(1, out_features, 2)))]
        half = out_features // 2
        return [Projection("gate", slice(0, half)), Projection("up", slice(half, out_features))]
    if role == "kv_b":
        return _mla_kv_projections(out_features, config)
    if role != "qkv":
        return []
    if _DELTANET_QKV.search(name):
        return _deltanet_projections(out_features, config)
    cfg = _stack_config(name, config)
    model_type = cfg.get("model_type")
    if model_type in _TEXT_MODEL_TYPES and module_stack(name, config) is None:  # Fuyu's language model is a
        cfg = cfg | _text_config(cfg) | {"model_type": _TEXT_MODEL_TYPES[model_type]}  # Persimmon: text_config sizes it
        model_type = cfg["model_type"]
    if model_type == "gpt_bigcode":  # multi-query [q; k; v] or per head [q_h; k_h; v_h], by its config
        return bigcode_projections(name, out_features, cfg.get("n_embd"), cfg)
    heads = cfg.get("num_attention_heads", cfg.get("n_head", cfg.get("num_heads", cfg.get("n_heads"))))
    if model_type in _HEAD_INTERLEAVED_QKV:
        if not heads or out_features % (3 * heads):
            return []
        head_dim = out_features // (3 * heads)
        blocks = {r: [] for r in ("q", "k", "v")}
        for h in range(heads):
            for i, r in enumerate(("q", "k", "v")):
                start = (3 * h + i) * head_dim
                blocks[r].extend(range(start, start + head_dim))
        return [Projection(r, tuple(rows)) for r, rows in blocks.items()]
    if model_type == "dbrx":  # attn.Wqkv: split([d_model, kv_n_heads·head_dim, kv_n_heads·head_dim])
        return _dbrx_qkv_projections(out_features, cfg)
    if model_type not in _CONTIGUOUS_QKV and not (model_type is None and _CONTIGUOUS_QKV_NAMES.search(name)):
        return []  # layout unknown for this family (e.g. Falcon's grouped qkv): analyse the whole only
    hidden = cfg.get(_WIDTH_KEYS.get(model_type, "hidden_size"), cfg.get("n_embd"))
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads and hidden:
        head_dim = cfg.get("head_dim") or hidden // heads
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    elif out_features % 3 == 0:  # no config: assume multi-head attention, three equal blocks
        q_rows = kv_rows = out_features // 3
    else:
        return []
    if q_rows + 2 * kv_rows != out_features:
        return []
    return [
        Projection("q", slice(0, q_rows)),
        Projection("k", slice(q_rows, q_rows + kv_rows)),
        Projection("v", slice(q_rows + kv_rows, out_features)),
    ]


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The set entries of a composite model's ``text_config`` (ColModernVBERT's: its ``vlm_config``'s), else {}."""
    vlm = config.get("vlm_config") if isinstance(config.get("vlm_config"), dict) else {}
    text = next((c for c in (config.get("text_config"), vlm.get("text_config")) if isinstance(c, dict)), {})
    return {k: v for k, v in text.items() if v is not None}


def _dbrx_qkv_projections(out_features: int, config: dict[str, Any]) -> list[Projection]:
    """DBRX's ``attn.Wqkv`` rows as q (``d_model``), k and v (``attn_config.kv_n_heads × head_dim`` each, head_dim
    ``d_model / n_heads``), contiguous as its forward splits them; [] where the config does not size them so."""
    attn = config.get("attn_config") if isinstance(config.get("attn_config"), dict) else {}
    hidden, heads, kv_heads = config.get("d_model"), config.get("n_heads"), attn.get("kv_n_heads")
    if not hidden or not heads or not kv_heads or hidden % heads:
        return []
    kv_rows = kv_heads * (hidden // heads)
    if hidden + 2 * kv_rows != out_features:
        return []
    return [Projection("q", slice(0, hidden)), Projection("k", slice(hidden, hidden + kv_rows)),
            Projection("v", slice(hidden + kv_rows, out_features))]


def _jetmoe_kv_projections(out_features: int, config: dict[str, Any] | None) -> list[Projection]:
    """JetMoE's ``self_attention.kv_proj`` rows as k (the first half) and v (:data:`_JETMOE_KV`); [] where the
    config sizes it otherwise (``2 · num_key_value_heads · kv_channels`` rows) or, without one, the rows are odd."""
    cfg = config or {}
    heads, width = cfg.get("num_key_value_heads"), cfg.get("kv_channels")
    if out_features % 2 or (heads and width and 2 * heads * width != out_features):
        return []
    half = out_features // 2
    return [Projection("k", slice(0, half)), Projection("v", slice(half, out_features))]


def _deltanet_projections(out_features: int, config: dict[str, Any] | None) -> list[Projection]:
    """Qwen3.5's ``linear_attn.in_proj_qkv`` rows as q, k and v (:data:`_DELTANET_QKV`); [] where the config does
    not size them to `out_features`."""
    cfg = config or {}
    if cfg.get("model_type") not in _DELTANET_MODEL_TYPES:
        return []
    text = cfg.get("text_config") or cfg
    sizes = [text.get(k) for k in ("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads",
                                   "linear_value_head_dim")]
    if not all(sizes):
        return []
    key, value = sizes[0] * sizes[1], sizes[2] * sizes[3]
    if 2 * key + value != out_features:
        return []
    return [Projection("q", slice(0, key)), Projection("k", slice(key, 2 * key)),
            Projection("v", slice(2 * key, out_features))]


def _mla_kv_projections(out_features: int, config: dict[str, Any] | None) -> list[Projection]:
    """MLA's ``kv_b_proj`` rows as k (every head's ``k_nope``) and v; [] where the config does not size them to
    `out_features`. Its forward: ``kv_b_proj(latent).view(…, heads, k_width + v_head_dim)`` then
    ``split([k_width, v_head_dim], -1)``, ``k_width`` being ``qk_nope_head_dim``, or ``qk_nope_head_dim +
    qk_rope_head_dim`` in a layer without rotary embedding (Mistral Large 4's)."""
    cfg = config or {}
    text = cfg.get("text_config") or cfg
    nope, rope = text.get("qk_nope_head_dim"), text.get("qk_rope_head_dim") or 0
    value, heads = text.get("v_head_dim"), text.get("num_attention_heads")
    if not nope or not value or not heads or out_features % heads:
        return []
    width = out_features // heads  # (heads·(k_width + v), d) -> heads blocks of [k_nope_h; v_h]
    if width - value not in (nope, nope + rope):
        return []
    key = width - value
    return [Projection("k", tuple(r for h in range(heads) for r in range(h * width, h * width + key))),
            Projection("v", tuple(r for h in range(heads) for r in range(h * width + key, (h + 1) * width)))]
