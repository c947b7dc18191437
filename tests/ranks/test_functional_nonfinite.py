"""Functional ranks from a sweep whose metric is not finite at some point (NaN logits, an overflowing perplexity).

The rule is "the smallest swept r with gap(r') ≤ ε for r and every larger r'": a NaN gap does not satisfy
gap ≤ ε, so it must end the ε band as a large gap would. It used to pass as within ε (``NaN > ε`` is False).
"""

from __future__ import annotations

import json
import math

import pytest

from spectra.errors import ConfigError
from spectra.ranks import functional_ranks
from tests.ranks.test_functional import sweep_dict

NAN, INF = float("nan"), float("inf")


def curve(gaps, ranks=(1, 2, 4, 8, 16)):
    return {r: (g, (g, g)) for r, g in zip(ranks, gaps)}


def test_a_nan_gap_ends_the_epsilon_band(tmp_path):
    sweep = sweep_dict({"model": curve([0.5, 0.005, 0.005, NAN, 0.0])}, higher_is_better=False)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))  # NaN as sweep.json holds it
    for given in (sweep, path):
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


@pytest.mark.parametrize("tuned", [NAN, INF])
def test_a_full_fine_tune_without_a_finite_metric_is_refused(tuned):
    sweep = sweep_dict({"model": curve([0.5, 0.005, 0.005, 0.001, 0.0])})
    sweep["reference"]["tuned"]["metric"] = tuned
    with pytest.raises(ConfigError, match=f"full fine-tune has accuracy {tuned}"):
        functional_ranks(sweep, 0.01)
