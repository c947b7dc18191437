"""A command that fails while its progress bar is drawn prints the error on a line of its own, after the bar."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.models import nonfinite_pair


def test_an_error_mid_progress_starts_a_line_and_the_bar_is_not_redrawn_after_it(tmp_path):
    """`spectra analyze` meeting a NaN weight mid-run printed "\\ranalyze:  57%|…error: tensor …" and drew the bar
    again after the error, so a log hid the error and a grep for ^error: missed it. A real process: the redraw came
    when the bar was collected at exit, which an in-process run does not show."""
    base, broken = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "spectra.cli", "analyze", str(base), str(broken), "--no-cache",
                           "--workers", "1", "-o", str(tmp_path / "out")],
                          capture_output=True, env=env, timeout=600)
    stderr = done.stderr.decode()  # bytes: text mode would read the bar's \r as a line end
    assert done.returncode == 2, stderr
    lines = stderr.split("\n")
    at = [i for i, line in enumerate(lines) if "error:" in line]
    assert len(at) == 1, stderr
    error = lines[at[0]]
    assert error.startswith("error: tensor model.layers.1.mlp.up_proj.weight"), repr(error)  # not after the bar
    assert "\r" not in error
    # the bar was drawn (the test would pass vacuously without one) and its last state ends the line before
    before = "\n".join(lines[:at[0]])
    assert "\ranalyze:" in before and "module" in before, repr(stderr)
    after = lines[at[0] + 1:]
    assert [line for line in after if line] == ["(run with --debug for the full traceback)"], repr(after)
    assert not (tmp_path / "out").exists()


def test_a_quiet_run_draws_no_bar_and_says_the_same_error(tmp_path):
    """Negative control: with -q no bar is drawn, and the error reads the same, at a line start."""
    base, broken = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "spectra.cli", "analyze", str(base), str(broken), "--no-cache", "-q",
                           "--workers", "1", "-o", str(tmp_path / "out")],
                          capture_output=True, env=env, timeout=600)
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "analyze:" not in stderr and "\r" not in stderr, repr(stderr)
    assert stderr.startswith("error: tensor model.layers.1.mlp.up_proj.weight"), repr(stderr)
