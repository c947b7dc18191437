"""One meta-device build of the model per `spectra recommend`: the plan's fused experts, its peft_config and the memory
estimate share it (:class:`spectra.ranks.plan.MetaModels`), and each reads what it read from its own build.

The reference is the path without ``models`` (each step building its own model, as before) and PEFT's
``get_peft_model`` on a real tiny Mixtral for the plan's total.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

import spectra.checkpoints.targets as targets
from spectra.errors import PeftConfigWarning
from spectra.memory.shape import model_shape
from spectra.ranks import RankPolicy, recommend_ranks, save_plan
from spectra.ranks.plan import MetaModels
from tests.models import build_model, tiny_config, tiny_moe
from tests.ranks.rows import make_row

pytestmark = pytest.mark.filterwarnings(
    # PEFT 0.21 reports pattern keys of target_parameters as unmatched, and applies them
    "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The classes spectra builds on the meta device (every build goes through targets.meta_model), in order."""
    built, build = [], targets.meta_model

    def counted(config, model_class=None):
        built.append(model_class or targets.architecture(config))
        return build(config, model_class)

    monkeypatch.setattr(targets, "meta_model", counted)
    return built


def _config(model) -> dict:
    return model.config.to_dict() | {"architectures": [type(model).__name__]}


def _mixtral_analysis(tmp_path) -> tuple[dict, dict]:
    """(analysis.json dict, config.json dict) of the tiny Mixtral: every attention matrix and expert projection
    changed, at ranks 1-3 by expert, except layer 1 expert 2's w3 (left out: PEFT trains its rows all the same)."""
    config = tiny_config("mixtral").to_dict() | {"architectures": ["MixtralForCausalLM"]}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    rows = []
    for layer in range(2):
        for proj, shape in (("q", (32, 32)), ("k", (16, 32)), ("v", (16, 32)), ("o", (32, 32))):
            rows.append(make_row(f"model.layers.{layer}.self_attn.{proj}_proj", [4.0, 2.0, 1.0], shape=shape,
                                 role=proj, layer=layer))
        for expert in range(3):
            for w, role, shape in (("w1", "gate", (48, 32)), ("w3", "up", (48, 32)), ("w2", "down", (32, 48))):
                if (layer, expert, w) != (1, 2, "w3"):
                    rows.append(make_row(f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}",
                                         [4.0, 2.0, 1.0][:expert + 1], shape=shape, role=role, layer=layer))
    analysis = {"schema_version": 1, "config": {}, "base": {"path": str(tmp_path / "base"), "fingerprint": "abc"},
                "modules": rows}
    return analysis, config


def _saved(plan, path, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftConfigWarning)
        save_plan(plan, path, **kwargs)
    return json.loads(path.read_text())


def test_plan_and_its_peft_config_share_one_build(tmp_path, builds):
    from peft import LoraConfig, get_peft_model

    analysis, _ = _mixtral_analysis(tmp_path)
    policy = RankPolicy(energy=0.99)
    # each step building its own (before): the plan's experts, then the peft_config, two Mixtral builds
    plan = recommend_ranks(analysis, policy)
    before = _saved(plan, tmp_path / "before.json")
    assert builds == ["MixtralForCausalLM"] * 2
    builds.clear()
    models = MetaModels()
    shared = recommend_ranks(analysis, policy, models=models)
    after = _saved(shared, tmp_path / "after.json", models=models)
    assert builds == ["MixtralForCausalLM"]
    assert shared == plan and after == before and after["fused"] and after["peft_config"]["target_parameters"]
    peft = get_peft_model(build_model("mixtral"), LoraConfig(**{k: v for k, v in after["peft_config"].items()
                                                                  if k != "peft_type"}))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert after["totals"]["params"] == trained  # what PEFT trains, the left-out w3's rows included


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_memory_shape_reads_the_base_model_inside_the_plans(family, builds):
    """The memory model's base model (its parameter count and linear layers, every family's; MixtralModel's router
    too) is the causal LM's own, built for the plan: no second build, the same shape."""
    config = _config(tiny_moe(family))
    before = model_shape(config)
    assert len(builds) == 1 and builds[0].endswith("Model")  # built its own base model
    builds.clear()
    models = MetaModels()
    causal = models(config)
    shape = model_shape(config, models=models)
    assert builds == [type(causal).__name__] and shape == before
    base_class = type(causal.base_model).__name__
    assert models(config, base_class) is causal.base_model and builds == [type(causal).__name__]


def test_another_config_is_built_afresh(builds):
    """Negative control: a config that differs, or the caller's dict changed since, is not answered with the model
    built before."""
    models, config = MetaModels(), tiny_config("mixtral").to_dict() | {"architectures": ["MixtralForCausalLM"]}
    first = models(config)
    deeper = copy.deepcopy(config) | {"num_hidden_layers": 3}
    assert len(models(deeper).model.layers) == 3 and len(first.model.layers) == 2
    config["num_hidden_layers"] = 3  # the dict it was built from, changed in place: now the deeper one's
    assert models(config) is models(deeper) is not first and len(builds) == 2


def test_recommend_builds_the_model_once(tmp_path, builds):
    """`spectra recommend -o` on an MoE: one build for the plan's experts, its peft_config and the memory estimate
    (four before: the plan's, MixtralModel and MixtralForCausalLM for memory, the peft_config's), and the same plan
    and estimate as each step building its own."""
    from typer.testing import CliRunner

    from spectra.cli import app
    from spectra.memory import estimate_memory

    analysis, _ = _mixtral_analysis(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "analysis.json").write_text(json.dumps(analysis))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["recommend", str(tmp_path / "run"), "--energy", "0.99", "--json", "-o",
                                      str(out)])
    assert result.exit_code == 0, result.output
    assert builds == ["MixtralForCausalLM"]
    printed = json.loads(result.output)
    builds.clear()
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99))
    reference = estimate_memory(tmp_path / "base", rank_plan_or_rank=plan)
    assert len(builds) == 3  # each its own: the plan's, then memory's base model and causal LM
    saved = _saved(plan, tmp_path / "before.json")  # the plan file, its peft_config from a build of its own
    assert printed == json.loads(json.dumps(saved | {"memory": reference.to_dict()}))
    assert json.loads(out.read_text()) == printed
