"""Provenance notes: a PEFT adapter analysed against another model than the one its adapter_config.json records, and
two checkpoints whose config.json files name different model types.

The adapters are PEFT's own (get_peft_model + save_pretrained) on a tiny Llama loaded with from_pretrained, so
base_model_name_or_path and auto_mapping are what PEFT writes; the wrong base is a tiny Mistral of the same shapes
(the case the shape check cannot catch).
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from spectra.checkpoints.pairing import Pairing
from spectra.errors import PairingError
from tests.models import build_model, on_grid, random_adapter, save

NOTE = "may not be of BASE"
ARCHITECTURES = "different architectures"


def tiny_mistral(seed: int = 0):
    """A Mistral with the tiny Llama's shapes (tests.models.tiny_config('llama')): the same tensor names too."""
    import transformers as tf

    config = tf.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return on_grid(tf.MistralForCausalLM, config, seed=seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama base, a DoRA and a LoRA adapter trained on it (as loaded from its folder), a Mistral and a Llama of
    other weights, all with the same tensor names and shapes."""
    import transformers as tf

    root = tmp_path_factory.mktemp("recorded")
    llama = save(build_model("llama"), root / "llama", "safetensors")
    loaded = tf.LlamaForCausalLM.from_pretrained(llama)  # name_or_path: the folder, which PEFT records
    random_adapter(loaded, root / "dora", r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"])
    random_adapter(loaded, root / "lora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return {"root": root, "llama": llama, "dora": root / "dora", "lora": root / "lora",
            "mistral": save(tiny_mistral(), root / "mistral", "safetensors"),
            "llama2": save(build_model("llama", seed=1), root / "llama2", "safetensors")}


def recorded(adapter) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


def rewritten(models, tmp_path, name: str, **changes):
    """A copy of adapter ``name`` whose adapter_config.json has ``changes`` (None: the key removed)."""
    copy = shutil.copytree(models[name], tmp_path / f"{name}-copy")
    config = recorded(copy)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def provenance(base, tuned) -> list[str]:
    return [n for n in Pairing(base, tuned).notes if NOTE in n or ARCHITECTURES in n]


def test_peft_records_the_base(models):
    """What the checks read is what PEFT writes: the folder the model was loaded from, and its class."""
    config = recorded(models["dora"])
    assert config["base_model_name_or_path"] == str(models["llama"])
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"


def test_dora_adapter_on_another_architecture_is_noted(models):
    notes = provenance(models["mistral"], models["dora"])
    assert len(notes) == 1, notes
    note = notes[0]
    # names both: the recorded base (path, class) and BASE (path, model type)
    assert str(models["llama"]) in note and str(models["mistral"]) in note
    assert "LlamaForCausalLM" in note and "'mistral'" in note
    assert "DoRA" in note  # and says why the numbers depend on it
    pairing = Pairing(models["mistral"], models["dora"])
    assert pairing.notes[0] == note == pairing.provenance  # first, where the CLI shows it
    assert Pairing(models["llama"], models["dora"]).provenance is None


def test_adapter_on_its_own_base_is_quiet(models):
    """Negative control: the folder it was trained on, and a copy of it (same fingerprint, another path)."""
    assert provenance(models["llama"], models["dora"]) == []
    assert provenance(models["llama"], models["lora"]) == []
    copy = shutil.copytree(models["llama"], models["root"] / "llama-copy", dirs_exist_ok=True)
    assert provenance(copy, models["dora"]) == []
    assert provenance(copy / "model.safetensors", models["dora"]) == []  # BASE as the file in the folder


def test_same_class_other_weights_is_noted(models):
    """The recorded folder exists and holds other weights than BASE: same class, so only the path says so."""
    (note,) = provenance(models["llama2"], models["lora"])
    assert str(models["llama"]) in note and str(models["llama2"]) in note and "fingerprint" in note
    assert "LlamaForCausalLM" not in note  # the class agrees: not blamed
    assert "does not depend on the base" in note  # a LoRA's B@A: only the measures against W change


def test_moved_base_falls_back_to_the_class(models, tmp_path):
    """A recorded folder that no longer exists (people move folders) is no evidence; the recorded class still is."""
    moved = rewritten(models, tmp_path, "dora", base_model_name_or_path=str(tmp_path / "gone" / "llama"))
    assert provenance(models["llama2"], moved) == []  # a Llama: agrees
    (note,) = provenance(models["mistral"], moved)
    assert "LlamaForCausalLM" in note and "'mistral'" in note and str(models["mistral"]) in note


def test_adapter_that_records_nothing_is_quiet(models, tmp_path):
    bare = rewritten(models, tmp_path, "dora", base_model_name_or_path=None, auto_mapping=None)
    assert provenance(models["mistral"], bare) == []
    # with a task_type PEFT records no class: the path alone decides
    no_class = rewritten(models, tmp_path, "lora", auto_mapping=None)
    assert provenance(models["llama"], no_class) == []
    assert len(provenance(models["mistral"], no_class)) == 1


def hub_cache(root, repo: str, model_dir):
    """``model_dir`` as the hub cache holds ``repo`` at a commit (what ``hf download`` leaves)."""
    commit = "0" * 40
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo_dir / "snapshots" / commit)


def test_hub_ids_are_compared(models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    hub_cache(cache, "org/tiny-llama", models["llama"])
    hub_cache(cache, "org/tiny-llama-other", models["llama2"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    on_hub = rewritten(models, tmp_path, "lora", base_model_name_or_path="org/tiny-llama")
    assert provenance("org/tiny-llama", on_hub) == []
    (note,) = provenance("org/tiny-llama-other", on_hub)
    assert "org/tiny-llama" in note and "hub model org/tiny-llama-other" in note
    # BASE as the cache's folder is the same repository
    snapshot = next((cache / "models--org--tiny-llama-other" / "snapshots").iterdir())
    assert len(provenance(snapshot, on_hub)) == 1
    assert provenance(next((cache / "models--org--tiny-llama" / "snapshots").iterdir()), on_hub) == []
    # a hub id against a local folder outside the cache: the class decides (Llama: quiet)
    assert provenance(models["llama2"], on_hub) == []


def test_different_model_types_are_noted(models, tmp_path):
    qwen2 = save(build_model("qwen2"), tmp_path / "qwen2", "safetensors")
    (note,) = provenance(models["mistral"], qwen2)
    assert str(models["mistral"] / "config.json") in note and str(qwen2 / "config.json") in note
    assert "'mistral' (MistralForCausalLM)" in note and "'qwen2' (Qwen2ForCausalLM)" in note
    # negative controls: two Llamas; a Llama with another head (a fine-tune for classification keeps its model type)
    assert provenance(models["llama"], models["llama2"]) == []
    import transformers as tf

    from tests.models import tiny_config

    classifier = save(on_grid(tf.LlamaForSequenceClassification, tiny_config("llama")), tmp_path / "cls",
                      "safetensors")
    assert provenance(models["llama"], classifier) == []


def test_no_shared_names_error_names_the_model_types(models, tmp_path):
    gpt2 = save(build_model("gpt2"), tmp_path / "gpt2", "safetensors")
    with pytest.raises(PairingError, match=r"'mistral' \(MistralForCausalLM\).*'gpt2' \(GPT2LMHeadModel\)"):
        Pairing(models["mistral"], gpt2)


def test_notes_reach_the_cli_and_analysis_json(models, tmp_path):
    from spectra.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["analyze", str(models["mistral"]), str(models["dora"]), "-o", str(out),
                                      "--no-cache"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert NOTE in result.output and "LlamaForCausalLM" in result.output
    pairing = json.loads((out / "analysis.json").read_text())["pairing"]
    assert NOTE in pairing["notes"][0] and pairing["provenance"] == pairing["notes"][0]
    assert NOTE in (out / "report.md").read_text()
    control = CliRunner().invoke(app, ["analyze", str(models["llama"]), str(models["dora"]), "-o",
                                       str(tmp_path / "control"), "--no-cache"], env={"COLUMNS": "400"})
    assert control.exit_code == 0 and NOTE not in control.output  # negative control
