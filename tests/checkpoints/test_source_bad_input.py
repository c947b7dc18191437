"""Checkpoints that are damaged or unusual in ways a download or a training script leaves them: a shard index is
followed tensor by tensor, a stale index beside a single file is ignored as transformers ignores it, two loose files
holding one tensor are refused, a .bin that is no state dict is named for what it is, and an adapter whose config or
DoRA tensors do not fit is refused before any ΔW is formed. Each error names the file, tensor or key at fault."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra.checkpoints.pairing import Pairing
from spectra.checkpoints.source import open_checkpoint
from spectra.errors import AdapterError, CheckpointError
from tests.models import build_model, save

UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = build_model("llama")
    save(base, root / "single", "safetensors")
    save(base, root / "sharded", "sharded")
    save(base, root / "bin", "bin")
    return base, root


def _copy(root, name, to):
    shutil.copytree(root / name, to)
    return to


def _index(folder):
    path = folder / "model.safetensors.index.json"
    return path, json.loads(path.read_text())


def test_each_tensor_is_read_from_the_shard_its_index_names(models, tmp_path):
    base, root = models
    folder = _copy(root, "sharded", tmp_path / "stale_copy")
    path, index = _index(folder)
    named = index["weight_map"][UP]
    other = next(f for f in dict.fromkeys(index["weight_map"].values()) if f != named)
    tensors = load_file(folder / other)
    tensors[UP] = torch.zeros_like(base.state_dict()[UP])  # a stale copy in another shard
    save_file(tensors, folder / other)
    source = open_checkpoint(folder)
    assert source.info(UP).file.name == named  # the first file listing it had won: a zero weight, ΔW = W
    torch.testing.assert_close(source.read(UP), base.state_dict()[UP])


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(models, tmp_path):
    _, root = models
    folder = _copy(root, "sharded", tmp_path / "absent")
    path, index = _index(folder)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = index["weight_map"][UP]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight'.*does not hold it.*"
                                              r"Download the complete checkpoint"):
        open_checkpoint(folder)


@pytest.mark.parametrize("damage, match", [
    (lambda index: index.__setitem__("weight_map", list(index["weight_map"])), "must map tensor names to shard"),
    (lambda index: index["weight_map"].__setitem__(UP, 2), "must map tensor names to shard"),
    (lambda index: index["weight_map"].__setitem__(UP, "README.md"), "'README.md' .* is not a weight file"),
])
def test_a_malformed_weight_map_is_named(models, tmp_path, damage, match):
    _, root = models
    folder = _copy(root, "sharded", tmp_path / "malformed")
    (folder / "README.md").write_text("# model card\n")
    path, index = _index(folder)
    damage(index)
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):  # an AttributeError / TypeError / "unsafe pickle" before
        open_checkpoint(folder)


def test_a_stale_index_beside_a_single_file_is_ignored_as_transformers_does(models, tmp_path):
    """save_pretrained of a smaller model into a folder that held shards leaves the old index behind."""
    import transformers as tf

    base, root = models
    folder = _copy(root, "single", tmp_path / "stale_index")
    shutil.copy(root / "sharded" / "model.safetensors.index.json", folder)  # names shards the folder lacks
    tf.AutoModelForCausalLM.from_pretrained(folder)  # the reference: transformers loads the single file
    source = open_checkpoint(folder)
    assert [f.name for f in source.files] == ["model.safetensors"]
    torch.testing.assert_close(source.read(UP), base.state_dict()[UP])


def test_two_loose_files_holding_one_tensor_are_refused(models, tmp_path):
    base, root = models
    folder = tmp_path / "loose"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, folder / "a_old.safetensors")
    save_file(state, folder / "b_new.safetensors")
    with pytest.raises(CheckpointError, match=r"in two weight files .*a_old\.safetensors and b_new\.safetensors"):
        open_checkpoint(folder)
    os.remove(folder / "a_old.safetensors")  # the control: one file reads
    assert UP in open_checkpoint(folder).names()


@pytest.mark.parametrize("content, match", [
    (b"hello\n", "cannot read .*notes.bin: KeyError .* not a torch checkpoint"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git-lfs pointer.*git lfs pull"),
    (b"\x00" * 64, "not a state dict torch can read safely"),
])
def test_a_bin_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, content, match):
    path = tmp_path / "notes.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as caught:
        open_checkpoint(path)
    assert "execute code" not in str(caught.value) and "weights_only` set to `False`" not in str(caught.value)


def test_a_pickle_that_would_run_code_is_refused_naming_the_global(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "PWNED"),)

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)  # torch.load warns of other protocols
    with pytest.raises(CheckpointError, match=r"(?i)would execute code from the file \(.*unsupported global.*system"):
        open_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_trainers_checkpoint_is_read_through_its_model_entry(models, tmp_path):
    base, root = models
    state = torch.load(root / "bin" / "pytorch_model.bin", weights_only=True)
    torch.save({"model": state, "epoch": 3, "optimizer": {"lr": 1e-4}}, tmp_path / "trainer.pt")
    source = open_checkpoint(tmp_path / "trainer.pt")
    torch.testing.assert_close(source.read(UP), base.state_dict()[UP])
    torch.save({"epoch": 3, "optimizer": {"lr": 1e-4}}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match=r"holds no tensors at its top level \(keys: epoch, optimizer\)"):
        open_checkpoint(tmp_path / "no_weights.pt")  # it had opened as 0 tensors: "not the same architecture"


Q = "base_model.model.model.layers.0.self_attn.q_proj."


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    base, root = models
    out = tmp_path_factory.mktemp("adapters")
    for name, dora in (("lora", False), ("dora", True)):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                    use_dora=dora))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        peft_model.save_pretrained(out / name)
    return root / "single", out


@pytest.mark.parametrize("kind, config, tensors, error, match", [
    ("lora", {"lora_alpha": "16"}, {}, AdapterError, "lora_alpha in adapter_config.json is '16'; it must be a number"),
    ("lora", {"lora_alpha": None}, {}, AdapterError, "lora_alpha in adapter_config.json is None"),
    ("lora", {"alpha_pattern": {"q_proj": "x"}}, {}, AdapterError, r"alpha_pattern\['q_proj'\]"),
    ("lora", {}, {Q + "lora_A.weight": torch.zeros(0, 32), Q + "lora_B.weight": torch.zeros(32, 0)}, AdapterError,
     "has rank 0"),
    ("dora", {}, {Q + "lora_magnitude_vector": torch.ones(1)}, AdapterError, r"DoRA magnitude .* shape \(1,\)"),
    ("dora", {}, {Q + "lora_magnitude_vector": torch.ones(31)}, AdapterError, r"rescales 32 rows"),
    ("lora", {}, {Q + "base_layer.weight": torch.zeros(31, 32)}, AdapterError, r"saved base weight .* \(31, 32\)"),
])
def test_an_adapter_that_does_not_fit_is_refused_naming_the_key(adapters, tmp_path, kind, config, tensors, error,
                                                                 match):
    base, out = adapters
    folder = _copy(out, kind, tmp_path / "adapter")
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if tensors:
        state = load_file(folder / "adapter_model.safetensors")
        save_file(state | tensors, folder / "adapter_model.safetensors")
    with pytest.raises(error, match=match):  # TypeError, ZeroDivisionError, RuntimeError; a 1-element magnitude
        list(Pairing(base, folder))  # had been accepted, broadcast to every row: ΔW 38× too large
    assert list(Pairing(base, out / kind))  # the control: the adapter as saved reads


def _fake_hub(monkeypatch, tmp_path, repo: dict[str, bytes]):
    """huggingface_hub.snapshot_download on a repository held in `repo` (file name → bytes): files matching
    allow_patterns are copied into one snapshot folder; nothing is cached locally (local_files_only raises)."""
    import fnmatch

    import huggingface_hub

    snapshot, fetched = tmp_path / "snapshot", []

    def download(repo_id, *, revision=None, allow_patterns=(), local_files_only=False):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        snapshot.mkdir(exist_ok=True)
        for name, content in repo.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns) and not (snapshot / name).exists():
                (snapshot / name).write_bytes(content)
                fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return fetched


def test_a_hub_download_fetches_the_shards_its_index_names_alone(models, tmp_path, monkeypatch):
    """Mistral's repositories hold consolidated.safetensors, a whole copy, beside the HF shards: '*.safetensors'
    had fetched both (twice the download) and read one. Reference: the files the index names."""
    base, root = models
    repo = {f.name: f.read_bytes() for f in (root / "sharded").iterdir()}
    repo["consolidated.safetensors"] = (root / "single" / "model.safetensors").read_bytes()
    fetched = _fake_hub(monkeypatch, tmp_path, repo)
    source = open_checkpoint("someorg/sharded")
    shards = set(json.loads(repo["model.safetensors.index.json"])["weight_map"].values())
    assert set(fetched) == shards | {"config.json", "model.safetensors.index.json"}
    torch.testing.assert_close(source.read(UP), base.state_dict()[UP])


@pytest.mark.parametrize("folder, want", [("single", {"model.safetensors"}), ("bin", {"pytorch_model.bin"})])
def test_a_hub_download_of_one_file_fetches_that_file(models, tmp_path, monkeypatch, folder, want):
    _, root = models
    repo = {f.name: f.read_bytes() for f in (root / folder).iterdir()}
    fetched = _fake_hub(monkeypatch, tmp_path, repo)
    assert UP in open_checkpoint("someorg/model").names()
    assert set(fetched) - {"config.json", "generation_config.json"} == want
