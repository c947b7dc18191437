"""DeepSeek-V4's attention: ``kv_proj`` (one head, read as the keys and the values) is role kv, ``o_a_proj`` and
``o_b_proj`` (a grouped low-rank output projection) roles o_a and o_b, by the model's names and by its checkpoints'
(``attn.wkv``, ``attn.wo_a`` …, which transformers renames on loading).

They were other: no default role analysed, trained or extracted V4's keys, values or output. The references are the
model built from config (its Linears scanned, not listed), its own forward (the key and value tensors its attention
function receives; its grouped Linear against a float64 block-diagonal product) and transformers' own loading
rename of the names save_pretrained writes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.checkpoints.architectures import module_info, role_named, role_selected
from spectra.checkpoints.roles import BLOCK_ROLES
from tests.models import flat_update, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
# What each Linear directly under a V4 self_attn computes, by its attribute name, written out here
V4_ROLES = {"q_a_proj": "q_a", "q_b_proj": "q_b", "kv_proj": "kv", "o_a_proj": "o_a", "o_b_proj": "o_b"}
HEADS, HEAD_DIM, GROUPS, O_RANK = 4, 16, 2, 8


def tiny_v4(*, seed: int = 0):
    """A two-layer DeepSeek-V4 causal LM, width 32, on the 2⁻¹² grid: layer 0 sliding-window attention (no
    compressor), layer 1 compressed sparse attention (a compressor with its indexer)."""
    import transformers as tf

    config = tf.DeepseekV4Config(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=HEADS,
        head_dim=HEAD_DIM, q_lora_rank=12, n_routed_experts=3, num_experts_per_tok=2, o_groups=GROUPS,
        o_lora_rank=O_RANK, index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8, hc_mult=2,
        layer_types=["sliding_attention", "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        partial_rotary_factor=0.25)
    return on_grid(tf.DeepseekV4ForCausalLM, config, seed=seed)


def test_every_linear_of_the_attention_gets_the_role_of_what_it_computes():
    """Scanned off the model: q_a, q_b, kv, o_a, o_b directly under self_attn; the compressor's and its indexer's
    Linears (pooling weights, scores, the indexer's query) stay other; the shared experts are gate, up, down."""
    model = tiny_v4()
    config = model.config.to_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    attention = [n for n in linears if n.rpartition(".")[0].endswith(".self_attn")]
    assert {n.rpartition(".")[2] for n in attention} == set(V4_ROLES)
    for name in attention:
        info = module_info(name, config)
        assert (info.role, info.layer, info.stack) == (V4_ROLES[name.rpartition(".")[2]], int(name.split(".")[2]),
                                                       None), name
    compressor = [n for n in linears if ".self_attn.compressor." in n]
    assert len(compressor) == 6 and {module_info(n, config).role for n in compressor} == {"other"}
    shared = {n.rpartition(".")[2]: module_info(n, config).role for n in linears if ".shared_experts." in n}
    assert shared == {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def test_kv_proj_is_the_key_and_the_value_the_attention_reads(monkeypatch):
    """The attention function receives one tensor as keys and as values (K = V) in every layer, and it is kv_proj's
    output (normed, rotated): a change to kv_proj changes it, one to q_a_proj does not. So kv_proj is not split into
    k and v rows: the whole is both."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4

    seen = []
    original = v4.eager_attention_forward

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((module.layer_idx, key, value))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(v4, "eager_attention_forward", spy)
    model = tiny_v4()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))

    def keys(m) -> dict[int, torch.Tensor]:
        seen.clear()
        with torch.no_grad():
            m(ids)
        assert [layer for layer, _, _ in seen] == [0, 1] and all(k is v for _, k, v in seen)
        return {layer: k.clone() for layer, k, _ in seen}

    before = keys(model)
    for attr, changes in (("kv_proj", True), ("q_a_proj", False)):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            getattr(moved.model.layers[0].self_attn, attr).weight.add_(0.05)
        assert (not torch.equal(keys(moved)[0], before[0])) == changes, attr


def test_o_a_proj_is_the_block_diagonal_operator_of_its_stored_groups():
    """o_a_proj's weight (groups·r, heads·head_dim/groups) holds group g's map in rows g·r … (g+1)·r − 1: its forward
    on (…, groups, in/groups) is that block-diagonal product (float64 reference), and o_b_proj mixes the groups."""
    model = tiny_v4()
    attn = model.model.layers[0].self_attn
    weight = attn.o_a_proj.weight.detach().double()  # (G·r, H·d/G)
    assert weight.shape == (GROUPS * O_RANK, HEADS * HEAD_DIM // GROUPS)
    x = torch.randn(3, GROUPS, HEADS * HEAD_DIM // GROUPS, generator=torch.Generator().manual_seed(1))
    blocks = torch.block_diag(*weight.split(O_RANK))  # (G·r, H·d)
    expected = (x.double().reshape(3, -1) @ blocks.T).reshape(3, GROUPS, O_RANK)  # (…, G, r)
    with torch.no_grad():
        torch.testing.assert_close(attn.o_a_proj(x).double(), expected, rtol=1e-6, atol=1e-6)
    assert attn.o_b_proj.weight.shape == (32, GROUPS * O_RANK)


def test_roles_select_kv_by_k_or_v_and_the_output_factors_by_o():
    """--roles k or v take kv (in an analysis too: the whole is the key and the value), --roles o takes o_a and o_b;
    each new role is a block role taken by its own name, and by no other role."""
    assert {"kv", "o_a", "o_b"} <= set(BLOCK_ROLES)
    for asked in (("k",), ("v",), ("kv",)):
        assert role_named("kv", asked) and role_selected("kv", asked)
    for role in ("o_a", "o_b"):
        assert role_named(role, ("o",)) and role_selected(role, ("o",)) and role_selected(role, (role,))
        assert not role_selected(role, ("q", "k", "v", "xo", "o_a" if role == "o_b" else "o_b"))
    assert not role_selected("kv", ("q", "o", "kv_a", "kv_b", "xk", "xv"))
    assert not role_selected("k", ("kv",)) and not role_selected("o", ("o_a", "o_b"))  # no converse


def test_the_checkpoints_names_get_the_roles_of_the_modules_they_load_into(tmp_path):
    """save_pretrained writes DeepSeek's names (attn.wq_a, attn.wkv, attn.wo_a, ffn.shared_experts.w1, head …);
    each 2-D weight's role is that of the module transformers loads it into (its own loading rename), the routed
    experts' w1/w3 aside (loaded fused into gate_up_proj: role gate or up of the fused gate_up)."""
    from safetensors import safe_open

    from spectra.checkpoints.targets import loading_rename

    model = tiny_v4()
    config = model.config.to_dict()
    folder = save(model, tmp_path / "v4", "safetensors")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = [k for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2]
    rename = loading_rename(model)
    assert "model.layers.0.attn.wkv.weight" in stored and "head.weight" in stored  # DeepSeek's names, not ours
    checked = 0
    for key in stored:
        loaded = rename(key).removesuffix(".weight")
        if ".experts." in loaded and ".shared_experts." not in loaded:
            continue
        assert module_info(key.removesuffix(".weight"), config).role == module_info(loaded, config).role, key
        checked += 1
    assert checked >= 20


def test_analyze_reports_kv_and_the_output_factors_at_their_planted_ranks(tmp_path):
    """A tiny V4 pair with planted ranks in kv_proj, o_a_proj and o_b_proj: the rows (by the checkpoint's names)
    have roles kv, o_a, o_b at those ranks; --roles k analyses kv alone (not the compressor's), --roles o the two
    output factors."""
    base = tiny_v4()
    tuned = copy.deepcopy(base)
    planted = {"model.layers.0.self_attn.kv_proj": 2, "model.layers.1.self_attn.o_a_proj": 3,
               "model.layers.1.self_attn.o_b_proj": 1, "model.layers.1.self_attn.compressor.kv_proj": 1}
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, rank) in enumerate(planted.items()):
            params[name + ".weight"] += flat_update(tuple(params[name + ".weight"].shape), rank, seed=i).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    rows = {r["name"]: r for r in analyze(b, t, cache_dir=False, progress=False).to_dict()["modules"]
            if r["kind"] == "matrix"}
    expected = {"model.layers.0.attn.wkv": ("kv", 2), "model.layers.1.attn.wo_a": ("o_a", 3),
                "model.layers.1.attn.wo_b": ("o_b", 1), "model.layers.1.attn.compressor.wkv": ("other", 1)}
    for name, (role, rank) in expected.items():
        assert (rows[name]["role"], rows[name]["energy_rank"]["0.9"]) == (role, rank), name
    for asked, names in ((("k",), {"model.layers.0.attn.wkv", "model.layers.1.attn.wkv"}),
                         (("o",), {f"model.layers.{i}.attn.wo_{f}" for i in (0, 1) for f in "ab"})):
        result = analyze(b, t, AnalysisConfig(roles=asked), cache_dir=False, progress=False).to_dict()
        assert {r["name"] for r in result["modules"] if r["kind"] == "matrix"} == names, asked
