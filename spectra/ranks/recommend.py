"""``recommend_ranks``: an analysis's per-module spectra + a policy → a :class:`~spectra.ranks.plan.RankPlan`.

Reads the matrix rows of ``analysis.json`` (or the result object), reduces each to what a
rank decision needs (its singular values, energy, shape) and applies the policy's targets,
caps, shaping and budget; with a functional policy, it first checks that the truncation
sweep measured the analysed pair.

References
----------
.. [1] Satopää et al., "Finding a 'Kneedle' in a Haystack", ICDCS workshops 2011.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spectra.checkpoints.architectures import missing_stacks, role_selected, stack_name, stack_selected
from spectra.checkpoints.names import bare_parameters_why, is_bare_parameter
from spectra.errors import ConfigError
from spectra.files import other_spectra_file
from spectra.ranks.budget import SAVED_BYTES_PER_PARAM, allocate_budget, budget_parameters
from spectra.ranks.functional import functional_ranks, read_sweep, role_curves
from spectra.ranks.plan import (PEFT_TASK_MODULES, FusedParameter, LeftOut, MetaModels, ModuleRank, RankPlan,
                                SavedModule, dora_magnitudes, expert_projection, inside_saved)
from spectra.ranks.policy import DEFAULT_ENERGY, RankPolicy

# roles a LoRA on linear layers does not target unless asked: embeddings (the token embedding, and the tables looked
# up by position or segment: GPT-2's wpe, BERT's token_type_embeddings, T5's relative_attention_bias) need PEFT's
# embedding LoRA and the head is often tied to them.
_DEFAULT_SKIPPED_ROLES = ("embed", "pos_embed", "head")
# An MoE's router (role other), by its checkpoint name: DeepSeek's, Qwen-MoE's and OLMoE's mlp.gate, Mixtral's and
# PhiMoE's block_sparse_moe.gate, Qwen2-MoE's shared_expert_gate, gpt-oss's mlp.router, Llama 4's feed_forward.router,
# Granite-MoE's router.layer, Switch's router.classifier. Not planned unless roles name other: no default of train,
# extract or memory adapts one (a router is no block role), and extract cannot write DeepSeek's (a TopkRouter).
_ROUTER = re.compile(r"(^|\.)(gate|shared_expert_gate)$|(^|\.)router(\.|$)")


@dataclass(frozen=True)
class _Spectrum:
    """One matrix row of an analysis, reduced to what a rank decision needs."""

    name: str
    role: str | None
    layer: int | None
    stack: str | None                 # None: the language model (and rows written before stacks existed)
    shape: tuple[int, int]            # (out, in)
    conv1d: bool
    fro2: float                       # ‖ΔW‖_F², exact
    cum: np.ndarray                   # (k+1,) Σ_{i≤r} σᵢ², r = 0..k over the known values
    noise_rank: int | None
    rank_bounds: Mapping[float, tuple[int, int]] = dataclasses.field(default_factory=dict)  # τ -> (lo, hi): unsettled

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def known(self) -> int:
        return len(self.cum) - 1

    def energy(self, rank: int) -> tuple[float, float]:
        """Captured share of ‖ΔW‖_F² at ``rank`` as (lower, upper) bounds; equal when known.

        Beyond the k known values, σᵢ ≤ σ_k bounds each further term, and the total is ≤ 1.
        """
        if self.fro2 <= 0:
            return 1.0, 1.0
        k = self.known
        if rank <= k or k >= self.full_rank:
            e = min(float(self.cum[min(rank, k)] / self.fro2), 1.0)
            return e, e
        lo = float(self.cum[k] / self.fro2)
        last = float(self.cum[k] - self.cum[k - 1]) if k else self.fro2
        return lo, min(1.0, lo + (rank - k) * last / self.fro2)

    def energy_rank(self, tau: float) -> tuple[int, str | None]:
        """Smallest rank capturing τ of the energy, and None when exact, else what it is instead.

        Past the known values it is the analysis's upper bound where the sketch left τ
        unsettled inside its subspace (``energy_rank_bounds``: a rank that surely captures
        τ), else a lower bound extrapolated from the last known σ.
        """
        target = tau * self.fro2 * (1 - 1e-12)
        hit = np.nonzero(self.cum >= target)[0]
        if hit.size:
            return max(int(hit[0]), 1), None
        bounds = next((b for t, b in self.rank_bounds.items() if math.isclose(t, tau)), None)
        if bounds is not None:
            lo, hi = bounds
            return min(int(hi), self.full_rank), f"upper bound of {lo}–{hi}: not settled by the sketch"
        k = self.known
        last = float(self.cum[k] - self.cum[k - 1]) if k else 0.0
        if last <= 0:
            return self.full_rank, f"lower bound: {k} σ known"
        # each unknown σᵢ² ≤ σ_k², so at least this many more are needed
        more = math.ceil((target - self.cum[k]) / last)
        return min(k + more, self.full_rank), f"lower bound: {k} σ known"

    def knee(self) -> int:
        """Elbow of the cumulative-energy curve over the known values (Kneedle [1]_).

        On the normalised curve x = i/k, y = E(i)/E(k), the knee is argmax_i (y_i − x_i).
        """
        k = self.known
        if k <= 1 or self.cum[k] <= 0:
            return 1
        i = np.arange(k + 1)
        return max(int(np.argmax(self.cum / self.cum[k] - i / k)), 1)


def _rows(analysis: Any) -> tuple[list[dict], dict | None, dict | None, dict]:
    """Rows (as dicts), the base and tuned descriptions and the configuration of an analysis object, dict, file or
    directory."""
    from spectra.groups import model_type_of, rows_with_stacks
    from spectra.report.tables import analysis_problem

    if isinstance(analysis, (str, os.PathLike)):
        path = Path(analysis)
        if path.is_dir():
            if (path / "config.json").is_file() and not (path / "analysis.json").exists():
                raise ConfigError(f"{path} is a model folder, not an analysis: pass BASE TUNED (two checkpoints, "
                                  "analysed first) or the report directory of `spectra analyze`.")
            path = path / "analysis.json"
        if not path.is_file():
            raise ConfigError(f"No analysis found at {path}: pass analysis.json or the directory holding it.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-run `spectra analyze`.") from None
        other = other_spectra_file(data)
        if other:
            raise ConfigError(f"{path} is {other}, not an analysis: pass the report directory of `spectra analyze` "
                              "or its analysis.json.")
        analysis, where = data, f"{path} "
    else:
        where = "the analysis "
    if isinstance(analysis, Mapping):
        problem = analysis_problem(dict(analysis)) or next(
            (f"'{side}' must be an object" for side in ("base", "tuned")
             if analysis.get(side) is not None and not isinstance(analysis[side], Mapping)), None)
        if problem:
            raise ConfigError(f"{where}is not an analysis spectra wrote ({problem}); pass the report directory of "
                              "`spectra analyze` or its analysis.json.")
        modules, base, tuned = analysis.get("modules"), analysis.get("base"), analysis.get("tuned")
        config, pairing = analysis.get("config"), analysis.get("pairing")
    else:
        modules, base = getattr(analysis, "modules", None), getattr(analysis, "base", None)
        tuned, config = getattr(analysis, "tuned", None), getattr(analysis, "config", None)
        pairing = getattr(analysis, "pairing", None)
    if modules is None:
        raise ConfigError("The analysis has no 'modules' list: pass an AnalysisResult or analysis.json.")
    rows = [m if isinstance(m, Mapping) else
            (dataclasses.asdict(m) if dataclasses.is_dataclass(m) else vars(m)) for m in modules]
    # a row without a stack (written before rows named it, or before spectra gave a vision-only model its stack)
    # reads with the one a new run gives it, by its name and the checkpoint's model type: an old ViT's are vision
    settings = config if isinstance(config, Mapping) or config is None else vars(config)
    rows = rows_with_stacks(rows, model_type_of({"pairing": pairing}), settings)
    described = []
    for info in (base, tuned):
        if info is not None and not isinstance(info, Mapping):
            info = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else vars(info)
        described.append(dict(info) if info is not None else None)
    return rows, described[0], described[1], dict(config) if isinstance(config, Mapping) else {}


def _check_sweep_pair(sweep: Mapping, base: dict | None, tuned: dict | None) -> None:
    """Refuse a truncation sweep of another pair than the analysis's, where both can be told apart.

    Both record content fingerprints of their checkpoints, compared wherever the files now
    are (or for a hub id). A sweep written before it recorded them has only its paths:
    those are fingerprinted here when they still exist, and pass when they do not (the
    module-name check still runs). An analysis whose tuned side is a PEFT adapter cannot
    be compared on that side (a sweep needs the full model, an adapter's fingerprint is of
    its own weights): its base decides.
    """
    from spectra.checkpoints.source import open_checkpoint

    recorded = sweep.get("fingerprints") or {}
    for side, path in (("base", sweep.get("base")), ("tuned", sweep.get("tuned"))):
        info = base if side == "base" else tuned
        expected = (info or {}).get("fingerprint")
        if not expected or (info or {}).get("format") == "peft-adapter":
            continue
        found = recorded.get(side)
        if not found and path and Path(str(path)).exists():
            try:
                found = open_checkpoint(str(path)).fingerprint()["fingerprint"]
            except Exception:  # noqa: BLE001 - an unreadable path cannot be compared; the names check still runs
                found = None
        if found and found != expected:  # neutral: either input may be the odd one out
            raise ConfigError(f"the analysis and the sweep are of different pairs: the swept {side} {path} "
                              f"(fingerprint {found}) and the analysed {side} {(info or {}).get('path', '?')} "
                              f"(fingerprint {expected}): their content differs. Pass an analysis and a sweep of the "
                              "same BASE and TUNED (`spectra analyze BASE TUNED`, `spectra sweep BASE TUNED`).")


def check_analysis_pair(analysis: Any, base, tuned) -> None:
    """Refuse, before a truncation sweep of ``base`` × ``tuned`` runs, an analysis of another pair.

    The check ``recommend_ranks`` makes of the finished sweep (content fingerprints; a
    checkpoint that is no local path, such as a hub id, is left to that later check), so a
    functional plan is refused before the evaluations rather than after them.

    Raises
    ------
    ConfigError
        ``analysis`` is no analysis, or measured other checkpoints than ``base`` / ``tuned``.
    """
    _, analysed_base, analysed_tuned, _ = _rows(analysis)
    _check_sweep_pair({"base": str(base), "tuned": str(tuned)}, analysed_base, analysed_tuned)


def _is_split(row: Mapping) -> bool:
    # "c_attn[q]" is one projection of a fused tensor; LoRA can only target the fused whole
    fused = row.get("fused_name")
    return row["name"].endswith("]") or (fused is not None and fused != row["name"])


def _spectrum(row: Mapping) -> _Spectrum:
    try:
        out_features, in_features = (int(d) for d in row["shape"])
        fro = float(row["fro_norm"])
        sv = np.asarray(row.get("singular_values") or [], dtype=np.float64)
        bounds = {float(t): (int(lo), int(hi)) for t, (lo, hi) in (row.get("energy_rank_bounds") or {}).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"Analysis row {row.get('name')!r} lacks shape/fro_norm/singular_values or has a malformed "
                          f"energy_rank_bounds ({err}).") from None
    noise = row.get("noise") or {}
    noise_rank = noise.get("rank_above", row.get("gd_rank"))
    return _Spectrum(name=row["name"], role=row.get("role"), layer=row.get("layer"), stack=row.get("stack"),
                     shape=(out_features, in_features), conv1d=bool(row.get("conv1d", False)),
                     fro2=fro * fro, cum=np.concatenate([[0.0], np.cumsum(sv * sv)]),
                     noise_rank=None if noise_rank is None else int(noise_rank), rank_bounds=bounds)


def recommend_ranks(analysis: Any, policy: RankPolicy | None = None, *, sweep: Any = None,
                    model_config: Mapping | None = None, models: MetaModels | None = None) -> RankPlan:
    """Recommend per-module LoRA ranks from measured spectra.

    Parameters
    ----------
    analysis : AnalysisResult, dict, str or PathLike
        An object with a ``.modules`` list, the dict of ``analysis.json``, that file, or the
        directory holding it. Matrix rows that are not split projections (``c_attn[q]``) are
        planned; vector rows are ignored.
    policy : RankPolicy, optional
        Default ``RankPolicy()``: the energy 0.9 rank of each module, capped at its noise floor.
    sweep : SweepResult, dict, str or PathLike, optional
        A truncation sweep (``spectra sweep``) of the same pair; needed by ``policy.functional``.
        Each module swept takes the functional rank of its own role curve, that of its stack
        and role (a vision tower's q_proj that of "vision q", never the language model's
        "q"), else of the model-wide curve. A module whose curve the sweep's eval data never
        reached (``unreached``: e.g. a vision tower swept on text) takes the rank the policy's
        spectral rule gives it (its energy rank, τ = ``policy.energy`` or 0.9, with ``knee`` and
        the ``noise`` cap as asked), its reason saying so: never 0 read off a flat curve.
    model_config : dict, optional
        The model's ``config.json`` (default: the one beside the analysed base, when local). Where the class it
        names holds experts in fused 3-D parameters (transformers-5 Mixtral's ``mlp.experts.gate_up_proj``), which
        PEFT adapts at one rank for all experts, every expert of one projection gets one rank and its cost is the
        parameter's (see Notes).
    models : MetaModels, optional
        Builds that class on the meta device (default: built here, where a planned module is an expert's); pass
        the one :func:`~spectra.ranks.save_plan` and the memory estimate get too, and they share the model.

    Returns
    -------
    RankPlan

    Notes
    -----
    Order of decisions per module (the last binding one is its ``reason``):
    target (``rank`` | ``uniform`` | max of ``energy``/``knee``) → ``noise`` cap (targets only)
    → ``min_rank``/``max_rank``/full rank → power-of-two rounding → budget (greedy,
    :func:`allocate_budget`, maximising the total captured Σσᵢ² of all targeted modules, i.e.
    minimising the summed Eckart–Young error Σ_m ‖ΔW_m − ΔW_m,r‖_F²).

    Fused experts. PEFT's LoRA on a parameter of shape (E, d1, d2) is A (r·E, d_in), B (d_out, r·E): one rank r
    for all E experts, r·E·(d1 + d2) parameters, and B spans the parameter's rows (Mixtral's gate_up_proj holds
    gate and up: r = r_gate + r_up, B block-diagonal). So each projection of such a parameter (all experts' w1)
    is one decision: its rank is the largest its experts' targets ask (each expert then meets its own), each
    rank costs E·(d1 + d2) (an expert the plan leaves out of the projection, an unchanged w3, is trained all the
    same: :class:`~spectra.ranks.plan.FusedParameter`'s ``padding``) and gains Σ over its experts of the σᵢ²
    captured. The budget then holds for what ``get_peft_model`` trains with the plan's ``peft_config``.

    Task heads. For a classifier (``…ForSequenceClassification``: task type ``SEQ_CLS``; ``TOKEN_CLS``,
    ``QUESTION_ANS``) PEFT trains the head in full whatever the config says (it adds ``classifier``/``score`` or
    ``qa_outputs`` to ``modules_to_save``). Those modules (:func:`~spectra.ranks.plan.task_modules`, on the model
    built on the meta device; with TUNED's class count where the config beside TUNED declares other classes than
    the base's, ``RankPlan.num_labels``) are ``RankPlan.modules_to_save``, their parameters in the total; a budget
    spends them first (a budget that does not cover them is refused; a byte budget charges each of their parameters
    :data:`~spectra.ranks.budget.SAVED_BYTES_PER_PARAM`, what ``spectra memory`` counts for a bf16 head, not
    ``bytes_per_param``: :func:`~spectra.ranks.budget.budget_parameters`), and a targeted module inside them is left
    out (PEFT puts no LoRA there).

    Modules PEFT refuses. A module PEFT puts no LoRA on (:func:`~spectra.checkpoints.targets.peft_refusal`: the
    ``out_proj`` and ``conv1d`` of a Mamba-based model, by PEFT's own rule; a grouped convolution) is left out, its
    reason quoting the rule; where nothing else is targeted, the plan is refused naming them.
    """
    policy = policy or RankPolicy()
    models = models or MetaModels()  # one build for the steps below (what PEFT refuses, the experts, the head)
    if policy.functional is not None and sweep is None:
        raise ConfigError("RankPolicy.functional needs a truncation sweep: recommend_ranks(..., sweep=…) "
                          "(run `spectra sweep BASE TUNED --data EVAL` first).")
    functional, curve_of, spectral = None, {}, None
    if policy.functional is not None:
        sweep = read_sweep(sweep)
        curve_of = role_curves(sweep.get("modules") or [])  # module -> its role curve in the sweep: "q", "vision q"
        functional = functional_ranks(sweep, policy.functional, curve_of=curve_of)
        spectral = _spectral_policy(policy)  # for the modules of a curve the sweep's data never reached
    rows, base, tuned, analysed = _rows(analysis)  # a row of an older file with its stack (_rows)
    if functional is not None:
        _check_sweep_pair(functional["sweep"], base, tuned)
    # a stack the analysis lacks entirely is refused, naming those it holds (the others' left out say why)
    try:
        lacking = missing_stacks(policy.stacks, {r.get("stack") for r in rows if r.get("kind", "matrix") == "matrix"})
    except ConfigError as err:
        if analysed.get("stacks"):  # the analysis chose its stacks: the model may well hold the others
            raise ConfigError(f"{err} The analysis was made with --stacks {','.join(analysed['stacks'])}, so it left "
                              "the others out: analyse them (spectra analyze … --stacks) to plan them.") from None
        raise
    if lacking:  # some of the stacks asked for: the plan holds the others'
        warnings.warn(f"{lacking}: the plan holds no module of it", stacklevel=2)
    spectra, left_out, bare = [], [], []
    # ‖ΔW‖_F² of the whole update, as the plan's coverage counts it: every analysed matrix, a fused tensor once
    whole = math.fsum(float(r.get("fro_norm") or 0.0) ** 2 for r in rows
                      if r.get("kind", "matrix") == "matrix" and not _is_split(r))
    for row in rows:
        if row.get("kind", "matrix") != "matrix" or _is_split(row):
            continue
        s = _spectrum(row)
        why = _excluded(s, policy)
        if why is None and s.fro2 <= 0:
            why = "unchanged (ΔW = 0)"
        if why is None and _bare_parameter(row):
            why = _bare_reason(s.fro2 / whole)
            bare.append(f"{s.name} ({s.role})")
        if why is not None:
            needed = s.energy_rank(policy.energy or DEFAULT_ENERGY)[0] if s.fro2 > 0 else 0
            left_out.append(LeftOut(s.name, why, needed, math.sqrt(s.fro2)))
        else:
            spectra.append(s)
    refused = _refused_by_peft(spectra, base, model_config, models)  # name -> why PEFT puts no LoRA there
    for s in spectra:
        if s.name in refused:
            left_out.append(LeftOut(s.name, refused[s.name], s.energy_rank(policy.energy or DEFAULT_ENERGY)[0],
                                    math.sqrt(s.fro2)))
    spectra = [s for s in spectra if s.name not in refused]
    # a classifier's head, which PEFT trains in full: with TUNED's class count where its config declares another
    saved, num_labels = _saved_by_peft(base, tuned, model_config, models)
    if saved:
        spectra = _outside_saved(spectra, saved, left_out, policy, base, model_config, models)
    if not spectra and refused:
        first = next(iter(refused))
        raise ConfigError(f"No targeted module can take a LoRA: {', '.join(list(refused)[:5])}"
                          f"{' …' if len(refused) > 5 else ''}: {refused[first]}. Name other roles to plan other "
                          "modules (" + (f"now roles={','.join(policy.roles)}; " if policy.roles is not None else "")
                          + "`spectra pairs BASE TUNED` lists each module's role).")
    if not spectra and bare:
        raise ConfigError(f"No targeted module can take a LoRA: {', '.join(bare[:5])} "
                          f"{'is' if len(bare) == 1 else 'are'} {bare_parameters_why(len(bare))}; "
                          f"copy {'it' if len(bare) == 1 else 'them'} from TUNED onto the loaded model. To plan "
                          "layers, name their roles too (roles="
                          f"{','.join(policy.roles) if policy.roles is not None else 'the default'}).")
    unchanged = sum(m.reason == "unchanged (ΔW = 0)" for m in left_out)
    if not spectra and unchanged and all(float(r.get("fro_norm") or 0.0) == 0.0 for r in rows
                                         if r.get("kind", "matrix") == "matrix"):
        raise ConfigError(f"Every ΔW of the analysis is 0: all {len(left_out)} modules are unchanged, so there is "
                          "no update to plan. Check that TUNED is the fine-tune (the same checkpoint twice?).")
    if not spectra and unchanged:
        chosen = ", ".join(f"{field}={','.join(value) if isinstance(value, tuple) else value}" for field, value in (("roles", policy.roles), ("stacks", policy.stacks),
                                                                     ("include", policy.include)) if value is not None)
        raise ConfigError(f"The {unchanged} targeted module(s) are unchanged (ΔW = 0): no update to plan there; "
                          f"the others changed but are not targeted{f' ({chosen})' if chosen else ''}. Relax "
                          f"roles/{'stacks/' * (policy.stacks is not None)}include.")
    if not spectra:
        chosen = "; ".join(f"{field}={','.join(value) if isinstance(value, tuple) else value}"
                           for field, value in (("roles", policy.roles), ("stacks", policy.stacks),
                                                ("include", policy.include)) if value is not None)
        raise ConfigError(f"No module of the analysis is targeted ({len(left_out)} left out"
                          f"{f'; {chosen}' if chosen else ''}). Relax roles/{'stacks/' * (policy.stacks is not None)}"
                          "include.")
    uniform_rank = _uniform_rank(spectra, policy) if policy.uniform else None

    plan = []  # (spectrum, rank, reason, upper rank for the budget)
    for s in spectra:
        if functional is not None and functional["modules"] and s.name not in functional["modules"]:
            left_out.append(LeftOut(s.name, "not truncated by the sweep (taken whole from the fine-tune there)",
                                    None, math.sqrt(s.fro2)))
            continue
        unreached = None  # with a functional policy: the curve the sweep's data never reached, named
        if functional is None:
            rank, reason = _target(s, policy, uniform_rank)
        else:
            rank, reason, unreached = _functional_target(s, functional, curve_of.get(s.name, s.role), spectral)
        if rank == 0:
            why = ("not needed: the sweep at rank 0 is within ε" if functional and not unreached
                   else "no signal above the noise floor" + (f" ({unreached})" if unreached else ""))
            left_out.append(LeftOut(s.name, why, 0, math.sqrt(s.fro2)))
            continue
        rank, reason = _shape(s, rank, reason, policy)
        plan.append((s, rank, reason if unreached is None else f"{reason}; {unreached}"))
    unswept = [m.name for m in left_out if m.reason.startswith("not truncated by the sweep")]
    if not plan and functional is not None and len(unswept) == len(spectra):
        raise ConfigError(f"none of the {len(spectra)} targeted modules (e.g. {unswept[0]}) was truncated by the "
                          f"sweep (it truncated e.g. {next(iter(functional['modules']))}): was it run on another "
                          "model? Sweep and analysis must measure the same pair.")
    if not plan and functional is not None:
        raise ConfigError(f"The sweep is within ε={policy.functional} of the full fine-tune at rank 0 for every "
                          "targeted module: no adapter is needed at that tolerance (lower RankPolicy.functional).")
    if not plan:
        raise ConfigError("Every targeted module lies below its noise floor; nothing to plan (try noise=False).")

    items = _decisions(plan, _expert_parameters([s.name for s, _, _ in plan], base, model_config, models))
    budget_gap = None
    head = sum(m.params for m in saved)
    # a byte budget charges the head what spectra memory counts for it (a bf16 copy, gradient and AdamW moments)
    budget = budget_parameters(policy.budget_params, policy.budget_bytes, policy.bytes_per_param, head)
    cost = sum(item.upper * item.unit for item in items) + _fixed_cost([s for s, _, _ in plan], policy) + head
    if budget is not None and budget <= head:
        given, needed = ((f"RankPolicy.budget_bytes, {policy.budget_bytes:,} bytes",
                          f"{SAVED_BYTES_PER_PARAM * head:,} bytes (its bf16 copy, gradient and AdamW moments)")
                         if policy.budget_bytes is not None else
                         (f"RankPolicy.budget, {budget:,} parameters", f"{head:,} parameters"))
        raise ConfigError(f"The budget ({given}) does not cover "
                          f"{' and '.join(m.name for m in saved)}, which PEFT trains in full for task_type "
                          f"{saved[0].task_type} ({head:,} parameters: get_peft_model adds it to modules_to_save), "
                          f"and leaves nothing for LoRA. Raise the budget above {needed}.")
    if budget is not None and (cost > budget or (policy.energy is None and not policy.knee
                                                 and policy.rank is None and not policy.uniform)):
        ranks, budget_gap = _apply_budget(items, policy, budget, head)
    else:
        ranks = [item.upper for item in items]

    modules, fused = [], {}  # fused: parameter -> (shape, its rank: Σ over its projections, planned params)
    # each rank as the number it is: one capped at the command line's --max-rank +2 is 2, not the option's text
    for item, r in zip(items, map(int, ranks)):
        per_rank = sum(item.shape[1:]) if item.parameter else None  # a fused expert: (d1 + d2) of its parameter
        for s, reason in item.members:
            modules.append(ModuleRank(name=s.name, role=s.role, layer=s.layer, shape=s.shape, rank=r,
                                      alpha=policy.alpha_for(r), energy=s.energy(r)[0], energy_upper=s.energy(r)[1],
                                      params=r * (per_rank or sum(s.shape)), reason=reason if r == item.upper
                                      else "budget", conv1d=s.conv1d, fro_norm=math.sqrt(s.fro2)))
        if item.parameter:
            _, rank, planned = fused.get(item.parameter, (item.shape, 0, 0))
            fused[item.parameter] = (item.shape, rank + r, planned + r * per_rank * len(item.members))
    order = {s.name: i for i, (s, _, _) in enumerate(plan)}
    modules.sort(key=lambda m: order[m.name])
    records = tuple(FusedParameter(name, shape, rank, rank * shape[0] * (shape[1] + shape[2]),
                                   rank * shape[0] * (shape[1] + shape[2]) - planned)
                    for name, (shape, rank, planned) in fused.items())
    return RankPlan(modules=tuple(modules), left_out=tuple(left_out), policy=policy, base=base,
                    budget_gap=budget_gap, functional=functional, fused=records, modules_to_save=saved,
                    num_labels=num_labels)


def _refused_by_peft(spectra: list[_Spectrum], base: Mapping | None, model_config: Mapping | None,
                     models: MetaModels | None) -> dict[str, str]:
    """Targeted module → why PEFT puts no LoRA on it (:func:`~spectra.checkpoints.targets.peft_refusal`: a Mamba
    mixer's ``out_proj`` and ``conv1d``, a grouped convolution), on the class ``model_config`` (default: the config
    beside the analysed base) names, built on the meta device (by ``models`` where given); by PEFT's Mamba rule alone
    where the class cannot be built, nothing without a config (no model type to tell)."""
    from spectra.checkpoints.targets import meta_model, model_targets, peft_refusal
    from spectra.ranks.plan import base_config

    config = model_config if model_config is not None else base_config(base)
    if not spectra or not config:
        return {}
    model = (models or meta_model)(config)
    modules = dict(model.named_modules()) if model is not None else {}
    found = model_targets([s.name for s in spectra], model) if model is not None else {}
    refused = {}
    for s in spectra:
        target = found.get(s.name)
        module = modules.get(target.name) if target is not None and not target.parameter else None
        why = peft_refusal(target.name if module is not None else s.name, config.get("model_type"), module)
        if why is not None:
            refused[s.name] = why
    return refused


def _saved_by_peft(base: Mapping | None, tuned: Mapping | None, model_config: Mapping | None,
                   models: MetaModels | None) -> tuple[tuple[SavedModule, ...], int | None]:
    """(the modules PEFT trains in full for the task type of the class ``model_config`` names (default: the config
    beside the analysed base), the class count they are counted with where not that config's: TUNED's, None).

    :func:`~spectra.ranks.plan.task_modules` on that class, built on the meta device (by ``models`` where given)
    only for a task type that has such modules (a classifier's); empty otherwise. Where the config beside the
    analysed TUNED declares other classes (:func:`~spectra.ranks.plan.tuned_labels`: a classifier fine-tuned from
    2 classes into 3), the class is built with TUNED's count: the head PEFT trains and saves is that one."""
    from spectra.checkpoints.targets import meta_model, peft_task_type, with_labels
    from spectra.ranks.plan import base_config, task_modules, tuned_labels

    config = model_config if model_config is not None else base_config(base)
    task = peft_task_type(config)
    if task not in PEFT_TASK_MODULES:
        return (), None
    num_labels = tuned_labels(config, base_config(tuned))
    return task_modules((models or meta_model)(with_labels(config, num_labels)), task), num_labels


def _outside_saved(spectra: list[_Spectrum], saved: tuple[SavedModule, ...], left_out: list[LeftOut],
                   policy: RankPolicy, base: Mapping | None, model_config: Mapping | None,
                   models: MetaModels | None) -> list[_Spectrum]:
    """The targeted modules outside those PEFT trains in full; those inside (``--roles head`` on a classifier: PEFT
    puts no LoRA there, it trains the whole head) go to ``left_out``, saying so, and a module left out already
    (the head's role, unchanged) that lies inside one says PEFT trains it all the same."""
    from spectra.checkpoints.targets import meta_model, model_targets
    from spectra.ranks.plan import base_config

    config = model_config if model_config is not None else base_config(base)
    found = model_targets([s.name for s in spectra] + [m.name for m in left_out], (models or meta_model)(config))

    by_name = {m.name: m for m in saved}

    def holder(name: str) -> SavedModule | None:
        target = found[name].name if found[name] is not None else name
        held = inside_saved([target], by_name).get(target)
        return by_name[held] if held is not None else None

    def trained(m: SavedModule) -> str:
        return f"in {m.name}, which PEFT trains in full for task_type {m.task_type} (modules_to_save)"

    for i, m in enumerate(left_out):
        if (held := holder(m.name)) is not None:
            left_out[i] = dataclasses.replace(m, reason=f"{m.reason}; {trained(held)}")
    kept = []
    for s in spectra:
        if (held := holder(s.name)) is None:
            kept.append(s)
            continue
        left_out.append(LeftOut(s.name, f"{trained(held)}: no LoRA there",
                                s.energy_rank(policy.energy or DEFAULT_ENERGY)[0], math.sqrt(s.fro2)))
    return kept


def _bare_parameter(row: Mapping) -> bool:
    """Whether a matrix row's tensor is a parameter of its own, no layer's weight (:func:`is_bare_parameter`), read off
    the row's ``base_tensor`` and ``expert``."""
    return is_bare_parameter(row.get("base_tensor"), expert=row.get("expert"))


def _bare_reason(share: float) -> str:
    """The left-out reason of a :func:`_bare_parameter` matrix holding ``share`` of the whole update's ‖ΔW‖_F²."""
    return (f"{bare_parameters_why(1)}: copy it from TUNED onto the loaded model; it holds {share:.1%} of the whole "
            "update's ‖ΔW‖_F²")


def _excluded(s: _Spectrum, policy: RankPolicy) -> str | None:
    if policy.roles is not None:
        if not role_selected(s.role, policy.roles, s.name):
            return f"role {s.role!r} not in roles"
    elif s.role in _DEFAULT_SKIPPED_ROLES:
        return f"role {s.role!r} (embeddings/heads are targeted only when named in roles)"
    elif s.role == "other" and _ROUTER.search(s.name):
        return "an MoE router (role 'other'), targeted only when roles name other (--roles …,other)"
    if not stack_selected(s.stack, policy.stacks):
        return f"stack {stack_name(s.stack)!r} not in stacks"
    if policy.include is not None:
        pattern = policy.include
        ok = re.search(pattern[3:], s.name) if pattern.startswith("re:") else fnmatch.fnmatchcase(s.name, pattern)
        if not ok:
            return f"name does not match include={pattern!r}"
    return None


def _uniform_rank(spectra: list[_Spectrum], policy: RankPolicy) -> int:
    """Smallest power of two capturing τ on ≥ uniform_share of modules (unknown energy counts as a miss)."""
    tau = policy.energy or DEFAULT_ENERGY
    need = math.ceil(policy.uniform_share * len(spectra) - 1e-9)
    cap = max(s.full_rank for s in spectra)
    if policy.max_rank is not None:
        cap = min(cap, policy.max_rank)
    r = 1
    while True:
        met = sum(s.energy(min(r, s.full_rank))[0] >= tau * (1 - 1e-12) for s in spectra)
        if met >= need or 2 * r > cap:
            return r
        r *= 2


def _target(s: _Spectrum, policy: RankPolicy, uniform_rank: int | None) -> tuple[int, str]:
    if policy.rank is not None:
        if policy.rank > s.full_rank:
            raise ConfigError(f"rank={policy.rank} exceeds min(d_in, d_out) = {s.full_rank} of {s.name} "
                              f"({s.shape[0]}×{s.shape[1]}); lower it or use max_rank instead.")
        return policy.rank, "rank"
    if uniform_rank is not None:
        return min(uniform_rank, s.full_rank), "uniform" if uniform_rank <= s.full_rank else "full rank"
    candidates = []
    if policy.energy is not None:
        r, inexact = s.energy_rank(policy.energy)
        candidates.append((r, f"energy≥{policy.energy:g}" + ("" if inexact is None else f" ({inexact})")))
    if policy.knee:
        candidates.append((s.knee(), "knee"))
    if not candidates:  # budget alone: the budget decides up to the cap
        rank, reason = s.known if s.known else s.full_rank, "spectrum known"
    else:
        rank, reason = max(candidates, key=lambda c: c[0])
    if policy.noise and s.noise_rank is not None and s.noise_rank < rank:
        rank, reason = s.noise_rank, "noise floor"
    return rank, reason


def _spectral_policy(policy: RankPolicy) -> RankPolicy:
    """What a functional ``policy`` plans a module by where the sweep gives it no rank (its curve never reached by
    the sweep's data): its spectral rule (:func:`_target`), with energy τ = ``policy.energy``, or recommend's
    default unless ``knee`` alone is asked."""
    energy = policy.energy if policy.energy is not None or policy.knee else DEFAULT_ENERGY
    return dataclasses.replace(policy, energy=energy, functional=None)


def _functional_target(s: _Spectrum, functional: dict, curve: str | None, spectral: RankPolicy
                       ) -> tuple[int, str, str | None]:
    """The swept rank of the module's role curve (else the model curve); full rank when none was within ε.

    ``curve`` is the module's role curve in the sweep (:func:`~spectra.ranks.functional.role_curves`): its own
    stack's and role's, "vision q" for a vision tower's q_proj beside the language model's "q"; its role for a sweep
    that recorded no modules (one written before it did, whose role curves span every stack).

    A curve the sweep's eval data never reached has no functional rank: the module takes the rank of the policy's
    spectral rule, ``spectral`` (:func:`_spectral_policy`), and the third value names the curve ("the sweep's data
    never reached role vision q"); None otherwise.
    """
    groups = functional["groups"]
    group = curve if curve in groups else "model"
    if group not in groups:
        raise ConfigError(f"the sweep has no curve for {s.name} (role {s.role!r}) and no model-wide curve; sweep "
                          "with groups='model' or include this role.")
    label = "role " + group if group != "model" else "model"
    if groups[group].get("unreached"):
        rank, reason = _target(s, spectral, None)
        return rank, reason, f"the sweep's data never reached {label}"
    rank = groups[group]["rank"]
    where = f"functional≤{functional['epsilon']:g} ({label})"
    if rank is None:
        return s.full_rank, where + ": no swept rank within ε", None
    return min(rank, s.full_rank), where, None


def _shape(s: _Spectrum, rank: int, reason: str, policy: RankPolicy) -> tuple[int, str]:
    """Apply min/max/full rank and power-of-two rounding."""
    cap = s.full_rank if policy.max_rank is None else min(policy.max_rank, s.full_rank)
    if rank < policy.min_rank:
        rank, reason = policy.min_rank, "min_rank"
    if rank > cap:
        rank, reason = cap, "full rank" if cap == s.full_rank else "max_rank"
    if policy.power_of_two and rank & (rank - 1):
        up = 1 << rank.bit_length()
        rank, reason = (up, "power of two") if up <= cap else (1 << (cap.bit_length() - 1), "power of two")
    return rank, reason


def _fixed_cost(spectra: list[_Spectrum], policy: RankPolicy) -> int:
    return dora_magnitudes(spectra) if policy.use_dora else 0


@dataclass(frozen=True)
class _Decision:
    """One rank decision: a module, or one projection of every expert a fused parameter holds (all at one rank)."""

    members: tuple[tuple[_Spectrum, str], ...]  # (spectrum, reason at `upper`)
    upper: int                                  # the rank the policy asks (the budget may lower it)
    unit: int                                   # parameters per rank: d_in + d_out, or E·(d1 + d2) of the parameter
    parameter: str | None = None                # the fused parameter, or None for a module
    shape: tuple[int, int, int] | None = None   # the parameter's (experts, d1, d2)

    def gain(self, rank: int) -> float:
        """Σ σᵢ² captured at ``rank`` over the members; beyond the known values only the known part counts."""
        return sum(float(s.cum[min(rank, s.known)]) for s, _ in self.members)


def _expert_parameters(names: list[str], base: Mapping | None, model_config: Mapping | None,
                       models: MetaModels | None = None) -> dict:
    """:func:`~spectra.ranks.plan.expert_parameters` on the class ``model_config`` (default: the config beside the
    analysed base) names, built on the meta device (by ``models`` where given); empty when no name is an expert's or
    there is no such class."""
    if not any(expert_projection(name) for name in names):
        return {}
    from spectra.checkpoints.targets import meta_model
    from spectra.ranks.plan import base_config, expert_parameters

    config = model_config if model_config is not None else base_config(base)
    return expert_parameters(names, (models or meta_model)(config))


def _decisions(plan: list, experts: Mapping[str, tuple[str, tuple[int, int, int]]]) -> list[_Decision]:
    """The plan's (spectrum, rank, reason) as rank decisions: one per module, one per projection of a fused parameter
    (``experts``: name → (parameter, shape)), in the plan's order."""
    out, projections = [], {}  # a projection's place in `out` is its key (…experts.w1) until its members are known
    for s, rank, reason in plan:
        if s.name in experts:
            key = expert_projection(s.name)
            if key not in projections:
                projections[key] = []
                out.append(key)
            projections[key].append((s, rank, reason))
        else:
            out.append(_Decision(((s, reason),), rank, sum(s.shape)))
    return [_projection(projections[d], *experts[projections[d][0][0].name]) if isinstance(d, str) else d
            for d in out]


def _projection(members: list, parameter: str, shape: tuple[int, int, int]) -> _Decision:
    """One projection of the experts in ``parameter`` (E, d1, d2): at the largest rank its experts ask, so each meets
    its own target (capped at their full rank), each rank costing E·(d1 + d2)."""
    largest = max(r for _, r, _ in members)
    upper = min(largest, min(s.full_rank for s, _, _ in members))
    top = next(reason for _, r, reason in members if r == largest)
    shared = f"{top}; one rank for all experts of {parameter}"
    return _Decision(tuple((s, reason if r == upper else shared) for s, r, reason in members), upper,
                     shape[0] * (shape[1] + shape[2]), parameter, shape)


def _cost_in_bytes(cost: int, *, saved: int, per: float) -> str:
    """A plan of `cost` parameters, `saved` of them trained in full (SAVED_BYTES_PER_PARAM each), in bytes too."""
    return f"{cost:,} parameters, {math.ceil(SAVED_BYTES_PER_PARAM * saved + per * (cost - saved)):,} bytes"


def _apply_budget(items: list[_Decision], policy: RankPolicy, budget: int, saved: int = 0) -> tuple[list[int], float]:
    """Ranks within ``budget`` and the gap bound; ``saved``: the parameters PEFT trains in full (a classifier's
    head), spent before any rank, beside DoRA's magnitudes."""
    ladders, gains, costs = [], [], []
    for item in items:
        upper = item.upper
        lo = min(policy.min_rank, upper)
        if policy.power_of_two:
            ladder = [lo] + [1 << i for i in range(lo.bit_length(), upper.bit_length()) if (1 << i) <= upper]
            if ladder[-1] != upper:
                ladder.append(upper)
        else:
            ladder = list(range(lo, upper + 1))
        ladders.append(ladder)
        gains.append([item.gain(r) for r in ladder])  # captured Σσᵢ² at each rung
        costs.append(item.unit)
    spectra = [s for item in items for s, _ in item.members]
    dora = _fixed_cost(spectra, policy)
    parts = ([f"{dora:,} DoRA magnitudes"] if dora else []) + ([f"{saved:,} the head PEFT trains in full"]
                                                               if saved else [])
    # a byte budget is refused in the bytes given, not only the parameters they buy (budget_parameters: the saved
    # head's at SAVED_BYTES_PER_PARAM, the rest at bytes_per_param), and the cheapest plan in bytes too
    label = cost_label = None
    if policy.budget_bytes is not None:
        per = policy.bytes_per_param
        # (a budget that does not cover the saved head was refused before, by `budget <= head` in recommend_ranks)
        label = (f"{policy.budget_bytes:,} bytes ({budget:,} parameters at {per:g} bytes each)" if not saved else
                 f"{policy.budget_bytes:,} bytes ({saved:,} saved parameters at {SAVED_BYTES_PER_PARAM:g} bytes each "
                 f"and {budget - saved:,} LoRA parameters at {per:g} bytes each)")
        cost_label = functools.partial(_cost_in_bytes, saved=saved, per=per)
    result = allocate_budget(ladders, gains, costs, budget, fixed_cost=dora + saved,
                             fixed_label="fixed: " + " and ".join(parts) if parts else "fixed", budget_label=label,
                             cost_label=cost_label)
    total = sum(s.fro2 for s in spectra)
    return list(result.ranks), (result.gap / total if total > 0 else 0.0)
