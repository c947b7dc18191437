"""Reports of an analysis that holds two stacks of layers (a language model and a vision tower, both from layer 0):
every table, panel and heatmap cell groups by (stack, role), and a one-stack analysis reads as it always did."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from spectra.report import plots, render, tables
from tests.report.conftest import matrix_row, planted_spectrum, vector_row

VISION = {"q": (7, (16, 16)), "k": (0, (16, 16)), "up": (3, (24, 16))}  # role -> (planted rank, shape); k unchanged


@pytest.fixture
def two_stacks(make_analysis) -> dict:
    """The planted analysis (layers 0, 1) plus a vision tower's layer 0 q, k (ΔW = 0), up and its q bias."""
    out = copy.deepcopy(make_analysis(layers=(0, 1)))
    rng = np.random.default_rng(7)
    for role, (rank, shape) in VISION.items():
        prefix = "mlp" if role == "up" else "self_attn"
        s = planted_spectrum(rank, shape, scale=2.0, rng=rng) if rank else np.zeros(min(shape))
        out["modules"].append(matrix_row(f"vision_tower.encoder.layers.0.{prefix}.{role}_proj", role, 0, shape, s,
                                         stack="vision"))
    bias = vector_row("vision_tower.encoder.layers.0.self_attn.q_proj.bias", 0, 16, rng=rng)
    out["modules"].append(bias | {"role": "q", "stack": "vision"})
    return out


def _text_q(analysis) -> list[dict]:
    return [r for r in tables.matrix_rows(analysis) if r["role"] == "q" and "stack" not in r]


def _vision_q_rank(analysis) -> int:
    (row,) = [r for r in tables.matrix_rows(analysis) if r["role"] == "q" and r.get("stack") == "vision"]
    return row["energy_rank"]["0.9"]


def test_per_role_table_has_a_row_per_stack_and_role(two_stacks):
    entries = {(e["stack"], e["role"]): e for e in tables.summary_rows(two_stacks)}
    vision_q, rank = entries[("vision", "q")], _vision_q_rank(two_stacks)
    assert (vision_q["label"], vision_q["modules"], vision_q["energy_rank_0.9"]["max"]) == ("vision q", 1, rank)
    text_q = [r["energy_rank"]["0.9"] for r in _text_q(two_stacks)]
    assert entries[(None, "q")]["modules"] == len(text_q) == 3  # layers 0 and 1, and the split c_attn[q]
    assert entries[(None, "q")]["energy_rank_0.9"]["max"] == max(text_q) < rank
    assert ("vision", "k") not in entries  # unchanged: left out, and said so with its stack
    labels = [row[0] for row in tables.role_table(two_stacks)[1]]
    assert labels[-2:] == ["vision q", "vision up"] and "q" in labels  # the language model's roles first, bare
    assert "every vision k matrix" in tables.role_table_note(two_stacks)
    assert "vision q" in tables.rank_picture(two_stacks)


def test_module_tables_sort_and_label_by_stack(two_stacks):
    body = tables.module_table(two_stacks)[1]
    assert [row[1] for row in body[-3:]] == ["vision q", "vision k", "vision up"]  # after the language model's
    assert all(not row[1].startswith("vision") for row in body[:-3])
    vectors = {row[0]: row[1] for row in tables.vector_table(two_stacks)[1]}
    assert vectors["vision_tower.encoder.layers.0.self_attn.q_proj.bias"] == "vision q"


def test_role_panels_are_per_stack_and_role(two_stacks):
    for plot in (plots.plot_decay, plots.plot_cumulative_energy):
        titles = [ax.get_title() for ax in plot(two_stacks).axes if ax.get_visible() and ax.get_title()]
        assert any(t.startswith("vision q: 1 module,") for t in titles)
        assert any(t.startswith("q: 3 modules,") for t in titles)  # not 4: the tower's q is not the model's


def test_heatmaps_draw_one_panel_per_stack_on_one_scale(two_stacks):
    for plot in (plots.plot_rank_heatmap, plots.plot_relative_size_heatmap):
        fig = plot(two_stacks)
        panels = [ax for ax in fig.axes if ax.get_images()]
        assert [ax.get_title(loc="left") for ax in panels] == ["language model", "vision"]
        assert len({(ax.get_images()[0].norm.vmin, ax.get_images()[0].norm.vmax) for ax in panels}) == 1
        assert len({ax.get_xlim() for ax in panels}) == 1  # cells of one width in both
    vision = plots.plot_rank_heatmap(two_stacks).axes[1]
    assert [t.get_text() for t in vision.get_xticklabels()] == ["q", "k", "up"]
    assert vision.get_images()[0].get_array()[0, 0] == _vision_q_rank(two_stacks)  # the tower's q alone in its cell


def test_report_says_how_it_groups_only_when_there_are_stacks(two_stacks, make_analysis):
    blocks = render.report_blocks(two_stacks, figures=["rank_heatmap"])
    summary = next(b[1] for b in blocks if b[0] == "ul")
    modules = next(item for item in summary if item.startswith("Modules:"))
    assert "over 2 layers (language model), 1 layer (vision);" in modules
    assert modules.endswith("down, vision q, vision k, vision up")
    text = render.to_markdown(blocks)
    assert "2 stacks of layers (language model, vision)" in text and "One panel per stack" in text
    one = render.to_markdown(render.report_blocks(make_analysis(layers=(0, 1)), figures=["rank_heatmap"]))
    assert "stack" not in one and "language model" not in one  # control: one stack, no word of it


def test_a_row_stack_must_be_a_string_or_null(two_stacks):
    assert tables.analysis_problem(two_stacks) is None
    two_stacks["modules"][-2]["stack"] = 3
    assert "'stack' must be a string or null" in tables.analysis_problem(two_stacks)


def test_every_label_takes_the_stacks_of_the_analysis_matrices(two_stacks, make_analysis):
    """Labels took their stacks from three lists (the rows at hand, the matrix rows, the matrix and vector rows). A
    vision tower whose only change is a bias (its matrices all unchanged, or filtered out) had the vector table alone
    call it "vision q", while the per-role table, panels and notes, drawn from the matrices, named one stack and
    prefixed nothing. One list now, stacks_of (the matrices'), and every table names a group one way."""
    lone = copy.deepcopy(make_analysis(layers=(0, 1)))
    bias = next(r for r in two_stacks["modules"] if r.get("kind") == "vector" and r.get("stack") == "vision")
    lone["modules"].append(copy.deepcopy(bias))
    assert tables.stacks_of(lone) == [None] and tables.stacks_of(two_stacks) == [None, "vision"]
    vectors = {row[0]: row[1] for row in tables.vector_table(lone)[1]}
    assert vectors[bias["name"]] == "q"  # its name beside it says where it lies
    assert all(not label.startswith("vision") for label in [row[1] for row in tables.module_table(lone)[1]]
               + [e["label"] for e in tables.summary_rows(lone)])
    assert "stacks of layers" not in render.to_markdown(render.report_blocks(lone, figures=[]))


# -- an Omni model: the thinker's language model beside its talker and the talker's code predictor -------------------

TALKER = {"q": (5, (16, 16)), "v": (1, (8, 16)), "down": (4, (16, 32))}  # role -> (planted rank, shape)


@pytest.fixture
def omni(make_analysis) -> dict:
    """The planted analysis (the thinker's language model, layers 0, 1) plus a Qwen-Omni talker's layers 0 and 1 and
    its code predictor's layer 0, named as the whole model's checkpoint names them; stacks as module_info gives."""
    from spectra.checkpoints.architectures import module_info

    out = copy.deepcopy(make_analysis(layers=(0, 1)))
    rng = np.random.default_rng(11)
    for prefix, layers in (("talker.model.layers", (0, 1)), ("talker.code_predictor.model.layers", (0,))):
        for layer in layers:
            for role, (rank, shape) in TALKER.items():
                name = f"{prefix}.{layer}.{'mlp' if role == 'down' else 'self_attn'}.{role}_proj"
                s = planted_spectrum(rank + layer, shape, scale=2.0, rng=rng)
                out["modules"].append(matrix_row(name, role, layer, shape, s, stack=module_info(name).stack))
    return out


def test_every_report_and_figure_keeps_the_talker_apart(omni, tmp_path):
    """With a talker stack present the analysis report writes every figure and both pages; the heatmaps draw the
    language model, the talker and the code predictor in panels of their own, the talker's layer-0 q alone in its
    cell (it shared the thinker's, stack None); the per-role table names "talker q"; a sweep of it reads so too."""
    from spectra.report.sweep import write_truncation_report
    from tests.report.test_sweep_report import loss_point, sweep_like_the_review

    assert tables.stacks_of(omni) == [None, "talker", "code_predictor"]
    folder = render.write_report(omni, tmp_path / "report")
    figures = {p.stem for p in (folder / "figures").glob("*.png")}
    assert figures == set(plots.all_figures(omni)) and figures >= {"rank_heatmap", "decay"}
    md, html = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    assert "3 stacks of layers (language model, talker, code_predictor)" in md and "talker q" in html
    for plot in (plots.plot_rank_heatmap, plots.plot_relative_size_heatmap):
        panels = [ax for ax in plot(omni).axes if ax.get_images()]
        assert [ax.get_title(loc="left") for ax in panels] == ["language model", "talker", "code_predictor"]
    talker = plots.plot_rank_heatmap(omni).axes[1]
    (q0,) = [r for r in tables.matrix_rows(omni) if r["name"] == "talker.model.layers.0.self_attn.q_proj"]
    assert [t.get_text() for t in talker.get_xticklabels()] == ["q", "v", "down"]
    assert talker.get_images()[0].get_array()[0, 0] == q0["energy_rank"]["0.9"]
    entries = {(e["stack"], e["role"]): e for e in tables.summary_rows(omni)}
    assert (entries[("talker", "q")]["label"], entries[("talker", "q")]["modules"]) == ("talker q", 2)
    assert entries[(None, "q")]["modules"] == 3  # the thinker's layers 0, 1 and the split c_attn[q], as before
    assert entries[("code_predictor", "q")]["label"] == "code_predictor q"

    sweep = sweep_like_the_review()
    sweep["modules"].append({"name": q0["name"], "role": "q", "stack": "talker", "shape": [16, 16], "full_rank": 16,
                             "plan_rank": 2})
    sweep["points"] += [loss_point(group, rank, 2.9 - 0.001 * rank, 0.01, [0.0, 0.02])
                        for group in ("q", "v", "talker q") for rank in (1, 2)]
    md = (write_truncation_report(sweep, tmp_path / "sweep") / "report.md").read_text()
    assert "Per role of each stack (language model, talker;" in md and "| talker q | tuned | 1 |" in md
