"""Verify and sweep reports: files, figures, headline, atomic refusal — from synthetic results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from spectra.errors import ConfigError
from spectra.report.verify import (
    headline,
    load_result,
    plot_energy,
    plot_phi,
    plot_sweep_energy,
    plot_sweep_eval,
    write_sweep_report,
    write_verify_report,
)
from tests.report.conftest import assert_whole_steps


def verify_result(n=3):
    rows = [{"name": f"model.layers.{i}.self_attn.q_proj", "role": "q", "layer": i, "shape": [32, 32], "rank": 4,
             "captured_energy": 0.4 + 0.1 * i, "optimal_energy": 0.78, "captured_energy_row": 0.3, "phi": 0.5,
             "relative_error": 0.9, "amplification_adapter": 3.0, "amplification_full": 1.5,
             "intruders_adapter": 2, "intruders_full": 0, "fro_norm_full": 1.0} for i in range(n)]
    return {"schema_version": 1, "adapter": {"path": "ad", "method": "lora", "quantized": False},
            "summary": {"modules": n, "ranks": [8], "captured_energy": 0.41, "optimal_energy": 0.78, "phi": 0.5,
                        "coverage": 0.9, "intruders_adapter": 6, "intruders_full": 0, "quant_error": None},
            "evals": {"base": {"loss": 2.0, "accuracy": 0.1}, "tuned": {"loss": 1.0, "accuracy": 0.8}},
            "modules": rows, "phi_matrices": {rows[0]["name"]: [[0.9, 0.95], [0.5, 0.7]]}, "config": {},
            "notes": ["a note"]}


def sweep_result():
    runs = [{"method": m, "rank": r, "trainable_params": 100 * r, "captured_energy": 0.2 * r ** 0.5,
             "optimal_energy": min(1.0, 0.3 * r ** 0.5), "phi": 0.5, "intruders_adapter": 1, "step_median_s": 0.01,
             "eval": {"loss": 2.0 / r, "accuracy": 0.1 * r}, "svd_eval": {"loss": 1.8 / r, "accuracy": 0.12 * r}}
            for m in ("lora", "dora") for r in (1, 2, 4)]
    return {"schema_version": 1, "kind": "sweep", "base": "b", "tuned": "t", "runs": runs, "recommended_rank": 2,
            "reference_evals": {"base": {"loss": 3.0, "accuracy": 0.05}, "tuned": {"loss": 0.4, "accuracy": 0.9}},
            "phi_between_ranks": [{"module": "m", "method": "lora", "ranks": [1, 4], "matrix": [[0.9, 0.8, 0.7, 0.6]]}],
            "train_config": {"rank": 8}}


def test_headline_says_captured_and_optimal():
    text = headline({"captured_energy": 0.41, "optimal_energy": 0.78, "ranks": [8]})
    assert "41.0%" in text and "rank 8 could capture 78.0%" in text


def test_headline_says_its_shares_are_of_the_adapted_modules_and_how_much_of_the_update_they_hold():
    """7.6 % of the adapted modules' update read as 7.6 % of the whole fine-tune's (which was 3.0 %)."""
    part = headline({"captured_energy": 0.076, "optimal_energy": 0.921, "ranks": [2], "modules": 6, "coverage": 0.396})
    assert "captured 7.6% of the full fine-tune's update in the 6 modules it adapts" in part
    assert "Those modules hold 39.6% of the whole update's ‖ΔW_full‖_F²." in part
    whole = headline({"captured_energy": 0.5, "optimal_energy": 0.9, "ranks": [2], "modules": 6, "coverage": 1.0})
    assert "Those modules hold" not in whole  # every module adapted: nothing to add


def test_verify_report_explains_its_module_columns(tmp_path):
    md = (write_verify_report(verify_result(), tmp_path / "rep") / "report.md").read_text()
    for header in ("captured (col) / (row):", "Eckart–Young:", "φ(k, r):", "rel. error:", "amplification ad/full:",
                   "intruders ad/full:", "NF4 error:"):
        assert header in md, header


def test_verify_report_files(tmp_path):
    out = write_verify_report(verify_result(), tmp_path / "rep")
    assert {p.name for p in out.iterdir()} == {"verify.json", "report.md", "report.html", "figures"}
    assert {p.name for p in (out / "figures").iterdir()} == {"energy.png", "energy.svg", "phi.png", "phi.svg"}
    md = (out / "report.md").read_text()
    assert "model.layers.2.self_attn.q_proj" in md and "Eckart–Young" in md and "a note" in md
    assert json.loads((out / "verify.json").read_text())["summary"]["captured_energy"] == 0.41
    assert load_result(out)["modules"][0]["rank"] == 4
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_reports_refuse_existing_and_empty(tmp_path):
    (tmp_path / "rep").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        write_verify_report(verify_result(), tmp_path / "rep")
    write_verify_report(verify_result(), tmp_path / "rep", overwrite=True)
    with pytest.raises(ConfigError, match="no module rows"):
        write_verify_report(verify_result() | {"modules": []}, tmp_path / "other")
    with pytest.raises(ConfigError, match="no runs"):
        write_sweep_report({"runs": []}, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".*tmp*"))


def test_sweep_report_files(tmp_path):
    out = write_sweep_report(sweep_result(), tmp_path / "sweep")
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert names == {"sweep_energy.png", "sweep_eval.png", "sweep_phi.png"}
    md = (out / "report.md").read_text()
    assert "Recommended rank (spectra recommend): 2" in md and md.count("| lora |") == 3
    assert "step (ms): median time of an optimiser step (forward, backward, update) after the first" in md
    assert "Shared by every run; each run's method and rank are its row's" in md  # not "method lora, rank null"


def test_figures_are_figures_with_marks():
    sweep = sweep_result()
    energy = plot_sweep_energy(sweep)
    assert isinstance(energy, Figure)
    labels = [line.get_label() for line in energy.axes[0].get_lines()]
    assert {"lora", "dora", "Eckart–Young optimum", "recommended r=2"} <= set(labels)
    eval_fig = plot_sweep_eval(sweep)
    assert any(line.get_label() == "full fine-tune" for line in eval_fig.axes[0].get_lines())
    # each says what it plots (neither had a title)
    assert "Eckart–Young" in energy.axes[0].get_title() and "Eval loss" in eval_fig.get_suptitle()
    assert isinstance(plot_energy(verify_result()), Figure)
    phi = plot_phi({"a": [[1.0, 0.5]], "b": [[0.2]]}, title="t")
    assert len([ax for ax in phi.axes if ax.get_visible() and ax.images]) == 2


def test_phi_axes_count_whole_directions_and_the_energy_figure_has_a_title():
    """φ panels ticked 0.5 … 3.5 on axes that count directions; the energy figure had no title."""
    from spectra.report.verify import plot_energy, plot_phi

    fig = plot_phi({"m": [[1.0, 0.5, 0.4], [0.5, 0.9, 0.6], [0.2, 0.3, 0.8]]}, title="t")
    ax = fig.axes[0]
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert all(float(t).is_integer() for t in ticks), ticks
    assert plot_energy(verify_result()).axes[0].get_title()


def test_phi_axes_tick_at_round_steps_like_the_analysis_figures():
    """φ panels ticked 0, 25, 50, … on a 230-direction axis (matplotlib's integer locator) where the analysis
    figures' axes that count directions tick 0, 50, 100, … (plots.whole_ticks)."""
    fig = plot_phi({"m": np.full((4, 230), 0.5).tolist()}, title="t")
    ax = fig.axes[0]
    assert_whole_steps(ax.get_xticks())
    assert_whole_steps(ax.get_yticks())
