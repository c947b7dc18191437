"""`spectra bench train` runs both loops on the same model and writes its report."""

from __future__ import annotations

import json

import pytest

from spectra.bench.train import run_train_bench

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_quick_bench_writes_both_loops(tmp_path):
    path = run_train_bench(tmp_path, steps=2, warmup=1, quick=True)
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["trainer_step_median_s"] > 0 and data["plain_step_median_s"] > 0
    assert data["ratio"] == pytest.approx(data["trainer_step_median_s"] / data["plain_step_median_s"])
    text = path.read_text()
    assert "spectra trainer" in text and "plain PEFT loop" in text
