"""`spectra train --rank` above what the targeted modules allow, and an infinite --lr or --alpha (train's, extract's),
are refused in one line naming the option and the value as typed, with nothing written to -o.

`train --rank 10**30` was torch's traceback; `train --rank 33` on a model 32 wide trained where `extract`, `memory` and
`recommend` refuse the same rank; `train --lr inf`, `train --alpha inf` and `extract --alpha inf` were accepted."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import run

BIG = "1" + "0" * 30  # 10**30


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text("hello world, some text to train on\n" * 16)
    return path


@pytest.mark.parametrize("option, typed, said", [
    ("--rank", BIG, f"error: --rank {BIG} is more than any weight has rows or columns"),
    # the planted GPT-2 is 32 wide: c_attn (96×32), the first of 8 targets, all 32 in min(d_in, d_out)
    ("--rank", "33", "error: --rank 33 exceeds min(d_in, d_out) = 32 of transformer.h.0.attn.c_attn (96×32) and 7 "
                     "more target(s); the largest rank every targeted module takes is 32: lower it"),
    ("--lr", "inf", "error: --lr must be finite, got inf.\n"),
    ("--lr", "1e999", "error: --lr must be finite, got 1e999.\n"),
    ("--lr", "nan", "error: --lr must be positive, got nan.\n"),
    ("--alpha", "Infinity", "error: --alpha must be finite, got Infinity.\n"),
    ("--alpha", "1e400", "error: --alpha must be finite, got 1e400.\n"),
])
def test_train_refuses_naming_the_option_and_the_typed_value(monkeypatch, capsys, pair, text, tmp_path, option, typed,
                                                              said):
    out = tmp_path / "ad"
    code, _, err = run(monkeypatch, capsys, "train", pair[0], "--data", text, option, typed, "--max-steps", "1", "-q",
                       "-o", out)
    assert code == 2 and said in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


def test_train_takes_the_largest_rank(monkeypatch, capsys, pair, text, tmp_path):
    """Negative control: rank 32 (the model's width, min(d_in, d_out) of every target) trains, and PEFT's r is 32."""
    code, _, err = run(monkeypatch, capsys, "train", pair[0], "--data", text, "--rank", "32", "--lr", "1e-3",
                       "--max-steps", "1", "-q", "-o", tmp_path / "ad")
    assert code == 0, err
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 32


@pytest.mark.parametrize("typed", ["inf", "+inf", "1e999"])
def test_extract_refuses_an_infinite_alpha_as_typed(monkeypatch, capsys, pair, tmp_path, typed):
    out = tmp_path / "ad"
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--alpha", typed, "-q", "-o", out)
    assert code == 2 and f"error: --alpha must be finite, got {typed} (the update is scaled by alpha/r).\n" in err, err
    assert not out.exists()


def test_extract_takes_a_finite_alpha(monkeypatch, capsys, pair, tmp_path):
    """Negative control: --alpha 1e6 is written as PEFT's lora_alpha."""
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--alpha", "1e6", "-q",
                       "-o", tmp_path / "ad")
    assert code == 0, err
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_alpha"] == 1e6
