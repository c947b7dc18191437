"""extract_adapter passes its uniform rank and its plan to the advice for the changed matrices it leaves out
(spectra.lora.left_out): at rank 2 the note gives the LoRA parameters on them at rank 2, PEFT's own count, beside
the adapter's (its LoRA tensors); with a plan, the exact ``spectra recommend --roles`` (the plan's roles and theirs,
not "…") with the share of ‖ΔW‖_F² they hold. Negative control: the CLI names the option as typed (--roles)."""

from __future__ import annotations

import copy
import warnings

import pytest
from safetensors import safe_open

from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.models import build_model, save


@pytest.fixture(scope="module")
def llama_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-all")
    base = build_model("llama")
    tuned = perturbed(base, select=lambda name, p: True)
    return base, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_rank_and_plan_reach_the_advice(llama_all, tmp_path):
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks

    base, b, t = llama_all
    result = extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lm_head", "embed_tokens"]))
    added = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        held = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    assert (f"roles=q,k,v,o,gate,up,down,embed,head; LoRAs on these 2 matrices at rank 2 add {added:,} parameters "
            f"to the adapter's {held:,})") in result.notes[0]

    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(energy=0.5, noise=False, roles=("q", "v")))
    planned = extract_adapter(b, t, plan, tmp_path / "plan", progress=False)
    note = planned.notes[0]
    assert "plan them (spectra recommend --roles q,k,v,o,gate,up,down,embed,head, the plan's other options" in note
    assert "…" not in note and "of the whole update's ‖ΔW‖_F²" in note and f"beside the plan's {plan.total_params:,}" \
        in note
