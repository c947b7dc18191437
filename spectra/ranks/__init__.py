"""From measured spectra to a LoRA plan: per-module ranks and alphas, under an optional budget.

``recommend_ranks(analysis, policy)`` reads the per-module spectra of an analysis (the rows
of ``analysis.json``), applies a :class:`RankPolicy` and returns a :class:`RankPlan`: for every
targeted module its rank, its ``lora_alpha``, the share of ‖ΔW‖_F² that rank captures, the
parameters it costs and *which policy bound it*. ``RankPlan.to_peft_config`` turns the plan into
a PEFT ``LoraConfig`` dict whose ``rank_pattern``/``alpha_pattern`` keys each match exactly one
module.

Conventions (see DESIGN.md): ΔW is oriented ``(out, in)``; a rank-r LoRA costs ``r·(in + out)``
parameters (``A`` is ``(r, in)``, ``B`` is ``(out, r)``) and, by Eckart–Young, captures at most
``Σ_{i≤r} σᵢ² / ‖ΔW‖_F²`` of the update's energy.

Modules: :mod:`~spectra.ranks.policy` (what decides a rank), :mod:`~spectra.ranks.recommend`
(analysis rows → plan), :mod:`~spectra.ranks.budget` (the allocation under a budget),
:mod:`~spectra.ranks.plan` (the plan, its PEFT config and file) and
:mod:`~spectra.ranks.functional` (ranks from truncation sweeps); each cites its sources.
"""

from spectra.ranks.budget import Allocation, allocate_budget
from spectra.ranks.functional import functional_ranks, read_sweep
from spectra.ranks.plan import (PLAN_SCHEMA_VERSION, LeftOut, ModuleRank, RankPlan, check_peft_config,
                                check_peft_conversion, load_plan, lora_config, plan_document,
                                save_plan)
from spectra.ranks.policy import RankPolicy, parse_budget
from spectra.ranks.recommend import recommend_ranks

__all__ = ["Allocation", "LeftOut", "ModuleRank", "PLAN_SCHEMA_VERSION", "RankPlan", "RankPolicy", "allocate_budget",
           "check_peft_config", "check_peft_conversion", "functional_ranks", "load_plan", "lora_config", "parse_budget",
           "plan_document", "read_sweep", "recommend_ranks", "save_plan"]
