"""The modules an adapter adapts, as PEFT adapts them: a plan's modules, or an int rank's (on an MoE, what
``spectra train`` adapts, asked of its own target selection)."""

from __future__ import annotations

from typing import Any, NamedTuple

from spectra.checkpoints.adapted import TargetSelection, peft_targets
from spectra.checkpoints.architectures import missing_stacks, module_info, role_selected, stack_selected
from spectra.checkpoints.roles import stack_roles
from spectra.errors import ConfigError
from spectra.memory.shape import ModelShape, model_shape
from spectra.ranks import RankPlan
from spectra.ranks.plan import TABLE_ROLES, adapter_dims, base_config


# LoRA's usual targets: every linear layer of the blocks ("all-linear", as QLoRA recommends [3]); an MoE's are
# what spectra train adapts (_trained_moe_adapters)
DEFAULT_ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")
# the position tables of the families the memory model reads that transformers looks up by position ids of shape
# (1, s): GPT-2's (built each forward from cache_position) and BERT's (a slice of its position_ids buffer)
_POSITION_LOOKUPS = ("wpe", "position_embeddings")
# embedding tables, looked up before the blocks (PEFT's lora.Embedding): the token embedding and a position or
# token-type table. A table's weight is (rows, width), its output width-wide: as an adapter, d_in = rows (the one-hot
# it reads), d_out = width (what DoRA's magnitude and output are sized by), unlike a Linear's (out, in) weight. One
# rule with the plan's total and recommend's budget (spectra.ranks.plan.adapter_dims)
TABLES = TABLE_ROLES


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
    # a table looked up by the positions (GPT-2's wpe, BERT's position_embeddings: ids of shape (1, s), one row for
    # the whole batch), not by each token's id (the token embedding, BERT's token_type_embeddings)
    by_position: bool = False

    @property
    def params(self) -> int:
        return self.rank * max(self.experts, 1) * (self.d_in + self.d_out)


def _check_plan_base(shape: ModelShape, plan: RankPlan, config: dict) -> None:
    """Refuse a plan made on another model, as ``spectra train``, ``extract`` and ``sweep`` refuse a plan of another
    base (:meth:`~spectra.ranks.RankPlan.check_base`): its ranks would be summed over modules this model lacks or has
    otherwise shaped (a 2-layer Llama's plan read on Llama-2-7B: 2,016 trainable parameters).

    The memory model reads a config alone, so it compares configs, not the weights' fingerprint: the config.json
    beside the plan's analysed base (where it is still there) must describe the layers and linear layers this one
    does, and every planned module must be one of this model's: its layer among the layers, and a block linear of its
    role (an MoE's experts aside) of the planned (out, in). A same-shaped model (the base's fine-tune, a copy) passes:
    its estimate is the same."""
    again = ("Re-run `spectra analyze` and `spectra recommend` on this model's base (or estimate an int rank, "
             "--rank, instead of --plan).")
    recorded = base_config(plan.base)
    if recorded is not None and recorded != config:  # the base's own config.json (recommend's default) passes
        try:
            planned = model_shape(recorded)
        except ConfigError:  # a base the memory model does not describe: its modules are checked below
            planned = None
        if planned is not None and _layout(planned) != _layout(shape):
            theirs, ours = _describe(planned), _describe(shape)
            if theirs == ours:  # the same depth and width: the linears differ (the MLP's width, the heads)
                theirs, ours = (f"{d}, linears {_linears(s)}" for d, s in ((theirs, planned), (ours, shape)))
            raise ConfigError(f"the plan was made from an analysis of another model ({plan.base['path']}: "
                              f"{theirs}), not of this config ({ours}). {again}")
    for m in plan.modules:
        stack = module_info(m.name).stack
        if stack is not None:  # another tower's (vision, projector, …): judged by that stack's linears
            _check_tower_module(shape, m, stack, again)
            continue
        if m.layer is not None and not 0 <= m.layer < shape.layers:
            raise ConfigError(f"the plan was made from an analysis of another model: {m.name} is in layer {m.layer}, "
                              f"and this {shape.family} config has {shape.layers} layers. {again}")
        if m.layer is None or ".experts." in m.name:
            continue
        held = {(o, i) for role, o, i in shape.block(m.layer).linears if role == m.role}
        if held and tuple(m.shape) not in held:
            raise ConfigError(f"the plan was made from an analysis of another model: {m.name} is "
                              f"{'×'.join(map(str, m.shape))}, and this {shape.family} config's {m.role} projection "
                              f"is {' or '.join('×'.join(map(str, s)) for s in sorted(held))}. {again}")


def _check_tower_module(shape: ModelShape, module, stack: str, again: str) -> None:
    """Refuse a planned module of another tower (``stack``: a vision tower's, a projector's) unless this config's
    ``stack`` holds a linear of its role and (out, in): its layers are the tower's, not the language model's."""
    held = {(o, i) for role, o, i, s in shape.tower_linears if s == stack and role == module.role}
    if not any(s == stack for *_, s in shape.tower_linears):
        raise ConfigError(f"the plan was made from an analysis of another model: {module.name} is a linear of the "
                          f"{stack} stack, and this {shape.family} config has no {stack} stack with linear layers. "
                          f"{again}")
    if tuple(module.shape) not in held:
        found = " or ".join("×".join(map(str, s)) for s in sorted(held))
        raise ConfigError(f"the plan was made from an analysis of another model: {module.name} is "
                          f"{'×'.join(map(str, module.shape))}, and this {shape.family} config's {stack} stack "
                          + (f"has {module.role} linears of {found}" if held
                             else f"has no linear of role {module.role}") + f". {again}")


def _layout(shape: ModelShape) -> tuple:
    """What a plan's modules depend on: the layers and each block's linear layers (MoE layers' and dense ones')."""
    return (shape.layers, shape.hidden, shape.linears, shape.dense_layers, shape.dense_linears, shape.global_layers,
            shape.global_linears)


def _describe(shape: ModelShape) -> str:
    return f"{shape.family}, {shape.layers} layers, hidden size {shape.hidden}"


def _linears(shape: ModelShape) -> str:
    """A block's linear layers as ``q 32×32, k 16×32, …`` (for an error)."""
    return ", ".join(f"{role} {o}×{i}" for role, o, i in dict.fromkeys(shape.linears))


def _adapter_modules(shape: ModelShape, method: str, plan_or_rank: Any, roles: tuple[str, ...] | None,
                     layers_to_transform: int | tuple[int, ...] | None = None,
                     stacks: tuple[str, ...] | None = None, train_model=None, *,
                     notes: list[str] | None = None) -> list[_Adapter]:
    """Every adapted module, as PEFT adapts it; empty for full fine-tuning.

    An MoE's experts are fused parameters in transformers 5 (gate_up_proj: experts × 2·ffn × hidden, down_proj),
    which PEFT adapts as ``target_parameters`` at one rank for all experts: a plan's fused parameter at the rank the
    plan's ``peft_config`` gives it (:func:`_fused_ranks`: Σ over the projections it holds, gate's and up's, of the
    largest rank the plan gives that projection's experts); a plan's router that no LoRA module can run (Mixtral's,
    PhiMoE's, GraniteMoE's) is its weight at its planned rank, as the plan's ``peft_config`` adapts it
    (``_block_adapter``). An int rank on an MoE adapts what ``spectra train`` adapts for the same method, roles and
    stacks (:func:`_trained_moe_adapters`, which asks train's target selection on the model built from the config on
    the meta device; ``train_model`` builds it): every block role's Linear modules and the experts' fused parameters
    at r each (gate_up_proj at r, not 2·r), never a router; DoRA and QLoRA leave the experts out of the default
    roles.
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
    if shape.tower_params and layers_to_transform is not None:
        raise ConfigError(f"{shape.family}: layers_to_transform on a multimodal model is not modelled. Leave it out "
                          "(or plan the layers with `spectra recommend`), or pass the text_config alone to estimate "
                          "the language model.")
    wanted = DEFAULT_ROLES + stack_roles(stacks) if roles is None else tuple(roles)  # --stacks projector: projector
    if isinstance(plan_or_rank, RankPlan):  # a plan adapts the other towers' modules it names
        planned_stacks = {module_info(m.name).stack for m in plan_or_rank.modules}
        adapted_towers = sorted(planned_stacks - {None}, key=str)
    else:
        adapted_towers = sorted({stack for role, _, _, stack in shape.tower_linears if stacks is not None
                                 and stack_selected(stack, stacks) and role_selected(role, wanted)}, key=str)
    if method in ("qlora", "dora") and adapted_towers:
        towers = ", ".join(map(str, adapted_towers))
        raise ConfigError(f"{shape.family}: {method} on the {towers} stack's linears "
                          + (f"(stacks {','.join(stacks)})" if stacks else "(the plan's modules)")
                          + " is not modelled: "
                          + ("a LoRA module on a 4-bit tower linear (QLoRA)" if method == "qlora"
                             else "DoRA's weight norms and transients on the tower's linears")
                          + (f". Leave {towers} out of stacks (the default adapts the language model alone) or "
                             "estimate lora." if stacks else
                             ". Plan the language model alone (`spectra recommend --stacks language`) or estimate "
                             "lora."))
    if isinstance(plan_or_rank, RankPlan):
        model = _moe_model(shape, train_model, "which rank the plan's peft_config gives its fused experts")
        through_weights = _planned_weights(plan_or_rank, model)
        held, ranks = _fused_ranks(plan_or_rank, model)
        modules, fused = [], {}  # fused: the parameter PEFT adapts -> its layer and role (down or gate_up)
        for m in plan_or_rank.modules:
            if module_info(m.name).stack is not None:  # another tower's linear: held, never run on text-only
                # batches (no activations, no gradient), as an int rank's on the stacks that name it
                d_in, d_out = adapter_dims(m.role, m.shape)
                modules.append(_Adapter(None, m.role, m.rank, d_in, d_out, tower=True))
            elif m.name in held:
                fused.setdefault(held[m.name], (m.layer, "down" if m.role == "down" else "gate_up"))
            else:
                d_in, d_out = adapter_dims(m.role, m.shape)
                modules.append(_block_adapter(shape, m.layer, _planned_role(shape, m), m.rank, d_in, d_out,
                                              weight=m.name in through_weights)
                               ._replace(by_position=m.role == "pos_embed"
                                         and m.name.rpartition(".")[2] in _POSITION_LOOKUPS))
        for parameter, (layer, role) in fused.items():
            d_in, d_out = (i, h) if role == "down" else (h, 2 * i)
            if shape.attention_experts:  # JetMoE's JetMoeParallelExperts, the attention's query and output experts
                # too: (experts, out, in) each, of the module's role
                _, d_out, d_in = (int(n) for n in model.get_parameter(parameter).shape)
                role = module_info(parameter.removesuffix(".weight")).role
            modules.append(_Adapter(layer, role, ranks[parameter], d_in, d_out, experts))
        _refuse_dora_on_parameters(shape, method, modules)
        return modules
    if not isinstance(plan_or_rank, int) or isinstance(plan_or_rank, bool) or plan_or_rank < 1:
        raise ConfigError(f"method {method!r} needs a RankPlan or a positive int rank, got {plan_or_rank!r}.")
    r = plan_or_rank
    if experts > 1:  # what spectra train adapts, asked of its own target selection
        return _trained_moe_adapters(shape, method, r, roles, stacks, layers, train_model, notes=notes)
    modules: list[_Adapter] = []
    for layer in sorted(set(layers)):  # each layer's own linears (Gemma 4's full-attention layers: their own)
        for role, o, d_in in shape.block(layer).linears:
            if not role_selected(role, wanted):
                continue
            if r > min(o, d_in):  # PEFT takes any rank
                raise ConfigError(f"rank {r} exceeds min(d_in, d_out) = {min(o, d_in)} of the {role} "
                                  f"projection ({o}×{d_in}).")
            modules.append(_Adapter(layer, role, r, d_in, o))
    if not modules:
        raise ConfigError(f"No linear layer of this {shape.family} model has a role in {wanted}; roles here: "
                          f"{sorted({r for r, _, _ in shape.linears})}.")
    if shape.tower_linears:  # layers_to_transform refused above
        for role, o, d_in, stack in shape.tower_linears:  # the other towers' linears of the roles, where stacks name them
            if stacks is not None and role_selected(role, wanted) and stack_selected(stack, stacks):
                modules.append(_Adapter(None, role, r, d_in, o, tower=True))
    return modules


def _trained_moe_adapters(shape: ModelShape, method: str, rank: int, roles: tuple[str, ...] | None,
                          stacks: tuple[str, ...] | None, layers, train_model, *,
                          notes: list[str] | None = None) -> list[_Adapter]:
    """An MoE's adapters at an int ``rank``: what ``spectra train`` adapts for the same method, roles and stacks,
    asked of its own target selection (:func:`spectra.checkpoints.adapted.peft_targets`, as train's ``lora_config`` runs it) on the
    causal LM it loads, built from the config on the meta device (``train_model()``: :func:`_meta_model_for`'s), in
    ``layers``.

    Every Linear of the roles (default: every block role) is a ``lora.Linear`` at ``rank``; the routed experts'
    fused ``gate_up_proj`` (for gate or up, whole: at ``rank``, as a fused module is) and ``down_proj`` are PEFT
    ParamWrappers at ``rank`` per expert (``target_parameters``); a router is never adapted (no block role). DoRA and
    QLoRA leave the experts out of the default roles (PEFT's ParamWrapper takes neither) and refuse roles that ask
    for them, with train's own error (:func:`spectra.checkpoints.adapted._fit_method`)."""
    model = train_model()[1] if train_model is not None else None
    if model is None:
        raise ConfigError(f"{shape.family}: transformers cannot build this MoE from its config on the meta device, "
                          "so spectra's memory model cannot ask which modules and expert parameters `spectra train` "
                          "adapts; estimate with a rank plan (--plan) instead.")
    config = TargetSelection(method=method, roles=roles, stacks=stacks)  # train's TrainConfig selects alike
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
        if weight.dim() == 3 and info.role == "other":  # JetMoE's JetMoeParallelExperts: the module's role
            info = module_info(name.removesuffix(".weight"))
        if weight.dim() != 3 or info.role not in ("gate_up", "down", "q", "o"):
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
                   d_out: int, *, weight: bool = False) -> _Adapter:
    """A block's module adapted on its own (not fused experts), by a plan or an int rank: a ``lora.Linear``, or
    a ``ParamWrapper`` on its weight for a router whose weight PEFT adapts as a parameter
    (``ModelShape.router_parameter``: what the plan's ``peft_config`` makes of it, and all-linear where it reaches
    the router) and for a module the plan adapts through its weight (``weight``: :func:`_planned_weights`)."""
    wrapped = weight or role == "router" and shape.router_parameter
    return _Adapter(layer, role, rank, d_in, d_out, 1 if wrapped else 0)


def _moe_model(shape: ModelShape, train_model, asked: str):
    """The causal LM ``spectra train`` loads, built from the config on the meta device (``train_model()``), for an
    MoE's plan; None for a dense model. An MoE that transformers cannot build is refused: memory could not say
    ``asked``."""
    if shape.experts <= 1 or train_model is None:
        return None
    model = train_model()[1]
    if model is None:
        raise ConfigError(f"{shape.family}: transformers cannot build this MoE from its config on the meta device, "
                          f"so spectra's memory model cannot ask {asked}.")
    return model


def _planned_weights(plan: RankPlan, model) -> set[str]:
    """The planned modules that the plan's ``peft_config`` adapts through their weight (``target_parameters``
    ``{module}.weight``, a ParamWrapper), as :meth:`RankPlan.to_peft_config` decides on the model: the Linears that
    PEFT would rewrite into fused expert targets (:func:`spectra.checkpoints.targets.rewritten_weights`: Qwen3-MoE's
    dense MLPs, DeepSeek's dense and shared-expert MLPs), asked of ``model`` (:func:`_moe_model`). Only an MoE's are
    rewritten; for a dense model (``model`` None), none."""
    if model is None:
        return set()
    from spectra.checkpoints.targets import model_targets, rewritten_weights

    found = model_targets([m.name for m in plan.modules if ".experts." not in m.name], model)
    modules = {target.name: name for name, target in found.items() if target is not None and not target.parameter}
    return {modules[name] for name in rewritten_weights(list(modules), model)}


def _fused_ranks(plan: RankPlan, model) -> tuple[dict[str, str], dict[str, int]]:
    """Planned module → the fused expert parameter of ``model`` that holds it
    (:func:`spectra.ranks.plan.expert_parameters`), and that parameter → the rank the plan's ``peft_config`` gives it
    on ``model`` (:meth:`RankPlan.to_peft_config`'s own rule: Σ over the projections it holds of the largest rank
    the plan gives that projection's experts; a plan made with the model's config records the same in ``fused``).
    Empty for a dense model (``model`` None)."""
    if model is None:
        return {}, {}
    from spectra.ranks.plan import expert_parameters

    held = {name: parameter for name, (parameter, _) in
            expert_parameters([m.name for m in plan.modules], model).items()}
    if not held:
        return {}, {}
    settings = plan._model_settings(model)[0]  # what to_peft_config writes: target -> (rank, alpha, conv1d)
    return held, {parameter: settings[parameter][0] for parameter in set(held.values())}


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
