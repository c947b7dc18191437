"""`spectra memory` prints the estimate's notes under its table (an MoE's experts that QLoRA leaves out and keeps in
16 bits; DeepSeek's activations not estimated under sdpa), which only --json carried."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spectra.cli import app
from tests.memory.test_memory_moe_own_experts import _config


def test_the_table_is_followed_by_the_notes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config("deepseek_v3", v_head_dim=4).to_dict()))
    run = CliRunner().invoke(app, ["memory", str(tmp_path), "--method", "qlora", "--rank", "4"])
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    # DeepSeek's routers stay in fp32 (the note had said bf16 of them too)
    assert "note: activations not estimated" in text and "the experts in bf16, the routers (" in text
    assert "in fp32, as transformers keeps them" in text and "stay in bf16" not in text
    plain = CliRunner().invoke(app, ["memory", str(tmp_path), "--rank", "4", "--attention", "eager"])
    assert "not estimated" not in " ".join(plain.output.split())
