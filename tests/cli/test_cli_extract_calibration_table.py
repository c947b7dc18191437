"""`spectra extract --calibration` says in which norm its table's ‖ΔW‖ and error are (RMS of ΔW·x on the data)."""

from __future__ import annotations

import copy
import json

import torch
from typer.testing import CliRunner

from spectra.cli import app
from tests.models import build_model, low_rank, save

V = "model.layers.0.self_attn.v_proj"


def test_extract_table_names_the_data_norm(tmp_path):
    base = build_model("llama")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        dict(tuned.named_parameters())[f"{V}.weight"] += low_rank(16, 32, 4, seed=1).float()
    b, t = save(base, tmp_path / "base", "safetensors"), save(tuned, tmp_path / "tuned", "safetensors")
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("hello world", "spectra of updates")))
    args = ["extract", str(b), str(t), "--rank", "2", "--roles", "v"]
    on_data = CliRunner().invoke(app, [*args, "--calibration", str(data), "-o", str(tmp_path / "data")])
    plain = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "plain")])
    assert on_data.exit_code == 0 and plain.exit_code == 0, on_data.output + plain.output
    assert "* on the calibration data" in on_data.output and "rms_output_change" in on_data.output
    assert "on the calibration data" not in plain.output  # negative control: Frobenius norms, no footnote
