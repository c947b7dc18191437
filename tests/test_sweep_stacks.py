"""A multimodal checkpoint's truncation sweep: each tower's roles are curves of their own, and so are their ranks.

Gemma3ForConditionalGeneration holds a language model and a SigLIP vision tower, each with a layer-0
``self_attn.q_proj`` of role q. The per-role sweep truncated "q" in both at once, and ``recommend --sweep`` gave
both the one curve's rank. Here the language model's q carries a rank-4 update and the tower's a rank-2 one: the
"q" curve must truncate the first alone, the "vision q" curve the second alone, and each module must take its own
curve's functional rank. The eval data is text, which the tower never sees: its curves stay at the fine-tune's
metric to the bit, rank 0 included, and the sweep must say that the data never reached them, so that no
functional rank is read off the flat "vision q" (recommend gives the tower's q its spectral rank instead).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import spectra.sweep as sweep_module
from spectra.analysis import analyze
from spectra.ranks import RankPolicy, functional_ranks, recommend_ranks
from spectra.sweep import SweepConfig, truncation_sweep
from tests.lora.conftest import random_text
from tests.models import add_to_parameter, build_model, low_rank, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = SweepConfig(bootstrap=50, max_length=16)
# the loaded model's parameters, and the modules as spectra names them
TEXT_Q, VISION_Q = ("model.language_model.layers.0.self_attn.q_proj.weight",
                    "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight")
TEXT_MODULE, VISION_MODULE = ("language_model.model.layers.0.self_attn.q_proj",
                              "vision_tower.encoder.layers.0.self_attn.q_proj")
TEXT_K, K_MODULE = ("model.language_model.layers.0.self_attn.k_proj.weight",
                   "language_model.model.layers.0.self_attn.k_proj")
PLANTED = {TEXT_Q: (4, 64), VISION_Q: (2, 64), TEXT_K: (2, 1)}  # parameter -> (rank, scale) of its update
MODULE_KEYS = ["name", "role", "shape", "full_rank", "plan_rank"]  # a sweep.json module as it has always read


def _rank(delta: torch.Tensor) -> int:
    """Rank of a ΔW held in float32 (W_base + ΔW_r rounded): σ above 1e-4 of the largest."""
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    return int((s > 1e-4 * s[0]).sum()) if s[0] > 0 else 0


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The pair, its analysis, a sweep (model and role curves at ranks 1, 2, 4) that records, at every
    evaluation, the rank of each tower's q update in the model evaluated, and a sweep of the q and k curves at
    ranks 2 and 4 with both non-target sources (text k's update has rank 2: both its points are the full fine-tune
    to the bit)."""
    folder = tmp_path_factory.mktemp("gemma3-multimodal")
    base = build_model("gemma3_multimodal")
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    for seed, (name, (rank, scale)) in enumerate(PLANTED.items()):  # q's move the language model's perplexity
        add_to_parameter(tuned, name, scale * low_rank(*params[name].shape, rank, seed=seed + 1))
    pair = save(base, folder / "base", "safetensors"), save(tuned, folder / "tuned", "safetensors")
    data = random_text(folder / "eval.txt", chars=16 * 10, seed=5)
    base_state = base.state_dict()
    evaluated = set()
    example_stats = sweep_module.example_stats

    def recording(model, *args, **kwargs):
        state = model.state_dict()
        evaluated.add(tuple(_rank(state[k].cpu() - base_state[k]) for k in (TEXT_Q, VISION_Q)))
        return example_stats(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module, "example_stats", recording)
        result = truncation_sweep(*pair, data, ranks=[1, 2, 4], groups="both", config=FAST, progress=False)
    control = truncation_sweep(*pair, data, ranks=[2, 4], groups="role", non_target="both", progress=False,
                               config=dataclasses.replace(FAST, roles=("q", "k")))
    analysis = analyze(*pair, cache_dir=False, progress=False).to_dict()
    return result, evaluated, analysis, control


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The negative control: an ordinary LM, one stack."""
    folder = tmp_path_factory.mktemp("llama")
    base = build_model("llama")
    tuned = copy.deepcopy(base)
    add_to_parameter(tuned, "model.layers.0.self_attn.q_proj.weight", 64 * low_rank(32, 32, 2, seed=3))
    pair = save(base, folder / "base", "safetensors"), save(tuned, folder / "tuned", "safetensors")
    data = random_text(folder / "eval.txt", chars=16 * 10, seed=5)
    return truncation_sweep(*pair, data, ranks=[1], groups="role", config=FAST, progress=False)


def test_each_towers_q_is_a_curve_of_its_own_that_truncates_that_tower_alone(gemma, llama):
    result, evaluated, *_ = gemma
    groups = list(dict.fromkeys(p["group"] for p in result.points))
    assert groups == ["model", "down", "gate", "up", "k", "o", "q", "v",  # the language model's, then the tower's
                      "vision up", "vision down", "vision k", "vision o", "vision q", "vision v"]
    modules = {m["name"]: m for m in result.data["modules"]}
    assert modules[VISION_MODULE]["stack"] == "vision" and "stack" not in modules[TEXT_MODULE]
    # (text q rank, vision q rank) of every model evaluated: the full fine-tune (4, 2), the base (0, 0), the model
    # curve (both cut), "q" at r = 1, 2 with the tower's whole, "vision q" at r = 1 with the language model's whole,
    # and "vision q" at r = 0, the check that the flat curve is unreached
    assert evaluated == {(4, 2), (0, 0), (1, 1), (2, 2), (1, 2), (4, 1), (4, 0)}
    # text-only data: the language model's q curve moves, the tower's stays at the full fine-tune's metric exactly
    tuned = result.reference["tuned"]["metric"]
    assert np.isfinite(tuned) and result.curve(group="q")[0]["metric"] != tuned
    assert [p["metric"] for p in result.curve(group="vision q")] == [tuned] * 3
    # control: one stack, the role curves named by their roles and sweep.json's modules as they always were
    assert {p["group"] for p in llama.points} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(list(m) == MODULE_KEYS for m in llama.data["modules"])


def test_a_curve_the_eval_data_never_reaches_is_marked_unreached(gemma, llama):
    """Text never runs through the vision tower: "vision q" at rank 0 (the tower's ΔW removed) gives every example
    the full fine-tune's loss, to the bit. The sweep records the curve as unreached, with a note that names it.
    Controls: the text k curve of the control sweep is just as flat (its ranks 2 and 4 rebuild the rank-2 update
    exactly) but the data runs through it, which its rank 0 shows; curves whose modules have ΔW = 0 are flat for
    that reason (the tower's k, every Llama role but q) and are not marked, nor cost an evaluation. With the base's
    non-targets too, the tower's q is unreached with either, and the text k reached with the fine-tune's is not
    checked again."""
    result, _, _, control = gemma
    (entry,) = result.data["unreached"]
    assert {k: entry[k] for k in ("group", "non_target", "modules")} == {
        "group": "vision q", "non_target": ["tuned"], "modules": [VISION_MODULE]}
    assert entry["note"].startswith("the 'vision q' curve (non-targets from tuned) is not reached by the eval data")
    assert VISION_MODULE in entry["note"] and entry["note"] in result.data["notes"]
    # every point and the two references (distinct configurations), and "vision q" at r = 0; the flat curves of the
    # unchanged modules cost nothing more
    assert result.data["evaluations"] == len(result.points) + 2 + 1
    # control: "k" is flat at every swept rank, reached all the same
    tuned = control.reference["tuned"]["metric"]
    assert [p["metric"] for p in control.curve(group="k")] == [tuned, tuned]
    assert [(u["group"], u["non_target"]) for u in control.data["unreached"]] == [("vision q", ["tuned", "base"])]
    assert not any("'k' curve" in n for n in control.data["notes"])
    # the points and references, "k" and "vision q" at r = 0 (non-targets tuned), and with the base's non-targets
    # "vision q" at r = 0 and at full rank
    assert control.data["evaluations"] == len(control.points) + 2 + 4
    assert functional_ranks(control, 0.01)["groups"]["k"]["rank"] == 2
    assert functional_ranks(control, 0.01, non_target="base")["groups"]["vision q"]["unreached"] is True
    # control: nothing changed in a curve's modules, nothing to reach; the tuned, the base and 7 role curves at r = 1
    assert llama.data["unreached"] == [] and llama.data["evaluations"] == 9


def test_recommend_gives_each_tower_its_own_curves_functional_rank(gemma, tmp_path):
    """The language model's q needs rank 4 within ε (ranks 1 and 2 cost perplexity). The tower's q curve is flat
    because text never reaches it: it has no functional rank, and the tower's q takes the rank the spectral rule
    gives it, its reason saying why; before, it took rank 1 (the smallest swept) "functional≤0.01 (role vision q)"."""
    result, _, analysis, _ = gemma
    choice = functional_ranks(result, 0.01)
    assert (choice["groups"]["q"]["rank"], choice["groups"]["vision q"]["rank"]) == (4, None)
    assert choice["groups"]["vision q"]["unreached"] is True and "unreached" not in choice["groups"]["q"]
    assert (choice["groups"]["q"]["full_rank"], choice["groups"]["vision q"]["full_rank"]) == (32, 16)
    path = result.write_report(tmp_path / "sweep", functional=choice)
    report = (path / "report.md").read_text()
    assert "Functional rank (vision q, ε=0.01, non-targets from tuned): none: the eval data never reached" in report
    assert "Not reached by the eval data: the 'vision q' curve (non-targets from tuned)" in report
    spectral = {m.name: (m.rank, m.reason) for m in recommend_ranks(analysis, RankPolicy()).modules}
    assert spectral[VISION_MODULE][0] == 2  # the planted rank-2 update's energy-0.9 rank
    for sweep in (result, path):  # the result, and the sweep.json it wrote
        plan = recommend_ranks(analysis, RankPolicy(energy=None, functional=0.01), sweep=sweep)
        ranks = {m.name: (m.rank, m.reason) for m in plan.modules}
        assert ranks == {TEXT_MODULE: (4, "functional≤0.01 (role q)"), K_MODULE: (2, "functional≤0.01 (role k)"),
                         VISION_MODULE: (spectral[VISION_MODULE][0],
                                         f"{spectral[VISION_MODULE][1]}; the sweep's data never reached role vision q")}
