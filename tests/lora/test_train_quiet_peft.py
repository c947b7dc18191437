"""quiet_peft silences PEFT 0.21's "rank_pattern keys did not match any targeted module" where every key it lists
names a target parameter, which PEFT applies all the same, and shows every other warning.

PEFT checks pattern keys against the targeted modules only. The referee for "applied all the same" is the shape of
PEFT's own lora_A on the fused expert parameter (rank · experts rows).
"""

from __future__ import annotations

import copy
import warnings

import pytest

from spectra.lora.train import parameter_pattern_keys, quiet_peft
from tests.models import tiny_moe

UNMATCHED = "did not match any targeted module"
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"  # Mixtral's (experts, 2·ffn, hidden): 3 experts, hidden 32


def _config(**patterns):
    from peft import LoraConfig

    return LoraConfig(r=2, target_modules=["q_proj"], target_parameters=[EXPERTS], **patterns)


def _wrap(model, config, *quiet):
    """get_peft_model under quiet_peft(*quiet) (nothing: the gradient-checkpointing deprecation only); the warnings
    that came out, every one recorded."""
    from peft import get_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_peft(*quiet):
            wrapped = get_peft_model(copy.deepcopy(model), config)
    return wrapped, [str(w.message) for w in caught]


def _expert_rank(peft_model) -> int:
    a = next(p for n, p in peft_model.named_parameters() if "layers.0.mlp.experts.lora_A" in n)
    return a.shape[0] // 3  # lora_A of a fused expert parameter: (r · experts, in)


def test_the_warning_of_a_target_parameters_key_is_silenced_and_its_rank_applied():
    model = tiny_moe("mixtral")
    config = _config(rank_pattern={EXPERTS: 4}, alpha_pattern={EXPERTS: 8})
    assert parameter_pattern_keys(model, config) == {"rank_pattern": [EXPERTS], "alpha_pattern": [EXPERTS]}
    loud, said = _wrap(model, config)  # negative control: PEFT warns of both patterns
    assert sum(UNMATCHED in s for s in said) == 2 and _expert_rank(loud) == 4
    quiet, said = _wrap(model, config, model, config)
    assert not said and _expert_rank(quiet) == 4  # the rank PEFT said it ignored is applied


@pytest.mark.parametrize("patterns", [
    {"rank_pattern": {"model.layers.0.self_attn.no_such_proj": 4}},  # a key naming nothing
    {"rank_pattern": {EXPERTS: 4, "no_such_proj": 4}},  # a target parameter's key beside one naming nothing
    {"rank_pattern": {"model.layers.1.mlp.experts.gate_up_proj": 4}},  # a parameter the adapter does not target
    # PEFT matches keys with case: Gate_Up_Proj names nothing (the warnings module matches its filter without)
    {"rank_pattern": {EXPERTS: 4, "model.layers.0.mlp.experts.Gate_Up_Proj": 6}},
    {"alpha_pattern": {EXPERTS: 4, "model.layers.0.mlp.experts.Gate_Up_Proj": 6}},
])
def test_a_key_naming_no_target_parameter_still_warns(patterns):
    model = tiny_moe("mixtral")
    config = _config(**patterns)
    _, loud = _wrap(model, config)
    _, said = _wrap(model, config, model, config)
    assert [s for s in said if UNMATCHED in s] == [s for s in loud if UNMATCHED in s] != [], patterns


def test_a_key_an_earlier_key_overrides_still_warns():
    """PEFT gives a parameter the first key that matches it: with rank_pattern {gate_up_proj: 3, EXPERTS: 4} the
    experts get rank 3 and EXPERTS is ignored, so its warning stays. Alone, gate_up_proj is applied and silenced."""
    model = tiny_moe("mixtral")
    config = _config(rank_pattern={"gate_up_proj": 3, EXPERTS: 4})
    assert parameter_pattern_keys(model, config)["rank_pattern"] == ["gate_up_proj"]
    quiet, said = _wrap(model, config, model, config)
    assert _expert_rank(quiet) == 3  # PEFT's own: the first key
    assert [s for s in said if UNMATCHED in s and repr(EXPERTS) in s]
    alone = _config(rank_pattern={"gate_up_proj": 3})  # negative control: without the overridden key, no warning
    quiet, said = _wrap(model, alone, model, alone)
    assert _expert_rank(quiet) == 3 and not [s for s in said if UNMATCHED in s]


def test_other_peft_warnings_still_show():
    """PEFT's note that exclude_modules excluded nothing comes through quiet_peft, beside a silenced key."""
    model = tiny_moe("mixtral")
    config = _config(rank_pattern={EXPERTS: 4}, exclude_modules=["no_such_module"])
    _, said = _wrap(model, config, model, config)
    assert any("no modules were excluded" in s for s in said) and not any(UNMATCHED in s for s in said)


def test_a_saved_adapter_loads_quietly_with_its_directory(tmp_path):
    """PeftModel.from_pretrained of a saved adapter: quiet_peft(model, its directory) silences the same warning,
    which the load raises without it (its conversion of a transformers-5 MoE config re-adds the expert keys)."""
    from peft import PeftModel

    model = tiny_moe("mixtral")
    saved, _ = _wrap(model, _config(rank_pattern={EXPERTS: 4}), model, _config(rank_pattern={EXPERTS: 4}))
    saved.save_pretrained(tmp_path / "ad")
    with pytest.warns(RuntimeWarning, match=UNMATCHED):
        PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_peft(model, tmp_path / "ad"):
            loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad"))
    assert not [str(w.message) for w in caught] and _expert_rank(loaded) == 4
