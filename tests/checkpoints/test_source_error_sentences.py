"""A loader's error joins the cause's message and spectra's advice as sentences: one full stop between them.

torch's message for a corrupt zip ends in a full stop already ("…modified after saving."); appended to with ". The
file is…" it read "saving.. The file". A cause without a full stop (json's, a KeyError's) still gets one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from spectra.checkpoints.source import open_checkpoint
from spectra.errors import CheckpointError


def _message(spec) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(spec)).names()
    return str(info.value)


def test_corrupt_bin_names_the_file_with_one_full_stop(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:200])  # cut inside the zip: no central directory
    message = _message(tmp_path)
    cause = str(pytest.raises(RuntimeError, torch.load, str(path), weights_only=True).value).strip()
    assert cause.endswith(".")  # torch's own sentence: the case that read ".."
    assert str(path) in message and cause in message
    assert ".." not in message
    assert message.endswith("The file is truncated or not a torch checkpoint; download or save it again.")


def test_truncated_safetensors_has_one_full_stop(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    message = _message(path)
    assert str(path) in message and ".." not in message
    assert ". The file is truncated or corrupt" in message


def test_a_cause_without_a_full_stop_gets_one(tmp_path):
    # negative control: a KeyError's text ("'weight_map'") ends in no full stop, so one is added, not dropped
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    message = _message(tmp_path)
    assert "'weight_map'. It must be JSON" in message and ".." not in message
