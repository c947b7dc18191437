"""The plan's peft_config on MoE models whose LoraConfig PEFT rewrites (``convert_peft_config_for_transformers``).

PEFT 0.21 turns every ``target_modules`` entry ending in ``.gate_proj``/``.up_proj``/``.down_proj`` of a model
of the ``qwen2_moe`` conversion family (Qwen3-MoE, DeepSeek-V3, GLM-4 MoE, …) into a fused expert parameter: a
dense layer's MLP named as a module was left unadapted. PEFT itself (``get_peft_model``) is the referee.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, check_peft_conversion, recommend_ranks, save_plan
from tests.models import moved, save, tiny_moe

DENSE = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def _wrapped(model, config: dict) -> dict[str, object]:
    """PEFT's LoRA layers (module name → layer) for ``LoraConfig(**config)`` on a copy of ``model``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on a model without a task
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**fields))
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and not n.endswith("base_layer")}


@pytest.fixture(scope="module")
def qwen3_moe_analysis(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-moe")
    base = tiny_moe("qwen3_moe")
    tuned = moved(base, seed=1)
    b, t = save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze(b, t, AnalysisConfig(roles=("gate", "up", "down")), cache_dir=False, progress=False)
    return base, result, root


@pytest.mark.parametrize("rslora", [False, True])
def test_dense_mlps_and_experts_are_adapted_at_the_planned_scale(qwen3_moe_analysis, rslora, tmp_path):
    base, result, _ = qwen3_moe_analysis
    plan = recommend_ranks(result, RankPolicy(rank=2, roles=("gate", "up", "down"), rslora=rslora))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())["peft_config"]

    layers = _wrapped(base, config)
    assert set(layers) == set(DENSE) | {"model.layers.1.mlp.experts"}
    scale = plan.modules[0].alpha / (2 ** 0.5 if rslora else 2)  # the plan's s = α/√r or α/r at rank 2
    for name, layer in layers.items():
        for inner in [layer, getattr(layer, "base_layer", None)]:  # the experts' two nested ParamWrappers
            if hasattr(inner, "scaling"):
                assert inner.scaling["default"] == pytest.approx(scale), (name, inner.scaling)
    experts = layers.pop("model.layers.1.mlp.experts")  # two nested ParamWrappers, one per fused parameter
    assert {w.parameter_name: w.r["default"] for w in (experts, experts.base_layer)} == \
        {"gate_up_proj": 4, "down_proj": 2}  # gate + up per expert; down
    assert all(layer.r["default"] == 2 for layer in layers.values())  # the dense MLP, on its weights


def test_configs_peft_would_rewrite_are_refused(qwen3_moe_analysis):
    """Negative controls: the dense MLP named as modules (the old peft_config), and per-expert names under rsLoRA
    (PEFT fuses gate and up at 2r, 2α: rsLoRA's α/√r √2 too large)."""
    base, result, _ = qwen3_moe_analysis
    with torch.device("meta"):
        model = type(base)(base.config)
    plan = recommend_ranks(result, RankPolicy(rank=2, roles=("gate", "up", "down")))
    config = plan.to_peft_config(model=model)
    check_peft_conversion(config, model)  # as written: what PEFT wraps is what it names
    assert all(f"{n}.weight" in config["target_parameters"] for n in DENSE)
    old = config | {"target_modules": DENSE,
                    "target_parameters": [p for p in config["target_parameters"] if "experts" in p]}
    with pytest.raises(ConfigError, match=r"not adapt model\.layers\.0\.mlp\.down_proj"):
        check_peft_conversion(old, model)
    assert set(_wrapped(base, old)) == {"model.layers.1.mlp.experts"}  # what PEFT does with it: no dense MLP
    experts = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    per_expert = {"target_modules": experts, "r": 2, "lora_alpha": 4, "use_rslora": False}
    check_peft_conversion(per_expert, model)  # PEFT converts them to exactly those experts' parameters
    with pytest.raises(ConfigError, match="rsLoRA"):
        check_peft_conversion(per_expert | {"use_rslora": True}, model)
    with pytest.raises(ConfigError, match="PEFT refuses"):  # gate without up: PEFT's own refusal, named
        check_peft_conversion({"target_modules": [e for e in experts if "gate" in e], "r": 2}, model)
