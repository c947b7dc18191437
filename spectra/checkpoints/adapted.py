"""What an adapter targets on a loaded (or meta-device) model: the modules and fused expert parameters of a
selection of roles and stacks, as PEFT will adapt them. ``spectra train`` (``lora_config``) and ``spectra memory``
(an MoE's int rank: what train adapts) ask the same functions, so the estimate is of what train trains.

torch, transformers and spectra.checkpoints.targets (which imports torch) are imported inside the functions: importing this module costs nothing (``spectra.memory``
imports it at its top).
"""

from __future__ import annotations

from dataclasses import dataclass

from spectra.checkpoints.architectures import (missing_stacks, module_info, parallel_experts, role_selected,
                                              stack_selected)
from spectra.checkpoints.roles import check_roles, default_roles
from spectra.errors import ConfigError

TEXT_STACKS = (None, "encoder")  # the stacks text batches run through: the language model, an encoder-decoder's encoder


@dataclass(frozen=True)
class TargetSelection:
    """What to adapt, as the fields of ``spectra train``'s ``TrainConfig`` of the same names give it (a
    ``TrainConfig`` is passed where a selection is asked for; ``spectra memory`` builds this).

    Attributes
    ----------
    method : {"lora", "dora", "qlora", "qdora", "full"}
        Decides which parameter targets PEFT can adapt (:func:`_fit_method`).
    roles : tuple of str, optional
        Block roles (:data:`~spectra.checkpoints.roles.BLOCK_ROLES`); None or (): every one, a projector's
        (role projector) only where ``stacks`` name the projector (:func:`~spectra.checkpoints.roles.default_roles`).
    stacks : tuple of str, optional
        None: the stacks text runs through (:data:`TEXT_STACKS`).
    target_modules : tuple of str, optional
        Module names instead of roles.
    lora_dropout : float
        PEFT adapts a parameter only without dropout.
    """

    method: str = "lora"
    roles: tuple[str, ...] | None = None
    stacks: tuple[str, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", check_roles(self.roles))  # () reads as None, as TrainConfig reads it


def target_modules(model, roles: tuple[str, ...] | None = None, *, stacks: tuple[str, ...] | None = None,
                   notes: list[str] | None = None) -> list[str]:
    """Full names of the Linear/Conv1D modules of ``roles`` (default: every block linear) in ``stacks``.

    The modules of :func:`role_targets`; an MoE's fused expert parameters of those roles are its second list.
    """
    return role_targets(model, roles, stacks=stacks, notes=notes)[0]


def role_targets(model, roles: tuple[str, ...] | None = None, *, stacks: tuple[str, ...] | None = None,
                 notes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(Linear/Conv1D module names, parameter names) of ``roles`` (default: every block linear) in ``stacks``.

    An MoE of transformers 5 holds its routed experts as 3-D parameters of a module no LoRA can wrap (Mixtral's,
    Qwen3-MoE's, DeepSeek-V3's ``mlp.experts.gate_up_proj`` (experts, 2·ffn, hidden) and ``down_proj``): PEFT
    adapts them through ``target_parameters``, so they are in the second list, after the weights (``….weight``) of
    the Linears PEFT's ``lora.Linear`` cannot wrap (:func:`~spectra.checkpoints.targets.lora_can_wrap`: DeepSeek-V4's
    grouped ``o_a_proj``), adapted so too. ``gate_up_proj`` holds gate and up together, so either role takes it
    whole (as ``--roles q`` takes GPT-2's fused ``c_attn``). A router (role ``other``) is no block role: never taken.

    ``stacks`` None: the stacks text runs through (:data:`TEXT_STACKS`). A multimodal
    model's others (a vision or audio tower, the projector into the language model; see
    :data:`~spectra.checkpoints.architectures.STACKS`) are then left out: spectra's batches
    are text, which never reaches them, so an adapter there would get no gradient and stay
    at zero; ``notes`` says how many. ``stacks`` that name such a stack take its modules,
    and ``notes`` says that text will not train them.
    """
    modules, weights, experts = _role_targets(model, roles, stacks=stacks, notes=notes)
    return modules, weights + experts


def _role_targets(model, roles: tuple[str, ...] | None = None, *, stacks: tuple[str, ...] | None = None,
                  notes: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """:func:`role_targets` as three lists: (modules, weights of the Linears no ``lora.Linear`` wraps, experts)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from spectra.checkpoints.targets import lora_can_wrap

    asked = f"role(s) {', '.join(roles)}" if roles else "every block role"
    roles = roles or default_roles(stacks)  # --stacks projector adds role projector
    model_config = model.config.to_dict()  # an encoder-decoder's encoder is a stack of its own
    modules = dict(model.named_modules())
    infos = {name: module_info(name, model_config) for name, module in modules.items()
             if isinstance(module, (torch.nn.Linear, Conv1D))}
    experts = {name: module_info(_expert_module(name, p.shape, model_config), model_config)
               for name, p in model.named_parameters()
               if p.dim() == 3 and not lora_can_wrap(modules[name.rpartition(".")[0]])}  # (experts, ·, ·)
    infos |= experts
    unwrapped = {name for name in infos if name not in experts and not lora_can_wrap(modules[name])}  # V4's o_a_proj
    stack_of = {name: info.stack for name, info in infos.items() if role_selected(info.role, roles, name)}
    if not stack_of:
        held = sorted({info.role for info in infos.values()})
        raise ConfigError(f"the model has no Linear/Conv1D module or expert parameter of role(s) {', '.join(roles)} "
                          f"to adapt; its roles are {', '.join(held) or 'none'}: pass --roles from those.")

    def split(names) -> tuple[list[str], list[str], list[str]]:
        return ([n for n in names if n not in experts and n not in unwrapped],
                [f"{n}.weight" for n in names if n in unwrapped], [n for n in names if n in experts])

    if stacks is not None:
        lacking = missing_stacks(stacks, set(stack_of.values()), option="stacks (--stacks)")  # none held: refused
        if lacking and notes is not None:
            notes.append(lacking)
        names = [name for name, stack in stack_of.items() if stack_selected(stack, stacks)]
        unreached = sorted({stack for name, stack in stack_of.items() if name in names and stack not in TEXT_STACKS},
                           key=str)
        if unreached and notes is not None:
            notes.append(f"stacks {','.join(stacks)}: the adapters of the {', '.join(unreached)} stack(s) get no "
                         "gradient from text-only batches (text never reaches them), so they stay at zero")
        return split(names)
    towers = {name: stack for name, stack in stack_of.items() if stack not in TEXT_STACKS}  # a vision tower's, …
    if len(towers) == len(stack_of):
        raise ConfigError(f"the model has no Linear/Conv1D module of role(s) {', '.join(roles)} that text reaches "
                          f"(only {len(towers)} in its {', '.join(sorted(set(towers.values())))} stack); "
                          "name the stack to adapt it anyway (stacks, --stacks).")
    if towers and notes is not None:
        kept = [name for name in stack_of if name not in towers and name not in experts]  # experts: a note of their own
        notes.append(f"LoRA targets the {len(kept)} module(s) of {asked} that text runs through; "
                     f"the {len(towers)} of the {', '.join(sorted(set(towers.values())))} stack(s) (e.g. "
                     f"{next(iter(towers))}) are left out: text-only batches never reach them, so they would get no "
                     "gradient (--stacks names a stack to adapt it anyway)")
    return split([name for name in stack_of if name not in towers])


def _expert_module(name: str, shape, config: dict) -> str:
    """The name a 3-D expert parameter's role is read from: JetMoE's ``mlp.input_linear.weight`` (a
    ``JetMoeParallelExperts``' weight, :func:`~spectra.checkpoints.architectures.parallel_experts`) by its module's
    name, as its checkpoint's tensor is; a fused expert parameter (``mlp.experts.gate_up_proj``) by its own."""
    module = name.removesuffix(".weight")
    return module if module != name and parallel_experts(module, tuple(shape), config) else name


def _expert_kind(name: str) -> str:
    """A fused expert parameter's kind, for notes: ``gate_up_proj``, or JetMoE's ``mlp.input_linear``."""
    module = name.removesuffix(".weight")
    if module == name:
        return name.rpartition(".")[2]
    return ".".join(module.split(".")[-2:]) if ".experts." not in f".{module}." else ".".join(module.split(".")[-3:])


def peft_targets(model, config: TargetSelection, *, notes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(``target_modules``, ``target_parameters``) that make PEFT adapt exactly what ``config`` targets (no plan):
    a :class:`TargetSelection`, or ``spectra train``'s ``TrainConfig``, which has its fields.

    The targets are ``config.target_modules``, else the modules and fused expert parameters of its roles and stacks
    (:func:`role_targets`). PEFT 0.21 rewrites a ``target_modules`` entry ending in ``.gate_proj``/``.up_proj``/
    ``.down_proj``/``.gate`` of a ``qwen2_moe``- or ``mixtral``-family model (Qwen3-MoE, DeepSeek-V2/V3, GLM-4 MoE,
    GLM-4.5V, OLMoE, Qwen3-Next, …) into the bare fused expert parameters, so a dense layer's MLP
    (``mlp_only_layers``, ``first_k_dense_replace``) or a shared expert would get no adapter and every layer's
    experts would get one instead (:func:`~spectra.checkpoints.targets.peft_rewritten_modules`). Those modules are
    named by their weight in ``target_parameters`` (``…mlp.gate_proj.weight``), which PEFT does not rewrite, beside
    the experts' fused parameters. ``notes`` says what goes through ``target_parameters``.

    PEFT adapts a parameter with plain LoRA only: with DoRA, a 4-bit base (QLoRA, QDoRA) or ``lora_dropout``, such
    targets are refused where ``roles`` or ``target_modules`` asked for them, and left out of the default roles
    (every block linear: every one this method can adapt), which ``notes`` says; see :func:`_fit_method`.
    """
    from spectra.checkpoints.targets import lora_can_wrap

    cls = type(model).__name__
    modules, weights, experts = _peft_targets(model, config, notes=notes)
    modules, parameters = _fit_method(cls, modules, weights + experts, config, notes=notes)
    unwrapped = [w for w in weights if not lora_can_wrap(model.get_submodule(w.rpartition(".")[0]))]
    weights = [w for w in weights if w not in unwrapped]  # those PEFT would rewrite
    if parameters and weights and notes is not None:
        notes.append(f"{len(weights)} module(s) of {cls} adapted through their weights (target_parameters, e.g. "
                     f"{weights[0]}): PEFT would rewrite their target_modules entries into the fused expert "
                     "parameters of every MoE layer, leaving them without an adapter")
    if parameters and unwrapped and notes is not None:
        notes.append(f"{len(unwrapped)} Linear(s) of {cls} adapted through their weights (target_parameters, e.g. "
                     f"{unwrapped[0]}): their forward maps no (…, in) to (…, out) (DeepSeek-V4's grouped o_a_proj "
                     "takes (…, groups, in)), so PEFT's lora.Linear cannot wrap them; the update is one rank-r "
                     "matrix of the stored weight")
    if parameters and experts and notes is not None:
        layers = sorted({name.removesuffix(".weight").rpartition(".")[0] for name in experts})
        kinds = sorted({_expert_kind(n) for n in experts})
        # gate and up in one parameter (JetMoE's attention experts, self_attention.experts.input_linear, hold queries)
        both = [k for k in kinds if k.endswith("gate_up_proj") or k == "mlp.input_linear"]
        notes.append(f"the routed experts of {len(layers)} MoE layer(s) ({layers[0]}, …) are adapted as fused "
                     f"parameters ({', '.join(kinds)}; target_parameters): PEFT's LoRA on each is one rank-r update "
                     "per expert" + (f", and {both[0]} holds gate and up together, so either role adapts both (at "
                                     "rank r, as a fused module is)" if both else ""))
    return modules, parameters


def _peft_targets(model, config: TargetSelection, *,
                  notes: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """:func:`peft_targets` whatever the method: (modules, weights (of the modules PEFT would rewrite, then of the
    Linears no ``lora.Linear`` wraps), experts)."""
    import torch

    from spectra.checkpoints.targets import lora_can_wrap, rewritten_weights

    if config.target_modules:
        targets, experts, modules = list(config.target_modules), [], dict(model.named_modules())
        missing = sorted(set(targets) - set(modules))
        if missing:
            raise ConfigError(f"target_modules {missing[:5]} are not modules of the model; use names as "
                              "model.named_modules() lists them, e.g. model.layers.0.self_attn.q_proj.")
        unwrapped = [f"{t}.weight" for t in targets  # a Linear no lora.Linear runs on: DeepSeek-V4's o_a_proj
                     if isinstance(modules[t], torch.nn.Linear) and not lora_can_wrap(modules[t])]
        targets = [t for t in targets if f"{t}.weight" not in unwrapped]
    else:
        targets, unwrapped, experts = _role_targets(model, config.roles, stacks=config.stacks, notes=notes)
    rewritten = rewritten_weights(targets, model)
    return [t for t in targets if t not in rewritten], [f"{name}.weight" for name in rewritten] + unwrapped, experts


def _fit_method(cls: str, modules: list[str], parameters: list[str], config: TargetSelection, *,
                notes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(``target_modules``, ``target_parameters``) that ``config.method`` can train.

    PEFT 0.21's LoRA on a parameter (``target_parameters``) is plain LoRA on a float weight: no DoRA, no 4-bit base,
    no dropout (``lora.ParamWrapper`` raises on DoRA and dropout; a 4-bit weight is no float matrix, and
    bitsandbytes leaves 3-D experts unquantised anyway). Parameter targets that ``roles`` or ``target_modules``
    asked for are then refused, naming the model, the target and the way out; the default roles (every block
    linear) keep the modules alone, with a note naming what is left out, and are refused when nothing is left.
    """
    what = ("DoRA" if config.method == "dora" else "QLoRA's 4-bit base" if config.method == "qlora"
            else "QDoRA (DoRA on a 4-bit base)" if config.method == "qdora"
            else f"lora_dropout {config.lora_dropout}" if config.lora_dropout else None)
    if what is None or not parameters:
        return modules, parameters
    if config.roles is None and config.target_modules is None and modules:
        if notes is not None:
            notes.append(f"{config.method}{' with lora_dropout' if config.lora_dropout else ''}: {len(parameters)} "
                         f"target(s) of {cls} are not adapted (e.g. {parameters[0]}): PEFT adapts them only through "
                         f"target_parameters, which takes no {what}; method lora without dropout adapts them")
        return modules, []
    raise ConfigError(f"{cls}: spectra adapts {parameters[0]} through PEFT's target_parameters (an MoE's fused "
                      "expert parameter, a module PEFT would rewrite into one, or a Linear PEFT cannot wrap), which "
                      "takes no "
                      f"{what}. Train it with method lora{' and lora_dropout 0' if config.lora_dropout else ''}, or "
                      "leave the MLP roles out (--roles q,k,v,o).")
