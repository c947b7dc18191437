"""Figures of an analysis: spectra decay, cumulative energy, layer × role heatmaps, rank histogram.

Role panels and heatmap cells group modules by stack and role (:func:`~spectra.report.tables.groups_in`),
so a vision tower's layer-0 q_proj is never drawn as the language model's.

Every function takes the analysis dict (what ``analysis.json`` holds) and returns a
:class:`matplotlib.figure.Figure` built directly, not through ``pyplot``, so no global
figure state leaks and nothing is ever shown. Saving uses the Agg/SVG canvases that
``Figure.savefig`` picks by file type.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from spectra.groups import group_label, group_of
from spectra.report.tables import (
    by_projection,
    energy_curve,
    energy_bounds,
    energy_levels,
    format_median,
    full_rank,
    fused_wholes,
    groups_in,
    headline,
    headline_level,
    interval_stats,
    layer_role_grids,
    left_out_text,
    matrix_rows,
    number,
    percent,
    rounding_only,
    stack_label,
    stacks_of,
    unchanged,
    unchanged_text,
)

# viridis without its pale-yellow top, so the last layer's line stays visible on white.
_LAYER_CMAP = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.88, 256)), name="layers")
_NO_LAYER_COLOR = "0.45"
_LOG_X_FROM = 100  # decay panels of spectra longer than this use a log index axis
_ANNOTATE_CELLS = 300  # heatmaps with at most this many cells get their numbers written in


def energy_marks(analysis: Mapping) -> tuple[float, ...]:
    """The energy levels the cumulative-energy figure marks: the analysis's own from 75 % up (90, 95 and 99 % by
    default; ``--energy 0.8,0.95`` marks 80 and 95 %). Lower ones sit on every curve's steep start."""
    return tuple(float(level) for level in energy_levels(analysis) if float(level) >= 0.75) or (0.9, 0.95, 0.99)


def energy_marks_text(marks: tuple[float, ...], *, each: bool = False) -> str:
    """The marks of :func:`energy_marks` as text, one % sign at the end: "90, 95 and 99%", the dotted lines a
    caption lists; with ``each``, "90 / 95 / 99%", for the figure's title, which asks how many directions reach
    each level (one count per level, not one count reaching all three)."""
    levels = [percent(mark)[:-1] for mark in marks]  # "90", "99.5": as the tables write a level, less its %
    if each:
        return " / ".join(levels) + "%"
    return (", ".join(levels[:-1]) + " and " if len(levels) > 1 else "") + levels[-1] + "%"


def plot_decay(analysis: Mapping, *, stacks: list | None = None) -> Figure:
    """Singular-value decay σᵢ/σ₁ of ΔW per role, one line per layer, with the noise floor.

    The noise floor is the Marchenko–Pastur edge of the dtype rounding noise divided
    by σ₁ (median over the role's modules, with their range shaded); directions
    below it are not signal.

    Parameters
    ----------
    analysis : mapping
        The analysis dict.
    stacks : list, optional
        Its stacks (:func:`~spectra.report.tables.stacks_of`), where the caller has them.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per role, log y (and log x for spectra longer than 100 values).
    """
    rows = matrix_rows(analysis)
    fig, axes, norm = _role_grid(rows)
    stacks = stacks_of(analysis) if stacks is None else stacks
    for ax, group in zip(axes, groups_in(rows)):
        members = [r for r in rows if group_of(r) == group]
        drawn = 0
        for row in members:
            s = np.asarray(row["singular_values"], dtype=np.float64)  # (k,)
            if s.size == 0 or s[0] <= 0:
                continue  # ΔW = 0: no direction to normalise by
            ratio = s / s[0]
            index = np.arange(1, s.size + 1)
            keep = ratio > 0  # exact zeros have no place on a log axis
            ax.plot(index[keep], ratio[keep], **_line_style(row, norm))
            drawn += 1
        floors = [_noise_floor(r) for r in members]
        floors = [f for f in floors if f is not None]
        if floors and drawn:
            ax.axhline(float(np.median(floors)), color="0.15", ls="--", lw=1.2,
                       label=r"noise floor (MP edge / $\sigma_1$)")
            if min(floors) < max(floors):
                ax.axhspan(min(floors), max(floors), color="0.5", alpha=0.15, lw=0)
        _finish_panel(ax, group_label(group, stacks), members, drawn)
        if drawn:
            ax.set_yscale("log")
            if max(len(r["singular_values"]) for r in members) > _LOG_X_FROM:
                ax.set_xscale("log")
            else:  # i counts directions: no 2.5 on a short (k, v) spectrum's axis
                ax.xaxis.set_major_locator(whole_ticks())
        ax.set_xlabel("singular direction i (index)")
        ax.set_ylabel(r"$\sigma_i / \sigma_1$ (ratio, log scale)")
    fig.suptitle("Singular-value decay of ΔW per role: a steep fall to the noise floor means a low-rank update")
    return fig


def plot_cumulative_energy(analysis: Mapping, *, stacks: list | None = None) -> Figure:
    """Cumulative energy share of the top-r directions of ΔW per role, one line per layer.

    Dotted lines mark the analysis's energy levels from 75 % up (:func:`energy_marks`: 90%, 95%
    and 99% by default); where a curve crosses them is the
    module's energy rank at that level. A curve that ends below 1 comes from a
    spectrum truncated to its top values. The rank axis is linear and ends at 1.5×
    the role's largest 99% rank, past which every curve is flat.

    Parameters
    ----------
    analysis : mapping
        The analysis dict.
    stacks : list, optional
        Its stacks (:func:`~spectra.report.tables.stacks_of`), where the caller has them.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per role.
    """
    rows = matrix_rows(analysis)
    marks = energy_marks(analysis)
    fig, axes, norm = _role_grid(rows)
    stacks = stacks_of(analysis) if stacks is None else stacks
    for ax, group in zip(axes, groups_in(rows)):
        members = [r for r in rows if group_of(r) == group]
        drawn = 0
        for row in members:
            energy = energy_curve(row)  # (k,)
            if energy.size == 0:
                continue
            # rank 0 captures nothing: starting at (0, 0) keeps rank-1 updates visible as a jump
            ax.plot(np.arange(energy.size + 1), np.concatenate([[0.0], energy]), **_line_style(row, norm))
            drawn += 1
        for level in marks:
            ax.axhline(level, color="0.3", ls=":", lw=0.9)
            ax.annotate(f"{100 * level:.4g}%", (1.0, level), xycoords=("axes fraction", "data"), xytext=(2, 0),
                        textcoords="offset points", va="center", fontsize=7, color="0.3")
        _finish_panel(ax, group_label(group, stacks), members, drawn)
        if drawn:
            ax.set_xlim(0, _energy_zoom(members))
            ax.xaxis.set_major_locator(whole_ticks())  # r counts directions
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("rank r (top singular directions kept)")
        ax.set_ylabel("share of ‖ΔW‖² captured")
    fig.suptitle(f"Cumulative energy of ΔW per role: how many directions reach {energy_marks_text(marks, each=True)} "
                 "of the update")
    return fig


def plot_rank_heatmap(analysis: Mapping, *, level: str | None = None) -> Figure:
    """Layer × role heatmap of the energy rank at ``level`` (median over experts in a cell).

    Parameters
    ----------
    analysis : mapping
        The analysis dict.
    level : str, optional
        Key of ``energy_rank`` ("0.5", "0.9", …); default the headline level
        (:func:`~spectra.report.tables.headline_level`: 0.9, else the measured level nearest it).

    Returns
    -------
    matplotlib.figure.Figure
    """
    level = headline_level(analysis) if level is None else level
    bounds = energy_bounds(level)
    # a cell is the median of its modules' ranks (a layer's experts); where the sketch left some open, the medians
    # of their lower and upper ends bound it: the colour is the lower, the text "lo–hi", the cell hatched
    return _heatmap(matrix_rows(analysis), lambda row: (bounds(row) or (None,))[0],
                    label=f"energy-{percent(level)} rank (directions)",
                    title=f"Energy-{percent(level)} rank of ΔW by layer and role", fmt="{:g}", integer=True,
                    high=lambda row: (bounds(row) or (None, None))[1])


def plot_relative_size_heatmap(analysis: Mapping) -> Figure:
    """Layer × role heatmap of the relative update size ‖ΔW‖_F / ‖W_base‖_F.

    Parameters
    ----------
    analysis : mapping
        The analysis dict.

    Returns
    -------
    matplotlib.figure.Figure
    """
    return _heatmap(matrix_rows(analysis), lambda row: number(row.get("relative_size")),
                    label=r"$\|\Delta W\|_F \,/\, \|W_{base}\|_F$ (ratio)",
                    title="Relative update size by layer and role", fmt="{:.2g}")


def plot_effective_rank_histogram(analysis: Mapping, *, stacks: list | None = None) -> Figure:
    """Histograms of the entropy effective rank of ΔW, absolute and as a share of full rank.

    Parameters
    ----------
    analysis : mapping
        The analysis dict.
    stacks : list, optional
        Its stacks (:func:`~spectra.report.tables.stacks_of`), where the caller has them.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels; the median is marked in each. A fused tensor reported whole and by projection (GPT-2's
        ``c_attn``) is counted by its projections, as the rank picture counts it.
    """
    every = matrix_rows(analysis)
    # ΔW = 0 has no rank to count (its 0 would drag the median), rounding alone no rank of the fine-tune's; a fused
    # whole is counted through its projections
    rows = [r for r in by_projection(every) if not unchanged(r)]
    if all(rounding_only(r) for r in rows):  # no signal anywhere: the rounding's ranks are all there is to show
        left_out = unchanged_text(analysis, stacks=stacks)
    else:
        rows, left_out = [r for r in rows if not rounding_only(r)], left_out_text(analysis, stacks=stacks)
    pairs = [(number(r.get("effective_rank")), full_rank(r)) for r in rows]
    pairs = [(e, f) for e, f in pairs if e is not None]
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if not rows:
        for ax in (left, right):
            _empty(ax, "ΔW = 0 in every module: no rank to show")
        fig.suptitle("Entropy effective rank of ΔW: every weight matrix is unchanged (ΔW = 0), no rank to show")
        return fig
    if not pairs:
        for ax in (left, right):
            _empty(ax, "no module has an entropy effective rank")
        fig.suptitle("Entropy effective rank of ΔW: not available")
        return fig
    ranks = np.array([e for e, _ in pairs])  # (m,)
    shares = np.array([100.0 * e / f for e, f in pairs if f > 0])
    _histogram(left, ranks, unit="", log_ok=True)
    left.set_xlabel("entropy effective rank (directions)")
    _histogram(right, shares, unit="%", log_ok=False)
    right.set_xlabel("entropy effective rank / full rank (%)")
    for ax in (left, right):
        ax.set_ylabel("modules (count)")
        ax.yaxis.set_major_locator(whole_ticks())  # a count of modules
    # the entropy needs every σ: modules whose spectrum was only computed to its top have none
    modules = "modules (fused tensors by projection)" if fused_wholes(every) else "modules"
    over = f"{ranks.size} {modules}" if ranks.size == len(rows) else (
        f"the {ranks.size} of {len(rows)} modules with a whole spectrum (the others' top only; --method full: all)")
    fig.suptitle(f"Entropy effective rank of ΔW over {over}: median {np.median(ranks):.3g} "
                 f"directions, {np.median(shares) if shares.size else 0:.1f}% of full rank"
                 + (f"\n{left_out}" if left_out else ""))
    return fig


def all_figures(analysis: Mapping, *, stacks: list | None = None) -> dict[str, Figure]:
    """Every report figure, keyed by the file stem it is saved under; ``stacks``: the analysis's
    (:func:`~spectra.report.tables.stacks_of`), computed here once where the caller has not."""
    stacks = stacks_of(analysis) if stacks is None else stacks
    return {
        "decay": plot_decay(analysis, stacks=stacks),
        "cumulative_energy": plot_cumulative_energy(analysis, stacks=stacks),
        "rank_heatmap": plot_rank_heatmap(analysis),
        "relative_size_heatmap": plot_relative_size_heatmap(analysis),
        "effective_rank_hist": plot_effective_rank_histogram(analysis, stacks=stacks),
    }


# ---------------------------------------------------------------------------- role panels


def _role_grid(rows: list[dict]) -> tuple[Figure, list, Normalize | None]:
    """A figure with one panel per role of each stack (:func:`~spectra.report.tables.groups_in`), and the layer
    colour scale (with its colorbar)."""
    groups = groups_in(rows)
    ncols = min(len(groups), 3)
    nrows = -(-len(groups) // ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.2, 3.4 * nrows + 0.6), layout="constrained")
    grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in grid[len(groups):]:
        ax.set_visible(False)  # the grid is rectangular; roles may not fill it
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    norm = None
    if len(layers) > 1:
        norm = Normalize(vmin=layers[0], vmax=layers[-1])
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=_LAYER_CMAP), ax=list(grid[: len(groups)]),
                           shrink=0.9, aspect=30)
        bar.set_label("layer (index)")
        bar.locator = whole_ticks()  # layer indices
        bar.update_ticks()
    return fig, list(grid[: len(groups)]), norm


def _line_style(row: Mapping, norm: Normalize | None) -> dict:
    layer = row.get("layer")
    if layer is None:
        return {"color": _NO_LAYER_COLOR, "ls": "-.", "lw": 1.4, "label": f"{row['name']} (no layer)"}
    color = _LAYER_CMAP(norm(layer)) if norm is not None else _LAYER_CMAP(0.0)
    label = None if norm is not None else f"layer {layer}"  # one layer: a legend instead of a colorbar
    return {"color": color, "lw": 1.3, "alpha": 0.9, "label": label}


def _energy_zoom(members: list[dict]) -> float:
    """Right end of the energy axis: 1.5× the largest 99% rank (at least 8), within the spectrum.

    Past the 99% rank every curve is flat at 1, so showing all of a 4096-long spectrum
    would squeeze the part that matters against the left edge.
    """
    longest = max(len(r["singular_values"]) for r in members)
    top_level = max((k for r in members for k in (r.get("energy_rank") or {})), key=float, default="0.99")
    ranks = [energy_bounds(top_level)(r) for r in members]  # an unsettled rank: the top of its interval
    top = max((hi for _, hi in filter(None, ranks)), default=longest)
    return float(min(longest, max(8.0, np.ceil(1.5 * top))))


def _noise_floor(row: Mapping) -> float | None:
    """MP edge of the dtype noise relative to σ₁, or None when either is missing."""
    edge = number((row.get("noise") or {}).get("mp_edge"))
    top = number(row["singular_values"][0]) if row["singular_values"] else None  # null in a file: a non-finite σ₁
    if edge is None or edge <= 0 or top is None or top <= 0:
        return None
    return edge / top


def _finish_panel(ax, role: str, members: list[dict], drawn: int) -> None:
    """Panel title with the role's median energy-90% rank (`role`: its label, "vision q" beside another stack); a
    note where nothing could be drawn."""
    level = headline({k for r in members for k in (r.get("energy_rank") or {})})
    # the median over the modules the per-role table counts, as it gives it: ΔW = 0 has no rank, rounding alone
    # none of the fine-tune's, an unsettled rank enters as its interval
    median = interval_stats(energy_bounds(level)(r) for r in members if not unchanged(r) and not rounding_only(r))
    full = int(np.median([full_rank(r) for r in members]))
    rank = "–" if median is None else format_median(median, "rank")  # as the tables print it
    still = sum(unchanged(r) for r in members)
    noise = sum(rounding_only(r) for r in members if not unchanged(r))
    ax.set_title(f"{role}: {len(members)} module{'s' * (len(members) != 1)}"
                 + (f", {still} unchanged" if still else "") + (f", {noise} rounding only" if noise else "")
                 + f", median E{percent(level)[:-1]} rank {rank} of {full}", fontsize=10)
    if not drawn:
        _empty(ax, "ΔW = 0 in every module of this role")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        # several modules may share a label (a layer's split projection, its experts): list each once
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.grid(True, which="major", color="0.9", lw=0.6)


def whole_ticks() -> MaxNLocator:
    """Ticks for an axis that counts (a σ index, a rank, modules, layers): as many as matplotlib's default fits,
    whole numbers only, at steps of 1, 2 or 5 times a power of ten (0, 50, 100 rather than 0, 25, 50, …).
    Every report figure ticks its counts with it (the φ panels of :mod:`spectra.report.verify` too)."""
    return MaxNLocator(nbins="auto", integer=True, steps=[1, 2, 5, 10])


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.3")


# ---------------------------------------------------------------------------- heatmaps


def _heatmap(rows: list[dict], value, *, label: str, title: str, fmt: str, integer: bool = False,
             high=None) -> Figure:
    """Layer × role grid of ``value(row)`` (median where a cell holds several experts), one panel per stack
    (:func:`~spectra.report.tables.layer_role_grids`: a language model and its vision tower), top to bottom, each as
    tall as its layers, on one colour scale so that colours compare across them; ``integer``: the values are counts,
    so a linear colorbar ticks whole numbers only. ``high(row)``, where given, is the upper end of an interval
    whose lower end ``value(row)`` is (an energy rank the sketch left unsettled): a cell whose medians of the two
    differ is hatched and reads "lo–hi"."""
    grids = layer_role_grids(rows, value)
    highs = [g.values for g in layer_role_grids(rows, high)] if high is not None else [g.values for g in grids]
    heights = [len(g.layers) for g in grids]
    width = max(len(g.roles) for g in grids)
    fig = Figure(figsize=(min(1.0 * width + 3.0, 14), min(0.32 * sum(heights) + 1.0 * len(grids) + 1.2, 24)),
                 layout="constrained")
    axes = fig.subplots(len(grids), 1, squeeze=False, height_ratios=heights)[:, 0]
    # cividis stays ordered in greyscale; empty cells get a light grey that no value takes.
    cmap = colormaps["cividis"].with_extremes(bad="0.93")
    norm = _color_norm(np.concatenate([g.values.ravel() for g in grids]))
    annotate = sum(g.values.size for g in grids) <= _ANNOTATE_CELLS
    open_cells = False
    for ax, g, top in zip(axes, grids, highs):
        image = ax.imshow(np.ma.masked_invalid(g.values), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        unsettled = np.isfinite(g.values) & (top != g.values)  # (layers, roles)
        for i, j in zip(*np.nonzero(unsettled)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", lw=0, ec="0.55"))
        open_cells = open_cells or bool(unsettled.any())
        if annotate:
            _annotate(ax, g.values, norm, cmap, fmt, np.where(unsettled, top, g.values))
        _heatmap_axes(ax, g.roles, g.layers)
        ax.set_xlim(-0.5, width - 0.5)  # cells of one width in every panel; a stack with fewer roles ends early
        if len(grids) > 1:
            ax.set_title(stack_label(g.stack, [h.stack for h in grids]), fontsize=10, loc="left")
    _heatmap_colorbar(fig.colorbar(image, ax=list(axes)), norm, label, integer)
    heading = _heatmap_title(title, grids, fmt) + (
        "\nhatched: the sketch left the rank open in some module of the cell; lo–hi bound its median, the colour "
        "is lo" if open_cells else "")
    if len(grids) > 1:  # the title above every panel, each panel named by its stack
        fig.suptitle(heading, fontsize=10)
    else:
        axes[0].set_title(heading, fontsize=10)
    return fig


def _heatmap_colorbar(bar, norm: Normalize, label: str, integer: bool) -> None:
    bar.set_label(label + (", log scale" if isinstance(norm, LogNorm) else ""))
    if integer and not isinstance(norm, LogNorm):  # a log colorbar ticks decades already
        bar.locator = whole_ticks()
        bar.update_ticks()


def _heatmap_axes(ax, roles: list[str], layers: list) -> None:
    """Role ticks along x, layer ticks along y (at most ~40 of them), and the axis labels."""
    ax.set_xticks(range(len(roles)), labels=roles)
    step = max(1, len(layers) // 40)
    ticks = list(range(0, len(layers), step))
    if layers and layers[-1] is None and ticks[-1] != len(layers) - 1:
        # the "no layer" row is always labelled: unlabelled under "98", it read as layer 99
        ticks = [t for t in ticks if t < len(layers) - 1 - step / 2] + [len(layers) - 1]
    ax.set_yticks(ticks, labels=["no layer" if layers[i] is None else str(layers[i]) for i in ticks])
    ax.set_xlabel("role")
    ax.set_ylabel("layer (index)")


def _color_norm(grid: np.ndarray) -> Normalize:
    """A log norm when the values are all positive and span two decades or more, a linear one otherwise.

    A log norm masks zeros, which would then be drawn in the grey that means "no such module".
    """
    finite = grid[np.isfinite(grid)]
    positive = finite[finite > 0]
    if positive.size == finite.size and positive.size and positive.max() / positive.min() >= 100:
        return LogNorm(vmin=positive.min(), vmax=positive.max())
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    return Normalize(vmin=min(low, 0.0), vmax=high if high > min(low, 0.0) else min(low, 0.0) + 1.0)


def _annotate(ax, grid: np.ndarray, norm: Normalize, cmap, fmt: str, top: np.ndarray | None = None) -> None:
    """Write each cell's number, light on dark cells and dark on light ones; "lo–hi" where ``top`` (the upper
    ends of open intervals, same shape) differs from the cell."""
    for (i, j), v in np.ndenumerate(grid):
        if not np.isfinite(v):
            continue
        shade = float(np.clip(norm(v), 0, 1)) if v > 0 or not isinstance(norm, LogNorm) else 0.0
        r, g, b, _ = cmap(shade)
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived luminance
        text = fmt.format(v) if top is None or top[i, j] == v else f"{fmt.format(v)}–{fmt.format(top[i, j])}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _heatmap_title(title: str, grids: list, fmt: str) -> str:
    """`title` and where the largest value lies ("largest in vision q, layer 0 (12)" beside another stack)."""
    filled = [g for g in grids if np.isfinite(g.values).any()]
    if not filled:
        return f"{title}: no values"
    g = max(filled, key=lambda g: np.nanmax(g.values))  # the first on a tie
    i, j = np.unravel_index(np.nanargmax(g.values), g.values.shape)
    where = "no layer" if g.layers[i] is None else f"layer {g.layers[i]}"
    role = group_label((g.stack, g.roles[j]), [other.stack for other in grids])
    return f"{title}: largest in {role}, {where} ({fmt.format(g.values[i, j])})"


# ---------------------------------------------------------------------------- histogram


def _histogram(ax, values: np.ndarray, *, unit: str, log_ok: bool) -> None:
    if values.size == 0:
        _empty(ax, "no values")
        return
    positive = values[values > 0]
    if log_ok and positive.size == values.size and values.max() / values.min() >= 30:
        bins = np.geomspace(values.min(), values.max(), 25)
        ax.set_xscale("log")
    else:
        bins = np.histogram_bin_edges(values, bins=min(25, max(5, values.size // 2)))
    ax.hist(values, bins=bins, color="#3b528b", edgecolor="white", lw=0.6)
    median = float(np.median(values))
    ax.axvline(median, color="black", ls="--", lw=1.2, label=f"median {median:.3g}{unit}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", color="0.9", lw=0.6)
