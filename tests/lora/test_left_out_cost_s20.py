"""extract's advice for the changed matrices it leaves out says what carrying them costs and gives the exact option.

Before: "To carry them, add their roles (roles=…) or save them whole (modules_to_save=<last names>)": no cost, and
a last name that saves every layer's module of that name (``q_proj``) where a plan adapts some of them, an advice
extract then refused. Now the roles come with the LoRA parameters on those matrices at the rank asked (full, or a
uniform rank), beside the adapter's own; a plan's advice names the recommend options that plan them (the plan's roles
and theirs), the share of the whole update's ‖ΔW‖_F² they hold and their parameters at the ranks the plan's energy
target gives them; saving whole names full names where a last name would save adapted modules too, with its cost.

References: PEFT's own get_peft_model (its trainable parameters at those ranks), the adapter extract wrote (its LoRA
tensors), the transformers model's own modules (what saving them whole copies), a float64 numpy sum of the saved
tensors (the ‖ΔW‖_F² share), and following the advice (PEFT's merge gives the fine-tune back)."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.models import build_model, save

ALL = lambda name, p: True  # noqa: E731 - every parameter, norms too
OUTSIDE = ("lm_head", "embed_tokens")  # the default roles leave the head and the embedding out


def _peft_params(model, rank_of: dict[str, int]) -> int:
    """Trainable parameters of PEFT's LoRA on the modules `rank_of` names, each at its rank."""
    from peft import LoraConfig, get_peft_model

    first = next(iter(rank_of.values()))
    config = LoraConfig(r=first, target_modules=list(rank_of), rank_pattern={k: v for k, v in rank_of.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(copy.deepcopy(model), config)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _adapter_params(path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys() if "lora_" in k)


@pytest.fixture(scope="module")
def llama_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-all")
    base = build_model("llama")
    tuned = perturbed(base, select=ALL)
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_full_rank_advice_gives_the_loras_cost_and_the_saving_cost(llama_all, tmp_path):
    base, _, b, t = llama_all
    result = extract_adapter(b, t, "full", tmp_path / "ad", progress=False)
    note = result.notes[0]
    # PEFT's LoRA on lm_head (64 × 32) and embed_tokens (64 × 32) at full rank (32 each)
    added = _peft_params(base, {"lm_head": 32, "embed_tokens": 32})
    held = _adapter_params(tmp_path / "ad")
    assert (f"add their roles (roles=q,k,v,o,gate,up,down,embed,head; LoRAs on these 2 matrices at full rank "
            f"(min(d_in, d_out) each) add {added:,} parameters to the adapter's {held:,})") in note
    whole = base.lm_head.weight.numel() + base.model.embed_tokens.weight.numel()
    assert f"save them whole (modules_to_save=lm_head,embed_tokens; 2 module(s), {whole:,} parameters with" in note


def test_a_uniform_rank_and_a_plan_give_their_costs(llama_all, tmp_path):
    """The costs at a uniform rank (2) and under a plan, from the notes' function as extract calls it."""
    from spectra.analysis import analyze
    from spectra.checkpoints.pairing import Pairing, PairingOptions
    from spectra.lora.left_out import _not_carried, _not_carried_notes
    from spectra.ranks import RankPolicy, recommend_ranks

    base, _, b, t = llama_all
    pairing = Pairing(b, t, PairingOptions(split_fused=False, vectors=True))
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    selected = [e for e in pairing.entries if e.kind == "matrix" and e.info.role in roles]
    matrices, vectors, only, _ = _not_carried(pairing, selected, [])
    assert [n for n, _ in matrices] == ["lm_head", "model.embed_tokens"]
    (note, _) = _not_carried_notes(pairing, matrices, vectors, only, selected, roles=roles, stacks=None,
                                   planned=False, full=False, rank=2)
    added = _peft_params(base, {"lm_head": 2, "embed_tokens": 2})
    held = _peft_params(base, {n: 2 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj")})
    assert f"LoRAs on these 2 matrices at rank 2 add {added:,} parameters to the adapter's {held:,})" in note

    analysis = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.5, noise=False, roles=("q", "v")))
    planned = [e for e in pairing.entries if e.name in {m.name for m in plan.modules}]
    matrices, vectors, only, _ = _not_carried(pairing, planned, [])
    (note, _) = _not_carried_notes(pairing, matrices, vectors, only, planned, roles=roles, stacks=None,
                                   planned=True, full=False, plan=plan)
    assert "plan them (spectra recommend --roles q,k,v,o,gate,up,down,embed,head, the plan's other options" in note
    # the share of the whole update's ‖ΔW‖_F² they hold, in float64 from the saved tensors
    with safe_open(str(b / "model.safetensors"), "np") as fb, safe_open(str(t / "model.safetensors"), "np") as ft:
        delta2 = {k: float(np.sum((ft.get_tensor(k).astype(np.float64) - fb.get_tensor(k).astype(np.float64)) ** 2))
                  for k in fb.keys() if fb.get_slice(k).get_shape().__len__() == 2}
    left = [n for n, _ in matrices]
    share = sum(delta2[f"{n}.weight"] for n in left) / sum(delta2.values())
    assert f"they hold {share:.1%} of the whole update's ‖ΔW‖_F²" in note
    ranks = {m.name: m.rank for m in plan.left_out if m.name in left}
    assert len(ranks) == 12
    at_ranks = _peft_params(base, ranks)
    assert re.search(rf"at the ranks the plan's energy target gives them {at_ranks:,} parameters, beside the plan's "
                     rf"{plan.total_params:,}", note), note

    # a plan of layer 0 (include): layer 1's projections are of its roles, left out by its pattern, not its roles
    plan = recommend_ranks(analysis, RankPolicy(rank=2, noise=False, include=r"re:layers\.0\."))
    planned = [e for e in pairing.entries if e.name in {m.name for m in plan.modules}]
    matrices, vectors, only, _ = _not_carried(pairing, planned, [])
    (note, _) = _not_carried_notes(pairing, matrices, vectors, only, planned, roles=roles, stacks=None,
                                   planned=True, full=False, plan=plan)
    reason = {m.name: m.reason for m in plan.left_out}["model.layers.1.mlp.down_proj"]
    assert ("plan them (spectra recommend --roles q,k,v,o,gate,up,down,embed,head, the plan's other options as they "
            "were, for the 2 of roles it was not made for; the plan left the other 7 out for its own reasons, e.g. "
            f"model.layers.1.mlp.down_proj: {reason};") in note


def test_saving_whole_names_full_names_where_a_last_name_would_save_adapted_modules(llama_all, tmp_path):
    """A plan of layer 0 leaves layer 1's changed projections out: saving them by their last names (q_proj…) would
    save layer 0's adapted ones too, which extract refuses. The advice names them in full, and following it gives
    layer 1 back under PEFT's merge."""
    from peft import PeftModel

    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks

    base, tuned, b, t = llama_all
    analysis = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(rank=2, noise=False, include=r"re:layers\.0\."))
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    (advice,) = re.findall(r"modules_to_save=([^\s);]+)", result.notes[0])
    advised = tuple(advice.split(","))
    assert "model.layers.1.self_attn.q_proj" in advised and "q_proj" not in advised
    assert "lm_head" in advised  # a last name where it saves that module alone
    whole = sum(p.numel() for n, p in base.named_parameters()
                if any(n == f"{m}.weight" or n.endswith(f".{m}.weight") for m in advised))
    assert f"{len(advised)} module(s), {whole:,} parameters with their weights" in result.notes[0]
    followed = extract_adapter(b, t, plan, tmp_path / "followed", modules_to_save=advised, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(tmp_path / "followed")).merge_and_unload()
    state, want = merged.state_dict(), tuned.state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(state[name], want[name].double(), atol=1e-6)
    assert not torch.allclose(base.state_dict()[name].double(), want[name].double(), atol=1e-6)  # it changed
    assert not any("changed matri" in n for n in followed.notes)  # nothing of them left out


def test_saving_whole_says_it_carries_only_the_modules_among_expert_slices(tmp_path):
    """A Mixtral fine-tune of its routers and fused experts, extracted with roles=q: 'save them whole' had read as
    carrying all 14 matrices left out, yet carries the 2 routers alone (the 12 experts' slices have no module).
    Followed, it leaves exactly those 12 out; the roles option carries all of them."""
    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if any(k in name for k in ("mlp.gate.", "experts.gate_up", "q_proj")):
                p += 0.01 * torch.randn(p.shape, generator=g)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(b, t, 2, tmp_path / "a", roles=("q",), progress=False)
    note = next(n for n in result.notes if "outside the roles" in n)
    left = len(result.left_out)
    routers = [n for n in result.left_out if n.endswith(".gate")]
    assert routers and len(routers) < left
    assert f"save the {len(routers)} of them held in modules whole (modules_to_save=gate;" in note
    assert f"the other {left - len(routers)} being experts' slices of a fused tensor" in note
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = extract_adapter(b, t, 2, tmp_path / "s", roles=("q",), modules_to_save=("gate",), progress=False)
    assert len(saved.left_out) == left - len(routers) and not any(n.endswith(".gate") for n in saved.left_out)
