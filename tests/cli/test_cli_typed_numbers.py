"""A number option is named back as the user typed it: `recommend --energy 2` said "got 2.0", the float typer made of
"2". Every float and int option reads its text as a number that prints as typed (options.TypedFloat, TypedInt), so a
refusal quotes it with no rewriting of the message; a text that is no number, or a value outside the option's range,
is refused in spectra's words, naming the option. The numbers the commands pass on are unchanged."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import typer

from spectra.cli import app
from spectra.cli.options import TypedFloat, TypedInt, _typed_float, _typed_int, _typed_seed
from spectra.cli.switches import SpectraCommand
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    from spectra.analysis import analyze

    out = tmp_path_factory.mktemp("report") / "run"
    analyze(pair[0], pair[1], cache_dir=False, progress=False).write_report(out)
    return out


def _commands(command=None, path=()):
    """Every command of the app, by its words (("bench", "svd"), ...)."""
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def test_every_number_option_reads_its_text_as_typed():
    """One rule for every command: each float option is parsed by _typed_float, each int option by _typed_int, in a
    command that turns their refusals into spectra's (SpectraCommand). A number option added without it is caught."""
    seen = {float: 0, int: 0}
    for path, command in _commands():
        for param in command.params:
            descriptor = getattr(param, "type_descriptor", None)
            kind = getattr(descriptor, "annotation", None)
            if kind not in (float, int):
                continue
            seen[kind] += 1
            parser = descriptor.parameter_info.parser
            if param.name == "seed":  # a seed is refused outside the range torch and numpy take (bench svd: its own)
                assert parser is _typed_seed or (parser is _typed_int and param.min == 0), (path, parser)
                continue
            assert parser is {float: _typed_float, int: _typed_int}[kind], (path, param.name, parser)
            assert isinstance(command, SpectraCommand), path
    assert seen[float] >= 15 and seen[int] >= 30, seen  # the check saw the options (18 and 35 today)


@pytest.mark.parametrize("typed", ["2", "2.0", "1.50", "2e0", "-0", "+3", "1_5", "1e400", "NaN"])
def test_recommend_names_a_refused_energy_as_typed(monkeypatch, capsys, report, tmp_path, typed):
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--energy", typed, "-o", tmp_path / "plan.json")
    assert code == 2 and f"error: --energy must be in (0, 1], got {typed}.\n" in err, err
    if str(float(typed)) != typed:
        assert f"got {float(typed)}." not in err  # 2.0, 1.5, -0.0, 3.0, 15.0, inf, nan: what it said before
    assert not (tmp_path / "plan.json").exists()
    code, _, err = run(monkeypatch, capsys, "recommend", report, f"--energy={typed}")  # the = form too
    assert code == 2 and f"got {typed}.\n" in err, err


# (command, its arguments, what the refusal says): a typed 2, 2.0, 1e-3, a 0.9,2 list, a non-number, a negative int
_REFUSED = [
    (["recommend", "{r}", "--energy", "2"], "--energy must be in (0, 1], got 2.\n"),
    (["recommend", "{r}", "--energy", "2.0"], "--energy must be in (0, 1], got 2.0.\n"),
    (["recommend", "{r}", "--scale", "-1e-3"], "--scale must be > 0, got -1e-3.\n"),
    (["recommend", "{r}", "--energy", "abc"], "--energy 'abc': expected a number.\n"),
    (["recommend", "{r}", "--rank", "-3"], "--rank must be a positive integer, got -3.\n"),
    (["recommend", "{r}", "--rank", "1e-3"], "--rank '1e-3': expected an integer.\n"),
    (["recommend", "{r}", "--uniform", "--uniform-share", "2"], "--uniform-share must be in (0, 1], got 2.\n"),
    (["recommend", "{r}", "--alpha-rule", "constant", "--alpha", "-1"], "--alpha must be > 0, got -1.\n"),
    (["analyze", "{b}", "{t}", "--resolve", "2"], "--resolve: 2 must be an energy fraction"),
    (["analyze", "{b}", "{t}", "--resolve", "2.0"], "--resolve: 2.0 must be an energy fraction"),
    (["analyze", "{b}", "{t}", "--energy", "0.9,2"], "--energy: 2 must be an energy fraction in (0, 1]."),
    (["analyze", "{b}", "{t}", "--energy", "0.9,1e-3,2.0"], "--energy: 2.0 must be an energy fraction in (0, 1]."),
    (["analyze", "{b}", "{t}", "--full-below", "-3"], "--full-below: -3 must be ≥ 0."),
    (["analyze", "{b}", "{t}", "--workers", "abc"], "--workers 'abc': expected an integer.\n"),
    (["train", "{b}", "--data", "{d}", "--lr", "-2"], "--lr must be positive, got -2.\n"),
    (["train", "{b}", "--data", "{d}", "--lr", "-1e-3"], "--lr must be positive, got -1e-3.\n"),
    (["train", "{b}", "--data", "{d}", "--lr", "abc"], "--lr 'abc': expected a number.\n"),
    (["train", "{b}", "--data", "{d}", "--alpha", "-2.0"], "--alpha must be positive, got -2.0.\n"),
    (["train", "{b}", "--data", "{d}", "--batch-size", "-3"], "--batch-size must be a positive integer, got -3.\n"),
    (["extract", "{b}", "{t}", "--rank", "4", "--alpha", "-2"], "--alpha must be positive, got -2 (the update"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--epsilon", "-1e-3"], "units, got -1e-3.\n"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--batch-size", "-3"], "--batch-size must be ≥ 1, got -3.\n"),
    (["bench", "make-pair", "{o}", "--tail", "2"], "--tail: 2 must be in [0, 1)."),
    (["bench", "make-pair", "{o}", "--seed", "abc"], "--seed 'abc': expected an integer.\n"),
]


@pytest.mark.parametrize("args, said", _REFUSED, ids=[" ".join(a) for a, _ in _REFUSED])
def test_refusals_quote_the_typed_text_and_name_the_option(monkeypatch, capsys, pair, report, tmp_path, args, said):
    data = tmp_path / "eval.txt"
    data.write_text("some text to evaluate on\n" * 4)
    fill = {"b": pair[0], "t": pair[1], "r": report, "d": data, "o": tmp_path / "out"}
    extra = [] if args[0] == "bench" else ["-o", tmp_path / "out"]
    code, out, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args], *extra)
    assert code == 2 and err.startswith("error: ") and said in err, err
    assert "Usage:" not in err and "Invalid value" not in err  # spectra's refusal, not typer's usage box
    assert not out and not (tmp_path / "out").exists()


def test_a_value_outside_the_options_range_is_refused_as_typed(monkeypatch, capsys, report, tmp_path):
    """recommend --batch and --seq-len are declared min=1 (their help says "[x>=1]"); typer checks that range only
    with its own number parser, so the command checks it, quoting the value as typed."""
    for args, said in ((("--batch", "0"), "--batch must be ≥ 1, got 0.\n"),
                       (("--seq-len", "-00"), "--seq-len must be ≥ 1, got -00.\n")):
        code, _, err = run(monkeypatch, capsys, "recommend", report, *args, "-o", tmp_path / "plan.json")
        assert code == 2 and err.startswith("error: " + said), err
        assert not (tmp_path / "plan.json").exists()
    # negative control: the least value in range is taken
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--batch", "1", "--seq-len", "1", "--json")
    assert code == 0 and json.loads(out)["memory"] is not None, err


def test_accepted_values_are_the_numbers_they_were(monkeypatch, capsys, report):
    """--energy 0.90 and 0.9 make the same plan, --min-rank +1 and 1 too: the command passes the number on."""
    plans = []
    for args in (("--energy", "0.9"), ("--energy", "0.90"), ("--energy", "9e-1", "--min-rank", "+1")):
        code, out, err = run(monkeypatch, capsys, "recommend", report, *args, "--json")
        assert code == 0, err
        plans.append(json.loads(out))
    assert plans[0] == plans[1] == plans[2]
    assert plans[1]["policy"]["energy"] == 0.9  # JSON holds the number, not the text typed


def test_typed_numbers_print_as_typed_and_are_the_numbers():
    energy, rank = _typed_float(" 2 "), _typed_int("+3")
    assert type(energy) is TypedFloat and type(rank) is TypedInt
    assert energy == 2.0 and rank == 3 and hash(energy) == hash(2.0) and {rank: "r"}[3] == "r"
    assert (f"got {energy}", f"got {energy!r}", str(rank), f"{rank!r}") == ("got 2", "got 2", "+3", "+3")
    assert f"{energy:g} {energy:.3f} {rank:d} {rank:03d}" == "2 2.000 3 003"  # a format spec formats the number
    assert type(energy * 1) is float and type(rank + 0) is int and str(energy / 4) == "0.5"
    assert json.dumps({"energy": energy, "rank": rank, rank: 1}) == '{"energy": 2.0, "rank": 3, "3": 1}'
    for copied in (copy.copy(energy), copy.deepcopy(rank), pickle.loads(pickle.dumps(energy))):
        assert type(copied) in (TypedFloat, TypedInt) and str(copied) in ("2", "+3")
    # a default is passed through the parser as the number it was declared (typer does so): no text to keep
    for default, parser, kind in ((900, _typed_float, float), (0.9, _typed_float, float), (8, _typed_int, int)):
        parsed = parser(default)
        assert type(parsed) is kind and parsed == default
    # negative control: a text that is no number of the option's kind is refused, quoting it
    for parser, text in ((_typed_float, "abc"), (_typed_float, ""), (_typed_int, "2.0"), (_typed_int, "1e3")):
        with pytest.raises(ValueError, match=f"^{text!r}: expected"):
            parser(text)


def test_a_value_typed_as_the_printed_number_is_left_as_it_is(monkeypatch, capsys, tmp_path):
    """A model folder named 2.0, named back by the error, is the user's own word: --lr 2 does not make it "2"."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(monkeypatch, capsys, "train", "2.0", "--data", "eval.txt", "--lr", "2", "-o", "out")
    assert code == 2 and "checkpoint '2.0' does not exist" in err, err


@pytest.mark.parametrize("path", ["1.0.json", "run 1.0.json", "out/1.0"])
def test_a_path_that_holds_the_printed_number_is_named_as_typed(monkeypatch, capsys, report, tmp_path, path):
    """recommend --energy 1 -o 1.0.json onto a file it may not replace: the refusal names 1.0.json, the user's own
    path, not "1.json" (the number rewritten inside it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("{}")  # a file spectra did not write
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--energy", "1", "-o", path)
    assert code != 0 and f"-o {path} exists" in err.replace("\n", ""), err  # it said "-o 1.json exists"


def test_two_options_typed_as_one_number_are_each_named_as_typed(monkeypatch, capsys, report, tmp_path):
    """--scale 2 --alpha 2.00 are one number typed two ways: each refusal quotes its own option's text (the message
    rewriting this replaced could name neither)."""
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--uniform", "--uniform-share", "2.00",
                       "--energy", "2", "-o", tmp_path / "plan.json")
    assert code == 2 and "--energy must be in (0, 1], got 2.\n" in err, err
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--uniform", "--uniform-share", "2.00",
                       "--energy", "0.9", "-o", tmp_path / "plan.json")
    assert code == 2 and "--uniform-share must be in (0, 1], got 2.00.\n" in err, err
