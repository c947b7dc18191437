"""What the report's tables and figures read where a plain median or label used to mislead: energy ranks the sketch
left unsettled, rounding-only matrices, levels other than the default four, half-values, the "no layer" row."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from spectra.report import plots, tables
from spectra.report.render import plain
from tests.report.conftest import matrix_row, planted_spectrum


def _q_rows(analysis):
    return [m for m in analysis["modules"] if m.get("role") == "q" and not m.get("fused_name")]


@pytest.fixture
def unsettled(analysis):
    """Three q matrices at 99 %: one settled at 10, two left open by the sketch in [40, 60] and [50, 70]."""
    data = copy.deepcopy(analysis)
    data["modules"] = _q_rows(data)
    q = data["modules"]
    q[0]["energy_rank"]["0.99"] = 10
    for row, interval in zip(q[1:], ([40, 60], [50, 70])):
        row["energy_rank"]["0.99"] = None
        row["energy_rank_bounds"] = {"0.99": interval}
    return data


def test_interval_stats_bound_the_median_of_unsettled_ranks():
    closed = tables.interval_stats([(3, 3), (5, 5), (9, 9)])
    assert closed == tables.stats([3, 5, 9])  # nothing open: the plain statistics
    out = tables.interval_stats([(10, 10), (40, 60), (50, 70)])
    # the true median lies between the median of the lower ends and that of the upper ends, whatever the values
    assert (out["median"], out["median_hi"], out["min"], out["max"], out["unsettled"]) == (40, 60, 10, 70, 2)
    for guess in ([10, 40, 50], [10, 60, 70], [10, 45, 66]):
        assert out["median"] <= np.median(guess) <= out["median_hi"]
    settled = tables.interval_stats([(10, 10), (12, 12), (40, 60)])  # the open one cannot move the median
    assert settled["median"] == settled["median_hi"] == 12


def test_role_table_and_rank_picture_read_unsettled_ranks_as_intervals(unsettled):
    headers, body = tables.role_table(unsettled)
    cell = dict(zip(headers, body[0]))["energy-99% rank"]
    assert cell == "40–60 (10–70)"  # was "10": the settled module alone, beside "modules 3"
    assert "lo–hi" in tables.role_table_note(unsettled)
    headers, body = tables.module_table(unsettled)
    assert [row[headers.index("energy-99% rank")] for row in body] == ["10", "40–60", "50–70"]
    # the headline level read at 99 %: the rank picture gives the interval and says why
    data = copy.deepcopy(unsettled)
    for row in data["modules"]:
        row["energy_rank"] = {"0.99": row["energy_rank"]["0.99"]}
    text = tables.rank_picture(data)
    assert "a median of 40–60 singular directions hold 99%" in text
    assert "2 of them only known to lie in an interval" in text
    assert "Across 3 weight matrices" in text


def test_rank_heatmap_hatches_and_writes_unsettled_cells(unsettled):
    fig = plots.plot_rank_heatmap(unsettled, level="0.99")
    ax = fig.axes[0]
    grid = ax.get_images()[0].get_array()  # (layers, roles)
    assert list(np.ma.filled(grid[:, 0], np.nan)) == [10, 40, 50]  # coloured by the lower end, not grey
    assert sorted(t.get_text() for t in ax.texts) == ["10", "40–60", "50–70"]
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert sorted((p.get_xy()[1] + 0.5) for p in hatched) == [1, 2]  # layers 1 and 2
    assert "hatched" in ax.get_title()
    plain_fig = plots.plot_rank_heatmap(unsettled, level="0.5")  # negative control: every rank settled
    assert not [p for p in plain_fig.axes[0].patches if p.get_hatch()] and "hatched" not in plain_fig.axes[0].get_title()


def test_role_panel_title_reads_the_interval(unsettled):
    data = copy.deepcopy(unsettled)
    for row in data["modules"]:
        row["energy_rank"] = {"0.99": row["energy_rank"]["0.99"]}
    title = plots.plot_decay(data).axes[0].get_title()
    assert title.endswith("median E99 rank 40–60 of 32"), title


def test_per_role_table_leaves_rounding_only_matrices_out_as_the_rank_picture_does(analysis):
    data = copy.deepcopy(analysis)
    for m in data["modules"]:
        if m.get("role") == "k" and m["layer"] in (1, 2):
            m["noise"]["rank_above"] = 0
            m["energy_rank"] = {"0.5": 7, "0.9": 13, "0.95": 14, "0.99": 16}
    headers, body = tables.role_table(data)
    k = dict(zip(headers, next(r for r in body if r[0] == "k")))
    layer0 = next(m for m in data["modules"] if m.get("role") == "k" and m["layer"] == 0)
    assert k["modules"] == "1" and k["energy-90% rank"] == str(layer0["energy_rank"]["0.9"])
    note = tables.role_table_note(data)
    assert "2 matrices (k) hold no singular value above the storage dtype's rounding-noise floor" in note
    assert note in tables.rank_picture(data)  # word for word
    title = [ax.get_title() for ax in plots.plot_decay(data).axes if ax.get_title().startswith("k:")][0]
    assert "2 rounding only" in title and f"median E90 rank {layer0['energy_rank']['0.9']} of" in title
    assert "rounding-noise floor" not in tables.role_table_note(analysis)  # negative control


def test_module_table_keeps_the_headline_level(analysis):
    data = copy.deepcopy(analysis)
    for m in tables.matrix_rows(data):
        er = m["energy_rank"]
        m["energy_rank"] = {"0.5": er["0.5"], "0.95": er["0.95"], "0.99": er["0.99"], "0.999": er["0.99"]}
    assert tables.headline_level(data) == "0.95"
    headers, _ = tables.module_table(data)
    assert "energy-95% rank" in headers  # the level every other view shows
    headers, _ = tables.module_table(analysis)  # the default four: 95 % left out for width
    assert "energy-95% rank" not in headers and "energy-90% rank" in headers


def test_activation_columns_follow_the_calibrated_levels(analysis):
    data = copy.deepcopy(analysis)
    for m in tables.matrix_rows(data):
        er = m["energy_rank"]
        m["energy_rank"] = {"0.8": er["0.5"], "0.95": er["0.95"]}
        m["activation"] = {"energy_rank": {"0.8": 1, "0.95": 2}, "tokens": 1000}
    headers, body = tables.role_table(data)
    assert [h for h in headers if h.startswith("activation")] == ["activation-weighted energy-95% rank"]
    assert all(row[headers.index("activation-weighted energy-95% rank")] == "2" for row in body)
    headers, body = tables.module_table(data)
    assert all(row[headers.index("activation-weighted energy-95% rank")] == "2" for row in body)
    assert "median energy-95% rank of the output change ΔW·x is 2" in tables.rank_picture(data)
    assert not [h for h in tables.role_table(analysis)[0] if h.startswith("activation")]  # uncalibrated: none


def test_energy_marks_keep_their_decimals_in_the_figure(analysis):
    data = copy.deepcopy(analysis)
    for m in tables.matrix_rows(data):
        er = m["energy_rank"]
        m["energy_rank"] = {"0.9": er["0.9"], "0.99": er["0.99"], "0.995": er["0.99"], "0.999": er["0.99"]}
    ax = plots.plot_cumulative_energy(data).axes[0]
    labels = [t.get_text() for t in ax.texts if t.get_text().endswith("%")]
    assert labels == ["90%", "99%", "99.5%", "99.9%"]  # 99.5 and 99.9 had read "100%"


def test_heatmap_writes_half_ranks_as_the_tables_do(analysis):
    data = copy.deepcopy(analysis)
    data["modules"] = [m for m in tables.matrix_rows(data) if m["role"] == "q" and m["layer"] == 0]
    data["modules"][0]["energy_rank"]["0.9"], data["modules"][1]["energy_rank"]["0.9"] = 2, 3  # one cell: 2.5
    ax = plots.plot_rank_heatmap(data).axes[0]
    assert [t.get_text() for t in ax.texts] == ["2.5"]
    assert ax.get_title().endswith("(2.5)")


@pytest.mark.parametrize("n", [99, 120, 3])
def test_the_no_layer_row_is_always_labelled(n):
    rng = np.random.default_rng(0)
    mods = [matrix_row("model.embed_tokens", "embed", None, (100, 32), planted_spectrum(8, (100, 32), scale=3.0, rng=rng))]
    mods += [matrix_row(f"model.layers.{i}.self_attn.q_proj", "q", i, (32, 32),
                        planted_spectrum(2, (32, 32), scale=1.0, rng=rng)) for i in range(n)]
    ax = plots.plot_rank_heatmap({"schema_version": 1, "config": {}, "modules": mods}).axes[0]
    ticks = [(int(p), t.get_text()) for p, t in zip(ax.get_yticks(), ax.get_yticklabels())]
    assert ticks[-1] == (n, "no layer")
    assert all(b - a >= 1 for (a, _), (b, _) in zip(ticks, ticks[1:]))
    assert all(label == str(pos) for pos, label in ticks[:-1])


def test_a_stored_null_singular_value_renders(analysis, tmp_path):
    """analysis.json writes a non-finite σ as null; reading it back must still draw (it raised a TypeError)."""
    data = copy.deepcopy(analysis)
    tables.matrix_rows(data)[1]["singular_values"][0] = float("inf")
    stored = json.loads(json.dumps(plain(data)))
    assert stored["modules"][[m["name"] for m in stored["modules"]].index(tables.matrix_rows(data)[1]["name"])][
        "singular_values"][0] is None
    for figure in plots.all_figures(stored).values():
        assert figure.axes


def test_tiny_shares_keep_two_digits():
    assert tables.share_text(1 / 4096) == "0.024%"
    assert tables.share_text(0.0) == "0.0%" and tables.share_text(0.125) == "12.5%"
    assert tables.format_value(2 / 4096, "share") == "0.049%"
