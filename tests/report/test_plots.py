"""The report figures: produced, labelled, non-blank, and drawing the numbers they claim to."""

from __future__ import annotations

import copy
import io

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from spectra.errors import ConfigError
from spectra.report import plots, tables
from spectra.report.tables import matrix_rows
from tests.report.conftest import assert_whole_steps

PLOTTERS = [plots.plot_decay, plots.plot_cumulative_energy, plots.plot_rank_heatmap,
            plots.plot_relative_size_heatmap, plots.plot_effective_rank_histogram]


def _pixels(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    buffer.seek(0)
    return matplotlib.image.imread(buffer, format="png")  # (h, w, 4)


def _panel(fig: Figure, role: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(f"{role}:"))


def _module_lines(ax):
    """Lines drawn for modules (axhline marks span the axes and have 2 points in axes coordinates)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("noise floor")
            and len(line.get_xdata()) > 2]


@pytest.mark.parametrize("plot", PLOTTERS, ids=lambda f: f.__name__)
def test_figure_is_labelled_and_not_blank(plot, analysis):
    fig = plot(analysis)
    assert isinstance(fig, Figure)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert visible
    for ax in visible:
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_lines() or ax.get_images() or ax.patches
    assert (fig._suptitle is not None and fig._suptitle.get_text()) or visible[0].get_title()
    assert _pixels(fig)[..., :3].var() > 0


@pytest.mark.parametrize("plot", PLOTTERS, ids=lambda f: f.__name__)
def test_edge_cases_draw_without_warnings(plot, edge_analysis):
    # one layer, a zero ΔW (the only k), a missing and a null noise estimate, a null-layer embedding
    fig = plot(edge_analysis)
    assert _pixels(fig)[..., :3].var() > 0


def test_no_pyplot_state_leaks(analysis):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.all_figures(analysis)
    assert plt.get_fignums() == before


def test_decay_lines_are_normalised_spectra(analysis):
    fig = plots.plot_decay(analysis)
    ax = _panel(fig, "q")
    rows = [r for r in matrix_rows(analysis) if r["role"] == "q"]
    lines = _module_lines(ax)
    assert len(lines) == len(rows) == 4  # three layers and the c_attn[q] split
    expected = sorted(tuple(np.asarray(r["singular_values"]) / r["singular_values"][0]) for r in rows)
    drawn = sorted(tuple(line.get_ydata()) for line in lines)
    np.testing.assert_allclose(np.array(drawn), np.array(expected))
    assert ax.get_yscale() == "log"
    floor = next(line for line in ax.get_lines() if line.get_label().startswith("noise floor"))
    ratios = [r["noise"]["mp_edge"] / r["singular_values"][0] for r in rows]
    assert floor.get_ydata()[0] == pytest.approx(np.median(ratios))


def test_decay_marks_zero_update_and_single_layer(edge_analysis):
    fig = plots.plot_decay(edge_analysis)
    k = _panel(fig, "k")
    assert not _module_lines(k)
    assert any("ΔW = 0" in t.get_text() for t in k.texts)
    # one layer: a legend names it instead of a colorbar
    assert not any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert "layer 0" in [t.get_text() for t in _panel(fig, "q").get_legend().get_texts()]
    # v has a null noise estimate and no other module: no floor line, yet its spectrum is drawn
    v = _panel(fig, "v")
    assert _module_lines(v)
    assert not any(line.get_label().startswith("noise floor") for line in v.get_lines())


def test_cumulative_energy_crosses_90_percent_at_the_energy_rank(analysis):
    fig = plots.plot_cumulative_energy(analysis)
    for role in ("q", "v", "up", "embed"):
        rows = {r["name"]: r for r in matrix_rows(analysis) if r["role"] == role}
        lines = _module_lines(_panel(fig, role))
        assert len(lines) == len(rows)
        ranks = []
        for line in lines:
            x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            assert x[0] == 0 and y[0] == 0 and np.all(np.diff(y) >= 0)
            ranks.append(int(x[np.argmax(y >= 0.9)]))
        assert sorted(ranks) == sorted(r["energy_rank"]["0.9"] for r in rows.values())


def test_rank_heatmap_cells_hold_energy_ranks(analysis):
    fig = plots.plot_rank_heatmap(analysis)
    ax = fig.axes[0]
    grid = ax.get_images()[0].get_array()  # (layers, roles), masked where no module
    roles = [t.get_text() for t in ax.get_xticklabels()]
    layers = [t.get_text() for t in ax.get_yticklabels()]
    assert layers == ["0", "1", "2", "no layer"]
    rows = matrix_rows(analysis)
    for i, layer in enumerate([0, 1, 2, None]):
        for j, role in enumerate(roles):
            cell = [r["energy_rank"]["0.9"] for r in rows if r["layer"] == layer and r["role"] == role]
            if cell:
                assert grid[i, j] == pytest.approx(np.median(cell))
            else:
                assert np.ma.is_masked(grid[i, j])
    assert len(ax.texts) == int(np.ma.count(grid))  # small grid: every cell annotated


def test_heatmap_uses_log_scale_only_across_decades(analysis):
    wide = np.array([[1e-4, 1e-1], [np.nan, 0.5]])
    narrow = np.array([[0.1, 0.2], [0.3, np.nan]])
    assert isinstance(plots._color_norm(wide), LogNorm)
    assert not isinstance(plots._color_norm(narrow), LogNorm)
    for row in analysis["modules"]:
        if row["kind"] == "matrix" and row["layer"] == 0:
            row["relative_size"] *= 1e-3
    fig = plots.plot_relative_size_heatmap(analysis)
    assert isinstance(fig.axes[0].get_images()[0].norm, LogNorm)


def _counted(analysis) -> list[dict]:
    """The matrix rows the histogram counts: a fused tensor by its projections, not also whole."""
    return [r for r in matrix_rows(analysis) if r["role"] != "qkv"]


def test_histogram_counts_every_module(analysis):
    fig = plots.plot_effective_rank_histogram(analysis)
    left = fig.axes[0]
    assert sum(p.get_height() for p in left.patches) == len(_counted(analysis))
    median = np.median([r["effective_rank"] for r in _counted(analysis)])
    assert left.get_lines()[0].get_xdata()[0] == pytest.approx(median)
    assert f"over {len(_counted(analysis))} modules (fused tensors by projection):" in fig._suptitle.get_text()


def test_histogram_counts_a_fused_tensor_by_its_projections_only(analysis, unchange):
    """The histogram counted GPT-2's c_attn both whole (qkv) and by projection ([q]), while the sentence under it says
    a fused tensor is counted by its projections, as the rank picture counts it. The whole is left out now: the
    counts and the median are the rank picture's modules', and the whole's effective rank is in no bar."""
    whole = next(r for r in matrix_rows(analysis) if r["role"] == "qkv")
    whole["effective_rank"] = 1e4  # far right of every other: a bar of its own if it is counted
    fig = plots.plot_effective_rank_histogram(analysis)
    left = fig.axes[0]
    assert sum(p.get_height() for p in left.patches) == len(_counted(analysis)) == len(matrix_rows(analysis)) - 1
    assert max(p.get_x() + p.get_width() for p in left.patches if p.get_height()) < 1e4
    assert left.get_lines()[0].get_xdata()[0] == pytest.approx(np.median([r["effective_rank"]
                                                                          for r in _counted(analysis)]))
    for row in matrix_rows(analysis):
        if row["name"].startswith("transformer.h.0.attn.c_attn"):
            unchange(row)  # the unchanged sentence then names the whole as left out with its projections
    title = plots.plot_effective_rank_histogram(analysis)._suptitle.get_text()
    assert f"over {len(_counted(analysis)) - 1} modules (fused tensors by projection):" in title
    assert "a fused tensor counted by its projections, its whole left out with them" in title


def test_histogram_says_which_modules_it_leaves_out(analysis):
    rows = matrix_rows(analysis)
    for row in rows[1:]:
        row["effective_rank"] = None  # sketched to its top: no entropy
    fig = plots.plot_effective_rank_histogram(analysis)
    assert sum(p.get_height() for p in fig.axes[0].patches) == 1
    assert f"the 1 of {len(_counted(analysis))} modules with a whole spectrum" in fig._suptitle.get_text()


@pytest.mark.parametrize("modules", [[], [{"name": "norm", "kind": "vector", "role": "other", "layer": 0,
                                          "shape": [4], "fro_norm": 1.0, "base_fro_norm": 2.0,
                                          "relative_size": 0.5}]])
def test_no_matrix_rows_is_a_clear_error(analysis, modules):
    analysis["modules"] = modules
    with pytest.raises(ConfigError, match="no weight-matrix modules"):
        plots.plot_decay(analysis)


def test_row_without_spectrum_names_the_module(analysis):
    del analysis["modules"][1]["singular_values"]
    with pytest.raises(ConfigError, match=analysis["modules"][1]["name"].replace(".", r"\.")):
        plots.all_figures(analysis)


def test_cumulative_energy_marks_follow_the_analysis_levels(analysis, tmp_path):
    """With --energy 0.8,0.95 the figure still marked 90/95/99 % (title, lines, caption) and drew no 80 % line."""
    import copy

    from spectra.report.plots import energy_marks, plot_cumulative_energy
    from spectra.report.render import write_report

    assert energy_marks(analysis) == (0.9, 0.95, 0.99)  # the default four: 50 % sits on the steep start, unmarked
    data = copy.deepcopy(analysis)
    for row in data["modules"]:
        if row.get("energy_rank"):
            row["energy_rank"] = {k: v for k, v in row["energy_rank"].items() if k in ("0.95",)} | {"0.8": 1}
    assert energy_marks(data) == (0.8, 0.95)
    fig = plot_cumulative_energy(data)
    assert fig._suptitle.get_text().endswith("reach 80 / 95% of the update")
    assert sorted({round(line.get_ydata()[0], 3) for ax in fig.axes for line in ax.get_lines()
                   if line.get_linestyle() == ":"}) == [0.8, 0.95]
    md = (write_report(data, tmp_path / "r") / "report.md").read_text()
    assert "dotted lines at 80 and 95%." in md


def test_histogram_leaves_unchanged_matrices_out_and_says_so(analysis, unchange):
    """ΔW = 0 was counted as effective rank 0: a bar at 0 and a median pulled down."""
    for r in analysis["modules"]:
        if r.get("role") == "k":
            unchange(r)
    changed = [r for r in _counted(analysis) if r["role"] != "k"]
    fig = plots.plot_effective_rank_histogram(analysis)
    left = fig.axes[0]
    assert sum(p.get_height() for p in left.patches) == len(changed)
    assert left.get_lines()[0].get_xdata()[0] == pytest.approx(np.median([r["effective_rank"] for r in changed]))
    title = fig._suptitle.get_text()
    assert f"over {len(changed)} modules (fused tensors by projection):" in title
    assert "3 unchanged matrices are left out (ΔW = 0; every k matrix)." in title


def test_histogram_of_an_unchanged_pair_says_so(analysis, unchange):
    for r in analysis["modules"]:
        if r.get("kind") == "matrix":
            unchange(r)
    fig = plots.plot_effective_rank_histogram(analysis)
    assert not any(ax.patches for ax in fig.axes)
    assert "every weight matrix is unchanged (ΔW = 0)" in fig._suptitle.get_text()
    assert all(any("ΔW = 0 in every module" in t.get_text() for t in ax.texts) for ax in fig.axes)


def test_role_panels_give_the_median_over_changed_modules(analysis, unchange):
    qs = [r for r in matrix_rows(analysis) if r["role"] == "q"]
    zeroed = unchange(next(r for r in analysis["modules"] if r["name"] == "model.layers.2.self_attn.q_proj"))
    median = np.median([r["energy_rank"]["0.9"] for r in qs if r["name"] != zeroed["name"]])
    for plot in (plots.plot_decay, plots.plot_cumulative_energy):
        title = _panel(plot(analysis), "q").get_title()
        assert title == f"q: 4 modules, 1 unchanged, median E90 rank {tables.format_value(median, 'rank')} of 32"


def _ticks_in_view(axis) -> np.ndarray:
    low, high = sorted(axis.get_view_interval())
    ticks = np.asarray(axis.get_ticklocs())
    return ticks[(ticks >= low - 1e-9) & (ticks <= high + 1e-9)]


def test_index_and_rank_axes_tick_whole_numbers(analysis):
    """Short (k, v) spectra had σ index ticks at 1.5, 2.5; the rank heatmap's colorbar had 0.5, 1.5 on ranks."""
    for r in matrix_rows(analysis):
        if r["role"] in ("k", "v"):
            r["singular_values"] = r["singular_values"][:3]  # sketched to its top 3: a 1..3 index axis
            r["energy_rank"] = {k: min(v, 3) for k, v in r["energy_rank"].items()}
    for plot in (plots.plot_decay, plots.plot_cumulative_energy):
        fig = plot(analysis)
        for role in ("k", "v", "q"):
            ax = _panel(fig, role)
            assert ax.get_xscale() == "linear"
            ticks = _ticks_in_view(ax.xaxis)
            assert ticks.size >= 2 and np.all(ticks == np.round(ticks)), (plot.__name__, role, ticks)
    long = copy.deepcopy(analysis)
    for r in matrix_rows(long):
        r["singular_values"] = r["singular_values"] * 8  # 128+ values: the index axis goes log, as before
    assert _panel(plots.plot_decay(long), "q").get_xscale() == "log"
    for r in matrix_rows(analysis):
        r["energy_rank"]["0.9"] = (r["layer"] or 0) + 1  # ranks 1..3: a colorbar from 0 to 3
    fig = plots.plot_rank_heatmap(analysis)
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    ticks = _ticks_in_view(bar.yaxis)
    assert ticks.size >= 2 and np.all(ticks == np.round(ticks)), ticks


def test_count_axes_tick_at_round_steps_as_the_direction_axes_do(analysis):
    """The histogram's module counts and the layer colorbar had matplotlib's integer locator (0, 25, 50, … over
    230) where the axes that count directions tick at steps of 1, 2 or 5 (0, 50, 100, …): one helper for both."""
    histogram = plots.plot_effective_rank_histogram(analysis).axes[0]
    histogram.set_ylim(0, 230)
    assert_whole_steps(_ticks_in_view(histogram.yaxis))
    bar = next(ax for ax in plots.plot_decay(analysis).axes if ax.get_label() == "<colorbar>")
    assert_whole_steps(bar.yaxis.get_major_locator().tick_values(0, 230))  # the layer scale of a 231-layer model
    decay = _panel(plots.plot_decay(analysis), "k")  # a direction axis, as before: the helper's own ticks
    decay.set_xlim(0, 230)
    assert_whole_steps(_ticks_in_view(decay.xaxis))


@pytest.mark.parametrize(("marks", "listed", "each"), [
    ((0.9, 0.95, 0.99), "90, 95 and 99%", "90 / 95 / 99%"),  # the default marks
    ((0.8, 0.95), "80 and 95%", "80 / 95%"),  # --energy 0.8,0.95
    ((0.995,), "99.5%", "99.5%"),
])
def test_energy_marks_read_the_same_in_the_figure_title_and_the_report_caption(analysis, marks, listed, each):
    """The title ("90 / 95 / 99%") and the caption ("90, 95 and 99%") each formatted the marks themselves."""
    from spectra.report.render import report_blocks

    assert plots.energy_marks_text(marks) == listed
    assert plots.energy_marks_text(marks, each=True) == each
    data = copy.deepcopy(analysis)
    for row in matrix_rows(data):
        row["energy_rank"] = {f"{m:g}": 1 for m in marks}
    assert plots.energy_marks(data) == marks
    title = plots.plot_cumulative_energy(data)._suptitle.get_text()
    assert title.endswith(f"how many directions reach {each} of the update")
    caption = next(b[2] for b in report_blocks(data, figures=["cumulative_energy"]) if b[0] == "figure")
    assert caption == f"Cumulative energy share of the top-r directions; dotted lines at {listed}."
