"""`spectra bench verify --quick`: both paths on one tiny module, the same numbers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spectra.cli import app


def test_bench_verify_quick_agrees_between_paths(tmp_path):
    result = CliRunner().invoke(app, ["bench", "verify", "--quick", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "verify.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["decay", "bulk"]
    for r in rows:
        assert r["intruders_equal"] and r["intruders"][0] > 0  # the adapter intrudes, and both paths say so
        assert r["max_phi_diff"] < 4e-6 and r["max_angle_diff_deg"] < 2e-4 and r["amplification_rel_diff"] < 1e-5
    assert rows[0]["delta_path"] == "krylov"  # the decaying spectrum is certified,
    assert rows[1]["delta_path"] == "full-gesdd"  # φ(i, j) inside a noise bulk is not: ΔW_full's full SVD
    assert "certified (s)" in (tmp_path / "verify.md").read_text()
