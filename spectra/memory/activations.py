"""Activations: the bytes autograd keeps for backward, per token and block, as transformers 5 and PEFT run the
blocks (checked tensor by tensor against autograd on tiny models: tests/memory/test_memory*.py). See
:func:`spectra.memory.estimate_memory`'s notes for the formulas in words."""

from __future__ import annotations

from spectra.memory.adapters import TABLES, _Adapter
from spectra.memory.shape import ModelShape


def _norm_bytes(shape: ModelShape, p: int, full: bool, width: int | None = None) -> int:
    """Bytes per token that one norm keeps for backward; ``full``: its weight is trained. ``width``: a Q or K norm
    of ``width`` = heads·head_dim values a token, instead of the hidden size: per head over head_dim (Gemma 3's and
    Qwen3's q_norm, k_norm: a 1/rms per head), or across the heads (OLMo 2's: one 1/rms)."""
    h = shape.hidden if width is None else width
    per_head = width is not None and not shape.qk_norm_across_heads
    groups = width // (shape.q_dim // shape.heads) if per_head else 1  # 1/rms per head, or per token
    if shape.norm == "layer":
        return p * h + 8  # LayerNorm keeps its input, its mean and 1/std (fp32)
    if shape.norm == "layer_fp32":  # OLMo's: its input up-cast to fp32, the mean and 1/std; no weight to train
        return 4 * h + 8
    if shape.norm == "gemma4":  # Gemma4RMSNorm: x·pow(mean(x²) + eps, −0.5) on the fp32 input, which it keeps with
        # mean(x²) + eps (pow's input) and its result; its weight's gradient needs the fp32 normalised input
        return 4 * h + 8 * groups + (4 * h if full else 0)
    if shape.norm == "cohere":  # CohereLayerNorm's elementwise fp32 ops: x − mean twice (pow's input, and the product
        # by 1/std's), 1/std, and for its weight's gradient the fp32 normalised input
        return 8 * h + 4 + (4 * h if full else 0)
    # transformers' RMSNorm up-casts its input to fp32 and keeps it, with the fp32 1/rms (b, s, 1); the weight's
    # gradient needs the normalised input, in p (Gemma's in fp32)
    return 4 * h + 4 * groups + ((4 if shape.norm == "rms_fp32" else p) * h if full else 0)


def _qkv_bytes(shape: ModelShape, p: int, cache: bool, masked: bool = False) -> int:
    """Bytes per token of the Q, K and V that sdpa keeps, each storage once.

    ``cache``: transformers' DynamicCache (``use_cache`` in training) concatenates K and V into
    copies. A fused projection's Q, K and V are views of its output, kept whole by any view
    sdpa keeps: GPT-2's Q (beside the cache's copies of K and V), Phi-3's V without the cache
    (its rotary embeddings make Q and K fresh tensors). ``masked``: the layer gets a mask (a
    sliding window the sequence reaches, Falcon's), with which transformers does not ask sdpa for GQA
    but repeats K and V to every query head (``repeat_kv``): fresh copies of Q's size, save that one
    K/V head (multi-query) repeats as a stride-0 view of itself, which keeps what it views.
    """
    q, kv = shape.q_dim, shape.kv_dim
    if masked and q > kv and not shape.one_kv_head:  # K/V heads fewer than Q's, but more than one
        return 3 * p * q
    if not shape.fused_qkv or shape.split_copies:  # Falcon's Q, K and V: copies out of the fused output
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
    if shape.falcon_attention:  # Falcon's Q keeps its (b, s, heads, d) layout, and so does sdpa's output (not the
        # math kernel's, a (b, heads, s, d) product)
        return attention == "eager" or _sdpa_math(shape, attention)
    return attention == "eager" or (shape.fused_qkv and shape.rotary) or shape.rotary_cat


def _sdpa_math(shape: ModelShape, attention: str) -> bool:
    """Whether sdpa runs its math kernel: before transformers 5.25, Falcon-7B's multi-query attention (not the new
    decoder architecture, which broadcast K and V to every head first) handed it one K and one V head against every
    query head without enable_gqa, which no fused kernel takes (:func:`_block_bytes` counts what the math kernel
    keeps); from 5.25 transformers' sdpa repeats them to every head under Falcon's mask."""
    return attention == "sdpa" and shape.sdpa_math


def _eager_qkv_bytes(shape: ModelShape, p: int, cache: bool, batch: int, *, q_kept: bool, k: bool, v: bool) -> int:
    """Bytes per token of Q, K and V as eager attention's two products keep them (``q_kept``: Q·Kᵀ keeps Q for K's
    gradient, ``k``: K for Q's; ``v``: probabilities·V keeps V for theirs), K and V repeated to every query head.

    torch.matmul folds the (batch, heads) dimensions of its operands into one: a copy of Q's size each, save at
    batch 1, where a view folds as it is and the products keep what it views. GPT-2's Q (a view of c_attn's
    output) keeps all of that output where the cache's copies stand for K and V (without the cache K's and V's
    views keep it already: their q + 2·kv is counted as 3·q). With one K/V head the repeat is a stride-0 view:
    K and V as the cache returns them (copies, one head each), else K fresh from its rotation (or k_proj's
    output) and V v_proj's output (or its copy out of a fused one: Falcon before transformers 5.25), or a fused
    projection's whole output, which V views.
    """
    q, kv = shape.q_dim, shape.kv_dim
    viewed_q = batch == 1 and cache and shape.fused_qkv and not (shape.rotary or shape.split_copies)
    q_bytes = p * (q + 2 * kv if viewed_q else q) * q_kept
    if not (batch == 1 and shape.one_kv_head):
        return q_bytes + p * q * (k + v)
    viewed = shape.fused_qkv and not shape.split_copies  # K and V views of one fused output
    k_bytes = kv if cache or not viewed or shape.rotary else q + 2 * kv
    v_bytes = q + 2 * kv if viewed and not cache else kv
    if k and v and k_bytes == v_bytes == q + 2 * kv:  # K and V views of one fused output: kept once
        return q_bytes + p * k_bytes
    return q_bytes + p * (k_bytes * k + v_bytes * v)


def _block_bytes(shape: ModelShape, p: int, attention: str, seq_len: int, *, full: bool, cache: bool,
                 batch: int, grad: bool = True, adapted: list[_Adapter] = (),
                 masked: bool = False) -> tuple[int, bool, bool, int]:
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
    mask to its logits, which keeps nothing. ``batch``: the sequences a step holds; eager's products with one K/V
    head keep K and V at one head at batch 1 (:func:`_eager_qkv_bytes`). Against what transformers 5 saves
    (tests/memory/test_memory.py): exact for Llama, Qwen2, Gemma, Gemma 2, Gemma 3, Phi-3, GPT-2, BERT, Mixtral (transformers'
    default grouped_mm experts), PhiMoE, GraniteMoE, Granite, Helium, ERNIE 4.5, Ministral, SmolLM3,
    GLM, Qwen3, OLMo, OLMo 2 and OLMo 3 (tests/memory/test_memory_qk_norms.py), GPT-NeoX's parallel and sequential
    blocks, Phi's, StarCoder2's and Falcon's (tests/memory/test_memory_gelu_families.py; a parallel block's MLP reads
    the block's input; Falcon-7B's multi-query under sdpa's math kernel too; StableLM), Arcee, Seed-OSS, Hunyuan
    dense, EXAONE 4,
    Cohere, Cohere 2 and Apertus (tests/memory/test_memory_llama_variants.py), Gemma 4's dense text model (its
    sliding and full-attention layers, attention_k_eq_v: tests/memory/test_memory_gemma4.py), JetMoE's mixtures of
    attention and MLP experts (:func:`_jetmoe_bytes`: tests/memory/test_memory_jetmoe.py), sliding layers
    masked or not, from the first adapted layer on too.

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

    if shape.attention_experts:  # JetMoE: mixtures of attention and of MLP experts, routed by index
        total, per_layer, mid, out = _jetmoe_bytes(shape, p, attention, s, full=full, grad=g, lora=roles,
                                                   wrapped=wrapped)
        return norm(g) + total + norm(mid), False, out, per_layer  # its input and post-attention RMSNorms

    def hit(*names: str) -> bool:
        return bool(roles.intersection(names))

    post_norm = shape.family == "bert"  # BERT normalises after each sublayer, the others before (Gemma 2: both)
    # OLMo 2 normalises each sublayer's output before the residual, not its input (output_norms_only)
    output_norms, input_norms = shape.norms == 4 or shape.output_norms_only, not shape.output_norms_only
    total = 0 if post_norm or not input_norms else norm(g)
    if shape.mla:  # DeepSeek's multi-head latent attention
        attention_bytes, attention_grad = _mla_bytes(shape, p, attention, s, full=full, grad=g, hit=hit,
                                                     batch=batch)
        total += attention_bytes
        qg = kg = vg = False  # (its own)
    else:  # attention: Q, K, V require grad from the block's input or their own adapter
        # (Gemma 4's attention_k_eq_v: one k_proj, role kv, gives K and V)
        qg, kg, vg = g or hit("q", "qkv"), g or hit("k", "qkv", "kv"), g or hit("v", "qkv", "kv")
        if shape.clip_qkv:  # OLMo's clamp_ on each projection's output keeps a copy of it (its input) for backward
            total += p * (shape.q_dim * qg + shape.kv_dim * (kg + vg))
    if shape.qk_norm:  # q_norm and k_norm: RMSNorms per head (Gemma 3, Qwen3) or across the heads (OLMo 2)
        total += _norm_bytes(shape, p, full, q) * qg + _norm_bytes(shape, p, full, shape.kv_dim) * kg
    if shape.v_norm and vg:  # Gemma 4's v_norm: an RMSNorm per head without weight; under attention_k_eq_v it
        # reads k_proj's output as k_norm does, and at fp32 both keep that tensor itself (no up-cast copy)
        k_eq_v = any(role == "kv" for role, _, _ in shape.linears)
        total += _norm_bytes(shape, p, False, shape.kv_dim) - (4 * shape.kv_dim if k_eq_v and p == 4 else 0)
    scores = qg or kg  # Q·Kᵀ and the probabilities
    if shape.mla:
        o_input_kept = False  # o_proj reads a copy of the (b, heads, s, v) output
    elif _sdpa_math(shape, attention):  # torch's math kernel, run op by op on inputs up-cast to fp32 (at 16 bits):
        # Q scaled (a fresh tensor), K and V broadcast to every query head for the batched products (copies), and the
        # softmax's s×s probabilities, all fp32 whatever p; the mask and the output are not kept
        attention_grad = scores or vg
        total += 4 * (3 * q + heads * s) if attention_grad else 0
        o_input_kept = False
    elif attention == "sdpa":  # the kernel keeps Q, K, V, its output and the fp32 logsumexp for any of their grads
        attention_grad = scores or vg
        if attention_grad:
            total += _qkv_bytes(shape, p, cache, masked) + p * q + 4 * heads + (p * s if masked else 0)
        o_input_kept = attention_grad and not _o_input_copied(shape, attention)
    else:
        attention_grad = scores or vg
        # Q·Kᵀ keeps K repeated to every head (for Q's grad) and Q (for K's); probabilities·V keeps V repeated
        # (for the probabilities' grad) and the probabilities (for V's)
        total += _eager_qkv_bytes(shape, p, cache, batch, q_kept=kg, k=qg, v=scores)
        if shape.softmax_fp32:  # Llama-like: softmax in fp32, cast back to p (the same tensor when p = 4)
            if scores:
                total += heads * s * (4 + (p if shape.attn_softcap else 0))  # Gemma 2: tanh(logits / cap) too
            if vg and (p < 4 or not scores):
                total += heads * s * p
        elif scores or vg:  # GPT-2, BERT: one softmax in p
            total += heads * s * p
        o_input_kept = False  # transformers copies eager's (b, heads, s, d) output for o_proj
    o_grad = attention_grad or hit("o")
    if output_norms:  # Gemma 2 and OLMo 2 normalise the attention's output
        total += norm(o_grad)
    # the MLP's input: the residual stream after attention, or in a parallel block the block's input
    mid = g if shape.parallel else g or o_grad
    if shape.parallel and shape.norms == 2:  # GPT-NeoX's post_attention_layernorm on the block's input: its own
        # statistics, the input being the tensor the attention's norm keeps (a LayerNorm keeps it as is)
        total += norm(mid) - (p * h if shape.norm == "layer" and mid else 0)
    elif input_norms and not shape.parallel:  # Llama's post_attention_layernorm, GPT-2's ln_2, Gemma 2's
        total += norm(mid)  # pre-feedforward, BERT's
    per_layer = 0
    # the MLP's activation: SwiGLU keeps gate and up for gate's grad, silu(gate) for up's; a fused gate_up keeps
    # its whole output; GPT-2's and BERT's GELU its inputs (one tensor, or gelu_new's four)
    if shape.experts > 1:
        moe, per_layer, down = _moe_bytes(shape, p, full=full, grad=mid, router=hit("router"), wrapped=wrapped,
                                          lora=roles, weights=weights)
        total += moe
    elif any(role in ("gate", "gate_up") for role, _, _ in shape.linears):
        mlp, per_layer, down = _swiglu_bytes(p, h, inter, full=full, grad=mid, lora=roles, weights=weights)
        # a parallel block's one norm feeds gate/up the attention's input, counted below
        total += mlp - (p * h if full and shape.parallel and shape.norms == 1 else 0)
    else:
        activation = mid or hit("up")
        total += p * shape.mlp_saved * inter * activation
        if shape.xielu:  # its where's bool mask; alpha_n's gradient (full fine-tuning) the product's other factor
            total += (inter + (p * inter if full else 0)) * activation
        down = activation or hit("down")
        # the inputs of up and down (a parallel block's one norm feeds up the attention's input, counted below)
        total += p * ((0 if shape.parallel and shape.norms == 1 else h) + inter) if full else 0
    if output_norms:  # Gemma 2 and OLMo 2 normalise the MLP's output
        total += norm(down)
    out = mid or down or (shape.parallel and o_grad)
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


def _mla_bytes(shape: ModelShape, p: int, attention: str, s: int, *, full: bool, grad: bool, hit,
               batch: int) -> tuple[int, bool]:
    """Bytes per token that DeepSeek's multi-head latent attention keeps (arXiv:2405.04434, as transformers 5 runs
    it), and whether its output requires grad; ``grad``: its input does; ``hit(*roles)``: a lora.Linear adapts one.

    Q = q_b(RMSNorm(q_a(x))) (or q_proj(x)), split into a part without and one with rotary embeddings; the latent
    kv_a(x) splits into c (kv_lora_rank, RMSNorm'd) and the rotary key shared by the heads; kv_b(c) gives each
    head's K part and V (a view of kv_b's output). Each RMSNorm keeps its fp32 input and 1/rms when its input
    requires grad. The rotation (of the table's cos and sin) and the concatenations keep nothing per token; K is a
    fresh (b, heads, s, nope + rope) tensor and Q a concatenation, so o_proj reads a copy of the attention's output.
    sdpa (where Q's head size is V's: :func:`_activations_refused`) keeps Q, K, V (kv_b's whole output), its output
    and the fp32 logsumexp; eager keeps Q for K's grad, K for Q's, V for the probabilities', the fp32 softmax and
    its cast to p (as Llama's): V a copy, save at batch 1, where torch.matmul folds (batch, heads) of the strided
    view without copying and keeps kv_b's whole output. Full fine-tuning also keeps the inputs of q_a/kv_a (one
    tensor), q_b, kv_b and o, and each latent norm's normalised input.
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
        scores = qg or kvg  # V, a strided view of kv_b's output, reaches the matmul as a copy (at batch 1, as is)
        total += p * qk * (kvg + qg) + p * (kv_out if batch == 1 else o_in) * scores
        total += heads * s * (4 * scores + p * (kvg and (p < 4 or not scores)))
    if full:
        total += p * (h + q_lora + kv_lora + o_in)
    return total, qg or kvg


def _jetmoe_bytes(shape: ModelShape, p: int, attention: str, s: int, *, full: bool, grad: bool, lora: set[str],
                  wrapped: dict) -> tuple[int, int, bool, bool]:
    """Bytes per token that a JetMoE block keeps beside its two norms, as transformers 5 runs it (JetMoeMoA,
    JetMoeMoE), the bytes it keeps per layer, and whether the MoE's input (the post-attention norm's) and the block's
    output require grad. ``grad``: the block's input requires grad; ``lora``: roles of its lora.Linear modules
    (kv_proj's, ``other``: a plan's LoRA on a router, role other too, is read as kv_proj's, unchecked);
    ``wrapped``: its PEFT ParamWrappers by role
    (the experts' 3-D weights: ``q``, ``o``, ``gate_up``, ``down``), which merge W + s·B·A in every forward, so the
    product keeps its input, as full fine-tuning's does.

    With k experts a token (S = k·tokens routed rows), W = kv_channels·num_key_value_heads, i = intermediate_size:

    * each router (JetMoeTopKGating: top-k of the fp32 logits, softmax over those k): for its logits' grad the top-k
      indices (8·k), the softmax (4·k) and the index that sorts the routed rows by expert (8·k; its gather of the
      gates, the MoA's index_add and output gather read it too); the row → token index (8·k) where the routed copies
      of the input (a gather) or the closing index_add need a grad; its input (p·h) for a trained weight;
    * the MoA: the query experts' input (p·h·k) for a trained weight and, for their output's grad, the index_add that
      places them (its source: p·W·k); attention over k·num_key_value_heads heads of K and V repeated k times
      (copies): sdpa's Q, K, V, output (p·W·k each) and fp32 logsumexp, or eager's as Llama's; the output experts'
      input (p·W·k) for a trained weight;
    * the MoE: gate_up's input (p·h·k) for a trained weight, its output (p·2i·k) and silu(gate) (p·i·k), down's
      input (p·i·k) for a trained weight;
    * each mixture's close: the product of the experts' output by the gate (p·h·k for the gate's grad, the gate
      p·k for the output's) and the index_add summing the rows per token (its source, p·h·k).

    Per layer: each ParamWrapper's merged weight in p (E·out·in) where its product's input requires grad, and the
    factors it casts to p when p < 4 (E·r·(in + out)).
    """
    h, k, w, i = shape.hidden, shape.experts_per_token, shape.kv_dim, shape.intermediate
    q_w, o_w, gate_up_w, down_w = (full or role in wrapped for role in ("q", "o", "gate_up", "down"))
    per_layer = 0

    def merged(role: str, needed: bool) -> int:  # a ParamWrapper's merged weight and factors cast to p
        m = wrapped.get(role)
        if m is None:
            return 0
        return p * m.experts * m.d_in * m.d_out * needed + (p * m.experts * m.rank * (m.d_in + m.d_out) if p < 4
                                                                  else 0)

    # the MoA: the router reads the normed input x; so do the query experts (a gathered copy) and kv_proj
    logits = grad  # the router's weight trains only under full fine-tuning, when x requires grad too
    q_out = grad or q_w
    kv = grad or "other" in lora  # kv_proj's output: K and V
    total = p * h * full  # x, for the router's and kv_proj's weights
    total += p * h * k * q_w + p * w * k * q_out  # the query experts' input; index_add's source
    per_layer += merged("q", grad)
    attended = q_out or kv
    heads, q = shape.heads, shape.q_dim  # k·num_key_value_heads heads, Q of W·k a token
    if attention == "sdpa":
        total += (4 * p * q + 4 * heads) * attended
    else:  # as Llama's eager: K (repeated) for Q's grad, Q for K's, V and the probabilities for each other's
        total += p * q * (q_out + kv + attended)
        total += heads * s * 4 * attended + heads * s * p * (kv and (p < 4 or not attended))
    total += p * w * k * o_w  # the output experts' input (a gathered copy of the attention's output)
    per_layer += merged("o", attended)
    o_out = attended or o_w
    total += p * h * k * logits + p * k * o_out  # the product by the gates: its two factors
    closed = o_out or logits  # the index_add's source requires grad
    total += p * h * k * closed
    # the MoA's indices: top-k and softmax (logits), the sorting index, the row → token index
    total += 12 * k * logits + 8 * k * (logits or q_out or attended) + 8 * k * (grad or closed)
    # the MoE, on the residual stream's norm (its input requires grad from the block's input or the MoA's output)
    mid = grad or closed
    total += p * h * full  # the norm's output, for the router's weight
    total += p * h * k * gate_up_w
    per_layer += merged("gate_up", mid)
    gate_up_out = mid or gate_up_w
    total += 3 * p * i * k * gate_up_out + p * i * k * down_w
    per_layer += merged("down", gate_up_out)
    down_out = gate_up_out or down_w
    total += p * h * k * mid + p * k * down_out  # the product by the gates
    closed = down_out or mid
    total += p * h * k * closed + 12 * k * mid + 8 * k * mid + 8 * k * (mid or closed)
    return total, per_layer, mid, closed


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
    when the product needs it for its input's gradient; DeepSeek's router in fp32, as its weight
    is kept), beside the factors it casts to p for the merge when p < 4 (E·r·(in + out)).
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
        # DeepSeek's router weight stays fp32 (_keep_in_fp32_modules_strict), and so does the weight merged into it
        merged = 4 if role == "router" and shape.router_fp32 else p
        per_layer += merged * max(m.experts, 1) * m.d_in * m.d_out * needed
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
             "kv": "attention input", "o": "attention output", "gate": "mlp input", "up": "mlp input",
             "gate_up": "mlp input", "router": "mlp input", "q_a": "attention input", "kv_a": "attention input"}


def _adapter_bytes(modules: list[_Adapter], p: int, o_input_kept: bool, dora: bool,
                   one_input: bool = False) -> int:
    """Bytes per token that one layer's adapted modules add to its saved tensors.

    PEFT runs ``lora_A`` on its input cast to the adapter's fp32 and keeps that: a fresh copy per
    module from a 16-bit input; with fp32 activations the input itself, kept once however many
    modules read it, and not at all for ``o`` when the block keeps its input already
    (``o_input_kept``: sdpa keeps its output and o_proj reads it, not a copy). ``lora_B``
    keeps A·x (r values). DoRA also keeps each module's base output (p) and LoRA output (fp32)
    for its magnitude/direction backward: (p + 4)·d_out. ``one_input``: the attention and the MLP read one
    tensor (a parallel block's one norm: Phi's, Falcon-7B's).
    """
    total, shared = 0, set()
    for m in modules:
        if m.experts:  # a ParamWrapper merges its update into the weight: the block's own terms count it
            continue
        total += 4 * m.rank + ((p + 4) * m.d_out if dora else 0)
        source = _INPUT_OF.get(m.role)
        source = "attention input" if one_input and source == "mlp input" else source
        if p < 4 or source is None:
            total += 4 * m.d_in
        elif source not in shared and not (source == "attention output" and o_input_kept):
            shared.add(source)
            total += 4 * m.d_in
    return total


# the adapted roles whose outputs reach a role's input within one block: a role not listed reads the block's input
# (through its norm) alone; o reads the attention's output; a sequential block's MLP reads the attention's and o's,
# a parallel block's the block's input; down reads the MLP's up-projections (DeepSeek: q_b reads q_a's, kv_b kv_a's)
_ATTENTION_ROLES = frozenset({"q", "k", "v", "qkv", "kv", "q_a", "kv_a", "q_b", "kv_b"})
_MLP_INPUT_ROLES = frozenset({"gate", "up", "gate_up", "router"})
_UPSTREAM = {"q_b": frozenset({"q_a"}), "kv_b": frozenset({"kv_a"}), "o": _ATTENTION_ROLES}
_UPSTREAM_SEQUENTIAL = {role: _ATTENTION_ROLES | {"o"} for role in _MLP_INPUT_ROLES} \
    | {"down": _ATTENTION_ROLES | {"o"} | _MLP_INPUT_ROLES}
_UPSTREAM_PARALLEL = {"down": _MLP_INPUT_ROLES}
_READS_BLOCK_INPUT = _ATTENTION_ROLES - {"q_b", "kv_b"}


def _dora_step_bytes(modules: list[_Adapter], grad: bool, parallel: bool = False) -> int:
    """Bytes that PEFT's DoRA keeps once a step, whatever the tokens, for one layer's adapted Linears (0.21's
    ``DoraLinearLayer.forward``: m / ‖W + s·ΔW‖ · (base + s·B·A·x) − base, the norm detached, all fp32 from the
    fp32 magnitude m): the norm (d_out), saved by the division for m's gradient; m / norm (d_out), saved by its
    product with the LoRA output; and m / norm − 1 (d_out), saved by its product with the base output where that
    requires grad, as the module's input does (``grad``: the block's input does; or an adapted module upstream in
    the block does, :data:`_UPSTREAM`). A role the table does not place counts as downstream of every other."""
    lora = [m for m in modules if not m.experts]  # a ParamWrapper takes no DoRA (refused)
    adapted = {m.role for m in lora}
    total = 0
    for m in lora:
        if m.role in _READS_BLOCK_INPUT or parallel and m.role in _MLP_INPUT_ROLES:
            upstream = frozenset()
        else:
            upstream = (_UPSTREAM_PARALLEL if parallel else _UPSTREAM_SEQUENTIAL).get(m.role) \
                or _UPSTREAM.get(m.role, adapted - {m.role})
        total += 4 * m.d_out * (3 if grad or adapted & upstream else 2)
    return total


def _table_bytes(modules: list[_Adapter], p: int, tokens: int, seq_len: int, *, dora: bool,
                 fresh_positions: bool) -> int:
    """Bytes that LoRA on the embedding tables (:data:`~spectra.memory.adapters.TABLES`: looked up before the
    blocks, so their tensors are kept until backward ends) keeps for backward, in all (not per token).

    PEFT's ``lora.Embedding`` (0.21) computes ``F.embedding(ids, Aᵀ) @ Bᵀ · s``, A in the adapter's fp32: the
    lookup keeps the ids, the product the lookup (r values, fp32, per id) for B's gradient; the base table is
    frozen and keeps nothing. The token embedding's and a token-type table's ids are the batch's own, (b, s): 4·r
    per token (the ids themselves are not counted, as token ids never are). A position table's ids are the
    positions, (1, s), one row for the whole batch (``by_position``: GPT-2's wpe, BERT's position_embeddings):
    4·r·s, whatever the batch, and the position ids, 8·s (int64), where the model builds them each forward
    (``fresh_positions``: GPT-2's, from cache_position; BERT's are a slice of its buffer).

    DoRA (PEFT's ``DoraEmbeddingVariant``: m / ‖W + s·ΔW‖ · (base + s·lookup·Bᵀ), ``d_out`` = the table's width w)
    keeps per id its LoRA output (fp32) and the base output (p), (p + 4)·w, once per position for a position
    table; and once a step the column norms ‖W + s·ΔW‖ and m / norm (fp32, 4·w each). The fp32 W + s·ΔW (rows × w)
    whose norms it takes is a transient (the workspace): its norm's graph is cut by PEFT's detach."""
    total = 0
    for m in modules:
        ids = seq_len if m.by_position else tokens
        total += ids * 4 * m.rank + (seq_len * 8 if m.by_position and fresh_positions else 0)
        if dora:
            total += ids * (p + 4) * m.d_out + 2 * 4 * m.d_out
    return total


_FLASH_HEAD_SIZE = 256  # the largest head FlashAttention (sdpa's CUDA flash kernel) takes


def _activations_refused(shape: ModelShape, attention: str) -> str | None:
    """Why the activations cannot be estimated for this attention, or None. sdpa on multi-head latent attention
    whose Q and K heads are wider than V's (DeepSeek's 192 against 128): FlashAttention takes one head size, so
    CUDA runs another kernel, and the CPU's flash kernel does not take it either (it falls back to the math kernel,
    which keeps the s×s probabilities): what CUDA's kernel keeps is unchecked here. So is sdpa on heads wider than
    FlashAttention takes (Gemma 4's full-attention layers, global_head_dim 512), which the CPU's flash kernel runs
    (checked) but CUDA's cannot."""
    head_size = max(shape.block(layer).q_dim for layer in range(shape.layers)) // shape.heads
    if attention == "sdpa" and not shape.mla and head_size > _FLASH_HEAD_SIZE:
        where = " (its full-attention layers' global_head_dim)" if shape.global_layers else ""
        return (f"{shape.family}'s attention heads of {head_size} values{where} under sdpa: FlashAttention takes "
                f"heads of at most {_FLASH_HEAD_SIZE}, so CUDA runs another kernel (the memory-efficient one, or with "
                "grouped KV heads the math one, which keeps the s×s probabilities), and what it saves has not been "
                "checked against autograd; attention='eager' (--attention eager) is estimated. The weights, adapter, "
                "gradients, optimizer states and KV cache are estimated")
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
    # a LoRA on an embedding table (the token embedding, a position or token-type table) or
    # enable_input_require_grads, else from the first adapted layer (autograd keeps nothing before it;
    # non-reentrant checkpointing keeps no input there either)
    outside = by_layer.get(None, [])  # modules outside the blocks: embedding tables, a LoRA head
    tables = [module for module in outside if module.role in TABLES]
    grad = embedded_grad = full or input_require_grads or bool(tables)
    per_token = recomputed = 0
    kept_inputs = per_layer = 0
    for layer in range(shape.layers):
        modules = by_layer.get(layer, [])
        if not (grad or modules):
            continue
        # sdpa gets a mask in a layer whose sliding window the sequence reaches (transformers' masking_utils)
        masked = attention == "sdpa" and (bool(shape.windows) and 0 < shape.windows[layer] <= seq_len
                                          or shape.falcon_attention)  # Falcon's mask, always materialised
        # transformers builds a DynamicCache in a decoder's training forward while use_cache is on; under
        # checkpointing it turns the cache off
        batch = tokens // seq_len
        block, o_kept, out, merged = _block_bytes(blocks[layer], p, attention, seq_len, full=full, grad=grad,
                                                  cache=use_cache and shape.causal, adapted=modules, masked=masked,
                                                  batch=batch)
        again, o_kept_again, _, _ = _block_bytes(blocks[layer], p, attention, seq_len, full=full, grad=grad,
                                                 cache=False, adapted=modules, masked=masked, batch=batch)
        one_input = shape.parallel and shape.norms == 1
        per_token += block + _adapter_bytes(modules, p, o_kept, dora, one_input)
        # DoRA's per-step tensors, which a checkpointed block recomputes with the rest
        merged += _dora_step_bytes(modules, grad, shape.parallel) if dora else 0
        per_layer += merged
        recomputed = max(recomputed, tokens * (again + _adapter_bytes(modules, p, o_kept_again, dora, one_input))
                         + merged)
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
    head_adapters = [m for m in outside if m.role not in TABLES]  # a LoRA head
    final += _adapter_bytes(head_adapters, p, False, dora)
    at_loss = tokens * final + head + (_dora_step_bytes(head_adapters, grad) if dora else 0)
    # the tables' LoRA tensors are held through the whole backward, beside either peak, checkpointed or not
    # (transformers checkpoints the blocks, not the embeddings)
    embedding = _table_bytes(tables, p, tokens, seq_len, dora=dora, fresh_positions=shape.family == "gpt2")
    if shape.family == "bert" and embedded_grad:  # BERT normalises the embeddings' sum: a LayerNorm on a grad input
        embedding += tokens * _norm_bytes(shape, p, full)
    activations = tokens * per_token + per_layer + embedding + max(at_loss, tokens * in_flight)
    activations_ckpt = (tokens * kept_inputs * shape.hidden * p  # the block inputs that checkpointing keeps
                        + embedding + max(at_loss, recomputed + tokens * in_flight))
    return activations, activations_ckpt
