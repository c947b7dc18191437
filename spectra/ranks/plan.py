"""The plan: per-module ranks and alphas, as a PEFT ``LoraConfig`` dict, on disk as ``plan.json``.

Conventions (see DESIGN.md): a rank-r LoRA of an ``(out, in)`` ΔW costs ``r·(in + out)``
parameters (``A`` is ``(r, in)``, ``B`` is ``(out, r)``). An expert held in a fused 3-D parameter
(transformers-5 MoE experts, ``experts × d1 × d2``) costs ``r·(d1 + d2)``: PEFT's LoRA on the parameter spans
all its rows (``B`` of ``gate_up_proj`` covers gate and up), at one rank for every expert.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from spectra.errors import ConfigError, PeftConfigWarning
from spectra.files import write_text_atomic
from spectra.ranks.policy import RankPolicy

PLAN_SCHEMA_VERSION = 1

# Roles of the embedding tables (an nn.Embedding, looked up before the blocks: PEFT's lora.Embedding): the token
# embedding and a position or token-type table. A table's weight is (rows, width) and its output width-wide, unlike a
# Linear's (out, in) weight: see :func:`adapter_dims`
TABLE_ROLES = ("embed", "pos_embed")


def adapter_dims(role: str | None, shape: tuple[int, int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of the LoRA PEFT puts on a module of ``role`` whose weight is ``shape``: a Linear's
    ``(out, in)`` weight reads ``in`` and writes ``out``; an embedding table's ``(rows, width)`` weight
    (:data:`TABLE_ROLES`) reads a one-hot of ``rows`` and writes ``width``. DoRA's magnitude holds one value per
    output, ``d_out`` (PEFT's ``DoraEmbeddingVariant``: one per column of the table); ``RankPlan.total_params``,
    recommend's budget and ``spectra memory`` all count it so.

    >>> adapter_dims("embed", (32000, 4096)), adapter_dims("q", (4096, 4096))
    ((32000, 4096), (4096, 4096))
    """
    return (shape[0], shape[1]) if role in TABLE_ROLES else (shape[1], shape[0])


def dora_magnitudes(modules) -> int:
    """DoRA's magnitude parameters over ``modules`` (anything with ``role`` and ``shape``): Σ d_out
    (:func:`adapter_dims`), a table's width, a Linear's out."""
    return sum(adapter_dims(m.role, m.shape)[1] for m in modules)


@dataclass(frozen=True)
class ModuleRank:
    """One targeted module of a plan.

    ``energy`` is the captured share of ‖ΔW‖_F² (a lower bound when the rank exceeds the known
    singular values; ``energy_upper`` is then its upper bound). ``params = rank·(d_in + d_out)``; for an
    expert that PEFT adapts inside a fused parameter (see :class:`FusedParameter`), ``rank·(d1 + d2)`` of that
    parameter's ``(experts, d1, d2)``: what its rank costs PEFT (Mixtral's gate and up each span ``gate_up_proj``'s
    2·ffn rows). ``reason`` names the policy bound that set the rank.
    """

    name: str
    role: str | None
    layer: int | None
    shape: tuple[int, int]
    rank: int
    alpha: float
    energy: float
    energy_upper: float
    params: int
    reason: str
    conv1d: bool = False
    fro_norm: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ConfigError(f"Plan module {self.name}: rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ConfigError(f"Plan module {self.name}: alpha must be positive, got {self.alpha!r} (the update is "
                              "scaled by alpha/r).")
        if self.rank > min(self.shape):
            raise ConfigError(f"Plan module {self.name}: rank {self.rank} exceeds min(d_in, d_out) = "
                              f"{min(self.shape)} of its {self.shape[0]}×{self.shape[1]} weight; lower it.")


@dataclass(frozen=True)
class LeftOut:
    """A module the plan does not target, with why, and the rank the energy target would need."""

    name: str
    reason: str
    rank: int | None = None
    fro_norm: float = 0.0


@dataclass(frozen=True)
class FusedParameter:
    """A 3-D parameter PEFT adapts at one rank for all the experts it holds (``target_parameters``).

    transformers 5 loads an MoE's experts (Mixtral's ``experts.N.w1``/``w3``/``w2``) into fused parameters
    (``mlp.experts.gate_up_proj``: experts × 2·ffn × hidden; ``down_proj``), and PEFT's LoRA on one is
    ``A (r·E, d_in)``, ``B (d_out, r·E)``: one rank ``r`` for every expert, whatever the plan gives each. JetMoE's
    ``JetMoeParallelExperts`` weights (``mlp.input_linear.weight``: experts × 2·ffn × hidden, gate and up as one
    projection; ``output_linear``; the attention experts' q and o), whose experts analysis names
    ``….input_linear.3``, are adapted the same way.
    The plan therefore gives every expert of one projection the same rank, and ``r`` is the sum over the
    projections the parameter holds (gate's + up's: B block-diagonal, as PEFT converts Mixtral's w1/w3).

    ``params = r·experts·(d1 + d2)`` is what PEFT trains on it; ``padding`` is the part of it no planned
    module's ``params`` holds: the rows of experts the plan leaves out of a planned projection (an
    unchanged expert's w3), which PEFT trains at ``r`` all the same. ``RankPlan.total_params`` counts it.
    """

    name: str
    shape: tuple[int, int, int]
    rank: int
    params: int
    padding: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


# The modules PEFT's task models train in full whatever the config says, by task type (peft 0.21, peft_model.py:
# PeftModelForSequenceClassification and PeftModelForTokenClassification add "classifier" and "score" to
# modules_to_save, PeftModelForQuestionAnswering "qa_outputs"; CAUSAL_LM, SEQ_2_SEQ_LM and FEATURE_EXTRACTION add none).
PEFT_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                     "QUESTION_ANS": ("qa_outputs",)}


@dataclass(frozen=True)
class SavedModule:
    """A module ``get_peft_model`` trains in full for the plan's task type: PEFT adds it to ``modules_to_save``
    itself (RoBERTa's ``classifier`` head for ``SEQ_CLS``) and trains a copy of every parameter it holds.

    ``params`` is that count, which ``RankPlan.total_params`` (and a budget) includes.
    """

    name: str
    params: int
    task_type: str


def head_saved_beside_peft(model) -> list[str]:
    """A sequence classifier's head modules that PEFT's own ``SEQ_CLS`` names (``classifier``, ``score``) miss, and
    that ``spectra train`` adds to ``modules_to_save`` (:func:`spectra.checkpoints.targets.head_modules`: the
    modules its class holds beside the base model): BART's and T5's ``classification_head``, DeBERTa-v2's ``pooler``, XLNet's
    ``sequence_summary`` and ``logits_proj``. Without them such a head stays at random and is not saved."""
    from spectra.checkpoints.targets import head_modules

    return [name for name in head_modules(model) if not name.endswith(PEFT_TASK_MODULES["SEQ_CLS"])]


def task_modules(model, task_type: str | None) -> tuple[SavedModule, ...]:
    """The modules of ``model`` (real or on the meta device) that PEFT trains in full for ``task_type``.

    Found as PEFT finds them (``peft.utils.other._set_trainable``): every module whose name ends with one of the
    task's names (:data:`PEFT_TASK_MODULES`; a bare suffix, so DistilBERT's ``pre_classifier`` is one), wrapped in a
    ``ModulesToSaveWrapper`` that trains a copy of all its parameters. A module inside one already found is part of
    it; one without parameters trains nothing. Empty for a task type without such modules (``CAUSAL_LM``) or no
    model.
    """
    suffixes = PEFT_TASK_MODULES.get(task_type or "")
    if model is None or not suffixes:
        return ()
    if task_type == "SEQ_CLS":  # and the rest of the head spectra train saves (BART's classification_head)
        suffixes += tuple(head_saved_beside_peft(model))
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not name.endswith(suffixes) or any(name.startswith(m.name + ".") for m in out):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params:
            out.append(SavedModule(name, int(params), task_type))
    return tuple(out)


def inside_saved(names: Iterable[str], saved: Iterable[str]) -> dict[str, str]:
    """The names among ``names`` that lie in a module PEFT trains and saves in full (``saved``: module names, as
    :func:`task_modules` finds them), each mapped to the saved module holding it: the module itself, or one under
    it (``classifier.out_proj`` in ``classifier``; ``pre_classifier`` is not in ``classifier``).

    PEFT wraps no LoRA inside a module it saves whole, so such a name takes none: ``recommend`` leaves it out of the
    plan, ``spectra memory`` counts no LoRA there, and ``spectra train`` drops it from the targets, each with a note.

    >>> inside_saved(["classifier.out_proj", "pre_classifier", "q_proj"], ["classifier"])
    {'classifier.out_proj': 'classifier'}
    """
    saved = list(saved)
    found = {}
    for name in names:
        holder = next((s for s in saved if name == s or name.startswith(s + ".")), None)
        if holder is not None:
            found[name] = holder
    return found


@dataclass(frozen=True)
class RankPlan:
    """Per-module LoRA ranks and alphas, with their cost and captured energy.

    Attributes
    ----------
    modules : tuple of ModuleRank
    left_out : tuple of LeftOut
    policy : RankPolicy
    base : dict or None
        ``analysis["base"]`` (path, fingerprint) so a plan can be checked against its base.
    budget_gap : float or None
        With a binding budget: an upper bound on how much more total energy (share of all
        targeted ‖ΔW‖_F²) any plan within budget could capture (see :func:`~spectra.ranks.budget.allocate_budget`).
    functional : dict or None
        With ``RankPolicy.functional``: the sweep's choice per curve, with its noise (see
        :func:`~spectra.ranks.functional.functional_ranks`).
    fused : tuple of FusedParameter
        The fused expert parameters the model (built from the analysed base's config) adapts the
        planned experts through, each at its one rank; empty for models without them.
    modules_to_save : tuple of SavedModule
        The modules PEFT trains in full for the model's task type (a sequence classifier's head,
        :func:`task_modules`), counted in ``total_params``; empty for a causal LM.
    num_labels : int or None
        The class count those modules are counted with where it is not the config's: TUNED's, whose config.json
        declares other classes than the base's (:func:`tuned_labels`); the model trained is then built with it
        (``from_pretrained(BASE, num_labels=…)``). None: the config's own.
    """

    modules: tuple[ModuleRank, ...]
    left_out: tuple[LeftOut, ...] = ()
    policy: RankPolicy = field(default_factory=RankPolicy)
    base: dict | None = None
    budget_gap: float | None = None
    functional: dict | None = None
    fused: tuple[FusedParameter, ...] = ()
    modules_to_save: tuple[SavedModule, ...] = ()
    num_labels: int | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise ConfigError(f"Plan names modules more than once: {dupes}.")

    @property
    def total_params(self) -> int:
        """Trainable parameters: Σ of the modules' ``params``, the fused expert parameters' ``padding``, DoRA
        magnitudes Σ d_out if used (an embedding table's width: :func:`adapter_dims`), and the parameters of the modules PEFT trains in full for the task type
        (``modules_to_save``: a classifier's head). What ``get_peft_model`` trains with the plan's ``peft_config``."""
        extra = dora_magnitudes(self.modules) if self.policy.use_dora else 0
        return (sum(m.params for m in self.modules) + sum(f.padding for f in self.fused) + extra
                + self.saved_params)

    @property
    def saved_params(self) -> int:
        """Parameters of the modules PEFT trains in full for the task type (``modules_to_save``), in the total."""
        return sum(m.params for m in self.modules_to_save)

    @property
    def total_energy(self) -> float:
        """Captured share of the targeted modules' total energy Σ‖ΔW‖_F² (lower bound); of the whole update's,
        :attr:`whole_energy`."""
        total = sum(m.fro_norm ** 2 for m in self.modules)
        return sum(m.energy * m.fro_norm ** 2 for m in self.modules) / total if total > 0 else 1.0

    @property
    def whole_fro2(self) -> float:
        """The whole update's Σ‖ΔW‖_F² over every analysed matrix: the targeted modules and those left out (an
        embedding outside the roles, an unchanged module at 0). A fused tensor counts once (its split projections,
        ``c_attn[q]``, are no modules of the plan); vectors (norms, biases), which no LoRA holds, are not counted, as
        in ``spectra verify``'s coverage."""
        return math.fsum([m.fro_norm ** 2 for m in self.modules] + [m.fro_norm ** 2 for m in self.left_out])

    @property
    def coverage(self) -> float:
        """Share of the whole update's Σ‖ΔW‖_F² (:attr:`whole_fro2`) the targeted modules hold: what
        :attr:`total_energy` is a share of (Gemma 2's tied embedding, left out, can hold most of it)."""
        whole = self.whole_fro2
        return math.fsum(m.fro_norm ** 2 for m in self.modules) / whole if whole > 0 else 1.0

    @property
    def whole_energy(self) -> float:
        """Captured share of the whole update's Σ‖ΔW‖_F² (:attr:`whole_fro2`, lower bound): :attr:`total_energy`
        × :attr:`coverage`, the left-out modules capturing nothing."""
        whole = self.whole_fro2
        return math.fsum(m.energy * m.fro_norm ** 2 for m in self.modules) / whole if whole > 0 else 1.0

    @property
    def mean_energy(self) -> float:
        """Mean over modules of the captured share (each module counted once)."""
        return float(np.mean([m.energy for m in self.modules])) if self.modules else 1.0

    def check_base(self, base) -> None:
        """Refuse to apply this plan to a base other than the one its analysis measured.

        Bases are compared by the content fingerprint the analysis recorded
        (``CheckpointSource.fingerprint``: weight files' names, sizes and samples, and
        config.json), so the same weights pass whatever path or hub id names them (a hub
        snapshot and its local copy alike). A plan without a recorded fingerprint (made
        from rows, not from ``analysis.json``) passes: there is nothing to compare.

        Parameters
        ----------
        base : CheckpointSource
            The opened base checkpoint (``open_checkpoint(spec)``).

        Raises
        ------
        ConfigError
            The fingerprints differ: per-module names and ranks of another model (another
            depth, another width) would be applied to this one, in part or wrongly.
        """
        recorded = self.base.get("fingerprint") if isinstance(self.base, dict) else None
        if not recorded:
            return
        found = base.fingerprint()["fingerprint"]
        if recorded != found:
            raise ConfigError(f"the plan was made from an analysis of another base (fingerprint {recorded}, this base "
                              f"{found}: {base.spec}). Re-run `spectra analyze` and `spectra recommend` with this "
                              "base.")

    def with_rslora(self) -> "RankPlan":
        """This plan under rsLoRA scaling α/√r, each module's α recomputed by the policy's rule.

        With ``alpha_rule="scale"`` every module keeps its update scale s (α = s·√r instead of
        s·r); a constant α stays and its scale follows the rsLoRA law. Switching
        ``use_rslora`` on a plan's own α (2r) would scale each module by 2√r instead of 2.
        """
        if self.policy.rslora:
            return self
        policy = dataclasses.replace(self.policy, rslora=True)
        return dataclasses.replace(self, policy=policy, modules=tuple(
            dataclasses.replace(m, alpha=policy.alpha_for(m.rank)) for m in self.modules))

    def to_dict(self) -> dict:
        return {"schema_version": PLAN_SCHEMA_VERSION, "policy": dataclasses.asdict(self.policy),
                "base": self.base, "budget_gap": self.budget_gap,
                "totals": {"modules": len(self.modules), "params": self.total_params,
                           "energy": self.total_energy, "mean_energy": self.mean_energy,
                           "coverage": self.coverage, "whole_energy": self.whole_energy},
                "modules": [dataclasses.asdict(m) for m in self.modules],
                "left_out": [dataclasses.asdict(m) for m in self.left_out], "functional": self.functional,
                "fused": [dataclasses.asdict(f) for f in self.fused]} | (
                    {"modules_to_save": [dataclasses.asdict(m) for m in self.modules_to_save]}
                    if self.modules_to_save else {}) | (  # only where PEFT trains some: other plans' files unchanged
                    {"num_labels": self.num_labels} if self.num_labels is not None else {})

    @classmethod
    def from_dict(cls, data: Mapping) -> "RankPlan":
        if data.get("schema_version") != PLAN_SCHEMA_VERSION:
            raise ConfigError(f"Plan schema_version {data.get('schema_version')!r} is not "
                              f"{PLAN_SCHEMA_VERSION}; re-run `spectra recommend`.")
        policy = dict(data["policy"])
        if policy.get("roles") is not None:
            policy["roles"] = tuple(policy["roles"])
        return cls(modules=tuple(ModuleRank(**m) for m in data["modules"]),
                   left_out=tuple(LeftOut(**m) for m in data.get("left_out", [])),
                   policy=RankPolicy(**policy), base=data.get("base"), budget_gap=data.get("budget_gap"),
                   functional=data.get("functional"),
                   fused=tuple(FusedParameter(**f) for f in data.get("fused") or ()),
                   modules_to_save=tuple(SavedModule(**m) for m in data.get("modules_to_save") or ()),
                   num_labels=data.get("num_labels"))

    def to_peft_config(self, *, module_names: Iterable[str] | None = None, model=None,
                       task_type: str | None = "CAUSAL_LM", lora_dropout: float = 0.0) -> dict:
        """A PEFT ``LoraConfig`` dict (what ``adapter_config.json`` holds) for this plan.

        ``r``/``lora_alpha`` are the most common rank and its α; every module that differs gets
        a ``rank_pattern``/``alpha_pattern`` entry. PEFT 0.21 looks a key up with
        ``re.match(rf"(.*\\.)?({key})$", module_name)`` (``peft.utils.other.get_pattern_key``),
        so a bare name matches as a *suffix* and its dots match any character; keys are written
        ``re.escape(name)``, which matches the name and the name under a wrapper's prefix (the plan of
        a ``BertModel`` on ``BertForSequenceClassification``'s ``bert.…``), as ``target_modules``' full
        names do (PEFT matches them exactly or as a ``.``-suffix); ``"^" + re.escape(name)``, the full
        name alone, where another target ends in ``.`` + name (:func:`lora_config`).

        Parameters
        ----------
        module_names : iterable of str, optional
            Module names of the base model as PEFT sees them (``model.named_modules()``). Plan
            names are resolved to them (exact, or the one name differing by a leading prefix
            such as ``bert.``), and the result is checked with :func:`check_peft_config`.
        model : torch.nn.Module, optional
            Instead of ``module_names``: the model itself (real, or built on the meta device by
            :func:`spectra.checkpoints.targets.meta_model`). Plan names are resolved as its class
            loads the checkpoint (:func:`~spectra.checkpoints.targets.model_targets`); weights it
            holds in a parameter PEFT cannot wrap as a module, like transformers-5 Mixtral's
            fused experts (``mlp.experts.gate_up_proj``, experts × 2·ffn × hidden), become
            ``target_parameters``. Such a parameter takes one rank for all it holds: the sum over
            its projections (``gate`` + ``up``, B block-diagonal, as PEFT itself converts adapters
            and extract writes them) of the largest rank the plan gives that projection's experts,
            and α = ``policy.alpha_for(rank)``. A :class:`~spectra.errors.PeftConfigWarning` says
            where PEFT then trains more than the plan counts (a plan made without the model's
            fused parameters: experts at their own ranks and costs) and which modules the plan
            leaves out that the parameter holds (PEFT trains them; ``RankPlan.fused`` counts them).
        task_type : str or None
            PEFT task type. Default ``"CAUSAL_LM"``.
        lora_dropout : float
            Dropout on the LoRA input. Default 0.0 (none: keeps the update deterministic).

        Raises
        ------
        ConfigError
            A plan name the model has no weight for, two plan names loading into one module,
            DoRA or dropout on a parameter target (PEFT supports neither there).
        """
        config, notes = self._peft_config(module_names=module_names, model=model, task_type=task_type,
                                          lora_dropout=lora_dropout)
        for note in notes:
            warnings.warn(note, PeftConfigWarning, stacklevel=2)
        return config

    def _peft_config(self, *, module_names=None, model=None, task_type=None, lora_dropout=0.0) -> tuple[dict, list]:
        """:meth:`to_peft_config`'s dict and its notes (what the config could only approximate)."""
        if not self.modules:
            raise ConfigError("The plan targets no module; relax the policy (roles, noise, energy).")
        if module_names is not None and model is not None:
            raise ConfigError("to_peft_config: pass module_names or model, not both.")
        notes, parameters = [], set()
        if model is not None:
            settings, parameters, notes = self._model_settings(model)
        else:
            names = {m.name: m.name for m in self.modules}
            if module_names is not None:
                module_names = list(module_names)
                names = _resolve_names(list(names), module_names)
            settings = {names[m.name]: (m.rank, m.alpha, m.conv1d) for m in self.modules}
        self.refuse_parameter_methods(parameters, model, lora_dropout)
        config = lora_config(settings, alpha_for=self.policy.alpha_for, use_rslora=self.policy.rslora,
                             use_dora=self.policy.use_dora, task_type=task_type, lora_dropout=lora_dropout,
                             parameters=parameters)
        if model is not None and task_type == "SEQ_CLS" and head_saved_beside_peft(model):
            config["modules_to_save"] = head_saved_beside_peft(model)  # as spectra train passes them
        if model is not None:
            check_peft_config(config, [n for n, _ in model.named_modules() if n],
                              parameter_names=[n for n, _ in model.named_parameters()])
            check_peft_conversion(config, model)
        elif module_names is not None:
            check_peft_config(config, module_names)
        return config, notes

    def parameter_targets(self, model) -> set[str]:
        """The plan's targets that ``model`` holds as parameters, adapted through ``target_parameters`` (an MoE's
        fused experts); ``model`` may be built on the meta device."""
        return self._model_settings(model)[1]

    def refuse_parameter_methods(self, parameters, model, lora_dropout: float = 0.0) -> None:
        """Raise :class:`ConfigError` where the plan adapts ``parameters`` (:meth:`parameter_targets`) with DoRA or
        dropout, which PEFT supports on neither: what :meth:`to_peft_config` refuses, askable before any weight
        is loaded."""
        if parameters and (self.policy.use_dora or lora_dropout):
            raise ConfigError(f"PEFT adapts {sorted(parameters)[0]} (a parameter {type(model).__name__} holds no "
                              "module for, or the weight of a module PEFT would rewrite into a fused expert target) "
                              f"through target_parameters, which takes no "
                              f"{'DoRA' if self.policy.use_dora else 'lora_dropout'}: plan LoRA without dropout, "
                              "or leave these modules' roles out (e.g. --roles q,k,v,o).")

    def _model_settings(self, model) -> tuple[dict, set, list]:
        """Target → (rank, alpha, conv1d) on ``model``, the targets that are parameters, and notes."""
        from spectra.checkpoints.targets import rewritten_weights

        cls = type(model).__name__
        left_out = {m.name: m.reason for m in self.left_out}
        found = _expert_targets([m.name for m in self.modules] + list(left_out), model)
        missing = [m.name for m in self.modules if found[m.name] is None]
        bare = _bare_parameters(missing, model)
        if bare:  # a plan written before recommend left such a parameter out (a ViT's position table)
            raise planned_bare_parameters(
                {n: (t, tuple(model.get_parameter(t).shape)) for n, t in bare.items()}, cls)
        if missing:
            raise ConfigError(f"The plan names {len(missing)} module(s) {cls} has no weight for: "
                              f"{', '.join(missing[:5])}. Was the plan made from an analysis of this model?")
        settings, fused = {}, defaultdict(list)
        for m in self.modules:
            target = found[m.name]
            if target.parameter:
                fused[target.name].append(m)
            elif target.name in settings:
                raise ConfigError(f"{m.name} and another planned module both load into {target.name} of {cls}; "
                                  "drop one from the plan.")
            else:
                settings[target.name] = (m.rank, m.alpha, m.conv1d)
        # …mlp.gate_proj of a dense layer or shared expert, a tower's MLP, which PEFT would turn into other targets:
        rewritten = rewritten_weights(list(settings), model)
        for module in rewritten:  # named by their weight
            rank, alpha, _ = settings.pop(module)
            settings[f"{module}.weight"] = (rank, alpha, False)
        notes, recorded = [], {f.name: f for f in self.fused}
        for parameter, members in fused.items():
            blocks = defaultdict(list)  # one projection of every expert (…experts.w1): its rows of the parameter
            for m in members:
                blocks[expert_projection(m.name)].append(m.rank)
            # B block-diagonal over the projections (as extract writes it, as PEFT converts Mixtral's w1 and w3), each
            # as wide as its largest expert rank: r = r_gate + r_up
            rank = sum(max(ranks) for ranks in blocks.values())
            settings[parameter] = (rank, self.policy.alpha_for(rank), False)
            shape = tuple(model.get_parameter(parameter).shape)  # (experts, d1, d2) or (out, in)
            cost = rank * (shape[0] if len(shape) == 3 else 1) * sum(shape[-2:])
            planned = sum(m.params for m in members) + (recorded[parameter].padding if parameter in recorded else 0)
            if cost > planned:  # the plan (made without this model's fused parameters) undercounts what PEFT trains
                uneven = next((block for block, ranks in blocks.items() if len(set(ranks)) > 1), None)
                notes.append(f"{parameter}: {cls} holds {len(members)} planned modules (e.g. {members[0].name}) in "
                             f"this one parameter, which PEFT adapts at one rank for all its experts: {rank}"
                             + (f" (the plan gives {uneven}'s experts ranks {sorted(set(blocks[uneven]))}; "
                                "peft_config takes the largest)" if uneven else "")
                             + f", so PEFT trains {cost:,} parameters there, not the plan's {planned:,}. Plan with "
                             "this model's config (recommend --config, or a base with its config.json) to allocate "
                             "at that cost.")
            unplanned = [n for n, reason in left_out.items() if found[n] is not None and found[n].name == parameter]
            if unplanned:
                counted = parameter in recorded and recorded[parameter].padding > 0
                notes.append(f"{parameter}: PEFT adapts all {cls} holds in this parameter, including "
                             f"{len(unplanned)} module(s) the plan leaves out (e.g. {unplanned[0]}: "
                             f"{left_out[unplanned[0]]}), at rank {rank}"
                             + (f" ({recorded[parameter].padding:,} parameters, counted in the plan's total)."
                                if counted else "."))
        return settings, set(fused) | {f"{m}.weight" for m in rewritten}, notes


def _bare_parameters(names: list[str], model) -> dict[str, str]:
    """The ones of ``names`` that are a parameter of ``model`` themselves (exactly or up to a leading prefix), no
    module's ``.weight``: a ViT's ``embeddings.position_embeddings``; each mapped to the parameter's name in
    ``model`` (``vit.embeddings.position_embeddings`` in a ViTForImageClassification)."""
    from spectra.checkpoints.targets import resolve_name

    parameters = [n for n, _ in model.named_parameters()] if names else []
    found = {n: resolve_name(n, parameters) for n in names if not n.endswith(".weight")}
    return {n: t for n, t in found.items() if t is not None}


def planned_bare_parameters(tensors: Mapping[str, tuple[str, tuple[int, ...]]], where: str) -> ConfigError:
    """The error for a plan that names parameters of their own, no layer's weight
    (:func:`~spectra.checkpoints.names.is_bare_parameter`: a ViT's position table, Gemma 3's
    ``mm_input_projection_weight``), in the words recommend's refusal and left-out reason use
    (:func:`~spectra.checkpoints.names.bare_parameters_why`). The one error of a plan applied, by
    :meth:`RankPlan.to_peft_config` (``spectra train``, ``save_plan``) and by extract.

    Parameters
    ----------
    tensors : mapping
        Plan name → (the tensor it names, its shape as stored), in plan order.
    where : str
        Whose tensors: a model class (``ViTModel``), or ``the base <path>``.
    """
    from spectra.checkpoints.names import bare_parameters_why

    one = len(tensors) == 1
    named = [f"{name} (tensor {tensor}, {'×'.join(map(str, shape))})" if tensor != name
             else f"{name} (a {'×'.join(map(str, shape))} tensor)" for name, (tensor, shape) in tensors.items()]
    listed = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    it = "it" if one else "them"
    return ConfigError(f"The plan names {listed} of {where}: {'it is' if one else 'they are'} "
                       f"{bare_parameters_why(len(tensors))}. Re-run spectra recommend, which leaves {it} out, or "
                       f"drop {it} from the plan; copy {it} from TUNED onto the loaded model.")


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def expert_projection(name: str) -> str | None:
    """The projection whose experts share one rank, if ``name`` may name one expert of it, else None.

    Mixtral's ``…experts.3.w1`` (and gpt-oss's ``…experts.3.gate_up_proj``) → ``…experts.w1``; JetMoE's
    ``…mlp.input_linear.3``, expert 3 of a ``JetMoeParallelExperts`` weight as the pairing names it
    (``<module>.<expert>``), → the module ``…mlp.input_linear``. Only a candidate: whether the model holds the
    name in a fused expert parameter is :func:`expert_parameters`' answer (``…attn.to_out.0`` is a Linear).
    """
    if _EXPERT_INDEX.search(name):
        return _EXPERT_INDEX.sub(".experts.", name)
    head, _, index = name.rpartition(".")
    return head if head and index.isdigit() else None


def _expert_targets(names: list[str], model) -> dict:
    """:func:`~spectra.checkpoints.targets.model_targets`, where a name of one expert of a 3-D tensor the checkpoint
    stores fused (gpt-oss's, Llama 4's, Qwen3-VL-MoE's ``…experts.0.gate_up_proj``: analysis names each expert) is
    that tensor's target (``…experts.gate_up_proj``, a parameter), and JetMoE's ``…mlp.input_linear.0`` (expert 0 of
    a ``JetMoeParallelExperts`` weight: :func:`~spectra.checkpoints.architectures.parallel_experts`) is the target
    ``…mlp.input_linear.weight``, a parameter. Mixtral's ``…experts.0.w1`` resolves as is."""
    from spectra.checkpoints.targets import ModelTarget, model_targets, resolve_name

    found = model_targets(names, model)
    fused = {n: _EXPERT_INDEX.sub(".experts.", n) for n in names if found[n] is None and _EXPERT_INDEX.search(n)}
    stored = model_targets(sorted(set(fused.values())), model)
    for name, tensor in fused.items():
        if stored[tensor] is not None and stored[tensor].parameter:
            found[name] = stored[tensor]
    parallel = {n: expert_projection(n) for n in names if found[n] is None and n not in fused and expert_projection(n)}
    if parallel:
        from spectra.checkpoints.architectures import parallel_experts

        config = model.config.to_dict() if getattr(model, "config", None) is not None else None
        parameters = dict(model.named_parameters())
        for name, module in parallel.items():
            weight = resolve_name(f"{module}.weight", parameters)
            shape = tuple(parameters[weight].shape) if weight is not None else ()
            if weight is not None and parallel_experts(weight[:-len(".weight")], shape, config) \
                    and int(name.rpartition(".")[2]) < shape[0]:
                loaded = f"{module}.weight"  # the expert's name, with or without a prefix, as model_targets writes
                stored = (weight[:len(weight) - len(loaded)] + name if len(weight) >= len(loaded)
                          else name[len(loaded) - len(weight):])
                found[name] = ModelTarget(weight, parameter=True, stored_name=stored)
    return found


def expert_parameters(names: Iterable[str], model) -> dict[str, tuple[str, tuple[int, int, int]]]:
    """Name of one expert's projection → (the 3-D parameter of ``model`` that holds it, its shape (experts, d1, d2)).

    Only names ``model`` holds in a fused expert parameter (transformers-5 Mixtral's ``…experts.3.w1`` →
    ``…mlp.experts.gate_up_proj``; gpt-oss's per-expert ``…experts.3.gate_up_proj``) are keys. One expert per
    projection and layer is resolved (:func:`_expert_targets`): every expert of a projection lies in the same
    parameter, so a model of thousands of experts costs what its layers do.
    """
    projections = defaultdict(list)  # …experts.w1 -> every expert's …experts.N.w1 (JetMoE's: …input_linear.N)
    for name in names:
        if expert_projection(name):
            projections[expert_projection(name)].append(name)
    if model is None or not projections:
        return {}
    found = _expert_targets([members[0] for members in projections.values()], model)
    out = {}
    for members in projections.values():
        target = found[members[0]]
        if target is None or not target.parameter:
            continue
        shape = tuple(model.get_parameter(target.name).shape)
        if len(shape) == 3:
            out.update({name: (target.name, shape) for name in members})
    return out


def lora_config(modules: Mapping[str, tuple[int, float, bool]], *, alpha_for=None, use_rslora: bool = False,
                use_dora: bool = False, task_type: str | None = None, lora_dropout: float = 0.0,
                parameters: Iterable[str] = (), r: int | None = None, alpha: float | None = None) -> dict:
    """A PEFT ``LoraConfig`` dict for per-module ``name → (rank, alpha, conv1d)``.

    ``r`` is the most common rank (ties: the smallest) and ``lora_alpha`` is ``alpha_for(r)``
    (default: the most common α among modules of rank ``r``); every module that differs gets
    a ``rank_pattern``/``alpha_pattern`` key, its escaped name, which PEFT's suffix-regex match
    (``get_pattern_key``) hits for that module alone, under any prefix a wrapping class adds, as it
    does ``target_modules``; anchored with ``^`` (the full name alone) where another module's name ends
    in ``.`` + that name, whose key PEFT would otherwise take for both (it takes the first key that
    matches, rank_pattern's before alpha_pattern's). ``fan_in_fan_out`` is set when any
    module is a Conv1D. Names in ``parameters`` are parameters, not modules: they are listed
    in ``target_parameters`` (PEFT matches pattern keys against them the same way). `r` and
    `alpha` fix the global values instead (for modules PEFT adapts at the global rank whatever
    the patterns say, such as fused experts it converts from per-expert keys).
    """
    parameters = set(parameters)
    nested = _dotted_suffixes(modules)
    counts = Counter(rank for rank, _, _ in modules.values())
    if r is None:
        r = max(counts, key=lambda k: (counts[k], -k))
    if alpha is None and alpha_for is not None:
        alpha = alpha_for(r)
    elif alpha is None:
        alphas = Counter(a for rank, a, _ in modules.values() if rank == r) or Counter(a for _, a, _ in modules.values())
        alpha = max(alphas, key=lambda a: alphas[a])
    return {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "target_modules": sorted(set(modules) - parameters),
    } | ({"target_parameters": sorted(parameters)} if parameters else {}) | {
        "rank_pattern": {_pattern_key(n, nested): rank for n, (rank, _, _) in modules.items() if rank != r},
        "alpha_pattern": {_pattern_key(n, nested): a for n, (_, a, _) in modules.items() if a != alpha},
        "use_rslora": use_rslora, "use_dora": use_dora,
        "fan_in_fan_out": any(conv1d for _, _, conv1d in modules.values()),
        "lora_dropout": lora_dropout, "bias": "none",
    }


def _dotted_suffixes(names: Iterable[str]) -> set[str]:
    """Every proper ``.``-suffix of `names` (``b.c`` and ``c`` of ``a.b.c``): the names another ends in."""
    out = set()
    for name in names:
        i = name.find(".")
        while i >= 0:
            out.add(name[i + 1:])
            i = name.find(".", i + 1)
    return out


def _pattern_key(name: str, nested: set[str]) -> str:
    """The rank_pattern/alpha_pattern key of `name`, anchored where another target ends in ``.`` + `name`
    (`nested`: :func:`_dotted_suffixes` of the targets; see :func:`lora_config`)."""
    return ("^" if name in nested else "") + re.escape(name)


def _resolve_names(plan_names: list[str], module_names: list[str]) -> dict[str, str]:
    """Plan name → the base model's module name: exact, else unique up to a leading prefix."""
    present = set(module_names)
    out, missing = {}, []
    for name in plan_names:
        if name in present:
            out[name] = name
            continue
        hits = [n for n in module_names if n.endswith("." + name) or name.endswith("." + n)]
        if len(hits) == 1:
            out[name] = hits[0]
        else:
            missing.append(f"{name} ({'ambiguous: ' + ', '.join(hits[:3]) if hits else 'absent'})")
    if missing:
        raise ConfigError(f"The plan names {len(missing)} module(s) the base model does not have exactly once: "
                          f"{'; '.join(missing[:5])}. Was the plan made from an analysis of this base?")
    return out


def check_peft_config(config: Mapping, module_names: Iterable[str], *,
                      parameter_names: Iterable[str] = ()) -> dict[str, str]:
    """Check that a LoraConfig dict targets exactly what it says, as PEFT 0.21 would match it.

    Every ``target_modules`` entry, ``rank_pattern`` key and ``alpha_pattern`` key must match
    exactly one module name, pattern keys only targeted modules, and no module may be matched
    by two keys (PEFT would silently use the first). Matching is PEFT's
    (:func:`~spectra.checkpoints.peft_match.config_targets`);
    ``target_parameters`` entries must match exactly one of ``parameter_names``, and pattern
    keys may match a targeted parameter instead of a module.

    Returns
    -------
    dict
        Each key and target entry → the module name it matches.

    Raises
    ------
    ConfigError
        Naming every entry that matches no module or several.
    """
    from spectra.checkpoints.peft_match import config_targets

    found = config_targets(config, module_names, parameter_names=parameter_names)
    problems, matched = [], {}
    for field_name, what in (("target_modules", "modules"), ("target_parameters", "parameters")):
        for entry, hits in found.entries[field_name].items():
            withheld = found.withheld.get(entry) if field_name == "target_modules" and not hits else None
            if withheld:  # it names modules, which modules_to_save or exclude_modules keeps PEFT from wrapping
                by_field = {why: [n for n, w in withheld.items() if w == why] for why in withheld.values()}
                problems.append(f"{field_name} entry {entry!r} matches 0 modules PEFT wraps: it names "
                                + " and ".join(f"{', '.join(names)}, which {why} keeps PEFT from wrapping"
                                               for why, names in by_field.items()))
            elif len(hits) != 1:
                problems.append(f"{field_name} entry {entry!r} matches {len(hits)} {what}")
            else:
                matched[entry] = hits[0]
    targeted = found.modules | found.parameters
    for field_name, keys in found.keys.items():
        for key, hits in keys.items():
            if len(hits) != 1:
                problems.append(f"{field_name} key {key!r} matches {len(hits)} modules or targeted parameters")
            elif hits[0] not in targeted:
                problems.append(f"{field_name} key {key!r} matches {hits[0]}, which is not targeted")
            else:
                matched[key] = hits[0]
        seen = Counter(matched[k] for k in keys if k in matched)
        problems += [f"{field_name}: {n} is matched by {c} keys" for n, c in seen.items() if c > 1]
    if problems:
        raise ConfigError("The PEFT config does not match the base model one-to-one: " + "; ".join(problems[:8])
                          + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "") + ".")
    return matched


def check_peft_conversion(config: Mapping, model) -> None:
    """Check that PEFT, loading a LoraConfig dict onto ``model``, adapts what it names and no more, at its scaling.

    PEFT (0.21) rewrites the config of a transformers-5 MoE first
    (:func:`~spectra.checkpoints.peft_match.peft_converted`; see
    :func:`~spectra.checkpoints.targets.peft_rewritten_modules`). The modules and parameters PEFT would then wrap
    (:func:`~spectra.checkpoints.peft_match.config_targets` of the rewritten config) must be those the config
    means: its ``target_modules`` that are modules of the model, its ``target_parameters``, and for a per-expert
    checkpoint name (``…experts.3.w1``, which PEFT maps) the fused parameter that holds it. With ``use_rslora``
    PEFT's fusion of two projections into ``gate_up_proj`` is refused as well: it doubles ``r`` and ``lora_alpha``,
    which keeps
    α/r but makes rsLoRA's α/√r √2 larger.

    Raises
    ------
    ConfigError
        Naming what PEFT would leave out or adapt instead, or the rsLoRA fusion.
    """
    from spectra.checkpoints.peft_match import config_targets, peft_converted
    from spectra.checkpoints.targets import model_targets

    if isinstance(config.get("target_modules"), str):  # a regex: PEFT resolves it itself (spectra writes lists)
        return
    cls = type(model).__name__
    try:
        converted = peft_converted(config, model)
    except ValueError as err:
        raise ConfigError(f"PEFT refuses this config on {cls}: {err}") from None
    if converted is None:
        return
    modules = [n for n, _ in model.named_modules() if n]
    parameters = [n for n, _ in model.named_parameters()]
    meant = config_targets(config, modules, parameter_names=parameters)
    mapped = [t for t, hits in meant.entries["target_modules"].items() if not hits]  # per-expert checkpoint names
    one_expert = {_EXPERT_INDEX.sub(".experts.0.", t): t for t in mapped}  # all experts of a projection: one place
    meant_parameters = meant.parameters | {target.name for target in model_targets(list(one_expert.values()),
                                                                                    model).values()
                                           if target is not None and target.parameter}
    wrapped = config_targets(converted, modules, parameter_names=parameters)
    lost = sorted((meant.modules - wrapped.modules) | (meant_parameters - wrapped.parameters))
    extra = sorted((wrapped.modules - meant.modules) | (wrapped.parameters - meant_parameters))
    if lost or extra:
        raise ConfigError(f"PEFT rewrites this config's targets for {cls} when it loads it "
                          "(peft.utils.transformers_weight_conversion), so it would "
                          + "; ".join(([f"not adapt {', '.join(lost[:4])}" + (" …" if len(lost) > 4 else "")]
                                       if lost else [])
                                      + ([f"adapt {', '.join(extra[:4])}" + (" …" if len(extra) > 4 else "")
                                          + " instead"] if extra else []))
                          + ". Name such modules by their weight in target_parameters (…mlp.gate_proj.weight), "
                          "which PEFT does not rewrite.")
    fused = [k for k in converted["rank_pattern"] if k not in (config.get("rank_pattern") or {})]
    if config.get("use_rslora") and fused:
        raise ConfigError(f"use_rslora: PEFT fuses this config's per-expert targets into {fused[0]} at twice r and "
                          "lora_alpha, which keeps α/r but makes rsLoRA's α/√r √2 too large. Name the fused "
                          "parameters in target_parameters instead, or train without rsLoRA.")


class MetaModels:
    """:func:`~spectra.checkpoints.targets.meta_model` for the steps of one command, each model built once.

    ``models(config, model_class=None)`` returns what ``meta_model(config, model_class)`` would, building it the first
    time a class is asked for a config equal to one asked before (compared as dicts) and handing back that model
    after; a base model (``MixtralModel``) asked after a model of the config that holds it (``MixtralForCausalLM``:
    its ``base_model``, built by the same ``__init__`` from the same config) is that one. ``spectra recommend``
    makes one for :func:`~spectra.ranks.recommend_ranks` (an MoE's fused experts) and :func:`save_plan` (the
    peft_config's names) and :func:`~spectra.memory.estimate_memory` (an MoE's base model and causal LM), which
    then build the model once between them. After the first build of a process (transformers' modelling import, seconds) a build costs
    0.1-0.3 s (Mixtral-8x7B's, DeepSeek-V3's on the meta device).

    Made per command, never shared beyond it: the callers only read the models (names, shapes, PEFT's config
    conversion); one handed to ``get_peft_model``, which wraps its modules in place, must be built afresh.
    """

    def __init__(self) -> None:
        self._built: list[tuple[Mapping, str | None, object]] = []  # (the config as asked, class, model or None)

    def __call__(self, config: Mapping | None, model_class: str | None = None):
        from spectra.checkpoints.targets import architecture, meta_model

        model_class = model_class or architecture(config)
        same = [(cls, model) for seen, cls, model in self._built if seen == config]
        for cls, model in same:
            if cls == model_class:
                return model
        held = next((m.base_model for _, m in same if m is not None and m.base_model is not m
                     and type(m.base_model).__name__ == model_class), None)
        model = held if held is not None else meta_model(config, model_class)
        self._built.append((copy.deepcopy(config), model_class, model))  # a copy: the caller may change its dict
        return model


def save_plan(plan: RankPlan, path: str | os.PathLike, *, model_config: Mapping | None = None,
              models: MetaModels | None = None) -> Path:
    """Write the plan's :func:`plan_document` as JSON atomically (temp file in the same folder, then rename)."""
    return write_plan(plan_document(plan, model_config=model_config, models=models), path)


def write_plan(document: Mapping, path: str | os.PathLike) -> Path:
    """Write a :func:`plan_document` as JSON atomically, with any keys added (``spectra recommend`` adds its memory
    estimate; :func:`load_plan` reads the plan and ignores them)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; the plan is a file, e.g. {path / 'plan.json'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return path


def plan_document(plan: RankPlan, *, model_config: Mapping | None = None,
                  models: MetaModels | None = None) -> dict:
    """The plan file's contents: :meth:`RankPlan.to_dict` and the PEFT config it makes.

    The document also carries ``peft_config``, the plan's :meth:`RankPlan.to_peft_config`, for users
    who pass it to ``LoraConfig(**…)``; it is not read back. Its names are those of the model
    class that ``model_config`` names (a ``config.json`` dict; default: the one beside the
    analysed base, ``plan.base["path"]``), built on the meta device, so PEFT matches them on
    that model even where transformers renames or fuses the checkpoint's tensors
    (transformers-5 Mixtral's experts become ``target_parameters``). ``peft_config_model``
    names that class, ``peft_config_notes`` lists what the config could only approximate (each
    also a :class:`~spectra.errors.PeftConfigWarning`). Without a config naming a class
    transformers can build, the plan's own (checkpoint) names are written and
    ``peft_config_model`` is null. Its ``task_type`` is that class's
    (:func:`~spectra.checkpoints.targets.peft_task_type`: ``CAUSAL_LM`` for a causal LM,
    ``SEQ_CLS`` for a sequence classifier, …, null for a bare model or no config); a note says where PEFT, for that
    task type, trains other modules in full than the plan counts (``RankPlan.modules_to_save``, with the class count
    ``RankPlan.num_labels`` where set: TUNED's). ``models``: the
    command's :class:`MetaModels`, where that model may have been built already (default: built here).
    """
    from spectra.checkpoints.targets import architecture, meta_model, peft_task_type, with_labels

    data = plan.to_dict()
    if plan.modules:
        config = model_config if model_config is not None else base_config(plan.base)
        model = (models or meta_model)(config)
        task_type = peft_task_type(config)
        data["peft_config"], notes = plan._peft_config(model=model, task_type=task_type)
        # the head with the plan's class count (TUNED's where the base's config declares another), as it counts it
        labelled = model if not (plan.num_labels and config) else (models or meta_model)(
            with_labels(config, plan.num_labels))
        saved = task_modules(labelled, task_type)
        if saved != plan.modules_to_save:  # a plan made without this model's config (from rows, another class)
            notes.append(f"get_peft_model trains {_saved_text(saved) or 'no module'} in full for task_type "
                         f"{task_type} (it adds them to modules_to_save), the plan's total counts "
                         f"{_saved_text(plan.modules_to_save) or 'none'}: plan with this model's config "
                         "(recommend --config, or a base with its config.json) for a total and budget that hold.")
        data["peft_config_model"] = architecture(config) if model is not None else None
        data["peft_config_notes"] = notes
        for note in notes:
            warnings.warn(note, PeftConfigWarning, stacklevel=2)
    return data


def _saved_text(saved: Iterable[SavedModule]) -> str:
    return ", ".join(f"{m.name} ({m.params:,} parameters)" for m in saved)


def base_config(base: Mapping | None) -> dict | None:
    """The ``config.json`` beside an analysed checkpoint (``analysis["base"]["path"]``, or ``["tuned"]``'s: a local
    path), or None."""
    text = str((base or {}).get("path") or "")
    where = Path(text)
    if not text or not where.exists():
        return None
    file = (where if where.is_dir() else where.parent) / "config.json"
    try:
        data = json.loads(file.read_text()) if file.is_file() else None
    except (OSError, ValueError):  # unreadable: the plan's own names are written, as without one
        return None
    return data if isinstance(data, dict) else None


def tuned_labels(config: Mapping | None, tuned_config: Mapping | None) -> int | None:
    """TUNED's class count where its ``config.json`` (``tuned_config``) declares other classes than ``config`` (the
    base's) for a class of the same task type, one whose head PEFT trains in full (:data:`PEFT_TASK_MODULES`), else
    None (either config unknown, or no such class).

    A sequence classifier fine-tuned into 3 classes from a config of 2 holds a (3, hidden) head, which the pairing
    sets aside (only in BASE, only in TUNED); the head an adapter of it trains and saves (``modules_to_save``) is
    that one, on the model built with TUNED's count (``from_pretrained(BASE, num_labels=3)``, the count
    :func:`spectra.lora.saved_modules.saved_num_labels` asks for), not the base config's. Classes are read as
    :func:`~spectra.checkpoints.targets.configured_labels` reads them (``len(id2label)``, else ``num_labels``).
    """
    from spectra.checkpoints.targets import configured_labels, peft_task_type

    task = peft_task_type(config)
    if task not in PEFT_TASK_MODULES or not tuned_config or peft_task_type(tuned_config) != task:
        return None
    classes = configured_labels(tuned_config)
    return classes if classes != configured_labels(config) else None


def load_plan(path: str | os.PathLike) -> RankPlan:
    """Read a plan written by :func:`save_plan`, validating every module's rank."""
    from spectra.files import is_analysis, other_spectra_file, records_in

    path = Path(path)
    if path.is_dir():  # a report folder: it was "[Errno 21] Is a directory"
        inside = records_in(path)
        raise ConfigError(f"{path} is a folder; a plan is a file, written by `spectra recommend … -o plan.json`"
                          + (f". It holds {'; '.join(inside)}" if inside else "") + ".")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"No plan at {path}; write one with `spectra recommend … -o {path}`.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Plan {path} is not valid JSON ({err}).") from None
    if is_analysis(data):  # it was "malformed ('policy')"
        raise ConfigError(f"{path} is an analysis (`spectra analyze`), not a plan; make a plan from it with "
                          f"`spectra recommend {path} -o plan.json`.")
    other = other_spectra_file(data)
    if other and "rank plan" not in other:
        raise ConfigError(f"{path} is {other}, not a rank plan; write one with `spectra recommend … -o plan.json`.")
    try:
        return RankPlan.from_dict(data)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"Plan {path} is malformed ({err}); re-run `spectra recommend`.") from None
