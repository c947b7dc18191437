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

References
----------
.. [1] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
.. [2] Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.
.. [3] Gavish & Donoho, "The Optimal Hard Threshold for Singular Values is 4/√3", arXiv:1305.5870.
.. [4] Satopää et al., "Finding a 'Kneedle' in a Haystack", ICDCS workshops 2011.
.. [5] Dantzig, "Discrete-variable extremum problems", Operations Research 5 (1957).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from spectra.errors import ConfigError

PLAN_SCHEMA_VERSION = 1
_ALPHA_RULES = ("scale", "constant")
# roles a LoRA on linear layers does not target unless asked: embeddings need PEFT's embedding
# LoRA and the head is often tied to them.
_DEFAULT_SKIPPED_ROLES = ("embed", "head")


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RankPolicy:
    """How to turn spectra into ranks. Policies combine; every choice is recorded in the plan.

    Per-module *targets* (``energy``, ``knee``) give the rank a module needs; when both are set
    the larger wins, so each is met. ``rank`` and ``uniform`` instead give every module one rank.
    ``noise`` caps targets at the signal rank. ``min_rank``/``max_rank``/``power_of_two`` then
    shape the ranks, and a budget (``budget_params`` or ``budget_bytes``) finally trims the plan
    by the greedy allocation of :func:`allocate_budget`, using the ranks above as per-module caps
    (pass ``energy=None`` to let the budget alone decide).

    Parameters
    ----------
    energy : float or None
        τ in (0, 1]: per module, the smallest rank with Σ_{i≤r} σᵢ² ≥ τ‖ΔW‖_F². Default 0.9,
        the usual "most of the update" target.
    noise : bool
        Cap each target at the number of singular values above the noise floor
        (``noise.rank_above``, else the Gavish–Donoho rank [3]_): rank below the floor is
        rounding noise, not signal. Default True. Modules with no signal are left out.
    knee : bool
        Also target the elbow of the cumulative-energy curve (Kneedle [4]_). Default False.
    uniform : bool
        One rank for all modules: the smallest power of two that captures ``energy`` (0.9 if
        unset) on at least ``uniform_share`` of them, what most configurations do. Default False.
    uniform_share : float
        Share of modules the uniform rank must satisfy. Default 0.9 (a few outliers may miss).
    rank : int or None
        A fixed rank for every module (``--rank``). Default None.
    budget_params, budget_bytes : int or None
        Global budget in trainable parameters, or in bytes of trainable state
        (``bytes_per_param`` each). At most one. Default None (no budget).
    bytes_per_param : float
        Bytes per trainable parameter for ``budget_bytes``. Default 16: PEFT keeps adapter weights
        in fp32 (4) with fp32 gradients (4) and two fp32 AdamW moments (8).
    min_rank, max_rank : int, int or None
        Bounds on every module's rank. Defaults 1 (every targeted module gets an adapter) and
        None (bounded only by min(d_in, d_out)).
    power_of_two : bool
        Round ranks up to powers of two (under the bounds). Default False.
    roles : tuple of str or None
        Roles to target (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` …). Default None:
        every matrix except embeddings and heads.
    include : str or None
        Keep only module names matching this glob (or ``re:REGEX``). Default None (all).
    rslora : bool
        Scale updates by α/√r (rsLoRA [2]_) instead of α/r [1]_. Default False.
    use_dora : bool
        Train DoRA: adds a magnitude vector of d_out parameters per module. Default False.
    alpha_rule : {"scale", "constant"}
        ``"scale"``: α chosen per module so every module has the same scaling s = ``scale``
        (α = s·r, or s·√r with rsLoRA), i.e. the usual α = 2r convention. ``"constant"``: one α
        (``alpha``) for all, so s follows the chosen law (α/r, or the rank-stabilised α/√r).
        Default "scale".
    scale : float
        The common scaling s for ``alpha_rule="scale"``. Default 2.0 (α = 2r).
    alpha : float
        The common α for ``alpha_rule="constant"``. Default 16.0 (PEFT examples' value).
    functional : float or None
        ε in the sweep metric's units: each module gets the smallest swept rank whose truncation
        sweep metric lies within ε of the full fine-tune's (per role when the sweep has per-role
        curves, else one rank for the model); see :func:`functional_ranks`. Replaces the
        ``energy``/``knee`` targets and is not capped by ``noise`` (the function was measured at
        that rank). Needs ``recommend_ranks(..., sweep=...)``. Default None.
    """

    energy: float | None = 0.9
    noise: bool = True
    knee: bool = False
    uniform: bool = False
    uniform_share: float = 0.9
    rank: int | None = None
    budget_params: int | None = None
    budget_bytes: int | None = None
    bytes_per_param: float = 16.0
    min_rank: int = 1
    max_rank: int | None = None
    power_of_two: bool = False
    roles: tuple[str, ...] | None = None
    include: str | None = None
    rslora: bool = False
    use_dora: bool = False
    alpha_rule: str = "scale"
    scale: float = 2.0
    alpha: float = 16.0
    functional: float | None = None  # None: ranks from spectra alone; set it with a truncation sweep

    def __post_init__(self) -> None:
        if self.roles is not None:
            if isinstance(self.roles, str):
                object.__setattr__(self, "roles", tuple(r.strip() for r in self.roles.split(",") if r.strip()))
            else:
                object.__setattr__(self, "roles", tuple(self.roles))
            if not self.roles:
                raise ConfigError("RankPolicy.roles is empty: pass None for all roles, or e.g. ('q', 'v').")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"RankPolicy.energy must be in (0, 1], got {self.energy}.")
        if not 0.0 < self.uniform_share <= 1.0:
            raise ConfigError(f"RankPolicy.uniform_share must be in (0, 1], got {self.uniform_share}.")
        for name in ("rank", "budget_params", "budget_bytes", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"RankPolicy.{name} must be a positive integer or None, got {value!r}.")
        if not isinstance(self.min_rank, (int, np.integer)) or self.min_rank < 1:
            raise ConfigError(f"RankPolicy.min_rank must be an integer ≥ 1, got {self.min_rank!r}.")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ConfigError(f"RankPolicy.max_rank ({self.max_rank}) is below min_rank ({self.min_rank}).")
        if self.budget_params is not None and self.budget_bytes is not None:
            raise ConfigError("Give RankPolicy.budget_params or budget_bytes, not both.")
        if not self.bytes_per_param > 0:
            raise ConfigError(f"RankPolicy.bytes_per_param must be > 0, got {self.bytes_per_param}.")
        if self.rank is not None and self.uniform:
            raise ConfigError("RankPolicy.rank fixes the rank; it cannot be combined with uniform=True.")
        if self.power_of_two:
            for name in ("min_rank", "max_rank", "rank"):
                value = getattr(self, name)
                if value is not None and value & (value - 1):
                    raise ConfigError(f"RankPolicy.{name}={value} is not a power of two but power_of_two=True.")
        if self.alpha_rule not in _ALPHA_RULES:
            raise ConfigError(f"RankPolicy.alpha_rule must be one of {_ALPHA_RULES}, got {self.alpha_rule!r}.")
        if not (self.scale > 0 and self.alpha > 0):
            raise ConfigError(f"RankPolicy.scale and alpha must be > 0, got {self.scale}, {self.alpha}.")
        if self.include is not None and self.include.startswith("re:"):
            try:
                re.compile(self.include[3:])
            except re.error as err:
                raise ConfigError(f"RankPolicy.include {self.include!r} is not a valid regex: {err}.") from None
        if self.functional is not None and not (isinstance(self.functional, (int, float)) and self.functional >= 0):
            raise ConfigError(f"RankPolicy.functional must be a tolerance ≥ 0 in the sweep metric's units, "
                              f"got {self.functional!r}.")
        if self.functional is not None and (self.rank is not None or self.uniform):
            raise ConfigError("RankPolicy.functional picks the ranks; it cannot be combined with rank or uniform.")
        if (self.energy is None and not self.knee and self.rank is None and not self.uniform
                and self.budget is None and self.functional is None):
            raise ConfigError("RankPolicy selects no rank: set energy, knee, rank, uniform or a budget.")

    @property
    def budget(self) -> int | None:
        """The budget in trainable parameters (``budget_bytes // bytes_per_param``), or None."""
        if self.budget_bytes is not None:
            return int(self.budget_bytes // self.bytes_per_param)
        return self.budget_params

    def alpha_for(self, rank: int) -> float:
        """``lora_alpha`` for a module of this rank under ``alpha_rule`` (see the class docstring)."""
        if self.alpha_rule == "constant":
            return float(self.alpha)
        return float(self.scale * (math.sqrt(rank) if self.rslora else rank))

    def scaling(self, rank: int) -> float:
        """The update scale s of a module: α/r [1]_, or α/√r with rsLoRA [2]_."""
        return self.alpha_for(rank) / (math.sqrt(rank) if self.rslora else rank)


def parse_budget(text: str) -> dict[str, int]:
    """Parse a CLI budget: ``"20M"``/``"1.5e6"`` parameters, ``"2GB"``/``"512MiB"`` bytes.

    Returns ``{"budget_params": n}`` or ``{"budget_bytes": n}`` to pass to :class:`RankPolicy`.
    A bare ``B`` is refused as ambiguous (billion parameters or bytes?).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    params = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
    data = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "BYTES": 1}
    unit = m.group(2).upper() if m else None
    if m is None or (unit not in params and unit not in data) or unit == "B":
        raise ConfigError(f"Cannot read budget {text!r}: use parameters like 20M or 1.5e6, "
                          "or bytes like 2GB or 512MiB.")
    value = float(m.group(1))
    if unit in params:
        return {"budget_params": int(value * params[unit])}
    return {"budget_bytes": int(value * data[unit])}


# ---------------------------------------------------------------------------- spectra of one module


@dataclass(frozen=True)
class _Spectrum:
    """One matrix row of an analysis, reduced to what a rank decision needs."""

    name: str
    role: str | None
    layer: int | None
    shape: tuple[int, int]            # (out, in)
    conv1d: bool
    fro2: float                       # ‖ΔW‖_F², exact
    cum: np.ndarray                   # (k+1,) Σ_{i≤r} σᵢ², r = 0..k over the known values
    noise_rank: int | None

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

    def energy_rank(self, tau: float) -> tuple[int, bool]:
        """Smallest rank capturing τ of the energy, and whether it is exact (else a lower bound)."""
        target = tau * self.fro2 * (1 - 1e-12)
        hit = np.nonzero(self.cum >= target)[0]
        if hit.size:
            return max(int(hit[0]), 1), True
        k = self.known
        last = float(self.cum[k] - self.cum[k - 1]) if k else 0.0
        if last <= 0:
            return self.full_rank, False
        # each unknown σᵢ² ≤ σ_k², so at least this many more are needed
        more = math.ceil((target - self.cum[k]) / last)
        return min(k + more, self.full_rank), False

    def knee(self) -> int:
        """Elbow of the cumulative-energy curve over the known values (Kneedle [4]_).

        On the normalised curve x = i/k, y = E(i)/E(k), the knee is argmax_i (y_i − x_i).
        """
        k = self.known
        if k <= 1 or self.cum[k] <= 0:
            return 1
        i = np.arange(k + 1)
        return max(int(np.argmax(self.cum / self.cum[k] - i / k)), 1)


def _rows(analysis: Any) -> tuple[list[dict], dict | None, dict | None]:
    """Rows (as dicts) and the base and tuned descriptions of an analysis object, dict, file or directory."""
    if isinstance(analysis, (str, os.PathLike)):
        path = Path(analysis)
        if path.is_dir():
            path = path / "analysis.json"
        if not path.is_file():
            raise ConfigError(f"No analysis found at {path}: pass analysis.json or the directory holding it.")
        try:
            analysis = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-run `spectra analyze`.") from None
    if isinstance(analysis, Mapping):
        modules, base, tuned = analysis.get("modules"), analysis.get("base"), analysis.get("tuned")
    else:
        modules, base = getattr(analysis, "modules", None), getattr(analysis, "base", None)
        tuned = getattr(analysis, "tuned", None)
    if modules is None:
        raise ConfigError("The analysis has no 'modules' list: pass an AnalysisResult or analysis.json.")
    rows = [m if isinstance(m, Mapping) else
            (dataclasses.asdict(m) if dataclasses.is_dataclass(m) else vars(m)) for m in modules]
    described = []
    for info in (base, tuned):
        if info is not None and not isinstance(info, Mapping):
            info = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else vars(info)
        described.append(dict(info) if info is not None else None)
    return rows, described[0], described[1]


def _check_sweep_pair(sweep: Mapping, base: dict | None, tuned: dict | None) -> None:
    """Refuse a truncation sweep of another pair than the analysis's, where both can be told apart.

    Both record content fingerprints of their checkpoints, compared wherever the files now
    are (or for a hub id). A sweep written before it recorded them has only its paths:
    those are fingerprinted here when they still exist, and pass when they do not (the
    module-name check still runs).
    """
    from spectra.checkpoints.source import open_checkpoint

    recorded = sweep.get("fingerprints") or {}
    for side, path in (("base", sweep.get("base")), ("tuned", sweep.get("tuned"))):
        info = base if side == "base" else tuned
        expected = (info or {}).get("fingerprint")
        if not expected:
            continue
        found = recorded.get(side)
        if not found and path and Path(str(path)).exists():
            try:
                found = open_checkpoint(str(path)).fingerprint()["fingerprint"]
            except Exception:  # noqa: BLE001 - an unreadable path cannot be compared; the names check still runs
                found = None
        if found and found != expected:
            raise ConfigError(f"the truncation sweep was run with {side} {path}, whose content differs from the "
                              f"analysed {side} ({(info or {}).get('path', '?')}): sweep and analysis must measure "
                              "the same pair. Re-run `spectra sweep` on it.")


def _is_split(row: Mapping) -> bool:
    # "c_attn[q]" is one projection of a fused tensor; LoRA can only target the fused whole
    fused = row.get("fused_name")
    return row["name"].endswith("]") or (fused is not None and fused != row["name"])


def _spectrum(row: Mapping) -> _Spectrum:
    try:
        out_features, in_features = (int(d) for d in row["shape"])
        fro = float(row["fro_norm"])
        sv = np.asarray(row.get("singular_values") or [], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"Analysis row {row.get('name')!r} lacks shape/fro_norm/singular_values ({err}).") from None
    noise = row.get("noise") or {}
    noise_rank = noise.get("rank_above", row.get("gd_rank"))
    return _Spectrum(name=row["name"], role=row.get("role"), layer=row.get("layer"),
                     shape=(out_features, in_features), conv1d=bool(row.get("conv1d", False)),
                     fro2=fro * fro, cum=np.concatenate([[0.0], np.cumsum(sv * sv)]),
                     noise_rank=None if noise_rank is None else int(noise_rank))


# ---------------------------------------------------------------------------- functional ranks


def functional_ranks(sweep: Any, epsilon: float, *, non_target: str | None = None) -> dict:
    """Per curve of a truncation sweep, the smallest rank whose metric stays within ε of the full fine-tune.

    With ``gap(r)`` the metric's shortfall against the full fine-tune (``full − metric(r)`` when
    higher is better, ``metric(r) − full`` otherwise), the chosen rank is the smallest swept r
    with ``gap(r') ≤ ε`` for r and every larger swept r' (one lucky dip does not count). The
    sweep's noise is recorded beside it: eval examples, and the paired percentile-bootstrap
    interval of the gap; ``resolved`` is True when that whole interval lies within ε, i.e.
    the eval set is large enough to support the claim.

    Parameters
    ----------
    sweep : SweepResult, dict, str or PathLike
        ``sweep.json`` of ``spectra sweep``, its directory, its dict or the result object.
    epsilon : float
        Tolerance ≥ 0 in the metric's units (0.01 = one accuracy point).
    non_target : {"tuned", "base"}, optional
        Which curve to read when both were swept. Default: the sweep's first (``tuned``).

    Returns
    -------
    dict
        ``epsilon``, ``metric``, ``higher_is_better``, ``examples``, ``tuned`` (the full
        fine-tune's metric and interval), ``non_target``, ``bootstrap``, and ``groups``:
        curve (``model`` or a role) → ``rank`` (None when no swept rank qualifies),
        ``metric``, ``gap``, ``gap_interval``, ``resolved``, ``swept``.
    """
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ConfigError(f"functional ε must be a number ≥ 0 in the metric's units, got {epsilon!r}.")
    data = read_sweep(sweep)
    non_target = non_target or data["non_target"][0]
    if non_target not in data["non_target"]:
        raise ConfigError(f"non_target {non_target!r}: the sweep measured {data['non_target']} only.")
    curves: dict[str, list[dict]] = {}
    for p in data["points"]:
        if p["non_target"] == non_target and p["rank"] is not None:
            curves.setdefault(p["group"], []).append(p)
    if not curves:
        raise ConfigError("the sweep holds no rank points; sweep at least one rank.")
    groups = {}
    for group, points in curves.items():
        points = sorted(points, key=lambda p: p["rank"])
        chosen = None
        for p in reversed(points):  # from the top: the last rank before the curve leaves the ε band
            if p["gap"] > epsilon:
                break
            chosen = p
        entry = {"rank": None if chosen is None else chosen["rank"], "swept": [p["rank"] for p in points]}
        if chosen is not None:
            interval = chosen.get("gap_interval")
            entry.update(metric=chosen["metric"], gap=chosen["gap"], gap_interval=interval,
                         resolved=None if interval is None else bool(interval[1] <= epsilon))
        groups[group] = entry
    return {"epsilon": float(epsilon), "metric": data["metric"]["name"],
            "higher_is_better": data["metric"]["higher_is_better"], "examples": data["examples"],
            "unit": data.get("unit"), "tuned": {k: data["reference"]["tuned"].get(k) for k in ("metric", "interval")},
            "non_target": non_target, "bootstrap": data.get("bootstrap"), "truncation": data.get("truncation"),
            "sweep": {"base": data.get("base"), "tuned": data.get("tuned"), "data": data.get("data"),
                      "fingerprints": data.get("fingerprints")},
            "modules": [m["name"] for m in data.get("modules", [])], "groups": groups}


def read_sweep(sweep: Any) -> dict:
    """A truncation sweep as a dict, from the result object, its dict, ``sweep.json`` or its directory."""
    where = "the given sweep"
    if isinstance(sweep, (str, os.PathLike)):
        path = Path(sweep)
        path = path / "sweep.json" if path.is_dir() else path
        where = str(path)
        try:
            sweep = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read sweep {path}: {err}. Pass the directory `spectra sweep` wrote.") from None
    if hasattr(sweep, "to_dict"):
        sweep = sweep.to_dict()
    if not isinstance(sweep, Mapping) or sweep.get("kind") != "truncation_sweep":
        kind = sweep.get("kind") if isinstance(sweep, Mapping) else type(sweep).__name__
        raise ConfigError(f"{where} is not a truncation sweep (kind {kind!r}): pass the result of "
                          "truncation_sweep, or the sweep.json that `spectra sweep` wrote.")
    return dict(sweep)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ModuleRank:
    """One targeted module of a plan.

    ``energy`` is the captured share of ‖ΔW‖_F² (a lower bound when the rank exceeds the known
    singular values; ``energy_upper`` is then its upper bound). ``params = rank·(d_in + d_out)``.
    ``reason`` names the policy bound that set the rank.
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
        targeted ‖ΔW‖_F²) any plan within budget could capture (see :func:`allocate_budget`).
    functional : dict or None
        With ``RankPolicy.functional``: the sweep's choice per curve, with its noise (see
        :func:`functional_ranks`).
    """

    modules: tuple[ModuleRank, ...]
    left_out: tuple[LeftOut, ...] = ()
    policy: RankPolicy = field(default_factory=RankPolicy)
    base: dict | None = None
    budget_gap: float | None = None
    functional: dict | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.modules]
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise ConfigError(f"Plan names modules more than once: {dupes}.")

    @property
    def total_params(self) -> int:
        """Trainable LoRA parameters Σ r·(d_in + d_out), plus DoRA magnitudes Σ d_out if used."""
        extra = sum(m.shape[0] for m in self.modules) if self.policy.use_dora else 0
        return sum(m.params for m in self.modules) + extra

    @property
    def total_energy(self) -> float:
        """Captured share of the targeted modules' total energy Σ‖ΔW‖_F² (lower bound)."""
        total = sum(m.fro_norm ** 2 for m in self.modules)
        return sum(m.energy * m.fro_norm ** 2 for m in self.modules) / total if total > 0 else 1.0

    @property
    def mean_energy(self) -> float:
        """Mean over modules of the captured share (each module counted once)."""
        return float(np.mean([m.energy for m in self.modules])) if self.modules else 1.0

    def to_dict(self) -> dict:
        return {"schema_version": PLAN_SCHEMA_VERSION, "policy": dataclasses.asdict(self.policy),
                "base": self.base, "budget_gap": self.budget_gap,
                "totals": {"modules": len(self.modules), "params": self.total_params,
                           "energy": self.total_energy, "mean_energy": self.mean_energy},
                "modules": [dataclasses.asdict(m) for m in self.modules],
                "left_out": [dataclasses.asdict(m) for m in self.left_out], "functional": self.functional}

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
                   functional=data.get("functional"))

    def to_peft_config(self, *, module_names: Iterable[str] | None = None, task_type: str | None = "CAUSAL_LM",
                       lora_dropout: float = 0.0) -> dict:
        """A PEFT ``LoraConfig`` dict (what ``adapter_config.json`` holds) for this plan.

        ``r``/``lora_alpha`` are the most common rank and its α; every module that differs gets
        a ``rank_pattern``/``alpha_pattern`` entry. PEFT 0.21 looks a key up with
        ``re.match(rf"(.*\\.)?({key})$", module_name)`` (``peft.utils.other.get_pattern_key``),
        so a bare name matches as a *suffix* and its dots match any character; keys are written
        ``"^" + re.escape(name)``, which only the full name matches. ``target_modules`` lists
        full names (PEFT matches them exactly or as a ``.``-suffix).

        Parameters
        ----------
        module_names : iterable of str, optional
            Module names of the base model as PEFT sees them (``model.named_modules()``). Plan
            names are resolved to them (exact, or the one name differing by a leading prefix
            such as ``bert.``), and the result is checked with :func:`check_peft_config`.
        task_type : str or None
            PEFT task type. Default ``"CAUSAL_LM"``.
        lora_dropout : float
            Dropout on the LoRA input. Default 0.0 (none: keeps the update deterministic).
        """
        if not self.modules:
            raise ConfigError("The plan targets no module; relax the policy (roles, noise, energy).")
        names = {m.name: m.name for m in self.modules}
        if module_names is not None:
            module_names = list(module_names)
            names = _resolve_names(list(names), module_names)
        config = lora_config({names[m.name]: (m.rank, m.alpha, m.conv1d) for m in self.modules},
                             alpha_for=self.policy.alpha_for, use_rslora=self.policy.rslora,
                             use_dora=self.policy.use_dora, task_type=task_type, lora_dropout=lora_dropout)
        if module_names is not None:
            check_peft_config(config, module_names)
        return config


def lora_config(modules: Mapping[str, tuple[int, float, bool]], *, alpha_for=None, use_rslora: bool = False,
                use_dora: bool = False, task_type: str | None = None, lora_dropout: float = 0.0) -> dict:
    """A PEFT ``LoraConfig`` dict for per-module ``name → (rank, alpha, conv1d)``.

    ``r`` is the most common rank (ties: the smallest) and ``lora_alpha`` is ``alpha_for(r)``
    (default: the most common α among modules of rank ``r``); every module that differs gets
    a ``rank_pattern``/``alpha_pattern`` key anchored with ``^`` so that PEFT's suffix-regex
    match (``get_pattern_key``) hits only that module. ``fan_in_fan_out`` is set when any
    module is a Conv1D.
    """
    counts = Counter(rank for rank, _, _ in modules.values())
    r = max(counts, key=lambda k: (counts[k], -k))
    if alpha_for is None:
        alphas = Counter(a for rank, a, _ in modules.values() if rank == r)
        alpha = max(alphas, key=lambda a: alphas[a])
    else:
        alpha = alpha_for(r)
    return {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {_anchor(n): rank for n, (rank, _, _) in modules.items() if rank != r},
        "alpha_pattern": {_anchor(n): a for n, (_, a, _) in modules.items() if a != alpha},
        "use_rslora": use_rslora, "use_dora": use_dora,
        "fan_in_fan_out": any(conv1d for _, _, conv1d in modules.values()),
        "lora_dropout": lora_dropout, "bias": "none",
    }


def _anchor(name: str) -> str:
    return "^" + re.escape(name)


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


def check_peft_config(config: Mapping, module_names: Iterable[str]) -> dict[str, str]:
    """Check that a LoraConfig dict targets exactly what it says, as PEFT 0.21 would match it.

    Every ``target_modules`` entry, ``rank_pattern`` key and ``alpha_pattern`` key must match
    exactly one module name, pattern keys only targeted modules, and no module may be matched
    by two keys (PEFT would silently use the first). Matching follows PEFT:
    ``check_target_module_exists`` (name equal to an entry or ending in ``"." + entry``) and
    ``get_pattern_key`` (``re.match(rf"(.*\\.)?({key})$", name)``).

    Returns
    -------
    dict
        Each key and target entry → the module name it matches.

    Raises
    ------
    ConfigError
        Naming every entry that matches no module or several.
    """
    module_names = list(module_names)
    problems, matched = [], {}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targeted = {n for n in module_names if re.fullmatch(targets, n)}
    else:
        targeted = set()
        for t in targets:
            hits = [n for n in module_names if n == t or n.endswith("." + t)]
            if len(hits) != 1:
                problems.append(f"target_modules entry {t!r} matches {len(hits)} modules")
            else:
                matched[t] = hits[0]
            targeted.update(hits)
    for field_name in ("rank_pattern", "alpha_pattern"):
        keys = list(config.get(field_name) or {})
        for key in keys:
            hits = [n for n in module_names if re.match(rf"(.*\.)?({key})$", n)]
            if len(hits) != 1:
                problems.append(f"{field_name} key {key!r} matches {len(hits)} modules")
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


def save_plan(plan: RankPlan, path: str | os.PathLike) -> Path:
    """Write the plan as JSON atomically (temp file in the same folder, then rename).

    The file also carries ``peft_config``, the plan's :meth:`RankPlan.to_peft_config` (with the
    plan's own names), for users who copy it into their training script; it is not read back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = plan.to_dict()
    if plan.modules:
        data["peft_config"] = plan.to_peft_config()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_plan(path: str | os.PathLike) -> RankPlan:
    """Read a plan written by :func:`save_plan`, validating every module's rank."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"No plan at {path}; write one with `spectra recommend … -o {path}`.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Plan {path} is not valid JSON ({err}).") from None
    try:
        return RankPlan.from_dict(data)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"Plan {path} is malformed ({err}); re-run `spectra recommend`.") from None


# ---------------------------------------------------------------------------- budget allocation


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_budget`: ranks, their total gain and cost, and the LP gap bound."""

    ranks: tuple[int, ...]
    gain: float
    cost: int
    gap: float


def allocate_budget(ladders: list[list[int]], gains: list[list[float]], unit_costs: list[int],
                    budget: int, *, fixed_cost: int = 0) -> Allocation:
    """Maximise Σ_m gain_m(r_m) subject to Σ_m r_m·c_m + fixed ≤ budget, r_m on its ladder.

    Greedy on marginal gain per parameter: start every module at the first rung of its ladder
    (its minimum rank), then repeatedly take the step (next rung of some module) with the
    highest gain/cost ratio that still fits; a module whose next step does not fit stops there.

    Parameters
    ----------
    ladders : list of list of int
        Per module, the allowed ranks in increasing order (e.g. 1..u, or powers of two).
    gains : list of list of float
        ``gains[m][j]``: gain (Σσᵢ² captured) at rank ``ladders[m][j]``.
    unit_costs : list of int
        Per module, parameters per unit of rank, c_m = d_in + d_out.
    budget : int
        Parameters available. ``fixed_cost`` (e.g. DoRA magnitudes) is spent first.

    Returns
    -------
    Allocation

    Raises
    ------
    ConfigError
        If the cheapest plan (every module at its minimum rank) exceeds the budget.

    Notes
    -----
    Why greedy, and how far from optimal. A step j of module m has gain g_{mj} and cost c_{mj}.
    With σ₁ ≥ σ₂ ≥ …, the ratio g_{mj}/c_{mj} is the *mean* of σᵢ²/c_m over the ranks the step
    adds, so it never increases along a module's ladder (for unit steps and for power-of-two
    rungs alike): cumulative energy is concave in the parameters spent.

    1. *Fractional relaxation* (steps may be taken in part): this is the fractional knapsack,
       solved exactly by taking steps in decreasing ratio order [5]_. Concavity makes that
       order respect each ladder's order, so the "step j before j+1" constraints never bind.
    2. *Prefix optimality*: let P be the steps greedy takes before the first one that does not
       fit. P is the fractional optimum for budget C(P) and it is integral, so no plan costing
       ≤ C(P) captures more. Greedy then keeps adding smaller steps that still fit, which only
       adds energy.
    3. *Bound for the full budget*: OPT(B) ≤ LP(B) = G(P) + ρ*·(B − C(P)), with ρ* the ratio of
       the first step that did not fit; ``gap = LP(B) − gain`` is reported, and is below one
       step's gain. If every step costs the same (unit steps and equal c_m, e.g. all-square
       modules), greedy takes the B/c best steps and is exactly optimal.
    The test suite checks all three against brute force on small problems.
    """
    n = len(ladders)
    pos = [0] * n
    cost = fixed_cost + sum(ladders[m][0] * unit_costs[m] for m in range(n))
    if cost > budget:
        raise ConfigError(f"Budget of {budget:,} parameters is below the cheapest plan ({cost:,}: every module at "
                          "its minimum rank). Raise the budget, lower min_rank, or target fewer modules.")
    gain = sum(gains[m][0] for m in range(n))

    def step(m: int) -> tuple[float, float, int] | None:
        j = pos[m]
        if j + 1 >= len(ladders[m]):
            return None
        g = gains[m][j + 1] - gains[m][j]
        c = (ladders[m][j + 1] - ladders[m][j]) * unit_costs[m]
        return (g / c, g, c) if g > 0 else None

    heap = [(-s[0], m) for m in range(n) if (s := step(m)) is not None]
    heapq.heapify(heap)
    lp_bound = None
    while heap:
        _, m = heapq.heappop(heap)
        ratio, g, c = step(m)
        if cost + c > budget:
            if lp_bound is None:  # first step that does not fit: the LP bound of note 3
                lp_bound = gain + ratio * (budget - cost)
            continue
        pos[m] += 1
        cost += c
        gain += g
        nxt = step(m)
        if nxt is not None:
            heapq.heappush(heap, (-nxt[0], m))
    gap = max(lp_bound - gain, 0.0) if lp_bound is not None else 0.0
    return Allocation(ranks=tuple(ladders[m][pos[m]] for m in range(n)), gain=gain, cost=cost, gap=gap)


# ---------------------------------------------------------------------------- recommend


def recommend_ranks(analysis: Any, policy: RankPolicy | None = None, *, sweep: Any = None) -> RankPlan:
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
    """
    policy = policy or RankPolicy()
    if policy.functional is not None and sweep is None:
        raise ConfigError("RankPolicy.functional needs a truncation sweep: recommend_ranks(..., sweep=…) "
                          "(run `spectra sweep BASE TUNED --data EVAL` first).")
    functional = functional_ranks(sweep, policy.functional) if policy.functional is not None else None
    rows, base, tuned = _rows(analysis)
    if functional is not None:
        _check_sweep_pair(functional["sweep"], base, tuned)
    spectra, left_out = [], []
    for row in rows:
        if row.get("kind", "matrix") != "matrix" or _is_split(row):
            continue
        s = _spectrum(row)
        why = _excluded(s, policy)
        if why is None and s.fro2 <= 0:
            why = "unchanged (ΔW = 0)"
        if why is not None:
            needed = s.energy_rank(policy.energy or 0.9)[0] if s.fro2 > 0 else 0
            left_out.append(LeftOut(s.name, why, needed, math.sqrt(s.fro2)))
        else:
            spectra.append(s)
    if not spectra:
        raise ConfigError(f"No module of the analysis is targeted ({len(left_out)} left out; roles={policy.roles}, "
                          f"include={policy.include!r}). Relax roles/include.")
    uniform_rank = _uniform_rank(spectra, policy) if policy.uniform else None

    plan = []  # (spectrum, rank, reason, upper rank for the budget)
    for s in spectra:
        if functional is not None and functional["modules"] and s.name not in functional["modules"]:
            left_out.append(LeftOut(s.name, "not truncated by the sweep (taken whole from the fine-tune there)",
                                    None, math.sqrt(s.fro2)))
            continue
        rank, reason = _target(s, policy, uniform_rank) if functional is None else _functional_target(s, functional)
        if rank == 0:
            why = "not needed: the sweep at rank 0 is within ε" if functional else "no signal above the noise floor"
            left_out.append(LeftOut(s.name, why, 0, math.sqrt(s.fro2)))
            continue
        plan.append((s, *_shape(s, rank, reason, policy)))
    unswept = [m.name for m in left_out if m.reason.startswith("not truncated by the sweep")]
    if not plan and functional is not None and len(unswept) == len(spectra):
        raise ConfigError(f"none of the {len(spectra)} targeted modules (e.g. {unswept[0]}) was truncated by the "
                          f"sweep (it truncated e.g. {next(iter(functional['modules']))}): was it run on another "
                          "model? Sweep and analysis must measure the same pair.")
    if not plan and functional is not None:
        raise ConfigError(f"The sweep is within ε={policy.functional:g} of the full fine-tune at rank 0 for every "
                          "targeted module: no adapter is needed at that tolerance (lower functional).")
    if not plan:
        raise ConfigError("Every targeted module lies below its noise floor; nothing to plan (try noise=False).")

    budget_gap = None
    budget = policy.budget
    cost = sum(r * sum(s.shape) for s, r, _ in plan) + _fixed_cost([s for s, _, _ in plan], policy)
    if budget is not None and (cost > budget or (policy.energy is None and not policy.knee
                                                 and policy.rank is None and not policy.uniform)):
        plan, budget_gap = _apply_budget(plan, policy, budget)

    modules = tuple(ModuleRank(name=s.name, role=s.role, layer=s.layer, shape=s.shape, rank=r,
                               alpha=policy.alpha_for(r), energy=s.energy(r)[0], energy_upper=s.energy(r)[1],
                               params=r * sum(s.shape), reason=reason, conv1d=s.conv1d,
                               fro_norm=math.sqrt(s.fro2))
                    for s, r, reason in plan)
    return RankPlan(modules=modules, left_out=tuple(left_out), policy=policy, base=base, budget_gap=budget_gap,
                    functional=functional)


def _excluded(s: _Spectrum, policy: RankPolicy) -> str | None:
    if policy.roles is not None:
        if s.role not in policy.roles:
            return f"role {s.role!r} not in roles"
    elif s.role in _DEFAULT_SKIPPED_ROLES:
        return f"role {s.role!r} (embeddings/heads are targeted only when named in roles)"
    if policy.include is not None:
        pattern = policy.include
        ok = re.search(pattern[3:], s.name) if pattern.startswith("re:") else fnmatch.fnmatchcase(s.name, pattern)
        if not ok:
            return f"name does not match include={pattern!r}"
    return None


def _uniform_rank(spectra: list[_Spectrum], policy: RankPolicy) -> int:
    """Smallest power of two capturing τ on ≥ uniform_share of modules (unknown energy counts as a miss)."""
    tau = policy.energy or 0.9
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
        r, exact = s.energy_rank(policy.energy)
        candidates.append((r, f"energy≥{policy.energy:g}" + ("" if exact else f" (lower bound: {s.known} σ known)")))
    if policy.knee:
        candidates.append((s.knee(), "knee"))
    if not candidates:  # budget alone: the budget decides up to the cap
        rank, reason = s.known if s.known else s.full_rank, "spectrum known"
    else:
        rank, reason = max(candidates, key=lambda c: c[0])
    if policy.noise and s.noise_rank is not None and s.noise_rank < rank:
        rank, reason = s.noise_rank, "noise floor"
    return rank, reason


def _functional_target(s: _Spectrum, functional: dict) -> tuple[int, str]:
    """The swept rank of the module's role curve (else the model curve); full rank when none was within ε."""
    groups = functional["groups"]
    group = s.role if s.role in groups else "model"
    if group not in groups:
        raise ConfigError(f"the sweep has no curve for {s.name} (role {s.role!r}) and no model-wide curve; sweep "
                          "with groups='model' or include this role.")
    rank = groups[group]["rank"]
    where = f"functional≤{functional['epsilon']:g} ({'role ' + group if group != 'model' else 'model'})"
    if rank is None:
        return s.full_rank, where + ": no swept rank within ε"
    return min(rank, s.full_rank), where


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
    return sum(s.shape[0] for s in spectra) if policy.use_dora else 0


def _apply_budget(plan: list, policy: RankPolicy, budget: int) -> tuple[list, float]:
    ladders, gains, costs = [], [], []
    for s, upper, _ in plan:
        lo = min(policy.min_rank, upper)
        if policy.power_of_two:
            ladder = [lo] + [1 << i for i in range(lo.bit_length(), upper.bit_length()) if (1 << i) <= upper]
            if ladder[-1] != upper:
                ladder.append(upper)
        else:
            ladder = list(range(lo, upper + 1))
        ladders.append(ladder)
        # captured Σσᵢ² at each rung; beyond the known values only the known part is counted
        gains.append([float(s.cum[min(r, s.known)]) for r in ladder])
        costs.append(sum(s.shape))
    result = allocate_budget(ladders, gains, costs, budget, fixed_cost=_fixed_cost([p[0] for p in plan], policy))
    total = sum(s.fro2 for s, _, _ in plan)
    out = [(s, r, reason if r == upper else "budget") for (s, upper, reason), r in zip(plan, result.ranks)]
    return out, (result.gap / total if total > 0 else 0.0)
