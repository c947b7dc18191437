"""Report of ``spectra sweep``: the metric of truncated fine-tunes against rank.

Same shape as the other reports (:mod:`spectra.report.verify`): ``sweep.json``, Markdown and
self-contained HTML from one list of blocks, figures as PNG and SVG, the directory built
beside its destination and renamed into place. Figures are :class:`matplotlib.figure.Figure`
objects built without ``pyplot``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from spectra.errors import ConfigError
from spectra.files import record_origin, record_writer
from spectra.groups import curve_name, stacks_in
from spectra.ranks.functional import role_curves, unreached_curves
from spectra.report.render import plain, write_bundle
from spectra.report.tables import num, stack_label

_STYLE = {"tuned": dict(color="tab:blue", marker="o"), "base": dict(color="tab:orange", marker="s")}
_STACK_LINES = ("-", "--", ":", "-.")  # role curves of the language model, then of each other stack (report order)


def write_truncation_report(sweep: Mapping, out_dir, *, overwrite: bool = False,
                            marks: Mapping[str, int] | None = None, plan=None,
                            functional: Mapping | None = None) -> Path:
    """Write a truncation sweep as ``sweep.json``, ``report.md``, ``report.html``, ``figures/``, atomically.

    ``sweep.json`` says ``"command": "sweep"``: `spectra verify --sweep` writes a ``sweep.json`` too (a rank
    sweep), and neither replaces (``overwrite``) nor reads the other's.

    Parameters
    ----------
    sweep : mapping
        ``spectra.sweep.SweepResult.to_dict()``.
    out_dir : path
        Directory to create (refused if it exists, unless ``overwrite``).
    marks : mapping, optional
        Label → rank, drawn as vertical lines (e.g. ``{"functional ε=0.01": 8,
        "energy 0.9 (median)": 96}``) and listed; stored in ``sweep.json`` as ``marks``.
    plan : RankPlan, optional
        Also written, as ``plan.json`` (:func:`spectra.ranks.save_plan`), into the staged
        directory: the output appears with every file at once, or not at all.
    functional : mapping, optional
        :func:`spectra.ranks.functional_ranks` of this sweep: its ε, non-target source and
        per-curve choices are stored in ``sweep.json`` as ``functional`` and stated in the
        summary (a choice at full rank as such: no swept rank below full rank met ε).
    """
    if record_writer(sweep) not in (None, "sweep"):  # verify --sweep's rank sweep: its own report, not this one
        raise ConfigError(f"the given sweep is {record_origin(sweep)}; write_truncation_report writes the truncation "
                          "sweep of `spectra sweep` (a rank sweep's report: spectra.report.verify.write_sweep_report).")
    if sweep.get("kind") != "truncation_sweep" or not sweep.get("points"):
        raise ConfigError("not a truncation sweep with points; nothing to report.")
    data = dict(sweep) | {"marks": dict(marks or sweep.get("marks") or {})}
    if functional is not None:
        data["functional"] = {k: functional[k] for k in ("epsilon", "metric", "non_target", "groups")}
    figures = {"curve": plot_truncation_curve(data, marks=data["marks"])}
    if any(p["group"] not in ("model", "plan") for p in data["points"]):
        figures["roles"] = plot_role_curves(data)
    extra = None
    if plan is not None:
        from spectra.ranks import save_plan

        extra = {"plan.json": lambda path: save_plan(plan, path)}
    return write_bundle(out_dir, "sweep.json", data, figures, truncation_blocks, command="sweep", overwrite=overwrite,
                        extra=extra, writer="sweep")


# ---------------------------------------------------------------------------- figures


def plot_truncation_curve(sweep: Mapping, *, marks: Mapping[str, int] | None = None,
                          group: str = "model") -> Figure:
    """Metric vs rank (one line per non-target source), the base and full fine-tune as lines, marks as verticals."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    metric = sweep["metric"]["name"]
    for mode in sweep["non_target"]:
        points = sorted((p for p in sweep["points"] if p["group"] == group and p["non_target"] == mode
                         and p["rank"] is not None), key=lambda p: p["rank"])
        positive = [p for p in points if p["rank"] > 0]
        label = f"truncated ΔW, non-targets from {mode}"
        _errorbar(ax, [p["rank"] for p in positive], positive, label=label, **_STYLE.get(mode, {}))
        for p in points:
            if p["rank"] == 0 and mode == "tuned":
                ax.axhline(p["metric"], color=_STYLE["tuned"]["color"], ls="--", lw=1,
                           label="rank 0 (ΔW off, non-targets from tuned)")
    planned = sorted(m["plan_rank"] for m in sweep.get("modules", []) if m.get("plan_rank"))
    for p in (p for p in sweep["points"] if p["group"] == "plan" and planned):  # the plan's adapter on the base
        ax.scatter([planned[len(planned) // 2]], [p["metric"]], marker="*", s=160, zorder=4,
                   color=_STYLE.get(p["non_target"], {}).get("color", "black"),
                   label=f"plan (median rank; the rest from {p['non_target']}"
                         + (", its saved head from tuned)" if p.get("saved_from_tuned") else ")"))
    ref = sweep.get("reference", {})
    for name, style in (("tuned", dict(color="black", ls="-")), ("base", dict(color="0.55", ls=":"))):
        if name in ref:
            ax.axhline(ref[name]["metric"], lw=1.4, label="full fine-tune" if name == "tuned" else "base", **style)
            if ref[name].get("interval"):
                ax.axhspan(*ref[name]["interval"], color=style["color"], alpha=0.08, lw=0)
    for (label, rank), color in zip((marks or {}).items(), ("tab:red", "tab:green", "tab:purple", "tab:brown")):
        ax.axvline(rank, color=color, ls=":", lw=1.6, label=f"{label}: r={rank}")
    if any(p["rank"] for p in sweep["points"] if p["rank"]):
        # a mark at rank 0 (a functional rank within a loose ε) has no place on a log axis, which had stretched to
        # 2⁻⁴⁹ to reach it: a symmetric log axis is linear from 0 to 1, then log₂
        zero = any(rank == 0 for rank in (marks or {}).values())
        ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5) if zero else ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of every truncated ΔW" if group == "model" else f"rank r of the {group} updates")
    ax.set_ylabel(f"eval {metric}")
    ax.set_title(f"{metric} vs rank ({sweep.get('truncation')} truncation, {sweep.get('examples')} eval examples, "
                 + (f"{_pct_conf(sweep)} bootstrap intervals)" if _has_intervals(sweep) else "no intervals)"),
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_role_curves(sweep: Mapping) -> Figure:
    """One line per role curve: only that role (of one stack) truncated, every other target at the full fine-tune.

    Where the sweep truncates several stacks, each stack's curves have a line style of their own ("vision q" dashed
    beside the language model's solid "q").
    """
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    mode = sweep["non_target"][0]
    modules = sweep.get("modules") or []
    stacks = stacks_in(modules)
    curve_of = role_curves(modules)
    stack_of = {curve_of[m["name"]]: m.get("stack") for m in modules if m["name"] in curve_of}
    roles = list(dict.fromkeys(p["group"] for p in sweep["points"] if p["group"] not in ("model", "plan")))
    unreached = unreached_curves(sweep, mode)
    for role in roles:
        points = sorted((p for p in sweep["points"] if p["group"] == role and p["non_target"] == mode
                         and p["rank"]), key=lambda p: p["rank"])
        style = ({"ls": _STACK_LINES[stacks.index(stack_of[role]) % len(_STACK_LINES)]}
                 if len(stacks) > 1 and role in stack_of else {})
        label = f"{role} (not reached by the data)" if role in unreached else role  # flat, and no evidence of rank
        _errorbar(ax, [p["rank"] for p in points], points, label=label, marker="o", **style)
    ref = sweep.get("reference", {})
    if "tuned" in ref:
        ax.axhline(ref["tuned"]["metric"], color="black", lw=1.4, label="full fine-tune")
    if "base" in ref:
        ax.axhline(ref["base"]["metric"], color="0.55", ls=":", lw=1.4, label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of one role's updates (the others at full rank)")
    ax.set_ylabel(f"eval {sweep['metric']['name']}")
    ax.set_title(f"{sweep['metric']['name']} vs rank, one role truncated at a time ({sweep.get('truncation')} "
                 f"truncation, non-targets from {mode})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _errorbar(ax, x, points, *, label, **style) -> None:
    if not points:
        return
    y = [p["metric"] for p in points]
    err = None
    if all(p.get("interval") for p in points):
        err = [[max(v - p["interval"][0], 0.0) for v, p in zip(y, points)],
               [max(p["interval"][1] - v, 0.0) for v, p in zip(y, points)]]
    ax.errorbar(x, y, yerr=err, capsize=3, lw=1.5, label=label, **style)


# ---------------------------------------------------------------------------- blocks


def truncation_blocks(sweep: Mapping, *, figures: list[str]) -> list[tuple]:
    """The sweep report as render blocks."""
    metric, ref = sweep["metric"]["name"], sweep.get("reference", {})
    boot = sweep.get("bootstrap") or {}
    items = [f"Base: {sweep.get('base')}", f"Full fine-tune: {sweep.get('tuned')}",
             f"Eval data: {sweep.get('data')} — {sweep.get('examples')} examples ({sweep.get('units')} "
             f"{sweep.get('unit')}); intervals: "
             + (f"{_pct_conf(sweep)} percentile bootstrap over examples, {boot.get('replicates')} replicates, "
                "paired for the gap" if _has_intervals(sweep) else
                f"none ({boot.get('none_because') or 'no bootstrap'})"),
             f"Truncation: {sweep.get('truncation')}; non-targeted tensors from: {', '.join(sweep['non_target'])}",
             f"Metric: {metric} ({'higher' if sweep['metric']['higher_is_better'] else 'lower'} is better)"]
    items += [f"{k}: {metric} {num(v['metric'])} {interval_text(v.get('interval'))}" for k, v in ref.items()]
    items += [f"Marked — {label}: rank {rank}" for label, rank in (sweep.get("marks") or {}).items()]
    # flagged here, said once: the curve's note (in the notes) gives the what and the why
    items += [f"Not reached by the eval data: {curve_name(u['group'])} (non-targets from "
              f"{' and '.join(u['non_target'])}); see the notes" for u in sweep.get("unreached") or ()]
    functional = sweep.get("functional") or {}
    items += [f"Functional rank ({group}, ε={functional['epsilon']:g}, non-targets from {functional['non_target']}): "
              + functional_text(entry) for group, entry in functional.get("groups", {}).items()]
    headers = ["curve", "non-targets", "rank", metric, "gap to full", "loss", "accuracy"]
    rows = [[p["group"], p["non_target"], "plan" if p["rank"] is None else str(p["rank"]),
             f"{num(p['metric'])} {interval_text(p.get('interval'))}",
             f"{signed(p['gap'])} {interval_text(p.get('gap_interval'))}",
             num(p["loss"]), num(p["accuracy"])] for p in sweep["points"]]
    stacks = stacks_in(sweep.get("modules") or [])
    per = ("Per role" if len(stacks) < 2 else  # "Per role of each stack (language model, vision; …: "vision q")"
           f"Per role of each stack ({', '.join(stack_label(s, stacks) for s in stacks)}; a role of another stack "
           f"than the {stack_label(None, stacks)}'s is named after it: "
           f"\"{next(s for s in stacks if s is not None)} q\")")
    captions = {"curve": f"Eval {metric} with every targeted ΔW replaced by its best rank-r truncation; the full "
                         "fine-tune and the base as horizontal lines (shaded: their intervals).",
                "roles": f"{per}: only that role's updates truncated, every other target at full rank."}
    blocks: list[tuple] = [("h", 1, "spectra sweep: how much rank does the fine-tune's function need?"),
                           ("p", headline(sweep)), ("h", 2, "Summary"), ("ul", items), ("h", 2, "Figures")]
    blocks += [("figure", f, captions.get(f, f)) for f in figures]
    blocks += [("h", 2, "Points"), ("p", "gap = shortfall against the full fine-tune (positive: worse)."),
               ("table", headers, rows)]
    if sweep.get("notes"):
        blocks += [("h", 3, "Notes"), ("ul", list(sweep["notes"]))]
    blocks += [("h", 2, "Configuration"), ("code", json.dumps(plain(sweep.get("config", {})), indent=2))]
    return blocks


def headline(sweep: Mapping) -> str:
    """'Rank 8 keeps 0.82 accuracy of the full fine-tune's 0.88 (base 0.12).'"""
    metric, ref = sweep["metric"]["name"], sweep.get("reference", {})
    curve = sorted((p for p in sweep["points"] if p["group"] == "model" and p["non_target"] == sweep["non_target"][0]
                    and p["rank"]), key=lambda p: p["rank"])
    if not curve or "tuned" not in ref:
        return f"{len(sweep['points'])} truncated configurations evaluated."
    parts = ", ".join(f"rank {p['rank']} {num(p['metric'])}" for p in curve)
    return (f"Eval {metric} with every targeted update truncated: {parts}; the full fine-tune reaches "
            f"{num(ref['tuned']['metric'])} and the base {num(ref.get('base', {}).get('metric'))}.")


def functional_text(entry: Mapping) -> str:
    """One curve's functional rank (an entry of ``functional_ranks(...)["groups"]``) in words, for the terminal
    and the report: '4 (gap +0.008, interval [-0.002, 0.02], resolved)'."""
    if entry.get("unreached"):
        return ("none: the eval data never reached this curve's modules (at rank 0 every example's outputs are the "
                "full fine-tune's); recommend gives them their spectral rank")
    nonfinite = entry.get("nonfinite_gap")
    note = (f"; the metric is not finite at rank {', '.join(map(str, nonfinite))}, read as outside ε"
            if nonfinite else "")
    if entry.get("rank") is None:
        return "none of the swept ranks" + note
    gap = f"gap {signed(entry['gap'])}, " + (f"interval {interval_text(entry['gap_interval'])}"
                                             if entry.get("gap_interval") else "no interval (no bootstrap)")
    if entry.get("at_full_rank"):  # the full fine-tune itself: gap 0 by construction, "resolved" says nothing
        below = any(r < entry["full_rank"] for r in entry.get("swept", ()))
        return (f"{entry['rank']}, full rank: "
                + ("no swept rank below full rank met ε" if below else "no rank below full rank was swept")
                + f" ({gap})" + note)
    resolved = {True: "resolved", False: "not resolved by this eval set"}.get(entry.get("resolved"), "")
    return f"{entry['rank']} ({gap}" + (f", {resolved})" if resolved else ")") + note


def signed(value) -> str:
    """A gap with its sign, 4 significant digits: '+0.01184', '-0.002', '+0' (never '-0')."""
    return "–" if value is None else f"{value + 0.0:+.4g}"  # + 0.0: -0.0 (the full fine-tune's own gap) is 0


def interval_text(interval) -> str:
    """'[lo, hi]' with 4 significant digits ('[0, 0]', never '-0'); '' for none."""
    return "" if not interval else f"[{num(interval[0] + 0.0)}, {num(interval[1] + 0.0)}]"



def _has_intervals(sweep: Mapping) -> bool:
    """Whether the sweep computed bootstrap intervals (replicates run, more than one eval example)."""
    return bool((sweep.get("bootstrap") or {}).get("replicates")) and (sweep.get("examples") or 0) >= 2


def _pct_conf(sweep: Mapping) -> str:
    return f"{100 * (sweep.get('bootstrap') or {}).get('confidence', 0.95):g}%"
