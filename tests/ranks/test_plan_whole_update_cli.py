"""`spectra recommend`'s headline says the share of the whole update too (audit s19: Gemma 2's read "98.4% of ΔW energy
captured" while its left-out tied embedding held 74% of ‖ΔW‖²), and plan.json's totals hold both shares."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import run
from tests.ranks.test_plan_whole_update import PLANTED  # the same planted pair
from tests.models import planted_models, save


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole-update-cli")
    base, tuned = planted_models("qwen2", PLANTED)
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_the_headline_gives_both_shares(folders, tmp_path, monkeypatch, capsys):
    b, t = folders
    code, out, err = run(monkeypatch, capsys, "recommend", b, t, "--rank", "1", "-o", tmp_path / "plan.json")
    assert code == 0, err
    totals = json.loads((tmp_path / "plan.json").read_text())["totals"]
    assert totals["coverage"] == pytest.approx(6 / 9, rel=1e-3)  # the embedding, left out, holds 3/9
    headline = (f"{totals['energy']:.1%} of their ΔW energy captured, {totals['whole_energy']:.1%} of the whole "
                f"update's (they hold {totals['coverage']:.1%} of its ‖ΔW‖_F²)")
    assert headline in " ".join(out.split()), out
    # negative control: with embed in the roles the plan holds the whole update
    code, out, err = run(monkeypatch, capsys, "recommend", b, t, "--rank", "1", "--roles",
                         "q,k,v,o,gate,up,down,embed")
    assert code == 0, err
    assert "(they hold 100.0% of its ‖ΔW‖_F²)" in " ".join(out.split()), out
