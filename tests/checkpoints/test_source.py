"""Checkpoint sources: every accepted form, metadata without data, and each bad input's error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from spectra.checkpoints.pairing import Pairing, iter_deltas
from spectra.checkpoints.source import AdapterSource, open_checkpoint
from spectra.errors import CheckpointError, NonFiniteWeightError, PairingError
from tests.models import build_model, nonfinite_pair, save


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = build_model("llama")
    return {fmt: save(model, root / fmt, fmt) for fmt in ("safetensors", "sharded", "bin")}, model


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_directory_forms_list_the_same_tensors(llama_dirs, fmt):
    dirs, model = llama_dirs
    src = open_checkpoint(dirs[fmt])
    state = model.state_dict()
    assert set(src.names()) >= {k for k in state if k != "lm_head.weight"} | {"lm_head.weight"}
    info = src.info("model.layers.0.self_attn.k_proj.weight")
    assert info.shape == (16, 32) and info.dtype == torch.float32
    assert torch.equal(src.read("model.layers.0.self_attn.k_proj.weight"), state["model.layers.0.self_attn.k_proj.weight"])
    assert src.config["model_type"] == "llama"
    fp = src.fingerprint()
    assert fp["size_bytes"] > 0 and len(fp["fingerprint"]) == 16


def test_single_files_and_index(llama_dirs):
    dirs, _ = llama_dirs
    for spec in (dirs["safetensors"] / "model.safetensors", dirs["bin"] / "pytorch_model.bin",
                 dirs["sharded"] / "model.safetensors.index.json"):
        src = open_checkpoint(spec)
        assert "model.layers.1.mlp.down_proj.weight" in src
    assert len(open_checkpoint(dirs["sharded"]).files) > 1


def test_a_legacy_format_bin_is_read(tmp_path, llama_dirs):
    """torch's pre-1.6 (non-zip) .bin format cannot be memory-mapped; it was refused as "truncated"."""
    _, model = llama_dirs
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    src = open_checkpoint(tmp_path / "pytorch_model.bin")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(src.read(name), model.state_dict()[name])


def test_fingerprint_path_is_absolute(llama_dirs, monkeypatch):
    """analysis.json's base path is read back by recommend from any working directory."""
    dirs, _ = llama_dirs
    monkeypatch.chdir(dirs["safetensors"].parent)
    fp = open_checkpoint(dirs["safetensors"].name).fingerprint()
    assert fp["path"] == str(dirs["safetensors"].absolute())


def test_a_config_that_is_not_an_object_is_refused(llama_dirs, tmp_path):
    import shutil

    dirs, _ = llama_dirs
    shutil.copytree(dirs["safetensors"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1]")  # valid JSON: an AttributeError traceback before
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        open_checkpoint(tmp_path / "m")


def test_adapter_directory(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    src = open_checkpoint(tmp_path)
    assert isinstance(src, AdapterSource) and src.config["r"] == 2
    assert any(k.endswith("lora_A.weight") for k in src.weights.names())


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    for relative in ("models/nofile.safetensors", "models/pytorch_model.bin", "run/model.safetensors.index.json"):
        # shaped like org/name, but a file's name: a missing file, not a hub id to fetch (huggingface_hub's
        # error and an `hf download models/nofile.safetensors` hint were printed)
        with pytest.raises(CheckpointError, match=f"checkpoint '{relative}' does not exist"):
            open_checkpoint(relative)
    with pytest.raises(CheckpointError, match="no weights found in directory"):
        open_checkpoint(tmp_path)


def test_offline_hub_id_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match=r"no local path 'someorg/tiny-model' exists, and cannot fetch hub id 'someorg/tiny-model'.*local directory"):
        open_checkpoint("someorg/tiny-model")


def test_truncated_and_corrupt_safetensors(llama_dirs, tmp_path):
    dirs, _ = llama_dirs
    data = (dirs["safetensors"] / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=str(garbage.name)):
        open_checkpoint(garbage)


def test_unsafe_pickle_is_refused(tmp_path):
    import fractions

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2, 2), "extra": fractions.Fraction(1, 3)}, path)  # not a tensor: needs unpickling
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        open_checkpoint(path)


def test_unknown_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": "F6_E3M2", "shape": [2, 2], "data_offsets": [0, 3]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 3)
    with pytest.raises(CheckpointError, match="odd.safetensors has dtype F6_E3M2, which spectra cannot read"):
        open_checkpoint(path)


def test_an_adapters_weights_file_is_named_as_such(tmp_path):
    """Its weights file passed without adapter_config.json read as two architectures that share no tensor name."""
    from tests.models import random_adapter

    llama = save(build_model("llama"), tmp_path / "llama", "safetensors")
    random_adapter(build_model("llama"), tmp_path / "adapter", r=2, target_modules=["q_proj"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    with pytest.raises(PairingError, match=r"TUNED .*adapter_model.safetensors holds LoRA factors \(.*lora_A.*\): "
                                           r"it is a PEFT adapter's weights file. Pass the adapter's folder"):
        Pairing(llama, weights)
    assert Pairing(llama, tmp_path / "adapter").entries  # negative control: the folder pairs
    # with a module saved whole, which pairs with BASE's (lm_head was analysed alone, the factors only in TUNED),
    # and an embedding LoRA's factors (lora_embedding_A, no .weight: it read as two architectures)
    random_adapter(build_model("llama"), tmp_path / "saved", r=2, target_modules=["q_proj"],
                   modules_to_save=["lm_head"])
    random_adapter(build_model("llama"), tmp_path / "embedding", r=2, target_modules=["embed_tokens"],
                   save_embedding_layers=False)
    for folder, factor in (("saved", "q_proj.lora_A.weight"), ("embedding", "embed_tokens.lora_embedding_")):
        with pytest.raises(PairingError, match=rf"holds LoRA factors \(\S*{re.escape(factor)}"):
            Pairing(llama, tmp_path / folder / "adapter_model.safetensors")
        assert Pairing(llama, tmp_path / folder).entries  # negative control: the folder pairs
    # a checkpoint with LoRA modules of its own (Phi-4-multimodal's, without PEFT's prefix) is no adapter
    from safetensors.torch import load_file, save_file

    own = tmp_path / "own"
    own.mkdir()
    state = load_file(llama / "model.safetensors")
    extra = {"model.layers.0.mlp.down_proj.lora_A.speech.weight": torch.zeros(2, 64)}
    save_file(state | extra, own / "model.safetensors")
    assert Pairing(llama, own).entries
    # LoRA factors without PEFT's prefix, where nothing pairs: still said to be an adapter's (another trainer's)
    bare = tmp_path / "bare"
    bare.mkdir()
    factors = load_file(weights)
    save_file({k.removeprefix("base_model.model."): v for k, v in factors.items()}, bare / "lora.safetensors")
    with pytest.raises(PairingError, match=r"holds LoRA factors \(model\.layers\.\d\.self_attn\.q_proj\.lora_"):
        Pairing(llama, bare / "lora.safetensors")
    # negative control: a model of another architecture with LoRA modules beside its weights is no adapter
    other = tmp_path / "other"
    other.mkdir()
    save_file({"encoder.qkv.base_layer.weight": torch.zeros(4, 4), "encoder.qkv.lora_A.speech.weight": torch.zeros(2, 4),
               "encoder.qkv.lora_B.speech.weight": torch.zeros(4, 2)}, other / "model.safetensors")
    with pytest.raises(PairingError, match="share no tensor names"):
        Pairing(llama, other)


def test_mismatched_architectures(tmp_path):
    llama = save(build_model("llama"), tmp_path / "llama", "safetensors")
    bert = save(build_model("bert", head=False), tmp_path / "bert", "safetensors")
    with pytest.raises(PairingError, match="share no tensor names"):
        Pairing(llama, bert)
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(PairingError, match=r"has shape \(64, 32\) in .*llama but \(64, 48\)"):
        Pairing(llama, save(wide, tmp_path / "wide", "safetensors"))
    with pytest.raises(PairingError, match="pass it as the tuned side"):
        from peft import LoraConfig, get_peft_model

        get_peft_model(build_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "ad")
        Pairing(tmp_path / "ad", llama)


def test_nonfinite_weight_is_named(tmp_path):
    b, t = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"), at=(3, 5))
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.1.mlp.up_proj.weight .* 1 NaN/Inf"):
        list(iter_deltas(b, t))
    pairing = Pairing(b, t)
    from dataclasses import replace

    pairing.options = replace(pairing.options, on_nonfinite="skip")
    names = [d.name for d in pairing]
    assert "model.layers.1.mlp.up_proj" not in names and "model.layers.1.mlp.down_proj" in names
    assert len(pairing.skipped) == 1


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_nonfinite_kind_is_caught_in_any_dtype(tmp_path, bad, dtype):
    # The check is one min/max pass (NaN propagates, ±Inf is the extreme): a single bad value
    # among finite ones of either sign must still be found.
    b, t = nonfinite_pair(tmp_path, "layers.0.self_attn.o_proj", bad, dtype=dtype)
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.0.self_attn.o_proj.weight .* 1 NaN/Inf"):
        list(iter_deltas(b, t))


def test_bounded_memory_while_streaming(tmp_path):
    """Streaming every ΔW holds a few tensors, not the checkpoint: peak anonymous RSS ≤ 6·L + 64 MB."""
    n_tensors, side = 10, 2048  # L = 16 MiB per float32 tensor; each checkpoint is 160 MiB
    g = torch.Generator().manual_seed(0)
    for which in ("base", "tuned"):
        tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(side, side, generator=g) for i in range(n_tensors)}
        save_file(tensors, str(tmp_path / f"{which}.safetensors"))
        del tensors
    script = textwrap.dedent(f"""
        import threading, time
        from spectra.checkpoints.pairing import Pairing
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        pairing = Pairing(r"{tmp_path / 'base.safetensors'}", r"{tmp_path / 'tuned.safetensors'}")
        start = anon(); peak = [start]; done = [False]
        def watch():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.001)
        t = threading.Thread(target=watch); t.start()
        total = 0.0
        for d in pairing:
            total += float(d.delta.norm())
            peak[0] = max(peak[0], anon())
        done[0] = True; t.join()
        print(peak[0] - start)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    largest = side * side * 4
    assert extra <= 6 * largest + 64 * 2**20, f"peak extra anonymous RSS {extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_read_expert_is_one_slice_of_a_stored_expert_tensor(tmp_path, suffix):
    stacked = torch.randn(4, 3, 5).to(torch.bfloat16)  # (E, out, in)
    path = tmp_path / f"w{suffix}"
    (save_file if suffix == ".safetensors" else lambda s, p: torch.save(s, p))({"experts.w": stacked}, str(path))
    src = open_checkpoint(path)
    for e in range(4):
        got = src.read_expert("experts.w", e)
        assert got.shape == (3, 5) and got.dtype == torch.bfloat16 and torch.equal(got, stacked[e])
    with pytest.raises(CheckpointError, match=r"experts.w.*\(4, 3, 5\): no expert 4"):
        src.read_expert("experts.w", 4)
