"""`spectra recommend` on a sequence classifier: the printed total is what get_peft_model trains, the head named."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spectra.cli import app
from tests.ranks.test_plan_task_heads import _head_params, _peft_trainable, planted_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def roberta_run(tmp_path_factory):
    """The analysis.json of a tiny RoBERTa-for-sequence-classification pair with planted ranks."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("cli_heads")
    base_dir, tuned_dir = planted_pair("roberta", root, head=False)
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    (root / "run").mkdir()
    return result.save(root / "run" / "analysis.json")


@pytest.mark.parametrize("budget", [None, "5000"])
def test_recommend_prints_and_writes_the_head_peft_trains(roberta_run, tmp_path, budget):
    out = tmp_path / "plan.json"
    head = _head_params("roberta")
    result = runner.invoke(app, ["recommend", str(roberta_run), "-o", str(out)] + (["--budget", budget] if budget
                                                                                     else []),
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    total = data["totals"]["params"]
    assert total == _peft_trainable("roberta", data["peft_config"])  # PEFT's own count
    assert f"{total:,} parameters ({total - head:,} LoRA + {head:,} of the head)" in result.output
    assert f"+ {head:,} parameters of the head (classifier {head:,}), trained in full by PEFT for SEQ_CLS" \
        in " ".join(result.output.split())
    if budget:
        assert total <= int(budget) and "(in the total and the budget)" in result.output


def test_recommend_refuses_a_budget_below_the_head(roberta_run):
    head = _head_params("roberta")  # 1,155 at width 32
    result = runner.invoke(app, ["recommend", str(roberta_run), "--budget", "1000"], env={"COLUMNS": "250"})
    text = str(result.exception)
    assert result.exit_code != 0 and "The budget (RankPolicy.budget, 1,000 parameters) does not cover classifier" \
        in text and f"({head:,} parameters" in text
