"""The per-role table and the rank picture, checked against numpy on the planted analysis."""

from __future__ import annotations

import numpy as np
import pytest

from spectra.report import tables
from spectra.report.tables import SUMMARY_METRICS, matrix_rows, summary_rows
from tests.report.conftest import matrix_row, planted_spectrum


def _matrices(analysis, role):
    return [m for m in analysis["modules"] if m["kind"] == "matrix" and m["role"] == role]


def test_summary_rows_aggregate_like_numpy(analysis):
    rows = summary_rows(analysis)
    assert [r["role"] for r in rows] == ["embed", "q", "k", "v", "qkv", "o", "up", "down"]
    for entry in rows:
        members = _matrices(analysis, entry["role"])
        assert entry["modules"] == len(members)
        for key, get in (("energy_rank_0.9", lambda m: m["energy_rank"]["0.9"]),
                         ("energy_rank_0.99", lambda m: m["energy_rank"]["0.99"]),
                         ("effective_rank", lambda m: m["effective_rank"]),
                         ("noise_rank", lambda m: m["noise"]["rank_above"]),
                         ("relative_size", lambda m: m["relative_size"]),
                         ("energy_rank_0.9_share", lambda m: m["energy_rank"]["0.9"] / min(m["shape"]))):
            values = np.array([get(m) for m in members], dtype=float)
            got = entry[key]
            assert got["median"] == pytest.approx(np.median(values))
            assert (got["min"], got["max"]) == pytest.approx((values.min(), values.max()))
            assert (got["q1"], got["q3"]) == pytest.approx(tuple(np.percentile(values, [25, 75])))


def test_split_projection_counts_in_its_role_and_fused_whole_in_qkv(analysis):
    by_role = {r["role"]: r for r in summary_rows(analysis)}
    assert by_role["q"]["modules"] == 4 and by_role["q"]["layers"] == 3
    assert by_role["qkv"]["modules"] == 1
    assert by_role["embed"]["layers"] == 0  # its layer is null


def test_missing_metric_is_none_not_zero(edge_analysis):
    by_role = {r["role"]: r for r in summary_rows(edge_analysis)}
    assert by_role["v"]["noise_rank"] is None  # its only module has noise = null
    assert by_role["up"]["noise_rank"] is None  # ... or no noise key at all
    assert "k" not in by_role  # its only module has ΔW = 0: no rank to summarise (it had read as median 0)
    assert tables.format_stats(None, "rank") == "–"


def test_vectors_stay_out_of_the_rank_tables(analysis):
    names = [r["name"] for r in matrix_rows(analysis)]
    assert not any("layernorm" in n for n in names)
    assert len(tables.vector_table(analysis)[1]) == 3


def test_a_scalar_reads_scalar_in_the_vector_table(analysis):
    """A 0-d tensor (CLIP's logit_scale) has shape []: its shape cell says so, where it had been empty."""
    import copy
    edited = copy.deepcopy(analysis)
    vector = next(m for m in edited["modules"] if m["kind"] == "vector")
    vector["shape"] = []
    cells = {row[0]: row[3] for row in tables.vector_table(edited)[1]}
    assert cells[vector["name"]] == "scalar"
    assert all(cell not in ("", "scalar") for name, cell in cells.items() if name != vector["name"])  # control


def test_rows_read_in_block_order(analysis):
    names = [r["name"] for r in matrix_rows(analysis)]
    assert names[0] == "model.embed_tokens"
    assert names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.0.mlp.down_proj")
    assert names.index("model.layers.0.mlp.down_proj") < names.index("model.layers.1.self_attn.q_proj")


def test_energy_curve_is_exact_for_truncated_spectra(analysis):
    embed = _matrices(analysis, "embed")[0]
    assert embed["method"] == "randomized" and len(embed["singular_values"]) < min(embed["shape"])
    curve = tables.energy_curve(embed)
    s = np.asarray(embed["singular_values"])
    np.testing.assert_allclose(curve, np.cumsum(s**2) / embed["fro_norm"] ** 2)
    assert curve[-1] < 1.0  # the dropped tail still counts in ‖ΔW‖_F


def test_rank_picture_states_the_medians(analysis):
    text = tables.rank_picture(analysis)
    split = {r["fused_name"] for r in matrix_rows(analysis) if r.get("fused_name")}
    assert split  # the fixture has a fused tensor reported whole and per projection: it counts once
    rows = [r for r in matrix_rows(analysis) if r["name"] not in split]
    median = np.median([r["energy_rank"]["0.9"] for r in rows])
    share = np.median([r["energy_rank"]["0.9"] / min(r["shape"]) for r in rows])
    assert f"Across {len(rows)} modules (fused tensors by projection)" in text
    assert f"a median of {tables.format_value(median, 'rank')} singular" in text
    assert f"{share:.1%} of the full rank" in text
    assert text.count(". ") == 1 and text.endswith(".")  # two sentences
    whole = {r["role"] for r in matrix_rows(analysis) if r["name"] in split}  # qkv: read through q, k, v
    order = [r["role"] for r in sorted(summary_rows(analysis), key=lambda r: r["energy_rank_0.9_share"]["median"])
             if r["role"] not in whole]
    assert all(f" {role} " not in text[text.index("By role"):] for role in whole)
    positions = [text.index(f" {role} ", text.index("By role")) for role in order]
    assert positions == sorted(positions)


def test_every_summary_metric_has_a_column(analysis):
    headers, body = tables.role_table(analysis)
    assert headers[3:] == [m.label for m in SUMMARY_METRICS]
    assert all(len(row) == len(headers) for row in body)
    q = next(row for row in body if row[0] == "q")
    assert q[headers.index("energy-90% rank")] == "2.5 (2–4)"


def _calibrated(analysis, *, rng_seed=0):
    """The analysis with an activation spectrum on every q/v module: ranks planted, one less than ΔW's."""
    import copy

    out = copy.deepcopy(analysis)
    rng = np.random.default_rng(rng_seed)
    for row in out["modules"]:
        if row.get("kind", "matrix") == "matrix" and row["role"] in ("q", "v"):
            r90 = max(1, int(row["energy_rank"]["0.9"]) - 1)
            row["activation"] = {"tokens": 500 + int(rng.integers(10)), "epsilon": 1e-6, "input_rank": 8,
                                 "rms_output_change": 1.0, "energy_rank": {"0.9": r90, "0.99": r90 + 1},
                                 "singular_values": [1.0] * (r90 + 1)}
    return out


def test_activation_columns_only_for_a_calibrated_analysis(analysis):
    headers, _ = tables.role_table(analysis)
    assert not tables.has_activation(analysis) and not any("activation" in h for h in headers)
    assert "calibration" not in tables.rank_picture(analysis)
    calibrated = _calibrated(analysis)
    assert tables.has_activation(calibrated)
    headers, body = tables.role_table(calibrated)
    column = headers.index("activation-weighted energy-90% rank")
    by_role = {row[0]: row[column] for row in body}
    for role in ("q", "v"):
        expected = np.median([r["activation"]["energy_rank"]["0.9"] for r in matrix_rows(calibrated)
                              if r["role"] == role])
        assert by_role[role].split(" ")[0] == tables.format_value(expected, "rank")
    assert by_role["up"] == "–"  # no calibrated module of that role: unknown, not 0
    module_headers, module_body = tables.module_table(calibrated)
    assert "activation-weighted energy-90% rank" in module_headers and len(module_body[0]) == len(module_headers)
    text = tables.rank_picture(calibrated)
    weighted = np.median([r["activation"]["energy_rank"]["0.9"] for r in matrix_rows(calibrated) if "activation" in r])
    plain = np.median([r["energy_rank"]["0.9"] for r in matrix_rows(calibrated) if "activation" in r])
    assert (f"the median energy-90% rank of the output change ΔW·x is {tables.format_value(weighted, 'rank')}, "
            f"against {tables.format_value(plain, 'rank')} for ΔW itself") in text


def test_rank_picture_counts_only_modules_with_a_rank(analysis):
    """Sketched modules stopped short of 90 % have no energy-90% rank: the sentence said "Across 9" for 3."""
    import copy

    data = copy.deepcopy(analysis)
    rows = [r for r in data["modules"] if r.get("kind", "matrix") == "matrix" and not r.get("fused_name")]
    dropped = [r for r in rows if r["role"] in ("q", "o")]
    for r in dropped:
        r["energy_rank"]["0.9"] = None
    text = tables.rank_picture(data)
    split = {r["fused_name"] for r in matrix_rows(data) if r.get("fused_name")}
    total = len([r for r in matrix_rows(data) if r["name"] not in split])
    counted = len([r for r in matrix_rows(data) if r["name"] not in split and r["energy_rank"].get("0.9")])
    assert counted < total and f"Across {counted} of {total} modules" in text
    assert "beyond the values they hold" in text and "(none for " in text and " o" in text[text.index("(none for "):]


def test_reports_follow_the_energy_levels_the_analysis_measured(analysis):
    """`analyze --energy 0.8` measures 0.8 alone: every energy column read "–", the picture "no ranks"."""
    import copy

    from spectra.report.plots import plot_rank_heatmap

    data = copy.deepcopy(analysis)
    for r in data["modules"]:
        if r.get("energy_rank"):
            r["energy_rank"] = {"0.8": r["energy_rank"]["0.9"]}
    assert tables.energy_levels(data) == ("0.8",) and tables.headline_level(data) == "0.8"
    headers, body = tables.role_table(data)
    assert "energy-80% rank" in headers and "energy-80% rank / full rank" in headers
    assert not any("energy-90%" in h for h in headers)
    column = headers.index("energy-80% rank")
    assert all(row[column] != "–" for row in body)
    module_headers, _ = tables.module_table(data)
    assert "energy-80% rank" in module_headers
    text = tables.rank_picture(data)
    assert "hold 80% of the update's energy" in text and "energy-80% rank as a share" in text
    fig = plot_rank_heatmap(data)
    texts = " ".join(t.get_text() for ax in fig.axes for t in (ax.title, ax.yaxis.label, ax.xaxis.label))
    assert "energy-80% rank (directions)" in texts and "no values" not in texts  # the colorbar and the title
    # the default levels keep their columns as before
    assert [h for h in tables.role_table(analysis)[0] if h.startswith("energy")] == [
        "energy-50% rank", "energy-90% rank", "energy-90% rank / full rank", "energy-95% rank", "energy-99% rank"]
    assert [h for h in tables.module_table(analysis)[0] if h.startswith("energy")] == [
        "energy-50% rank", "energy-90% rank", "energy-99% rank"]


def test_an_unsettled_energy_level_shows_its_interval_in_the_module_table(analysis):
    """The sketch reports a level it could not settle as null with an interval (energy_rank_bounds): the table
    shows the interval, not a bare "–" that reads as "not computed"."""
    import copy

    data = copy.deepcopy(analysis)
    row = matrix_rows(data)[0]
    row["energy_rank"]["0.99"] = None
    row["energy_rank_bounds"] = {"0.99": [7, 12]}
    headers, body = tables.module_table(data)
    cells = dict(zip(headers, body[0]))
    assert cells["energy-99% rank"] == "7–12"
    assert cells["energy-90% rank"] == tables.format_value(row["energy_rank"]["0.9"], "rank")  # settled: as before
    assert tables.module_table(analysis)[1][0][headers.index("energy-99% rank")] != "7–12"


def test_rank_picture_leaves_unchanged_matrices_out_and_names_identical_checkpoints(analysis):
    """ΔW = 0 has no rank to report: untouched matrices left the medians at 0 and led the role ranking
    ("embed 0.0%"); a pair of identical checkpoints read as "a median of 0 singular directions"."""
    import copy

    data = copy.deepcopy(analysis)
    for r in data["modules"]:
        if r.get("role") == "embed":
            r["fro_norm"], r["energy_rank"] = 0.0, {k: 0 for k in r["energy_rank"]}
    text = tables.rank_picture(data)
    split = {r["fused_name"] for r in matrix_rows(data) if r.get("fused_name")}
    kept = [r for r in matrix_rows(data) if r["name"] not in split and r["role"] != "embed"]
    assert f"Across {len(kept)} modules" in text
    assert "1 unchanged matrix is left out (ΔW = 0; every embed matrix)" in text and "embed 0.0%" not in text
    assert tables.rank_picture(analysis).count("unchanged") == 0  # negative control: the fixture as built
    qs = [r for r in data["modules"] if r.get("role") == "q"]
    zeroed = next(r for r in qs if not r.get("fused_name"))
    zeroed["fro_norm"], zeroed["energy_rank"] = 0.0, {k: 0 for k in zeroed["energy_rank"]}  # q partly unchanged
    share = np.median([r["energy_rank"]["0.9"] / min(r["shape"]) for r in qs if r is not zeroed])
    assert f"q {share:.1%}" in tables.rank_picture(data), (share, tables.rank_picture(data))
    for r in data["modules"]:
        r["fro_norm"] = 0.0
    assert tables.rank_picture(data).startswith("All ") and "are unchanged (ΔW = 0)" in tables.rank_picture(data)


def test_a_negative_zero_prints_without_a_minus_sign():
    """A gap of −1·0.0 printed "-0" (and a share "-0.0%") in every report that used num/pct."""
    assert tables.num(-0.0) == "0" and tables.pct(-0.0) == "0.0%"
    assert tables.num(-1e-17) == "-1e-17" and tables.num(-0.25) == "-0.25"  # real negatives keep their sign


def test_per_role_table_leaves_unchanged_matrices_out_and_says_so(analysis, unchange):
    """ΔW = 0 sat in the per-role table as rank 0: q's median fell with an untouched layer, k read 0 everywhere."""
    qs = [r for r in analysis["modules"] if r.get("role") == "q"]
    zeroed = unchange(next(r for r in qs if r["layer"] == 0 and not r.get("fused_name")))  # q partly unchanged
    for r in analysis["modules"]:
        if r.get("role") == "k":
            unchange(r)  # k: every matrix unchanged
    by_role = {r["role"]: r for r in summary_rows(analysis)}
    assert "k" not in by_role
    kept = [r for r in qs if r is not zeroed]
    assert by_role["q"]["modules"] == len(kept) == 3
    for key, get in (("energy_rank_0.9", lambda m: m["energy_rank"]["0.9"]),
                     ("effective_rank", lambda m: m["effective_rank"])):
        values = [get(m) for m in kept]
        assert by_role["q"][key]["median"] == pytest.approx(np.median(values))
        assert by_role["q"][key]["min"] == pytest.approx(min(values)) and min(values) > 0
    note = "4 unchanged matrices are left out (ΔW = 0; every k matrix; q of layer 0)."  # q: 1 of 4 unchanged
    assert tables.role_table_note(analysis) == note
    assert note in tables.rank_picture(analysis)  # the rank picture's words, from the one predicate
    assert [row[0] for row in tables.role_table(analysis)[1]] == [r["role"] for r in summary_rows(analysis)]


def test_per_role_table_of_an_unchanged_pair_says_so(analysis, unchange):
    for r in analysis["modules"]:
        if r.get("kind") == "matrix":
            unchange(r)
    assert summary_rows(analysis) == [] and tables.role_table(analysis)[1] == []
    assert tables.role_table_note(analysis).startswith("Every weight matrix is unchanged (ΔW = 0)")


def test_per_role_table_note_is_empty_when_every_matrix_changed(analysis):
    assert tables.role_table_note(analysis) == ""  # negative control: the fixture as built


def _gpt2_attention() -> dict:
    """Two GPT-2 blocks as ``analyze`` reports them: each fused c_attn whole (role qkv) and split into its q, k and
    v projections, and c_proj (o)."""
    rng = np.random.default_rng(0)
    modules = []
    for layer in (0, 1):
        fused = f"transformer.h.{layer}.attn.c_attn"
        modules.append(matrix_row(fused, "qkv", layer, (96, 32), planted_spectrum(6, (96, 32), scale=2.0, rng=rng),
                                  conv1d=True))
        for role in ("q", "k", "v"):
            modules.append(matrix_row(f"{fused}[{role}]", role, layer, (32, 32),
                                      planted_spectrum(2, (32, 32), scale=1.0, rng=rng), fused_name=fused,
                                      conv1d=True))
        modules.append(matrix_row(f"transformer.h.{layer}.attn.c_proj", "o", layer, (32, 32),
                                  planted_spectrum(3, (32, 32), scale=1.0, rng=rng), conv1d=True))
    return {"schema_version": 1, "config": {"energy_levels": [0.5, 0.9, 0.95, 0.99]}, "modules": modules}


def test_an_unchanged_fused_tensor_counts_the_same_beside_the_table_and_in_the_rank_picture(unchange):
    """The per-role table's note counted an unchanged c_attn whole and by projection ("4 unchanged matrices"), the
    rank picture by projection only ("3") — two counts of one thing in one report."""
    data = _gpt2_attention()
    assert tables.role_table_note(data) == ""  # negative control: every matrix changed
    for row in data["modules"]:
        if row["name"].startswith("transformer.h.0.attn.c_attn"):
            unchange(row)  # layer 0's c_attn: the whole (qkv) and its q, k, v projections
    note = ("3 unchanged matrices are left out (ΔW = 0; q, k, v of layer 0; a fused tensor counted by its "
            "projections, its whole left out with them).")
    assert tables.role_table_note(data) == note
    assert "Across 5 modules (fused tensors by projection), a median" in tables.rank_picture(data)
    assert f". {note} By role" in tables.rank_picture(data)
    # what the note describes: the table leaves out the 3 projections and the whole they split
    assert {r["role"]: r["modules"] for r in summary_rows(data)} == {"q": 1, "k": 1, "v": 1, "qkv": 1, "o": 2}
    for row in data["modules"]:
        if "c_attn" in row["name"]:
            unchange(row)  # every c_attn: q, k, v and qkv hold no changed matrix
    note = ("6 unchanged matrices are left out (ΔW = 0; every q, k, v matrix; a fused tensor counted by its "
            "projections, its whole left out with them).")
    assert tables.role_table_note(data) == note and f" {note} " in tables.rank_picture(data)
    assert [r["role"] for r in summary_rows(data)] == ["o"]


def test_rank_picture_leaves_out_matrices_of_rounding_noise_alone(analysis):
    """An fp32 base and its bf16 save where only some roles were fine-tuned: the others' ΔW is rounding, whose
    energy rank is near full, and the picture had ranked them at 66-78 % of full rank beside the tuned roles' 9 %.
    They are left out of the medians and the role order, and named; all of them: no rank to read at all."""
    import copy

    data = copy.deepcopy(analysis)
    rows = [r for r in data["modules"] if r.get("kind", "matrix") == "matrix"]
    for r in rows:
        if r["role"] in ("q", "o"):
            r["noise"]["rank_above"] = 0
    text = tables.rank_picture(data)
    split = {r["fused_name"] for r in matrix_rows(data) if r.get("fused_name")}
    kept = [r for r in matrix_rows(data) if r["name"] not in split and r["role"] not in ("q", "o")]
    share = np.median([r["energy_rank"]["0.9"] / min(r["shape"]) for r in kept])
    assert f"{share:.1%} of the full rank" in text and f"Across {len(kept)} " in text
    noise = [r for r in matrix_rows(data) if r["name"] not in split and r["role"] in ("q", "o")]
    assert f"{len(noise)} matrices (q, o) hold no singular value above the storage dtype's rounding-noise" in text
    order = text[text.index("runs from lowest to highest"):]
    assert " q " not in order and " o " not in order and "v " in order
    for r in rows:
        r["noise"]["rank_above"] = 0
    assert "ΔW is rounding, not fine-tuning, so there is no rank to read" in tables.rank_picture(data)
    negative = tables.rank_picture(analysis)  # the fixture's own rows: each has signal above the floor
    assert "rounding-noise floor" not in negative


def test_a_roles_rounding_only_matrices_are_left_out_of_its_median_too(analysis):
    """Frozen layers beside tuned ones: v's matrices of layers 1 and 2 rounding only (near-full energy rank), layer
    0's tuned. The picture named the two as left out, yet ranked v by the median of all three: 93.8 %, not 25 %."""
    import copy

    data = copy.deepcopy(analysis)
    for r in data["modules"]:
        if r.get("role") == "v" and r.get("layer") in (1, 2):
            r["noise"]["rank_above"] = 0
            r["energy_rank"]["0.9"] = min(r["shape"]) - 1
    tuned = [r for r in matrix_rows(data) if r.get("role") == "v" and r.get("layer") == 0]
    share = float(np.median([r["energy_rank"]["0.9"] / min(r["shape"]) for r in tuned]))
    text = tables.rank_picture(data)
    assert "2 matrices (v) hold no singular value above" in text
    order = text[text.index("runs from lowest to highest"):]
    assert f"v {share:.1%}" in order, order
    every_v = [r for r in matrix_rows(data) if r.get("role") == "v"]
    everything = float(np.median([r["energy_rank"]["0.9"] / min(r["shape"]) for r in every_v]))
    assert f"v {everything:.1%}" not in order  # negative control: the median with the rounding-only matrices
    # the per-role table beside it leaves them out alike, and its note says so in the picture's words
    assert [e for e in summary_rows(data) if e["role"] == "v"][0]["modules"] == len(tuned)
    assert "2 matrices (v) hold no singular value above" in tables.role_table_note(data)
