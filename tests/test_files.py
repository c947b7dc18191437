"""Files that appear whole or not at all: atomic writes and staged directories."""

from __future__ import annotations

import os
import stat

import pytest

from spectra.files import staged_directory, write_atomic, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_atomic_replaces_whole_with_umask_permissions(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    assert write_text_atomic(target, "new ✓") == target
    assert target.read_text(encoding="utf-8") == "new ✓"
    reference = tmp_path / "plain"
    reference.write_text("")  # what a plain open() gives under this umask
    assert _mode(target) == _mode(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.md"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]
    def fails_before_writing(tmp):
        raise ValueError("no figure")

    with pytest.raises(ValueError):
        write_atomic(tmp_path / "new.png", fails_before_writing)
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]  # a writer that made nothing: nothing left


def test_staged_directory_swaps_whole_or_not_at_all(tmp_path):
    out = tmp_path / "report"
    with staged_directory(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".report.") and not out.exists()
        (staging / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"

    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "b.txt").write_text("2")
            raise RuntimeError("failed midway")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the old directory, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # staging removed

    with staged_directory(out) as staging:  # an existing directory is replaced in one swap
        (staging / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # the set-aside old one is gone


def test_staged_files_get_the_umask_permissions(tmp_path):
    """A library that writes owner-only files (safetensors ≥ 0.8: 0600) into a staged directory does not
    decide the final mode; a plain open() under the same umask does."""
    reference = tmp_path / "plain"
    reference.write_text("")
    with staged_directory(tmp_path / "out") as staging:
        (staging / "sub").mkdir()
        for path in (staging / "weights.safetensors", staging / "sub" / "w.bin"):
            path.write_bytes(b"x")
            path.chmod(0o600)
    for path in (tmp_path / "out" / "weights.safetensors", tmp_path / "out" / "sub" / "w.bin"):
        assert _mode(path) == _mode(reference), path


def test_staged_directory_creates_missing_parents(tmp_path):
    with staged_directory(tmp_path / "x" / "y" / "out") as staging:
        (staging / "f").write_text("")
    assert (tmp_path / "x" / "y" / "out" / "f").exists()


def test_a_killed_runs_temporaries_are_removed_by_the_next_write(tmp_path):
    """A SIGKILLed process leaves its staging directory or file behind; the next write of the same destination
    removes those of dead processes of this host, and keeps a live process's and another host's."""
    import signal
    import subprocess
    import sys

    from spectra.files import _HOST

    code = ("import os, sys, time; from spectra.files import staged_directory\n"
            "with staged_directory(sys.argv[1]) as d:\n"
            "    (d / 'half').write_text('x'); print(d, flush=True); time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "report")], stdout=subprocess.PIPE,
                          text=True) as proc:
        staging = proc.stdout.readline().strip()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    live = tmp_path / f".report.tmp-{_HOST}-{os.getpid()}-0000"  # this process: alive
    other = tmp_path / f".report.tmp-otherhost-{proc.pid}-0000"  # another host's: may be alive there
    dead_file = tmp_path / f".plan.json.tmp-{_HOST}-{proc.pid}-0000"
    for path in (live, other):
        path.mkdir()
    dead_file.write_text("half")
    assert os.path.isdir(staging)
    with staged_directory(tmp_path / "report") as d:
        (d / "whole").write_text("y")
    write_text_atomic(tmp_path / "plan.json", "{}")
    assert not os.path.exists(staging) and not dead_file.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "report" / "whole").read_text() == "y"


def test_hosts_whose_names_differ_only_in_punctuation_or_past_24_characters_are_told_apart():
    """The tag in temporaries' names stripped punctuation and cut at 24 characters: two cluster nodes were one host."""
    from spectra.files import _host_tag

    names = ["gpu-cluster-production-node-01", "gpu-cluster-production-node-02", "web-1", "web1"]
    assert len({_host_tag(n) for n in names}) == len(names)


def test_refuse_replacing_others_allows_only_what_the_command_writes(tmp_path):
    """--overwrite replaced any directory whole; now only one holding a record of the command and nothing else."""
    from spectra.errors import ConfigError
    from spectra.files import refuse_replacing_others

    def check(out, overwrite=True):
        refuse_replacing_others(out, command="analyze", overwrite=overwrite)

    check(tmp_path / "new")  # nothing there
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    for name in ("analysis.json", "report.md", "figures/decay.png"):
        (run / name).write_text("x")
    check(run)
    with pytest.raises(ConfigError, match="exists; pass overwrite=True to replace it"):
        check(run, overwrite=False)
    (run / "figures" / "thesis.tex").write_text("mine")  # deep inside: named too
    with pytest.raises(ConfigError, match="holds figures/thesis.tex, which `spectra analyze` does not write"):
        check(run)
    (run / "figures" / "thesis.tex").unlink()
    (run / "analysis.json").unlink()
    with pytest.raises(ConfigError, match="holds no analysis.json"):
        check(run)
    (tmp_path / "file").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is a file; `spectra analyze` writes a directory there"):
            check(tmp_path / "file", overwrite)


def test_a_directory_never_replaces_a_file_and_a_replaced_file_leaves_nothing(tmp_path):
    """staged_directory over a file swapped it for a directory and left the file behind as a hidden .old sibling."""
    from spectra.errors import ConfigError
    from spectra.files import move_into_place

    (tmp_path / "f").write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        with staged_directory(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    (tmp_path / "g").write_text("new")
    move_into_place(tmp_path / "g", tmp_path / "f")  # a file replaced by a file: no set-aside copy stays
    assert (tmp_path / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_staged_directory_given_its_command_applies_the_overwrite_rule_before_staging(tmp_path):
    """staged_directory replaced any folder whole (the rule lived in the CLI only): given the writer's command, it
    refuses a folder holding a foreign file (left intact, nothing staged) and replaces one the command wrote."""
    from spectra.errors import ConfigError

    out = tmp_path / "run"
    with staged_directory(out, command="analyze", overwrite=False) as staging:  # new: written
        (staging / "analysis.json").write_text("old")
    with pytest.raises(ConfigError, match="exists; pass overwrite=True to replace it"):  # negative control: no overwrite, refused
        with staged_directory(out, command="analyze"):
            pass
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(ConfigError, match="out_dir .* holds thesis.tex, which `spectra analyze` does not write"):
        with staged_directory(out, command="analyze", overwrite=True):
            raise AssertionError("staged although the folder holds a foreign file")
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left beside it
    with pytest.raises(ConfigError, match="holds analysis.json, which `spectra train` does not write"):
        with staged_directory(out, command="train", overwrite=True):  # another command's output: not its own
            pass
    (out / "thesis.tex").unlink()
    with staged_directory(out, command="analyze", overwrite=True) as staging:  # what it wrote: replaced
        (staging / "analysis.json").write_text("new")
    assert (out / "analysis.json").read_text() == "new"
    with staged_directory(out, overwrite=True) as staging:  # without a command the caller decides (a raw swap)
        (staging / "x").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    with pytest.raises(ValueError, match="'analyse' has no entry in spectra.files.OUTPUTS"):
        with staged_directory(out, command="analyse", overwrite=True):
            pass



def test_train_records_the_files_it_saved_and_overwrite_replaces_those_alone(tmp_path):
    """A tokenizer's vocabulary files vary by family (PhoBERT's bpe.codes, Marian's source.spm): no pattern list holds
    them all, so train's record lists what it saved, and a rerun with overwrite replaces exactly those. A file the
    record does not list (a model card added by hand) is refused; so is extract's folder with a README.md, which
    extract never writes."""
    import json

    from spectra.errors import ConfigError
    from spectra.files import refuse_replacing_others

    out = tmp_path / "adapter"
    (out / "sub").mkdir(parents=True)
    saved = ["adapter_model.safetensors", "bpe.codes", "spectra_train.json", "sub/source.spm"]
    for name in saved:
        (out / name).write_text("x")
    (out / "spectra_train.json").write_text(json.dumps({"files": saved}))
    refuse_replacing_others(out, command="train", overwrite=True)  # its own files: replaced

    (out / "README.md").write_text("my model card")
    with pytest.raises(ConfigError, match="holds README.md, which `spectra train` does not write"):
        refuse_replacing_others(out, command="train", overwrite=True)

    (out / "README.md").unlink()
    (out / "spectra_train.json").write_text(json.dumps({"steps": 3}))  # a record from before the list: patterns
    with pytest.raises(ConfigError, match="holds (bpe.codes|sub), which"):
        refuse_replacing_others(out, command="train", overwrite=True)

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (extracted / name).write_text("{}")
    with pytest.raises(ConfigError, match="holds README.md, which `spectra extract` does not write"):
        refuse_replacing_others(extracted, command="extract", overwrite=True)
