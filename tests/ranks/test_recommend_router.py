"""recommend's default roles leave an MoE's router out (role other; planned when roles name other), as train's,
extract's and memory's defaults do: a router is no block role.

What was wrong: recommend with default roles planned DeepSeek-V3's router ``mlp.gate`` (a DeepseekV3TopkRouter, no
Linear), and ``extract --plan`` then refused the plan ("Leave its role out (--roles q,k,v,o)", advice for recommend).
The reference for the end-to-end test is PEFT's own merge of the extracted adapter against the fine-tune as
transformers loads it.
"""

from __future__ import annotations

import copy
import warnings

import torch

from spectra.ranks import RankPolicy, recommend_ranks
from tests.ranks.rows import PLANTED, analysis, make_row

ROUTERS = ["model.layers.1.mlp.gate",  # DeepSeek-V2/V3, Qwen2/3-MoE, OLMoE, GLM-4-MoE
           "model.layers.0.block_sparse_moe.gate",  # Mixtral's and PhiMoE's checkpoints
           "model.layers.0.mlp.shared_expert_gate",  # Qwen2-MoE's shared expert's gate, (1, hidden)
           "model.layers.0.mlp.router",  # gpt-oss
           "model.layers.0.feed_forward.router",  # Llama 4
           "model.layers.0.block_sparse_moe.router.layer",  # Granite-MoE
           "encoder.block.1.layer.1.mlp.router.classifier"]  # SwitchTransformers
KEPT = {"model.layers.0.self_attn.q_proj": "q", "model.layers.0.mlp.gate_proj": "gate",
        "model.layers.0.linear_attn.in_proj_z": "other"}  # Qwen3.5's: an other that is no router


def _rows():
    return ([make_row(name, PLANTED, role=role) for name, role in KEPT.items()]
            + [make_row(name, PLANTED, shape=(4, 32), role="other") for name in ROUTERS])


def test_default_roles_leave_routers_out_with_the_reason():
    plan = recommend_ranks(analysis(*_rows()), RankPolicy())
    assert {m.name for m in plan.modules} == set(KEPT)
    left = {m.name: m.reason for m in plan.left_out}
    assert set(left) == set(ROUTERS)
    assert all("an MoE router" in why and "--roles" in why for why in left.values())


def test_roles_naming_other_plan_the_routers():
    """Negative control: --roles …,other takes every router, as before."""
    plan = recommend_ranks(analysis(*_rows()), RankPolicy(roles=("q", "other")))
    assert {m.name for m in plan.modules} == set(ROUTERS) | {"model.layers.0.self_attn.q_proj",
                                                             "model.layers.0.linear_attn.in_proj_z"}


def test_a_default_plan_of_deepseek_v3_extracts_and_merges_to_the_fine_tune(tmp_path):
    """analyze → recommend (default roles) → extract --plan on a tiny DeepSeek-V3 with a rank-1 update in every
    weight matrix, the router's included: the plan leaves the router out, extract writes the adapter, and PEFT's merge
    equals the fine-tune on every planned module and the base on the router."""
    import transformers as tf
    from peft import PeftModel

    from spectra.analysis import analyze
    from spectra.lora.extract import extract_adapter
    from spectra.lora.train import quiet_peft
    from tests.checkpoints.test_architectures_mla import tiny_mla_pair

    _, b, t = tiny_mla_pair(tmp_path)
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy())
    router = "model.layers.1.mlp.gate"
    assert router not in {m.name for m in plan.modules}
    assert "an MoE router" in next(m.reason for m in plan.left_out if m.name == router)
    extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    loaded_base = tf.DeepseekV3ForCausalLM.from_pretrained(b, dtype=torch.float32)
    loaded_tuned = tf.DeepseekV3ForCausalLM.from_pretrained(t, dtype=torch.float32).state_dict()
    with warnings.catch_warnings(), quiet_peft(loaded_base, tmp_path / "ad"):
        merged = PeftModel.from_pretrained(copy.deepcopy(loaded_base), str(tmp_path / "ad")).merge_and_unload()
    merged, before = merged.state_dict(), loaded_base.state_dict()
    planned = {f"{m.name}.weight" for m in plan.modules if f"{m.name}.weight" in before}
    assert planned and any(".self_attn.kv_b_proj." in k for k in planned)
    for key in planned:
        torch.testing.assert_close(merged[key], loaded_tuned[key], rtol=0, atol=1e-5, msg=key)
    assert torch.equal(merged[f"{router}.weight"], before[f"{router}.weight"])
    assert not torch.equal(loaded_tuned[f"{router}.weight"], before[f"{router}.weight"])  # it was fine-tuned

