"""QLoRA on a base whose linears transformers' bitsandbytes load does not convert is refused, before training.

``spectra train --method qlora`` on Falcon had trained a LoRA on a base left in float32 and recorded the run as
qlora: transformers' ``replace_with_bnb_linear`` converts modules whose type is exactly ``nn.Linear``, and Falcon's are
``FalconLinear`` (a subclass), so nothing became ``Linear4bit``. train now asks the shared rule
(:func:`spectra.checkpoints.targets.qlora_unquantised`, the class built from config.json on the meta device) before
reading the data or the weights, and checks the loaded model holds a Linear4bit. The referee: transformers' own
4-bit load of the same checkpoint (``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))``),
whose modules are inspected with ``isinstance``. Negative control: a tiny Llama, whose linears are nn.Linear, trains.
"""

from __future__ import annotations

import json

import pytest
import torch

import spectra.lora.train as train_module
from spectra.checkpoints.targets import meta_model, qlora_unquantised
from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, train_adapter
from tests.models import save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

QLORA = dict(rank=2, max_steps=1, batch_size=4, max_length=16, roles=("qkv", "o", "up", "down"))


def _falcon(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.FalconForCausalLM(tf.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300, ffn_hidden_size=128,
        multi_query=True, parallel_attn=True, bias=False, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    model.config.architectures = ["FalconForCausalLM"]
    return save(model, tmp_path / "falcon", "safetensors")


def _llama(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=False, pad_token_id=0))
    model.config.architectures = ["LlamaForCausalLM"]
    return save(model, tmp_path / "llama", "safetensors")


def _data(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(f"hello world number {i} is here" for i in range(40)))
    return path


def _transformers_4bit(folder) -> set[str]:
    """The modules transformers' own 4-bit load stores as Linear4bit (the referee)."""
    import bitsandbytes as bnb
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    return {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def test_rule_agrees_with_transformers_load(tmp_path):
    """The shared rule refuses exactly where transformers' load stores nothing in 4 bits: Falcon (no Linear4bit,
    the reason names FalconLinear and a module of it), not Llama (its q_proj is Linear4bit)."""
    falcon, llama = _falcon(tmp_path), _llama(tmp_path)
    assert _transformers_4bit(falcon) == set()
    reason = qlora_unquantised(meta_model(json.loads((falcon / "config.json").read_text())))
    assert reason is not None and "FalconLinear" in reason and "transformer.h.0.self_attention.query_key_value" in reason
    assert "nothing would be quantised" in reason
    assert "model.layers.0.self_attn.q_proj" in _transformers_4bit(llama)  # negative control
    assert qlora_unquantised(meta_model(json.loads((llama / "config.json").read_text()))) is None


@pytest.mark.parametrize(("method", "fix"), [("qlora", "--method lora"), ("qdora", "--method dora")])
def test_falcon_qlora_refused_before_loading(tmp_path, monkeypatch, method, fix):
    """train refuses QLoRA/QDoRA on Falcon with the reason and the method to use instead, before the data or the
    weights are read, and writes nothing."""
    falcon, data = _falcon(tmp_path), _data(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("read past the refusal")

    monkeypatch.setattr(train_module, "prepare_data", never)
    monkeypatch.setattr(train_module, "load_model", never)
    with pytest.raises(ConfigError, match=r"FalconLinear.*nothing would be quantised") as err:
        train_adapter(falcon, data, TrainConfig(method=method, **QLORA), tmp_path / "out", progress=False)
    assert fix in str(err.value) and str(falcon) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_loaded_model_checked_too(tmp_path, monkeypatch):
    """Where the class could not be built on the meta device, the loaded model is checked: no Linear4bit → refused
    before training (the early check switched off here to reach it)."""
    falcon, data = _falcon(tmp_path), _data(tmp_path)
    monkeypatch.setattr(train_module, "_refuse_unquantised_early", lambda folder, config: None)

    def never(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(train_module, "_train", never)
    with pytest.raises(ConfigError, match=r"stored nothing in 4 bits: its linears are FalconLinear"):
        train_adapter(falcon, data, TrainConfig(method="qlora", **QLORA), tmp_path / "out", progress=False)


def test_llama_qlora_trains(tmp_path):
    """Negative control: a tiny Llama's QLoRA run is not refused; it trains on Linear4bit layers and is recorded
    as qlora."""
    llama, data = _llama(tmp_path), _data(tmp_path)
    result = train_adapter(llama, data, TrainConfig(method="qlora", rank=2, max_steps=1, batch_size=4, max_length=16),
                           tmp_path / "out", progress=False)
    assert result.steps == 1
    assert json.loads((tmp_path / "out" / "spectra_train.json").read_text())["config"]["method"] == "qlora"
