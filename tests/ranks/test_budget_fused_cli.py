"""`spectra recommend --budget` on transformers-5 Mixtral: the printed and written totals are what PEFT trains."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from spectra.cli import app
from tests.models import build_model, planted_mixtral_pair

runner = CliRunner()


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
def test_recommend_budget_with_config_totals_are_peft_trainable(tmp_path):
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze

    base, b, t = planted_mixtral_pair(tmp_path)
    (tmp_path / "run").mkdir()
    data = analyze(b, t, cache_dir=False, progress=False).to_dict()
    (tmp_path / "run" / "analysis.json").write_text(json.dumps(data | {"base": None}))  # no config beside a base:
    # --config alone tells recommend that transformers 5 fuses the experts
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["recommend", str(tmp_path / "run"), "--energy", "0.99", "--budget", "2500",
                                 "--config", str(b), "-o", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(**saved["peft_config"]))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # --config: planned at PEFT's cost (4,144 at the energy ranks, so the budget binds), the padding for layer 1's
    # unchanged expert-2 w3 included, printed on its own line
    assert saved["totals"]["params"] == trained <= 2500 and saved["fused"]
    assert f"{trained:,} parameters" in result.output and "fused experts: PEFT also trains" in result.output
    assert "so PEFT trains" not in result.output
