"""`spectra train --plan` on JetMoE: a plan that `spectra recommend` made from an analysis of a planted pair (rank-2
updates of one MLP expert's down, one attention expert's query and the shared kv_proj) trains what the plan names,
at its ranks. JetMoE's experts (``JetMoeParallelExperts``, 3-D weights) take a LoRA through PEFT's
``target_parameters``, its kv_proj (role other, rows k and v) a ``lora.Linear``. The reference is PEFT: the saved
adapter loaded onto the base with ``PeftModel.from_pretrained`` wraps exactly the plan's modules and parameters at
the plan's ranks, and after two steps the LoRA B factors (zero at the start) moved there, and only there.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.checkpoints.test_architectures_gemma4_jetmoe import tiny_jetmoe
from tests.cli.test_cli import run
from tests.models import flat_update, peft_wrapped, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

MLP_OUT, ATT_IN, KV = ("model.layers.1.mlp.output_linear", "model.layers.0.self_attention.experts.input_linear",
                       "model.layers.0.self_attention.kv_proj")


def test_train_plan_on_jetmoe_trains_the_planned_experts_and_kv_proj(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    import transformers as tf
    from spectra.analysis import analyze

    base = tiny_jetmoe()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_submodule(MLP_OUT).weight[2] += flat_update((32, 48), 2, seed=1).float()
        tuned.get_submodule(ATT_IN).weight[1] += flat_update((8, 32), 2, seed=2).float()
        tuned.get_submodule(KV).weight += flat_update((16, 32), 2, seed=3).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    (tmp_path / "run").mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(tmp_path / "run" / "analysis.json")
    code, stdout, err = run(monkeypatch, capsys, "recommend", tmp_path / "run", "--energy", "0.99", "-o",
                            tmp_path / "plan.json")
    assert code == 0, stdout + err
    plan = json.loads((tmp_path / "plan.json").read_text())
    peft_config = plan["peft_config"]
    assert peft_config["target_parameters"] == sorted([f"{MLP_OUT}.weight", f"{ATT_IN}.weight"])
    assert [m["rank"] for m in plan["modules"]] == [2] * len(plan["modules"])
    planned_linears = {m["name"] for m in plan["modules"]} - {f"{p}.{e}" for p in (MLP_OUT, ATT_IN) for e in range(3)}
    assert planned_linears == {KV}

    data = tmp_path / "train.txt"
    data.write_text(bytes(torch.randint(97, 123, (16 * 8 * 4,), generator=torch.Generator().manual_seed(2))
                          .tolist()).decode("ascii"))
    out = tmp_path / "adapter"
    code, stdout, err = run(monkeypatch, capsys, "train", b, "--data", data, "--plan", tmp_path / "plan.json",
                            "--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--eval-fraction", "0",
                            "-q", "-o", out)
    assert code == 0, stdout + err
    saved = json.loads((out / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == peft_config["target_parameters"]
    assert {k: saved[k] for k in ("r", "rank_pattern", "alpha_pattern", "lora_alpha")} == {
        k: peft_config.get(k, saved[k]) for k in ("r", "rank_pattern", "alpha_pattern", "lora_alpha")}

    model = tf.AutoModelForCausalLM.from_pretrained(b)
    wrapped = peft_wrapped(PeftModel.from_pretrained(model, out))  # {module, or module.parameter: LoRA layer}
    assert set(wrapped) == {*peft_config["target_parameters"], KV}, sorted(wrapped)
    for name, layer in wrapped.items():
        assert layer.r["default"] == 2, name
        # two steps moved every planned LoRA's B off its zero start
        assert layer.lora_B["default"].weight.abs().max() > 0, name
