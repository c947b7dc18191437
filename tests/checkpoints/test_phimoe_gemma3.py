"""PhiMoE and Gemma 3 end to end: pairing, a PEFT adapter as the tuned side, extraction.

As in test_pairing.py, test_adapter_pairing.py and tests/lora/test_extract.py, on tiny real
transformers models built from config (tests.models' ``phimoe``, ``gemma3`` and
``gemma3_multimodal``): planted updates come back bit for bit, an adapter's ΔW is PEFT's own
merge minus the base, and an extracted adapter loads in PEFT and merges to the base plus the
best rank-r ΔW of every module.

PhiMoE stores Mixtral's layout (``block_sparse_moe.experts.N.w1/w2/w3``, router
``block_sparse_moe.gate``), which transformers 5 loads into ``mlp.experts.gate_up_proj``
(E, [w1; w3], hidden), ``mlp.experts.down_proj`` and ``mlp.router``; unlike Mixtral it has
LayerNorms with biases and biased attention and head. Gemma 3 has q/k norms, four norms per
block, a tied head and a scaled embedding; its multimodal checkpoints store the text model as
``language_model.model.…`` (the model's ``model.language_model.…``).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions, iter_deltas
from spectra.lora.extract import extract_adapter
from tests.checkpoints.test_adapter_pairing import (check_against_merge, check_renamed_against_merge,
                                                     make_adapter, parameter_deltas)
from tests.checkpoints.test_pairing import assert_exact
from tests.models import add_to_parameter, build_model, low_rank, random_adapter, save

MATRICES = PairingOptions(dtype="float64", vectors=False)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# PEFT 0.21 checks rank_pattern keys against modules only and calls those of target_parameters ignored; it applies them
PATTERN_WARNING = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")


def moved(model, names, *, seed: int, scale: float = 0.02):
    """A copy of `model` whose parameters named with any of `names` moved by full-rank noise, 3-D experts too
    (tests/lora/test_extract.py's `perturbed` moves 2-D weights only)."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() >= 2 and any(n in name for n in names):
                p += scale * torch.randn(p.shape, generator=g)
    return tuned


def best_rank(delta: torch.Tensor, r: int) -> np.ndarray:
    """The best rank-r approximation of an (out, in) ΔW (Eckart–Young), float64."""
    u, s, vt = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def peft_merge(model, adapter_dir):
    """(PEFT's merged state dict of `model` + the adapter, the unmerged PeftModel); fails on keys PEFT could not place."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    state = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    return state, peft_model


def assert_runs_as_merged(peft_model, state):
    """The unmerged PeftModel's logits are those of a PhiMoE holding PEFT's merged `state` (its forward runs)."""
    merged_model = build_model("phimoe")
    merged_model.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged_model(ids).logits, rtol=1e-4, atol=1e-5)


# -- PhiMoE ----------------------------------------------------------------------------------------------------------


def test_phimoe_pairing_is_the_planted_update(tmp_path):
    base = build_model("phimoe")
    tuned = copy.deepcopy(base)
    dq = low_rank(32, 32, 2, seed=1)  # 4 heads × 8
    dk = low_rank(16, 32, 1, seed=2)  # GQA: 2 KV heads × 8 rows
    dgate = low_rank(48, 32, 2, seed=3)  # layer 1, expert 2: w1 = rows [0, 48) of gate_up_proj[2]
    dup = low_rank(48, 32, 1, seed=4)  # layer 0, expert 0: w3 = rows [48, 96) of gate_up_proj[0]
    ddown = low_rank(32, 48, 3, seed=5)  # layer 0, expert 1: w2 = down_proj[1], (hidden, ffn)
    drouter = low_rank(3, 32, 1, seed=6)  # layer 1: mlp.router, stored as block_sparse_moe.gate
    dhead = low_rank(64, 32, 1, seed=7)  # untied head
    add_to_parameter(tuned, "model.layers.0.self_attn.q_proj.weight", dq)
    add_to_parameter(tuned, "model.layers.1.self_attn.k_proj.weight", dk)
    add_to_parameter(tuned, "model.layers.1.mlp.experts.gate_up_proj", dgate, expert=2, rows=slice(0, 48))
    add_to_parameter(tuned, "model.layers.0.mlp.experts.gate_up_proj", dup, expert=0, rows=slice(48, 96))
    add_to_parameter(tuned, "model.layers.0.mlp.experts.down_proj", ddown, expert=1)
    add_to_parameter(tuned, "model.layers.1.mlp.router.weight", drouter)
    add_to_parameter(tuned, "lm_head.weight", dhead)
    with torch.no_grad():  # LayerNorm and attention biases
        tuned.model.layers[0].post_attention_layernorm.bias += 2.0**-8
        tuned.model.layers[1].self_attn.v_proj.bias += 2.0**-8
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    moe = "model.layers.{}.block_sparse_moe"
    planted = {  # name → (ΔW, role, layer, expert)
        "model.layers.0.self_attn.q_proj": (dq, "q", 0, None),
        "model.layers.1.self_attn.k_proj": (dk, "k", 1, None),
        f"{moe.format(1)}.experts.2.w1": (dgate, "gate", 1, 2),
        f"{moe.format(0)}.experts.0.w3": (dup, "up", 0, 0),
        f"{moe.format(0)}.experts.1.w2": (ddown, "down", 0, 1),
        f"{moe.format(1)}.gate": (drouter, "other", 1, None),
        "lm_head": (dhead, "head", None, None)}
    seen = assert_exact(Pairing(b, t, MATRICES), {name: d for name, (d, *_) in planted.items()})
    for name, (delta, role, layer, expert) in planted.items():
        d = seen[name]
        assert (d.role, d.layer, d.expert, d.shape) == (role, layer, expert, tuple(delta.shape)), name
    assert sum(d.expert is not None for d in seen.values()) == 2 * 3 * 3  # layers × experts × (w1, w3, w2)
    assert seen["model.layers.0.self_attn.v_proj"].shape == (16, 32)
    vectors = {d.name: d for d in iter_deltas(b, t, dtype="float64") if d.kind == "vector"}
    assert {n for n, d in vectors.items() if d.delta.any()} == {"model.layers.0.post_attention_layernorm.bias",
                                                                 "model.layers.1.self_attn.v_proj.bias"}
    assert vectors["model.layers.1.self_attn.v_proj.bias"].role == "v"
    assert torch.all(vectors["model.layers.0.post_attention_layernorm.bias"].delta == 2.0**-8)
    assert {"model.norm.bias", "lm_head.bias", "model.layers.1.input_layernorm.bias"} <= set(vectors)


def test_phimoe_adapter_on_attention_experts_and_router_equals_peft_merge(tmp_path):
    """LoRA on the attention modules and, through target_parameters, on the fused experts and the router: each
    expert's ΔW comes out under the checkpoint's w1/w3/w2 name, equal to PEFT's own update and to its merge."""
    base = build_model("phimoe")
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                target_parameters=[*EXPERTS, "mlp.router.weight"])
    reference = parameter_deltas(peft_model)  # the model's names: (E, 2·48, 32), (E, 32, 48), (3, 32)
    merged_dir = save(peft_model.merge_and_unload(), tmp_path / "merged", "safetensors")
    options = PairingOptions(vectors=False)
    yielded = {d.name: d for d in Pairing(base_dir, tmp_path / "ad", options)}
    merged = {d.name: d.delta for d in Pairing(base_dir, merged_dir, options) if d.delta.any()}
    assert set(yielded) == set(merged) and len(merged) == 2 * (4 + 1 + 3 * 3)
    for name, delta in merged.items():
        torch.testing.assert_close(yielded[name].delta, delta, rtol=1e-5, atol=1e-6, msg=name)
    for layer in (0, 1):
        moe, fused = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        for e in range(3):
            gate_up, down = reference[f"{fused}.experts.gate_up_proj"][e], reference[f"{fused}.experts.down_proj"][e]
            for proj, role, expected in (("w1", "gate", gate_up[:48]), ("w3", "up", gate_up[48:]), ("w2", "down", down)):
                d = yielded[f"{moe}.experts.{e}.{proj}"]
                assert (d.role, d.layer, d.expert, d.shape) == (role, layer, e, tuple(expected.shape))
                torch.testing.assert_close(d.delta, expected, rtol=1e-5, atol=1e-6)
        router = yielded[f"{moe}.gate"]
        assert router.role == "other" and router.shape == (3, 32)
        torch.testing.assert_close(router.delta, reference[f"{fused}.router.weight"], rtol=1e-5, atol=1e-6)


def test_phimoe_adapter_on_the_router_as_a_module_equals_peft_merge(tmp_path):
    """A LoRA on mlp.router as a module (PEFT's target_modules wraps it, an nn.Linear subclass; it merges though its
    forward fails): the checkpoint stores the router as block_sparse_moe.gate, and matched by dot-suffix only the
    adapter was refused ('absent from the base')."""
    base = build_model("phimoe")
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=["router", "q_proj"])
    yielded = check_renamed_against_merge(base, base_dir, tmp_path / "ad", peft_model, tmp_path)
    assert set(yielded) == {f"model.layers.{i}.{m}" for i in (0, 1)
                            for m in ("block_sparse_moe.gate", "self_attn.q_proj")}
    assert yielded["model.layers.1.block_sparse_moe.gate"].shape == (3, 32)


@PATTERN_WARNING
def test_phimoe_extracted_experts_load_and_merge_to_the_truncation(tmp_path):
    """PEFT converts per-expert keys (…experts.3.w1) onto the fused parameters for Mixtral only: on PhiMoE it dropped
    them without a word, and the merged experts stayed the base's. The experts are written onto gate_up_proj (w1 and
    w3 block-diagonal, rank 2r) and down_proj as target_parameters: each expert slice merges to its best rank-r ΔW."""
    base = build_model("phimoe")
    tuned = moved(base, ("self_attn.q_proj", "self_attn.k_proj", "mlp.experts"), seed=1)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 3, tmp_path / "ad", roles=("q", "k", "gate", "up", "down"), progress=False)
    state, peft_model = peft_merge(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    read_back = {d.name: d.delta for d in Pairing(b, tmp_path / "ad", PairingOptions(vectors=False))}
    errors = {m.name: m for m in result.modules}
    for layer in (0, 1):
        moe, fused = f"model.layers.{layer}.block_sparse_moe.experts", f"model.layers.{layer}.mlp.experts"
        for e in range(3):
            for proj, key, rows in (("w1", "gate_up_proj", slice(0, 48)), ("w3", "gate_up_proj", slice(48, 96)),
                                    ("w2", "down_proj", slice(None))):
                w0 = W0[f"{fused}.{key}"][e][rows]
                best = best_rank(W1[f"{fused}.{key}"][e][rows] - w0, 3)
                np.testing.assert_allclose((state[f"{fused}.{key}"][e][rows] - w0).double().numpy(), best, atol=2e-6)
                np.testing.assert_allclose(read_back[f"{moe}.{e}.{proj}"].double().numpy(), best, atol=2e-6)
                assert errors[f"{moe}.{e}.{proj}"].error == pytest.approx(errors[f"{moe}.{e}.{proj}"].tail, rel=1e-4)
        for proj in ("q_proj", "k_proj"):
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            np.testing.assert_allclose((state[key] - W0[key]).double().numpy(), best_rank(W1[key] - W0[key], 3),
                                       atol=2e-6)
    assert not torch.equal(state["model.layers.1.mlp.experts.down_proj"], W0["model.layers.1.mlp.experts.down_proj"])
    assert torch.equal(state["model.layers.1.mlp.router.weight"], W0["model.layers.1.mlp.router.weight"])  # not asked
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                           for p in ("down_proj", "gate_up_proj")]
    assert set(config["rank_pattern"].values()) == {6} and (config["r"], config["lora_alpha"]) == (3, 6.0)
    assert_runs_as_merged(peft_model, state)


@PATTERN_WARNING
def test_phimoe_extracted_experts_are_the_plans_peft_config(tmp_path):
    """An rsLoRA plan over the experts: the adapter's expert parameters, ranks and alphas are the plan's own
    peft_config (gate_up_proj at r_w1 + r_w3, α keeping s = α/√r), and its merge the truncation at the plan's rank."""
    from spectra.analysis import analyze
    from spectra.checkpoints.targets import meta_model
    from spectra.ranks import RankPolicy, recommend_ranks

    base = build_model("phimoe")
    tuned = moved(base, ("self_attn.v_proj", "mlp.experts"), seed=4)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("v", "gate", "up", "down"), uniform=True, noise=False, rslora=True,
                                      energy=0.5))
    (rank,) = {m.rank for m in plan.modules}
    assert rank < 32  # a truncation
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    planned = plan.to_peft_config(model=meta_model(json.loads((b / "config.json").read_text())))
    for key in ("target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha", "use_rslora"):
        assert result.config[key] == planned[key], key
    state, _ = peft_merge(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    for layer in (0, 1):
        for key, rows in (("gate_up_proj", slice(0, 48)), ("gate_up_proj", slice(48, 96)), ("down_proj", slice(None))):
            name = f"model.layers.{layer}.mlp.experts.{key}"
            for e in range(3):
                w0 = W0[name][e][rows]
                np.testing.assert_allclose((state[name][e][rows] - w0).double().numpy(),
                                           best_rank(W1[name][e][rows] - w0, rank), atol=2e-6)


@PATTERN_WARNING
def test_phimoe_extracted_router_is_a_parameter_that_trains(tmp_path):
    """PhiMoE's router (block_sparse_moe.gate, the model's mlp.router) is an nn.Linear whose forward returns a tuple:
    extract wrote a LoRA module on it, which PEFT wraps and merges, and then every forward failed ('tuple' object
    has no attribute 'dtype'). It is written onto mlp.router.weight as target_parameters, as the plan's own
    peft_config says: it loads, merges to the planned ΔW and trains (a forward and a backward pass)."""
    from peft import PeftModel

    from spectra.analysis import analyze
    from spectra.checkpoints.targets import meta_model
    from spectra.ranks import RankPolicy, recommend_ranks

    base = build_model("phimoe")
    tuned = moved(base, ("self_attn.q_proj", "mlp.router"), seed=5)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("q", "other"), noise=False, energy=0.5))
    ranks = {m.name: m.rank for m in plan.modules}
    routers = [f"model.layers.{i}.block_sparse_moe.gate" for i in (0, 1)]
    assert set(routers) <= set(ranks) and all(ranks[r] < 3 for r in routers)  # truncations of 3×32 updates
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"), is_trainable=True).train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # PhiMoE's router samples in training: the same draw whatever ran before
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "mlp.router.lora_" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    planned = plan.to_peft_config(model=meta_model(json.loads((b / "config.json").read_text())))
    for key in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert result.config[key] == planned[key], key
    assert result.config["target_parameters"] == [f"model.layers.{i}.mlp.router.weight" for i in (0, 1)]
    state, _ = peft_merge(base, tmp_path / "ad")
    read_back = {d.name: d.delta for d in Pairing(b, tmp_path / "ad", PairingOptions(vectors=False))}
    W0, W1 = base.state_dict(), tuned.state_dict()
    for layer in (0, 1):
        at = f"model.layers.{layer}"
        for stored, module in ((f"{at}.block_sparse_moe.gate", f"{at}.mlp.router"),
                               (f"{at}.self_attn.q_proj", f"{at}.self_attn.q_proj")):
            key = f"{module}.weight"
            best = best_rank(W1[key] - W0[key], ranks[stored])
            np.testing.assert_allclose((state[key] - W0[key]).double().numpy(), best, atol=2e-6)
            np.testing.assert_allclose(read_back[stored].double().numpy(), best, atol=2e-6)


def test_phimoe_router_saved_whole_is_the_tuned_router(tmp_path):
    """modules_to_save naming PhiMoE's router (block_sparse_moe.gate): it is saved as the model's mlp.router, the
    module PEFT copies and runs with its own forward (that it returns a tuple, which rules out a LoRA module on it,
    does not matter there). It was kept under the stored name, which PEFT matches to no module: the adapter loaded
    without a word and the merged router stayed the base's."""
    base = build_model("phimoe")
    tuned = moved(base, ("self_attn.q_proj", "mlp.router"), seed=7)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",),
                             modules_to_save=("model.layers.0.block_sparse_moe.gate",), progress=False)
    assert result.config["modules_to_save"] == ["model.layers.0.mlp.router"]
    state, peft_model = peft_merge(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    assert torch.equal(state["model.layers.0.mlp.router.weight"], W1["model.layers.0.mlp.router.weight"])
    assert torch.equal(state["model.layers.1.mlp.router.weight"], W0["model.layers.1.mlp.router.weight"])  # not asked
    for layer in (0, 1):
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        np.testing.assert_allclose((state[key] - W0[key]).double().numpy(), best_rank(W1[key] - W0[key], 2), atol=2e-6)
    assert_runs_as_merged(peft_model, state)


@PATTERN_WARNING
def test_phimoe_extracted_router_and_experts_together(tmp_path):
    """The router (on mlp.router.weight) and the experts (on the fused gate_up_proj at r_w1 + r_w3, and down_proj) of
    one MLP extracted together: three target parameters per layer, two of them on one module (PEFT nests their
    wrappers). PEFT loads every key, puts every factor in the backward pass, runs unmerged as merged, and the merge
    is the best rank-r ΔW of the router and of every expert slice."""
    from peft import PeftModel

    base = build_model("phimoe")
    tuned = moved(base, ("mlp.router", "mlp.experts"), seed=8)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("gate", "up", "down", "other"), progress=False)
    assert result.config["target_parameters"] == [f"model.layers.{i}.mlp.{p}" for i in (0, 1)
                                                  for p in ("experts.down_proj", "experts.gate_up_proj",
                                                            "router.weight")]
    assert not result.config["target_modules"]
    state, peft_model = peft_merge(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    for layer in (0, 1):
        router, fused = f"model.layers.{layer}.mlp.router.weight", f"model.layers.{layer}.mlp.experts"
        np.testing.assert_allclose((state[router] - W0[router]).double().numpy(),
                                   best_rank(W1[router] - W0[router], 2), atol=2e-6)
        for key, rows in (("gate_up_proj", slice(0, 48)), ("gate_up_proj", slice(48, 96)), ("down_proj", slice(None))):
            for e in range(3):
                w0 = W0[f"{fused}.{key}"][e][rows]
                np.testing.assert_allclose((state[f"{fused}.{key}"][e][rows] - w0).double().numpy(),
                                           best_rank(W1[f"{fused}.{key}"][e][rows] - w0, 2), atol=2e-6)
    assert_runs_as_merged(peft_model, state)
    trainable = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"), is_trainable=True).train()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # SparseMixer samples its picks in training
    trainable(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in trainable.named_parameters() if "lora_" in n}
    # every factor is in the graph; the router's gradient is zero where its mask leaves one expert per token (the
    # tiny model's logits are far apart: SparseMixer's masked softmax is then 1), as the plain model's router's is
    assert len(grads) == 12 and all(g is not None for g in grads.values()), grads.keys()
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n)


# -- Gemma 3 ---------------------------------------------------------------------------------------------------------


def test_gemma3_pairing_is_the_planted_update(tmp_path):
    base = build_model("gemma3")
    tuned = copy.deepcopy(base)
    dq = low_rank(32, 32, 2, seed=11)  # layer 0: sliding-window attention
    dv = low_rank(16, 32, 1, seed=12)  # layer 1: full attention; GQA, 2 KV heads × head_dim 8
    dgate = low_rank(48, 32, 3, seed=13)
    ddown = low_rank(32, 48, 2, seed=14)
    dembed = low_rank(64, 32, 1, seed=15)  # the head is tied to it: one tensor, one ΔW
    add_to_parameter(tuned, "model.layers.0.self_attn.q_proj.weight", dq)
    add_to_parameter(tuned, "model.layers.1.self_attn.v_proj.weight", dv)
    add_to_parameter(tuned, "model.layers.1.mlp.gate_proj.weight", dgate)
    add_to_parameter(tuned, "model.layers.0.mlp.down_proj.weight", ddown)
    add_to_parameter(tuned, "model.embed_tokens.weight", dembed)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.k_norm.weight += 2.0**-8
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    planted = {"model.layers.0.self_attn.q_proj": (dq, "q", 0), "model.layers.1.self_attn.v_proj": (dv, "v", 1),
               "model.layers.1.mlp.gate_proj": (dgate, "gate", 1), "model.layers.0.mlp.down_proj": (ddown, "down", 0),
               "model.embed_tokens": (dembed, "embed", None)}
    seen = assert_exact(Pairing(b, t, MATRICES), {name: d for name, (d, *_) in planted.items()})
    for name, (delta, role, layer) in planted.items():
        assert (seen[name].role, seen[name].layer, seen[name].shape) == (role, layer, tuple(delta.shape)), name
    assert not any(d.role == "head" for d in seen.values()) and len(seen) == 2 * 7 + 1
    vectors = {d.name: d for d in iter_deltas(b, t, dtype="float64") if d.kind == "vector"}
    assert {n for n, d in vectors.items() if d.delta.any()} == {"model.layers.0.self_attn.k_norm.weight"}
    assert vectors["model.layers.0.self_attn.k_norm.weight"].shape == (8,)  # per head_dim, shared by the heads
    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    assert {f"model.layers.1.{n}.weight" for n in norms} <= set(vectors)


def test_gemma3_all_linear_adapter_equals_peft_merge(tmp_path):
    base = build_model("gemma3")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules="all-linear")
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged)
    assert len(yielded) == 2 * 7 and {d.role for d in yielded.values()} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert yielded["model.layers.1.self_attn.k_proj"].shape == (16, 32)
    assert all(torch.linalg.matrix_rank(d.delta.double(), rtol=1e-4) == 4 for d in yielded.values())


def test_gemma3_extracted_adapter_merges_to_the_truncation_and_full_rank_to_the_fine_tune(tmp_path):
    base = build_model("gemma3")
    tuned = moved(base, ("self_attn", "mlp"), seed=2)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    extract_adapter(b, t, "full", tmp_path / "full", progress=False)
    state, peft_model = peft_merge(base, tmp_path / "full")
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=2e-6, msg=name)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # past the sliding window of 8
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
        assert float((base(ids).logits - tuned(ids).logits).abs().max()) > 1e-3  # negative control
    result = extract_adapter(b, t, 3, tmp_path / "r3", progress=False)
    assert len(result.modules) == 2 * 7
    state, _ = peft_merge(base, tmp_path / "r3")
    W0, W1 = base.state_dict(), tuned.state_dict()
    for m in result.modules:
        key = m.name + ".weight"
        np.testing.assert_allclose((state[key] - W0[key]).double().numpy(), best_rank(W1[key] - W0[key], 3), atol=2e-6)
        assert m.error == pytest.approx(m.tail, rel=1e-4)


# -- Gemma 3 multimodal (Gemma3ForConditionalGeneration) --------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_multimodal_pair(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration and a fine-tune of its text model's q_proj and of the projector."""
    root = tmp_path_factory.mktemp("gemma3-multimodal")
    base = build_model("gemma3_multimodal")
    tuned = copy.deepcopy(base)
    dq = low_rank(32, 32, 2, seed=21)
    dproj = low_rank(32, 16, 1, seed=22)  # (out = text hidden, in = vision hidden)
    add_to_parameter(tuned, "model.language_model.layers.1.self_attn.q_proj.weight", dq)
    add_to_parameter(tuned, "model.multi_modal_projector.mm_input_projection_weight", dproj.T)  # x @ W: (in, out)
    return base, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors"), dq, dproj


def test_gemma3_multimodal_pairing_names_and_projector_orientation(gemma3_multimodal_pair):
    """transformers 5 saves Gemma3ForConditionalGeneration under the checkpoint names of the hub
    (``language_model.model.layers.N…``); the projector is a matrix the model multiplies from the right, stored
    (vision, text) = (in, out): its ΔW comes out (out, in) like every other (it came out as stored)."""
    _, b, t, dq, dproj = gemma3_multimodal_pair
    q, projector = "language_model.model.layers.1.self_attn.q_proj", "multi_modal_projector.mm_input_projection_weight"
    seen = assert_exact(Pairing(b, t, MATRICES), {q: dq, projector: dproj})
    assert (seen[q].role, seen[q].layer) == ("q", 1)
    assert seen[projector].shape == (32, 16) and seen[projector].conv1d
    assert seen["vision_tower.encoder.layers.0.mlp.fc1"].role == "up"  # the vision tower is paired too


def test_gemma3_multimodal_extracted_adapter_uses_the_models_names(gemma3_multimodal_pair, tmp_path):
    base, b, t, dq, _ = gemma3_multimodal_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), progress=False)
    assert result.model_class == "Gemma3ForConditionalGeneration"
    assert "model.language_model.layers.1.self_attn.q_proj" in {m.name for m in result.modules}
    state, _ = peft_merge(base, tmp_path / "ad")
    key = "model.language_model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(state[key].double() - base.state_dict()[key].double(), dq, rtol=0, atol=1e-6)


def test_gemma3_multimodal_adapter_equals_peft_merge(gemma3_multimodal_pair, tmp_path):
    base, b, _, _, _ = gemma3_multimodal_pair
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    yielded = check_renamed_against_merge(base, b, tmp_path / "ad", peft_model, tmp_path)
    assert {"language_model.model.layers.1.self_attn.q_proj", "vision_tower.encoder.layers.0.self_attn.v_proj"} <= \
        set(yielded)  # the text model's (model.language_model.… in the adapter) and the vision tower's
