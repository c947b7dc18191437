"""RankPolicy refuses an infinite α, scale, bytes_per_param or functional ε, naming the field (the CLI its
option): ``recommend --alpha-rule constant --alpha inf`` wrote ``"lora_alpha": Infinity`` to plan.json, which is
not JSON, and ``--scale inf`` was taken."""

from __future__ import annotations

import json

import pytest

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, recommend_ranks
from tests.cli.test_cli import run
from tests.ranks.rows import PLANTED, analysis, make_row

INF = float("inf")


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("fields, said", [
    (dict(alpha=INF, alpha_rule="constant"), "RankPolicy.alpha must be finite, got inf."),
    (dict(alpha=INF), "RankPolicy.alpha must be finite, got inf."),  # refused whatever the rule, as alpha ≤ 0 is
    (dict(scale=INF), "RankPolicy.scale must be finite, got inf."),
    (dict(alpha=-INF, alpha_rule="constant"), "RankPolicy.alpha must be > 0, got -inf."),
    (dict(bytes_per_param=INF, budget_bytes=10**6), "RankPolicy.bytes_per_param must be finite, got inf."),
    (dict(functional=INF), "RankPolicy.functional must be a finite tolerance ≥ 0"),
])
def test_library_refuses_infinite_fields(fields, said):
    with pytest.raises(ConfigError) as exc:
        RankPolicy(**fields)
    assert str(exc.value).startswith(said), str(exc.value)


def test_library_finite_values_still_taken():
    rows = analysis(make_row("model.layers.0.self_attn.q_proj", PLANTED))
    plan = recommend_ranks(rows, RankPolicy(alpha=1e300, alpha_rule="constant"))
    assert plan.to_peft_config()["lora_alpha"] == 1e300
    assert RankPolicy(scale=1e-300).scale == 1e-300 and RankPolicy(functional=0.0).functional == 0.0


@pytest.fixture
def analysis_json(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(analysis(make_row("model.layers.0.self_attn.q_proj", PLANTED))))
    return path


@pytest.mark.parametrize("args, said", [
    (("--alpha-rule", "constant", "--alpha", "inf"), "--alpha must be finite, got inf.\n"),
    (("--scale", "inf"), "--scale must be finite, got inf.\n"),
    (("--scale", "Infinity"), "--scale must be finite, got Infinity.\n"),
])
def test_cli_refuses_infinite_alpha_and_scale(monkeypatch, capsys, analysis_json, tmp_path, args, said):
    code, _, err = run(monkeypatch, capsys, "recommend", analysis_json, *args, "-o", tmp_path / "plan.json")
    assert code == 2 and err.startswith("error: " + said), err
    assert not (tmp_path / "plan.json").exists()


def test_cli_finite_alpha_writes_standard_json(monkeypatch, capsys, analysis_json, tmp_path):
    """Negative control: a large finite α is taken, and plan.json reads as strict JSON."""
    out = tmp_path / "plan.json"
    code, _, err = run(monkeypatch, capsys, "recommend", analysis_json, "--alpha-rule", "constant", "--alpha", "1e300",
                       "-o", out)
    assert code == 0, err
    assert _strict_json(out.read_text())["peft_config"]["lora_alpha"] == 1e300
