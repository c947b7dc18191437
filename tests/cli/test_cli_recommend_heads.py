"""`spectra recommend` on a sequence classifier: the printed total is what get_peft_model trains, the head named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from spectra.cli import app
from tests.models import flat_update, save
from tests.ranks.test_plan_task_heads import _PLANTED, _head_params, _model, _peft_trainable

runner = CliRunner()


@pytest.fixture(scope="module")
def roberta_run(tmp_path_factory):
    """The analysis.json of a tiny RoBERTa-for-sequence-classification pair with planted ranks."""
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("cli_heads")
    base = _model("roberta")
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (suffix, rank) in enumerate(_PLANTED["roberta"].items()):
            name = next(n for n in params if n.endswith(suffix))
            params[name] += flat_update(tuple(params[name].shape), rank, seed=i).float()
    result = analyze(str(save(base, root / "base", "safetensors")), str(save(tuned, root / "tuned", "safetensors")),
                     cache_dir=False, progress=False)
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
