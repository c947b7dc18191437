"""`spectra bench e2e --quick` runs every measured path end to end on a tiny pair."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spectra.cli import app


@pytest.mark.slow
def test_e2e_quick_writes_report(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", "e2e", "--quick", "--work", str(tmp_path / "work"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "e2e.json").read_text())
    assert data["rank_agreement_0.9"]["within_1"] == data["rank_agreement_0.9"]["modules"] > 0
    assert data["io_floor"]["bytes"] > 0 and data["spectra_default"]["peak_anon_mb"] > 0
    for tag in ("spectra_default", "one_rank_one_thread", "spectra_full"):  # each timed twice, the faster kept
        runs = data[tag]["runs"]
        assert len(runs) == 2 and data[tag]["analysis_s"] == min(r["analysis_s"] for r in runs)
    assert data["io_floor"]["read_s"] == min(data["io_floor"]["reads_s"]) and data["gemm_probes"] == 2
    assert data["flop_count"]["flops"] and not data["one_rank_one_thread"].get("flops")  # counted apart from timing
    md = (out / "e2e.md").read_text()
    assert "## Targets (issue 8)" in md and "forced full spectrum" in md
    assert_tables_well_formed(md)
    import re

    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines() if line.startswith("| ")]
    verdicts = {row[0]: row[-1] for row in cells if len(row) == 3}
    assert verdicts["wall ≤ 1.5 × (I/O floor + GEMM floor)"] == "not measured (--quick: a tiny pair)"
    assert verdicts["energy-90% ranks within ±1 of full SVD on every module"] == "**met**"  # still checked


def assert_tables_well_formed(md: str) -> None:
    """Every row of a Markdown table has its header's cell count: an unescaped | in a cell ("max |Δ| 0") split
    the ranks row into five cells, and GitHub dropped its verdict."""
    import re

    count = None
    for line in md.splitlines():
        if not line.startswith("|"):
            count = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line)) - 2
        count = count or cells
        assert cells == count, line


def test_the_committed_e2e_report_is_well_formed():
    from pathlib import Path

    assert_tables_well_formed((Path(__file__).parents[2] / "reports" / "bench" / "e2e.md").read_text())


def test_e2e_rejects_unknown_part(tmp_path):
    result = CliRunner().invoke(app, ["bench", "e2e", "--quick", "--skip", "gpu", "--work", str(tmp_path)])
    assert result.exit_code != 0 and "unknown part" in str(result.exception)


def test_the_faster_default_run_is_kept_with_its_rows_and_the_larger_peak():
    from spectra.bench.e2e import _keep_faster

    first = {"wall_s": 7.0, "analysis_s": 5.5, "peak_anon_mb": 700.0, "timings": {"a": 1}}
    second = {"wall_s": 6.0, "analysis_s": 4.8, "peak_anon_mb": 650.0, "timings": {"a": 2}}
    res, rows = {"spectra_default": second}, {"spectra_default": ["second"]}
    _keep_faster(res, rows, "spectra_default", first, ["first"])
    kept = res["spectra_default"]
    assert (kept["analysis_s"], kept["timings"], rows["spectra_default"]) == (4.8, {"a": 2}, ["second"])
    assert kept["peak_anon_mb"] == 700.0 and [r["analysis_s"] for r in kept["runs"]] == [5.5, 4.8]
    # the first is faster: it comes back, rows too
    res, rows = {"spectra_default": {**second, "analysis_s": 6.1}}, {"spectra_default": ["second"]}
    _keep_faster(res, rows, "spectra_default", first, ["first"])
    assert (res["spectra_default"]["analysis_s"], rows["spectra_default"]) == (5.5, ["first"])
    # a failed second run (no analysis time, no rows written) never wins
    failed = {"wall_s": 0.5, "peak_anon_mb": 10.0, "rc": 1}
    res, rows = {"spectra_default": failed}, {"spectra_default": ["first"]}
    _keep_faster(res, rows, "spectra_default", first, ["first"])
    assert res["spectra_default"]["analysis_s"] == 5.5 and res["spectra_default"]["runs"][1]["analysis_s"] is None


def test_a_peer_run_once_meets_spectras_slower_default_run():
    from spectra.bench.e2e_report import targets

    res = {"spectra_default": {"analysis_s": 4.0, "runs": [{"analysis_s": 4.0}, {"analysis_s": 5.0}]},
           "floors": {}, "peers": {"weightwatcher": {"wall_s": 14.0, "rc": 0}}}
    row = next(r for r in targets(res) if r[0].startswith("≥ 3×"))
    assert "5.0 s → 2.8×" in row[1] and row[2] == "**not met**"  # 14 / 4.0 would have read 3.5×, met
