"""Linears named like an MLP's that are none: DeepSeek-V4's KV compressors' ``gate_proj``, AXK2's ``q_gate_proj``
and its gated norms' ``mlp.fc1``/``fc2``.

DeepSeek-V4's compressors (``self_attn.compressor``, and the CSA compressor's Lightning Indexer,
``compressor.indexer``) hold a ``gate_proj`` whose outputs are softmax weights that pool a window of ``kv_proj``'s
outputs into one compressed entry: role ``other``, not the MLP's ``gate`` it was (so ``--roles gate`` took them with
the MLP's). AXK2's ``q_gate_proj`` reads ``[RMSNorm(q latent); q latent]`` and returns every head's ``[q_h; g_h]``,
MLA's ``q_b`` fused with a sigmoid gate on the head's attention output: role ``q_b``, not ``other`` (which left the
query's second factor out of ``--roles q`` and the default roles). AXK2's gated RMSNorms (``input_layernorm``,
``post_attention_layernorm``) scale the normed states by the sigmoid of a low-rank ``mlp.fc1``, ``fc2``: role ``other``,
not the block MLP's ``up`` and ``down`` they were. The references are the models built from config
on the meta device: the class that holds each Linear, and its shape.
"""

from __future__ import annotations

import pytest
import torch

from spectra.checkpoints.architectures import module_info, role_selected
from spectra.lora.train import TrainConfig, peft_targets


def _linears(model) -> dict[str, tuple[str, torch.nn.Linear]]:
    """Every Linear of `model`: name → (the class of the module holding it, the Linear)."""
    return {name: (type(model.get_submodule(name.rpartition(".")[0])).__name__, m)
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def deepseek_v4():
    """A two-layer DeepSeek-V4 on the meta device: layer 0 compressed sparse attention (a compressor and its
    indexer), layer 1 heavily compressed attention (a compressor)."""
    import transformers as tf

    config = tf.DeepseekV4Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                                 q_lora_rank=8, o_lora_rank=8, o_groups=2, index_n_heads=2, index_head_dim=8,
                                 index_topk=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 vocab_size=64, layer_types=["compressed_sparse_attention",
                                                             "heavily_compressed_attention"])
    with torch.device("meta"):
        return tf.DeepseekV4ForCausalLM(config)


@pytest.fixture(scope="module")
def axk2():
    import transformers as tf

    config = tf.AXK2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=8, kv_lora_rank=8,
                           qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=40,
                           moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, vocab_size=64)
    with torch.device("meta"):
        return tf.AXK2ForCausalLM(config)


def test_deepseek_v4s_gate_proj_is_a_gate_only_in_an_mlp(deepseek_v4):
    """Every gate_proj of DeepSeek-V4: role gate where an MLP holds it (the shared experts'), other where a
    compressor or an indexer does (all three kinds present). Negative control: the MLP's up and down keep theirs."""
    config = deepseek_v4.config.to_dict()
    holders = {}
    for name, (holder, _) in _linears(deepseek_v4).items():
        if name.endswith("gate_proj"):
            holders[holder] = holders.get(holder, 0) + 1
            assert module_info(name, config).role == ("gate" if holder.endswith("MLP") else "other"), (name, holder)
        elif holder.endswith("MLP"):
            assert module_info(name, config).role == name.rpartition(".")[2].removesuffix("_proj"), name
    assert holders == {"DeepseekV4CSACompressor": 1, "DeepseekV4Indexer": 1, "DeepseekV4HCACompressor": 1,
                       "DeepseekV4MLP": 2}


def test_deepseek_v4s_gate_role_takes_the_mlps_gates_alone(deepseek_v4):
    """--roles gate (train's targets on the model itself): the shared experts' gate_proj (and the routed experts'
    fused parameters), no compressor's; nor do the default roles (every block linear) take one."""
    modules, _ = peft_targets(deepseek_v4, TrainConfig(rank=2, roles=("gate",)))
    assert modules == [f"model.layers.{i}.mlp.shared_experts.gate_proj" for i in (0, 1)]
    modules, _ = peft_targets(deepseek_v4, TrainConfig(rank=2))
    assert "model.layers.0.self_attn.q_b_proj" in modules and not any(".compressor." in m for m in modules)


def test_axk2s_q_gate_proj_is_the_query_factor_fused_with_its_output_gate(axk2):
    """q_gate_proj: in 2·q_lora_rank ([normed; raw] latent), out heads·(nope + rope + v) (every head's query and
    its output gate), role q_b; --roles q (and the default roles) take it with q_a_proj, --roles gate does not.
    Negative control: the MLP's gate_proj stays gate and the indexer's Linears other."""
    config = axk2.config.to_dict()
    linears = _linears(axk2)
    q_gate = "model.layers.0.self_attn.q_gate_proj"
    assert (linears[q_gate][1].in_features, linears[q_gate][1].out_features) == (2 * 8, 4 * (4 + 4 + 8))
    assert module_info(q_gate, config).role == "q_b"
    assert role_selected("q_b", ("q",)) and not role_selected("q_b", ("gate",))
    assert module_info("model.layers.0.mlp.gate_proj", config).role == "gate"
    assert {module_info(n, config).role for n in linears if ".indexer." in n} == {"other"}
    for name, (holder, _) in linears.items():  # the gated norms' low-rank gate MLP is no block MLP's up and down
        if holder == "AXK2GateMLP":
            assert module_info(name, config).role == "other", name
    assert {n.split(".")[3] for n, (holder, _) in linears.items() if holder == "AXK2GateMLP"} == {
        "input_layernorm", "post_attention_layernorm"}
    assert {module_info(f"model.layers.0.mlp.{m}_proj", config).role for m in ("up", "down")} == {"up", "down"}
    for roles in (("q",), None):
        modules, _ = peft_targets(axk2, TrainConfig(rank=2, roles=roles))
        assert {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_a_proj", "q_gate_proj")} <= set(
            modules), roles
    modules, _ = peft_targets(axk2, TrainConfig(rank=2, roles=("gate",)))
    assert not any("q_gate_proj" in m for m in modules)
    modules, _ = peft_targets(axk2, TrainConfig(rank=2, roles=("up", "down")))
    assert not any("layernorm" in m for m in modules) and "model.layers.0.mlp.up_proj" in modules
