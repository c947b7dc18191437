"""Which weights an adapter adapts through PEFT's ``target_parameters``, and the LoRA written onto them.

PEFT's LoRA wraps modules. A weight the model holds in a parameter that no LoRA module can wrap is adapted through
``target_parameters`` instead (PEFT's ``ParamWrapper``): MoE experts fused into one (E, out, in) parameter per
projection (transformers 5's ``mlp.experts.gate_up_proj``) and routers (PhiMoE's ``mlp.router``, Mixtral's
``mlp.gate``, DeepSeek-V3's). PEFT converts some per-expert checkpoint names onto the fused parameters itself
(Mixtral's ``experts.3.w1``), at the config's global ``r`` and ``lora_alpha``; extract leaves it that conversion
only where it adapts exactly the extracted experts at one rank (:func:`_peft_converts_exactly`), and otherwise
writes the LoRA onto the parameter itself, as it does for routers and for the dense MLPs PEFT would rewrite.

This module decides which entries go onto a parameter and where (:func:`_unconverted_parameters`,
:class:`_OnParameter`), the adapter keys PEFT reads for each parameter (:func:`_parameter_keys`), how PEFT orients
B·A on a 3-D parameter (:func:`_peft_transposes`, :func:`_peft_shape`), and the factors of a parameter's experts
stacked into one rank (:func:`_parameter_factors`).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, NamedTuple

import torch

from spectra.checkpoints.adapter import PEFT_PREFIX
from spectra.checkpoints.pairing import Pairing
from spectra.checkpoints.targets import model_targets
from spectra.errors import ConfigError
from spectra.scaling import rank_scale


def _unconverted_parameters(entries, model_names: dict[str, str], pairing: Pairing, model, *,
                            use_rslora: bool = False, settings: dict | None = None, planned: bool = False) -> dict:
    """Entry name → its :class:`~spectra.checkpoints.placement.ParameterSlice`, for the weights whose LoRA extract
    writes onto the parameter that holds them (``target_parameters``), because PEFT would not adapt them as named.

    - A weight the model holds in a parameter (no module PEFT can wrap) whose stored name PEFT does not map onto
      it. PEFT converts a LoRA on Mixtral's per-expert ``…experts.3.w1`` into one on transformers 5's fused
      ``mlp.experts.gate_up_proj`` when it loads the adapter; PhiMoE stores its experts the same way and loads
      them into the same fused parameters, but PEFT 0.21 converts nothing for it, and ignored adapter keys under
      those names without a word: the experts' updates were lost. PhiMoE's router (``block_sparse_moe.gate``, the
      model's ``mlp.router``) is an nn.Linear whose forward returns a tuple: a LoRA module on it merges but fails
      in every forward. Mixtral's router (``block_sparse_moe.gate``, loaded into ``mlp.gate``, a
      MixtralTopKRouter) too, although PEFT 0.21 converts its stored name: into the bare ``target_parameters``
      entry ``gate.weight``, every layer's router at the config's global ``r`` and ``lora_alpha``. DeepSeek-V3's
      router is stored under the name of the module it loads into (``mlp.gate``, a DeepseekV3TopkRouter holding a
      bare weight), which is still no module a LoRA can wrap.
    - Experts PEFT does convert, unless its conversion adapts exactly them (:func:`_peft_converts_exactly`: all
      experts of each fused parameter, both halves of gate_up_proj, no other layer's or stack's experts), at one
      rank and α (`settings`, each entry's (rank, α) as extracted: PEFT converts them all at the adapter's global r
      and lora_alpha, so experts at different ranks are written onto the parameters, each at its own: a plan's
      per-projection ranks, or ``--rank full`` where experts differ in shape, as Qwen3-Omni-MoE's thinker's and
      talker's do), and without rsLoRA: PEFT fuses gate and up at 2r and 2α, which keeps α/r but makes rsLoRA's
      α/√r √2 too large.
    - A module PEFT would rewrite (:func:`~spectra.checkpoints.targets.peft_rewritten_modules`): for the
      ``qwen2_moe`` and ``mixtral`` conversion families PEFT turns every ``target_modules`` entry ending in
      ``.gate_proj``/``.up_proj``/``.down_proj`` into a fused expert parameter, so a dense layer's MLP
      (Qwen3-MoE's ``mlp_only_layers``, DeepSeek-V3's first layers), a shared expert or GLM-4.5V's vision MLP
      would lose its LoRA (merged: 0). Its weight (``…mlp.gate_proj.weight``) is targeted instead, which PEFT
      leaves as it is.

    Their factors are written onto the parameters (:func:`_parameter_factors`; a 2-D weight whole, E = 1).
    """
    if model is None:
        return {}
    from spectra.checkpoints.placement import PlacementError, parameter_sources, split_sources
    from spectra.checkpoints.targets import lora_can_wrap, rewritten_weights

    modules = dict(model.named_modules())
    # named by their stored name (no module of the model), or by a module no LoRA can wrap: DeepSeek-V3's router is
    # stored as mlp.gate, the name of the DeepseekV3TopkRouter (a bare weight Parameter) it loads into
    wrapped = [e for e in entries
               if model_names[e.name] not in modules or not lora_can_wrap(modules[model_names[e.name]])]
    targets = model_targets([model_names[e.name] for e in wrapped], model)
    parameter_of = {e.name: targets[model_names[e.name]].name for e in wrapped}
    lora_modules = {model_names[e.name] for e in entries} - {model_names[e.name] for e in wrapped}
    rewritten = set(rewritten_weights(sorted(lora_modules), model, fix=_LEAVE_OUT[planned]))
    for entry in entries:
        module = model_names[entry.name]
        if module in rewritten:
            wrapped.append(entry)
            parameter_of[entry.name] = f"{module}.weight"
    if not wrapped:
        return {}
    shapes = {p: tuple(model.get_parameter(p).shape) for p in parameter_of.values()}  # (E, out, in) or (out, in)
    sources = parameter_sources(model, pairing.base.names(), shapes)
    experts = [e for e in wrapped if e.info.expert is not None]
    one_setting = settings is None or len({settings[e.name] for e in experts}) <= 1
    if experts and not use_rslora and one_setting and _peft_converts_exactly(
            model, [model_names[e.name] for e in experts], {parameter_of[e.name] for e in experts}, sources,
            {e.base_tensor for e in experts}):
        wrapped = [e for e in wrapped if e.info.expert is None]  # PEFT maps the experts' stored names itself
    slices = {}  # (base checkpoint tensor, its expert where it stores E of them) -> its TensorSlice
    for parameter in {parameter_of[e.name] for e in wrapped}:
        try:
            found = split_sources(pairing.base, parameter, shapes[parameter], sources.get(parameter, []),
                                  pairing.config, label="base")
        except PlacementError as err:
            raise ConfigError(f"{err}; extract cannot write a LoRA on it. {_LEAVE_OUT[planned]}") from None
        slices |= {(s.tensor, s.stored_expert): s for s in found}
    out = {}
    for entry in wrapped:
        piece = slices.get((entry.base_tensor, entry.expert_index))
        if piece is None:
            raise ConfigError(f"{entry.name}: no slice of a parameter of {type(model).__name__} holds it, so "
                              f"extract cannot place its LoRA. {_LEAVE_OUT[planned]}")
        # the parameter holds the entry's (out, in) ΔW as is, or its transpose where the checkpoint stores it
        # (in, out) and loading keeps that (gpt-oss's and Llama 4's experts: x @ W[e])
        out[entry.name] = _OnParameter(piece.place, piece.held_in_out)
    return out


# what to do about a module extract cannot adapt, by whether a plan (True) or --roles (False) selected it
_LEAVE_OUT = {True: "Drop it from the plan (or plan without its role: spectra recommend --roles, e.g. q,k,v,o).",
              False: "Leave its role out (--roles, e.g. q,k,v,o)."}


class _OnParameter(NamedTuple):
    """Where an entry's LoRA goes: its slice of a parameter, and whether the parameter holds that slice (in, out)."""

    place: Any  # a placement.ParameterSlice
    held_in_out: bool  # x @ W[e]: the checkpoint stores the expert (in, out) and loading keeps it so


def _peft_converts_exactly(model, names: list[str], parameters: set[str], sources: dict, selected: set[str]) -> bool:
    """Whether PEFT, loading an adapter onto `model`, maps LoRAs on these per-expert checkpoint modules onto exactly
    the fused `parameters` that hold them (the conversion it runs on every adapter config first, transformers ≥ 5),
    and the adapter holds every tensor that loads into them (`sources`: parameter → its checkpoint tensors;
    `selected`: the base tensors extracted).

    PEFT's conversion names the fused parameter bare (``gate_up_proj``), so it adapts that projection's experts
    in every layer and stack; it refuses gate without up; and it builds each fused LoRA from all experts' keys.
    Where any of that would differ from the adapter, extract writes the experts onto the parameters itself."""
    from spectra.checkpoints.peft_match import config_targets, peft_converted

    try:
        config = peft_converted({"target_modules": list(names)}, model)
    except ValueError:  # a part of a fused pair (w1 without w3)
        return False
    if config is None or config["target_modules"] or not config["target_parameters"]:  # some left as named: PhiMoE's
        return False
    wrapped = config_targets(config, [], parameter_names=[n for n, _ in model.named_parameters()]).parameters
    return wrapped == parameters and all(s.tensor in selected for p in parameters for s in sources.get(p, []))


def _parameter_keys(model, parameters) -> dict[str, str]:
    """Parameter → the adapter-key prefix of PEFT's LoRA on it (``base_model.model.….experts`` and, where PEFT
    nests the wrappers of two parameters of one module, ``….experts.base_layer`` for the inner one).

    Which wrapper is nested in which is PEFT's choice: read from PEFT itself, on a copy of the meta model."""
    if not parameters:
        return {}
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on the meta model (no weights, no task)
        wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules=[],
                                                                 target_parameters=sorted(parameters)))
    keys = {}
    for name, module in wrapped.named_modules():
        if isinstance(module, ParamWrapper):
            plain = name.removeprefix(PEFT_PREFIX)
            keys[f"{plain.replace('.base_layer', '')}.{module.parameter_name}"] = PEFT_PREFIX + plain
    return {p: keys[p] for p in parameters}


def _peft_transposes(model, parameter: str) -> bool:
    """Whether PEFT's LoRA on this parameter adds (B·A)ᵀ to each expert (rather than B·A).

    PEFT's ``ParamWrapper`` reads a 3-D parameter as (E, in, out) where its module says
    ``is_transposed`` (transformers' marker for x @ W[e]: gpt-oss's experts), and then adds (B·A)ᵀ
    to W[e]; otherwise it swaps the two (E, out, in) and adds B·A: also on Llama 4's experts, which
    are (E, in, out) without the marker, so there B·A is the expert's (in, out) update, ΔWᵀ. A
    2-D parameter (a router's weight) takes B·A.
    """
    module_name, _, _ = parameter.rpartition(".")
    return model.get_parameter(parameter).dim() == 3 and bool(
        getattr(model.get_submodule(module_name), "is_transposed", False))


def _peft_shape(model, parameter: str) -> tuple[int, ...]:
    """The parameter's shape as PEFT's LoRA factors read it: (E, out, in) of B·A, or (out, in)."""
    shape = tuple(model.get_parameter(parameter).shape)
    return (shape[0], shape[2], shape[1]) if _peft_transposes(model, parameter) else shape


def _parameter_factors(pieces, shape: tuple[int, ...], use_rslora: bool):
    """PEFT's LoRA on a fused (E, out, in) expert parameter from its experts' factors: (A, B, r, α); on a 2-D
    (out, in) parameter (a router's weight) as on one expert, E = 1.

    `pieces` holds (slice, A (r_b, in), B (rows, r_b), s_b) with s_b·B@A the best rank-r_b update of that expert's
    rows of the parameter (PhiMoE's w1 and w3 are rows [0, ffn) and [ffn, 2·ffn) of gate_up_proj[e]). PEFT's
    ParamWrapper holds one rank r for every expert: A (r·E, in), expert e's rows e·r … (e+1)·r, and B (out, r·E),
    expert e's columns e, e + E, … (its ``get_delta_weight``: B viewed (out, r, E), A (E, r, in)). Each expert's
    row blocks stack along r (B block-diagonal, as PEFT converts Mixtral's w1 and w3: r = r_w1 + r_w3); an expert or
    block the adapter leaves out gets zeros. α keeps the first block's scaling s (α = s·r, rsLoRA s·√r); a block of
    another scaling is folded into its B.
    """
    experts, out_features, in_features = shape if len(shape) == 3 else (1, *shape)
    blocks = sorted({p.rows or (0, out_features) for p, *_ in pieces})  # row ranges of the parameter
    widths = {rows: max(a.shape[0] for p, a, _, _ in pieces if (p.rows or (0, out_features)) == rows)
              for rows in blocks}
    offsets = dict(zip(blocks, itertools.accumulate([0] + [widths[b] for b in blocks])))
    rank = sum(widths.values())
    scaling = pieces[0][3]
    A = torch.zeros(experts, rank, in_features)  # (E, r, in)
    B = torch.zeros(out_features, rank, experts)  # (out, r, E)
    for place, a, b, s in pieces:
        lo, hi = place.rows or (0, out_features)
        at = offsets[(lo, hi)]
        A[place.expert, at:at + a.shape[0]] = a.cpu()
        B[lo:hi, at:at + a.shape[0], place.expert] = b.cpu() * (s / scaling)
    alpha = scaling * rank_scale(rank, use_rslora)
    return A.reshape(experts * rank, in_features), B.reshape(out_features, rank * experts), rank, alpha
