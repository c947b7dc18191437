"""config_targets says what PEFT 0.21 adapts for a LoraConfig: checked against PEFT itself (get_peft_model on tiny
models built from config), module by module and parameter by parameter, with the rank and α each gets."""

from __future__ import annotations

import copy
import warnings

import pytest

from spectra.checkpoints.peft_match import config_targets, peft_converted
from spectra.errors import ConfigError
from tests.models import build_model, peft_wrapped, tiny_moe

CONFIGS = {  # family, config: short names, a regex, full names, regex pattern keys, target_parameters, exclusions
    "list": ("llama", {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}),
    "regex": ("llama", {"target_modules": r".*\.layers\.1\.(self_attn\.o|mlp\.(up|down))_proj", "r": 2}),
    "full names": ("llama", {"target_modules": ["model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.k_proj"],
                             "r": 3, "lora_alpha": 6}),
    "regex pattern keys": ("llama", {
        "target_modules": ["q_proj", "k_proj", "down_proj"], "r": 2, "lora_alpha": 4,
        "rank_pattern": {r"layers\.0\..*_proj": 5, "k_proj": 3, r"^model\.layers\.1\.q_proj": 7},
        "alpha_pattern": {r"down_proj": 1.5, r"layers\.1\.self_attn\.k_proj": 9}}),
    "conv1d suffix": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "r": 2, "fan_in_fan_out": True,
                               "rank_pattern": {r"mlp\.c_proj": 4}}),
    "excluded": ("llama", {"target_modules": ["q_proj", "o_proj"],
                           "exclude_modules": ["model.layers.0.self_attn.o_proj"], "r": 2}),
    "saved or excluded": ("llama", {"target_modules": ["q_proj", "lm_head", "o_proj"], "modules_to_save": ["lm_head"],
                                    "exclude_modules": ["model.layers.1.self_attn.o_proj"], "r": 2}),
    "target_parameters": ("mixtral", {
        "target_modules": ["q_proj"], "r": 2, "lora_alpha": 4,
        "target_parameters": ["mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"],
        "rank_pattern": {r"layers\.1\.mlp\.experts\.gate_up_proj": 3}, "alpha_pattern": {r"down_proj": 5}}),
}


def _model(family):
    return tiny_moe("mixtral") if family == "mixtral" else build_model(family)


def peft_wraps(model, config: dict) -> dict[str, tuple[int, float]]:
    """Name → (r, lora_alpha) of every module and parameter PEFT's get_peft_model wraps for `config`."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tiny models
        # a copy: PEFT's conversion of an MoE config writes its own keys into the rank_pattern dict it is given
        wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(**copy.deepcopy(config)))
    return {name: (layer.r["default"], layer.lora_alpha["default"]) for name, layer in peft_wrapped(wrapped).items()}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_config_targets_are_what_peft_wraps_at_the_rank_and_alpha_it_gives(case):
    family, config = CONFIGS[case]
    model, written = _model(family), copy.deepcopy(config)
    found = config_targets(config, [n for n, _ in model.named_modules() if n],
                           parameter_names=[n for n, _ in model.named_parameters()])
    wrapped = peft_wraps(model, config)
    assert config == written  # neither PEFT nor config_targets changed the config the next case reads
    assert found.modules | found.parameters == set(wrapped) and wrapped, case
    assert {n: (found.ranks[n], found.alphas[n]) for n in wrapped} == wrapped, case
    if case == "regex pattern keys":  # the first key in the config's order wins, as in PEFT
        assert wrapped["model.layers.0.self_attn.k_proj"][0] == 5
        assert wrapped["model.layers.1.self_attn.k_proj"] == (3, 9)
        assert found.keys["rank_pattern"]["k_proj"] == ("model.layers.0.self_attn.k_proj",
                                                         "model.layers.1.self_attn.k_proj")
    if case == "conv1d suffix":  # c_proj is attention's and the MLP's: one entry, both modules
        assert found.entries["target_modules"]["c_proj"] == tuple(
            f"transformer.h.{i}.{block}.c_proj" for i in (0, 1) for block in ("attn", "mlp"))
    if case == "excluded":
        assert "model.layers.0.self_attn.o_proj" not in found.modules
        assert "model.layers.1.self_attn.o_proj" in found.modules
    if case == "saved or excluded":  # named by target_modules, left out by PEFT: withheld, and why
        assert "lm_head" not in wrapped and not found.entries["target_modules"]["lm_head"]
        assert found.withheld == {"q_proj": {}, "lm_head": {"lm_head": "modules_to_save"},
                                  "o_proj": {"model.layers.1.self_attn.o_proj": "exclude_modules"}}


def test_peft_converted_is_the_config_peft_wraps_on_a_transformers_5_moe():
    """On Mixtral PEFT rewrites per-expert names (w1, w3, w2) into the fused parameters at 2r, 2α for gate_up_proj:
    config_targets of peft_converted's config is what PEFT wraps; of the config as written, nothing of the experts
    (negative control: the rewrite matters). w1 without w3 is PEFT's ValueError."""
    model = tiny_moe("mixtral")
    config = {"target_modules": ["q_proj", "w1", "w3", "w2"], "r": 2, "lora_alpha": 3}
    modules = [n for n, _ in model.named_modules() if n]
    parameters = [n for n, _ in model.named_parameters()]
    converted = peft_converted(config, model)
    found = config_targets(converted, modules, parameter_names=parameters)
    wrapped = peft_wraps(model, config)
    assert found.modules | found.parameters == set(wrapped)
    assert {n: (found.ranks[n], found.alphas[n]) for n in wrapped} == wrapped
    assert wrapped["model.layers.0.mlp.experts.gate_up_proj"] == (4, 6)
    assert wrapped["model.layers.0.mlp.experts.down_proj"] == (2, 3)
    as_written = config_targets(config, modules, parameter_names=parameters)
    assert not as_written.parameters and set(wrapped) - as_written.modules
    with pytest.raises(ValueError, match="w3"):
        peft_converted({"target_modules": ["w1"]}, model)
    assert set(peft_converted(config, build_model("llama"))["target_modules"]) == set(config["target_modules"])


def test_the_first_matching_key_is_the_one_applied():
    """applied names, per targeted name, the key PEFT gives it (the first in the config's order); a later key that
    matches it too is not applied there. Checked against the rank PEFT gives."""
    family, config = CONFIGS["regex pattern keys"]
    model = _model(family)
    found = config_targets(config, [n for n, _ in model.named_modules() if n])
    wrapped = peft_wraps(model, config)
    k0, k1 = "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"
    assert found.applied["rank_pattern"][k0] == r"layers\.0\..*_proj" and wrapped[k0][0] == 5
    assert found.applied["rank_pattern"][k1] == "k_proj" and wrapped[k1][0] == 3
    assert set(found.applied["rank_pattern"]) <= set(wrapped)  # targeted names only


@pytest.mark.parametrize("shorthand", ["all-linear", "ALL-LINEAR", "All-Linear"])
def test_all_linear_is_refused_by_name_in_any_case(shorthand):
    """PEFT lower-cases target_modules before it compares it with its shorthand: 'ALL-LINEAR' wraps every Linear
    but the head (PEFT itself, below), where read as a regex it would match no module."""
    with pytest.raises(ConfigError, match=rf"target_modules='{shorthand}' is PEFT's shorthand"):
        config_targets({"target_modules": shorthand}, ["model.layers.0.self_attn.q_proj"])
    wrapped = peft_wraps(build_model("llama"), {"target_modules": shorthand})
    assert "model.layers.0.self_attn.q_proj" in wrapped and "lm_head" not in wrapped
