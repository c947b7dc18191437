"""What -o and --overwrite may replace: never an input (nor a file in its folder), never what spectra did not write."""

from __future__ import annotations

import shutil

from tests.cli.test_cli import run


def test_recommend_never_writes_over_the_checkpoints_it_analysed(monkeypatch, capsys, pair, tmp_path):
    """`recommend REPORT -o BASE/config.json --overwrite` replaced the base's config (and -o TUNED/model.safetensors
    the fine-tune's weights): only the analysis file was checked, not the checkpoints it records."""
    base, tuned = (shutil.copytree(p, tmp_path / p.name) for p in pair)
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "-o", tmp_path / "run")
    assert code == 0, err
    before = {p: p.read_bytes() for side in (base, tuned) for p in side.iterdir()}
    for target in (base / "config.json", tuned / "model.safetensors"):
        for report in (tmp_path / "run", tmp_path / "run" / "analysis.json"):
            code, _, err = run(monkeypatch, capsys, "recommend", report, "-o", target, "--overwrite")
            assert code == 2 and "would replace what this command reads" in err, (target, err)
    assert {p: p.read_bytes() for side in (base, tuned) for p in side.iterdir()} == before
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "run", "-o", tmp_path / "plan.json")
    assert code == 0 and (tmp_path / "plan.json").is_file(), err  # negative control: beside them, written
    (tmp_path / "dir.json").mkdir()
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "run", "-o", tmp_path / "dir.json", "--overwrite")
    assert code == 2 and "is a directory; this command writes a file there" in err


def test_overwrite_replaces_only_a_directory_the_command_wrote(monkeypatch, capsys, pair, tmp_path):
    """--overwrite deleted any existing directory whole: a folder holding a user's thesis.tex, or the cache."""
    out = tmp_path / "adapter"
    extract = ("extract", *pair, "--rank", "2", "-q", "-o", out)
    for _ in range(2):  # new, then what extract wrote: replaced
        code, _, err = run(monkeypatch, capsys, *extract, "--overwrite")
        assert code == 0 and (out / "adapter_config.json").is_file(), err
    (out / "thesis.tex").write_text("mine")
    code, _, err = run(monkeypatch, capsys, *extract, "--overwrite")
    assert code == 2 and "holds thesis.tex, which `spectra extract` does not write" in err
    assert (out / "thesis.tex").read_text() == "mine" and (out / "adapter_config.json").is_file()
    code, _, err = run(monkeypatch, capsys, *extract)
    assert code == 2 and "exists; pass --overwrite" in err
    # the cache (a folder of spectra's, but not an adapter): refused, by name of something in it
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECTRA_CACHE", str(cache))
    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-q", "-o", tmp_path / "r1")
    assert code == 0 and any(cache.iterdir()), err
    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-q", "-o", cache, "--overwrite")
    assert code == 2 and "which `spectra analyze` does not write" in err and any(cache.iterdir())
    # a report of another command is not this one's to replace
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "-q", "-o", tmp_path / "r1", "--overwrite")
    assert code == 2 and "which `spectra extract` does not write" in err  # analysis.json or another of its files
    assert (tmp_path / "r1" / "analysis.json").is_file()
    # files spectra could have written, but no record file: not a directory spectra wrote
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "report.md").write_text("mine")
    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-q", "-o", tmp_path / "fig", "--overwrite")
    assert code == 2 and "holds no analysis.json" in err and (tmp_path / "fig" / "report.md").read_text() == "mine"


def test_train_refuses_a_file_and_reruns_over_its_own_output(monkeypatch, capsys, pair, tmp_path):
    """`train -o FILE --overwrite` replaced a file with a directory (analyze and extract refused); what train writes,
    adapter or full checkpoint with its tokenizer files, is replaced by a rerun with --overwrite."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    train = ("train", pair[0], "--data", data, "--max-steps", "1", "--batch-size", "4", "--max-length", "16", "-q")
    file = tmp_path / "a_file"
    file.write_text("mine")
    code, _, err = run(monkeypatch, capsys, *train, "-o", file, "--overwrite")
    assert code == 2 and "is a file" in err and file.read_text() == "mine"
    for kind in ((), ("--full",)):
        out = tmp_path / f"out{len(kind)}"
        for _ in range(2):
            code, _, err = run(monkeypatch, capsys, *train, *kind, "-o", out, "--overwrite")
            assert code == 0, err
        assert (out / "spectra_train.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a set-aside old output was left"


def test_verify_sweep_replaces_only_adapter_folders_it_wrote(monkeypatch, capsys, pair, tmp_path):
    """`verify --sweep --overwrite` replaced each {method}-r{rank} folder under --adapters-dir whole, a user's
    thesis.tex with it: the rule of -o now holds there, for every planned run before the first trains."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    ads = tmp_path / "ads"
    sweep = ("verify", *pair, "--sweep", "1,2", "--data", data, "--max-steps", "1", "-q", "--adapters-dir", ads)
    (ads / "lora-r2").mkdir(parents=True)
    (ads / "lora-r2" / "thesis.tex").write_text("mine")
    code, _, err = run(monkeypatch, capsys, *sweep, "-o", tmp_path / "v0", "--overwrite")
    assert code == 2 and "--adapters-dir" in err and "holds thesis.tex" in err, err
    assert (ads / "lora-r2" / "thesis.tex").read_text() == "mine"
    assert not (ads / "lora-r1").exists() and not (tmp_path / "v0").exists()  # refused before r1 trained
    (ads / "lora-r2" / "thesis.tex").unlink()
    code, _, err = run(monkeypatch, capsys, *sweep, "-o", tmp_path / "v1", "--overwrite")  # empty folder: written
    assert code == 0, err
    written = (ads / "lora-r1" / "adapter_model.safetensors").read_bytes()
    code, _, err = run(monkeypatch, capsys, *sweep, "-o", tmp_path / "v2")
    assert code == 2 and "lora-r1 exists; pass --overwrite" in err, err  # negative control: no --overwrite, no replacing
    (ads / "lora-r1" / "adapter_model.safetensors").write_bytes(b"stale")
    code, _, err = run(monkeypatch, capsys, *sweep, "-o", tmp_path / "v2", "--overwrite")  # what the sweep wrote
    assert code == 0, err
    assert (ads / "lora-r1" / "adapter_model.safetensors").read_bytes() == written


def test_an_output_folder_that_refuses_files_is_refused_before_any_work(monkeypatch, capsys, pair, tmp_path):
    """Where the mode bits allow writing but no file can be made (/proc as root, a full disk), the run computed
    everything and then failed with a raw errno naming its hidden temporary file."""
    import errno
    import tempfile

    base, tuned = pair

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "-o", tmp_path / "run")
    assert code == 2 and f"cannot write {tmp_path / 'run'}: no file can be created in {tmp_path}" in err, err
    assert "No space left on device" in err and "Choose another -o/--output" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind
    monkeypatch.undo()
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-q", "-o", tmp_path / "run")
    assert code == 0 and (tmp_path / "run" / "analysis.json").is_file(), err  # negative control
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spectra-probe-")]  # the probe is removed
