"""PEFT wraps every module whose name *ends with* a ``modules_to_save`` entry as a plain string (``key.endswith``,
PEFT 0.21's ``_set_trainable``), not at a dot. Extract saved the modules it matched at a dot only, so an adapter
saving OWL-ViT's top-level ``layer_norm`` failed to load: PEFT also wrapped ``owlvit.text_model.final_layer_norm``
and expected its tensors (``KeyError: 'base_model.model.owlvit.text_model.final_layer_norm.weight'``). Extract now
saves every module PEFT wraps, from TUNED. Referees: PEFT's own wrapping (get_peft_model) and its float64 load and
merge; a Llama ``norm`` adapter is written as before."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.saved_modules import peft_wrapped
from tests.lora.test_extract import perturbed
from tests.lora.test_extract_left_out import _missed
from tests.lora.test_extract_left_out_scalars import _tiny_owlvit
from tests.models import build_model, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tiny_distilbert():
    import transformers as tf

    return on_grid(tf.DistilBertForSequenceClassification,
                   tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=24,
                                       max_position_embeddings=16, num_labels=3))


def _wrapped_by_peft(model, entries, target, task=None) -> set[str]:
    """The modules PEFT's get_peft_model wraps as modules to save, by the model's names."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=[target], task_type=task,
                                                                     modules_to_save=list(entries)))
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(m, ModulesToSaveWrapper)}


@pytest.mark.parametrize("family, entries, target, task", [
    ("owlvit", ["layer_norm"], "q_proj", None),
    ("owlvit", ["layer_norm", "box_head.dense2"], "q_proj", None),
    ("llama", ["model.norm"], "q_proj", "CAUSAL_LM"),
    ("llama", ["norm"], "q_proj", "CAUSAL_LM"),  # every RMSNorm: input_layernorm, …, model.norm
    ("distilbert", ["classifier"], "q_lin", "SEQ_CLS"),  # PEFT adds classifier and score; pre_classifier ends so
])
def test_the_rule_is_peft_s(family, entries, target, task):
    model = {"owlvit": _tiny_owlvit, "distilbert": _tiny_distilbert}.get(family, lambda: build_model(family))()
    names = [n for n, _ in model.named_modules()]
    assert set(peft_wrapped(entries, names, task=task)) == _wrapped_by_peft(model, entries, target, task)


def test_owlvit_layer_norm_loads_and_merges_to_tuned(tmp_path):
    """It failed to load with the KeyError; now final_layer_norm is saved too, with TUNED's (changed) values."""
    from peft import PeftModel

    base = _tiny_owlvit()
    tuned = perturbed(base, names=("q_proj",))
    with torch.no_grad():
        tuned.layer_norm.weight += 0.25  # on the grid: exact in float32
        tuned.owlvit.text_model.final_layer_norm.bias += 0.5
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with pytest.warns(UserWarning, match="PEFT also wraps owlvit.text_model.final_layer_norm"):
        result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("layer_norm",),
                                 progress=False)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["layer_norm", "owlvit.text_model.final_layer_norm"]
    assert result.modules_to_save == ["layer_norm", "owlvit.text_model.final_layer_norm"]
    assert result.complete and result.left_out_vectors == []  # the changed final_layer_norm is carried
    (note,) = result.notes
    assert note == ("modules_to_save: PEFT also wraps owlvit.text_model.final_layer_norm on loading (its name ends "
                    "with 'layer_norm': PEFT matches modules_to_save as the end of a name, not at a dot), so the "
                    "adapter saves it whole too, from TUNED")
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for name in ("layer_norm.weight", "layer_norm.bias", "owlvit.text_model.final_layer_norm.weight",
                 "owlvit.text_model.final_layer_norm.bias"):
        assert torch.equal(tensors[f"base_model.model.{name}"], tuned.state_dict()[name]), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(tmp_path / "ad")).merge_and_unload()
    state = merged.state_dict()
    for name in ("layer_norm.weight", "layer_norm.bias", "owlvit.text_model.final_layer_norm.weight",
                 "owlvit.text_model.final_layer_norm.bias"):
        assert torch.allclose(state[name], tuned.state_dict()[name].double(), rtol=0, atol=1e-6), name
    assert _missed(base, tuned, tmp_path / "ad") == set()


def test_distilbert_classifier_saves_pre_classifier(tmp_path):
    """SEQ_CLS: PEFT adds "classifier" itself, and "pre_classifier" ends with it: saved too, so the adapter loads
    (PEFT's task model) and merges to TUNED's head."""
    base = _tiny_distilbert()
    tuned = perturbed(base, names=("q_lin", "classifier"))  # q_lin, pre_classifier and classifier moved
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with pytest.warns(UserWarning, match="PEFT also wraps pre_classifier"):
        result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("classifier",),
                                 progress=False)
    assert result.config["task_type"] == "SEQ_CLS" and result.modules_to_save == ["classifier", "pre_classifier"]
    assert result.left_out == []
    assert _missed(base, tuned, tmp_path / "ad") == set()


def test_a_lora_on_a_module_peft_would_also_wrap_is_refused(tmp_path):
    from spectra.lora.saved_modules import _also_wrapped
    from spectra.checkpoints.pairing import Pairing, PairingOptions

    base = _tiny_distilbert()
    tuned = perturbed(base, names=("classifier",))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    pairing = Pairing(b, t, PairingOptions(split_fused=False, vectors=True))
    with pytest.raises(ConfigError, match=r"PEFT also wraps pre_classifier \(its name ends with 'classifier'.*"
                                          r"also adapts with a LoRA \(pre_classifier\)"):
        _also_wrapped({"classifier": "classifier"}, pairing, base, "DistilBertForSequenceClassification",
                      {"pre_classifier", "distilbert.transformer.layer.0.attention.q_lin"})


@pytest.mark.parametrize("rank", [2, "full"])
def test_llama_norm_is_written_as_before(tmp_path, rank):
    """Control: `norm` is model.norm (no other module's name ends with it): the adapter holds its LoRAs and that one
    tensor, as HEAD wrote it (checked byte for byte against HEAD's extract when this was fixed), and no note."""
    base = build_model("llama")
    tuned = perturbed(base, select=lambda n, p: True)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = extract_adapter(b, t, rank, tmp_path / "ad", modules_to_save=("norm",), progress=False)
    assert result.modules_to_save == ["model.norm"] and result.config["modules_to_save"] == ["model.norm"]
    assert not any("also wraps" in n for n in result.notes)
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k for k in tensors if ".lora_" not in k} == {"base_model.model.model.norm.weight"}
    assert torch.equal(tensors["base_model.model.model.norm.weight"], tuned.model.norm.weight)
    assert {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k} == {
        f"base_model.model.{m}" for m in result.config["target_modules"]}


def test_the_left_out_note_s_advice_loads(tmp_path):
    """The vector note advises modules_to_save by leaf names (final_layer_norm, layer_norm); the adapter extract
    writes on that advice loads and gives back every tensor (it had failed to load with `layer_norm` in it)."""
    from tests.lora.test_extract_left_out import _advice

    base = _tiny_owlvit()
    tuned = perturbed(base, names=("q_proj",))
    with torch.no_grad():
        tuned.layer_norm.weight += 0.25
        tuned.owlvit.text_model.final_layer_norm.bias += 0.5
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), progress=False)
    advice = _advice(result.notes, "modules_to_save")
    assert set(advice) == {"final_layer_norm", "layer_norm"}, result.notes
    advised = extract_adapter(b, t, "full", tmp_path / "advised", roles=("q",), modules_to_save=advice,
                              progress=False)  # no note: PEFT wraps what it names
    assert advised.complete and advised.modules_to_save == ["layer_norm", "owlvit.text_model.final_layer_norm"]
    assert _missed(base, tuned, tmp_path / "advised") == set()
    with pytest.warns(UserWarning, match="also wraps"):  # the one PEFT reads wider, saved alone: it still loads
        extract_adapter(b, t, "full", tmp_path / "ln", roles=("q",), modules_to_save=("layer_norm",), progress=False)
    assert _missed(base, tuned, tmp_path / "ln") == set()
