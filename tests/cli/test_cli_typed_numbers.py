"""A refused float option is named as the user typed it: `recommend --energy 2` said "got 2.0", the float typer made
of "2" (analyze's --energy list was fixed before, test_cli_messages.py). Every command's float options, one rule
(messages._typed_numbers); the values the commands pass on are unchanged."""

from __future__ import annotations

import json

import pytest

from spectra.cli.messages import _cli_words
from tests.cli.test_cli import run
from tests.models import planted_gpt2, save


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("typed")
    base, tuned = planted_gpt2()
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    from spectra.analysis import analyze

    out = tmp_path_factory.mktemp("report") / "run"
    analyze(pair[0], pair[1], cache_dir=False, progress=False).write_report(out)
    return out


@pytest.mark.parametrize("typed", ["2", "1.50", "2e0", "-0", "+3", "1_5"])
def test_recommend_names_a_refused_energy_as_typed(monkeypatch, capsys, report, tmp_path, typed):
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--energy", typed, "-o", tmp_path / "plan.json")
    assert code == 2 and f"--energy must be in (0, 1], got {typed}.\n" in err, err
    assert f"got {float(typed)}." not in err  # 2.0, 1.5, -0.0, 3.0, 15.0: what it said before
    assert not (tmp_path / "plan.json").exists()
    code, _, err = run(monkeypatch, capsys, "recommend", report, f"--energy={typed}")  # the = form too
    assert code == 2 and f"got {typed}.\n" in err, err


def test_the_number_of_an_option_not_typed_stays_as_printed(monkeypatch, capsys, report):
    """--alpha -1 with alpha-rule constant: the typed -1 as typed; a number beside it that no option typed (the
    default scale, 2.0) as the library prints it."""
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--alpha-rule", "constant", "--alpha", "-1")
    assert code == 2 and "--alpha must be > 0, got -1.\n" in err, err
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--scale", "-1.0")  # typed as printed: unchanged
    assert code == 2 and "--scale must be > 0, got -1.0." in err, err
    argv = ["recommend", "r", "--alpha-rule", "constant", "--alpha", "-1"]
    assert _cli_words("alpha must be > 0, got -1.0 (scale 2.0).", argv) == "--alpha must be > 0, got -1 (scale 2.0)."


@pytest.mark.parametrize("args, said, before", [
    (["analyze", "{b}", "{t}", "--resolve", "2"], "--resolve: 2 must be an energy fraction", "2.0"),
    (["train", "{b}", "--data", "{d}", "--lr", "-1"], "--lr must be positive, got -1.\n", "-1.0"),
    (["train", "{b}", "--data", "{d}", "--alpha", "-2"], "--alpha must be positive, got -2.\n", "-2.0"),
    (["extract", "{b}", "{t}", "--rank", "4", "--alpha", "-2"], "--alpha must be positive, got -2 (the update",
     "-2.0"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--epsilon", "-1e0"], "units, got -1e0.\n", "-1.0"),
    (["recommend", "{r}", "--uniform", "--uniform-share", "2"], "--uniform-share must be in (0, 1], got 2.\n",
     "2.0"),
    (["bench", "make-pair", "{o}", "--tail", "2"], "--tail: 2 must be in [0, 1).", "2.0"),
])
def test_every_commands_float_options_are_named_as_typed(monkeypatch, capsys, pair, report, tmp_path, args, said,
                                                         before):
    data = tmp_path / "eval.txt"
    data.write_text("some text to evaluate on\n" * 4)
    fill = {"b": pair[0], "t": pair[1], "r": report, "d": data, "o": tmp_path / "out"}
    extra = [] if args[0] == "bench" else ["-o", tmp_path / "out"]
    code, _, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args], *extra)
    assert code == 2 and said in err, err
    assert before not in err  # typer's float of what was typed: what it said before
    assert not (tmp_path / "out").exists()


def test_a_word_that_is_no_number_keeps_typers_own_refusal(monkeypatch, capsys, report):
    """Negative control: typer refuses "2x" itself, as a usage error, before the command runs."""
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--energy", "2x")
    assert code == 2 and "Invalid value for '--energy'" in err and "got" not in err, err


def test_accepted_values_are_the_numbers_they_were(monkeypatch, capsys, report):
    """--energy 0.90 and 0.9 make the same plan: the command still passes the float."""
    code, first, err = run(monkeypatch, capsys, "recommend", report, "--energy", "0.9", "--json")
    assert code == 0, err
    code, second, err = run(monkeypatch, capsys, "recommend", report, "--energy", "0.90", "--json")
    assert code == 0, err
    assert json.loads(first) == json.loads(second)


def test_only_the_typed_number_is_rewritten():
    argv = ["recommend", "r", "--energy", "2"]
    said = "--energy must be in (0, 1], got 2.0."
    assert _cli_words(said, argv) == "--energy must be in (0, 1], got 2."
    # not inside a longer number, a path or a version
    for text in ("got 12.0.", "got 2.05.", "got -2.0.", "see run-2.0/plan.json", "v2.0.1", "/data/2.0/x", "x2.0"):
        assert _cli_words(text, argv) == text, text
    # the last one given counts, as it does for the command
    assert _cli_words("got 3.0.", ["recommend", "r", "--energy", "2", "--energy", "3"]) == "got 3."
    # an int option is not a float's text: --rank 2 leaves a 2.0
    assert _cli_words("got 2.0.", ["recommend", "r", "--rank", "2"]) == "got 2.0."
    # a command without float options, and no command: unchanged
    assert _cli_words("got 2.0.", ["show", "2"]) == "got 2.0."
    assert _cli_words("got 2.0.", []) == "got 2.0."


def test_one_number_typed_two_ways_is_left_as_printed():
    """--scale 2 --alpha 2.00 both print 2.0: which one a message means cannot be told, so neither text is put."""
    text = "--scale and alpha must be > 0, got 2.0, 2.0."
    assert _cli_words(text, ["recommend", "r", "--scale", "2", "--alpha", "2.00"]) == text
    assert _cli_words(text, ["recommend", "r", "--scale", "2", "--alpha", "2"]) == \
        "--scale and alpha must be > 0, got 2, 2."


def test_a_value_typed_as_the_printed_number_is_left_as_it_is(monkeypatch, capsys, tmp_path):
    """A model folder named 2.0, named back by the error, is the user's own word: --lr 2 does not make it "2"."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(monkeypatch, capsys, "train", "2.0", "--data", "eval.txt", "--lr", "2", "-o", "out")
    assert code == 2 and "checkpoint '2.0' does not exist" in err, err
    text = "cannot read 2.0: no such file"
    assert _cli_words(text, ["train", "2.0", "--lr", "2"]) == text
    assert _cli_words(text, ["train", "--output=2.0", "--lr", "2"]) == text
    # negative control: without the folder typed, the number is the option's
    assert _cli_words(text, ["train", "m", "--lr", "2"]) == "cannot read 2: no such file"


@pytest.mark.parametrize("path", ["1.0.json", "run 1.0.json", "out/1.0"])
def test_a_path_that_holds_the_printed_number_is_named_as_typed(monkeypatch, capsys, report, tmp_path, path):
    """recommend --energy 1 -o 1.0.json onto a file it may not replace: the refusal names 1.0.json, the user's own
    path, not "1.json" (the number rewritten inside it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("{}")  # a file spectra did not write
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--energy", "1", "-o", path)
    assert code != 0 and f"-o {path} exists" in err.replace("\n", ""), err  # it said "-o 1.json exists"


def test_the_users_own_words_and_computed_infinities_are_left_as_printed():
    argv = ["recommend", "r", "--energy", "2", "-o", "2.0.json"]
    assert _cli_words("cannot write 2.0.json: exists; got 2.0.", argv) == "cannot write 2.0.json: exists; got 2."
    argv = ["recommend", "r", "--energy", "2", "-o", "run 2.0"]
    assert _cli_words("cannot write 'run 2.0'; got 2.0.", argv) == "cannot write 'run 2.0'; got 2."
    argv = ["recommend", "r", "--energy", "2", "--output=/tmp/run 2.0"]
    assert _cli_words("cannot write '/tmp/run 2.0'.", argv) == "cannot write '/tmp/run 2.0'."
    # negative control: the same text where the user typed no such path is the option's number
    assert _cli_words("cannot write 'run 2.0'; got 2.0.", ["recommend", "r", "--energy", "2"]) == \
        "cannot write 'run 2'; got 2."
    # a file name that is not typed but holds the number (2.0.json) is not rewritten either
    assert _cli_words("wrote 2.0.json", ["recommend", "r", "--energy", "2"]) == "wrote 2.0.json"
    # 1e400 is inf, nan is nan: an "inf" in a message may be any overflow, so it is never put as typed
    for typed in ("1e400", "-1e400", "NaN"):
        argv = ["recommend", "r", "--energy", typed]
        text = "a loss of inf and -inf and nan; got inf"
        assert _cli_words(text, argv) == "a loss of inf and -inf and nan; got inf", typed
