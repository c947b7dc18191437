"""The truncation sweep's report: numbers as the table's other cells, and the functional rank in words."""

from __future__ import annotations

import json
import re

import pytest

from spectra.ranks import functional_ranks
from spectra.report.sweep import functional_text, interval_text, signed, write_truncation_report

NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0(?![.\d])")  # "-0" on its own, not "-0.002"


def loss_point(group, rank, loss, gap, gap_interval, *, non_target="tuned"):
    return {"group": group, "non_target": non_target, "rank": rank, "label": "plan" if rank is None else f"r={rank}",
            "metric": loss, "interval": [loss - 0.02, loss + 0.02], "gap": gap, "gap_interval": gap_interval,
            "loss": loss, "accuracy": 0.4}


def sweep_like_the_review():
    """Ranks 1, 2 and 100 of modules 64 and 32 wide (100 is the fine-tune itself: its gap -0.0 as the sweep computes
    it, 0.0 with a minus sign from `sign * (a - a)`), and a plan point."""
    points = [loss_point("model", 1, 2.904, 0.01946, [0.01832, 0.02057]),
              loss_point("model", 2, 2.897, 0.01184, [0.01032, 0.01406]),
              loss_point("model", 100, 2.885, -0.0, [-0.0, 0.0]),
              loss_point("plan", None, 4.598, 1.713, [1.69, 1.734], non_target="base")]
    return {"kind": "truncation_sweep", "base": "b", "tuned": "t", "data": "eval.txt", "examples": 5, "units": 595,
            "unit": "tokens", "truncation": "eckart-young", "non_target": ["tuned"],
            "metric": {"name": "loss", "higher_is_better": False},
            "bootstrap": {"replicates": 1000, "confidence": 0.95},
            "reference": {"tuned": {"metric": 2.885, "interval": [2.862, 2.908]},
                          "base": {"metric": 4.826, "interval": [4.804, 4.852]}},
            "points": points, "modules": [{"name": "q0", "role": "q", "shape": [64, 64], "full_rank": 64,
                                           "plan_rank": 2},
                                          {"name": "v0", "role": "v", "shape": [32, 64], "full_rank": 32,
                                           "plan_rank": 2}],
            "config": {}, "notes": []}


def test_numbers_have_four_significant_digits_and_zero_has_no_minus_sign():
    assert interval_text([0.00027419586895049974, 0.012345678]) == "[0.0002742, 0.01235]"
    assert interval_text([-0.0, 0.0]) == "[0, 0]" and interval_text(None) == ""
    assert signed(-0.0) == "+0" and signed(0.0119999) == "+0.012" and signed(-0.0021) == "-0.0021"


def test_report_states_a_functional_rank_at_full_rank_as_such(tmp_path):
    sweep = sweep_like_the_review()
    choice = functional_ranks(sweep, 0.01)
    out = write_truncation_report(sweep, tmp_path / "sweep", marks={"functional ε=0.01": 100}, functional=choice)
    md = (out / "report.md").read_text()
    assert ("Functional rank (model, ε=0.01, non-targets from tuned): 100, full rank: no swept rank below full rank "
            "met ε (gap +0, interval [0, 0])") in md
    assert "| model | tuned | 100 | 2.885 [2.865, 2.905] | +0 [0, 0] |" in md
    assert "| plan | base | plan | 4.598 [4.578, 4.618] | +1.713 [1.69, 1.734] |" in md
    assert not NEGATIVE_ZERO.search(md)
    recorded = json.loads((out / "sweep.json").read_text())["functional"]
    assert recorded["epsilon"] == 0.01 and recorded["non_target"] == "tuned"
    assert recorded["groups"] == json.loads(json.dumps(choice["groups"]))
    assert recorded["groups"]["model"]["at_full_rank"] is True


@pytest.mark.parametrize(("entry", "text"), [
    ({"rank": 4, "gap": 0.008, "gap_interval": [-0.002, 0.02], "resolved": False, "at_full_rank": False},
     "4 (gap +0.008, interval [-0.002, 0.02], not resolved by this eval set)"),
    ({"rank": 4, "gap": 0.001, "gap_interval": [-0.004, 0.006], "resolved": True, "at_full_rank": False},
     "4 (gap +0.001, interval [-0.004, 0.006], resolved)"),
    ({"rank": 4, "gap": 0.001, "gap_interval": None, "resolved": None, "at_full_rank": None},
     "4 (gap +0.001, no interval (no bootstrap))"),
    ({"rank": 100, "gap": -0.0, "gap_interval": [-0.0, 0.0], "resolved": True, "at_full_rank": True,
      "full_rank": 64, "swept": [1, 2, 100]},
     "100, full rank: no swept rank below full rank met ε (gap +0, interval [0, 0])"),
    ({"rank": 64, "gap": 0.0, "gap_interval": [0.0, 0.0], "resolved": True, "at_full_rank": True,
      "full_rank": 64, "swept": [64, 128]},
     "64, full rank: no rank below full rank was swept (gap +0, interval [0, 0])"),
    ({"rank": None, "swept": [1, 2]}, "none of the swept ranks"),
    ({"rank": None, "swept": [1, 2], "nonfinite_gap": [1]},
     "none of the swept ranks; the metric is not finite at rank 1, read as outside ε"),
    ({"rank": 4, "gap": 0.001, "gap_interval": None, "resolved": None, "at_full_rank": False, "nonfinite_gap": [8, 16]},
     "4 (gap +0.001, no interval (no bootstrap)); the metric is not finite at rank 8, 16, read as outside ε"),
    ({"rank": None, "swept": [1, 2], "full_rank": 16, "at_full_rank": None, "unreached": True},
     "none: the eval data never reached this curve's modules (at rank 0 every example's outputs are the full "
     "fine-tune's); recommend gives them their spectral rank"),
])
def test_functional_text(entry, text):
    assert functional_text(entry) == text


def test_the_python_write_report_records_the_functional_result_as_the_cli_does(tmp_path):
    """SweepResult.write_report had no `functional=`: a Python user's sweep.json lacked the record the CLI writes."""
    from spectra.sweep import SweepResult

    sweep = sweep_like_the_review()
    choice = functional_ranks(sweep, 0.01)
    out = SweepResult(sweep).write_report(tmp_path / "sweep", functional=choice)
    recorded = json.loads((out / "sweep.json").read_text())["functional"]
    assert recorded["groups"]["model"]["rank"] == 100 and recorded["epsilon"] == 0.01
    assert "Functional rank (model, ε=0.01" in (out / "report.md").read_text()
    plain = SweepResult(sweep).write_report(tmp_path / "plain")  # without: no record, as before
    assert "functional" not in json.loads((plain / "sweep.json").read_text())


def test_every_sweep_figure_has_a_title():
    """The per-role figure had none: a reader of the PNG alone could not tell what was truncated."""
    from spectra.report.sweep import plot_role_curves, plot_truncation_curve

    sweep = sweep_like_the_review()
    sweep["points"] += [loss_point(role, rank, 2.9 - 0.001 * rank, 0.01, [0.0, 0.02])
                        for role in ("q", "v") for rank in (1, 2)]
    for fig in (plot_truncation_curve(sweep), plot_role_curves(sweep)):
        titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
        assert any(t.strip() for t in titles)
    assert plot_role_curves(sweep).axes[0].get_title().startswith("loss vs rank, one role truncated at a time")


def test_role_curves_of_two_stacks_are_named_and_drawn_apart(tmp_path):
    """A sweep of a vision tower beside the language model: its curves read "vision q" in the table, the caption
    says what that names, and each stack's curves have a line style of their own. Control: a one-stack sweep's
    caption and solid lines, as before."""
    from spectra.report.sweep import plot_role_curves

    def styles(sweep):
        return {c.get_label(): c.lines[0].get_linestyle() for c in plot_role_curves(sweep).axes[0].containers}

    sweep = sweep_like_the_review()
    sweep["modules"].append({"name": "vq0", "role": "q", "stack": "vision", "shape": [16, 16], "full_rank": 16,
                             "plan_rank": 2})
    sweep["points"] += [loss_point(group, rank, 2.9 - 0.001 * rank, 0.01, [0.0, 0.02])
                        for group in ("q", "v", "vision q") for rank in (1, 2)]
    assert styles(sweep) == {"q": "-", "v": "-", "vision q": "--"}
    md = (write_truncation_report(sweep, tmp_path / "two") / "report.md").read_text()
    assert ('*Per role of each stack (language model, vision; a role of another stack than the language model\'s is '
            'named after it: "vision q"): only that role\'s updates truncated, every other target at full rank.*') in md
    assert "| vision q | tuned | 1 |" in md
    # control: the same sweep without the tower
    sweep["modules"].pop()
    sweep["points"] = [p for p in sweep["points"] if p["group"] != "vision q"]
    assert styles(sweep) == {"q": "-", "v": "-"}
    md = (write_truncation_report(sweep, tmp_path / "one") / "report.md").read_text()
    assert "*Per role: only that role's updates truncated, every other target at full rank.*" in md


def test_a_curve_the_eval_data_never_reached_is_said_so(tmp_path):
    """A sweep that found "vision q" unreached (flat: text never runs through the tower) says so in the summary, gives
    it no functional rank there, and labels its line in the role figure; the note is listed. Control: the same sweep
    without the marker (written before the check) reads as before."""
    from spectra.report.sweep import plot_role_curves

    def labels(sweep):
        return [c.get_label() for c in plot_role_curves(sweep).axes[0].containers]

    sweep = sweep_like_the_review()
    sweep["modules"].append({"name": "vq0", "role": "q", "stack": "vision", "shape": [16, 16], "full_rank": 16,
                             "plan_rank": 2})
    sweep["points"] += [loss_point("q", rank, 2.9 - 0.001 * rank, 0.01, [0.0, 0.02]) for rank in (1, 2)]
    sweep["points"] += [loss_point("vision q", rank, 2.885, 0.0, [0.0, 0.0]) for rank in (1, 2)]
    note = "the 'vision q' curve (non-targets from tuned) is not reached by the eval data: …"
    marked = sweep | {"unreached": [{"group": "vision q", "non_target": ["tuned"], "modules": ["vq0"], "note": note}],
                      "notes": [note]}
    md = (write_truncation_report(marked, tmp_path / "marked", functional=functional_ranks(marked, 0.01))
          / "report.md").read_text()
    # flagged in the summary, said once in the notes: the summary had repeated the note's words
    assert "- Not reached by the eval data: the 'vision q' curve (non-targets from tuned); see the notes\n" in md
    assert "changed module(s) leave every example's" not in md
    assert "Functional rank (vision q, ε=0.01, non-targets from tuned): none: the eval data never reached" in md
    assert f"- {note}" in md
    assert labels(marked) == ["q", "vision q (not reached by the data)"]
    # control: before the check
    md = (write_truncation_report(sweep, tmp_path / "plain", functional=functional_ranks(sweep, 0.01))
          / "report.md").read_text()
    assert "Not reached" not in md and "Functional rank (vision q, ε=0.01, non-targets from tuned): 1 (" in md
    assert labels(sweep) == ["q", "vision q"]


def test_a_mark_at_rank_0_keeps_the_rank_axis_readable():
    """A functional rank of 0 (a loose ε) on the log₂ axis had stretched it to 2⁻⁴⁹ and squeezed the curve into its
    right edge; the axis is then symmetric-log (linear from 0 to 1) and the mark sits at 0. Without it: log₂."""
    from spectra.report.sweep import plot_truncation_curve

    sweep = sweep_like_the_review()
    marked = plot_truncation_curve(sweep, marks={"functional ε=0.5": 0}).axes[0]
    assert marked.get_xscale() == "symlog"
    low, high = marked.get_xlim()
    assert -16 < low <= 0 and 100 <= high < 400  # the mark at 0 inside, no 2⁻⁴⁹ on the left
    plain = plot_truncation_curve(sweep, marks={"functional ε=0.01": 2}).axes[0]
    assert plain.get_xscale() == "log" and plain.get_xlim()[0] > 0.5


@pytest.mark.parametrize("replicates, examples, because", [(0, 5, "bootstrap=0"),
                                                           (1000, 1, "one eval example: nothing to resample")])
def test_a_sweep_without_intervals_does_not_claim_them(tmp_path, replicates, examples, because):
    from spectra.report.sweep import plot_truncation_curve, truncation_blocks

    sweep = sweep_like_the_review() | {"examples": examples,
                                       "bootstrap": {"replicates": 0, "confidence": 0.95, "none_because": because}}
    text = json.dumps(truncation_blocks(sweep, figures=[]))
    assert f"intervals: none ({because})" in text and "percentile bootstrap" not in text
    assert plot_truncation_curve(sweep).axes[0].get_title().endswith("no intervals)")
    claimed = sweep_like_the_review()  # the control: 1000 replicates over 5 examples
    assert "95% percentile bootstrap over examples, 1000 replicates" in json.dumps(truncation_blocks(claimed, figures=[]))
    assert "bootstrap intervals" in plot_truncation_curve(claimed).axes[0].get_title()
