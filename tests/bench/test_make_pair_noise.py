"""make_pair's ground truth against the analysis's noise floor: which roundings are under its ΔW.

The pair is a fine-tune of its stored bf16 base, saved in bf16: ΔW holds the tuned side's rounding alone
(``rounding_fro``, measured in float32 against the planted update). The floor had counted the base's rounding too
and stood at 1.41× it on every module.
"""

from __future__ import annotations

import json
import math

import pytest

from spectra.analysis import AnalysisConfig, analyze
from spectra.bench.make_pair import PairConfig, make_pair


def _rows(root, base_rounding: str):
    truth = json.loads((root / "ground_truth.json").read_text())["modules"]
    result = analyze(root / "base", root / "tuned", AnalysisConfig(method="full", base_rounding=base_rounding),
                     cache_dir=False, progress=False)
    return [(row, truth[row["name"]]) for row in result.matrices()]


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair") / "p", PairConfig(shape="llama-tiny"))


def test_the_exact_floor_is_the_rounding_make_pair_added(default_pair):
    rows = _rows(default_pair, "exact")
    assert len(rows) == 16
    for row, truth in rows:
        assert row["noise"]["base_rounding"] == "exact"
        assert row["noise"]["fro"] / truth["rounding_fro"] == pytest.approx(1.0, abs=0.05), row["name"]
    counted = _rows(default_pair, "counted")  # negative control: the floor as it was
    for row, truth in counted:
        assert row["noise"]["fro"] / truth["rounding_fro"] == pytest.approx(math.sqrt(2), rel=0.05), row["name"]


def test_auto_counts_the_base_where_a_white_tail_at_the_roundings_level_is_in_the_residual(default_pair):
    """The default tail (3 % of ‖ΔW‖²) is white at ~1.04× the rounding's std per element: no spectrum tells it
    from the base's rounding, so "auto" errs to the higher floor on every module, which then stands for rounding + tail."""
    for row, truth in _rows(default_pair, "auto"):
        assert truth["tail_fro"] == pytest.approx(truth["tail_sigma"] * math.sqrt(math.prod(row["shape"])), rel=0.05)
        assert row["noise"]["base_rounding"] == "counted", row["name"]
        white = math.hypot(truth["rounding_fro"], truth["tail_fro"])
        assert row["noise"]["fro"] / white == pytest.approx(1.0, abs=0.1), row["name"]
        assert row["noise"]["sigma_residual"] * math.sqrt(math.prod(row["shape"])) > row["noise"]["fro"] * 0.95


def test_auto_takes_the_tuned_rounding_alone_where_the_update_has_no_white_tail(tmp_path):
    """With tail=0 the residual of the low-rank modules (k_proj, q_proj: planted ranks 4 and 8) is the rounding
    alone: "auto" finds the floor is the fine-tune's, at the measured rounding to 5 %. High-rank modules keep their
    decaying signal's weak end below the edge, which raises the residual: counted there (the conservative side)."""
    root = make_pair(tmp_path / "p", PairConfig(shape="llama-tiny", tail=0.0))
    rows = _rows(root, "auto")
    exact = [(row, truth) for row, truth in rows if row["noise"]["base_rounding"] == "exact"]
    assert {row["name"] for row, _ in rows if row["role"] in ("q", "k")} <= {row["name"] for row, _ in exact}
    for row, truth in exact:
        assert row["noise"]["fro"] / truth["rounding_fro"] == pytest.approx(1.0, abs=0.05), row["name"]
