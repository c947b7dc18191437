"""analyze --calibration-epsilon says what it does: since the activation-weighted spectrum uses C's own root (72893f6),
ε only sets each row's input_rank (C's eigenvalues above ε times their mean). Its --help said "Ridge of the input
second moment C", which read as shaping the spectrum."""

from __future__ import annotations

import json

import typer

from spectra.cli import app
from tests.cli.test_cli import run


def test_help_says_epsilon_sets_input_rank_and_not_the_spectrum():
    analyze = typer.main.get_command(app).commands["analyze"]
    said = next(p.help for p in analyze.params if p.name == "calibration_epsilon")
    assert "input_rank" in said and "no ridge" in said and "leaves it unchanged" in said, said
    assert not said.startswith("Ridge of the input second moment"), said  # what it said before


def test_epsilon_changes_input_rank_and_leaves_the_spectrum(monkeypatch, capsys, pair, tmp_path):
    """What the help says, on a real analysis: two ε, the same activation spectrum (float64 values equal), and
    fewer input directions above the larger ridge."""
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i} of some calibration text, with words {i * 7 % 13}" for i in range(16)))
    rows = {}
    for epsilon in ("1e-6", "0.5"):
        out = tmp_path / epsilon
        code, _, err = run(monkeypatch, capsys, "analyze", *pair, "--no-cache", "-q", "--calibration", text,
                           "--calibration-epsilon", epsilon, "-o", out)
        assert code == 0, err
        rows[epsilon] = {r["name"]: r["activation"] for r in json.loads((out / "analysis.json").read_text())["modules"]
                         if "activation" in r}
    small, large = rows["1e-6"], rows["0.5"]
    assert small and small.keys() == large.keys()
    for name in small:
        assert small[name]["singular_values"] == large[name]["singular_values"], name
        assert small[name]["rms_output_change"] == large[name]["rms_output_change"], name
        assert large[name]["input_rank"] <= small[name]["input_rank"], name
    # control: ε does reach input_rank (else the test above could not tell the option is read at all)
    assert any(large[n]["input_rank"] < small[n]["input_rank"] for n in small)
