"""``--modules-to-save`` of a module that holds its tensors through children: PEFT's ModulesToSaveWrapper copies the
whole module and loads every tensor of its ``state_dict`` from the adapter (``base_model.model.classifier.dense.
weight`` …). Extract matched only modules holding tensors themselves: RoBERTa's ``classifier`` (a
RobertaClassificationHead of ``dense`` and ``out_proj``) and BART's ``classification_head`` were refused as "no
module named", and OWL-ViT's ``owlvit`` (``logit_scale`` and both towers) saved ``logit_scale`` alone, so PEFT
failed to load the adapter (KeyError). Every tensor under the module is saved now, from TUNED. Referees: PEFT's own
adapter state dict for the adapter's config (get_peft_model + get_peft_model_state_dict) names the same keys, and
PEFT's float64 load and merge_and_unload gives back every tensor of TUNED (1e-6). Tiny transformers models built
from config, on the 2⁻¹² grid."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.lora.test_extract_left_out import _missed
from tests.lora.test_extract_left_out_scalars import _tiny_owlvit
from tests.models import GRID, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, num_labels=3)


def _roberta():
    import transformers as tf

    return on_grid(tf.RobertaForSequenceClassification, tf.RobertaConfig(**_SMALL))


def _bart():
    import transformers as tf

    return on_grid(tf.BartForSequenceClassification, tf.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40, num_labels=3))


def _peft_keys(base, adapter_dir) -> set[str]:
    """The keys PEFT itself saves for the adapter's config on `base`: get_peft_model, then its adapter state dict."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig.from_pretrained(str(adapter_dir)))
        return set(get_peft_model_state_dict(model))


def _saved(adapter_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if ".lora_" not in k}


def _check(base, tuned, adapter_dir, module: str):
    """The adapter holds every tensor of `module` with TUNED's values, under PEFT's own keys, and PEFT's float64
    merge onto `base` gives back every tensor of TUNED."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert set(tensors) == _peft_keys(base, adapter_dir)
    expected = {f"base_model.model.{module}.{n}": v for n, v in tuned.get_submodule(module).state_dict().items()}
    saved = _saved(adapter_dir)
    assert set(saved) == set(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    assert _missed(base, tuned, adapter_dir) == set()


def test_roberta_classifier_saves_dense_and_out_proj(tmp_path):
    """It was refused ("no module named 'classifier'"); now its four tensors are saved, the adapter loads as PEFT's
    SEQ_CLS model and merges to TUNED. Negative control: the head moved, so the base's head is no match."""
    base = _roberta()
    tuned = perturbed(base, names=("query", "classifier"))
    with torch.no_grad():
        tuned.classifier.out_proj.bias += 4 * GRID
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("classifier",),
                             progress=False)
    assert result.modules_to_save == ["classifier"] and result.config["modules_to_save"] == ["classifier"]
    assert result.config["task_type"] == "SEQ_CLS" and result.complete and result.notes == []
    assert set(_saved(tmp_path / "ad")) == {f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj")
                                            for p in ("weight", "bias")}
    _check(base, tuned, tmp_path / "ad", "classifier")
    assert not torch.equal(base.classifier.out_proj.bias, tuned.classifier.out_proj.bias)


def test_roberta_classifier_only_in_tuned(tmp_path):
    """A bare RobertaModel base and a classifier fine-tuned from it (its head only in TUNED): the adapter is for
    TUNED's class, holds the whole head, and the merge onto the classifier built from the base (a fresh head, as
    from_pretrained gives it) is TUNED."""
    import transformers as tf

    bare = on_grid(tf.RobertaModel, tf.RobertaConfig(**_SMALL), seed=1)
    start = _roberta()
    start.roberta.load_state_dict(bare.state_dict(), strict=False)  # its pooler is the bare model's alone
    tuned = perturbed(start, names=("query", "classifier"))
    b, t = save(bare, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("classifier",),
                             progress=False)
    assert result.model_class == "RobertaForSequenceClassification"
    assert result.only_in_tuned == [] and result.complete
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = tf.RobertaForSequenceClassification.from_pretrained(b).eval()  # a newly initialised head
    assert not torch.equal(loaded.classifier.dense.weight, tuned.classifier.dense.weight)
    _check(loaded, tuned, tmp_path / "ad", "classifier")


def test_bart_classification_head(tmp_path):
    base = _bart()
    tuned = perturbed(base, names=("q_proj", "classification_head"))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("classification_head",),
                             progress=False)
    assert result.modules_to_save == ["classification_head"] and result.complete
    _check(base, tuned, tmp_path / "ad", "classification_head")


def test_a_lora_inside_a_saved_module_is_refused_before_any_work(tmp_path, monkeypatch):
    """BART's classification_head holds out_proj, of role o: PEFT does not wrap a LoRA inside a module it saves, so
    the adapter would not load as written. Refused before any SVD, naming the module, the LoRA and the options."""
    import spectra.lora.extract as extract

    base = _bart()
    tuned = perturbed(base, names=("q_proj", "classification_head"))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")

    def no_work(*args, **kwargs):
        raise AssertionError("factorized before refusing")

    monkeypatch.setattr(extract, "_factorize", no_work)
    with pytest.raises(ConfigError, match=r"saves classification_head whole.*adapt classification_head\.out_proj "
                                          r"in it with a LoRA.*--roles.*'classification_head' out of "
                                          r"--modules-to-save"):
        extract_adapter(b, t, "full", tmp_path / "ad", modules_to_save=("classification_head",), progress=False)
    assert not (tmp_path / "ad").exists()


def test_owlvit_saves_logit_scale_and_both_towers(tmp_path):
    """`owlvit` holds logit_scale itself and both towers as children: it saved logit_scale alone and PEFT failed to
    load the adapter (KeyError). A plan of box_head's matrices (its LoRAs lie outside owlvit) with owlvit saved
    whole now merges to TUNED: logit_scale, the towers' q_proj and box_head moved."""
    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan

    base = _tiny_owlvit()
    tuned = perturbed(base, names=("q_proj", "box_head"))
    with torch.no_grad():
        tuned.owlvit.logit_scale += 0.5  # on the grid: exact in float32
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("other",), uniform=True, noise=False))
    heads = tuple(dataclasses.replace(m, rank=min(m.shape)) for m in plan.modules if m.name.startswith("box_head."))
    assert {m.name for m in heads} == {"box_head.dense0", "box_head.dense1", "box_head.dense2"}
    save_plan(dataclasses.replace(plan, modules=heads), tmp_path / "plan.json")
    result = extract_adapter(b, t, tmp_path / "plan.json", tmp_path / "ad", modules_to_save=("owlvit",),
                             progress=False)
    assert result.modules_to_save == ["owlvit"]
    saved = _saved(tmp_path / "ad")
    assert "base_model.model.owlvit.logit_scale" in saved
    assert "base_model.model.owlvit.text_model.encoder.layers.0.self_attn.q_proj.weight" in saved
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(tmp_path / "ad")).merge_and_unload()
    state = merged.state_dict()
    for name, value in tuned.owlvit.state_dict().items():
        assert torch.allclose(state[f"owlvit.{name}"], value.double(), rtol=0, atol=1e-6), name
    assert set(_saved(tmp_path / "ad")) == {f"base_model.model.owlvit.{n}" for n in tuned.owlvit.state_dict()}
    assert set(load_file(tmp_path / "ad" / "adapter_model.safetensors")) == _peft_keys(base, tmp_path / "ad")
