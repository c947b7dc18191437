"""Training role targets of MoE models whose LoRA config PEFT rewrites when it wraps the model.

PEFT 0.21 runs ``convert_peft_config_for_transformers`` in ``get_peft_model`` (and ``PeftModel.from_pretrained``):
for a model of the ``qwen2_moe`` or ``mixtral`` conversion family every ``target_modules`` entry ending in
``.gate_proj``, ``.up_proj`` or ``.down_proj`` becomes the bare fused expert parameter, so ``spectra train`` with its
default roles trained every layer's experts instead of a dense layer's MLP (Qwen3-MoE's ``mlp_only_layers``,
DeepSeek-V3's ``first_k_dense_replace``) and a shared expert, and those got no adapter. The referees here are PEFT's
own wrapping (which modules and parameters carry a LoRA), PEFT's load and merge of the saved adapter, and the loss
of the merged model computed example by example with transformers.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, lora_config, train_adapter
from tests.lora.conftest import random_text
from tests.models import peft_wrapped as _wrapped, save, tiny_moe as _tiny

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]
FAMILIES = ("qwen3_moe", "deepseek_v3", "mixtral")
FAST = dict(rank=2, lr=1e-2, max_length=16, batch_size=8, max_steps=4)


# What "every block linear" means on these models, written out by name rather than asked of spectra: attention's
# q, k, v, o, and DeepSeek-V3's multi-head latent attention (o_proj beside the factors q_a_proj and q_b_proj, which
# compute the query, kv_a_proj_with_mqa and kv_b_proj, which compute keys and values together: a LoRA on either
# changes both), each dense MLP's and shared expert's gate, up and down weights, and each routed layer's fused experts.
_HOLDS = {"q_proj": {"q"}, "k_proj": {"k"}, "v_proj": {"v"}, "o_proj": {"o"}, "q_a_proj": {"q"}, "q_b_proj": {"q"},
          "kv_a_proj_with_mqa": {"k", "v"}, "kv_b_proj": {"k", "v"}}
_ATTENTION = re.compile(rf"self_attn\.({'|'.join(_HOLDS)})$")
_DENSE = re.compile(r"\.mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight$")
_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up|down)_proj$")


def _intended(model, roles=("q", "k", "v", "o", "gate", "up", "down")) -> set[str]:
    """Module names (attention) and parameter names (dense MLP weights, fused experts) of `roles`."""
    fused = {"gate": "gate_up", "up": "gate_up", "down": "down"}
    attention = {n for n, _ in model.named_modules() if (m := _ATTENTION.search(n)) and _HOLDS[m.group(1)] & set(roles)}
    dense = {n for n, _ in model.named_parameters() if (m := _DENSE.search(n)) and m.group(2) in roles}
    experts = {n for n, _ in model.named_parameters()
               if (m := _EXPERTS.search(n)) and m.group(1) in {fused[r] for r in roles if r in fused}}
    return attention | dense | experts


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_wraps_the_dense_mlps_the_shared_expert_and_every_expert(family):
    """spectra's config, through PEFT's own get_peft_model: a LoRA on exactly the intended modules and parameters,
    for every block role and for --roles gate / down alone. Negative control: the config spectra wrote before (every
    block linear in target_modules) wraps no dense MLP or shared expert and no attention is lost, yet every expert
    is wrapped: PEFT's rewrite; check_peft_conversion refuses it."""
    from peft import LoraConfig, get_peft_model

    from spectra.ranks import check_peft_conversion

    model = _tiny(family)
    for roles in (None, ("gate",), ("down",), ("k", "o")):
        notes: list[str] = []
        config = lora_config(model, TrainConfig(rank=2, roles=roles), task="causal_lm", notes=notes)
        wrapped = _wrapped(get_peft_model(copy.deepcopy(model), config))
        assert set(wrapped) == _intended(model, roles or ("q", "k", "v", "o", "gate", "up", "down")), roles
        for name, layer in wrapped.items():  # one rank r, scale 2, an expert's [gate; up] included
            assert (layer.r["default"], layer.scaling["default"]) == (2, 2.0), (roles, name)
        dense = [n for n in wrapped if _DENSE.search(n)]
        assert any("through their weights" in n and f"{len(dense)} module(s)" in n for n in notes) == bool(dense)
        assert any("adapted as fused parameters" in n for n in notes) == any(_EXPERTS.search(n) for n in wrapped)
        fused = [n for n in notes if "adapted as fused parameters" in n]
        # the note names the parameter holding gate and up as the model calls it, no other model's (JetMoE's)
        assert all("JetMoE" not in n for n in fused), fused
        assert all(("and gate_up_proj holds gate and up together" in n) == (roles != ("down",)) for n in fused)
    if family == "mixtral":  # no dense MLP to lose
        return
    old = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
           and (_ATTENTION.search(n) or _DENSE.search(n + ".weight"))]
    with warnings.catch_warnings():  # PEFT's rank_pattern for the gate_up_proj its rewrite made matches no module
        warnings.simplefilter("ignore", RuntimeWarning)
        wrapped = _wrapped(get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=old)))
    dense = {n for n, _ in model.named_parameters() if _DENSE.search(n)}
    assert dense and not dense & set(wrapped)  # the dense MLP and shared expert: no LoRA
    assert {n for n in _intended(model) if _EXPERTS.search(n)} <= set(wrapped)  # every expert: one, unasked
    with pytest.raises(ConfigError, match=r"PEFT rewrites this config's targets .* not adapt model\.layers\.0\.mlp"):
        check_peft_conversion({"target_modules": old}, model)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_data")
    return random_text(root / "train.txt", chars=16 * 8 * 6, seed=2), random_text(root / "eval.txt", chars=16 * 8,
                                                                                   seed=3)


def _loss(model, held) -> float:
    """Mean next-token cross-entropy over every held-out token, one example at a time (no padding), by
    transformers' own loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in held.ids:
            x = torch.tensor([ids])
            total += float(model(input_ids=x, labels=x).loss) * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("family", FAMILIES)
def test_every_intended_adapter_trains_and_peft_merges_to_the_evaluated_loss(family, data, tmp_path):
    """Trained a few steps: every intended target's lora_B has left 0 (as PEFT reads the saved adapter back), and
    PEFT's merge of that adapter gives the loss spectra's evaluate reported; the dense MLP's weight and the experts
    change in the merge (negative control: the base's loss is not the trained one)."""
    import transformers as tf
    from peft import PeftModel

    from spectra.lora.data import prepare_data

    train, held_file = data
    base = save(_tiny(family), tmp_path / "base", "safetensors")
    result = train_adapter(base, train, TrainConfig(**FAST), tmp_path / "ad", eval_data=held_file, progress=False)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    summary = json.loads((tmp_path / "ad" / "spectra_train.json").read_text())
    assert any("adapted as fused parameters" in n for n in summary["notes"])
    assert any("through their weights" in n for n in summary["notes"]) == (family != "mixtral")
    assert not any(_DENSE.search(t + ".weight") for t in saved["target_modules"])

    reference = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / "ad")).eval()
    wrapped = _wrapped(peft_model)
    assert set(wrapped) == _intended(reference)
    unmoved = [n for n, layer in wrapped.items() if not layer.lora_B["default"].weight.abs().max() > 0]
    assert not unmoved
    experts = reference.get_parameter(next(n for n in wrapped if n.endswith("experts.gate_up_proj")))
    assert [tuple(layer.lora_A["default"].weight.shape) for n, layer in wrapped.items()
            if n.endswith("experts.gate_up_proj")][0] == (2 * experts.shape[0], 32)  # (r · experts, hidden)
    merged = peft_model.merge_and_unload()
    _, _, held, _, _ = prepare_data(base, train, eval_data=held_file, max_length=16)
    assert result.final_eval["loss"] == pytest.approx(_loss(merged, held), rel=1e-5)
    assert _loss(reference, held) != pytest.approx(result.final_eval["loss"], rel=1e-4)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, reference.get_parameter(n))}
    assert {n for n in _intended(reference) if not _ATTENTION.search(n)} <= changed


METHODS = [({"method": "dora"}, "no DoRA"), ({"method": "qlora"}, "QLoRA's 4-bit"), ({"method": "qdora"}, "QDoRA"),
           ({"lora_dropout": 0.1}, "no lora_dropout 0.1")]


@pytest.mark.parametrize(("option", "says"), METHODS)
def test_dora_qlora_and_dropout_on_parameter_targets_asked_for_are_refused_before_loading(option, says, data,
                                                                                         tmp_path, monkeypatch):
    """PEFT's LoRA on a parameter takes none of them (its ParamWrapper raises on DoRA and dropout; a 4-bit weight
    is no float matrix). Roles that ask for such targets are refused from config.json, before the data and weights
    are read, naming the model, the target and --roles q,k,v,o; so are target_modules naming a dense MLP, on the
    loaded model (lora_config, as the benchmark calls it)."""
    import spectra.lora.train as train_module

    base = save(_tiny("qwen3_moe"), tmp_path / "base", "safetensors")

    def no_loading(*args, **kwargs):
        raise AssertionError("data or weights read before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "load_model", no_loading)
        patch.setattr(train_module, "prepare_data", no_loading)
        with pytest.raises(ConfigError, match=rf"Qwen3MoeForCausalLM: spectra adapts model\.layers\.0\.mlp\.gate_proj"
                                              rf"\.weight through PEFT's target_parameters .*{says}.*--roles q,k,v,o"):
            train_adapter(base, data[0], TrainConfig(**FAST | option, roles=("gate", "up", "down")), tmp_path / "ad",
                          progress=False)
    assert not (tmp_path / "ad").exists()
    with pytest.raises(ConfigError, match=rf"Mixtral.*adapts model\.layers\.0\.mlp\.experts\.gate_up_proj .*{says}"):
        lora_config(_tiny("mixtral"), TrainConfig(rank=2, roles=("up",), **option), task="causal_lm")
    with pytest.raises(ConfigError, match=rf"adapts model\.layers\.0\.mlp\.down_proj\.weight .*{says}"):
        lora_config(_tiny("qwen3_moe"), TrainConfig(rank=2, target_modules=("model.layers.0.mlp.down_proj",), **option),
                    task="causal_lm")


@pytest.mark.parametrize(("option", "says"), METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_roles_with_dora_qlora_or_dropout_leave_the_parameter_targets_out_and_say_so(option, says,
                                                                                                  family):
    """Every block linear, with a method that cannot adapt a parameter: the modules it can (attention), wrapped by
    PEFT exactly, and a note naming what is left out; no MLP or expert gets an adapter."""
    from peft import get_peft_model

    model = _tiny(family)
    notes: list[str] = []
    config = lora_config(model, TrainConfig(rank=2, **option), task="causal_lm", notes=notes)
    assert not config.target_parameters
    left_out = [n for n in notes if "are not adapted" in n]
    assert len(left_out) == 1 and says.removeprefix("no ") in left_out[0] and type(model).__name__ in left_out[0]
    assert not any("adapted as fused parameters" in n or "through their weights" in n for n in notes)
    if option.get("method", "lora") in ("lora", "dora"):  # 4-bit needs a quantised model to wrap
        wrapped = _wrapped(get_peft_model(copy.deepcopy(model), config))
        assert set(wrapped) == _intended(model, ("q", "k", "v", "o"))


def test_target_modules_naming_a_dense_mlp_adapt_it_through_its_weight():
    """target_modules (the library's option) of a Qwen3-MoE's dense MLP: that MLP's weight and the attention named,
    and no expert (PEFT's rewrite would have adapted the experts instead)."""
    from peft import get_peft_model

    model = _tiny("qwen3_moe")
    names = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj")
    config = lora_config(model, TrainConfig(rank=2, target_modules=names), task="causal_lm")
    wrapped = _wrapped(get_peft_model(copy.deepcopy(model), config))
    assert set(wrapped) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj"}


def test_glm4v_moe_stacks_pick_the_tower_mlp_or_the_language_experts_as_asked():
    """GLM-4.5V's vision MLP is gate_proj/up_proj/down_proj, which PEFT turned into the language model's fused
    experts. --stacks vision --roles gate,up,down: PEFT wraps the tower's MLP weights alone; the default stacks
    (text's): the language model's dense MLP, shared expert and experts, no tower module."""
    from peft import get_peft_model

    model = _tiny("glm4v_moe")
    mlp = re.compile(r"\.(gate|up|down)_proj\.weight$|\.experts\.(gate_up|down)_proj$")
    tower = {n for n, _ in model.named_parameters()  # the tower's blocks; visual.merger is the projector stack
             if mlp.search(n) and ".visual.blocks." in n}
    language = {n for n, _ in model.named_parameters() if mlp.search(n) and ".language_model." in n}
    assert tower and any(".merger." in n for n, _ in model.named_parameters() if mlp.search(n))
    assert {n for n in language if ".experts." in n} and {n for n in language if "shared" in n}
    roles = ("gate", "up", "down")
    for stacks, expected in ((("vision",), tower), (None, language)):
        config = lora_config(model, TrainConfig(rank=2, roles=roles, stacks=stacks), task="causal_lm")
        assert set(_wrapped(get_peft_model(copy.deepcopy(model), config))) == expected, stacks


@pytest.mark.parametrize(("roles", "gate_up"), [(("q",), False), (("gate",), True), (None, True)])
def test_jetmoe_note_says_gate_and_up_only_of_its_mlp_experts(roles, gate_up):
    """JetMoE's attention experts (self_attention.experts.input_linear) hold queries, its MLP's (mlp.input_linear)
    gate and up: the fused-parameter note says "holds gate and up together" only where mlp.input_linear is adapted
    (review: --roles q said it of the attention experts)."""
    from spectra.checkpoints.adapted import TargetSelection, peft_targets
    from tests.checkpoints.test_architectures_gemma4_jetmoe import tiny_jetmoe

    notes: list[str] = []
    _, parameters = peft_targets(tiny_jetmoe(), TargetSelection(roles=roles), notes=notes)
    assert parameters and any("adapted as fused parameters" in n for n in notes)
    said = [n for n in notes if "holds gate and up together" in n]
    assert bool(said) == gate_up, notes
    assert all("mlp.input_linear holds" in n for n in said)
