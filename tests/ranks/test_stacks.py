"""recommend_ranks with RankPolicy.stacks: the roles of the chosen stacks only, on analysis rows of several stacks."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPlan, RankPolicy, recommend_ranks
from tests.ranks.rows import PLANTED, analysis, make_row


def _row(name, role, stack, layer=0):
    row = make_row(name, PLANTED, role=role, layer=layer)
    return row | ({} if stack is None else {"stack": stack})  # the language model's rows carry no stack


# a VLM's language model (no stack key, as analysis.json writes it), vision tower (fused qkv), and projector
ROWS = [_row("model.layers.0.self_attn.q_proj", "q", None), _row("model.layers.0.self_attn.v_proj", "v", None),
        _row("model.layers.0.mlp.up_proj", "up", None), _row("visual.blocks.0.attn.qkv", "qkv", "vision"),
        _row("visual.blocks.0.mlp.fc1", "up", "vision"), _row("visual.merger.mlp.0", "other", "projector")]


def _planned(**policy) -> list[str]:
    return [m.name for m in recommend_ranks(analysis(*ROWS), RankPolicy(energy=0.9, **policy)).modules]


def test_stacks_narrow_the_roles_to_the_chosen_stacks():
    # negative control: roles alone take the vision tower's qkv (its LoRA adapts q, k and v together)
    assert _planned(roles=("q", "v")) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                          "visual.blocks.0.attn.qkv"]
    assert _planned(roles=("q", "v"), stacks=("language",)) == ["model.layers.0.self_attn.q_proj",
                                                                 "model.layers.0.self_attn.v_proj"]
    assert _planned(stacks="vision") == ["visual.blocks.0.attn.qkv", "visual.blocks.0.mlp.fc1"]
    assert _planned(roles=("other",), stacks=("projector",)) == ["visual.merger.mlp.0"]
    assert _planned(stacks=("decoder",)) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                             "model.layers.0.mlp.up_proj"]  # what T5's report calls it


def test_left_out_says_the_stack_and_the_plan_keeps_the_policy(tmp_path):
    plan = recommend_ranks(analysis(*ROWS), RankPolicy(energy=0.9, roles=("up",), stacks=("vision",)))
    assert [m.name for m in plan.modules] == ["visual.blocks.0.mlp.fc1"]
    reasons = {m.name: m.reason for m in plan.left_out}
    assert reasons["model.layers.0.mlp.up_proj"] == "stack 'language' not in stacks"
    assert reasons["visual.blocks.0.attn.qkv"] == "role 'qkv' not in roles"
    again = RankPlan.from_dict(plan.to_dict())
    assert again.policy.stacks == ("vision",) and again.policy == plan.policy


def test_a_stack_the_analysis_lacks_is_refused_and_an_unknown_one_too():
    with pytest.raises(ConfigError, match="stacks audio: the model has no module of that stack; its stacks are "
                                          "language, vision, projector"):
        recommend_ranks(analysis(*ROWS), RankPolicy(stacks=("audio",)))
    with pytest.raises(ConfigError, match=r"RankPolicy.stacks: unknown stack\(s\) text; choose from language"):
        RankPolicy(stacks="text")
    with pytest.raises(ConfigError, match="Relax roles/stacks/include"):  # stacks held, roles none of theirs
        recommend_ranks(analysis(*ROWS), RankPolicy(roles=("other",), stacks=("language",)))


def test_an_analysis_written_before_rows_named_their_stack_reads_it_off_the_names():
    """No row carries a stack (analysis.json files from before stacks): --stacks language must not plan the vision
    tower as the language model's (it did: every row read as the language model)."""
    old = [{k: v for k, v in row.items() if k != "stack"} for row in ROWS]
    planned = [m.name for m in recommend_ranks(analysis(*old), RankPolicy(energy=0.9, stacks=("language",))).modules]
    assert planned == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.0.mlp.up_proj"]
    vision = recommend_ranks(analysis(*old), RankPolicy(energy=0.9, stacks=("vision",))).modules
    assert [m.name for m in vision] == ["visual.blocks.0.attn.qkv", "visual.blocks.0.mlp.fc1"]


def test_a_stack_an_analysis_was_told_to_leave_out_is_named_as_such():
    """An analysis made with --stacks vision holds no language-model row: recommend --stacks language says that the
    analysis left it out, not (only) that the model has none (the model has one)."""
    vision = analysis(*(row for row in ROWS if row.get("stack") == "vision")) | {"config": {"stacks": ["vision"]}}
    with pytest.raises(ConfigError, match=r"no module of that stack.*made with --stacks vision, so it left the others "
                                          r"out"):
        recommend_ranks(vision, RankPolicy(energy=0.9, stacks=("language",)))
    with pytest.raises(ConfigError) as plain:  # negative control: an analysis of every stack says what it said
        recommend_ranks(analysis(*(row for row in ROWS if row.get("stack") == "vision")),
                        RankPolicy(energy=0.9, stacks=("language",)))
    assert "--stacks vision" not in str(plain.value)


def test_a_stack_some_of_the_asked_ones_lack_is_said():
    """--stacks language,audio on an analysis with no audio tower: the language model is planned, and a warning says
    the audio stack is missing (the note missing_stacks returned had been dropped)."""
    with pytest.warns(UserWarning, match=r"no audio stack \(its stacks: language, vision, projector\): the plan "
                                         r"holds no module of it"):
        planned = _planned(roles=("q", "v"), stacks=("language", "audio"))
    assert planned == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
