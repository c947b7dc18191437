"""`spectra recommend` on JetMoE's experts (``JetMoeParallelExperts``: 3-D weights (experts, out, in), one analysis
record per expert, ``….mlp.output_linear.2``): planned as Mixtral's fused experts are, one rank per parameter (the
largest its experts ask), costed as PEFT's ``target_parameters`` LoRA trains it (r·E·(out + in)). recommend refused
them ("The plan names 3 module(s) JetMoeForCausalLM has no weight for"). References: PEFT itself (get_peft_model's
trainable parameters and ParamWrapper ranks, PeftModel's merge of the extracted adapter) and float64 SVDs of the
models' own expert slices.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.checkpoints.test_architectures_gemma4_jetmoe import tiny_jetmoe
from tests.cli.test_cli import run
from tests.models import flat_update, peft_wrapped, planted_expert_pair

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

MLP_IN, MLP_OUT, ATT_IN = ("model.layers.1.mlp.input_linear.weight", "model.layers.1.mlp.output_linear.weight",
                           "model.layers.0.self_attention.experts.input_linear.weight")
# parameter -> {expert: (rows, planted rank)}; the experts not named are unchanged (PEFT trains them all the same)
PLANTED = {MLP_OUT: {0: (slice(None), 1), 2: (slice(None), 3)},
           MLP_IN: {0: (slice(None), 2), 2: (slice(0, 48), 1)},  # expert 2: its gate rows alone
           ATT_IN: {1: (slice(None), 2)}}


@pytest.fixture(scope="module")
def jetmoe(tmp_path_factory):
    """(base, tuned, base folder, tuned folder, analysis folder) of the tiny JetMoE with PLANTED updates."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("jetmoe_plan")
    base = tiny_jetmoe()
    keys = [(name, e) for name, experts in PLANTED.items() for e in experts]
    tuned, b, t, _ = planted_expert_pair(root, base, {(n, e): PLANTED[n][e][1] for n, e in keys},
                                         where=lambda n, param, e: param[e, PLANTED[n][e][0]], update=flat_update,
                                         seeds={(n, e): 10 * list(PLANTED).index(n) + e for n, e in keys})
    (root / "run").mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(root / "run" / "analysis.json")
    return base, tuned, b, t, root / "run"


def _ranks64(base, tuned, tau: float) -> dict:
    """Parameter -> each changed expert's own τ energy rank, from a float64 SVD of its (out, in) slice."""
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    out = {}
    for name in PLANTED:
        delta = t[name].detach().double() - b[name].detach().double()
        for e in range(delta.shape[0]):
            s2 = torch.linalg.svdvals(delta[e]) ** 2
            if s2.sum() > 0:
                cum = torch.cumsum(s2, 0)
                out.setdefault(name, []).append(int(torch.searchsorted(cum, tau * cum[-1] * (1 - 1e-9))) + 1)
    return out


def _peft(base, config: dict):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, {name: layer.r["default"] for name, layer in peft_wrapped(model).items()}


def _recommend(monkeypatch, capsys, run_dir, out, *options) -> dict:
    code, stdout, err = run(monkeypatch, capsys, "recommend", run_dir, "-o", out, *options)
    assert code == 0, stdout + err
    return json.loads(out.read_text())


def test_energy_plan_gives_each_expert_parameter_its_largest_expert_rank_at_peft_cost(jetmoe, tmp_path, monkeypatch,
                                                                                      capsys):
    """Each fused parameter at the largest τ = 0.9 rank of its experts (float64 SVD: output_linear's experts ask 1
    and 3 → 3), every planned expert at that rank, target_parameters naming the three weights, and totals.params what
    get_peft_model trains with the plan's peft_config (the unchanged experts' padding included)."""
    base, tuned, _, _, run_dir = jetmoe
    plan = _recommend(monkeypatch, capsys, run_dir, tmp_path / "plan.json", "--energy", "0.9")
    expected = {name: max(ranks) for name, ranks in _ranks64(base, tuned, 0.9).items()}
    assert expected == {MLP_OUT: 3, MLP_IN: 2, ATT_IN: 2}
    fused = {f["name"]: f for f in plan["fused"]}
    assert {name: f["rank"] for name, f in fused.items()} == expected
    for m in plan["modules"]:
        parameter = m["name"].rpartition(".")[0] + ".weight"
        assert m["rank"] == expected[parameter], m["name"]
        assert m["params"] == m["rank"] * sum(fused[parameter]["shape"][1:])
    planned = {m["name"] for m in plan["modules"]}
    assert {"model.layers.1.mlp.output_linear.0", "model.layers.1.mlp.output_linear.2"} <= planned
    assert plan["peft_config"]["target_parameters"] == sorted(expected)
    assert not any("so PEFT trains" in note for note in plan["peft_config_notes"])  # planned at PEFT's cost
    trained, ranks = _peft(base, plan["peft_config"])
    assert plan["totals"]["params"] == trained
    assert trained == sum(r * 3 * sum(fused[n]["shape"][1:]) for n, r in expected.items())
    assert {n: r for n, r in ranks.items() if n in expected} == expected


def test_budget_plan_holds_for_what_peft_trains_and_extract_merges_to_the_truncation(jetmoe, tmp_path, monkeypatch,
                                                                                     capsys):
    """--budget 1000 (the energy plan costs 1,728): totals.params == PEFT's trainable count ≤ 1000, one rank per
    parameter. `extract --plan` with it writes an adapter whose PEFT merge leaves, per expert, exactly the
    Eckart–Young error of its ΔW at the planned rank (float64 SVD): ‖W_merged[e] − W_tuned[e]‖_F² = Σ_{i>r} σᵢ²."""
    from peft import PeftModel
    import transformers as tf

    base, tuned, b, t, run_dir = jetmoe
    plan = _recommend(monkeypatch, capsys, run_dir, tmp_path / "plan.json", "--energy", "0.9", "--budget", "1000")
    fused = {f["name"]: f["rank"] for f in plan["fused"]}
    trained, ranks = _peft(base, plan["peft_config"])
    assert plan["totals"]["params"] == trained <= 1000
    assert {n: r for n, r in ranks.items() if n in fused} == fused and set(fused) == set(PLANTED)
    assert fused[MLP_OUT] < 3  # the budget binds on the experts
    for m in plan["modules"]:
        assert m["rank"] == fused[m["name"].rpartition(".")[0] + ".weight"], m["name"]

    out = tmp_path / "adapter"
    code, stdout, err = run(monkeypatch, capsys, "extract", b, t, "--plan", tmp_path / "plan.json", "-o", out)
    assert code == 0, stdout + err
    model = tf.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float64)
    merged = dict(PeftModel.from_pretrained(model, out).merge_and_unload().named_parameters())
    start, goal = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name, rank in fused.items():
        for e in range(3):
            delta = goal[name][e].detach().double() - start[name][e].detach().double()
            tail = float((torch.linalg.svdvals(delta)[rank:] ** 2).sum())
            error = float(((merged[name][e].detach() - goal[name][e].detach().double()) ** 2).sum())
            assert error == pytest.approx(tail, rel=1e-4, abs=1e-10), (name, e)
    for name, weight in merged.items():  # nothing else moved
        if name not in fused:
            torch.testing.assert_close(weight.detach(), start[name].detach().double(), rtol=0, atol=0, msg=name)
