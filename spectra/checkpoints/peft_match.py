"""What a PEFT ``LoraConfig`` targets on a model, matched as PEFT 0.21 matches it.

One matching rule serves the plan's ``peft_config`` and its checks (:mod:`spectra.ranks.plan`), extract's
``adapter_config.json`` and train's config: :func:`config_targets` says which modules and parameters a config
adapts and at which rank and α; :func:`peft_converted` is the config as PEFT rewrites it for a transformers-5 MoE
model before it matches anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from spectra.errors import ConfigError

@dataclass(frozen=True)
class ConfigTargets:
    """What a LoraConfig adapts among a model's module and parameter names.

    Attributes
    ----------
    modules : frozenset of str
        The module names ``target_modules`` selects (PEFT wraps each in a LoRA layer).
    parameters : frozenset of str
        The parameter names ``target_parameters`` selects (PEFT's ``ParamWrapper``).
    entries : dict
        ``"target_modules"`` / ``"target_parameters"`` → each list entry → the names it matches (that PEFT
        does not exclude; ``target_modules`` as a regex string has none: it is one pattern, not entries).
    keys : dict
        ``"rank_pattern"`` / ``"alpha_pattern"`` → each key → the names it matches among all
        modules and the targeted parameters (targeted or not: a key on an untargeted module
        does nothing).
    ranks, alphas : dict
        Each targeted name → the ``r`` / ``lora_alpha`` PEFT gives it: the value of the first
        pattern key that matches it, else the config's global one.
    applied : dict
        ``"rank_pattern"`` / ``"alpha_pattern"`` → each targeted name that a key matches → the key PEFT applies
        to it, the first that matches (a later key matching it too is ignored there).
    withheld : dict
        Each ``target_modules`` list entry → the modules it names that PEFT does not wrap all the same → the
        field that keeps it from wrapping them (``"exclude_modules"`` or ``"modules_to_save"``).
    """

    modules: frozenset[str]
    parameters: frozenset[str]
    entries: dict[str, dict[str, tuple[str, ...]]]
    keys: dict[str, dict[str, tuple[str, ...]]]
    ranks: dict[str, int]
    alphas: dict[str, float]
    applied: dict[str, dict[str, str]]
    withheld: dict[str, dict[str, str]]


def config_targets(config, module_names: Iterable[str], *, parameter_names: Iterable[str] = ()) -> ConfigTargets:
    """The modules and parameters a LoraConfig (a dict, or a ``LoraConfig``) adapts, as PEFT 0.21 matches them.

    PEFT's rules (``peft.tuners.tuners_utils``): a module is targeted when ``target_modules``,
    a string, ``re.fullmatch``-es its name, or, a list, holds its name or a ``"." + entry``
    suffix of it (``check_target_module_exists``), unless ``exclude_modules`` matches it the
    same way or it lies in a module of ``modules_to_save``; a parameter (``module.param``) is
    targeted when ``target_parameters`` holds it or a ``"." + entry`` suffix of it
    (``_inject_parameters``); a targeted name takes the rank of the first ``rank_pattern`` key
    ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` (``get_pattern_key``), the α likewise.
    ``layers_to_transform`` is not read (spectra writes none) and PEFT's config rewrite for
    transformers-5 MoE models is not applied (see :func:`peft_converted`).

    Raises
    ------
    ConfigError
        ``target_modules="all-linear"`` (in any case, as PEFT lower-cases it): PEFT resolves that from the
        modules' types, not names.
    """
    module_names, parameter_names = list(module_names), list(parameter_names)
    targets, excluded = _field(config, "target_modules"), _excluded(config, module_names)
    entries: dict[str, dict[str, tuple[str, ...]]] = {"target_modules": {}, "target_parameters": {}}
    withheld: dict[str, dict[str, str]] = {}
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            raise ConfigError(f"target_modules={targets!r} is PEFT's shorthand for every Linear but the output "
                              "layer, resolved from the model's module types: list the modules instead.")
        modules = {n for n in module_names if re.fullmatch(targets, n)}
    else:
        index = _by_suffix(module_names)
        entries["target_modules"] = {t: tuple(sorted(index.get(t, set()) - set(excluded))) for t in targets or ()}
        withheld = {t: {n: excluded[n] for n in sorted(index.get(t, set()) & set(excluded))} for t in targets or ()}
        modules = set().union(*entries["target_modules"].values())
    modules -= set(excluded)
    index = _by_suffix(parameter_names)
    entries["target_parameters"] = {t: tuple(sorted(index.get(t, ())))
                                    for t in _field(config, "target_parameters") or ()}
    parameters = set().union(*entries["target_parameters"].values())
    candidates = module_names + sorted(parameters)  # what a pattern key may name
    keys = {field: {key: tuple(n for n in candidates if re.match(rf"(.*\.)?({key})$", n))
                    for key in _field(config, field) or {}} for field in ("rank_pattern", "alpha_pattern")}
    first = {field: {} for field in keys}  # targeted name -> the first key (in the config's order) matching it
    for field, matches in keys.items():
        for key, hits in matches.items():
            for name in hits:
                first[field].setdefault(name, key)
    targeted = modules | parameters
    applied = {field: {n: key for n, key in first[field].items() if n in targeted} for field in first}
    rank_pattern, alpha_pattern = _field(config, "rank_pattern") or {}, _field(config, "alpha_pattern") or {}
    r, alpha = _field(config, "r", 8), _field(config, "lora_alpha", 8)  # LoraConfig's defaults
    return ConfigTargets(
        frozenset(modules), frozenset(parameters), entries, keys,
        ranks={n: rank_pattern[applied["rank_pattern"][n]] if n in applied["rank_pattern"] else r for n in targeted},
        alphas={n: alpha_pattern[applied["alpha_pattern"][n]] if n in applied["alpha_pattern"] else alpha
                for n in targeted},
        applied=applied, withheld=withheld)


def _field(config, name: str, default: Any = None) -> Any:
    """A LoraConfig field, from a dict or a ``peft.LoraConfig``."""
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def _by_suffix(names: list[str]) -> dict[str, set[str]]:
    """Every dot-suffix of a name → the names ending so: PEFT's match of an entry (equal, or ending in "." + it)."""
    index: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            index.setdefault(".".join(parts[i:]), set()).add(name)
    return index


def _excluded(config, module_names: list[str]) -> dict[str, str]:
    """The modules PEFT never wraps → the field that keeps them out: ``exclude_modules``' (matched as
    ``target_modules`` is) and those in or under a module of ``modules_to_save`` (its key
    ``re.match(rf"(^|.*\\.){m}($|\\..*)", name)``)."""
    exclude, saved = _field(config, "exclude_modules"), _field(config, "modules_to_save") or ()
    out = {n: "modules_to_save" for n in module_names if any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in saved)}
    if isinstance(exclude, str):
        out |= {n: "exclude_modules" for n in module_names if re.fullmatch(exclude, n)}
    elif exclude:
        index = _by_suffix(module_names)
        out |= {n: "exclude_modules" for e in exclude for n in index.get(e, ())}
    return out


def peft_converted(config, model) -> dict | None:
    """``config`` (a dict) as PEFT 0.21 rewrites it before adapting ``model``, or None where PEFT has no rewrite.

    PEFT runs ``convert_peft_config_for_transformers`` in ``get_peft_model`` and
    ``PeftModel.from_pretrained``: for a transformers-5 MoE model (Mixtral, Qwen3-MoE, …) it
    maps ``target_modules`` entries of the per-expert checkpoint names (``w1``, ``gate_proj``, …)
    to the fused parameters (``target_parameters`` ``gate_up_proj``, …) and adds ``rank_pattern``
    / ``alpha_pattern`` keys doubling r and α where it fuses two projections. Run here on a copy.

    Raises
    ------
    ValueError
        PEFT's own refusal (a part of a fused pair, ``w1`` without ``w3``).
    """
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without it converts nothing
        return None
    fields = {"target_modules": _field(config, "target_modules"),
              "target_parameters": list(_field(config, "target_parameters") or []), "r": _field(config, "r", 8),
              "lora_alpha": _field(config, "lora_alpha", 8), "rank_pattern": dict(_field(config, "rank_pattern") or {}),
              "alpha_pattern": dict(_field(config, "alpha_pattern") or {})}
    if not isinstance(fields["target_modules"], str):
        fields["target_modules"] = list(fields["target_modules"] or [])
    converted = LoraConfig(**fields)
    convert_peft_config_for_transformers(converted, model=model, conversions=None)
    return dict(config) | {name: getattr(converted, name) for name in fields}
