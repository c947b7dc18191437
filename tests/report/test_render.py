"""The report directory: its files, self-contained HTML, JSON round trip, and atomic writing."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from spectra.errors import ConfigError
from spectra.report import render
from spectra.report.tables import matrix_rows, role_table

FIGURES = ("decay", "cumulative_energy", "rank_heatmap", "relative_size_heatmap", "effective_rank_hist")


@pytest.fixture(scope="module")
def written(tmp_path_factory, make_analysis):
    """One full report of the planted analysis (figures are the slow part, so write it once)."""
    analysis = make_analysis()
    out = render.write_report(analysis, tmp_path_factory.mktemp("reports") / "run1")
    return analysis, out


@pytest.fixture
def cheap_figures(monkeypatch):
    """Replace the real figures with one tiny figure, for tests about writing rather than drawing."""
    def tiny(analysis, **options):
        fig = Figure(figsize=(1, 1))
        fig.subplots().plot([0, 1], [1, 0])
        return {"tiny": fig}

    monkeypatch.setattr(render, "all_figures", tiny)


def test_report_has_every_file(written):
    _, out = written
    assert {p.name for p in out.iterdir()} == {"analysis.json", "report.md", "report.html", "figures"}
    assert {p.name for p in (out / "figures").iterdir()} == {f"{n}.{e}" for n in FIGURES for e in ("png", "svg")}
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert "<svg" in (out / "figures" / f"{name}.svg").read_text()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_json_round_trips_in_given_key_order(written):
    analysis, out = written
    loaded = json.loads((out / "analysis.json").read_text())
    assert loaded == analysis
    assert list(loaded) == list(analysis)
    assert list(loaded["modules"][0]) == list(analysis["modules"][0])


def test_json_is_strict_for_numpy_and_non_finite_values():
    text = render.analysis_json({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"),
                                 "d": (1, float("inf")), "e": np.int64(7)})
    assert json.loads(text) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": [1, None], "e": 7}


def test_html_is_self_contained(written):
    _, out = written
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link|<script|https?://|url\(", page)
    # the embedded image is the PNG written beside it
    first = base64.b64decode(sources[0].split(",", 1)[1])
    assert first == (out / "figures" / f"{FIGURES[0]}.png").read_bytes()


def test_markdown_and_html_hold_the_same_sections(written):
    analysis, out = written
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for heading in ("Summary", "Per role", "Figures", "Per module", "Run configuration"):
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in page
    for name in FIGURES:
        assert f"](figures/{name}.png)" in md
    for row in matrix_rows(analysis):  # the per-module table lists every matrix
        assert f"| {row['name']} |" in md
    assert "/models/base" in md and "117.7 MiB" in md and "12.5 s" in md
    assert "transformer.h.0.attn.c_attn[q]" in page


def test_role_table_markdown_has_one_line_per_role(analysis):
    lines = render.role_table_markdown(analysis).splitlines()
    headers, rows = role_table(analysis)
    assert len(lines) == 2 + len(rows)
    assert lines[0].count("|") == len(headers) + 1


def test_existing_directory_is_refused_without_overwrite(tmp_path, analysis, cheap_figures):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        render.write_report(analysis, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # overwrite replaced the folder whole, keep.txt with it: only a folder write_report wrote (or an empty one) goes
    with pytest.raises(ConfigError, match="holds keep.txt, which `spectra analyze` does not write"):
        render.write_report(analysis, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    render.write_report(analysis, out, overwrite=True)
    render.write_report(analysis, out, overwrite=True)  # its own report: replaced
    assert (out / "report.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside is left


def test_failure_mid_write_leaves_no_directory(tmp_path, analysis, cheap_figures, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "to_html", broken)  # fails after JSON, figures and Markdown are written
    with pytest.raises(RuntimeError, match="disk full"):
        render.write_report(analysis, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_failure_with_overwrite_keeps_the_old_report(tmp_path, analysis, cheap_figures, monkeypatch):
    out = tmp_path / "run"
    render.write_report(analysis, out)
    (out / "report.md").write_text("previous report")
    monkeypatch.setattr(render, "to_markdown", lambda blocks: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        render.write_report(analysis, out, overwrite=True)
    assert (out / "report.md").read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_input_creates_nothing(tmp_path, analysis):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; `spectra analyze` writes a directory there"):
        render.write_report(analysis, tmp_path / "file", overwrite=True)
    analysis["modules"] = []
    with pytest.raises(ConfigError, match="no weight-matrix modules"):
        render.write_report(analysis, tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_parent_directories_are_created(tmp_path, analysis, cheap_figures):
    out = render.write_report(analysis, tmp_path / "reports" / "nested" / "run")
    assert (out / "analysis.json").exists()


def test_the_summary_lists_what_the_pairing_left_out(analysis):
    """Unpaired and skipped tensors were in analysis.json only, never in the report."""
    import copy

    data = copy.deepcopy(analysis)
    data["pairing"] = {"only_in_base": ["model.layers.1.mlp.up_proj.weight"], "only_in_tuned": [],
                       "skipped": ["tensor model.layers.0.self_attn.q_proj.weight in tuned holds 1 NaN/Inf value(s)"],
                       "notes": [f"note {i}" for i in range(7)]}
    items = next(b[1] for b in render.report_blocks(data, figures=[]) if b[0] == "ul")
    text = "\n".join(items)
    assert "Only in the base, not analysed (1): model.layers.1.mlp.up_proj.weight" in text
    assert "Skipped (--skip-nonfinite) (1): tensor model.layers.0.self_attn.q_proj.weight" in text
    assert "Only in the tuned" not in text  # nothing to say
    assert "Pairing notes (7): note 0; note 1; note 2; note 3; note 4 …" in text


def _per_role(md: str) -> str:
    return md.split("## Per role", 1)[1].split("## Figures", 1)[0]


def test_per_role_section_says_which_unchanged_matrices_it_leaves_out(analysis, unchange, make_analysis):
    for r in analysis["modules"]:
        if r.get("role") == "k":
            unchange(r)
    section = _per_role(render.to_markdown(render.report_blocks(analysis, figures=[])))
    assert "3 unchanged matrices are left out (ΔW = 0; every k matrix)." in section
    assert "| k |" not in section and "| q | 4 |" in section
    plain = _per_role(render.to_markdown(render.report_blocks(make_analysis(), figures=[])))
    assert "unchanged" not in plain and "| k | 3 |" in plain  # negative control: the fixture as built


def test_report_of_an_unchanged_pair_says_so_instead_of_a_table(tmp_path, analysis, unchange):
    for r in analysis["modules"]:
        if r.get("kind") == "matrix":
            unchange(r)
    out = render.write_report(analysis, tmp_path / "same")  # every figure too: none may crash
    section = _per_role((out / "report.md").read_text())
    assert "Every weight matrix is unchanged (ΔW = 0)" in section and "| role |" not in section


def test_a_report_finds_the_stacks_of_its_analysis_once(tmp_path, monkeypatch, make_analysis):
    """Every label of the report takes the analysis's stacks (tables.stacks_of, a pass over its validated rows): the
    tables, sentences and figures each computed them again, 8 times for this analysis. The report computes them once and
    passes them on; its files are those of the functions called alone (the tests above, and each table's own)."""
    from spectra.report import plots, tables

    calls, stacks_of = [], tables.stacks_of

    def counted(analysis):
        calls.append(1)
        return stacks_of(analysis)

    for module in (render, plots, tables):
        monkeypatch.setattr(module, "stacks_of", counted, raising=False)
    analysis = make_analysis()
    out = render.write_report(analysis, tmp_path / "run")
    assert len(calls) == 1
    assert (out / "report.md").read_text() == render.to_markdown(render.report_blocks(analysis, figures=FIGURES))
    assert len(calls) == 2  # negative control: report_blocks called alone computes them itself


def test_the_svg_keeps_the_pngs_layout_and_the_figure_its_engine(tmp_path, monkeypatch):
    """save_figure lays the figure out once (for the PNG) and draws the SVG with those axes positions."""
    def figure():
        fig = Figure(figsize=(4, 3), layout="constrained")
        ax = fig.subplots()
        ax.plot([1, 10, 100], [1, 0.1, 0.01])
        ax.set_yscale("log")
        ax.set_ylabel("a long label that constrained layout makes room for")
        return fig

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    layouts = []
    real = ConstrainedLayoutEngine.execute
    monkeypatch.setattr(ConstrainedLayoutEngine, "execute", lambda self, f: layouts.append(f) or real(self, f))
    fig = figure()
    engine = fig.get_layout_engine()
    render.save_figure(fig, tmp_path, "f")
    assert len(layouts) == 1  # one layout for both formats (one per format before)
    assert fig.get_layout_engine() is engine
    laid_out = fig.axes[0].get_position().bounds
    assert laid_out != figure().axes[0].get_position().bounds  # the layout did move the axes
    svg = (tmp_path / "f.svg").read_text()
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG") and "<svg" in svg
    # The SVG's axes patch sits at the laid-out position (72 px per inch: 288 × 216 px)
    x0, y0, w, h = laid_out
    path = re.search(r'<g id="patch_2">\s*<path d="M ([\d.]+) ([\d.]+)', svg)
    assert path is not None
    assert float(path.group(1)) == pytest.approx(x0 * 288, abs=0.01)
    assert float(path.group(2)) == pytest.approx((1 - y0) * 216, abs=0.01)
