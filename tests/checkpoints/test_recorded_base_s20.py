"""An adapter's recorded base (adapter_config.json's base_model_name_or_path and revision, as PEFT writes them) read
from wherever spectra runs.

PEFT records the path the model was loaded from as typed: a relative one is relative to the folder training ran in.
spectra read it from the working directory only, so run from elsewhere it checked nothing (the class decided) or,
where the working directory held another folder of that name, compared against the wrong model. It is now read from
the working directory and from the adapter's folder and each folder above it, and agrees where any is BASE.
PEFT also records the base's ``revision`` (``get_peft_model(…, revision=…)``): a hub BASE known to be another
revision (a commit of the hub cache's snapshot, a branch or tag its refs name) is noted; one that cannot be told is
not. The adapters are PEFT's own; the models tiny Llamas from config."""

from __future__ import annotations

import json
import shutil

import pytest

from spectra.checkpoints.pairing import Pairing
from tests.models import build_model, save

NOTE = "may not be of BASE"


def provenance(base, tuned) -> list[str]:
    return [n for n in Pairing(base, tuned).notes if NOTE in n]


def peft_adapter(model, path, *, revision=None):
    """A LoRA adapter of `model` saved by PEFT (get_peft_model records model.name_or_path and `revision`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), revision=revision)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(path)
    return json.loads((path / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """project/models/llama, an adapter trained from project/ on "models/llama" saved in project/out/run, and a Llama
    of other weights (same class and shapes) elsewhere."""
    import os

    import transformers as tf

    root = tmp_path_factory.mktemp("relative")
    llama = save(build_model("llama"), root / "project" / "models" / "llama", "safetensors")
    here = os.getcwd()
    os.chdir(root / "project")  # training runs in project/, loading the base by a relative path
    try:
        loaded = tf.LlamaForCausalLM.from_pretrained("models/llama")
        recorded = peft_adapter(loaded, root / "project" / "out" / "run")
    finally:
        os.chdir(here)
    return {"root": root, "llama": llama, "adapter": root / "project" / "out" / "run", "recorded": recorded,
            "llama2": save(build_model("llama", seed=1), root / "llama2", "safetensors")}


def test_peft_records_the_path_as_typed(project):
    assert project["recorded"]["base_model_name_or_path"] == "models/llama"


def test_read_from_the_working_directory_training_ran_in(project, monkeypatch):
    monkeypatch.chdir(project["root"] / "project")
    assert provenance(project["llama"], project["adapter"]) == []
    (note,) = provenance(project["llama2"], project["adapter"])
    assert f"{project['llama'].resolve()} ('models/llama' read from the working directory)" in note
    assert "fingerprint" in note


def test_read_from_above_the_adapter_when_run_elsewhere(project, tmp_path, monkeypatch):
    """Run from another folder: the recorded path is found above the adapter's folder (before: not found, so the class
    decided and a Llama of other weights passed unnoted)."""
    monkeypatch.chdir(tmp_path)
    assert provenance(project["llama"], project["adapter"]) == []
    (note,) = provenance(project["llama2"], project["adapter"])
    project_dir = (project["root"] / "project").resolve()
    assert (f"{project['llama'].resolve()} ('models/llama' read from {project_dir}, above the adapter's folder)"
            in note)
    assert "fingerprint" in note and str(project["llama2"]) in note


def test_a_namesake_in_the_working_directory_does_not_hide_the_real_base(project, tmp_path, monkeypatch):
    """The working directory holds a models/llama of other weights (before: the adapter was compared with it alone,
    and its true base was noted as another model)."""
    shutil.copytree(project["llama2"], tmp_path / "models" / "llama")
    monkeypatch.chdir(tmp_path)
    assert provenance(project["llama"], project["adapter"]) == []


def test_a_relative_path_found_nowhere_checks_nothing_but_the_class(project, tmp_path):
    """Negative control: moved away, the recorded path is no evidence; the class still is."""
    moved = shutil.copytree(project["adapter"], tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "gone/llama-elsewhere"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert provenance(project["llama2"], moved) == []


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub(project, tmp_path, monkeypatch):
    """A hub cache holding org/tiny-llama at two commits: main → A, tag v1 → B (both the same tiny Llama)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny-llama"
    for ref, commit in (("main", COMMIT_A), ("v1", COMMIT_B)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(project["llama"], repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def on_hub(project, tmp_path, revision):
    """PEFT's adapter of the tiny Llama recording `revision`, its base renamed to the hub id org/tiny-llama."""
    import transformers as tf

    path = tmp_path / f"adapter-{revision}"
    config = peft_adapter(tf.LlamaForCausalLM.from_pretrained(project["llama"]), path, revision=revision)
    assert config["revision"] == revision  # PEFT's field
    config["base_model_name_or_path"] = "org/tiny-llama"
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_a_recorded_revision_other_than_bases_is_noted(project, hub, tmp_path):
    v1 = on_hub(project, tmp_path, "v1")
    (note,) = provenance("org/tiny-llama", v1)  # main: commit A; v1 is B
    assert "revision 'v1' of org/tiny-llama" in note
    assert f"refs/v1 names as commit {COMMIT_B}" in note and f"BASE is commit {COMMIT_A}" in note and "main" in note
    assert provenance(hub / "snapshots" / COMMIT_B, v1) == []  # BASE at v1 itself
    assert provenance("org/tiny-llama@v1", v1) == []
    pinned = on_hub(project, tmp_path, COMMIT_A)
    assert provenance("org/tiny-llama", pinned) == []
    (note,) = provenance(hub / "snapshots" / COMMIT_B, pinned)
    assert f"BASE is commit {COMMIT_B}" in note
    assert provenance("org/tiny-llama", on_hub(project, tmp_path, COMMIT_A[:7])) == []  # a short commit
    assert provenance(hub / "snapshots" / COMMIT_B, on_hub(project, tmp_path, "refs/tags/v1")) == []  # a full ref


def test_a_revision_that_cannot_be_told_says_nothing(project, hub, tmp_path):
    """Negative controls: a branch the cache does not know; a BASE outside the hub cache (its commit unknown); an
    adapter that records no revision."""
    assert provenance("org/tiny-llama", on_hub(project, tmp_path, "v2")) == []
    assert provenance(project["llama"], on_hub(project, tmp_path, "v1")) == []
    import transformers as tf

    plain = tmp_path / "plain"
    config = peft_adapter(tf.LlamaForCausalLM.from_pretrained(project["llama"]), plain)
    assert config["revision"] is None
    config["base_model_name_or_path"] = "org/tiny-llama"
    (plain / "adapter_config.json").write_text(json.dumps(config))
    assert provenance("org/tiny-llama", plain) == [] and provenance(hub / "snapshots" / COMMIT_B, plain) == []
