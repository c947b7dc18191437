"""Training and extracting adapters of multi-head latent attention (DeepSeek-V2/V3): its factors are block roles.

PEFT has no default target modules for DeepSeek, and its suffix match of ``target_modules=["q_proj", "v_proj"]``
finds nothing in DeepSeek-V3's attention; spectra's roles name what the modules compute. The referees are PEFT's own
wrapping (which modules carry a LoRA) and PEFT's load and merge of an extracted adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.train import TrainConfig, lora_config, peft_targets, quiet_peft
from tests.checkpoints.test_architectures_mla import tiny_mla
from tests.lora.test_extract import merged_state
from tests.models import flat_update, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _wrapped(peft_model) -> set[str]:
    """The attention modules PEFT put a LoRA on, by their attribute name (q_a_proj, kv_b_proj, …)."""
    from peft.tuners.lora.layer import LoraLayer

    return {name.rpartition(".")[2] for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and ".self_attn." in name}


@pytest.mark.parametrize(("q_lora_rank", "roles", "expected"), [
    (16, None, {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}),
    (16, ("q",), {"q_a_proj", "q_b_proj"}),
    (16, ("v",), {"kv_a_proj_with_mqa", "kv_b_proj"}),
    (16, ("k", "o"), {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}),
    (16, ("q_b", "kv_b"), {"q_b_proj", "kv_b_proj"}),
    (None, ("q", "v"), {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj"}),  # DeepSeek-V2-Lite: a plain q_proj
    (None, ("q_a",), None),  # V2-Lite holds no query factor: refused, naming the roles it holds
])
def test_roles_take_the_mla_factors_peft_wraps(q_lora_rank, roles, expected):
    """train's targets for `roles`, through PEFT's own get_peft_model: a LoRA on exactly the expected attention
    modules of every layer (the MLP's and experts' by the default roles are test_train_moe_targets' concern)."""
    from peft import get_peft_model

    model = tiny_mla("deepseek_v2", q_lora_rank=q_lora_rank)
    config = TrainConfig(rank=2, roles=roles)
    if expected is None:
        with pytest.raises(ConfigError, match=r"no Linear/Conv1D module .* of role\(s\) q_a .* roles are .*kv_a"):
            peft_targets(model, config)
        return
    modules, _ = peft_targets(model, config)
    assert sum(".self_attn." in m for m in modules) == 2 * len(expected)  # both layers
    assert _wrapped(get_peft_model(copy.deepcopy(model), lora_config(model, config, task="causal_lm"))) == expected


def test_train_accepts_the_mla_roles_and_refuses_a_misspelt_one():
    assert TrainConfig(roles=("q_a", "q_b", "kv_a", "kv_b")).roles == ("q_a", "q_b", "kv_a", "kv_b")
    with pytest.raises(ConfigError, match=r"roles \['kva'\]: LoRA targets the block linears .*kv_a, kv_b"):
        TrainConfig(roles=("kva",))


def test_peft_alone_finds_no_target_in_deepseek_v3s_attention():
    """What the module docstring of architectures says of PEFT 0.21: no default target modules for DeepSeek, and
    target_modules=["q_proj", "v_proj"] (Llama's) matches no module of its MLA."""
    from peft import LoraConfig, get_peft_model

    model = tiny_mla("deepseek_v3")
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=2))
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


# rank ≤ 2 updates of every MLA factor and o, in both layers' attention
PLANTED = {f"model.layers.{i}.self_attn.{attr}": rank for i in (0, 1)
           for attr, rank in (("q_a_proj", 2), ("q_b_proj", 1), ("kv_a_proj_with_mqa", 2), ("kv_b_proj", 2),
                              ("o_proj", 1))}


@pytest.mark.parametrize("roles", [None, ("q",), ("v",)])
def test_extracted_adapter_of_the_default_roles_merges_to_the_planted_update(tmp_path, roles):
    """extract's default roles (q, k, v, o, gate, up, down) adapt every factor; --roles q the query's, v the keys'
    and values'. A rank-2 adapter is exact on rank ≤ 2 updates: PEFT's merge gives the tuned weight on the adapted
    modules and the base's elsewhere."""
    base = tiny_mla("deepseek_v3")
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, rank) in enumerate(PLANTED.items()):
            params[name + ".weight"] += flat_update(tuple(params[name + ".weight"].shape), rank, seed=i).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    extract_adapter(b, t, 2, tmp_path / "ad", roles=roles, progress=False)
    adapted = {None: PLANTED, ("q",): {n for n in PLANTED if ".q_" in n},
               ("v",): {n for n in PLANTED if ".kv_" in n}}[tuple(roles) if roles else None]
    with quiet_peft(base, tmp_path / "ad"):  # PEFT's note on the experts' rank_pattern key, which it applies
        state, _ = merged_state(base, tmp_path / "ad")
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for module in PLANTED:
        expected = tuned_state if module in adapted else base_state
        torch.testing.assert_close(state[module + ".weight"], expected[module + ".weight"], rtol=0, atol=1e-6,
                                   msg=module)
