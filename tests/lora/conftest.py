"""Shared fixtures for the trainer and verify tests: tiny models and generated data."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models import build_model, save

# bitsandbytes (imported by PEFT) warns about its own deprecations on import
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def random_text(path, *, chars: int, seed: int):
    """Random lowercase letters: every block the byte tokenizer cuts is full length."""
    g = torch.Generator().manual_seed(seed)
    path.write_text(bytes(torch.randint(97, 123, (chars,), generator=g).tolist()).decode("ascii"))
    return path


def classification_jsonl(path, *, n: int = 48):
    """Three string classes, told apart by their first word."""
    words = {"pos": "good", "neg": "bad", "neu": "meh"}
    with open(path, "w") as fh:
        for i in range(n):
            label = ("pos", "neg", "neu")[i % 3]
            fh.write(json.dumps({"text": f"{words[label]} item {i}", "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    return save(build_model("llama"), tmp_path_factory.mktemp("llama") / "base", "safetensors")


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    return random_text(tmp_path_factory.mktemp("data") / "train.txt", chars=16 * 8 * 6, seed=2)
