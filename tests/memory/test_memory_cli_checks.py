"""`spectra memory` and `recommend` pass the user's --rank and --seq-len as given (0 was read as 16; an unset
--seq-len was 2048 whatever the model's positions) and print the sequence length estimated; `memory --help` at 80
columns keeps its defaults and help words whole."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spectra.cli import app
from tests.cli.test_cli_ranks import _analysis_dir
from tests.memory.test_memory import LLAMA2_7B

runner = CliRunner()
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 32}


def test_rank_zero_is_refused_not_read_as_16(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = runner.invoke(app, ["memory", str(tmp_path), "--rank", "0"])
    assert result.exit_code != 0 and "--rank must be ≥ 1, got 0" in str(result.exception)
    result = runner.invoke(app, ["memory", str(tmp_path), "--json"])  # unset: 16
    assert result.exit_code == 0 and json.loads(result.output)["inputs"]["rank"] == 16


def test_an_unset_seq_len_follows_the_models_positions(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    result = runner.invoke(app, ["memory", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the table's title wraps
    assert "batch 1 × 32 tokens" in text and "not the default 2048" in text
    result = runner.invoke(app, ["memory", str(tmp_path), "--seq-len", "33"])
    assert result.exit_code != 0 and "n_positions = 32" in str(result.exception)


def test_recommends_memory_line_follows_the_models_positions(tmp_path):
    run = _analysis_dir(tmp_path)
    config = tmp_path / "base" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"max_position_embeddings": 64}))
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "memory (lora, batch 1 × 64 tokens" in result.output


def test_memory_help_at_80_columns_keeps_defaults_and_words_whole():
    result = runner.invoke(app, ["memory", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    text = result.output
    # the help's words, read across the table's lines: without its borders and the option names beside them (a
    # switch's --no- name goes under its name at 80 columns, beside the help's second line)
    words = " ".join(word for word in text.replace("│", " ").split() if not word.startswith("--"))
    assert result.exit_code == 0 and "(default: on)" in words
    # the cells the help text decides, and the flag names (whole since spectra.cli.switches)
    for cut in ("gradient-checkpointi…", "prepare_model_for_kb…", "no-input-require-gra…"):
        assert cut not in text
