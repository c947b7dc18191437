"""Per-role and per-module tables of an analysis, and its rank picture in two sentences.

Everything here reads the plain analysis dict (what ``analysis.json`` holds) and
returns numbers or strings; nothing draws or writes files. ``plots`` and ``render``
both start from :func:`matrix_rows`, so the input is validated in one place.

Modules are grouped by *stack* and role (:func:`groups_in`): a multimodal checkpoint's vision
tower numbers its layers from 0 like its language model, and its q_proj is no more the
language model's q than its layer 0 is theirs. A row's ``stack`` (absent for the language
model, and in files written before it existed) keeps them apart; where an analysis holds
more than one stack, another stack's roles read "vision q" (:func:`spectra.groups.group_label`).
The functions that label groups so take ``stacks``, the analysis's (:func:`stacks_of`): a report
computes them once and passes them to each; without them, each computes them from the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from spectra.errors import ConfigError
from spectra.groups import group_label, group_of, stack_index, stacks_in

# Roles in the order a transformer block meets them, so tables and plots read top-down: an encoder–decoder's
# decoder block attends to itself (q k v o), then to the encoder's output (xq xk xv xo), then runs its MLP. MLA's
# factors (DeepSeek's q_a q_b kv_a kv_b) and DeepSeek-V4's kv (K = V) come before the o that reads their heads, V4's
# output factors o_a o_b after it; a multimodal projector's Linears (projector) after the MLP. The tables looked up by
# position or segment (pos_embed) come with the token embedding, first.
ROLE_ORDER = ("embed", "pos_embed", "q", "k", "v", "qkv", "q_a", "q_b", "kv_a", "kv_b", "kv", "o", "o_a", "o_b", "xq",
              "xk", "xv", "xo", "gate", "up", "gate_up", "down", "projector", "head", "other")
ENERGY_LEVELS = ("0.5", "0.9", "0.95", "0.99")
_REQUIRED_MATRIX_KEYS = ("name", "role", "shape", "fro_norm", "energy_rank", "singular_values")


def analysis_problem(data: dict) -> str | None:
    """What makes an (edited) analysis.json unreadable, or None (light: `recommend` checks with it, no torch)."""
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("modules"), list):
        return "it needs a 'config' object and a 'modules' list"
    for row in data["modules"]:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            return "every module row needs a 'name'"
        shape = row.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            return f"module {row['name']}: 'shape' must be a list of integers"
        if row.get("kind", "matrix") == "matrix" and not isinstance(row.get("role"), str):
            return f"module {row['name']}: 'role' must be a string"
        if not isinstance(row.get("stack"), (str, type(None))):
            return f"module {row['name']}: 'stack' must be a string or null"
    return None


def matrix_rows(analysis: Mapping) -> list[dict]:
    """Validate an analysis dict and return its weight-matrix rows, in reading order.

    Parameters
    ----------
    analysis : mapping
        The analysis as ``analysis.json`` holds it (``schema_version``, ``config``,
        ``modules``, ...).

    Returns
    -------
    list of dict
        Rows with ``kind == "matrix"``, sorted by (stack, embeddings first, layer, role, name).

    Raises
    ------
    ConfigError
        If ``modules`` is missing or not a list, holds no matrix rows, or a matrix
        row lacks a field the report needs.
    """
    if not isinstance(analysis, Mapping):
        raise ConfigError(f"the analysis must be a dict as analysis.json holds it, got {type(analysis).__name__}.")
    modules = analysis.get("modules")
    if not isinstance(modules, list):
        raise ConfigError("the analysis has no 'modules' list; pass the dict that analysis.json holds.")
    for position, row in enumerate(modules):
        if not isinstance(row, Mapping):
            raise ConfigError(f"analysis['modules'][{position}] is a {type(row).__name__}, not a module row (dict).")
    rows = [m for m in modules if m.get("kind", "matrix") == "matrix"]
    if not rows:
        raise ConfigError(
            f"the analysis holds no weight-matrix modules ({len(modules)} rows in 'modules', none of kind "
            "'matrix'), so there is no spectrum to report; check the role/layer/name filters of the run."
        )
    for row in rows:
        missing = [key for key in _REQUIRED_MATRIX_KEYS if key not in row]
        if missing:
            raise ConfigError(f"module {row.get('name', '?')!r} in the analysis lacks {', '.join(missing)}.")
    return sorted(rows, key=module_sort_key)


def vector_rows(analysis: Mapping) -> list[dict]:
    """Return the 1-D (norm, bias) rows of an analysis, in reading order."""
    return sorted((m for m in analysis.get("modules", []) if m.get("kind") == "vector"), key=module_sort_key)


def module_sort_key(row: Mapping) -> tuple:
    """Sort key: stack by stack (the language model first), within one embeddings, then layers in order, then
    un-layered modules (head); roles in block order."""
    layer = row.get("layer")
    group = 0 if row.get("role") in ("embed", "pos_embed") else (2 if layer is None else 1)
    return (stack_index(row.get("stack")), group, layer if layer is not None else 0, role_index(row.get("role")),
            row.get("name", ""))


def role_index(role: str | None) -> int:
    """Position of ``role`` in :data:`ROLE_ORDER`; unknown roles sort last."""
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def stacks_of(analysis: Mapping) -> list[str | None]:
    """The analysis's stacks: those of its weight matrices (:func:`~spectra.groups.stacks_in`), which every label of
    the report is given (:func:`~spectra.groups.group_label`), so that a role reads the same in each table, panel
    and sentence. Vectors add none: the report groups and draws matrices, and a vector's own name beside its role
    says where it lies."""
    return stacks_in(matrix_rows(analysis))


def groups_in(rows: list[Mapping]) -> list[tuple[str | None, str]]:
    """The distinct (stack, role) groups of ``rows``: stack by stack, roles in block order within each."""
    return sorted({group_of(r) for r in rows}, key=lambda g: (stack_index(g[0]), role_index(g[1]), g[1]))


def stack_label(stack: str | None, stacks=()) -> str:
    """A stack as panel titles and summaries name it: its name ("vision"); None, the language model, is "language
    model", or "decoder" beside an encoder (T5, BART: the stack of the token embedding and the decoder's layers).
    `stacks` are the stacks shown together."""
    if stack is not None:
        return stack
    return "decoder" if "encoder" in stacks else "language model"


def full_rank(row: Mapping) -> int:
    """The largest possible rank of the module's ΔW: ``min(out, in)``."""
    return int(min(row["shape"]))


def energy_curve(row: Mapping) -> np.ndarray:
    """Cumulative energy share of the top-r singular values, r = 1..k.

    ``Σ_{i≤r} σᵢ² / ‖ΔW‖_F²`` is exact even when only the top k values were kept,
    because ``fro_norm`` is the norm of the whole ΔW. Empty for ΔW = 0.
    """
    s = np.asarray(row["singular_values"], dtype=np.float64)  # (k,)
    fro = float(row["fro_norm"] or 0.0)
    if s.size == 0 or fro <= 0.0:
        return np.zeros(0)
    return np.minimum(np.cumsum(s**2) / fro**2, 1.0)


def number(value) -> float | None:
    """``value`` as a finite float, or None for missing, null, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _energy(level: str) -> Callable[[Mapping], float | None]:
    return lambda row: number((row.get("energy_rank") or {}).get(level))


def _noise(row: Mapping) -> float | None:
    return number((row.get("noise") or {}).get("rank_above"))


def _decay(row: Mapping) -> float | None:
    return number((row.get("decay") or {}).get("exponent"))


def _activation_energy(level: str) -> Callable[[Mapping], float | None]:
    return lambda row: number(((row.get("activation") or {}).get("energy_rank") or {}).get(level))


def _share(level: str) -> Callable[[Mapping], float | None]:
    def share(row: Mapping) -> float | None:
        rank = _energy(level)(row)
        return None if rank is None or full_rank(row) == 0 else rank / full_rank(row)

    return share


def energy_bounds(level: str) -> Callable[[Mapping], tuple[float, float] | None]:
    """(lo, hi) of a module's energy rank at `level`: (r, r) where it is settled, the sketch's interval
    (``energy_rank_bounds``) where the sketch left it open (null in ``energy_rank``), None where neither."""
    def bounds(row: Mapping) -> tuple[float, float] | None:
        rank = _energy(level)(row)
        if rank is not None:
            return rank, rank
        interval = (row.get("energy_rank_bounds") or {}).get(level) or ()
        lo, hi = (number(v) for v in interval) if len(interval) == 2 else (None, None)
        return None if lo is None or hi is None else (lo, hi)

    return bounds


def _share_bounds(level: str) -> Callable[[Mapping], tuple[float, float] | None]:
    def bounds(row: Mapping) -> tuple[float, float] | None:
        interval = energy_bounds(level)(row)
        return None if interval is None or full_rank(row) == 0 else (interval[0] / full_rank(row),
                                                                      interval[1] / full_rank(row))

    return bounds


_share90 = _share("0.9")


def percent(level: str) -> str:
    """An energy level as the reports write it: "0.9" → "90%", "0.995" → "99.5%"."""
    return f"{100 * float(level):.4g}%"


def energy_levels(analysis: Mapping) -> tuple[str, ...]:
    """The energy levels the analysis measured (``--energy``; by default 0.5, 0.9, 0.95, 0.99), ascending."""
    levels = {k for r in matrix_rows(analysis) for k in (r.get("energy_rank") or {})}
    return tuple(sorted(levels, key=float)) or ENERGY_LEVELS


def headline_level(analysis: Mapping) -> str:
    """The level the rank picture, the heatmap and the role panels show: 0.9, else the measured one nearest it."""
    return headline(energy_levels(analysis))


def headline(levels) -> str:
    """0.9 when among `levels` (or `levels` is empty), else the level nearest it."""
    levels = list(levels)
    return "0.9" if "0.9" in levels or not levels else min(levels, key=lambda level: abs(float(level) - 0.9))


@dataclass(frozen=True)
class Metric:
    """One column of the per-role and per-module tables."""

    key: str
    label: str
    value: Callable[[Mapping], float | None]
    kind: str  # "rank" (count), "ratio" (plain number), "share" (percent)
    # an energy rank the sketch may leave unsettled: (lo, hi) per module, which interval_stats takes the median of
    bounds: Callable[[Mapping], tuple[float, float] | None] | None = None


SUMMARY_METRICS = (
    Metric("energy_rank_0.5", "energy-50% rank", _energy("0.5"), "rank"),
    Metric("energy_rank_0.9", "energy-90% rank", _energy("0.9"), "rank"),
    Metric("energy_rank_0.9_share", "energy-90% rank / full rank", _share90, "share"),
    Metric("energy_rank_0.95", "energy-95% rank", _energy("0.95"), "rank"),
    Metric("energy_rank_0.99", "energy-99% rank", _energy("0.99"), "rank"),
    Metric("effective_rank", "entropy effective rank", lambda r: number(r.get("effective_rank")), "ratio"),
    Metric("stable_rank", "stable rank", lambda r: number(r.get("stable_rank")), "ratio"),
    Metric("gd_rank", "Gavish–Donoho rank", lambda r: number(r.get("gd_rank")), "rank"),
    Metric("noise_rank", "rank above noise floor", _noise, "rank"),
    Metric("relative_size", "‖ΔW‖/‖W‖", lambda r: number(r.get("relative_size")), "ratio"),
    Metric("decay_exponent", "decay exponent", _decay, "ratio"),
)


def has_activation(analysis: Mapping) -> bool:
    """Whether any weight-matrix row carries an ``activation`` (calibrated) spectrum."""
    return any(r.get("activation") for r in matrix_rows(analysis))


def activation_levels(analysis: Mapping) -> tuple[str, ...]:
    """The levels of a calibrated analysis's activation-weighted ranks (its ``--energy`` levels), ascending."""
    levels = {k for r in matrix_rows(analysis) for k in ((r.get("activation") or {}).get("energy_rank") or {})}
    return tuple(sorted(levels, key=float))


def activation_metrics(analysis: Mapping) -> tuple[Metric, ...]:
    """Shown when the analysis ran with calibration data (``analyze --calibration``): ranks of the whitened update
    ΔW·C^½, i.e. of the output change on the data's inputs, at the headline level (:func:`headline`: 0.9, else the
    nearest measured) and the top one (0.99 by default); none for an analysis without calibration."""
    levels = activation_levels(analysis)
    shown = dict.fromkeys([headline(levels), levels[-1]]) if levels else {}
    return tuple(Metric(f"activation_rank_{level}", f"activation-weighted energy-{percent(level)} rank",
                        _activation_energy(level), "rank") for level in shown)


def _metrics(analysis: Mapping) -> tuple[Metric, ...]:
    """:data:`SUMMARY_METRICS` with the energy levels the analysis measured (and its headline level's
    share of full rank), plus :func:`activation_metrics` for a calibrated analysis."""
    levels, head = energy_levels(analysis), headline_level(analysis)
    energy = []
    for level in levels:
        energy.append(Metric(f"energy_rank_{level}", f"energy-{percent(level)} rank", _energy(level), "rank",
                             energy_bounds(level)))
        if level == head:
            energy.append(Metric(f"energy_rank_{level}_share", f"energy-{percent(level)} rank / full rank",
                                 _share(level), "share", _share_bounds(level)))
    rest = tuple(m for m in SUMMARY_METRICS if not m.key.startswith("energy_rank_"))
    return tuple(energy) + rest + activation_metrics(analysis)


def stats(values) -> dict | None:
    """Median, quartiles and range of the finite ``values``; None when there are none."""
    finite = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if finite.size == 0:
        return None
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3),
            "min": float(finite.min()), "max": float(finite.max()), "n": int(finite.size)}


def interval_stats(intervals) -> dict | None:
    """:func:`stats` of values some of which are only known to lie in an interval (lo, hi).

    Every statistic here is monotone in each value, so it lies between its value over the lower ends and its
    value over the upper ends: ``median``, ``q1`` and ``min`` are those of the lower ends, ``q3`` and ``max`` of
    the upper ends, and where some interval is open, ``median_hi`` (the upper ends' median) and ``unsettled``
    (how many) are added. With every interval closed (lo = hi) it equals :func:`stats`. Leaving the open ones out
    instead had reported the median of the settled ones alone: 10 for a role of ranks 10, ≥ 40 and ≥ 50.
    """
    known = [(float(lo), float(hi)) for lo, hi in (i for i in intervals if i is not None)]
    low = stats(lo for lo, _ in known)
    if low is None:
        return None
    open_ = sum(lo < hi for lo, hi in known)
    if not open_:
        return low
    high = stats(hi for _, hi in known)
    return {**low, "q3": high["q3"], "max": high["max"], "median_hi": high["median"], "unsettled": open_}


def unchanged(row: Mapping) -> bool:
    """Whether the module's ΔW is exactly zero (base and tuned hold the same tensor): it has no rank to report.

    The rank picture, the per-role table and the rank figures leave such modules out of their medians,
    counts and histograms, where their zeros would pull every statistic down, and say so
    (:func:`unchanged_text`).
    """
    return number(row.get("fro_norm")) == 0.0


def rounding_only(row: Mapping) -> bool:
    """Whether a changed module's ΔW holds no singular value above its storage dtype's rounding-noise floor
    (``noise.rank_above`` = 0: an fp32 base saved as bf16, a bf16 fine-tune that left the module alone).

    Its energy ranks measure rounding, near full rank, not the fine-tune: the rank picture, the per-role table, the
    role panels' titles and the histogram leave such modules out as they leave out ΔW = 0, and say so
    (:func:`left_out_text`). It had ranked k, gate and down at 66–78 % of full rank beside q's 9 % on such a pair.
    """
    return _noise(row) == 0


def fused_wholes(rows: list[Mapping]) -> set[str]:
    """Names of the fused tensors (GPT-2's ``c_attn``, a ``gate_up``) that ``rows`` also hold split by projection."""
    return {r["fused_name"] for r in rows if r.get("fused_name")}


def by_projection(rows: list[Mapping]) -> list[Mapping]:
    """``rows`` with a fused tensor counted once, through its projections: its whole row left out
    (:func:`fused_wholes`), as the rank picture, the unchanged count, the histogram and the demo count modules."""
    split = fused_wholes(rows)
    return [r for r in rows if r["name"] not in split]


def unchanged_text(analysis: Mapping, *, stacks: list | None = None) -> str:
    """How many of the analysis's weight matrices a statistic leaves out as unchanged, and which, in one sentence
    ('' when none): '3 unchanged matrices are left out (ΔW = 0; every embed, pos_embed matrix; v of layer 1).'

    A fused tensor reported whole and by projection counts once, through its projections, as the rank picture
    counts modules; its whole (role qkv, …) is left out with them, which the sentence then says. A role with no
    changed matrix among the rows so counted is named whole ('every k matrix'); the unchanged matrices of a role
    changed elsewhere by their layers (:func:`_unchanged_where`). Naming the whole roles alone had read as if they
    were all: 'every embed, pos_embed matrix' of DistilBERT's two embeddings and a layer's v. Where every row is
    unchanged there is nothing left to state a statistic of: each caller says that instead."""
    rows = matrix_rows(analysis)
    split = fused_wholes(rows)
    counted = by_projection(rows)
    left = [r for r in counted if unchanged(r)]
    if not left:
        return ""
    changed = {group_of(r) for r in counted if not unchanged(r)}
    stacks = stacks_of(analysis) if stacks is None else stacks
    still = [group_label(g, stacks) for g in groups_in(left) if g not in changed]  # roles left alone entirely
    partly = _unchanged_where([r for r in left if group_of(r) in changed], stacks)
    wholes = any(unchanged(r) for r in rows if r["name"] in split)
    return (f"{len(left)} unchanged {'matrix is' if len(left) == 1 else 'matrices are'} left out (ΔW = 0"
            + (f"; every {', '.join(still)} matrix" if still else "")
            + (f"; {partly}" if partly else "")
            + ("; a fused tensor counted by its projections, its whole left out with them" if wholes else "") + ").")


def left_out_text(analysis: Mapping, *, stacks: list | None = None) -> str:
    """Every matrix a statistic of the report leaves out, in one or two sentences ('' when none): the unchanged
    ones (:func:`unchanged_text`), then the changed ones holding rounding alone (:func:`rounding_only`), by role.
    The rank picture, the per-role table's note, the role panels and the histogram all say it in these words."""
    stacks = stacks_of(analysis) if stacks is None else stacks
    unchanged_part = unchanged_text(analysis, stacks=stacks)
    noise = [r for r in by_projection(matrix_rows(analysis)) if not unchanged(r) and rounding_only(r)]
    if not noise:
        return unchanged_part
    named = ", ".join(dict.fromkeys(group_label(group_of(r), stacks) for r in noise))
    more, too = ("more ", " too") if unchanged_part else ("", "")
    one = len(noise) == 1
    return ((unchanged_part + " ") if unchanged_part else "") + (
        f"{len(noise)} {more}{'matrix' if one else 'matrices'} ({named}) {'holds' if one else 'hold'} no singular "
        f"value above the storage dtype's rounding-noise floor (ΔW is rounding there, not fine-tuning) and "
        f"{'is' if one else 'are'} left out{too}.")


def _unchanged_where(left: list[Mapping], stacks, *, shown: int = 4) -> str:
    """Where the unchanged matrices `left` (of roles changed elsewhere) lie, in reading order: their roles by layer,
    layers of the same roles together ('v of layer 1', 'q, k, v of layers 0, 2'), a module of no layer by its name;
    the first `shown` parts, then '…'."""
    by_layer: dict = {}  # layer -> its unchanged roles' labels, in reading order
    named = []
    for row in left:
        if row.get("layer") is None:
            named.append(row["name"])
            continue
        labels = by_layer.setdefault(row["layer"], [])
        if (label := group_label(group_of(row), stacks)) not in labels:
            labels.append(label)
    layers_of: dict = {}  # the same roles -> their layers
    for layer in sorted(by_layer):
        layers_of.setdefault(tuple(by_layer[layer]), []).append(str(layer))
    parts = [f"{', '.join(labels)} of {'layer' if len(layers) == 1 else 'layers'} {', '.join(layers)}"
             for labels, layers in layers_of.items()] + named
    return "; ".join(parts[:shown]) + (" …" if len(parts) > shown else "")


def summary_rows(analysis: Mapping, *, stacks: list | None = None) -> list[dict]:
    """The per-role table: each metric's median and spread over the role's changed modules.

    Modules with ΔW = 0 (:func:`unchanged`) are left out: their zero ranks are no measurement of the
    fine-tune's rank; so are modules whose ΔW is rounding alone (:func:`rounding_only`), whose energy ranks
    measure the noise; a role with no other module has no entry. :func:`role_table_note` says which were left
    out. An energy rank the sketch left unsettled in some module enters as its interval (:func:`interval_stats`).

    Parameters
    ----------
    analysis : mapping
        The analysis dict (see :func:`matrix_rows`).
    stacks : list, optional
        The analysis's stacks (:func:`stacks_of`), where the caller has them.

    Returns
    -------
    list of dict
        One dict per role of each stack (:func:`groups_in`) with a changed module, in block order, with ``role``,
        ``stack`` (None: the language model), ``label`` (:func:`~spectra.groups.group_label`: "q", or "vision q"
        beside another stack), ``modules`` (count of changed ones), ``layers`` (distinct non-null layers),
        ``full_rank`` (median of ``min(shape)``) and, for each :data:`SUMMARY_METRICS` key (and
        :func:`activation_metrics` key when the analysis was calibrated), a :func:`stats` dict (energy ranks:
        :func:`interval_stats`) or None where no module of the role has the metric.
    """
    stacks = stacks_of(analysis) if stacks is None else stacks
    rows = [r for r in matrix_rows(analysis) if not unchanged(r) and not rounding_only(r)]
    table = []
    for group in groups_in(rows):
        members = [r for r in rows if group_of(r) == group]
        entry = {
            "role": group[1],
            "stack": group[0],
            "label": group_label(group, stacks),
            "modules": len(members),
            "layers": len({r.get("layer") for r in members if r.get("layer") is not None}),
            "full_rank": float(np.median([full_rank(r) for r in members])),
        }
        for metric in _metrics(analysis):
            entry[metric.key] = (interval_stats(metric.bounds(r) for r in members) if metric.bounds
                                 else stats(metric.value(r) for r in members))
        table.append(entry)
    return table


@dataclass(frozen=True)
class LayerRoleGrid:
    """One stack's layer × role table of a metric, what a heatmap panel draws.

    ``values[i, j]`` is the median of the metric over the modules of layer ``layers[i]`` and role ``roles[j]`` (one
    module, or a layer's experts), NaN where there is none or none has the metric. ``layers`` ends with None when
    some of the stack's modules have no layer (embeddings, head, a projector).
    """

    stack: str | None
    layers: list[int | None]
    roles: list[str]
    values: np.ndarray  # (layers, roles)


def layer_role_grids(rows: list[Mapping], value: Callable[[Mapping], float | None]) -> list[LayerRoleGrid]:
    """The layer × role tables of ``value(row)`` over weight-matrix ``rows``, one per stack
    (:func:`~spectra.groups.stacks_in`): layer 0 of a vision tower and of the language model are different rows of
    different tables, never one cell."""
    grids = []
    for stack in stacks_in(rows):
        members = [r for r in rows if r.get("stack") == stack]
        roles = [role for _, role in groups_in(members)]
        layers: list[int | None] = sorted({r["layer"] for r in members if r.get("layer") is not None})
        if any(r.get("layer") is None for r in members):
            layers.append(None)  # embeddings and head: one "no layer" row at the bottom
        values = np.full((len(layers), len(roles)), np.nan)  # (layers, roles)
        for i, layer in enumerate(layers):
            for j, role in enumerate(roles):
                cell = [value(r) for r in members if r.get("layer") == layer and r["role"] == role]
                cell = [v for v in cell if v is not None]
                if cell:
                    values[i, j] = float(np.median(cell))
        grids.append(LayerRoleGrid(stack, layers, roles, values))
    return grids


def pct(value) -> str:
    """A share as a percentage with one decimal; "–" when unknown (a negative zero reads 0.0%)."""
    return "–" if value is None else f"{100 * value + 0.0:.1f}%"


def num(value, *, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; "–" when unknown (a negative zero, e.g. a gap of
    −1·0.0, reads 0, not -0)."""
    return "–" if value is None else f"{value + 0.0:.{digits}g}"


def share_text(value: float) -> str:
    """A share in percent: one decimal from 1 % up, two significant digits below (a rank of 1 in 4096 reads
    0.024%, not 0.0%, and two such roles still rank apart); 0 reads 0.0%."""
    return f"{value + 0.0:.1%}" if value == 0 or abs(value) >= 0.01 else f"{100 * value:.2g}%"


def format_value(value: float | None, kind: str) -> str:
    """Short text for one number: ranks as integers where whole, shares in percent."""
    if value is None:
        return "–"
    if kind == "share":
        return share_text(value)
    if kind == "rank" and float(value).is_integer():
        return str(int(value))
    if kind == "rank":
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_median(entry: dict, kind: str) -> str:
    """A :func:`stats` (or :func:`interval_stats`) median as text; "40–60" where open intervals leave it so."""
    median = format_value(entry["median"], kind)
    high = entry.get("median_hi", entry["median"])
    return median if high == entry["median"] else f"{median}–{format_value(high, kind)}"


def format_stats(entry: dict | None, kind: str) -> str:
    """``median (min–max)``, or the single value when the spread is nil; a median of open intervals as
    "lo–hi" (:func:`format_median`)."""
    if entry is None:
        return "–"
    median = format_median(entry, kind)
    if entry["min"] == entry["max"]:
        return median
    return f"{median} ({format_value(entry['min'], kind)}–{format_value(entry['max'], kind)})"


def role_table(analysis: Mapping, *, stacks: list | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the per-role table (median (min–max) over modules)."""
    metrics = _metrics(analysis)
    headers = ["role", "modules", "full rank"] + [m.label for m in metrics]
    body = [
        [entry["label"], str(entry["modules"]), format_value(entry["full_rank"], "rank")]
        + [format_stats(entry[m.key], m.kind) for m in metrics]
        for entry in summary_rows(analysis, stacks=stacks)
    ]
    return headers, body


def role_table_note(analysis: Mapping, *, stacks: list | None = None) -> str:
    """What the per-role table leaves out, for the line beside it: '' when every matrix changed above the rounding
    floor; the unchanged and rounding-only matrices (:func:`left_out_text`, in the rank picture's words) when some
    did not, and that there is no table when none did; and how it reads an energy rank the sketch left unsettled.
    The table leaves out every unchanged row, a fused tensor's whole as well as its projections; the count takes
    that tensor once, by its projections, and says its whole went with them."""
    rows = matrix_rows(analysis)
    if all(unchanged(r) for r in rows):
        return ("Every weight matrix is unchanged (ΔW = 0): the two checkpoints hold the same values, so no role "
                "has a rank to tabulate.")
    if all(unchanged(r) or rounding_only(r) for r in rows):
        return ("No changed weight matrix holds a singular value above the storage dtype's rounding-noise floor: "
                "ΔW is rounding, not fine-tuning, so no role has a rank to tabulate.")
    note = left_out_text(analysis, stacks=stacks)
    if any(e.get("unsettled") for entry in summary_rows(analysis, stacks=stacks) for e in entry.values()
           if isinstance(e, dict)):
        note += ((" " if note else "") + "A median written lo–hi includes modules whose energy rank the sketch "
                 "left unsettled at that level (their rank lies in an interval; see the per-module table): the "
                 "median lies between the two.")
    return note


_MODULE_METRICS = ("effective_rank", "stable_rank", "gd_rank", "noise_rank", "relative_size", "decay_exponent")


def module_table(analysis: Mapping, *, stacks: list | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the per-module table (one row per weight matrix)."""
    levels, head = energy_levels(analysis), headline_level(analysis)
    # the default four leave 95 % out, for width; a headline level (the one every other view shows) never is
    shown = [level for level in levels if level == head or not (level == "0.95" and set(levels) == set(ENERGY_LEVELS))]
    keys = (set(_MODULE_METRICS) | {f"energy_rank_{level}" for level in shown}
            | {m.key for m in activation_metrics(analysis)})
    metrics = [m for m in _metrics(analysis) if m.key in keys and m.kind != "share"]
    headers = ["module", "role", "layer", "shape", "‖ΔW‖_F"] + [m.label for m in metrics] + ["method"]
    stacks = stacks_of(analysis) if stacks is None else stacks
    body = [
        [r["name"], group_label(group_of(r), stacks), _text(r.get("layer")), "×".join(map(str, r["shape"])),
         format_value(number(r["fro_norm"]), "ratio")]
        + [_energy_interval(r, m.key) or format_value(m.value(r), m.kind) for m in metrics]
        + [_text(r.get("method"))]
        for r in matrix_rows(analysis)
    ]
    return headers, body


def _energy_interval(row: Mapping, key: str) -> str | None:
    """"lo–hi" for an energy level the sketch left unsettled (null rank, an interval in ``energy_rank_bounds``)."""
    level = key.removeprefix("energy_rank_")
    if level == key or number((row.get("energy_rank") or {}).get(level)) is not None:
        return None
    bounds = (row.get("energy_rank_bounds") or {}).get(level)
    return f"{int(bounds[0])}–{int(bounds[1])}" if bounds else None


def vector_table(analysis: Mapping, *, stacks: list | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the 1-D deltas (norm weights, biases): size only, no spectrum."""
    headers = ["module", "role", "layer", "shape", "‖Δ‖_2", "‖Δ‖/‖w‖"]
    stacks = stacks_of(analysis) if stacks is None else stacks
    body = [
        [r["name"], _text(r.get("role")) if r.get("role") is None else group_label(group_of(r), stacks),
         _text(r.get("layer")), "×".join(map(str, r.get("shape", []))) or ("scalar" if "shape" in r else ""),
         format_value(number(r.get("fro_norm")), "ratio"), format_value(number(r.get("relative_size")), "ratio")]
        for r in vector_rows(analysis)
    ]
    return headers, body


def rank_picture(analysis: Mapping, *, stacks: list | None = None) -> str:
    """The overall rank picture in two sentences, computed from the data.

    The first sentence gives the median energy-90% rank over all weight matrices
    as a share of the full rank (and the interquartile range); the second ranks the
    roles by that share, from the most to the least low-rank.
    """
    rows = matrix_rows(analysis)
    split = fused_wholes(rows)
    whole_groups = ({group_of(r) for r in rows if r["name"] in split}
                    - {group_of(r) for r in rows if r["name"] not in split})
    stacks = stacks_of(analysis) if stacks is None else stacks
    rows = by_projection(rows)  # a fused tensor counts once: through its projections
    if rows and all(unchanged(r) for r in rows):
        return (f"All {len(rows)} weight matrices are unchanged (ΔW = 0): the two checkpoints hold the same values "
                "in every compared tensor, so there is no update to measure. Check that TUNED is the fine-tune.")
    rows = [r for r in rows if not unchanged(r)]  # no update: no rank to report, none to rank
    if all(rounding_only(r) for r in rows):
        return (f"All {len(rows)} changed weight matrices hold no singular value above the storage dtype's "
                "rounding-noise floor: ΔW is rounding, not fine-tuning, so there is no rank to read. Check that "
                "TUNED is the fine-tune (an fp32 BASE saved as bf16 looks like this).")
    rows = [r for r in rows if not rounding_only(r)]
    left_out = left_out_text(analysis, stacks=stacks)  # the sentence beside the per-role table, word for word
    level = headline_level(analysis)
    at = percent(level)
    shares = interval_stats(_share_bounds(level)(r) for r in rows)
    ranks = interval_stats(energy_bounds(level)(r) for r in rows)
    if shares is None or ranks is None:
        return (f"The analysis holds {len(rows)} weight matrices but no energy-{at} ranks, "
                "so no rank picture can be drawn.")
    spread = (f" (middle half of modules: {share_text(shares['q1'])}–{share_text(shares['q3'])})"
              if shares["q1"] < shares["q3"] else "")
    counted = shares["n"]  # a sketched module may stop short of the level (and hold no interval for it)
    of = f"{counted}" if counted == len(rows) else f"{counted} of {len(rows)}"
    one = ranks["median"] == ranks.get("median_hi", ranks["median"]) == 1
    first = (
        f"Across {of} {'modules (fused tensors by projection)' if split else 'weight matrices'}, a median of "
        f"{format_median(ranks, 'rank')} singular direction{'' if one else 's'} {'holds' if one else 'hold'} {at} of "
        f"the update's energy, {format_median(shares, 'share')} of the full rank{spread}"
        + ("" if counted == len(rows) else f" (the others' energy-{at} ranks are beyond the values they hold)")
        + (f" ({ranks['unsettled']} of them only known to lie in an interval: the median lies in the range given)"
           if ranks.get("unsettled") else "") + "."
        + (f" {left_out}" if left_out else "")
    )
    # summary_rows leaves ΔW = 0 and the rounding-only matrices out too (and roles with no other matrix); qkv and
    # gate_up read through their parts
    by_role = [(entry["label"], entry[f"energy_rank_{level}_share"]) for entry in summary_rows(analysis, stacks=stacks)
               if (entry["stack"], entry["role"]) not in whole_groups]
    missing = [role for role, s in by_role if s is None]
    by_role = sorted(((role, s) for role, s in by_role if s is not None), key=lambda item: item[1]["median"])
    parts = ", ".join(f"{role} {format_median(s, 'share')}" for role, s in by_role)
    second = (f"By role, the median energy-{at} rank as a share of full rank runs from lowest to highest: {parts}"
              + (f" (none for {', '.join(missing)})" if missing else "") + ".")
    return f"{first} {second}{_activation_picture(rows)}"


def _activation_picture(rows: list[Mapping]) -> str:
    """A third sentence for a calibrated analysis: the rank of the output change on the data, at the headline
    level of the levels both spectra were measured at (0.9 by default)."""
    calibrated = [r for r in rows if r.get("activation")]
    levels = ({k for r in calibrated for k in (r["activation"].get("energy_rank") or {})}
              & {k for r in calibrated for k in (r.get("energy_rank") or {})})
    if not levels:
        return ""
    level = headline(levels)
    weighted = stats(_activation_energy(level)(r) for r in calibrated)
    plain = interval_stats(energy_bounds(level)(r) for r in calibrated)
    if weighted is None or plain is None:
        return ""
    tokens = max(int(r["activation"].get("tokens") or 0) for r in calibrated)
    return (f" Weighted by the calibration data's inputs ({tokens:,} tokens, {len(calibrated)} modules), the "
            f"median energy-{percent(level)} rank of the output change ΔW·x is "
            f"{format_value(weighted['median'], 'rank')}, against {format_median(plain, 'rank')} for ΔW itself.")


def _text(value) -> str:
    return "–" if value is None else str(value)
