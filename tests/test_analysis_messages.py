"""AnalysisConfig's refusals name the one option at fault and the value as given: `--energy 1.5` read
"--energy: (1.5,) must be …" (the tuple the CLI built) and `--full-below -5` named base_top_k and base_top_iter too,
options the command does not have."""

from __future__ import annotations

import sys

import pytest

from spectra.analysis import AnalysisConfig
from spectra.errors import ConfigError


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(thresholds=(1.5,)), "thresholds: 1.5 must be an energy fraction in (0, 1]."),
    (dict(thresholds=(0.5, 1.5, 0.0)), "thresholds: 1.5, 0.0 must be energy fractions in (0, 1]."),
    (dict(thresholds=(float("nan"),)), "thresholds: nan must be an energy fraction in (0, 1]."),
    (dict(thresholds=()), "thresholds: none given; pass at least one energy fraction in (0, 1]."),
    (dict(thresholds=0.9), "thresholds: 0.9 is one value; pass a tuple of energy fractions in (0, 1], e.g. (0.5, 0.9)."),
    (dict(thresholds=("high",)), "thresholds: ('high',) must be numbers: energy fractions in (0, 1]."),
    (dict(full_below=-5), "full_below: -5 must be ≥ 0."),
    (dict(base_top_k=-1), "base_top_k: -1 must be ≥ 0."),
    (dict(base_top_iter=-2), "base_top_iter: -2 must be ≥ 0."),
])
def test_library_messages_name_the_field_and_value(kwargs, message):
    with pytest.raises(ConfigError) as err:
        AnalysisConfig(**kwargs)
    assert str(err.value) == message


def test_valid_values_pass_sorted_as_floats():
    """Negative control: fractions in (0, 1] (1 included), as any sequence of numbers, and zeros of the counts."""
    config = AnalysisConfig(thresholds=[1, 0.9, "0.5"], full_below=0, base_top_k=0, base_top_iter=0)
    assert config.thresholds == (0.5, 0.9, 1.0)


def _run(monkeypatch, capsys, *args) -> tuple[int, str]:
    from spectra.cli import main

    monkeypatch.setattr(sys, "argv", ["spectra", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(("option", "value", "says", "not_said"), [
    ("--energy", "1.5", "--energy: 1.5 must be an energy fraction in (0, 1].", "(1.5,)"),
    ("--energy", "0.9,2", "--energy: 2 must be an energy fraction in (0, 1].", "(0.9, 2.0)"),  # as typed
    ("--full-below", "-5", "--full-below: -5 must be ≥ 0.", "base_top"),
])
def test_analyze_names_only_the_option_at_fault(option, value, says, not_said, monkeypatch, capsys, tmp_path):
    code, err = _run(monkeypatch, capsys, "analyze", tmp_path / "base", tmp_path / "tuned", option, value,
                     "-o", tmp_path / "r")
    assert code == 2 and says in err and not_said not in err, err


def test_a_selection_that_leaves_no_weight_matrix_is_refused_naming_its_options(monkeypatch, capsys, tmp_path):
    """`analyze --layers 5-9` on a 2-layer model read the whole pair, then failed on an empty report ("the analysis
    holds no weight-matrix modules … check the role/layer/name filters") naming no option."""
    from spectra.analysis import analyze
    from tests.models import build_model, moved, save

    base = save(build_model("llama"), tmp_path / "base", "safetensors")
    tuned = save(moved(build_model("llama"), seed=1), tmp_path / "tuned", "safetensors")
    code, err = _run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "--layers", "5-9",
                     "--roles", "q,v", "-o", tmp_path / "r")
    assert code == 2 and f"no weight matrix of {base} × {tuned} matches --roles q,v, --layers 5-9" in err, err
    assert not (tmp_path / "r").exists()
    code, err = _run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "--layers", "5",
                     "-o", tmp_path / "r")
    assert code == 2 and "matches --layers 5;" in err, err  # as typed, not "5-5"
    with pytest.raises(ConfigError, match="matches include=nomatch"):
        analyze(base, tuned, AnalysisConfig(include="nomatch"), cache_dir=False, progress=False)
    rows = analyze(base, tuned, AnalysisConfig(layers=(0, 0)), cache_dir=False, progress=False).modules
    assert rows and {r["layer"] for r in rows if r["kind"] == "matrix"} == {0}  # negative control
