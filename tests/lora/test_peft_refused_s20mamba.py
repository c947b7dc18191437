"""Modules PEFT puts no LoRA on are left out (or refused) by recommend, extract, train and verify alike.

PEFT 0.21 refuses ``out_proj`` and ``conv1d`` of a Mamba-based model by name (``_check_lora_target_modules_mamba``),
and wraps a grouped convolution (Mamba's and Jamba's depthwise ``conv1d``) only at a rank divisible by its groups,
unmergeable. Before: recommend planned both on Mamba (and the grouped conv1d on Jamba), so ``get_peft_model`` on the
plan's ``peft_config`` raised; ``extract --rank 2`` wrote a LoRA on Mamba's out_proj that ``PeftModel.from_pretrained``
refused; train failed in PEFT after loading. PEFT's own get_peft_model / from_pretrained / merge are the reference.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from spectra.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore")


def _mamba():
    import transformers as tf

    torch.manual_seed(0)
    return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2,
                                              intermediate_size=32, time_step_rank=2, conv_kernel=4)).eval()


def _jamba():
    import transformers as tf

    torch.manual_seed(0)
    return tf.JambaForCausalLM(tf.JambaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=2)).eval()


def _pair(root, build, planted: dict[str, int]):
    """`build()` saved under root/base, and under root/tuned with a rank-r change of each parameter of `planted`."""
    model = build()
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, rank in planted.items():
            p = model.get_parameter(name)
            flat = torch.randn(p.shape[0], rank, generator=gen) @ torch.randn(rank, p[0].numel(), generator=gen)
            p += 0.1 * flat.reshape(p.shape)
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


MIXER = "backbone.layers.0.mixer"
MAMBA_PLANTED = {f"{MIXER}.{m}.weight": 2 for m in ("in_proj", "x_proj", "out_proj", "conv1d")}


@pytest.fixture(scope="module")
def mamba_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("mamba"), _mamba, MAMBA_PLANTED)


@pytest.fixture(scope="module")
def mamba_analysis(mamba_pair):
    from spectra.analysis import analyze

    return analyze(*mamba_pair, cache_dir=False, progress=False)


def _peft_config(plan) -> dict:
    config = dict(plan.to_peft_config())
    config.pop("peft_type", None)
    return config


def _wrapped(peft_model) -> set[str]:
    from tests.models import peft_wrapped

    return set(peft_wrapped(peft_model))


def test_the_rule_is_pefts_for_every_model_type():
    """spectra's rule says "refused" exactly where PEFT's own check raises, for every model type transformers knows."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from spectra.checkpoints.targets import peft_refusal

    lora = SimpleNamespace(peft_type="LORA")
    refused = set()
    for model_type in CONFIG_MAPPING_NAMES:
        for leaf in ("out_proj", "conv1d", "in_proj", "x_proj", "o_proj", "q_proj"):
            model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
            try:
                _check_lora_target_modules_mamba(lora, model, leaf)
                peft_says = False
            except ValueError:
                peft_says = True
            ours = peft_refusal(f"backbone.layers.3.mixer.{leaf}", model_type) is not None
            assert ours == peft_says, (model_type, leaf)
            if ours:
                refused.add(model_type)
    assert {"mamba", "mamba2", "falcon_mamba"} <= refused and "jamba" not in refused  # control: both answers occur


def test_recommend_leaves_out_what_peft_refuses_on_mamba(mamba_pair, mamba_analysis):
    from peft import LoraConfig, get_peft_model

    from spectra.ranks import recommend_ranks

    plan = recommend_ranks(mamba_analysis)
    planned = {m.name for m in plan.modules}
    assert planned == {f"{MIXER}.in_proj", f"{MIXER}.x_proj"}
    reasons = {m.name: m.reason for m in plan.left_out}
    for leaf in ("out_proj", "conv1d"):
        assert reasons[f"{MIXER}.{leaf}"].startswith("PEFT refuses a LoRA on out_proj and conv1d in Mamba-based")
        assert "this one is mamba" in reasons[f"{MIXER}.{leaf}"]
    # PEFT takes the plan's own peft_config and wraps exactly its modules, at its ranks
    peft_model = get_peft_model(_mamba(), LoraConfig(**_peft_config(plan)))
    assert _wrapped(peft_model) == planned
    # negative control: without the model type (no config) the old plan holds both, and PEFT refuses it
    blind = recommend_ranks(mamba_analysis, model_config={})
    assert {f"{MIXER}.out_proj", f"{MIXER}.conv1d"} <= {m.name for m in blind.modules}
    with pytest.raises(ValueError, match="incompatible with Mamba"):
        get_peft_model(_mamba(), LoraConfig(**_peft_config(blind)))


def test_recommend_refuses_when_only_refused_modules_are_targeted(mamba_analysis):
    from spectra.cli.messages import _cli_message
    from spectra.ranks import RankPolicy, recommend_ranks

    with pytest.raises(ConfigError, match=rf"No targeted module can take a LoRA: {MIXER}.out_proj: PEFT refuses") as e:
        recommend_ranks(mamba_analysis, RankPolicy(roles=("o",)))
    assert "now --roles o;" in _cli_message(e.value, ["recommend", "an", "--roles", "o"])


def test_recommend_names_the_options_as_typed(mamba_analysis):
    """"--roles ('q',), --include None" was printed: the options given, as typed, and none that was not."""
    from spectra.cli.messages import _cli_message
    from spectra.ranks import RankPolicy, recommend_ranks

    with pytest.raises(ConfigError) as e:
        recommend_ranks(mamba_analysis, RankPolicy(roles=("q", "k")))
    text = _cli_message(e.value, ["recommend", "an", "--roles", "q,k"])
    assert "(13 left out; --roles q,k)" in text and "None" not in text and "(" + "'q'" not in text
    with pytest.raises(ConfigError) as e:
        recommend_ranks(mamba_analysis, RankPolicy(roles=("q",), include="*.in_proj"))
    assert "; --roles q; --include *.in_proj)" in _cli_message(e.value, ["recommend", "an", "--roles", "q",
                                                                        "--include", "*.in_proj"])


def test_recommend_leaves_out_a_grouped_convolution(tmp_path):
    """Jamba: PEFT's Mamba rule does not cover it (its out_proj is planned and wrapped), but its depthwise conv1d (32
    groups) takes a LoRA only at a rank divisible by 32: left out, and PEFT takes the plan."""
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze
    from spectra.ranks import recommend_ranks

    mixer = "model.layers.0.mamba"
    base, tuned = _pair(tmp_path, _jamba, {f"{mixer}.conv1d.weight": 2, f"{mixer}.out_proj.weight": 2})
    analysis = analyze(base, tuned, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis)
    assert {m.name for m in plan.modules} == {f"{mixer}.out_proj"}
    assert {m.name: m.reason for m in plan.left_out}[f"{mixer}.conv1d"].startswith("a convolution of 32 groups")
    assert _wrapped(get_peft_model(_jamba(), LoraConfig(**_peft_config(plan)))) == {f"{mixer}.out_proj"}
    blind = recommend_ranks(analysis, model_config={})  # negative control: planned at rank 2, PEFT refuses
    assert f"{mixer}.conv1d" in {m.name for m in blind.modules}
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        get_peft_model(_jamba(), LoraConfig(**_peft_config(blind)))


def test_extract_default_roles_refuse_naming_out_proj_and_the_roles_to_name(mamba_pair, tmp_path):
    from spectra.lora.extract import extract_adapter

    with pytest.raises(ConfigError, match=rf"select only {MIXER}.out_proj, backbone.layers.1.mixer.out_proj; PEFT "
                                          r"refuses .* Name other roles \(roles=other\), or save them whole "
                                          r"\(modules_to_save=out_proj\)"):
        extract_adapter(*mamba_pair, 2, tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()


def test_extract_leaves_them_out_and_peft_loads_and_merges_the_rest(mamba_pair, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from spectra.lora.extract import extract_adapter

    base, tuned = mamba_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(base, tuned, 2, tmp_path / "ad", roles=("o", "other"), progress=False)
    assert {m.name for m in result.modules} == {f"{MIXER}.in_proj", f"{MIXER}.x_proj"}
    assert {f"{MIXER}.out_proj", f"{MIXER}.conv1d"} <= set(result.left_out) and not result.complete
    note = next(n for n in result.notes if "PEFT refuses" in n)
    assert "2 changed matrices PEFT puts no LoRA on" in note and "modules_to_save=conv1d,out_proj" in note
    merged = PeftModel.from_pretrained(type(_mamba()).from_pretrained(base), str(tmp_path / "ad")).merge_and_unload()
    W0, W1 = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    got = merged.state_dict()
    for leaf in ("in_proj", "x_proj"):  # the planted rank 2: W_base + ΔW in float64
        key = f"{MIXER}.{leaf}.weight"
        assert torch.allclose(got[key].double(), W1[key].double(), atol=1e-5)
    for leaf in ("out_proj", "conv1d"):  # left out: the base's, bit for bit
        key = f"{MIXER}.{leaf}.weight"
        assert torch.equal(got[key], W0[key]) and not torch.equal(W0[key], W1[key])


def test_extract_does_not_advise_roles_that_would_take_them(mamba_pair, tmp_path):
    """out_proj outside the roles (other) is said among what PEFT refuses, not advised to add its role o (which
    would only leave it out again): saving it whole is the advice, and PEFT loads what it says."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from spectra.lora.extract import extract_adapter

    base, tuned = mamba_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(base, tuned, "full", tmp_path / "ad", roles=("other",), progress=False)
    notes = " ".join(result.notes)
    assert ("rank full is not lossless here: the adapter leaves out 2 changed matrices PEFT puts no LoRA on "
            f"({MIXER}.conv1d, {MIXER}.out_proj)") in notes
    assert "(o)" not in notes and "roles=other,o" not in notes
    with warnings.catch_warnings():  # the advice followed: PEFT saves them whole, and the merge is TUNED there
        warnings.simplefilter("ignore")
        extract_adapter(base, tuned, "full", tmp_path / "ad2", roles=("other",),
                        modules_to_save=("conv1d", "out_proj"), progress=False)
    merged = PeftModel.from_pretrained(type(_mamba()).from_pretrained(base), str(tmp_path / "ad2")).merge_and_unload()
    W1 = load_file(str(tuned / "model.safetensors"))
    for leaf in ("out_proj", "conv1d", "in_proj"):
        key = f"{MIXER}.{leaf}.weight"
        assert torch.allclose(merged.state_dict()[key], W1[key], atol=1e-5)


def test_extract_refuses_a_plan_naming_them(mamba_analysis, mamba_pair, tmp_path):
    from spectra.lora.extract import extract_adapter
    from spectra.ranks import recommend_ranks

    old = recommend_ranks(mamba_analysis, model_config={})  # a plan made without the rule
    with pytest.raises(ConfigError, match=r"the plan names .*conv1d.*out_proj: PEFT refuses .* Drop them from the plan"):
        extract_adapter(*mamba_pair, old, tmp_path / "ad", progress=False)


def test_train_leaves_them_out_or_refuses_before_loading(mamba_pair, tmp_path):
    from peft import get_peft_model

    from spectra.lora.train import TrainConfig, lora_config, refuse_before_loading

    base, _ = mamba_pair
    with pytest.raises(ConfigError, match=r"every LoRA target of the roles \(backbone.layers.0.mixer.out_proj, "
                                          r"backbone.layers.1.mixer.out_proj\) is one PEFT puts no LoRA on: .*the full "
                                          r"names of e.g. its in_proj, x_proj, dt_proj modules"):
        refuse_before_loading(base, TrainConfig(rank=2))  # the default roles take out_proj alone (role o)
    with pytest.raises(ConfigError, match=r"target_modules names backbone.layers.0.mixer.out_proj: PEFT refuses"):
        lora_config(_mamba(), TrainConfig(rank=2, target_modules=(f"{MIXER}.out_proj", f"{MIXER}.in_proj")),
                    task="causal_lm")
    config = lora_config(_mamba(), TrainConfig(rank=2, target_modules=(f"{MIXER}.in_proj",)), task="causal_lm")
    assert _wrapped(get_peft_model(_mamba(), config)) == {f"{MIXER}.in_proj"}  # control: PEFT takes the rest


def test_train_refuses_an_old_plan_naming_them(mamba_analysis, tmp_path):
    from spectra.lora.train import TrainConfig, lora_config
    from spectra.ranks import recommend_ranks, save_plan

    save_plan(recommend_ranks(mamba_analysis, model_config={}), tmp_path / "old.json", model_config={})
    with pytest.raises(ConfigError, match=r"the plan .*old.json names .*out_proj.*: PEFT refuses .* Drop them"):
        lora_config(_mamba(), TrainConfig(plan=str(tmp_path / "old.json")), task="causal_lm")
    save_plan(recommend_ranks(mamba_analysis), tmp_path / "new.json")  # control: the plan recommend makes now
    lora_config(_mamba(), TrainConfig(plan=str(tmp_path / "new.json")), task="causal_lm")


def test_verify_notes_an_adapter_peft_cannot_load_and_refuses_to_evaluate_it(mamba_pair, tmp_path):
    """An adapter with a LoRA on out_proj (another tool's, or an older extract's): its factors are measured, with a
    note; evaluating it (PeftModel.from_pretrained) is refused before any model is loaded."""
    from safetensors.torch import load_file, save_file

    from spectra.lora.extract import extract_adapter
    from spectra.lora.verify import verify_adapter

    base, tuned = mamba_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_adapter(base, tuned, 2, tmp_path / "ad", roles=("other",), progress=False)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    result = verify_adapter(base, tuned, tmp_path / "ad", progress=False)
    assert not any("PEFT refuses" in n for n in result.notes)  # control: a loadable adapter has no such note
    prefix = f"base_model.model.{MIXER}.out_proj"
    state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = torch.zeros(2, 32), torch.zeros(16, 2)
    config["target_modules"] = [*config["target_modules"], f"{MIXER}.out_proj"]
    save_file(state, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    result = verify_adapter(base, tuned, tmp_path / "ad", progress=False)
    assert any(n.startswith(f"the adapter holds a LoRA on {MIXER}.out_proj: PEFT refuses") for n in result.notes)
    assert f"{MIXER}.out_proj" in {r["name"] for r in result.modules}  # measured all the same
    with pytest.raises(ConfigError, match=r"holds a LoRA on .*out_proj, and PEFT refuses .* cannot be loaded"):
        verify_adapter(base, tuned, tmp_path / "ad", eval_data=tmp_path / "none.txt", progress=False)
