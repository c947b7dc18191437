"""The truncation sweep's --roles select as a LoRA adapts (train, extract): ``k`` or ``v`` takes DeepSeek's kv_a and
kv_b whole (each changes keys and values), ``q`` its q_a and q_b, and ``q`` (or ``k``, ``v``) GPT-2's fused c_attn.

What was wrong: the sweep selected through pairing's role names (an analysis's selection, where kv_b's k and v are
projections of the split tensor), with no split: ``--roles k`` or ``v`` took nothing on DeepSeek ("nothing to
truncate"), ``q,k,v`` only the query factors, without a word, and ``--roles q`` nothing of GPT-2. The reference is
transformers' own model: its Linear modules by attribute name. The swept model at rank 0 is checked against the base
and the fine-tune as transformers loads them.
"""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.sweep_weights import ModelWeights, _sweep_pairing, _target_entries
from tests.checkpoints.test_architectures_mla import tiny_mla_pair
from tests.models import build_model, save

MLA = {"q": {"q_a_proj", "q_b_proj"}, "k": {"kv_a_proj_with_mqa", "kv_b_proj"},
       "v": {"kv_a_proj_with_mqa", "kv_b_proj"}, "o": {"o_proj"}, "kv_b": {"kv_b_proj"}}


def _linears(model, attributes: set[str], *, under: str = "") -> set[str]:
    """transformers' Linear (or Conv1D) modules of `model` whose attribute name is one of `attributes`."""
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and n.rpartition(".")[2] in attributes and under in n}


def _selected(b, t, roles) -> set[str]:
    pairing = _sweep_pairing(b, t, plan=None, roles=roles)
    return {e.name for e in _target_entries(pairing, None, roles, b, t)[0]}


@pytest.fixture(scope="module")
def mla_pair(tmp_path_factory):
    """(base model, base dir, tuned dir) of a tiny DeepSeek-V3, every weight matrix moved by a rank-1 update."""
    return tiny_mla_pair(tmp_path_factory.mktemp("sweep-mla"))


@pytest.mark.parametrize("roles", [("k",), ("v",), ("q",), ("o",), ("kv_b",), ("q", "k", "v")])
def test_sweep_roles_take_the_mla_factors_a_lora_adapts(mla_pair, roles):
    base, b, t = mla_pair
    expected = set().union(*(_linears(base, MLA[r], under=".self_attn.") for r in roles))
    assert expected and _selected(b, t, roles) == expected, roles


def test_the_default_takes_every_mla_factor_and_no_router(mla_pair):
    base, b, t = mla_pair
    selected = _selected(b, t, None)
    attention = _linears(base, set().union(*MLA.values()), under=".self_attn.")
    assert attention <= selected
    assert not any(n.endswith("mlp.gate") for n in selected)  # the router (role other) is no block linear


def test_sweep_roles_v_truncates_kv_a_and_kv_b_in_the_loaded_model(mla_pair):
    """ModelWeights with roles v: the targets are kv_a and kv_b; at rank 0 with the fine-tune's non-targets the model
    holds the base's kv_a and kv_b as transformers loads the base, and every other tensor as it loads the fine-tune."""
    import transformers as tf

    base, b, t = mla_pair
    model = tf.DeepseekV3ForCausalLM.from_pretrained(t, dtype=torch.float32)
    weights = ModelWeights(model, b, t, roles=("v",))
    assert {x.name for x in weights.targets} == _linears(base, MLA["v"])
    weights.apply(tuple(0 for _ in weights.targets), non_target="tuned")
    loaded_base = tf.DeepseekV3ForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    loaded_tuned = tf.DeepseekV3ForCausalLM.from_pretrained(t, dtype=torch.float32).state_dict()
    targeted = {f"{n}.weight" for n in _linears(base, MLA["v"])}
    for key, value in model.state_dict().items():
        reference = loaded_base[key] if key in targeted else loaded_tuned[key]
        torch.testing.assert_close(value, reference, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(loaded_base[k], loaded_tuned[k]) for k in targeted)  # the check can fail


def test_sweep_roles_q_takes_gpt2s_fused_c_attn(tmp_path):
    model = build_model("gpt2")
    b = save(model, tmp_path / "b", "safetensors")
    c_attn = _linears(model, {"c_attn"})
    assert c_attn and _selected(b, b, ("q",)) == c_attn
    assert _selected(b, b, ("o",)) == _linears(model, {"c_proj"}, under=".attn.")  # negative control: o is c_proj


def test_an_unknown_role_is_refused(mla_pair):
    _, b, t = mla_pair
    with pytest.raises(ConfigError, match=r"roles: unknown role\(s\) query; choose from q, k"):
        _sweep_pairing(b, t, plan=None, roles=("query",))
