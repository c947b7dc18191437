"""The rank policy: which targets, caps, shaping and budget turn spectra into ranks.

References
----------
.. [1] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
.. [2] Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.
.. [3] Gavish & Donoho, "The Optimal Hard Threshold for Singular Values is 4/√3", arXiv:1305.5870.
.. [4] Satopää et al., "Finding a 'Kneedle' in a Haystack", ICDCS workshops 2011.
"""

from __future__ import annotations

import fractions
import math
import re
from dataclasses import dataclass

import numpy as np

from spectra.errors import ConfigError
from spectra.ranks.budget import budget_parameters
from spectra.scaling import rank_scale

_ALPHA_RULES = ("scale", "constant")
# τ of the energy target: what RankPolicy() asks, and what recommend_ranks takes where a rule needs an energy share
# the policy does not set (a uniform rank, a left-out module's needed rank, an unreached curve's modules).
DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class RankPolicy:
    """How to turn spectra into ranks. Policies combine; every choice is recorded in the plan.

    Per-module *targets* (``energy``, ``knee``) give the rank a module needs; when both are set
    the larger wins, so each is met. ``rank`` and ``uniform`` instead give every module one rank.
    ``noise`` caps targets at the signal rank. ``min_rank``/``max_rank``/``power_of_two`` then
    shape the ranks, and a budget (``budget_params`` or ``budget_bytes``) finally trims the plan
    by the greedy allocation of :func:`~spectra.ranks.budget.allocate_budget`, using the ranks above as per-module caps
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
        Roles to target (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` …). A string is split on commas.
        Default None, or an empty selection (``()``, ``""``: as ``spectra train`` and ``spectra memory`` read one):
        every matrix except embeddings (role ``embed``, the token embedding, and ``pos_embed``, the tables looked up
        by position or segment: GPT-2's ``wpe``, BERT's ``token_type_embeddings``, T5's ``relative_attention_bias``),
        heads and MoE routers (role ``other``, which ``other`` takes).
    stacks : tuple of str or None
        Stacks to target (``language``, ``vision``, ``encoder``, ``qformer`` …: ``architectures.STACK_NAMES``), with
        the roles: ``roles=("q", "v"), stacks=("language",)`` targets the language model's q and v and not a vision
        tower's, which ``roles`` alone (as PEFT's ``target_modules=["q_proj"]``) would take too. A string is
        split on commas. Default None: every stack.
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
        curves, else one rank for the model); see :func:`~spectra.ranks.functional.functional_ranks`. Replaces the
        ``energy``/``knee`` targets and is not capped by ``noise`` (the function was measured at
        that rank). Needs ``recommend_ranks(..., sweep=...)``. Default None.
    """

    energy: float | None = DEFAULT_ENERGY
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
    stacks: tuple[str, ...] | None = None  # None: every stack, as roles alone select
    include: str | None = None
    rslora: bool = False
    use_dora: bool = False
    alpha_rule: str = "scale"
    scale: float = 2.0
    alpha: float = 16.0
    functional: float | None = None  # None: ranks from spectra alone; set it with a truncation sweep

    def __post_init__(self) -> None:
        if self.roles is not None:
            roles = (tuple(r.strip() for r in self.roles.split(",") if r.strip()) if isinstance(self.roles, str)
                     else tuple(self.roles))
            # an empty selection is none, the default, as train and memory read it (checkpoints.roles.check_roles)
            object.__setattr__(self, "roles", roles or None)
        if self.roles is not None:
            from spectra.checkpoints.architectures import ROLES

            unknown = sorted(set(self.roles) - set(ROLES))
            if unknown:
                raise ConfigError(f"RankPolicy.roles: unknown role(s) {', '.join(unknown)}; choose from "
                                  f"{', '.join(ROLES)}.")
        from spectra.checkpoints.architectures import parse_stacks

        object.__setattr__(self, "stacks", parse_stacks(self.stacks, option="RankPolicy.stacks"))
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
        if not math.isfinite(self.bytes_per_param):
            raise ConfigError(f"RankPolicy.bytes_per_param must be finite, got {self.bytes_per_param}.")
        if self.rank is not None and self.uniform:
            raise ConfigError("RankPolicy.rank fixes the rank; it cannot be combined with uniform=True.")
        if self.power_of_two:
            for name in ("min_rank", "max_rank", "rank"):
                value = getattr(self, name)
                if value is not None and value & (value - 1):
                    raise ConfigError(f"RankPolicy.{name}={value} is not a power of two but power_of_two=True.")
        if self.alpha_rule not in _ALPHA_RULES:
            raise ConfigError(f"RankPolicy.alpha_rule must be one of {_ALPHA_RULES}, got {self.alpha_rule!r}.")
        # each named with its value: the CLI reads RankPolicy.alpha as --alpha. Finite: an infinite α is no scaling
        # PEFT can apply, and plan.json would hold "lora_alpha": Infinity, which is not JSON
        for name in ("scale", "alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RankPolicy.{name} must be > 0, got {getattr(self, name)}.")
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"RankPolicy.{name} must be finite, got {getattr(self, name)}.")
        if self.include is not None and self.include.startswith("re:"):
            try:
                re.compile(self.include[3:])
            except re.error as err:
                raise ConfigError(f"RankPolicy.include {self.include!r} is not a valid regex: {err}.") from None
        if self.functional is not None and not (isinstance(self.functional, (int, float))
                                                and 0 <= self.functional < math.inf):
            raise ConfigError(f"RankPolicy.functional must be a finite tolerance ≥ 0 in the sweep metric's units, "
                              f"got {self.functional!r}.")
        if self.functional is not None and (self.rank is not None or self.uniform):
            raise ConfigError("RankPolicy.functional picks the ranks; it cannot be combined with rank or uniform.")
        if (self.energy is None and not self.knee and self.rank is None and not self.uniform
                and not self.has_budget and self.functional is None):
            raise ConfigError("RankPolicy selects no rank: set energy, knee, rank, uniform or a budget.")

    @property
    def has_budget(self) -> bool:
        """Whether a budget (``budget_params`` or ``budget_bytes``) trims the plan."""
        return self.budget_params is not None or self.budget_bytes is not None

    @property
    def budget(self) -> int | None:
        """The budget in trainable parameters of a plan with no module PEFT trains in full: ``budget_params``, or
        ⌊``budget_bytes`` / ``bytes_per_param``⌋; None without a budget (:attr:`has_budget` asks that).

        Not what recommend spends where the model's task type saves a head (a classifier's ``modules_to_save``):
        a byte budget charges each of its parameters :data:`~spectra.ranks.budget.SAVED_BYTES_PER_PARAM`, not
        ``bytes_per_param``, and :func:`~spectra.ranks.budget.budget_parameters` with the head's count gives what it
        spends; this is that function without a head."""
        return budget_parameters(self.budget_params, self.budget_bytes, self.bytes_per_param)

    def alpha_for(self, rank: int) -> float:
        """``lora_alpha`` for a module of this rank under ``alpha_rule`` (see the class docstring)."""
        if self.alpha_rule == "constant":
            return float(self.alpha)
        return float(self.scale * rank_scale(rank, self.rslora))

    def scaling(self, rank: int) -> float:
        """The update scale s of a module: α/r [1]_, or α/√r with rsLoRA [2]_."""
        return self.alpha_for(rank) / rank_scale(rank, self.rslora)


class BudgetOverflow(ConfigError, OverflowError):
    """A budget past any count a model has (1e25, 1e400): refused as too large rather than as unreadable."""


def parse_budget(text: str) -> dict[str, int]:
    """Parse a CLI budget: ``"20M"``/``"1.5e6"`` parameters, ``"2GB"``/``"512MiB"`` bytes.

    Returns ``{"budget_params": n}`` or ``{"budget_bytes": n}`` to pass to :class:`RankPolicy`.
    A bare ``B`` is refused as ambiguous (billion parameters or bytes?). A fractional count is rounded down,
    the whole count within the budget (``0.1GiB`` holds 107374182 bytes).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    params = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
    data = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "BYTES": 1}
    unit = m.group(2).upper() if m else None
    if m is None or (unit not in params and unit not in data) or unit == "B":
        raise ConfigError(f"Cannot read budget {text!r}: use parameters like 20M or 1.5e6, "
                          "or bytes like 2GB or 512MiB.")
    # exactly as typed, as a fraction: the whole count within the budget (2000.7 parameters hold 2000, where rounding
    # let 2001 in); binary floating point made 4.1 × 10⁶ 4099999.9999999995, a tolerance for that rounded 0.7GiB
    # (751619276.8 bytes) up, and Decimal's 28 digits 2000.9999999999999999999999999 up
    mantissa, _, exponent = m.group(1).lower().partition("e")
    if len(mantissa) > 200 or len(exponent) > 200:  # Python's int() refuses 4300 digits with a traceback
        raise ConfigError(f"Cannot read budget {text[:40]!r}…: {len(text)} characters, too many digits to count.")
    # past a yotta-count no model comes near it (and 1e999999999 would be a billion-digit integer)
    if exponent and int(exponent) > 60:
        raise BudgetOverflow(f"Budget {text!r} is beyond any model; give parameters like 20M or bytes like 2GB.")
    value = fractions.Fraction(mantissa) * 10 ** int(exponent or 0) * (params[unit] if unit in params else data[unit])
    if value > 10**24:
        raise BudgetOverflow(f"Budget {text!r} is beyond any model; give parameters like 20M or bytes like 2GB.")
    count = math.floor(value)
    return {"budget_params" if unit in params else "budget_bytes": count}
