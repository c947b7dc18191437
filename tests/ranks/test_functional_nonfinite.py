"""Functional ranks from a sweep whose metric is not finite at some point (NaN logits, an overflowing perplexity).

The rule is "the smallest swept r with gap(r') ≤ ε for r and every larger r'": a NaN gap does not satisfy
gap ≤ ε, so it must end the ε band as a large gap would. It used to pass as within ε (``NaN > ε`` is False).
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from spectra.cli import app
from spectra.errors import ConfigError
from spectra.ranks import functional_ranks
from spectra.report.render import analysis_json
from spectra.sweep import SweepResult
from tests.ranks.rows import analysis, make_row
from tests.ranks.test_functional import sweep_dict

NAN, INF = float("nan"), float("inf")


def curve(gaps, ranks=(1, 2, 4, 8, 16)):
    return {r: (g, (g, g)) for r, g in zip(ranks, gaps)}


def written(sweep, folder):
    """``sweep`` as `spectra sweep` writes it (SweepResult.write_report: NaN and ±inf become null)."""
    SweepResult(sweep).write_report(folder)
    return folder


def test_a_nan_gap_ends_the_epsilon_band(tmp_path):
    sweep = sweep_dict({"model": curve([0.5, 0.005, 0.005, NAN, 0.0])}, higher_is_better=False)
    folder = written(sweep, tmp_path / "sweep")
    stored = {p["rank"]: p["gap"] for p in json.loads((folder / "sweep.json").read_text())["points"]}
    assert stored[8] is None and stored[4] == 0.005  # what a real sweep.json holds for a NaN gap
    for given in (sweep, folder, folder / "sweep.json", SweepResult.load(folder)):
        choice = functional_ranks(given, 0.01)["groups"]["model"]
        assert choice["rank"] == 16 and choice["nonfinite_gap"] == [8]  # rank 8 is not known to be within ε
    # control: the same curve with a large finite gap at rank 8 gives the same rank, and rank 2 without it
    assert functional_ranks(sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.5, 0.0])}), 0.01)[
        "groups"]["model"]["rank"] == 16
    finite = functional_ranks(sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.001, 0.0])}), 0.01)
    assert finite["groups"]["model"]["rank"] == 2 and "nonfinite_gap" not in finite["groups"]["model"]


@pytest.mark.parametrize("bad", [INF, -INF])
def test_an_infinite_gap_is_not_within_epsilon(bad):
    choice = functional_ranks(sweep_dict({"model": curve([0.5, 0.005, bad, 0.005, 0.0])}), 0.01)["groups"]["model"]
    assert choice["rank"] == 8 and choice["nonfinite_gap"] == [4]


def test_a_nan_below_the_chosen_rank_changes_nothing():
    choice = functional_ranks(sweep_dict({"model": curve([NAN, 0.5, 0.005, 0.005, 0.0])}), 0.01)["groups"]["model"]
    assert choice["rank"] == 4 and choice["nonfinite_gap"] == [1] and math.isfinite(choice["gap"])


@pytest.mark.parametrize("bad", [INF, -INF])
def test_an_infinite_gap_read_back_from_sweep_json_is_not_within_epsilon(tmp_path, bad):
    folder = written(sweep_dict({"model": curve([0.5, 0.005, bad, 0.005, 0.0])}), tmp_path / "sweep")
    choice = functional_ranks(folder, 0.01)["groups"]["model"]
    assert choice["rank"] == 8 and choice["nonfinite_gap"] == [4]


@pytest.mark.parametrize("tuned", [NAN, INF])
def test_a_full_fine_tune_without_a_finite_metric_is_refused(tmp_path, tuned):
    sweep = sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.001, 0.0])})
    sweep["reference"]["tuned"]["metric"] = tuned
    with pytest.raises(ConfigError, match=f"full fine-tune has accuracy {tuned}"):
        functional_ranks(sweep, 0.01)
    folder = written(sweep, tmp_path / "sweep")  # its metric read back as null: refused, not taken as no metric
    assert json.loads((folder / "sweep.json").read_text())["reference"]["tuned"]["metric"] is None
    with pytest.raises(ConfigError, match=r"full fine-tune has accuracy null \(NaN or ±inf as sweep.json writes it\)"):
        functional_ranks(folder, 0.01)


def test_recommend_reads_a_sweep_json_with_a_nan_gap(tmp_path):
    """`spectra recommend --functional ε --sweep DIR` on a sweep whose metric went NaN at one rank: the rank above it,
    no traceback; a NaN full fine-tune is refused in plain words."""
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "analysis.json").write_text(analysis_json(analysis(make_row("a", [1.0] * 32))))
    modules = [{"name": "a", "role": "q", "full_rank": 32}]
    nan_at_8 = written(sweep_dict({"model": curve([0.5, 0.005, 0.005, NAN, 0.0])}, higher_is_better=False,
                                  modules=modules), tmp_path / "S")
    finite = written(sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.001, 0.0])}, higher_is_better=False,
                                modules=modules), tmp_path / "F")
    ranks = {}
    for name, folder in (("nan", nan_at_8), ("finite", finite)):
        result = CliRunner().invoke(app, ["recommend", str(tmp_path / "A"), "--functional", "0.01", "--sweep",
                                          str(folder), "--json"])
        assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
        ranks[name] = [m["rank"] for m in json.loads(result.output)["modules"]]
    assert ranks == {"nan": [16], "finite": [2]}  # control: without the NaN, rank 2 is within ε
    tuned_nan = sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.001, 0.0])}, modules=modules)
    tuned_nan["reference"]["tuned"]["metric"] = NAN
    result = CliRunner().invoke(app, ["recommend", str(tmp_path / "A"), "--functional", "0.01", "--sweep",
                                      str(written(tuned_nan, tmp_path / "T"))])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError), (result.output, result.exception)
    assert "full fine-tune has accuracy null" in str(result.exception)
