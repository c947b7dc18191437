"""spectra.groups: how modules are grouped and named across stacks, below every stage that labels them."""

from __future__ import annotations

import subprocess
import sys

from spectra.checkpoints.architectures import STACKS
from spectra.groups import curve_name, group_label, group_of, stack_index, stacks_in


def test_stacks_sort_language_model_first_then_as_architectures_lists_them_then_unknown_by_name():
    rows = [{"stack": "zeta"}, {"stack": STACKS[1]}, {}, {"stack": "alpha"}, {"stack": STACKS[0]}, {"stack": None}]
    assert stacks_in(rows) == [None, STACKS[0], STACKS[1], "alpha", "zeta"]  # one each: {} and None are both None
    assert [stack_index(s) for s in (None, *STACKS)] == [(i, "") for i in range(len(STACKS) + 1)]
    assert stack_index("alpha") == (len(STACKS) + 1, "alpha") < stack_index("zeta")


def test_a_role_reads_with_its_stack_only_beside_another_stack():
    lm_q, vision_q = {"name": "layers.0.q_proj", "role": "q"}, {"name": "v.0.q_proj", "role": "q", "stack": "vision"}
    assert group_of(lm_q) == (None, "q") and group_of(vision_q) == ("vision", "q")
    both = stacks_in([lm_q, vision_q])
    assert [group_label(group_of(r), both) for r in (lm_q, vision_q)] == ["q", "vision q"]
    # negative control: a stack shown alone is not named, whichever it is
    assert group_label(group_of(vision_q), stacks_in([vision_q])) == "q"
    assert group_label(group_of(lm_q), stacks_in([lm_q])) == "q"


def test_a_sweep_curve_reads_in_a_sentence_as_the_sweep_notes_write_it():
    """One spelling for the sweep's unreached note and the sweep report's summary, which had each their own."""
    assert curve_name("model") == "the whole-model curve"
    assert [curve_name(g) for g in ("q", "vision q")] == ["the 'q' curve", "the 'vision q' curve"]


def test_the_functional_ranks_label_curves_without_loading_the_reports_or_torch():
    """ranks.functional names a sweep's role curves as the reports name groups; it imported them from
    report.tables, a later stage. Through spectra.groups it loads no report module, and spectra.groups no torch."""
    code = ("import sys, spectra.groups; assert 'torch' not in sys.modules, 'torch'; import spectra.ranks.functional; "
            "loaded = [m for m in sys.modules if m.startswith('spectra.report')]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
