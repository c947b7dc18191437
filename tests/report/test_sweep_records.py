"""`spectra sweep` (a truncation sweep) and `spectra verify --sweep` (a rank sweep) both write a sweep.json: each
record says the command that wrote it, --overwrite replaces only a record of its own command, and the readers refuse
the other kind by name. Before, `verify --sweep -o D --overwrite` replaced a `spectra sweep` report in D (and the
reverse), and load_result read a truncation sweep as a verify report."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from spectra.cli import app
from spectra.errors import ConfigError
from spectra.files import command_of, record_origin, record_writer, refuse_replacing_others
from spectra.ranks import RankPolicy, functional_ranks, read_sweep, recommend_ranks
from spectra.report.sweep import write_truncation_report
from spectra.report.verify import load_result, write_sweep_report, write_verify_report
from spectra.sweep import SweepResult
from tests.models import planted_gpt2, save
from tests.report.test_verify_report import verify_result

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def cli(*args) -> tuple[int, str]:
    """The exit code and the output, with a library error in the command's words as `spectra` prints it
    (``overwrite=True`` read as ``--overwrite``)."""
    from spectra.cli.messages import _cli_message

    result = CliRunner().invoke(app, [str(a) for a in args])
    message = ("" if result.exception is None or isinstance(result.exception, SystemExit)
               else _cli_message(result.exception, [str(a) for a in args]))
    return result.exit_code, result.output + message


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The planted GPT-2 pair, its analysis, its truncation sweep (`spectra sweep`, in S) and its rank sweep
    (`spectra verify --sweep`, in R, its adapters in R-adapters), as the CLI writes them."""
    root = tmp_path_factory.mktemp("sweep_records")
    base, tuned = planted_gpt2()
    pair = save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")
    data = root / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    runs = {"analysis": ("analyze", *pair, "--no-cache", "-q", "-o", root / "A"),
            "S": ("sweep", *pair, "--data", data, "--ranks", "1", "--bootstrap", "0", "--max-length", "16", "-q",
                  "-o", root / "S"),
            "R": ("verify", *pair, "--sweep", "1", "--data", data, "--max-steps", "1", "-q", "-o", root / "R")}
    for args in runs.values():
        code, output = cli(*args)
        assert code == 0, output
    return {"root": root, "pair": pair, "data": data, "A": root / "A", "S": root / "S", "R": root / "R"}


def copied(made, name, tmp_path, *, older=False):
    """A copy of report `name` to change; `older`: its sweep.json as written before records said their command."""
    out = shutil.copytree(made[name], tmp_path / name)
    if older:
        record = json.loads((out / "sweep.json").read_text())
        record.pop("command", None)
        (out / "sweep.json").write_text(json.dumps(record))
    return out


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_record_says_the_command_that_wrote_it(made, tmp_path):
    truncation = json.loads((made["S"] / "sweep.json").read_text())
    rank = json.loads((made["R"] / "sweep.json").read_text())
    assert list(truncation)[:3] == ["schema_version", "kind", "command"]  # at the head, beside the kind it refines
    assert (truncation["kind"], truncation["command"]) == ("truncation_sweep", "sweep")
    assert (rank["kind"], rank["command"]) == ("sweep", "verify --sweep")
    adapter = json.loads((write_verify_report(verify_result(), tmp_path / "V") / "verify.json").read_text())
    assert adapter["command"] == "verify --adapter" and list(adapter)[:2] == ["schema_version", "command"]
    # the analysis (and the demo, written by the same write_bundle) keep their schema: no name of theirs is shared
    assert "command" not in json.loads((made["A"] / "analysis.json").read_text())
    assert (record_writer(truncation), record_writer(rank), command_of("verify --sweep")) == ("sweep", "verify --sweep",
                                                                                               "verify")
    for older, writer in (("truncation_sweep", "sweep"), ("sweep", "verify --sweep")):  # a record before the key
        assert record_writer({"kind": older}) == writer
    assert record_writer({"modules": []}) is None and record_writer("x") is None  # control: nothing tells
    assert record_origin(rank) == "a rank sweep of `spectra verify --sweep`"


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older"])
def test_verify_overwrite_refuses_a_spectra_sweep_report_and_trains_nothing(made, tmp_path, older):
    S = copied(made, "S", tmp_path, older=older)
    kept = contents(S)
    adapter = made["root"] / "R-adapters" / "lora-r1"
    for mode in (("--sweep", "1", "--data", made["data"], "--max-steps", "1"), ("--adapter", adapter)):
        code, output = cli("verify", *made["pair"], *mode, "-q", "-o", S, "--overwrite")
        assert code != 0 and "holds sweep.json, a truncation sweep of `spectra sweep`: --overwrite replaces only a " \
                             "directory that `spectra verify` wrote" in output, output
    assert contents(S) == kept and not (tmp_path / "S-adapters").exists()  # refused before the first run trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S"]  # nothing staged or set aside beside it


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older"])
def test_sweep_overwrite_refuses_a_rank_sweep_report(made, tmp_path, older):
    R = copied(made, "R", tmp_path, older=older)
    kept = contents(R)
    code, output = cli("sweep", *made["pair"], "--data", made["data"], "--ranks", "1", "--bootstrap", "0",
                       "--max-length", "16", "-q", "-o", R, "--overwrite")
    assert code != 0 and ("holds sweep.json, a rank sweep of `spectra verify --sweep`: --overwrite replaces only a "
                          "directory that `spectra sweep` wrote") in output, output
    assert contents(R) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["R"]
    truncation = json.loads((made["S"] / "sweep.json").read_text())
    with pytest.raises(ConfigError, match="a rank sweep of `spectra verify --sweep`"):  # the library's writer too
        write_truncation_report(truncation, R, overwrite=True)
    assert contents(R) == kept


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older"])
def test_each_command_still_replaces_its_own_report(made, tmp_path, older):
    """Negative control: a sweep.json of the same command, with or without the key, is replaced (and gains it)."""
    S, R = copied(made, "S", tmp_path, older=older), copied(made, "R", tmp_path, older=older)
    (S / "report.md").write_text("stale")
    code, output = cli("sweep", *made["pair"], "--data", made["data"], "--ranks", "1", "--bootstrap", "0",
                       "--max-length", "16", "-q", "-o", S, "--overwrite")
    assert code == 0, output
    assert (S / "report.md").read_text() != "stale" and json.loads((S / "sweep.json").read_text())["command"] == "sweep"
    rank = json.loads((R / "sweep.json").read_text())
    (R / "report.md").write_text("stale")
    write_sweep_report(rank, R, overwrite=True)  # the rank sweep's own writer, over its own older report
    assert (R / "report.md").read_text() != "stale"
    assert json.loads((R / "sweep.json").read_text())["command"] == "verify --sweep"
    write_verify_report(verify_result(), R, overwrite=True)  # verify --adapter and --sweep share -o: one command
    assert sorted(p.name for p in R.iterdir()) == ["figures", "report.html", "report.md", "verify.json"]


def test_a_sweep_json_that_says_no_writer_is_refused_by_both(made, tmp_path):
    """Under a name two commands write, a record must say which: a sweep.json of neither kind is no one's to replace
    (by name alone it passed for both)."""
    out = shutil.copytree(made["S"], tmp_path / "D")
    (out / "sweep.json").write_text(json.dumps({"schema_version": 1, "points": []}))
    for command in ("sweep", "verify"):
        with pytest.raises(ConfigError, match=r"holds sweep.json, which says neither the command that wrote it "
                                              r"\(\"command\"\) nor its \"kind\" \(`spectra sweep` and `spectra "
                                              r"verify` each write a sweep.json\)"):
            refuse_replacing_others(out, command=command, overwrite=True)
    # another command's folder names what the record is, beside the file it does not write
    with pytest.raises(ConfigError, match=r"holds sweep.json \(a truncation sweep of `spectra sweep`\), which "
                                          r"`spectra analyze` does not write"):
        refuse_replacing_others(made["S"], command="analyze", overwrite=True)


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older"])
def test_functional_readers_refuse_a_rank_sweep_naming_it(made, tmp_path, older):
    R = copied(made, "R", tmp_path, older=older)
    said = (f"{R / 'sweep.json'} is a rank sweep of `spectra verify --sweep`; --functional (functional_ranks, "
            "SweepResult.load) takes the truncation sweep of `spectra sweep`")
    for read in (lambda: functional_ranks(R, 0.01), lambda: read_sweep(R / "sweep.json"), lambda: SweepResult.load(R),
                 lambda: recommend_ranks(made["A"], RankPolicy(energy=None, functional=0.01), sweep=R)):
        with pytest.raises(ConfigError) as raised:
            read()
        assert str(raised.value).startswith(said), raised.value
    code, output = cli("recommend", made["A"], "--functional", "0.01", "--sweep", R)
    assert code != 0 and "is a rank sweep of `spectra verify --sweep`; --functional" in output, output
    code, output = cli("recommend", made["A"], "--functional", "0.01", "--sweep", made["S"], "--json")  # control
    assert code == 0 and json.loads(output)["modules"], output
    assert functional_ranks(made["S"], 0.01)["groups"]["model"]["swept"] == [1]


@pytest.mark.parametrize("older", [False, True], ids=["recorded", "older"])
def test_load_result_refuses_a_truncation_sweep_naming_it(made, tmp_path, older):
    S = copied(made, "S", tmp_path, older=older)
    with pytest.raises(ConfigError, match="is a truncation sweep of `spectra sweep`; load_result reads the reports of "
                                          r"`spectra verify` \(verify.json of --adapter, sweep.json of --sweep\)"):
        load_result(S)
    assert load_result(made["R"])["runs"][0]["rank"] == 1  # control: the rank sweep it reads


def test_report_writers_refuse_data_of_the_other_kind(made, tmp_path):
    truncation = json.loads((made["S"] / "sweep.json").read_text())
    rank = json.loads((made["R"] / "sweep.json").read_text())
    for write, data, said in (
            (write_sweep_report, truncation, "is a truncation sweep of `spectra sweep`; write_sweep_report writes a "
                                             "rank sweep of `spectra verify --sweep`"),
            (write_verify_report, truncation, "is a truncation sweep of `spectra sweep`; write_verify_report writes "
                                              "an adapter check of `spectra verify --adapter`"),
            (write_truncation_report, rank, "is a rank sweep of `spectra verify --sweep`; write_truncation_report "
                                            "writes the truncation sweep of `spectra sweep`")):
        with pytest.raises(ConfigError, match=said):
            write(data, tmp_path / "new")
    assert not list(tmp_path.iterdir())
