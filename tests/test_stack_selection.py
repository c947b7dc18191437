"""Selecting by stack (``--stacks``) wherever roles select: pairing and analysis, extraction (checked by PEFT's own
loading: which modules it wraps), the memory estimate (checked by PEFT's trainable count), the command line.

What was missing: a role selection takes every stack's modules of that role — ``--roles q,v`` on a VLM adapted its
vision tower's attention too, as PEFT's ``target_modules=["q_proj"]`` does — and nothing could name a stack short
of an --include/--exclude regex. The models are tiny Qwen2-VL and Gemma 3 built from config (tests.models,
tests/checkpoints/test_qwen_vl.py), with planted low-rank updates on the vision tower and the language model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.checkpoints.test_more_architectures import _planted_pair
from tests.checkpoints.test_qwen_vl import _planted_modules, stored, tiny
from tests.cli.test_cli import run

LANGUAGE_Q = "model.language_model.layers.1.self_attn.q_proj"  # planted, rank 2 (model's names)
VISION_QKV = "model.visual.blocks.0.attn.qkv"  # planted in its q rows, rank 1


@pytest.fixture(scope="module")
def vl_pair(tmp_path_factory):
    """Qwen2-VL, its checkpoints under the hub's names (visual.…, model.layers.N…): base, tuned, deltas, b, t."""
    return _planted_pair(tmp_path_factory.mktemp("qwen2_vl"), tiny("qwen2_vl"), _planted_modules("qwen2_vl"))


def _model_linears(model, prefix: str, *suffixes: str) -> set[str]:
    """The model's own Linears under `prefix` ending in one of `suffixes`: the reference for a selection."""
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
            and n.endswith(suffixes)}


def test_pairing_keeps_the_chosen_stacks_roles(vl_pair):
    """Pairing selects by the roles a module holds (role_named): the vision tower's fused attn.qkv by its split q and
    v rows; with stacks, only the chosen stacks' modules of those roles."""
    base, _, _, b, t = vl_pair
    language = {stored("qwen2_vl", n) for n in _model_linears(base, "model.language_model.", "q_proj", "v_proj")}
    tower = {stored("qwen2_vl", n) for n in _model_linears(base, "model.visual.blocks.", "attn.qkv")}
    split = {f"{n}[{r}]" for n in tower for r in "qv"}  # its q and v rows; [k] is neither role

    def names(**options):
        return {d.name for d in Pairing(b, t, PairingOptions(roles=("q", "v"), vectors=False, load=False, **options))}

    assert names() == language | split  # negative control: roles alone take the tower's q and v too
    assert names(stacks=("language",)) == language
    assert names(stacks=("vision",)) == split
    assert names(stacks="decoder") == language  # what a report beside an encoder calls the language model
    pairing = Pairing(b, t, PairingOptions(roles=("q", "v"), stacks=("language", "audio"), vectors=False,
                                           load=False))
    assert {d.name for d in pairing} == language
    assert "stacks: the model has no audio stack (its stacks: language, vision, projector)" in pairing.notes
    with pytest.raises(ConfigError, match="stacks audio: the model has no module of that stack; its stacks are "
                                          "language, vision, projector"):
        Pairing(b, t, PairingOptions(stacks=("audio",), load=False))


def test_analysis_of_one_stack_and_its_recorded_configuration(vl_pair, tmp_path):
    """Rows of the vision stack only; the run's configuration records the selection, as spelled by the library, and
    holds no stacks key without one (an analysis.json reads as before)."""
    _, _, deltas, b, t = vl_pair
    result = analyze(b, t, AnalysisConfig(stacks=("vision",), dtype="float64"), cache_dir=False, progress=False)
    matrices = [r for r in result.modules if r["kind"] == "matrix"]
    assert matrices and {r.get("stack") for r in result.modules} == {"vision"}
    fro = {r["name"]: r["fro_norm"] for r in matrices}
    qkv = stored("qwen2_vl", VISION_QKV)
    assert fro[qkv] == pytest.approx(float(torch.linalg.matrix_norm(deltas[VISION_QKV])), rel=1e-12)
    assert result.config["stacks"] == ["vision"]
    assert AnalysisConfig(stacks="decoder").stacks == ("language",)
    plain = analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False)
    assert "stacks" not in plain.config and {r.get("stack") for r in plain.modules} == {None, "vision"}


def _wrapped(peft_model) -> set[str]:
    """The modules PEFT wrapped with a LoRA layer, under the base model's names."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_extract_for_the_language_models_q_and_v_wraps_no_vision_module(vl_pair, tmp_path):
    """PEFT's own loading is the reference: the adapter extracted with stacks=language wraps the language model's
    q_proj and v_proj alone (its target_modules are full names, which PEFT matches as suffixes: a bare "q_proj" would
    not tell the towers apart), merges the planted language update exactly and leaves the vision tower the base's.
    Negative control: without stacks the tower's fused qkv is wrapped and merged too."""
    from peft import PeftModel

    base, tuned, _, b, t = vl_pair
    language = _model_linears(base, "model.language_model.", "q_proj", "v_proj")
    result = extract_adapter(b, t, 2, tmp_path / "lang", roles=("q", "v"), stacks=("language",), progress=False)
    config = json.loads((tmp_path / "lang" / "adapter_config.json").read_text())
    assert not any("visual" in n for n in config["target_modules"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lang"))
    assert set(result.unchanged) < language  # selected, unchanged (ΔW = 0): left out of the adapter
    assert _wrapped(peft_model) == language - set(result.unchanged)
    merged = peft_model.merge_and_unload().state_dict()
    torch.testing.assert_close(merged[LANGUAGE_Q + ".weight"], tuned.state_dict()[LANGUAGE_Q + ".weight"],
                               rtol=0, atol=1e-6)
    assert torch.equal(merged[VISION_QKV + ".weight"], base.state_dict()[VISION_QKV + ".weight"])

    result = extract_adapter(b, t, 1, tmp_path / "all", roles=("q", "v"), progress=False)
    everything = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "all"))
    assert _wrapped(everything) | set(result.unchanged) == language | _model_linears(base, "model.visual.blocks.",
                                                                                      "attn.qkv")
    vision = everything.merge_and_unload().state_dict()[VISION_QKV + ".weight"]
    assert not torch.equal(vision, base.state_dict()[VISION_QKV + ".weight"])


def test_extract_of_the_vision_tower_alone_and_its_refusals(vl_pair, tmp_path):
    from peft import PeftModel

    base, tuned, _, b, t = vl_pair
    result = extract_adapter(b, t, 1, tmp_path / "vision", roles=("q",), stacks=("vision", "audio"), progress=False)
    assert "stacks: the model has no audio stack (its stacks: language, vision, projector)" in result.notes
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "vision"))
    assert _wrapped(peft_model) == _model_linears(base, "model.visual.blocks.", "attn.qkv")
    merged = peft_model.merge_and_unload().state_dict()
    torch.testing.assert_close(merged[VISION_QKV + ".weight"], tuned.state_dict()[VISION_QKV + ".weight"],
                               rtol=0, atol=1e-6)  # a rank-1 update on its q rows: rank 1 is exact
    with pytest.raises(ConfigError, match="no module of that stack"):
        extract_adapter(b, t, 1, tmp_path / "none", stacks=("audio",), progress=False)
    with pytest.raises(ConfigError, match=r"unknown stack\(s\) visual"):
        extract_adapter(b, t, 1, tmp_path / "none", stacks=("visual",), progress=False)
    from spectra.ranks import RankPolicy, recommend_ranks

    plan = recommend_ranks(analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False),
                           RankPolicy(energy=0.9, roles=("q",)))
    with pytest.raises(ConfigError, match="stacks go with a uniform rank; a plan names its modules"):
        extract_adapter(b, t, plan, tmp_path / "none", stacks=("vision",), progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
def test_memory_of_the_language_models_adapters_is_pefts_count():
    """Gemma 3 multimodal: stacks=language counts the adapters PEFT makes on the language model's linears alone (its
    trainable parameters), as the default stacks do (spectra train's default: the stacks text runs through), fewer
    than language,vision, which adapts the vision tower too (all-linear's count)."""
    from peft import LoraConfig, get_peft_model

    from spectra.memory import estimate_memory
    from tests.models import build_model

    model = build_model("gemma3_multimodal")
    config = model.config.to_dict()
    language = sorted(_model_linears(model, "model.language_model.", ""))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=language))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    est = estimate_memory(config, rank_plan_or_rank=4, precision="fp32", stacks=("language",))
    everything = estimate_memory(config, rank_plan_or_rank=4, precision="fp32", stacks="language,vision")
    all_linear = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear")).parameters()
    assert est.trainable_params == trainable < everything.trainable_params
    assert everything.trainable_params == sum(p.numel() for p in all_linear if p.requires_grad)
    assert estimate_memory(config, rank_plan_or_rank=4, precision="fp32") == est  # the default: language alone
    assert est.gradients == everything.gradients  # the tower's adapters got no gradient on text batches anyway
    for stacks, message in ((("vision",), "text-only batches"), (("language", "audio"), "no audio stack")):
        with pytest.raises(ConfigError, match=message):
            estimate_memory(config, rank_plan_or_rank=4, stacks=stacks)
    with pytest.raises(ConfigError, match="full fine-tuning trains every weight"):
        estimate_memory(config, method="full", stacks=("language",))


# -- the command line -------------------------------------------------------------------------------------------------

def test_cli_stacks_select_and_refuse(monkeypatch, capsys, vl_pair, tmp_path):
    _, _, _, b, t = vl_pair
    code, out, err = run(monkeypatch, capsys, "pairs", b, t, "--roles", "q", "--stacks", "language")
    assert code == 0, err
    assert "q_proj" in out and "visual" not in out
    code, out, err = run(monkeypatch, capsys, "pairs", b, t, "--roles", "q", "--stacks", "vision")
    assert code == 0 and "attn.qkv" in out and "q_proj" not in out
    code, _, err = run(monkeypatch, capsys, "pairs", b, t, "--stacks", "language,visoin")
    assert code == 2
    assert "--stacks: unknown stack(s) visoin; choose from language, encoder, vision, vision_global" in err
    code, _, err = run(monkeypatch, capsys, "analyze", b, t, "--stacks", "audio", "-o", tmp_path / "r", "--no-cache",
                       "-q")
    assert code == 2 and "no module of that stack; its stacks are language, vision, projector" in err
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    code, _, err = run(monkeypatch, capsys, "extract", b, t, "--plan", plan, "--stacks", "language", "-o",
                       tmp_path / "ad")
    assert code == 2 and "--stacks would be ignored" in err
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "1", "--roles", "q", "--stacks", "vision",
                         "-o", tmp_path / "ad", "-q")
    assert code == 0, err
    targets = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(n.startswith("model.visual.blocks.") and n.endswith("attn.qkv") for n in targets)


def test_cli_recommend_and_memory_take_stacks(monkeypatch, capsys, vl_pair, tmp_path):
    _, _, _, b, t = vl_pair
    code, out, err = run(monkeypatch, capsys, "recommend", b, t, "--roles", "q", "--stacks", "language", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["policy"]["stacks"] == ["language"]
    assert [m["name"] for m in plan["modules"]] == [stored("qwen2_vl", LANGUAGE_Q)]
    config = tmp_path / "config.json"
    from tests.models import tiny_config

    config.write_text(json.dumps(tiny_config("gemma3_multimodal").to_dict()))
    code, out, err = run(monkeypatch, capsys, "memory", config, "--stacks", "language", "--json")
    assert code == 0, err
    assert json.loads(out)["inputs"]["stacks"] == ["language"]
    code, _, err = run(monkeypatch, capsys, "memory", config, "--stacks", "vision")
    assert code == 2 and "text-only batches" in err
    code, _, err = run(monkeypatch, capsys, "memory", config, "--method", "full", "--stacks", "language")
    assert code == 2 and "--stacks would be ignored" in err


@pytest.mark.parametrize("command", ["pairs", "analyze", "recommend", "extract", "memory"])
def test_help_names_the_stacks_with_an_example(monkeypatch, capsys, command):
    code, out, _ = run(monkeypatch, capsys, command, "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and "--stacks" in text
    assert "language" in text and "vision" in text and ("--stacks language" in text or "--stacks vision" in text)
