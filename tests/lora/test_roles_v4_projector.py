"""What train and extract adapt of DeepSeek-V4's attention (roles kv, o_a, o_b) and of a projector (role projector).

V4's ``o_a_proj`` is a grouped Linear whose forward takes ``(…, groups, in/groups)``: PEFT's ``lora.Linear`` wraps it
and then fails in every forward, so spectra adapts its weight through ``target_parameters``
(:func:`~spectra.checkpoints.targets.lora_can_wrap`). References: PEFT's own wrap and merge, the models' own forward,
the planted ΔW in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from spectra.checkpoints.architectures import module_stack
from spectra.checkpoints.targets import lora_can_wrap
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.train import TrainConfig, lora_config, quiet_peft
from tests.checkpoints.test_architectures_deepseek_v4 import tiny_v4
from tests.checkpoints.test_architectures_projector import _planted_pair
from tests.models import flat_update, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def test_lora_can_wrap_refuses_v4s_grouped_linear_and_peft_shows_why():
    """A grouped o_a_proj (2 groups) is no Linear to PEFT: wrapped as a module, the forward fails (the negative
    control). One group is a plain Linear (wrapped), as are nn.Linear and a Linear subclass of plain forward."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4GroupedLinear

    assert not lora_can_wrap(DeepseekV4GroupedLinear(16, 16, 2))
    assert lora_can_wrap(DeepseekV4GroupedLinear(16, 8, 1)) and lora_can_wrap(torch.nn.Linear(4, 3))
    model = tiny_v4()
    assert not lora_can_wrap(model.model.layers[0].self_attn.o_a_proj)
    assert lora_can_wrap(model.model.layers[0].self_attn.o_b_proj)
    o_a = ["model.layers.0.self_attn.o_a_proj"]
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=o_a))
    with pytest.raises(RuntimeError, match="must match the size"):
        wrapped(IDS)


def _adapted(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def test_train_adapts_v4s_query_key_value_and_output_and_peft_merges_them():
    """The default roles take q_a, q_b, kv, o_b as modules and o_a through its weight (with a note), never the
    compressor's Linears; PEFT runs the adapted model, and its merge (B ≠ 0) changes exactly those weights (and the
    experts'), by s·B@A of rank ≤ r for o_a (float64), with the merged logits the unmerged ones."""
    from peft import get_peft_model

    model = tiny_v4()
    notes: list[str] = []
    config = lora_config(model, TrainConfig(rank=2), task="causal_lm", notes=notes)
    attention = {f"model.layers.{i}.self_attn.{a}" for i in (0, 1) for a in ("q_a_proj", "q_b_proj", "kv_proj",
                                                                             "o_b_proj")}
    assert attention <= set(config.target_modules) and not any("compressor" in n for n in config.target_modules)
    o_a = [f"model.layers.{i}.self_attn.o_a_proj.weight" for i in (0, 1)]
    assert set(o_a) <= set(config.target_parameters)
    assert any("o_a_proj.weight" in n and "cannot wrap" in n for n in notes)
    peft_model = get_peft_model(copy.deepcopy(model), dataclasses.replace(config, init_lora_weights=False))
    assert attention | {n.removesuffix(".weight") for n in o_a} <= _adapted(peft_model)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    wrapper = peft_model.get_submodule("base_model.model.model.layers.1.self_attn.o_a_proj")
    a, b = (getattr(wrapper, f"lora_{x}")["default"].weight.detach().double() for x in "AB")
    scale = wrapper.scaling["default"]
    merged = peft_model.merge_and_unload()
    base = dict(model.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {f"{n}.weight" for n in config.target_modules} | set(config.target_parameters)
    assert not any("compressor" in n for n in changed)
    delta = merged.get_parameter(o_a[1]).detach().double() - base[o_a[1]].detach().double()
    torch.testing.assert_close(delta, scale * b @ a, rtol=1e-5, atol=1e-6)
    assert torch.linalg.svdvals(delta)[2:].max() < 1e-5 < torch.linalg.svdvals(delta)[1]  # rank 2, float32 merge
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_dora_leaves_o_a_out_of_the_default_roles_and_refuses_roles_that_ask_for_it():
    notes: list[str] = []
    model = tiny_v4()
    config = lora_config(model, TrainConfig(rank=2, method="dora", roles=("kv", "o_b")), task="causal_lm", notes=notes)
    assert not config.target_parameters and {n.rpartition(".")[2] for n in config.target_modules} == {"kv_proj",
                                                                                                       "o_b_proj"}
    with pytest.raises(ConfigError, match=r"o_a_proj\.weight .*a Linear PEFT cannot wrap.*takes no DoRA"):
        lora_config(model, TrainConfig(rank=2, method="dora", roles=("o",)), task="causal_lm")


def test_extract_of_a_v4_fine_tune_merges_by_peft_to_it(tmp_path):
    """Planted ranks ≤ 2 in kv_proj, o_a_proj and o_b_proj (stored as attn.wkv, wo_a, wo_b): extract at rank 2 with
    the default roles writes o_a_proj through target_parameters, and PEFT's merge on the base is the fine-tune."""
    from peft import PeftModel

    base = tiny_v4()
    tuned = copy.deepcopy(base)
    planted = {"model.layers.0.self_attn.kv_proj": 2, "model.layers.1.self_attn.o_a_proj": 2,
               "model.layers.1.self_attn.o_b_proj": 1}
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, rank) in enumerate(planted.items()):
            params[name + ".weight"] += flat_update(tuple(params[name + ".weight"].shape), rank, seed=i).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    adapter = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "model.layers.1.self_attn.o_a_proj.weight" in adapter["target_parameters"]
    assert {"model.layers.0.self_attn.kv_proj", "model.layers.1.self_attn.o_b_proj"} <= set(adapter["target_modules"])
    with quiet_peft(base, tmp_path / "ad"):  # the unchanged experts' rank_pattern keys: PEFT applies them
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
    merged = peft_model.merge_and_unload().state_dict()
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(merged[key].double(), value.double(), rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(unmerged, tuned(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_extract_stacks_projector_with_the_default_roles_is_the_projectors_delta(family, tmp_path):
    """--stacks projector alone (default roles): the adapter holds the projector's two Linears, PEFT's merge is the
    base plus their ΔW (float64); the language model's planted q is left out. It was refused: no module of the
    default roles in that stack."""
    from peft import PeftModel

    base, _, b, t, planted = _planted_pair(family, tmp_path)
    result = extract_adapter(b, t, 2, tmp_path / "ad", stacks=("projector",), progress=False)
    config = base.config.to_dict()
    assert len(result.modules) == 2 and {module_stack(m.name, config) for m in result.modules} == {"projector"}
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).merge_and_unload().state_dict()
    for key, value in base.state_dict().items():
        expected = value.double() + (planted[key] if key in planted and module_stack(key, config) == "projector"
                                     else 0)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6, msg=key)
