"""Errors at the command line name the command's options, not the library's fields it fills."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spectra.errors import ConfigError, NonFiniteWeightError
from tests.models import build_model, planted_gpt2, save
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    base, tuned = planted_gpt2()
    broken = copy.deepcopy(tuned)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    return (save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors"),
            save(broken, root / "nan", "safetensors"))


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    from spectra.analysis import analyze

    out = tmp_path_factory.mktemp("report") / "run"
    analyze(pair[0], pair[1], cache_dir=False, progress=False).write_report(out)
    return out


@pytest.mark.parametrize("args, said, field", [
    (["analyze", "{b}", "{t}", "--energy", "1.5"], "--energy", "thresholds"),
    (["analyze", "{b}", "{t}", "--full-below", "-5"], "--full-below: -5", "full_below"),
    (["analyze", "{b}", "{t}", "--workers", "0"], "--workers 0 must be ≥ 1", "workers=0"),
    (["analyze", "{b}", "{t}", "--read-ahead", "-1"], "--read-ahead -1 and --read-ahead-mb 512", "read_ahead=-1"),
    (["recommend", "{r}", "--energy", "1.5"], "--energy must be in (0, 1], got 1.5", "RankPolicy.energy"),
    (["recommend", "{r}", "--min-rank", "0"], "--min-rank must be", "RankPolicy.min_rank"),
    (["recommend", "{r}", "--rank", "40"], "--rank 40 exceeds", "max_rank"),
    (["extract", "{b}", "{t}", "--rank", "0"], "--rank must be ≥ 1, got 0", "error: rank must"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--non-target", "foo"], "--non-target 'foo' is not one of",
     "non_target"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--epsilon", "-1"], "--epsilon must be a finite tolerance", "functional"),
])
def test_errors_name_the_option_not_the_field(monkeypatch, capsys, pair, report, tmp_path, args, said, field):
    data = tmp_path / "eval.txt"
    data.write_text("some text to evaluate on\n" * 4)
    fill = {"b": pair[0], "t": pair[1], "r": report, "d": data}
    code, _, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args], "-o", tmp_path / "out")
    assert code == 2 and said in err, err
    assert field not in err  # the library's word for it: what the message said before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("typed, shown", [("0.9,2", "2"), ("0.5, 1.50", "1.50"), ("1e0,3e-1,7", "7"),
                                           ("0.9,-0", "-0")])
def test_a_refused_energy_level_is_named_as_typed(monkeypatch, capsys, pair, tmp_path, typed, shown):
    """--energy 0.9,2 said "--energy: 2.0 must be an energy fraction": the number after float(), not what was typed."""
    code, _, err = run(monkeypatch, capsys, "analyze", pair[0], pair[1], "--energy", typed, "-o", tmp_path / "out")
    assert code == 2 and f"--energy: {shown} must be an energy fraction in (0, 1]" in err, err
    assert f"--energy: {float(shown)} must" not in err  # 2.0, 1.5, 7.0, -0.0: the number, not what was typed
    assert not (tmp_path / "out").exists()
    # negative control: a word that is no number is refused by the command itself, quoting the list and the word
    code, _, err = run(monkeypatch, capsys, "analyze", pair[0], pair[1], "--energy", "0.9,2x", "-o", tmp_path / "out")
    said = "--energy '0.9,2x': '2x' is not a number; expected comma-separated fractions like 0.5,0.9,0.99."
    assert code == 2 and said in err, err


def test_the_nan_hint_names_skip_nonfinite_only_where_the_command_has_it(monkeypatch, capsys, pair, tmp_path):
    """extract, sweep, verify and recommend BASE TUNED said "(CLI: --skip-nonfinite)", an option only analyze has."""
    base, _, broken = pair
    code, _, err = run(monkeypatch, capsys, "analyze", base, broken, "--no-cache", "-q", "-o", tmp_path / "a")
    assert code == 2 and "NaN/Inf" in err and "Pass --skip-nonfinite to analyse the rest." in err, err
    assert "on_nonfinite" not in err
    code, _, err = run(monkeypatch, capsys, "analyze", base, broken, "--no-cache", "-q", "--skip-nonfinite",
                       "-o", tmp_path / "a")
    assert code == 0, err  # negative control: the option the message names does what it says
    data = tmp_path / "eval.txt"
    data.write_text("some text to evaluate on\n" * 4)
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    for args in (["extract", base, broken, "--rank", "2", "-o", tmp_path / "x"],
                 ["recommend", base, broken],
                 ["sweep", base, broken, "--data", data, "--ranks", "1", "-o", tmp_path / "s"]):
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 2 and "NaN/Inf" in err and "re-save it." in err, (args[0], err)
        assert "skip-nonfinite" not in err and "on_nonfinite" not in err, (args[0], err)


def test_the_library_keeps_its_field_names():
    """The rule is the command line's: a library caller reads the fields it passed."""
    from spectra.analysis import AnalysisConfig
    from spectra.cli.messages import _cli_message

    with pytest.raises(ConfigError, match="thresholds") as info:
        AnalysisConfig(thresholds=(1.5,))
    assert "--energy" in _cli_message(info.value, ["analyze", "b", "t"])
    assert "thresholds" in _cli_message(info.value, ["memory", "m"])  # memory has no option for it: unchanged
    # prose stays prose; an option the library already names is not doubled
    assert _cli_message(ConfigError("the rank of max_length (--max-length) 128"), ["train", "b"]) == \
        "the rank of --max-length 128"
    assert _cli_message(NonFiniteWeightError(json.dumps("x")), ["nope"]) == '"x"'
    # a path or a dotted module name is never read as a field (eval_data is train's --eval-data)
    for text in ("cannot read /data/eval_data/max_length.txt", "model.layers.0.mlp.gate_proj: rank 3"):
        assert _cli_message(ConfigError(text), ["train", "b"]) == text
    assert _cli_message(ConfigError("use max_rank."), ["recommend", "r"]) == "use --max-rank."  # at a sentence's end
    # a flag set off is its --no- form; sweep's ε is --epsilon, recommend's --functional
    assert _cli_message(ConfigError("nothing to plan (try noise=False)."), ["recommend", "r"]) == \
        "nothing to plan (try --no-noise)."
    assert _cli_message(ConfigError("(lower RankPolicy.functional)."), ["sweep", "b", "t"]) == "(lower --epsilon)."
    assert _cli_message(ConfigError("(lower RankPolicy.functional)."), ["recommend", "r"]) == "(lower --functional)."


def test_help_says_what_an_existing_output_meets_and_what_extract_reads():
    """extract's TUNED did not say it takes a PEFT adapter; "With --rank: Comma-separated…"; train/sweep/verify's -o
    did not say an existing output is refused; --overwrite did not say what it replaces."""
    from typer.testing import CliRunner

    from spectra.cli import app

    def help_of(*command):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())  # rich's box lines and wrapping aside

    extract = help_of("extract")
    assert "or a PEFT adapter directory" in extract and "With --rank: comma-separated stacks" in extract
    # verify --sweep trains: its --stacks default is train's (the stacks text runs through), not "every stack"
    verify = help_of("verify")
    assert "Sweep: stacks whose modules of --roles to target" in verify and "every stack" not in verify
    for command in ("analyze", "extract", "train", "sweep", "verify"):
        text = help_of(command)
        assert "refused if it exists, unless --overwrite" in text, command
        assert "that this command wrote, or an empty one; a folder holding any other file is refused" in text, command


def test_spectras_warnings_are_one_line_without_the_source(monkeypatch, capsys, pair, tmp_path):
    """An unwritable cache printed "…/analysis.py:564: RuntimeWarning: …" and the source line that raised it."""
    import warnings

    cache = tmp_path / "cachefile"
    cache.write_text("")  # a file where the cache directory goes
    monkeypatch.setenv("SPECTRA_CACHE", str(cache))
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run(monkeypatch, capsys, "analyze", pair[0], pair[1], "-q", "-o", tmp_path / "r")
        assert warnings.showwarning is before  # the caller's display is given back
    assert code == 0 and f"warning: the analysis cache {cache}" in err and "cannot be written" in err, err
    assert "RuntimeWarning" not in err and "analysis.py" not in err and "cache.put(" not in err
    shown = []  # negative control: another library's warning goes to the display the caller had
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, *args: shown.append((str(message), filename))
        from spectra.cli import main

        monkeypatch.setattr("spectra.cli.app", lambda: warnings.warn_explicit("theirs", UserWarning, "/x/lib.py", 7))
        main()
    assert shown == [("theirs", "/x/lib.py")] and "theirs" not in capsys.readouterr().err


def test_two_unrelated_checkpoints_are_said_to_be_no_fine_tune(monkeypatch, capsys, pair, tmp_path):
    """Two checkpoints of one architecture from other seeds (‖ΔW‖/‖W‖ ≈ 1.41 everywhere) analysed without a hint."""
    import numpy as np

    other = save(build_model("gpt2", seed=7), tmp_path / "other", "safetensors")
    code, out, err = run(monkeypatch, capsys, "analyze", pair[0], other, "--no-cache", "-q", "-o", tmp_path / "r")
    assert code == 0, err
    rows = json.loads((tmp_path / "r" / "analysis.json").read_text())["modules"]
    median = float(np.median([r["relative_size"] for r in rows if r.get("relative_size") and "[" not in r["name"]]))
    assert 1.3 < median < 1.5  # independent draws of one scale: √2
    err = " ".join(err.split())  # rich wraps long lines
    assert "warning: the median module's ‖ΔW‖/‖W‖ is 1.4" in err and "Check that TUNED is a fine-tune of BASE" in err
    code, out, _ = run(monkeypatch, capsys, "show", tmp_path / "r")
    assert "Check that TUNED is a fine-tune of BASE" in " ".join(out.split())
    code, out, err = run(monkeypatch, capsys, "analyze", pair[0], pair[1], "--no-cache", "-o", tmp_path / "f")
    assert code == 0 and "a fine-tune of BASE" not in " ".join((out + err).split())  # negative control: a real update


def test_extract_and_sweep_say_two_unrelated_checkpoints_are_no_fine_tune(monkeypatch, capsys, pair, tmp_path):
    """analyze warned of an unrelated pair; extract wrote an adapter of TUNED − BASE and sweep measured its truncations
    without a word. Each now says it, from its own modules' ‖ΔW‖_F/‖W_base‖_F (ModuleExtraction.relative_size)."""
    import numpy as np

    from spectra.lora.extract import extract_adapter

    other = save(build_model("gpt2", seed=7), tmp_path / "other", "safetensors")
    code, _, err = run(monkeypatch, capsys, "extract", pair[0], other, "--rank", "2", "-q", "-o", tmp_path / "ad")
    assert code == 0 and "note: the median module's ‖ΔW‖/‖W‖ is 1.4" in err, err
    assert "Check that TUNED is a fine-tune of BASE" in " ".join(err.split())
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f"sentence {i} of some plain words"}) + "\n" for i in range(8)))
    code, _, err = run(monkeypatch, capsys, "sweep", pair[0], other, "--data", data, "--ranks", "1", "-q",
                       "-o", tmp_path / "sw")
    assert code == 0 and "note: the median module's ‖ΔW‖/‖W‖ is 1.4" in err, err
    assert any("the median module's" in n for n in json.loads((tmp_path / "sw" / "sweep.json").read_text())["notes"])
    # the sizes are each module's ‖ΔW‖_F / ‖W_base‖_F, checked against float64 on the stored weights
    from safetensors.torch import load_file

    b, t = (load_file(str(p / "model.safetensors")) for p in (pair[0], other))
    result = extract_adapter(pair[0], other, 2, tmp_path / "unrelated", progress=False)
    assert len(result.modules) > 4
    for m in result.modules:
        key = next(k for k in b if k.endswith(m.name.removeprefix("transformer.") + ".weight"))
        expected = float((t[key].double() - b[key].double()).norm() / b[key].double().norm())
        assert m.relative_size == pytest.approx(expected, rel=1e-6), m.name
    assert 1.3 < float(np.median([m.relative_size for m in result.modules])) < 1.5
    result = extract_adapter(pair[0], pair[1], 2, tmp_path / "real", progress=False)
    assert not any("median module" in n for n in result.notes)  # negative control: a fine-tune
    code, _, err = run(monkeypatch, capsys, "sweep", pair[0], pair[1], "--data", data, "--ranks", "1", "-q",
                       "-o", tmp_path / "sw2")
    assert code == 0 and "median module" not in err
    # an adapter as TUNED is not judged by its size: its update is its own whatever BASE is
    from tests.models import random_adapter

    base_model, _ = planted_gpt2()
    random_adapter(base_model, tmp_path / "big", scale=0.5, r=2, target_modules=["c_attn", "c_fc"],
                   fan_in_fan_out=True)
    code, _, err = run(monkeypatch, capsys, "analyze", pair[0], tmp_path / "big", "--no-cache", "-q",
                       "-o", tmp_path / "ra")
    rows = json.loads((tmp_path / "ra" / "analysis.json").read_text())["modules"]
    assert float(np.median([r["relative_size"] for r in rows if r.get("relative_size") and "[" not in r["name"]])) > 1
    assert code == 0 and "median module" not in err, err
    code, _, err = run(monkeypatch, capsys, "extract", pair[0], tmp_path / "big", "--rank", "1", "-q",
                       "-o", tmp_path / "adb")
    assert code == 0 and "median module" not in err, err


def test_a_path_of_the_wrong_kind_is_named_as_what_it_is(monkeypatch, capsys, pair, tmp_path):
    """A folder given as data ("does not exist"), a config.json given as weights ("cannot read the shard index …
    'weight_map'"), a file on an output's path ("not a folder this user may write to"): each said as it is."""
    (tmp_path / "texts").mkdir()
    code, _, err = run(monkeypatch, capsys, "sweep", pair[0], pair[1], "--data", tmp_path / "texts",
                       "-o", tmp_path / "sw")
    assert code == 2 and "is a folder, not a file" in err
    code, _, err = run(monkeypatch, capsys, "pairs", pair[0], pair[1] / "config.json")
    assert code == 2 and f"{pair[1] / 'config.json'} is a model's config, not weights" in " ".join(err.split())
    (tmp_path / "afile").write_text("x")
    code, _, err = run(monkeypatch, capsys, "extract", pair[0], pair[1], "--rank", "2", "-o", tmp_path / "afile" / "ad")
    assert code == 2 and "afile is a file, not a folder" in " ".join(err.split())
