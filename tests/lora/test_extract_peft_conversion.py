"""Extraction onto MoE models whose adapter config PEFT rewrites when it loads it.

PEFT 0.21 runs ``convert_peft_config_for_transformers`` in ``PeftModel.from_pretrained``: for a model of the
``qwen2_moe`` or ``mixtral`` conversion family it turns every ``target_modules`` entry ending in ``.gate_proj``,
``.up_proj`` or ``.down_proj`` into a fused expert parameter, so a dense layer's MLP and a shared expert lost their
LoRA (merged: 0), and it fuses gate and up experts at 2r and 2α, which made rsLoRA √2 too large. PEFT's own load
and merge is the referee; the reference update of every projection (each expert's gate, up and down apart) is its
best rank-r approximation by a float64 numpy SVD.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.models import moved, peft_wrapped, save, tiny_moe as _tiny

RANK, PLANTED = 2, 3
_MLP = re.compile(r"\.(mlp|shared_experts?)\.(gate_proj|up_proj|down_proj)\.weight$")


def _matrices(model) -> dict[tuple[str, int | None, int], torch.Tensor]:
    """(parameter, expert, half) → the (out, in) matrix LoRA adapts: a dense or shared MLP projection whole, each
    expert's gate and up (halves 0 and 1 of gate_up_proj) and down apart. Views: planting in them moves the model."""
    out = {}
    for name, p in model.named_parameters():
        if _MLP.search(name):
            out[(name, None, 0)] = p.data
        elif p.dim() == 3 and name.endswith("gate_up_proj"):
            half = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[(name, e, 0)], out[(name, e, 1)] = p.data[e, :half], p.data[e, half:]
        elif p.dim() == 3 and name.endswith("down_proj"):
            for e in range(p.shape[0]):
                out[(name, e, 0)] = p.data[e]
    return out


def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _merged(base, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on the rank_pattern keys of the experts it converts
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    return peft_model


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_every_projection_merges_to_its_best_rank_r_update(family, rslora, tmp_path):
    base = _tiny(family)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for matrix in _matrices(tuned).values():  # a rank-3 update of every projection, truncated to rank 2
            matrix += 0.05 * torch.randn(matrix.shape[0], PLANTED, generator=g) @ torch.randn(PLANTED, matrix.shape[1],
                                                                                          generator=g)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")

    roles = ("gate", "up", "down")
    result = extract_adapter(b, t, RANK, tmp_path / "ad", roles=roles, rslora=rslora, progress=False)

    peft_model = _merged(base, tmp_path / "ad")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
        reference = copy.deepcopy(base)
        got, want, ref = _matrices(merged), _matrices(tuned), _matrices(reference)
        for key, matrix in _matrices(base).items():
            delta = (want[key] - matrix).double().numpy()
            best = _best(delta, RANK)
            error = np.linalg.norm((got[key] - matrix).double().numpy() - best) / np.linalg.norm(best)
            assert error < 1e-4, (key, error)
            assert np.linalg.norm(delta - best) > 0.05 * np.linalg.norm(delta)  # rank 2 < 3: truncated
            ref[key] += torch.from_numpy(best).float()
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unmerged, reference(ids).logits, rtol=1e-4, atol=1e-5)  # PEFT's forward, unmerged
        assert float((reference(ids).logits - base(ids).logits).abs().max()) > 1e-3  # negative control: it moved
    dense = sorted(n for n, _ in base.named_parameters() if _MLP.search(n))
    assert (family == "mixtral") == (not dense)
    assert set(dense) <= set(result.config.get("target_parameters") or [])  # named by weight: PEFT keeps them
    experts_by_peft = any(".experts.0." in n for n in result.config["target_modules"])
    assert experts_by_peft == (not rslora)  # rsLoRA: written onto the fused parameters, at extract's own α


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_dense_mlps_named_as_modules_are_lost_to_peft(family, tmp_path):
    """Negative control: the same adapter with the dense/shared MLPs named as modules (what extract wrote before;
    the tensors' keys are the same) loads silently, and PEFT merges nothing into them."""
    base = _tiny(family)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if _MLP.search(name):
                p += 0.05 * torch.randn(p.shape[0], 1) @ torch.randn(1, p.shape[1])
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 1, tmp_path / "ad", roles=("gate", "up", "down"), progress=False)
    dense = sorted(n for n, _ in base.named_parameters() if _MLP.search(n))
    fine = _merged(base, tmp_path / "ad").merge_and_unload()
    config = dict(result.config)
    config["target_modules"] = sorted(config["target_modules"] + [n.removesuffix(".weight") for n in dense])
    config["target_parameters"] = sorted(set(config["target_parameters"]) - set(dense)) or None
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    lost = _merged(base, tmp_path / "ad").merge_and_unload()
    for name in dense:
        moved = dict(tuned.named_parameters())[name] - dict(base.named_parameters())[name]
        torch.testing.assert_close(dict(fine.named_parameters())[name] - dict(base.named_parameters())[name], moved,
                                   rtol=1e-4, atol=1e-5)
        assert torch.equal(dict(lost.named_parameters())[name], dict(base.named_parameters())[name])


def test_a_vision_stack_of_glm4v_moe_is_adapted_and_nothing_else(tmp_path):
    """GLM-4.5V's vision tower MLP is gate_proj/up_proj/down_proj: as target_modules PEFT turned it into the language
    model's fused experts. Extracted with stacks=("vision",), PEFT wraps the tower's projections alone and merges
    the fine-tune's (rank-1) update into them; the language model's dense, shared and routed MLPs, moved too, stay."""
    base = _tiny("glm4v_moe")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "experts.gate_up_proj")):
                p += 0.05 * torch.randn(*p.shape[:-1], 1, generator=g) @ torch.randn(1, p.shape[-1], generator=g)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")

    extract_adapter(b, t, 1, tmp_path / "ad", roles=("gate", "up", "down"), stacks=("vision",), progress=False)

    peft_model = _merged(base, tmp_path / "ad")
    tower = {f"model.visual.blocks.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(peft_wrapped(peft_model)) == {f"{m}.weight" for m in tower}  # by their weights (target_parameters)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, p in base.named_parameters():
        if name.removesuffix(".weight") in tower:  # rank-1 update, rank-1 LoRA: exact
            torch.testing.assert_close(merged[name], dict(tuned.named_parameters())[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(merged[name], p)
        else:
            assert torch.equal(merged[name], p), name


def test_gate_experts_alone_go_onto_their_rows_of_gate_up_proj(tmp_path):
    """--roles gate on Qwen3-MoE: PEFT refuses per-expert gate_proj without up_proj ("Cannot convert … without also
    targeting up_proj"), which is how extract wrote them. Written onto the gate rows of gate_up_proj instead: at
    full rank PEFT's merge gives each expert's tuned gate rows, and the up rows stay the base's."""
    base = _tiny("qwen3_moe")
    tuned = moved(base, seed=3)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("gate",), progress=False)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert sorted(result.config["target_parameters"]) == ["model.layers.0.mlp.gate_proj.weight", fused]
    merged = dict(_merged(base, tmp_path / "ad").merge_and_unload().named_parameters())
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    half = before[fused].shape[1] // 2
    with torch.no_grad():
        torch.testing.assert_close(merged[fused][:, :half], after[fused][:, :half], rtol=1e-5, atol=1e-6)
        assert torch.equal(merged[fused][:, half:], before[fused][:, half:])
        dense = "model.layers.0.mlp.gate_proj.weight"
        torch.testing.assert_close(merged[dense], after[dense], rtol=1e-5, atol=1e-6)
