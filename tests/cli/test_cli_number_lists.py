"""Options that take comma-separated numbers (sweep --ranks, verify --sweep, bench svd --ks and --shapes, analyze
--energy) read each item as a number option reads its text (options._NumberList, one parser for all of them), so a
bad item is refused at once in one line naming the option, the list and the item as typed. Before, `--ranks 4,x`
said "expected comma-separated ranks like 1,2,4,8" without naming the item, `--ranks 4,,8` and `--ks 64,,256` were
taken as 4,8 and 64,256 (the empty item dropped), and `--ranks 4,-1` reached the library ("ranks [4, -1]: …")."""

from __future__ import annotations

import re

import pytest

from spectra.cli.options import TypedFloat, TypedInt, _NumberList
from tests.cli.test_cli import run
from tests.cli.test_cli_typed_numbers import _commands

_RANKS = "expected comma-separated ranks ≥ 0 like 0,1,2,4,8."


# (what was typed, the problem the refusal names): each kind of bad item
@pytest.mark.parametrize("typed, problem", [
    ("4,x", "'x' is not an integer"),
    ("4,-1", "-1 is less than 0"),
    ("4,,8", "item 2 is empty"),
    ("4,8,,", "item 3 is empty"),
    (",", "item 1 is empty"),
    ("4.5", "'4.5' is not an integer"),
    ("4,1e3", "'1e3' is not an integer"),
    ("", "nothing given"),
    (" ", "nothing given"),
    ("true", "'true' is not an integer"),
    ("1,False", "'False' is not an integer"),
])
def test_sweep_refuses_a_bad_rank_naming_it_as_typed(monkeypatch, capsys, tmp_path, typed, problem):
    # BASE and TUNED do not exist: a list taken would be refused for them instead, after the parse
    code, out, err = run(monkeypatch, capsys, "sweep", tmp_path / "b", tmp_path / "t", "--data", tmp_path / "d.txt",
                         "--ranks", typed, "-o", tmp_path / "out")
    assert code == 2 and not out, err
    first, *rest = err.splitlines()
    assert first == f"error: --ranks {typed!r}: {problem}; {_RANKS}", err  # one line, the item as typed
    assert rest == ["(run with --debug for the full traceback)"] and "Usage:" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, said", [
    (["verify", "{b}", "{t}", "--data", "{d}", "--sweep", "0,4"],
     "error: --sweep '0,4': 0 is less than 1; expected comma-separated ranks ≥ 1 like 1,2,4,8.\n"),
    (["verify", "{b}", "{t}", "--data", "{d}", "--sweep", "4,x"],
     "error: --sweep '4,x': 'x' is not an integer; expected comma-separated ranks ≥ 1 like 1,2,4,8.\n"),
    (["bench", "svd", "--quick", "--kinds", "planted", "--ks", "2,,4", "-o", "{o}"],
     "error: --ks '2,,4': item 2 is empty; expected top-k sizes like 64,256, each a positive integer.\n"),
    (["bench", "svd", "--quick", "--kinds", "planted", "--shapes", "32x48,x", "-o", "{o}"],
     "error: --shapes '32x48,x': '' is not an integer; expected OUTxIN shapes"),
    (["analyze", "{b}", "{t}", "--energy", "0.9,,0.5", "-o", "{o}"],
     "error: --energy '0.9,,0.5': item 2 is empty; expected comma-separated fractions like 0.5,0.9,0.99.\n"),
])
def test_every_number_list_refuses_a_bad_item_naming_it(monkeypatch, capsys, tmp_path, args, said):
    fill = {"b": tmp_path / "b", "t": tmp_path / "t", "d": tmp_path / "d.txt", "o": tmp_path / "out"}
    code, out, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args])
    assert code == 2 and err.startswith(said), err
    assert not (tmp_path / "out").exists()


def test_every_list_of_numbers_is_read_by_the_one_parser():
    """The options above, and any option whose default is a list of numbers, parse with _NumberList: a list option
    added with its own split(",") and int() is caught."""
    lists = {}
    for path, command in _commands():
        for param in command.params:
            parser = getattr(getattr(getattr(param, "type_descriptor", None), "parameter_info", None), "parser", None)
            if isinstance(parser, _NumberList):
                lists[(*path, param.name)] = parser
            elif isinstance(param.default, str) and re.fullmatch(r"[\d.x]+(,[\d.x]+)+", param.default):
                raise AssertionError(f"{path} --{param.name} {param.default!r} is not read by _NumberList")
    assert set(lists) >= {("sweep", "ranks"), ("verify", "sweep"), ("bench", "svd", "ks"), ("bench", "svd", "shapes"),
                          ("analyze", "energy")}, lists
    assert lists[("sweep", "ranks")].least == 0 and lists[("verify", "sweep")].least == 1


def test_a_good_list_is_the_numbers_each_printed_as_typed():
    ranks = _NumberList(int, "ranks", least=0)(" 0, 02,+4 ")
    assert ranks == (0, 2, 4) and all(type(r) is TypedInt for r in ranks)
    assert [str(r) for r in ranks] == ["0", "02", "+4"]  # an echo quotes the item as typed
    energy = _NumberList(float, "fractions")("0.50,9e-1")
    assert energy == (0.5, 0.9) and [type(e) for e in energy] == [TypedFloat, TypedFloat] and str(energy[1]) == "9e-1"
    shapes = _NumberList(int, "shapes", least=1, form="OUTxIN")("32x48,8X016")
    assert shapes == ((32, 48), (8, 16))
    assert _NumberList(int, "ranks")((1, 2)) == (1, 2)  # a declared default that is no text: its numbers
    assert _NumberList(int, "ranks")("1,2,4,") == (1, 2, 4)  # one trailing comma is taken, as before the parser
    # negative control: each refusal of the parser itself
    for text, problem in (("0x5", "0 is less than 1"), ("32x48x2", "'32x48x2' is not OUTxIN"), ("a", "'a' is not")):
        with pytest.raises(ValueError, match=re.escape(f"{text!r}: {problem}")):
            _NumberList(int, "shapes", least=1, form="OUTxIN")(text)


def test_sweep_and_verify_pass_the_numbers_on(monkeypatch, capsys, tmp_path):
    """The library gets plain ints: verify's --adapters-dir check names lora-r2 for --sweep 02 (the folder rank_sweep
    writes), and --recommended 02 reaches the report as 2, not the typed "02" ("recommended r=02" in its figure)."""
    import spectra.lora.verify
    import spectra.sweep

    seen = {}

    class Stop(Exception):
        pass

    def record(name):
        def call(*args, **kwargs):
            seen[name] = kwargs
            raise Stop

        return call

    monkeypatch.setattr(spectra.sweep, "truncation_sweep", record("sweep"))
    monkeypatch.setattr(spectra.lora.verify, "rank_sweep", record("verify"))
    data = tmp_path / "d.txt"
    data.write_text("text\n")
    with pytest.raises(Stop):
        run(monkeypatch, capsys, "sweep", tmp_path / "b", tmp_path / "t", "--data", data, "--ranks", "0,02,+4",
            "-o", tmp_path / "s")
    assert list(seen["sweep"]["ranks"]) == [0, 2, 4] and all(type(r) is int for r in seen["sweep"]["ranks"])
    with pytest.raises(Stop):
        run(monkeypatch, capsys, "verify", tmp_path / "b", tmp_path / "t", "--data", data, "--sweep", "02,4",
            "--recommended", "02", "-o", tmp_path / "v")
    assert seen["verify"]["ranks"] == [2, 4] and all(type(r) is int for r in seen["verify"]["ranks"])
    recommended = seen["verify"]["recommended_rank"]
    assert recommended == 2 and type(recommended) is int and f"r={recommended}" == "r=2"
    # the folder a run of --sweep 02 would replace is lora-r2: one holding another file is refused by its name
    (tmp_path / "v-adapters" / "lora-r2").mkdir(parents=True)
    (tmp_path / "v-adapters" / "lora-r2" / "notes.txt").write_text("mine")
    code, _, err = run(monkeypatch, capsys, "verify", tmp_path / "b", tmp_path / "t", "--data", data, "--sweep", "02",
                       "-o", tmp_path / "v")
    assert code == 2 and "lora-r2" in err and "lora-r02" not in err, err
