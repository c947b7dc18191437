"""Functional ranks: the smallest swept rank whose truncated model stays within ε of the full fine-tune.

A sweep's curves are the whole model's (``model``) and, with ``groups="role"``, one per role of
each stack (:func:`role_curves`): a multimodal checkpoint's vision tower has a q of its own,
named "vision q" as the analysis reports name it, and never shares the language model's curve.

A curve the sweep found unreached by its eval data (``sweep.json``'s ``unreached``: truncating its
modules, to rank 0 included, changed no eval output, e.g. a vision tower on text) has no functional rank:
its flat curve is no evidence that the modules are not needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from spectra.errors import ConfigError
from spectra.files import record_origin, record_writer
from spectra.groups import group_label, group_of, stacks_in


def functional_ranks(sweep: Any, epsilon: float, *, non_target: str | None = None,
                     curve_of: Mapping[str, str] | None = None) -> dict:
    """Per curve of a truncation sweep, the smallest rank whose metric stays within ε of the full fine-tune.

    With ``gap(r)`` the metric's shortfall against the full fine-tune (``full − metric(r)`` when
    higher is better, ``metric(r) − full`` otherwise), the chosen rank is the smallest swept r
    with ``gap(r') ≤ ε`` for r and every larger swept r' (one lucky dip does not count). The
    sweep's noise is recorded beside it: eval examples, and the paired percentile-bootstrap
    interval of the gap; ``resolved`` is True when that whole interval lies within ε, i.e.
    the eval set is large enough to support the claim.

    A rank at or above every truncated module's full rank min(out, in) truncates nothing: that
    point is the full fine-tune itself, its gap 0 by construction. When it is the one chosen,
    ``at_full_rank`` says so: no swept rank below full rank met ε (its ``resolved`` is
    trivially True and says nothing about the eval set).

    A gap that is not a finite number (NaN or ±inf: the truncated model's outputs overflowed or went NaN at that
    rank; null when read back from ``sweep.json``) is not within ε, so the chosen rank lies above that
    point; the curve's ``nonfinite_gap`` lists such ranks. A full fine-tune whose own metric is not finite (or null)
    leaves no gap defined and is refused.

    A curve the sweep marked unreached by its eval data (``unreached`` in ``sweep.json``: at rank 0
    its changed modules left every example's loss and metric exactly the full fine-tune's) gets no
    rank: ``rank`` None and ``unreached`` True. Its curve is flat because the data never ran through
    those modules, and says nothing about the rank they need. A sweep written before the check
    (no ``unreached``) reads as it did.

    Parameters
    ----------
    sweep : SweepResult, dict, str or PathLike
        ``sweep.json`` of ``spectra sweep``, its directory, its dict or the result object.
    epsilon : float
        Tolerance ≥ 0 in the metric's units (0.01 = one accuracy point).
    non_target : {"tuned", "base"}, optional
        Which curve to read when both were swept. Default: the sweep's first (``tuned``).
    curve_of : mapping, optional
        :func:`role_curves` of the sweep's ``modules``, where the caller has them already
        (``recommend_ranks`` looks each module's curve up in them); computed here otherwise.

    Returns
    -------
    dict
        ``epsilon``, ``metric``, ``higher_is_better``, ``examples``, ``tuned`` (the full
        fine-tune's metric and interval), ``non_target``, ``bootstrap``, and ``groups``:
        curve (``model``, or a role curve of :func:`role_curves`: "q", "vision q") → ``rank``
        (None when no swept rank qualifies), ``metric``, ``gap``, ``gap_interval``,
        ``resolved``, ``swept``, ``full_rank`` (the largest full rank among the curve's
        modules, from which on nothing is truncated; None for a sweep that does not record it)
        and ``at_full_rank`` (the chosen rank is at or above it; None when either is unknown); an unreached
        curve has ``rank`` None, ``swept``, ``full_rank``, ``at_full_rank`` None and ``unreached`` True.
    """
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ConfigError(f"functional ε must be a number ≥ 0 in the metric's units, got {epsilon!r}.")
    data = read_sweep(sweep)
    non_target = non_target or data["non_target"][0]
    if non_target not in data["non_target"]:
        raise ConfigError(f"non_target {non_target!r}: the sweep measured {data['non_target']} only.")
    tuned_metric = data["reference"]["tuned"].get("metric")  # every gap is against it, whatever the non-targets
    if not _finite(tuned_metric):  # sweep.json holds a NaN or ±inf as null
        shown = "null (NaN or ±inf as sweep.json writes it)" if tuned_metric is None else tuned_metric
        raise ConfigError(f"the sweep's full fine-tune has {data['metric']['name']} {shown}: every gap is "
                          "measured against it, so no functional rank can be read. Check the tuned checkpoint and "
                          "the eval data (a NaN or an overflow in its outputs).")
    modules = data.get("modules") or []
    curve_of = role_curves(modules) if curve_of is None else curve_of
    curves: dict[str, list[dict]] = {}
    for p in data["points"]:
        if p["non_target"] == non_target and p["rank"] is not None:
            curves.setdefault(p["group"], []).append(p)
    if not curves:
        raise ConfigError("the sweep holds no rank points; sweep at least one rank.")
    unreached = unreached_curves(data, non_target)
    groups = {}
    for group, points in curves.items():
        points = sorted(points, key=lambda p: p["rank"])
        full = _full_rank(modules, curve_of, group)
        if group in unreached:  # flat because the data never ran through it: no evidence of any rank
            groups[group] = {"rank": None, "swept": [p["rank"] for p in points], "full_rank": full,
                             "at_full_rank": None, "unreached": True}
            continue
        chosen = None
        for p in reversed(points):  # from the top: the last rank before the curve leaves the ε band
            if not (_finite(p["gap"]) and p["gap"] <= epsilon):  # a NaN gap is not known to be within ε
                break
            chosen = p
        entry = {"rank": None if chosen is None else chosen["rank"], "swept": [p["rank"] for p in points],
                 "full_rank": full,
                 "at_full_rank": None if chosen is None or full is None else bool(chosen["rank"] >= full)}
        nonfinite = [p["rank"] for p in points if not _finite(p["gap"])]
        if nonfinite:
            entry["nonfinite_gap"] = nonfinite
        if chosen is not None:
            interval = chosen.get("gap_interval")
            known = interval is not None and _finite(interval[1])  # null in sweep.json where its bootstrap went NaN
            entry.update(metric=chosen["metric"], gap=chosen["gap"], gap_interval=interval,
                         resolved=bool(interval[1] <= epsilon) if known else None)
        groups[group] = entry
    return {"epsilon": float(epsilon), "metric": data["metric"]["name"],
            "higher_is_better": data["metric"]["higher_is_better"], "examples": data["examples"],
            "unit": data.get("unit"), "tuned": {k: data["reference"]["tuned"].get(k) for k in ("metric", "interval")},
            "non_target": non_target, "bootstrap": data.get("bootstrap"), "truncation": data.get("truncation"),
            "sweep": {"base": data.get("base"), "tuned": data.get("tuned"), "data": data.get("data"),
                      "fingerprints": data.get("fingerprints")},
            "modules": [m["name"] for m in data.get("modules", [])], "groups": groups}


def _finite(value) -> bool:
    """Whether a number of a sweep is finite: ``sweep.json`` writes NaN and ±inf as null, read back as None."""
    return value is not None and math.isfinite(value)


def role_curves(modules: list[Mapping]) -> dict[str, str]:
    """Module name → the role curve of a sweep that truncates it: its (stack, role) group as the reports label it.

    ``modules`` are the rows of ``sweep.json``'s ``modules`` (``name``, ``role`` and, for a module
    outside the language model, ``stack``): every targeted module of the sweep, since whether
    its roles read "q" or "vision q" depends on the stacks the sweep truncates
    (:func:`~spectra.groups.group_label`). A row without a stack, as every row of a sweep
    written before stacks existed, is the language model's: its curve is named by its role. A row
    without a role (none that spectra writes) is on no role curve.

    >>> role_curves([{"name": "layers.0.q_proj", "role": "q"},
    ...              {"name": "vision_tower.encoder.layers.0.q_proj", "role": "q", "stack": "vision"}])
    {'layers.0.q_proj': 'q', 'vision_tower.encoder.layers.0.q_proj': 'vision q'}
    """
    stacks = stacks_in(modules)
    return {m["name"]: group_label(group_of(m), stacks) for m in modules if "role" in m}


def unreached_curves(sweep: Mapping, non_target: str) -> set[str]:
    """The curves a sweep (``sweep.json``'s dict) found unreached by its eval data with non-targets from
    ``non_target``: none for a sweep written before it checked."""
    return {u["group"] for u in sweep.get("unreached") or () if non_target in u.get("non_target", ())}


def _full_rank(modules: list[Mapping], curve_of: Mapping[str, str], group: str) -> int | None:
    """The rank from which a curve truncates nothing: the largest full rank of its modules (all of them for
    ``model``, those ``curve_of`` puts in it otherwise); None when the sweep does not record them."""
    ranks = [m.get("full_rank") for m in modules if group == "model" or curve_of.get(m["name"]) == group]
    return max(ranks) if ranks and all(isinstance(r, int) for r in ranks) else None


def read_sweep(sweep: Any) -> dict:
    """A truncation sweep as a dict, from the result object, its dict, ``sweep.json`` or its directory.

    A rank sweep of `spectra verify --sweep`, whose record is also named ``sweep.json``, is refused by name: by its
    ``"command"``, or its ``"kind"`` where older (:func:`spectra.files.record_writer`).
    """
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
    writer = record_writer(sweep)
    if writer not in (None, "sweep"):  # `spectra verify --sweep` writes a sweep.json too: a rank sweep
        raise ConfigError(f"{where} is {record_origin(sweep)}; --functional (functional_ranks, SweepResult.load) takes "
                          "the truncation sweep of `spectra sweep`: pass the directory or sweep.json it wrote.")
    if not isinstance(sweep, Mapping) or sweep.get("kind") != "truncation_sweep":
        kind = sweep.get("kind") if isinstance(sweep, Mapping) else type(sweep).__name__
        raise ConfigError(f"{where} is not a truncation sweep (kind {kind!r}): pass the result of "
                          "truncation_sweep, or the sweep.json that `spectra sweep` wrote.")
    return dict(sweep)
