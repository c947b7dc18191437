"""DBRX's stacked 2-D experts (``ffn.experts.mlp.w1``, ``v1``, ``w2``: (experts·ffn, d_model)) read per expert by the
pairing have no per-expert LoRA in PEFT 0.21: its ``target_parameters`` adapts the 2-D parameter whole, ONE LoRA
``B (experts·ffn, r) · A (r, d_model)`` whose A every expert shares (checked here on PEFT itself). So recommend and
extract leave those experts out, saying why, and recommend's coverage does not count them (it claimed 100 % when they
were unread vectors, and errored once they were per-expert records). References: PEFT's get_peft_model and
PeftModel's merge, float64 numpy (coverage = the planned module's share of the whole ‖ΔW‖_F²).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.checkpoints.test_dbrx_experts_s20b import D, E, FFN, expert_view, tiny_dbrx
from tests.cli.test_cli import run
from tests.models import planted_expert_pair

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

W1 = "transformer.blocks.0.ffn.experts.mlp.w1"
W2 = "transformer.blocks.1.ffn.experts.mlp.w2"
O = "transformer.blocks.0.norm_attn_norm.attn.out_proj"
OUT = (f"{O}.weight", None)  # planted beside the experts: the attention's out_proj whole


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("dbrx_left_out")
    base = tiny_dbrx()
    seeds = {(W1, e): 10 + e for e in range(E)} | {(W2, 1): 20, OUT: 30}
    tuned, b, t, deltas = planted_expert_pair(root, base, dict.fromkeys(seeds, 2), where=expert_view, seeds=seeds)
    (root / "run").mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(root / "run" / "analysis.json")
    return base, tuned, b, t, deltas, root


def test_peft_adapts_the_stacked_parameter_whole_with_one_shared_lora():
    """The premise: PEFT's LoRA on DBRX's w1 is one (experts·ffn, d_model) update, not one per expert."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_dbrx(), LoraConfig(r=2, target_modules=[], target_parameters=["ffn.experts.mlp.w1"]))
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    assert shapes == {(2, D), (E * FFN, 2)}


def test_recommend_leaves_the_experts_out_and_counts_them_uncovered(pair, tmp_path, monkeypatch, capsys):
    """The plan holds the attention's out_proj alone, each changed expert left out with the reason, and its coverage
    is out_proj's share of the whole ‖ΔW‖_F² (float64), not 100 %."""
    _, _, _, _, deltas, root = pair
    plan_path = tmp_path / "plan.json"
    code, stdout, err = run(monkeypatch, capsys, "recommend", root / "run", "--energy", "0.9", "-o", plan_path)
    assert code == 0, stdout + err
    plan = json.loads(plan_path.read_text())
    assert [m["name"] for m in plan["modules"]] == [O]
    assert not plan["peft_config"].get("target_parameters")
    left = {m["name"]: m["reason"] for m in plan["left_out"]}
    for (name, e) in [k for k in deltas if k != OUT]:
        head, _, proj = name.rpartition(".")
        assert left[f"{head}.{e}.{proj}"].startswith(f"DBRX's ffn.experts.mlp.{proj} stacks every expert's matrix")
    fro2 = {k: float(np.linalg.norm(v.numpy())) ** 2 for k, v in deltas.items()}
    assert plan["totals"]["coverage"] == pytest.approx(fro2[OUT] / sum(fro2.values()), rel=1e-4)


def test_extract_leaves_the_experts_out_with_the_reason_and_merges_the_rest(pair, tmp_path, monkeypatch, capsys):
    """extract --rank 2 (default roles, gate/up/down among them): the experts are left out with the reason, the advice
    names the module that holds them (ffn.experts.mlp, not the parameter w1); the adapter loads in PEFT and merges
    the attention's planted rank-2 update exactly, the experts left at the base."""
    from peft import PeftModel

    base, _, b, t, deltas, _ = pair
    out = tmp_path / "ad"
    code, stdout, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "-o", out)
    assert code == 0, stdout + err
    assert "DBRX's ffn.experts.mlp.w1 stacks every expert's matrix" in " ".join((stdout + err).split())
    assert "(--modules-to-save mlp)" in " ".join((stdout + err).split())  # the experts' module, ffn.experts.mlp
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("target_parameters")
    merged = PeftModel.from_pretrained(copy.deepcopy(base), out).merge_and_unload()
    got, start = dict(merged.named_parameters()), dict(base.named_parameters())
    assert torch.allclose(got[f"{O}.weight"].double(), start[f"{O}.weight"].double() + deltas[OUT], atol=1e-6)
    for name in (W1, W2):
        assert torch.equal(got[name], start[name])
