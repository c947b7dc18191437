"""Checkpoint module names → what PEFT targets on the model class that loads them.

A LoRA adapter is applied to a model, and PEFT matches ``target_modules``, ``rank_pattern``
keys and adapter keys against that model's names, which can differ from the checkpoint's:

- by a prefix: the original GPT-2 checkpoint stores ``h.0.attn.c_attn`` where
  ``GPT2LMHeadModel`` has ``transformer.h.0.attn.c_attn``, and a bare ``LlamaModel`` saves
  ``layers.0…`` where ``LlamaForCausalLM`` has ``model.layers.0…`` (resolved by dot-suffix);
- by transformers' loading conversions (transformers ≥ 5): a tensor renamed (GPT-NeoX stores
  its head as ``embed_out``, the model's module is ``lm_head``) or fused: Mixtral's per-expert
  ``block_sparse_moe.experts.3.w1``/``w3`` (out, in) become slices of one
  ``mlp.experts.gate_up_proj`` parameter (experts, 2·ffn, hidden), which is no module: PEFT
  adapts it through ``target_parameters``, at one rank for all of its experts.

The model is built from ``config.json`` on the meta device (shapes only, no memory), and
transformers' own conversion table says where each checkpoint tensor lands, as it does when
the model is loaded (which slice of a fused parameter: :mod:`spectra.checkpoints.placement`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from spectra.checkpoints.architectures import dbrx_expert_refusal
from spectra.errors import ConfigError


@dataclass(frozen=True)
class ModelTarget:
    """Where one checkpoint module lands in the model: a module PEFT wraps, or a parameter.

    ``parameter`` targets (``LoraConfig.target_parameters``) are weights held by a module PEFT
    cannot wrap: a fused 3-D expert tensor (experts, out, in), or a router's ``weight``. Their
    ``stored_name`` is the checkpoint module's name with the prefix of the model's names (a bare
    ``MixtralModel``'s ``layers.0…experts.3.w1`` as ``MixtralForCausalLM`` stores it,
    ``model.layers.0…``): the name under which PEFT converts an adapter's per-expert tensors.
    """

    name: str  # module name (target_modules) or parameter name (target_parameters)
    parameter: bool = False
    stored_name: str | None = None  # parameter targets: the checkpoint name, prefixed as the model's


def architecture(config: Mapping | None) -> str | None:
    """The model class a ``config.json`` names (its first ``architectures`` entry), or None."""
    return ((config or {}).get("architectures") or [None])[0]


# PEFT task type of a transformers model class, by the end of its name (GPT-2's LM class is GPT2LMHeadModel).
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_task_type(config: Mapping | None, model_class: str | None = None) -> str | None:
    """The PEFT ``task_type`` for the class ``model_class`` (default: the one ``config`` names).

    ``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS`` or ``QUESTION_ANS`` by the class name's end,
    ``SEQ_2_SEQ_LM`` for an encoder-decoder ``…ForConditionalGeneration``; None for anything
    else (a bare ``BertModel``/``LlamaModel``, a masked LM, a vision-language model, no
    config): PEFT's plain ``PeftModel``, which wraps any model. A causal-LM task type on a
    classifier makes ``get_peft_model`` fail (BERT has no ``prepare_inputs_for_generation``)
    and a missing ``SEQ_CLS`` would leave its classification head frozen.
    """
    model_class = model_class or architecture(config)
    if not model_class:
        return None
    for suffix, task in _TASK_TYPES:
        if model_class.endswith(suffix):
            return task
    if model_class.endswith("ForConditionalGeneration") and (config or {}).get("is_encoder_decoder"):
        return "SEQ_2_SEQ_LM"
    return None


def configured_labels(config: Mapping) -> int:
    """The classes a config declares: ``len(id2label)``, else ``num_labels``, else transformers' default 2."""
    id2label = config.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.get("num_labels") or 2)


def with_labels(config: Mapping, num_labels: int | None) -> Mapping:
    """``config`` with ``num_labels`` classes, as ``from_pretrained(BASE, num_labels=…)`` builds the model: its own
    ``id2label``/``label2id`` (of another count) dropped. ``config`` itself where ``num_labels`` is None."""
    if num_labels is None:
        return config
    return {k: v for k, v in config.items() if k not in ("id2label", "label2id")} | {"num_labels": num_labels}


def meta_model(config: Mapping | None, model_class: str | None = None):
    """The class ``model_class`` (default: the one ``config`` names), built on the meta device, or None.

    None when the config lacks ``model_type`` or names no class, or when this transformers has
    no such class or cannot build it from the config: then there is nothing to check names against.
    Token ids outside the vocabulary (a tiny config that keeps its family's pad_token_id: GLM's
    151329 of 64) stop ``nn.Embedding`` but change no module or parameter: the model is then built
    with ``pad_token_id``, ``bos_token_id`` and ``eos_token_id`` unset.
    """
    model_class = model_class or architecture(config)
    if not config or not model_class or not config.get("model_type"):
        return None
    import transformers

    cls = getattr(transformers, model_class, None)
    if cls is None:
        return None
    fields = {k: v for k, v in config.items() if k != "model_type"}
    for ids in ({}, dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"))):
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                return cls(transformers.AutoConfig.for_model(config["model_type"], **(fields | ids)))
        except Exception:  # an architecture this transformers cannot build from its config: nothing to check against
            continue
    return None


def bnb_skip_modules(model, keep: Iterable[str] = ()) -> list[str] | None:
    """The ``BitsAndBytesConfig.llm_int8_skip_modules`` that keeps the modules ``keep`` names out of 4 bits besides
    those transformers keeps of ``model`` itself; None (transformers' own rule) where ``keep`` is empty.

    Setting ``llm_int8_skip_modules`` replaces transformers' default keep list (``get_keys_to_not_convert``: the
    output embedding, tied weights, the last parameter's module) rather than adding to it, so that list, asked of
    ``model`` (the class ``from_pretrained`` builds; on the meta device will do), is part of this one; the class's
    ``_keep_in_fp32_modules`` are added by transformers either way. QLoRA keeps a classifier's head out this way
    (``keep``: :func:`spectra.ranks.plan.task_modules`): PEFT trains a copy of it (``modules_to_save``), which it
    cannot do of a 4-bit layer (only floating-point tensors can require gradients). Names match as transformers
    matches them: a key keeps every module under it (``classifier`` keeps RoBERTa's ``classifier.dense``)."""
    keep = list(keep)
    if not keep:
        return None
    try:  # transformers ≥ 5
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        from transformers.integrations import get_keys_to_not_convert
    return sorted(set(get_keys_to_not_convert(model)) | set(keep))


def bnb_4bit_linears(model, keep: Iterable[str] = (), *, left_out: dict[str, str] | None = None) -> set[str] | None:
    """Names of the modules of ``model`` that transformers' bitsandbytes path stores in NF4
    (``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))``, with
    ``llm_int8_skip_modules=bnb_skip_modules(model, keep)``: the modules ``keep`` names stay unquantised, as QLoRA
    keeps a classifier's head), asked of transformers itself: its keep list (``get_modules_to_not_convert``: the
    output embedding, tied weights, the last parameter's module, the class's ``_keep_in_fp32_modules`` such as T5's
    ``wo``, and :func:`bnb_skip_modules`'s) and its ``replace_with_bnb_linear``, which converts exactly the
    ``nn.Linear`` and ``Conv1D`` modules no key of that list matches (as a prefix up to a module boundary, a regex or
    a suffix; not only an equal name). ``model`` is converted in place: pass one built for this on the meta device
    (:func:`meta_model`). Which modules are converted does not depend on the compute dtype or double quantisation.
    ``left_out``, a dict, receives name → class of the ``nn.Linear`` subclasses outside the keep list, which the
    path leaves unquantised (Falcon's ``FalconLinear``). None where this transformers or bitsandbytes lacks that
    path."""
    try:
        import bitsandbytes as bnb
        from transformers import BitsAndBytesConfig
        from transformers.integrations import replace_with_bnb_linear
        from transformers.quantizers.auto import AutoHfQuantizer
    except ImportError:
        return None
    try:
        quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=bnb_skip_modules(model, keep)))
        skip = quantizer.get_modules_to_not_convert(model, quantizer.quantization_config.llm_int8_skip_modules,
                                                    model._keep_in_fp32_modules)
        left = _subclass_linears(model, skip)  # before the conversion, whose Linear4bit is an nn.Linear subclass too
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantizer.quantization_config)
    except (AttributeError, TypeError, ImportError):  # a transformers whose bitsandbytes path differs
        return None
    if left_out is not None:
        left_out.update(left)
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def _subclass_linears(model, skip: list[str] | None) -> dict[str, str]:
    """Module name → class name of the ``nn.Linear`` subclasses of ``model`` that no key of ``skip`` (transformers'
    keep list) matches: outside the keep list, yet left unquantised, as ``replace_with_bnb_linear`` converts a
    module whose type is exactly ``nn.Linear`` (or transformers' ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    return {name: type(module).__name__ for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear
            and not isinstance(module, Conv1D) and should_convert_module(name, skip)}


def qlora_unquantised(model, keep: Iterable[str] = ()) -> str | None:
    """Why a QLoRA load of ``model`` would quantise nothing, or None: the rule ``spectra train`` and ``spectra
    memory`` both refuse QLoRA by.

    transformers' bitsandbytes load (:func:`bnb_4bit_linears`) converts modules whose type is exactly ``nn.Linear``
    (or ``Conv1D``); a family whose linears are a subclass (Falcon's ``FalconLinear``) keeps them all in 16 bits, and
    the run would train a LoRA on an unquantised base while calling itself QLoRA. The reason is given where the load
    would store no module of ``model`` in 4 bits while linears outside transformers' keep list stay unquantised for
    their class; it names those classes and a module of each. ``model`` is converted in place: pass one built for
    this on the meta device (:func:`meta_model`). None also where this transformers or bitsandbytes lacks the path
    (nothing to tell)."""
    left: dict[str, str] = {}
    converted = bnb_4bit_linears(model, keep, left_out=left)
    if converted is None or converted or not left:
        return None
    classes = {}  # class name -> its first module
    for name, cls in left.items():
        classes.setdefault(cls, name)
    named = ", ".join(f"{cls} (e.g. {name})" for cls, name in classes.items())
    return (f"{type(model).__name__}: QLoRA stores the block linears in 4 bits through transformers' bitsandbytes "
            f"load, which converts exactly nn.Linear modules; this model's {len(left)} linears are {named}, a "
            "subclass of nn.Linear, which it leaves in 16 bits, so nothing would be quantised")


# PEFT 0.21's rule for Mamba-based models (``peft.tuners.tuners_utils._check_lora_target_modules_mamba``): in a model
# whose config's model_type is one of PEFT_MAMBA_MODEL_TYPES, get_peft_model and PeftModel.from_pretrained raise on a
# LoRA target whose own name (the last part of its module name) is one of PEFT_MAMBA_MODULES, whatever the module
PEFT_MAMBA_MODULES = ("out_proj", "conv1d")
PEFT_MAMBA_MODEL_TYPES = ("falcon_h1", "falcon_mamba", "mamba", "mamba2", "nemotron_h")


def peft_refusal(name: str, model_type: str | None, module: torch.nn.Module | None = None) -> str | None:
    """Why PEFT puts no LoRA on the module ``name`` of a model of ``model_type``, or None: the one rule ``spectra
    recommend``, ``extract``, ``train`` and ``verify`` leave such a module out (or refuse) by.

    - PEFT's Mamba rule (:data:`PEFT_MAMBA_MODULES`, :data:`PEFT_MAMBA_MODEL_TYPES`): a Mamba mixer's ``out_proj``
      and depthwise ``conv1d`` (and any module so named in those models) are refused by name, so an adapter or a
      ``LoraConfig`` naming one fails in PEFT.
    - One expert of DBRX's stacked 2-D ``ffn.experts.mlp.w1`` (``v1``, ``w2``), as the pairing names it
      (``…ffn.experts.mlp.3.w1``): PEFT adapts the parameter only whole, one LoRA all experts share
      (:func:`~spectra.checkpoints.architectures.dbrx_expert_refusal`).
    - ``module``, where known, a convolution of more than one group (Mamba's, Jamba's and Bamba's depthwise
      ``conv1d``): PEFT 0.21 wraps one only at a rank divisible by its groups, its B a grouped convolution, so its
      update is no rank-r factorisation of ΔW, and its merge of one raises (PEFT has no merge for it).
    """
    stacked = dbrx_expert_refusal(name, model_type)  # one expert of DBRX's 2-D ffn.experts.mlp.w1 (v1, w2)
    if stacked is not None:
        return stacked
    leaf = name.rpartition(".")[2]
    if model_type in PEFT_MAMBA_MODEL_TYPES and leaf in PEFT_MAMBA_MODULES:
        return (f"PEFT refuses a LoRA on {' and '.join(PEFT_MAMBA_MODULES)} in Mamba-based models (model_type "
                f"{', '.join(PEFT_MAMBA_MODEL_TYPES[:-1])} or {PEFT_MAMBA_MODEL_TYPES[-1]}; this one is "
                f"{model_type}): get_peft_model and PeftModel.from_pretrained raise on it")
    groups = getattr(module, "groups", 1) if isinstance(module, torch.nn.modules.conv._ConvNd) else 1
    if groups != 1:
        return (f"a convolution of {groups} groups: PEFT wraps one only at a rank divisible by {groups}, with a "
                "grouped B that is no rank-r factor of ΔW, and cannot merge it")
    return None


def resolve_name(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` equal to ``name`` or differing from it by a leading prefix, else None."""
    names = list(names)
    if name in names:
        return name
    hits = [m for m in names if m.endswith("." + name) or name.endswith("." + m)]
    return hits[0] if len(hits) == 1 else None


def model_targets(names: Iterable[str], model) -> dict[str, ModelTarget | None]:
    """Checkpoint module name (``model.layers.0.self_attn.q_proj``, no ``.weight``) → its target in ``model``.

    A name is the model's module when it resolves to one (exactly or up to a leading prefix) that
    PEFT's LoRA can wrap and run (Linear, Embedding, Conv, transformers' Conv1D; not a Linear whose
    forward returns a tuple, such as PhiMoE's router: see :func:`lora_can_wrap`). Otherwise its
    ``.weight`` is renamed as transformers renames it on loading, and resolved against the
    model's parameters: the weight of a module PEFT can wrap gives that module (GPT-NeoX's
    ``embed_out`` → ``lm_head``), any other a parameter target (Mixtral's
    ``…experts.3.w1`` → ``…mlp.experts.gate_up_proj``, PhiMoE's ``…block_sparse_moe.gate`` →
    ``…mlp.router.weight``). A name that is itself a stored parameter, with no ``.weight`` (3-D
    experts stored fused: Qwen3-VL-MoE's ``…mlp.experts.gate_up_proj``, gpt-oss's), is renamed
    and resolved as one, whatever loading does to its values (Qwen3-VL-MoE's hub checkpoints store
    each expert transposed): a parameter target. None: the model has no such weight.
    """
    modules = dict(model.named_modules())
    module_names = [n for n in modules if n]
    parameters = [n for n, _ in model.named_parameters()]
    rename = loading_rename(model)
    out = {}
    for name in names:
        module = resolve_name(name, module_names)
        if module is not None and lora_can_wrap(modules[module]):
            out[name] = ModelTarget(module)
            continue
        loaded = rename(name + ".weight")
        weight = resolve_name(loaded, parameters)
        if weight is None and ".experts." in f".{name}.":  # experts stored fused, a parameter under its own name
            loaded = rename(name)
            weight = resolve_name(loaded, parameters) if not loaded.endswith(".weight") else None
        if weight is None:
            out[name] = None
            continue
        owner, _, leaf = weight.rpartition(".")
        if leaf == "weight" and owner in modules and lora_can_wrap(modules[owner]):
            out[name] = ModelTarget(owner)
        elif len(weight) >= len(loaded):  # the model's name adds a prefix: model.layers.0… for layers.0…
            out[name] = ModelTarget(weight, parameter=True, stored_name=weight[:len(weight) - len(loaded)] + name)
        else:  # the checkpoint's name carries a prefix the model's lacks
            out[name] = ModelTarget(weight, parameter=True, stored_name=name[len(loaded) - len(weight):])
    return out


def peft_rewritten_modules(names: Iterable[str], model) -> list[str]:
    """The module names among ``names`` that PEFT would not keep as ``target_modules`` entries on ``model``.

    PEFT (0.21) runs ``convert_peft_config_for_transformers`` on every LoRA config in ``get_peft_model`` and
    ``PeftModel.from_pretrained``. For a model type transformers maps to the ``qwen2_moe`` or ``mixtral``
    conversion (Qwen3-MoE, DeepSeek-V2/V3, GLM-4 MoE, GLM-4.5V, OLMoE, Qwen3-Next, Qwen3-Omni, …) it turns every
    entry that ends in ``.gate_proj``, ``.up_proj``, ``.down_proj`` or ``.gate`` (``.w1``/``.w2``/``.w3``), a
    full name included, into the bare ``target_parameters`` entry ``gate_up_proj``/``down_proj``/``gate.weight``:
    a dense MLP's, a shared expert's or a vision tower's projection is then not adapted at all, and every
    fused expert parameter of the model is instead. Asked of PEFT itself, on a copy of no config that matters:
    empty without PEFT or without the conversion.
    """
    from spectra.checkpoints.peft_match import peft_converted

    names = list(names)
    if not names:
        return []

    def kept(batch: list[str]) -> set[str]:
        converted = peft_converted({"target_modules": list(batch)}, model)  # None: a PEFT that converts nothing
        return set(batch) if converted is None else set(converted["target_modules"] or ()) & set(batch)

    try:
        left = kept(names)
    except ValueError:  # a part of a fused pair (gate_proj without up_proj): PEFT refuses; ask name by name
        left = set()
        for name in names:
            try:
                left |= kept([name])
            except ValueError:
                pass
    return [n for n in names if n not in left]


# what a user does about a module that cannot be adapted, whichever way it was selected
_LEAVE_OUT = ("Leave it out of the targets: its role (--roles q,k,v,o), or the module (drop it from the plan or "
              "target_modules).")


def rewritten_weights(names: Iterable[str], model, *, fix: str = _LEAVE_OUT) -> list[str]:
    """:func:`peft_rewritten_modules` of ``names``, each checked to be a Linear whose (out, in) weight can be adapted
    in its place (``target_parameters`` ``{name}.weight``, which PEFT leaves alone).

    ``fix`` ends the error: what the caller's user does to leave the module out (``--roles``, or the plan, as the
    module was selected).

    Raises
    ------
    ConfigError
        A rewritten target that is no Linear (a Conv1D, say): there is no weight to adapt instead.
    """
    rewritten = peft_rewritten_modules(names, model)
    for name in rewritten:
        module = model.get_submodule(name)
        if not isinstance(module, torch.nn.Linear) or module.weight.dim() != 2:
            raise ConfigError(f"{name}: PEFT rewrites this target_modules entry of {type(model).__name__} into a "
                              "fused expert parameter, and it is no Linear whose (out, in) weight spectra could "
                              f"adapt instead. {fix}")
    return rewritten


def owning_modules(names: Iterable[str], model) -> tuple[dict[str, str | None], set[str]]:
    """(checkpoint module name → the model's module that holds its tensors as stored, whatever its type, else None;
    the names among them whose weight loading converts).

    For modules saved whole (``modules_to_save``): PEFT copies such a module and runs its own forward, so unlike
    in :func:`model_targets` it does not matter whether a LoRA module could wrap it. PhiMoE's router
    ``block_sparse_moe.gate`` (an nn.Linear whose forward returns a tuple) is the model's ``mlp.router``, Mixtral's
    (a MixtralTopKRouter, no Linear) ``mlp.gate``, although both are parameter targets for a LoRA. A name resolves
    to a module (exactly or up to a leading prefix), else its ``.weight`` renamed as on loading to a module's
    ``weight``. None: the model has no such module, or loading converts the weight (fuses, splits or transposes
    it: Mixtral's ``…experts.3.w1``, a slice of the fused ``mlp.experts.gate_up_proj``), so no module holds it as
    stored; the second value names the latter, for the error that says which.
    """
    modules = {n for n, _ in model.named_modules() if n}
    parameters = [n for n, _ in model.named_parameters()]
    rename = _loading_conversion(model)
    out, converted_names = {}, set()
    for name in names:
        module = resolve_name(name, modules)
        if module is None:
            loaded, converted = rename(name + ".weight")
            if converted:
                converted_names.add(name)
            weight = None if converted else resolve_name(loaded, parameters)
            owner, _, leaf = (weight or "").rpartition(".")
            module = owner if leaf == "weight" and owner in modules else None
        out[name] = module
    return out, converted_names


def lora_can_wrap(module: torch.nn.Module) -> bool:
    """Whether PEFT's LoRA wraps this module and still runs (else only its parameters can be targeted).

    PEFT wraps any subclass of the types below, and its ``lora.Linear`` adds ``s·B@A@x``, of shape ``(…, out)``, to
    what the wrapped module returns for ``x`` of shape ``(…, in)``. A Linear whose forward returns no tensor (PhiMoE's
    router ``PhimoeTopKRouter`` and Llama 4's return a tuple: logits, routing weights, experts) is wrapped, merges,
    and then fails in every forward; so does one whose forward is no map of ``(…, in)`` to ``(…, out)``: DeepSeek-V4's
    grouped ``o_a_proj`` (``DeepseekV4GroupedLinear``, weight ``(groups·r, in/groups)``) takes ``(…, groups, in)``
    and returns ``(…, groups, r)``. Their weight is adapted as a parameter (``target_parameters``), which PEFT merges
    into the weight before the module runs.
    """
    from transformers.pytorch_utils import Conv1D

    if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                               torch.nn.Conv3d, Conv1D)):
        return False
    return not isinstance(module, torch.nn.Linear) or type(module).forward is torch.nn.Linear.forward or \
        _maps_like_a_linear(module)


def _maps_like_a_linear(linear: torch.nn.Linear) -> bool:
    """Whether a Linear subclass's own forward maps ``(1, in)`` to a ``(1, out)`` tensor, run on one row of zeros
    with its parameters and buffers swapped for meta-device ones (shapes only: no arithmetic, no random numbers
    drawn, the module kept as it is).

    Where it cannot run so, a model's own layer (its class defined in ``transformers.models``: DeepSeek-V4's
    grouped ``o_a_proj``, which reshapes its input into groups) is no Linear to PEFT: False. Any other (a
    quantisation backend's Linear, which needs its real packed weight): True, nothing to tell (wrapped, as PEFT
    does)."""
    from torch.func import functional_call

    try:
        meta = {name: torch.empty_like(t, device="meta")
                for name, t in [*linear.named_parameters(), *linear.named_buffers()]}
        x = torch.zeros(1, linear.in_features, device="meta", dtype=linear.weight.dtype)  # (1, in)
        with torch.no_grad():
            out = functional_call(linear, meta, (x,))
    except Exception:  # a forward that needs other inputs or real values
        return not type(linear).__module__.startswith("transformers.models.")
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, linear.out_features)


def conversions(model) -> tuple[list, list] | None:
    """transformers' loading conversions for the model's class: (renamings, converters), as ``WeightRenaming`` and
    ``WeightConverter`` lists.

    None under transformers 4, which loads every tensor under its stored name. The loader, PEFT
    (mapping adapters) and :mod:`spectra.checkpoints.placement` all read the same table.
    """
    try:  # transformers ≥ 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    table = get_model_conversion_mapping(model)
    return ([c for c in table if isinstance(c, WeightRenaming)], [c for c in table if isinstance(c, WeightConverter)])


def loading_rename(model):
    """Checkpoint tensor name → the model's, as transformers' loader renames and fuses it."""
    rename = _loading_conversion(model)
    return lambda key: rename(key)[0]



def names_by_key(names: Iterable[str], keys: list[str], rename) -> dict[str, str]:
    """State-dict key (of `keys`) -> the one checkpoint tensor (of `names`) transformers loads into it, read without
    loading the model.

    A name is renamed as transformers renames it on loading (`rename`: :func:`loading_rename`; gpt_neox's
    ``embed_out.weight`` is the model's ``lm_head.weight``, Qwen2-VL's hub ``model.layers.N…`` its
    ``model.language_model.layers.N…``), then matched to a key up to a prefix. A key several tensors are fused
    into (Mixtral's per-expert weights into one ``gate_up_proj``) gets none.
    """
    from collections import Counter

    from spectra.checkpoints.names import match_names

    names = list(names)
    loaded = [rename(n) for n in names]
    counts = Counter(loaded)
    stored = {new: name for new, name in zip(loaded, names) if counts[new] == 1}  # loaded name -> checkpoint name
    return {key: stored[new] for new, key in match_names(list(stored), keys).pairs.items()}


def _loading_conversion(model):
    """Checkpoint tensor name → (the model's name, whether a converter changes the tensor on loading: fuses it into
    a parameter with others, splits or transposes it), as transformers' loader does."""
    table = conversions(model)
    if table is None:
        return lambda key: (key, False)
    from transformers.core_model_loading import rename_source_key

    renamings, converters = table

    def rename(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters)  # converter: its source pattern, or None
        return name, converter is not None

    return rename


def head_modules(model, notes: list[str] | None = None) -> list[str]:
    """A sequence classifier's head: the modules its class holds beside its base model (the one at
    ``base_model_prefix``: RoBERTa's ``classifier``, DistilBERT's ``pre_classifier`` and ``classifier``, DeBERTa-v2's
    ``pooler`` and ``classifier``, BART's ``classification_head``, GPT-2's and Llama's ``score``) that hold
    parameters: what a base checkpoint lacks, so they must be trained and saved, whole, via ``modules_to_save``.

    PEFT matches a ``modules_to_save`` entry as the *end* of a module's name (``key.endswith(entry)``), so each name
    is a whole top-level module name: a leaf name such as RoBERTa's ``dense`` had also matched every encoder
    ``….output.dense``, trained in full. A head name that the end of a module inside the base model also matches is
    left out, with a note (``notes``), rather than train that module whole. PEFT adds ``classifier`` and ``score``
    itself for ``SEQ_CLS`` (:data:`spectra.ranks.plan.PEFT_TASK_MODULES`). Shared by ``spectra train``
    (what it saves) and the plan (what it counts). A model with no separate base: ``[]``.
    """
    base = model.base_model
    if base is model:
        return []
    heads = [name for name, child in model.named_children()
             if child is not base and any(True for _ in child.parameters())]
    inner = [f"{model.base_model_prefix}.{name}" for name, _ in base.named_modules() if name]
    out = []
    for head in heads:
        clash = next((name for name in inner if name.endswith(head)), None)
        if clash is None or head.endswith(("classifier", "score")):  # PEFT's own SEQ_CLS names: it adds them anyway
            out.append(head)
        elif notes is not None:
            notes.append(f"the head module {head} is not trained in full (modules_to_save): PEFT matches its name as "
                         f"the end of a module name, and would train {clash} in full too")
    return out
