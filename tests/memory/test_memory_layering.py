"""spectra.memory comes before spectra.lora in the pipeline (DESIGN.md): estimating a model's memory, with roles and
a sequence length checked as train checks them, and an MoE's targets asked of train's own selection, imports no
spectra.lora module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, sys
from spectra.memory import estimate_memory

config = json.loads(sys.argv[1])
estimate = estimate_memory(config, roles=tuple(sys.argv[2].split(",")), seq_len=64)  # role check, length rule
assert estimate.seq_len == 64 and estimate.trainable_params > 0
print(json.dumps(sorted(m for m in sys.modules if m == "spectra.lora" or m.startswith("spectra.lora."))))
"""


def _lora_modules_imported(config: dict, roles: str = "q,v") -> list[str]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(config), roles], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                       "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_imports_no_lora_module():
    """It imported spectra.lora.data (resolve_max_length) and spectra.lora.train (TrainConfig's role check, and
    with it torch and PEFT's trainer): both rules now live in spectra.checkpoints (positions, roles)."""
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 128}
    assert _lora_modules_imported(llama) == []


def test_memory_of_an_moe_asks_trains_selection_without_importing_lora():
    """An MoE's int rank adapts what train adapts (peft_targets, on the model built on the meta device): that
    selection now lives in spectra.checkpoints.adapted, which train imports too."""
    from tests.models import tiny_config

    mixtral = tiny_config("mixtral").to_dict() | {"max_position_embeddings": 128}
    assert _lora_modules_imported(mixtral, "q,up") == []
