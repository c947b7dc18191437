"""Refusals name the option at fault as the command line spells it, with the value typed, and nothing of the
library's Python spelling: an existing output's --overwrite hint, --scale/--alpha, --eval-fraction,
--calibration-epsilon."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.files import refuse_replacing_others
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def report(tmp_path_factory, pair):
    out = tmp_path_factory.mktemp("option-messages-report") / "run"
    mp = pytest.MonkeyPatch()
    import sys

    mp.setattr(sys, "argv", ["spectra", "analyze", *map(str, pair), "--no-cache", "-q", "-o", str(out)])
    from spectra.cli import main

    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        mp.undo()
    return out


def test_an_existing_output_is_refused_with_the_cli_hint_alone(monkeypatch, capsys, pair, tmp_path):
    """"pass --overwrite (--overwrite in Python)": the library's "(overwrite=True in Python)" aside was read as the
    option too. Every command that refuses an existing output now says "pass --overwrite" once."""
    base, tuned = pair
    data = tmp_path / "data.txt"
    data.write_text("hello world\n" * 8)
    commands = {
        "analyze": ("analyze", base, tuned, "--no-cache", "-q"),
        "extract": ("extract", base, tuned, "--rank", "2", "-q"),
        "train": ("train", base, "--data", data, "-q"),
        "sweep": ("sweep", base, tuned, "--data", data, "-q"),
        "verify": ("verify", base, tuned, "--adapter", tmp_path, "-q"),
    }
    for name, args in commands.items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        code, _, err = run(monkeypatch, capsys, *args, "-o", out)
        assert code == 2 and f"-o/--output {out} exists; pass --overwrite to replace it or choose another " \
            "-o/--output." in err, (name, err)
        assert "Python" not in err and "overwrite=True" not in err, (name, err)
    # verify --sweep: each adapter folder under --adapters-dir
    adapters = tmp_path / "adapters"
    (adapters / "lora-r1").mkdir(parents=True)
    code, _, err = run(monkeypatch, capsys, "verify", base, tuned, "--sweep", "1", "--data", data, "-q",
                       "-o", tmp_path / "sweep-report", "--adapters-dir", adapters)
    assert code == 2 and f"--adapters-dir {adapters / 'lora-r1'} exists; pass --overwrite to replace it" in err, err
    assert "Python" not in err
    # recommend -o FILE (a file, its own check): the same words
    (tmp_path / "plan.json").write_text("{}")
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "out-analyze", "-o", tmp_path / "plan.json")
    assert code == 2 and "exists; pass --overwrite to replace it" in err and "Python" not in err, err


def test_a_folder_of_other_files_is_refused_naming_overwrite_only_where_the_command_has_it(monkeypatch, capsys,
                                                                                             tmp_path):
    """bench make-pair has --overwrite and says so; demo replaces its own output unasked and has no --overwrite:
    it said "--overwrite replaces only …" all the same."""
    for name in ("pair", "demo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "thesis.tex").write_text("mine")
    code, _, err = run(monkeypatch, capsys, "bench", "make-pair", tmp_path / "pair", "--overwrite")
    assert code == 2 and "holds thesis.tex, which `spectra bench make-pair` does not write: --overwrite replaces " \
        "only a directory that `spectra bench make-pair` wrote" in err, err
    code, _, err = run(monkeypatch, capsys, "demo", "-o", tmp_path / "demo")
    assert code == 2 and "holds thesis.tex, which `spectra demo` does not write: `spectra demo` replaces only a " \
        "directory it wrote (or an empty one)" in err, err
    assert "overwrite" not in err, err
    assert (tmp_path / "demo" / "thesis.tex").read_text() == "mine"


def test_the_library_names_overwrite_as_python_spells_it(tmp_path):
    """In Python the hint is overwrite=True, never the CLI's --overwrite."""
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError) as exc:
        refuse_replacing_others(tmp_path / "out", command="extract", overwrite=False, option="out_dir")
    assert f"out_dir {tmp_path / 'out'} exists; pass overwrite=True to replace it or choose another out_dir." \
        == str(exc.value)
    (tmp_path / "out" / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError) as exc:
        refuse_replacing_others(tmp_path / "out", command="extract", overwrite=True, option="out_dir")
    assert "overwrite=True replaces only a directory that `spectra extract` wrote" in str(exc.value)
    assert "--" not in str(exc.value)


@pytest.mark.parametrize("args, said", [
    (("--scale", "-1"), "--scale must be > 0, got -1.\n"),
    (("--scale=0",), "--scale must be > 0, got 0.\n"),
    (("--alpha-rule", "constant", "--alpha", "-2"), "--alpha must be > 0, got -2.\n"),
    (("--alpha-rule", "constant", "--alpha", "0.0"), "--alpha must be > 0, got 0.0.\n"),
])
def test_scale_and_alpha_are_refused_one_by_one_with_the_value(monkeypatch, capsys, report, tmp_path, args, said):
    """"--scale and alpha must be > 0": the bare alpha stayed a field name and no value was named."""
    code, _, err = run(monkeypatch, capsys, "recommend", report, *args, "-o", tmp_path / "plan.json")
    assert code == 2 and err.startswith("error: " + said), err
    other = "alpha" if args[0].startswith("--scale") else "scale"
    assert other not in err, err  # only the option at fault
    assert not (tmp_path / "plan.json").exists()
    # negative control: a positive value is taken
    value = "3" if args[0].startswith("--scale") else None
    good = ("--scale", "3") if value else ("--alpha-rule", "constant", "--alpha", "8")
    code, _, err = run(monkeypatch, capsys, "recommend", report, *good, "-o", tmp_path / "plan.json")
    assert code == 0 and (tmp_path / "plan.json").is_file(), err


@pytest.mark.parametrize("command", ["train", "verify"])
@pytest.mark.parametrize("typed", ["2", "1", "-0.5"])
def test_eval_fraction_is_refused_by_its_option_with_the_value(monkeypatch, capsys, pair, tmp_path, command, typed):
    """"--eval-fraction and warmup_ratio must lie in [0, 1)": no value, and a field the command has no option for."""
    base, tuned = pair
    data = tmp_path / "data.txt"
    data.write_text("hello world\n" * 8)
    args = (("train", base, "--data", data) if command == "train" else
            ("verify", base, tuned, "--sweep", "1", "--data", data, "--adapters-dir", tmp_path / "adapters"))
    code, _, err = run(monkeypatch, capsys, *args, "--eval-fraction", typed, "-q", "-o", tmp_path / "out")
    assert code == 2 and err.startswith(f"error: --eval-fraction must lie in [0, 1), got {typed}.\n"), err
    assert "warmup" not in err and "eval_fraction" not in err, err


def test_calibration_epsilon_without_calibration_is_refused(monkeypatch, capsys, pair, tmp_path):
    """--calibration-epsilon -1 without --calibration was taken and ignored; like the other options that another
    one makes meaningless (--eval-fraction beside --eval-data), it is refused naming the option it needs."""
    base, tuned = pair
    for typed in ("-1", "1e-6", "0.01"):  # any value typed, even the default's: it would be ignored
        code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q",
                           "--calibration-epsilon", typed, "-o", tmp_path / "run")
        assert code == 2 and "--calibration-epsilon" in err and "without --calibration it would be ignored" in err, err
        assert not (tmp_path / "run").exists()
    # with --calibration, -1 is refused by the calibration's own check, naming the value typed
    data = tmp_path / "calib.txt"
    data.write_text("hello world\n" * 4)
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "--calibration", data,
                       "--calibration-epsilon", "-1", "-o", tmp_path / "run")
    assert code == 2 and "-1 must lie in (0, 1)" in err, err
    # negative control: without the option, analyze runs as before
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "-o", tmp_path / "run")
    assert code == 0 and (tmp_path / "run" / "analysis.json").is_file(), err
