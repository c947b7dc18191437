"""Plans as PEFT configs (PEFT itself as the referee, on real architectures) and as files."""

from __future__ import annotations

import json

import pytest
import torch

from spectra.errors import ConfigError
from spectra.ranks import ModuleRank, RankPlan, RankPolicy, check_peft_config, load_plan, recommend_ranks, save_plan
from tests.ranks.rows import PLANTED, analysis, make_row


def test_peft_keys_are_anchored_and_checked():
    rows = [make_row("model.layers.1.self_attn.q_proj", PLANTED, layer=1),
            make_row("model.layers.11.self_attn.q_proj", [4.0, 0.1, 0.1, 0.1], layer=11)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.9))
    names = ["model", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
             "x.model.layers.1.self_attn.q_proj"]
    cfg = plan.to_peft_config()
    assert cfg["rank_pattern"] == {r"^model\.layers\.1\.self_attn\.q_proj": 3} and cfg["r"] == 1
    assert check_peft_config(cfg, names[:3])[r"^model\.layers\.1\.self_attn\.q_proj"] == names[1]
    # negative controls: a suffix key hits two modules; a module absent from the base
    with pytest.raises(ConfigError, match="matches 2 modules"):
        check_peft_config(cfg | {"rank_pattern": {"q_proj": 3}}, names[:3])
    with pytest.raises(ConfigError, match="target_modules entry"):
        check_peft_config(cfg, names)
    with pytest.raises(ConfigError, match="absent"):
        plan.to_peft_config(module_names=["model.layers.1.self_attn.q_proj"])


def test_plan_round_trip_and_bad_plans(tmp_path):
    plan = recommend_ranks(analysis(make_row("a", PLANTED), make_row("b", PLANTED, layer=1, role="v")),
                           RankPolicy(energy=0.9, roles=("q", "v"), rslora=True))
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["peft_config"]["use_rslora"] is True and data["totals"]["params"] == plan.total_params
    data["modules"][0]["rank"] = 33
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="exceeds min"):
        load_plan(path)
    with pytest.raises(ConfigError, match="No plan"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="more than once"):
        m = plan.modules[0]
        RankPlan(modules=(m, m))
    with pytest.raises(ConfigError, match="positive integer"):
        ModuleRank("a", "q", 0, (4, 4), 0, 1.0, 0.0, 0.0, 0, "rank")


def _plan_rows(model, prefix=""):
    """Rows for every linear/Conv1D module of a tiny model (heads excluded), with varied planted ranks."""
    from transformers.pytorch_utils import Conv1D

    from spectra.checkpoints.architectures import module_info

    rows = []
    for i, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name.endswith(("lm_head", "classifier")):
            continue
        conv1d = isinstance(module, Conv1D)
        out_f, in_f = (module.nf, module.weight.shape[0]) if conv1d else tuple(module.weight.shape)
        info = module_info(prefix + name)
        sv = [1.0] * (1 + i % 4) + [0.0] * (min(out_f, in_f) - 1 - i % 4)
        rows.append(make_row(prefix + name, sv, shape=(out_f, in_f), role=info.role, layer=info.layer, conv1d=conv1d))
        if name.endswith("c_attn"):  # split projections of the fused tensor: never targeted
            rows.append(make_row(prefix + name + "[q]", sv[:32], role="q", layer=info.layer, conv1d=True,
                                 fused_name=prefix + name))
    return rows


@pytest.mark.parametrize(("family", "head", "prefix", "task_type", "rslora"), [
    ("llama", True, "", "CAUSAL_LM", False),
    ("llama", True, "", "CAUSAL_LM", True),
    ("gpt2", True, "", "CAUSAL_LM", False),
    ("bert", False, "bert.", None, True),  # checkpoint names carry "bert.", BertModel's modules do not
])
def test_every_pattern_key_hits_exactly_its_module_in_peft(tmp_path, family, head, prefix, task_type, rslora):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from tests.models import build_model

    model = build_model(family, head=head)
    plan = recommend_ranks(analysis(*_plan_rows(model, prefix)), RankPolicy(energy=0.99, rslora=rslora))
    assert len({m.rank for m in plan.modules}) == 4  # patterns are really exercised
    module_names = [n for n, _ in model.named_modules()]
    cfg = plan.to_peft_config(module_names=module_names, task_type=task_type)
    assert cfg["rank_pattern"] and all(k.startswith("^") for k in cfg["rank_pattern"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = get_peft_model(model, LoraConfig.from_pretrained(tmp_path))

    lora = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    expected = {prefix_free: m for m in plan.modules
                for prefix_free in [m.name[len(prefix):] if m.name.startswith(prefix) else m.name]}
    assert set(lora) == set(expected)
    for name, layer in lora.items():
        assert layer.r["default"] == expected[name].rank, name
        assert layer.scaling["default"] == pytest.approx(plan.policy.scaling(expected[name].rank)), name
    # negative control: the same ranks under bare suffix keys collide across layers
    bare = cfg | {"rank_pattern": {k.rsplit(".", 1)[-1]: v for k, v in cfg["rank_pattern"].items()}}
    with pytest.raises(ConfigError):
        check_peft_config(bare, module_names)
