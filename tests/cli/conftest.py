"""What the command-line tests share: the planted GPT-2 pair their commands run on."""

from __future__ import annotations

import pytest

from tests.models import planted_gpt2, save


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The planted GPT-2 base × tuned pair as safetensors folders (BASE/b, TUNED/t), built once per test module
    (a module that needs another pair, test_cli_messages.py's with a NaN checkpoint, defines its own)."""
    root = tmp_path_factory.mktemp("pair")
    base, tuned = planted_gpt2()
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")
