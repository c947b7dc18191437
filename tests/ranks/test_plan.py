"""Plans as PEFT configs (PEFT itself as the referee, on real architectures) and as files."""

from __future__ import annotations

import json

import pytest
import torch

from spectra.errors import ConfigError
from spectra.ranks import ModuleRank, RankPlan, RankPolicy, check_peft_config, load_plan, recommend_ranks, save_plan
from tests.models import planted_mixtral_pair
from tests.ranks.rows import PLANTED, analysis, make_row


def test_peft_keys_are_escaped_names_and_checked():
    """A key is the escaped full name: layers 1 and 11 stay apart (the dots are literal), and a wrapper's prefix
    still matches, as target_modules does; anchored with ^ where another target ends in "." + the name."""
    rows = [make_row("model.layers.1.self_attn.q_proj", PLANTED, layer=1),
            make_row("model.layers.11.self_attn.q_proj", [4.0, 0.1, 0.1, 0.1], layer=11)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.9))
    names = ["model", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
             "x.model.layers.1.self_attn.q_proj"]
    cfg = plan.to_peft_config()
    assert cfg["rank_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 3} and cfg["r"] == 1
    assert check_peft_config(cfg, names[:3])[r"model\.layers\.1\.self_attn\.q_proj"] == names[1]
    nested = recommend_ranks(analysis(*rows, make_row("x.model.layers.11.self_attn.q_proj", PLANTED, layer=11)),
                             RankPolicy(energy=0.9)).to_peft_config()
    # x.model.layers.11… ends in .model.layers.11…: that key is anchored, or PEFT would give both its rank 1
    assert nested["r"] == 3 and nested["rank_pattern"] == {r"^model\.layers\.11\.self_attn\.q_proj": 1}
    assert nested["alpha_pattern"] == {r"^model\.layers\.11\.self_attn\.q_proj": 2.0}
    # negative controls: a suffix key hits two modules; a module absent from the base
    with pytest.raises(ConfigError, match="matches 2 modules"):
        check_peft_config(cfg | {"rank_pattern": {"q_proj": 3}}, names[:3])
    with pytest.raises(ConfigError, match="target_modules entry"):
        check_peft_config(cfg, names)
    with pytest.raises(ConfigError, match="absent"):
        plan.to_peft_config(module_names=["model.layers.1.self_attn.q_proj"])


def test_a_target_peft_leaves_unwrapped_matches_nothing():
    """PEFT wraps no module that modules_to_save holds (or exclude_modules names), even when target_modules names it:
    such an entry matches no module, so check_peft_config refuses it (it had counted the module as targeted)."""
    names = ["model.layers.0.self_attn.q_proj", "lm_head"]
    config = {"target_modules": names, "r": 2}
    assert check_peft_config(config, names) == {n: n for n in names}  # as targets alone
    for leaves_out in ({"modules_to_save": ["lm_head"]}, {"exclude_modules": ["lm_head"]}):
        with pytest.raises(ConfigError, match="target_modules entry 'lm_head' matches 0 modules"):
            check_peft_config(config | leaves_out, names)


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
    assert cfg["rank_pattern"] and not any(k.startswith("^") for k in cfg["rank_pattern"])
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


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
def test_a_plan_of_a_bare_model_keeps_its_ranks_under_a_task_class(tmp_path):
    """plan.json's peft_config is written for the class config.json names: a BertModel checkpoint (a
    sentence-transformers base) planned, then applied to BertForSequenceClassification, whose modules are the same
    under bert.…. target_modules wraps them (a .-suffix match), and so must the rank_pattern/alpha_pattern keys:
    every LoRA layer at its planned rank and scaling. Negative control: keys anchored with ^ (as they were) match
    no prefixed name, and PEFT leaves every module at the global r."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from tests.models import build_model

    bare = build_model("bert", head=False)
    plan = recommend_ranks(analysis(*_plan_rows(bare)), RankPolicy(energy=0.99))
    cfg = plan.to_peft_config(task_type="SEQ_CLS")
    planned = {m.name: m.rank for m in plan.modules}
    assert len(set(planned.values())) > 1

    def ranks(config) -> dict[str, int]:
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(bare.config)
        peft_model = get_peft_model(model, LoraConfig(**config))
        return {n.removeprefix("base_model.model.bert."): m.r["default"] for n, m in peft_model.named_modules()
                if isinstance(m, LoraLayer)}

    assert ranks(cfg) == planned
    anchored = cfg | {p: {"^" + k: v for k, v in cfg[p].items()} for p in ("rank_pattern", "alpha_pattern")}
    assert set(ranks(anchored).values()) == {cfg["r"]} != set(planned.values())


def _adapted_ranks(peft_model) -> dict[str, tuple[int, float, tuple]]:
    """Module or parameter name → (r, scaling, lora_A shape) of every LoRA layer PEFT made."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            parameter = getattr(layer, "parameter_name", None)  # ParamWrapper: nested on one module, .base_layer…
            key = name.replace(".base_layer", "") + (f".{parameter}" if parameter else "")
            out[key] = (layer.r["default"], layer.scaling["default"], tuple(layer.lora_A["default"].weight.shape))
    return out


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT 0.21 checks
# pattern keys against targeted modules only, and reports those of target_parameters as ignored; they are applied
def test_mixtral_plan_targets_the_fused_expert_parameters_at_their_rank(tmp_path):
    """transformers 5 loads Mixtral's experts.N.w1/w3/w2 into mlp.experts.gate_up_proj/down_proj parameters."""
    import copy

    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze
    from spectra.errors import PeftConfigWarning

    base, b, t = planted_mixtral_pair(tmp_path)
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.99))
    planned = {m.name: m.rank for m in plan.modules}
    assert planned["model.layers.1.block_sparse_moe.experts.1.w1"] == 3  # the planted ranks are the plan's
    assert "model.layers.1.block_sparse_moe.experts.2.w3" in {m.name for m in plan.left_out}
    with pytest.warns(PeftConfigWarning) as caught:
        save_plan(plan, tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["peft_config_model"] == "MixtralForCausalLM" and data["peft_config_notes"] == [
        str(w.message) for w in caught]
    notes = " ".join(data["peft_config_notes"])
    # every expert of a projection now has one rank (gate 3, up 2 in layer 1): PEFT's rank 5 is the plan's; what
    # remains to say is the unchanged expert-2 w3 whose rows PEFT trains at that rank, counted in the total
    assert "layers.1.mlp.experts.gate_up_proj" in notes and "experts.2.w3" in notes
    assert "256 parameters, counted in the plan's total" in notes and "so PEFT trains" not in notes
    assert "layers.0" not in notes  # layer 0's experts share one rank: nothing to say

    cfg = data["peft_config"]
    adapted = _adapted_ranks(get_peft_model(copy.deepcopy(base), LoraConfig(**cfg)))
    expected = {f"model.layers.{i}.self_attn.{p}": r for i in (0, 1) for p, r in (("q_proj", 2), ("v_proj", 1))}
    # per expert, gate + up (a [gate; up] update of rank r_g + r_u); the largest over the experts: 1+1, 3+2, 1+0
    expected |= {"model.layers.0.mlp.experts.gate_up_proj": 3, "model.layers.0.mlp.experts.down_proj": 2,
                 "model.layers.1.mlp.experts.gate_up_proj": 5, "model.layers.1.mlp.experts.down_proj": 1}
    assert {name: r for name, (r, _, _) in adapted.items()} == expected
    for name, (r, scaling, shape) in adapted.items():
        assert scaling == pytest.approx(plan.policy.scaling(r)), name
        experts, in_features = (3 if "experts" in name else 1), (48 if "down_proj" in name else 32)
        assert shape == (r * experts, in_features), name  # lora_A: (r · experts, in)

    # negative control: the checkpoint's names, as plan.json held them, leave the experts at PEFT's default rank
    old = plan.to_peft_config()
    adapted = _adapted_ranks(get_peft_model(copy.deepcopy(base), LoraConfig(**old)))
    assert adapted["model.layers.1.mlp.experts.gate_up_proj"][0] != 5


def test_a_plan_for_a_model_without_renames_is_unchanged(tmp_path):
    """Llama loads its checkpoint names as they are: plan.json's peft_config is the plan's own."""
    from tests.models import build_model, save

    model = build_model("llama")
    data = analysis(*_plan_rows(model))
    data["base"] = {"path": str(save(model, tmp_path / "base", "safetensors")), "fingerprint": "abc"}
    plan = recommend_ranks(data, RankPolicy(energy=0.99))
    path = save_plan(plan, tmp_path / "plan.json")
    saved = json.loads(path.read_text())
    assert saved["peft_config_model"] == "LlamaForCausalLM" and saved["peft_config_notes"] == []
    assert saved["peft_config"] == plan.to_peft_config() and "target_parameters" not in saved["peft_config"]
    assert saved["peft_config"]["rank_pattern"]  # the patterns are really exercised


@pytest.mark.parametrize(("family", "head", "task_type"), [
    ("llama", True, "CAUSAL_LM"), ("gpt2", True, "CAUSAL_LM"),  # GPT2LMHeadModel
    ("bert", True, "SEQ_CLS"), ("bert", False, None), ("llama", False, None),
])
def test_plan_peft_config_takes_the_task_type_of_the_model_class(tmp_path, family, head, task_type):
    """A causal-LM task type on BertForSequenceClassification made get_peft_model fail (no
    prepare_inputs_for_generation); bare models take PEFT's plain PeftModel."""
    from peft import LoraConfig, get_peft_model

    from tests.models import build_model, save

    model = build_model(family, head=head)
    prefix = "bert." if family == "bert" and head else ""
    data = analysis(*_plan_rows(model, prefix))
    data["base"] = {"path": str(save(model, tmp_path / "base", "safetensors")), "fingerprint": "abc"}
    saved = json.loads(save_plan(recommend_ranks(data, RankPolicy(energy=0.99)), tmp_path / "plan.json").read_text())
    config = saved["peft_config"]
    assert config["task_type"] == task_type
    peft_model = get_peft_model(build_model(family, head=head), LoraConfig(**config))  # failed for BERT's classifier
    if task_type == "SEQ_CLS":  # PEFT then trains the classification head too
        assert any("classifier" in n and p.requires_grad for n, p in peft_model.named_parameters())


def test_peft_task_type_by_class_name():
    from spectra.checkpoints.targets import peft_task_type

    assert peft_task_type({"architectures": ["MistralForCausalLM"]}) == "CAUSAL_LM"
    assert peft_task_type({}, "GPT2LMHeadModel") == "CAUSAL_LM"
    assert peft_task_type({"architectures": ["RobertaForTokenClassification"]}) == "TOKEN_CLS"
    assert peft_task_type({"architectures": ["BertForQuestionAnswering"]}) == "QUESTION_ANS"
    assert peft_task_type({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}) == "SEQ_2_SEQ_LM"
    assert peft_task_type({"architectures": ["LlavaForConditionalGeneration"]}) is None  # not encoder-decoder
    assert peft_task_type({"architectures": ["BertForMaskedLM"]}) is None
    assert peft_task_type(None) is None


@pytest.mark.parametrize("alpha_rule", ["scale", "constant"])
def test_with_rslora_recomputes_alpha_by_the_policy(alpha_rule):
    rows = [make_row(f"model.layers.{i}.self_attn.q_proj", [1.0] * (i + 1) + [0.0] * 8, shape=(16, 16), layer=i)
            for i in range(3)]
    policy = RankPolicy(energy=0.99, alpha_rule=alpha_rule, alpha=8.0)  # alpha counts under "constant" only
    plan = recommend_ranks(analysis(*rows), policy)
    assert [m.rank for m in plan.modules] == [1, 2, 3] and not plan.policy.rslora
    rs = plan.with_rslora()
    assert rs.policy.rslora and rs.with_rslora() is rs and [m.rank for m in rs.modules] == [1, 2, 3]
    for m in rs.modules:
        if alpha_rule == "scale":  # every module keeps its update scale 2: α = 2·√r
            assert m.alpha == pytest.approx(2 * m.rank ** 0.5) and rs.policy.scaling(m.rank) == pytest.approx(2.0)
        else:  # a constant α stays; its scale follows α/√r
            assert m.alpha == 8.0 and rs.policy.scaling(m.rank) == pytest.approx(8.0 / m.rank ** 0.5)
