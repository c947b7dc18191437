"""The estimate: bytes by component (weights, quantisation constants, adapter, gradients, optimizer states,
activations, workspace, KV cache) for one method, precision and batch (:func:`estimate_memory`). References
[1]–[5]: :mod:`spectra.memory`'s docstring."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from spectra.checkpoints.architectures import parse_stacks
from spectra.checkpoints.positions import resolve_max_length
from spectra.checkpoints.roles import check_roles
from spectra.errors import ConfigError
from spectra.memory.activations import _activations, _activations_refused
from spectra.memory.adapters import TABLES, _adapter_modules, _check_plan_base
from spectra.memory.config import load_config
from spectra.memory.shape import _UNQUANTISED, ModelShape, _meta_model_for, model_shape
from spectra.ranks import RankPlan
from spectra.ranks.plan import inside_saved


METHODS = ("full", "lora", "qlora", "dora")
PRECISIONS = ("fp32", "bf16", "fp16", "mixed")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
ATTENTIONS = ("sdpa", "eager")
NF4_BLOCK = 64          # weights per NF4 absmax constant [3]
DQ_BLOCK = 256          # absmax constants per second-level fp32 constant with double quantisation [3]
ADAM8_BLOCK = 256       # bitsandbytes' blockwise 8-bit optimizer states: one fp32 absmax per 256
ADAM8_MIN_SIZE = 4096   # bitsandbytes' min_8bit_size: a smaller tensor's two moments are fp32, whatever its dtype
ADAM8_MAP = 256         # the dynamic quantisation map of each 8-bit moment, fp32, one tensor shared by all parameters
DEFAULT_SEQ_LEN = 2048  # a common fine-tuning context; cut to a model's position limit when that is shorter


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
                    batch: int = 1, seq_len: int | None = None, precision: str | None = None, optimizer: str = "adamw",
                    gradient_checkpointing: bool = True, roles: tuple[str, ...] | None = None,
                    stacks: tuple[str, ...] | None = None, attention: str = "sdpa", double_quant: bool = True,
                    use_cache: bool = True,
                    layers_to_transform: int | tuple[int, ...] | None = None,
                    input_require_grads: bool = False, models=None) -> MemoryEstimate:
    """Estimate the memory of fine-tuning (and serving) a model, by component, in bytes.

    Parameters
    ----------
    config_or_model : dict, str, PathLike, PretrainedConfig or model
        ``config.json`` as a dict, its path or folder, a hub id (downloads config.json only),
        or a transformers config/model.
    method : {"full", "lora", "qlora", "dora"}
        Default "lora".
    rank_plan_or_rank : RankPlan or int or None
        The adapter: a plan (its modules and ranks) or one rank (≥ 1) for the modules of ``roles``.
        Ignored for ``full``. Default 16. A plan must be of this model: one made on another (whose analysed base's
        config.json describes other layers, or whose modules this model lacks or shapes otherwise) is refused, as
        ``spectra train`` refuses a plan of another base.
    batch : int
        Sequences per step (≥ 1). Default 1.
    seq_len : int, optional
        Tokens per sequence. Default 2048, or the model's position limit when shorter
        (``max_position_embeddings``, GPT-2's ``n_positions``: :func:`spectra.checkpoints.positions.position_limit`), which
        ``notes`` then says: ``spectra train``'s rule for ``--max-length``
        (:func:`spectra.checkpoints.positions.resolve_max_length`). A length beyond a table of positions
        (GPT-2's and BERT's learned ones, Marian's fixed sinusoid) is refused: the model cannot run it; beyond the positions a rotary model is configured
        for, it is estimated with a note.
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
        Roles that an int rank targets, as ``spectra train --roles`` takes them and checked as train checks them
        (:func:`spectra.checkpoints.roles.check_roles`, ``TrainConfig``'s check: block roles only, spelt as
        :data:`spectra.checkpoints.roles.BLOCK_ROLES` spells them; a role the model lacks is refused). Default (None
        or ``()``, as train reads both): every linear layer of the blocks. On an MoE the targets are what ``spectra train`` adapts, asked of its own target selection
        (:func:`spectra.checkpoints.adapted.peft_targets`): the roles' Linear modules and the routed experts' fused
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
        layers; Falcon's every layer) gets a mask, which sdpa keeps in the activations' dtype (s·p per
        token), with K and V repeated to every head (copies of Q's size; one K/V head repeats as a
        stride-0 view that keeps the one head). Before transformers 5.25, Falcon-7B's multi-query
        attention (one K/V head against every query head, no enable_gqa) runs sdpa's math kernel, which
        keeps Q, K and V broadcast to every head and the probabilities, all fp32: 4·(3·q + heads·s) per
        token. ``"eager"`` keeps the attention probabilities, ``heads·s`` values per token per layer: in
        fp32 and again in the activation dtype for Llama-like models (softmax in fp32, cast back), once
        for GPT-2 and BERT; Gemma 2 also keeps its logit cap's tanh (p); and K and V repeated to every
        head, save at batch 1 with one K/V head, where its products keep the one head (and GPT-2's Q the
        view of c_attn's whole output it is, beside the cache's K and V; DeepSeek's V of kv_b_proj's).
        A family transformers runs only eagerly (Gemma 2, whose capped logits sdpa refuses) is estimated
        with "eager" whatever is asked, as transformers falls back when asked for no implementation; the
        result's ``attention`` says so.
        Default "sdpa".
    double_quant : bool
        QLoRA only: bitsandbytes' double quantisation of the NF4 absmax constants
        (``bnb_4bit_use_double_quant``, what ``spectra train`` uses) [3]_. Default True. QLoRA on a model
        with a 4-bit layer of fewer than 64 input features (bitsandbytes' blocks), among the layers text runs
        through, which ``spectra train`` refuses (the first forward pass would fail), is estimated with a note
        that says so.
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
    models : MetaModels, optional
        Builds the models read off the config on the meta device (an MoE's base model and causal LM;
        :class:`spectra.ranks.plan.MetaModels`): pass the one that built the plan's, and they are built once for
        both. Default: built here.

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
    * gradients: one per trainable parameter in its dtype (full: w, adapters: 4). A plan's ``modules_to_save`` (the
      head PEFT trains in full for a classifier's task type) adds its copy to the weights, and its gradients and
      optimizer states, all in w. A plan's ``num_labels`` (TUNED's class count, where the base's config declares
      another) builds the classifier with it, its frozen head as well as the copy.
    * optimizer_states: AdamW two moments in the parameter's dtype (PyTorch's ``zeros_like``);
      ``mixed`` full fine-tuning adds the fp32 master copy: 12 bytes/param, ZeRO's K = 12 [1]_.
      ``adamw_8bit`` (bitsandbytes, blockwise), by tensor: 2·(1 + 4/256) bytes/param (two 8-bit moments, an fp32
      absmax per 256 of each) for a tensor of 4,096 elements or more, 8 for a smaller one (a LoRA factor of a
      small model, a bias, a norm, DoRA's magnitudes: bitsandbytes' ``min_8bit_size`` keeps them fp32), and its
      two 256-entry fp32 maps once (``_adam8_states``). ``sgd``: none.
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
      per tensor) and A·x, 4·r; DoRA also the base and LoRA outputs, (p + 4)·d_out, and once a step
      ‖W + s·ΔW‖ and m / ‖W + s·ΔW‖, 8·d_out, and m / ‖·‖ − 1 where the module's input requires
      grad, 4·d_out (``_dora_step_bytes``; under 0.1 % at 2048 tokens on a 7B model). A LoRA on an
      embedding table (PEFT's lora.Embedding: the token embedding, GPT-2's wpe, BERT's position and
      token-type tables) keeps its fp32 lookup of A, 4·r per id, until backward ends: per token for
      the token and token-type ids, once per sequence position for a table looked up by the (1, s)
      positions (wpe, BERT's position_embeddings; GPT-2's fresh position ids too, 8·s), and makes
      every block's input require grad (BERT's embedding LayerNorm then keeps p·h + 8); DoRA there
      also keeps, per id, its outputs, (p + 4)·width, and once a step its column norms and m / norm
      (4·width each). An MoE MLP
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
      B·A and W + s·B·A of the largest module (2 × out·in × 4); on an embedding table (rows × width),
      (A·B)ᵀ, s·(A·B)ᵀ and W + s·ΔW (3 × rows·width × 4).
    * kv_cache (decoder models, inference): what transformers' DynamicCache holds, 2·kv·b·p per token and layer
      (DeepSeek's MLA: its latent and rotary key), s tokens a full-attention layer, min(s, window − 1) a sliding one
      (Mistral's, Gemma 2's and 3's, …): 2·L·kv·b·s·p without sliding layers; encoders have none.
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
    for name, value in (("batch (--batch)", batch), ("seq_len (--seq-len)", seq_len)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    plan = rank_plan_or_rank if isinstance(rank_plan_or_rank, RankPlan) else None
    _check_rank(rank_plan_or_rank, method)
    roles = _check_roles(roles, method, plan)  # () reads as None: every block role, as train reads it
    cfg = load_config(config_or_model)
    shape = model_shape(cfg, models=models)
    notes: list[str] = []
    # train's rule for --max-length: the default cut to the model's positions, beyond a learned table refused. The
    # family decides rotary where config.json names no rotary key (a Llama config.json of its required keys alone)
    seq_len = resolve_max_length(seq_len, cfg, option="seq_len (--seq-len)", notes=notes, default=DEFAULT_SEQ_LEN,
                                 cut="{length} tokens per sequence", rotary=shape.rotary)
    if shape.dropouts:
        notes.append(f"dropout left out: {', '.join(f'{key} {value}' for key, value in shape.dropouts)} (the "
                     f"{shape.family} config's, its class default where config.json leaves a key out). Training "
                     "with dropout keeps a mask per dropout for backward (on CUDA a byte a value: residual dropout "
                     "2·hidden_size a token and layer; attention dropout under eager one per attention probability, "
                     "under sdpa's flash kernel none), which the activations do not count (no family's dropout masks are "
                     "counted); "
                     "set them to 0 in config.json to train without dropout")
    if plan is not None:
        _check_plan_base(shape, plan, cfg)
    # a classifier: its own head, not the base's, with the plan's class count (TUNED's, where the base's differs)
    shape, head, model = _task_class(shape, cfg, method, models, plan.num_labels if plan is not None else None)
    if plan is not None and method != "full":  # no LoRA inside a module PEFT saves whole, as spectra train drops it
        rank_plan_or_rank = plan = _outside_saved(plan, [m.name for m in (*plan.modules_to_save, *head)], notes)
    if attention == "sdpa" and not shape.sdpa:
        attention = "eager"  # what transformers runs when asked for no implementation (the result says so)
    # the causal LM spectra train loads (AutoModelForCausalLM), on the meta device: built only for an MoE's int rank
    train_model = functools.partial(_meta_model_for, cfg, str(cfg.get("model_type", "")).lower(),
                                    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", models=models)
    adapter_modules = _adapter_modules(shape, method, rank_plan_or_rank, roles, layers_to_transform,
                                       parse_stacks(stacks), train_model, notes=notes)
    if method == "qlora" and (reason := _nothing_quantised(shape, cfg)):  # Falcon: FalconLinear stays 16-bit
        raise ConfigError(f"{reason}. Estimate method lora (--method lora): a 16-bit base with a LoRA adapter is "
                          "what that load trains.")
    if method == "qlora" and (narrow := _narrow_4bit_note(shape)):
        notes.append(narrow)
    if method == "qlora" and shape.experts > 1:
        routed = sum(o * i for block in map(shape.block, range(shape.layers)) for role, o, i in block.linears
                     if role in _UNQUANTISED)
        dtype = "fp32" if precision == "fp32" else precision
        kept = f"stay in {dtype}"
        if shape.fp32_params and dtype != "fp32":  # DeepSeek's routers: transformers keeps them in fp32
            kept = (f"stay unquantised: the experts in {dtype}, the routers ({shape.fp32_params:,}) in fp32, as "
                    "transformers keeps them")
        notes.append(f"QLoRA: bitsandbytes quantises nn.Linear modules only, so the routed experts and routers "
                     f"({routed:,} parameters: fused 3-D expert tensors and router weights) {kept}")
    saved = () if method == "full" else plan.modules_to_save if plan is not None else head
    full_tensors = None  # the sizes of the tensors full fine-tuning steps, for 8-bit Adam's per-tensor rule
    if optimizer == "adamw_8bit" and method == "full":
        full_tensors = _full_tensors(shape, cfg, model, models)
        if full_tensors is None:
            notes.append("adamw_8bit: the model's tensors are not known here (transformers cannot build its class "
                         "from the config, or a multimodal model's towers), so every tensor's states are counted "
                         f"at the 8-bit rate, though bitsandbytes keeps a tensor of fewer than {ADAM8_MIN_SIZE:,} "
                         "elements (a bias, a norm) in fp32")
    if saved:  # a classifier's head: get_peft_model adds it to modules_to_save and trains a copy of it whole
        counted = "as the plan counts it" if plan is not None else "as `spectra train` saves it"
        notes.append(f"{', '.join(m.name for m in saved)} ({sum(m.params for m in saved):,} parameters): trained in "
                     f"full by PEFT for {saved[0].task_type} (modules_to_save), {counted}; its trainable copy, "
                     "gradients and optimizer states are in the base's dtype (PEFT upcasts only the LoRA layers)")
    return _estimate(shape, method, adapter_modules, batch, seq_len, precision, optimizer,
                     gradient_checkpointing, attention, double_quant, use_cache, input_require_grads, notes,
                     saved=sum(m.params for m in saved), saved_tensors=_saved_tensors(saved, model),
                     full_tensors=full_tensors)


def _outside_saved(plan: RankPlan, saved: list[str], notes: list[str]) -> RankPlan:
    """``plan`` without its modules inside a module PEFT trains and saves in full (``saved``: a classifier's head),
    noting them: PEFT wraps no LoRA there, and ``spectra train`` drops such a target with the same note
    (:func:`spectra.lora.train._outside_saved_modules`), by one rule (:func:`spectra.ranks.plan.inside_saved`). A plan of this model's config holds none (``recommend``
    leaves them out); one made otherwise (from rows, of another class) may."""
    inside = inside_saved([m.name for m in plan.modules], saved)
    if not inside:
        return plan
    if len(inside) == len(plan.modules):
        raise ConfigError(f"every module of the plan ({', '.join(inside)}) lies in "
                          f"{', '.join(dict.fromkeys(inside.values()))}, which PEFT trains and saves in full "
                          "(modules_to_save): the adapter would hold no LoRA. Plan the base model's blocks.")
    notes.append(f"no LoRA on {', '.join(inside)}: it lies in {', '.join(dict.fromkeys(inside.values()))}, which "
                 "PEFT trains and saves in full (modules_to_save), and PEFT wraps no LoRA inside a module it saves")
    return dataclasses.replace(plan, modules=tuple(m for m in plan.modules if m.name not in inside))


def _saved_tensors(saved, model) -> list[int]:
    """The sizes of the parameters of the modules PEFT trains in full (``saved``: SavedModule), from ``model`` (the
    class built on the meta device) where it holds them, else one tensor of each module's count."""
    modules = dict(model.named_modules()) if model is not None else {}
    if not all(m.name in modules for m in saved):
        return [m.params for m in saved]
    return [int(p.numel()) for m in saved for p in modules[m.name].parameters()]


def _full_tensors(shape: ModelShape, cfg: dict, model, models) -> list[int] | None:
    """The sizes of the parameters full fine-tuning steps (a tied one once): those of the class the shape counts,
    built on the meta device (a classifier's own, ``model``; else the class config.json names, the causal LM or the
    base model, whichever holds ``shape.params``); None where none does, and for a multimodal model (its towers
    are not stepped on text-only batches)."""
    if shape.tower_params:
        return None
    from spectra.checkpoints.targets import meta_model

    mtype = str(cfg.get("model_type", "")).lower()
    candidates = (lambda: model, lambda: (models or meta_model)(cfg),
                  lambda: _meta_model_for(cfg, mtype, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", models=models)[1],
                  lambda: _meta_model_for(cfg, mtype, models=models)[1])
    for build in candidates:
        built = build()
        if built is not None:
            sizes = [int(p.numel()) for p in built.parameters()]  # parameters(): a tied tensor once
            if sum(sizes) == shape.params:
                return sizes
    return None


def _adam8_states(sizes) -> int:
    """Bytes of bitsandbytes' 8-bit AdamW states for tensors of these ``sizes`` (elements): a tensor of fewer than
    ``min_8bit_size`` (:data:`ADAM8_MIN_SIZE`, 4096) elements keeps two fp32 moments (8 bytes an element, whatever
    its dtype); a larger one two 8-bit moments and one fp32 absmax per :data:`ADAM8_BLOCK` elements of each
    (blockwise), beside the two 256-entry fp32 quantisation maps, one tensor each shared by every parameter
    (counted once). bitsandbytes' ``Optimizer2State.init_state`` (0.50), checked against its optimizer's state
    after a step in tests/memory/test_memory_adam8_small_tensors.py."""
    small = sum(n for n in sizes if n < ADAM8_MIN_SIZE)
    large = [n for n in sizes if n >= ADAM8_MIN_SIZE]
    blockwise = sum(2 * n + 2 * 4 * math.ceil(n / ADAM8_BLOCK) for n in large)
    return 8 * small + blockwise + (2 * ADAM8_MAP * 4 if large else 0)


def _adapter_tensors(method: str, adapter_modules: list) -> list[int]:
    """The sizes of the adapter tensors a text-only step steps: each module's lora_A (r·E, d_in) and lora_B
    (d_out, r·E) (E experts of a fused parameter, else 1) and DoRA's magnitude (d_out); not another tower's."""
    sizes = []
    for m in adapter_modules:
        if m.tower:
            continue
        sizes += [m.rank * max(m.experts, 1) * m.d_in, m.rank * max(m.experts, 1) * m.d_out]
        if method == "dora":
            sizes.append(m.d_out)
    return sizes


def _task_class(shape: ModelShape, cfg: dict, method: str, models,
                num_labels: int | None = None) -> tuple[ModelShape, tuple, Any]:
    """``shape`` as the class config.json names holds it where that class is one PEFT trains a head of in full (a
    sequence or token classifier, question answering: :data:`spectra.ranks.plan.PEFT_TASK_MODULES`), and that head
    (:func:`spectra.ranks.plan.task_modules`: PEFT's own names and the rest of the head ``spectra train`` saves,
    :func:`spectra.checkpoints.targets.head_modules`), and the class built; ``shape``, ``()`` and None for any
    other class.

    The shape counts the base model (BERT's with its pooler, a decoder's with its LM head); the classifier holds its
    head instead (RobertaForSequenceClassification has no pooler and a two-layer ``classifier``; a Llama classifier
    a ``score`` and no LM head). Its parameters are counted off the class built from the config on the meta device
    (``models``, or :func:`spectra.checkpoints.targets.meta_model`), the difference going to ``other_params``; under
    QLoRA the linears outside the blocks that bitsandbytes stores in 4 bits are the class's
    (:func:`spectra.checkpoints.targets.bnb_4bit_linears`, asked of a model built for it: it converts in place), the
    head kept out of them as ``spectra train`` loads it (:func:`spectra.lora.train.qlora_kept_modules`: PEFT cannot
    train a copy of a 4-bit layer). ``num_labels`` (a plan's: TUNED's class count, where the base's config declares
    another) builds the class with that many classes, as the model trained is built."""
    from spectra.checkpoints.targets import peft_task_type, with_labels
    from spectra.ranks.plan import PEFT_TASK_MODULES, task_modules

    task = peft_task_type(cfg)
    if task not in PEFT_TASK_MODULES or shape.tower_params:
        return shape, (), None
    from spectra.checkpoints.targets import bnb_4bit_linears, meta_model

    cfg = with_labels(cfg, num_labels)
    model = (models or meta_model)(cfg)
    if model is None:  # a class this transformers cannot build: the base model's count, as before
        return shape, (), None
    built = sum(p.numel() for p in model.parameters())  # tied weights once
    shape = dataclasses.replace(shape, other_params=shape.other_params + built - shape.params)
    head = task_modules(model, task)
    # QLoRA keeps the head PEFT trains a copy of out of 4 bits, as spectra train loads it (qlora_kept_modules)
    kept = [m.name for m in head]
    if method == "qlora" and (converted := bnb_4bit_linears(meta_model(cfg), keep=kept)) is not None:
        from spectra.checkpoints.architectures import module_info

        modules = dict(model.named_modules())
        outside = [tuple(int(d) for d in modules[n].weight.shape) for n in sorted(converted)
                   if module_info(n).layer is None]
        shape = dataclasses.replace(shape, outside_quantised=tuple(outside))
    return shape, head, model


def _nothing_quantised(shape: ModelShape, cfg: dict) -> str | None:
    """Why QLoRA's load would store nothing in 4 bits, or None: the rule ``spectra train`` refuses the run by
    (:func:`spectra.checkpoints.targets.qlora_unquantised`: transformers' bitsandbytes load converts exactly
    nn.Linear, and Falcon's linears are FalconLinear, a subclass), asked of the causal LM train loads, built afresh
    on the meta device (the rule converts it in place, so no build a ``MetaModels`` cache shares). Where
    transformers cannot build it, the family's record (:attr:`ModelShape.unquantised_class`)."""
    from transformers.models.auto import modeling_auto

    from spectra.checkpoints.targets import meta_model, qlora_unquantised

    model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(cfg.get("model_type", "")).lower())
    model = meta_model(cfg, model_class) if isinstance(model_class, str) else None
    reason = qlora_unquantised(model) if model is not None else None
    if reason is None and shape.unquantised_class:
        reason = (f"{shape.family}: QLoRA stores the block linears in 4 bits through transformers' bitsandbytes "
                  f"load, which converts exactly nn.Linear modules; {shape.family}'s are {shape.unquantised_class} "
                  "(a subclass), which it leaves in 16 bits, so nothing would be quantised")
    return reason


def _check_rank(rank_plan_or_rank: Any, method: str) -> None:
    """An adapter's rank: a plan, or an int ≥ 1 (full fine-tuning takes none; an int given is still checked)."""
    if isinstance(rank_plan_or_rank, RankPlan) or (rank_plan_or_rank is None and method == "full"):
        return
    if not isinstance(rank_plan_or_rank, int) or isinstance(rank_plan_or_rank, bool) or rank_plan_or_rank < 1:
        raise ConfigError(f"rank_plan_or_rank (--rank) must be a positive integer (or a RankPlan, --plan), got "
                          f"{rank_plan_or_rank!r}.")


def _check_roles(roles: tuple[str, ...] | None, method: str, plan: RankPlan | None) -> tuple[str, ...] | None:
    """``roles`` checked as ``spectra train`` checks them (:func:`~spectra.checkpoints.roles.check_roles`, as
    ``TrainConfig`` calls it: block roles only, exactly as spelt; ``()`` is None, every block role), refusing roles
    the estimate would ignore (full fine-tuning, a plan)."""
    roles = check_roles(roles)
    if roles is None:
        return None
    if method == "full":
        raise ConfigError("roles pick the modules an adapter adapts; full fine-tuning trains every weight.")
    if plan is not None:
        raise ConfigError("roles go with an int rank; a rank plan adapts the modules it names (plan the roles with "
                          "`spectra recommend --roles`).")
    return roles


def _narrow_4bit_note(shape: ModelShape) -> str | None:
    """What ``spectra train`` refuses of QLoRA on this model (:func:`spectra.lora.train._check_4bit_widths`, on the
    loaded model): bitsandbytes' 4-bit layers need at least 64 input features (its blocks of 64), and a narrower one
    among the layers text runs through fails in the first forward pass. Here on the shape: the blocks' linears that
    bitsandbytes quantises (a multimodal model's other towers, which text never runs, are not checked, as train does
    not). A note, not a refusal: bitsandbytes stores such a layer (the bytes are what it holds); only running it fails.
    None where every such layer is wide enough."""
    narrow = sorted({(i, role) for layer in range(shape.layers) for role, _, i in shape.block(layer).linears
                     if role not in _UNQUANTISED and i < NF4_BLOCK})
    if not narrow:
        return None
    width, role = narrow[0]
    return (f"QLoRA: `spectra train` refuses this model: its {role} projection has {width} input features, and 4-bit "
            f"layers need at least {NF4_BLOCK} (the first forward pass would fail); the figures are what bitsandbytes "
            "would store. Train it with --method lora or dora")


def _quant_constants(numel: int, double_quant: bool) -> int:
    """Bytes of bitsandbytes' NF4 constants for one weight of ``numel`` elements [3]_."""
    blocks = math.ceil(numel / NF4_BLOCK)
    code = 16 * 4  # the NF4 code: 16 fp32 values per tensor
    if not double_quant:
        return 4 * blocks + code  # one fp32 absmax per block
    # absmax quantised to 1 byte, one fp32 per 256 of them, their 256-entry fp32 code and an fp32 offset
    return blocks + 4 * math.ceil(blocks / DQ_BLOCK) + code + 256 * 4 + 4


def _estimate(shape: ModelShape, method: str, adapter_modules: list, batch: int, seq_len: int, precision: str,
              optimizer: str, checkpointing: bool, attention: str, double_quant: bool,
              use_cache: bool, input_require_grads: bool, notes: list[str] = (), saved: int = 0,
              saved_tensors: list[int] = (), full_tensors: list[int] | None = None) -> MemoryEstimate:
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
        quantised += shape.outside_quantised  # BERT's pooler
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

    if saved:  # PEFT's trainable copy of the head a plan's task type trains in full (ModulesToSaveWrapper), in w
        weights += saved * w
        gradients += saved * w
        optimizer_states += math.ceil(saved * {"adamw": 2 * w, "adamw_8bit": 2 * (1 + 4 / ADAM8_BLOCK),
                                               "sgd": 0}[optimizer])
        trainable += saved
    if optimizer == "adamw_8bit":  # bitsandbytes' rule by tensor: small ones fp32, the maps once (_adam8_states)
        tensors = full_tensors if method == "full" else _adapter_tensors(method, adapter_modules)
        if tensors is not None:
            master = 4 * stepped if method == "full" and precision == "mixed" else 0  # the fp32 master copy
            optimizer_states = master + _adam8_states(list(tensors) + list(saved_tensors if saved else ()))

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
        # (a 704→256 DoRA Linear peaked at 4.90 MB, this gives 4.87 MB); an embedding table (rows × width) forms
        # (A·B)ᵀ, s·(A·B)ᵀ and W + s·ΔW in fp32 for its column norms: 3·4·rows·width (a 4096 × 256 table's forward
        # peaked at that plus 1 KiB)
        workspace += max((12 * m.d_in * m.d_out if m.role in TABLES else 4 * (m.d_in * m.d_in + 4 * m.d_in * m.d_out)
                          for m in adapter_modules), default=0)

    # what DynamicCache holds: every token in a full-attention layer, the last window − 1 in a sliding one
    kv_cache = shape.cached_values(seq_len) * batch * p if shape.causal else 0
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
