"""DeepSeek-V3's router in an extracted adapter: its weight is a ``target_parameters`` entry, as Mixtral's is.

transformers loads DeepSeek-V3's router ``mlp.gate`` into a ``DeepseekV3TopkRouter``, a module holding a bare
``weight`` Parameter that no LoRA module can wrap, and stores it under that same name. extract took a stored name equal
to a module's name for a module LoRA wraps, so ``--roles q,other`` (or a plan holding the router) was refused, with the
advice to leave the role out of ``--roles`` even under ``--plan``. The referee is PEFT's own load and merge.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from spectra.analysis import analyze
from spectra.checkpoints.targets import meta_model, rewritten_weights
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.train import quiet_peft
from spectra.ranks import RankPolicy, recommend_ranks, save_plan
from tests.checkpoints.test_architectures_mla import tiny_mla, tiny_mla_pair
from tests.lora.test_extract import merged_state
from tests.cli.test_cli import run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUTER = "model.layers.1.mlp.gate"  # layer 0 is dense (first_k_dense_replace = 1)
QUERY = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_a_proj", "q_b_proj")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny_mla_pair(tmp_path_factory.mktemp("mla-router"))


def _plan(b, t, path):
    """A plan of roles q and other (the router) at rank 1, α 2, saved as JSON: what `spectra recommend` writes."""
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("q", "other"), uniform=True, noise=False))
    plan = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=1, alpha=2.0) for m in plan.modules))
    save_plan(plan, path)
    return plan


@pytest.mark.parametrize("how", ["rank", "plan", "cli"])
def test_the_router_merges_to_the_fine_tunes_and_nothing_else_moves(pair, tmp_path, monkeypatch, capsys, how):
    """--rank 1 --roles q,other, the plan of those roles, and the CLI: the router's LoRA goes onto mlp.gate.weight
    (target_parameters), as the plan's own peft_config names it. PEFT's merge of the adapter gives the fine-tune's
    router and query factors (rank-1 updates: exact at rank 1), the base's every other tensor (the experts, the
    shared expert, kv, o, the dense layer's MLP), and runs unmerged as merged. Negative control: the router moved."""
    base, b, t = pair
    out = tmp_path / "ad"
    if how == "rank":
        config = extract_adapter(b, t, 1, out, roles=("q", "other"), progress=False).config
    elif how == "plan":
        plan = _plan(b, t, tmp_path / "plan.json")
        config = extract_adapter(b, t, tmp_path / "plan.json", out, progress=False).config
        planned = plan.to_peft_config(model=meta_model(json.loads((b / "config.json").read_text())))
        assert planned["target_parameters"] == [f"{ROUTER}.weight"]
    else:
        code, _, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "1", "--roles", "q,other", "-o", out, "-q")
        assert code == 0, err
        config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"{ROUTER}.weight"] and sorted(config["target_modules"]) == QUERY
    tuned = type(base).from_pretrained(t, dtype=torch.float32).eval()  # transformers fuses the stored experts
    with quiet_peft(base, out):
        state, _ = merged_state(base, out)
        unmerged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    W0, W1 = base.state_dict(), tuned.state_dict()
    assert (W1[f"{ROUTER}.weight"] - W0[f"{ROUTER}.weight"]).abs().max() > 1e-3  # it moved: the check below can fail
    moved = {f"{n}.weight" for n in [ROUTER, *QUERY]}
    for key, value in state.items():
        torch.testing.assert_close(value, W1[key] if key in moved else W0[key], rtol=0, atol=1e-6, msg=key)
    merged = copy.deepcopy(base)
    merged.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the unmerged PeftModel's router ParamWrapper runs in the forward, as merged
        logits = merged.eval()(ids).logits
        torch.testing.assert_close(unmerged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base.eval()(ids).logits, logits, atol=1e-3)  # the adapter changes the model


def test_a_module_peft_would_rewrite_is_refused_with_advice_for_a_plan_too():
    """PEFT rewrites a target_modules entry ending in .gate of DeepSeek-V3 into a fused expert target; the router is
    no Linear whose weight could be adapted in its place. The error names both ways out: --roles, and the plan."""
    model = meta_model(tiny_mla("deepseek_v3").config.to_dict() | {"architectures": ["DeepseekV3ForCausalLM"]})
    with pytest.raises(ConfigError, match=rf"{ROUTER}: PEFT rewrites .*--roles q,k,v,o.*drop it from the plan"):
        rewritten_weights([ROUTER], model)
    with pytest.raises(ConfigError, match=r"no Linear .*adapt instead\. Drop it from the plan\.$"):
        rewritten_weights([ROUTER], model, fix="Drop it from the plan.")
    assert rewritten_weights(QUERY, model) == []  # negative control: attention's factors are kept as named
