"""spectra memory's refusals say what the input is: a Mamba config has no attention (transformers 5 names its mixers
linear_attention, and the reason said "beside attention (MiniMax's lightning attention, …)"), and a weights file given
for the config is named as one (it was "is not valid JSON ('utf-8' codec can't decode …)")."""

import json

import pytest

from spectra.errors import CheckpointError, ConfigError
from spectra.memory import estimate_memory
from spectra.memory.config import load_config

MAMBA = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
         "state_size": 4, "num_hidden_layers": 2, "intermediate_size": 32, "time_step_rank": 2}


def test_mamba_is_refused_as_having_no_attention():
    with pytest.raises(ConfigError, match=r"model_type mamba: layers of type linear_attention and no attention layer "
                                          r"\(linear_attention is transformers' name for a recurrent mixer: a Mamba"):
        estimate_memory(MAMBA, rank_plan_or_rank=8)


def test_a_hybrid_is_still_said_to_have_them_beside_attention():
    """Control: MiniMax's family default holds linear_attention and full_attention layers."""
    with pytest.raises(ConfigError, match=r"model_type minimax: layers of type linear_attention beside attention"):
        estimate_memory({"model_type": "minimax", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "num_local_experts": 2, "num_experts_per_tok": 1}, rank_plan_or_rank=8)


def test_a_weights_file_is_named_as_one(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xf0\x9f\x00\x01binary")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a weights file; .*: pass its config.json or "
                                              r"its folder\."):
        load_config(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(MAMBA))
    with pytest.raises(CheckpointError, match=rf"pass {tmp_path / 'config.json'} or its folder\."):
        load_config(tmp_path / "model.safetensors")
    (tmp_path / "weights").write_bytes(b"\xf0\x9f\x00\x01binary")  # no telling suffix: not text
    with pytest.raises(CheckpointError, match=r"weights is not a text file \(a weights file\?\)"):
        load_config(tmp_path / "weights")
    assert load_config(tmp_path)["model_type"] == "mamba"  # control: the folder reads its config.json
