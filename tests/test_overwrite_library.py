"""The library's writers apply the CLI's --overwrite rule (files.OUTPUTS): extract_adapter, train_adapter and
write_report with overwrite=True replaced any existing folder whole, a user's thesis.tex with it."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from tests.models import planted_gpt2, save


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite_library")
    base, tuned = planted_gpt2()
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def check_rule(write, out, *, record: str, command: str, written: str):
    """`write(overwrite)` into `out`: new, replaces what it wrote, refuses a foreign file (left intact, nothing set
    aside) and, without overwrite, refuses any existing folder."""
    write(True)  # new
    assert (out / record).is_file()
    (out / written).write_bytes(b"stale")
    write(True)  # a folder it wrote: replaced whole
    assert (out / written).read_bytes() != b"stale"
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):  # negative control: no overwrite, refused
        write(False)
    (out / "thesis.tex").write_text("mine")
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=f"holds thesis.tex, which `spectra {command}` does not write"):
        write(True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staging or set-aside copy left
    (out / "thesis.tex").unlink()


def test_extract_adapter_replaces_only_an_adapter_it_wrote(pair, tmp_path):
    from spectra.lora.extract import extract_adapter

    out = tmp_path / "adapter"
    check_rule(lambda overwrite: extract_adapter(*pair, 2, out, overwrite=overwrite, progress=False), out,
               record="adapter_config.json", command="extract", written="adapter_model.safetensors")


def test_train_adapter_replaces_only_an_adapter_it_wrote(pair, tmp_path):
    from spectra.lora.train import TrainConfig, train_adapter

    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    out = tmp_path / "runs" / "adapter"
    config = TrainConfig(max_steps=1, batch_size=4, max_length=16)
    check_rule(lambda overwrite: train_adapter(pair[0], data, config, out, overwrite=overwrite, progress=False), out,
               record="spectra_train.json", command="train", written="adapter_model.safetensors")


def test_write_report_replaces_only_a_report_it_wrote_and_not_another_commands(pair, tmp_path):
    from spectra import analyze
    from spectra.lora.extract import extract_adapter

    result = analyze(*pair, cache_dir=False, progress=False)
    out = tmp_path / "reports" / "run"
    check_rule(lambda overwrite: result.write_report(out, overwrite=overwrite), out,
               record="analysis.json", command="analyze", written="report.md")
    adapter = tmp_path / "reports2" / "adapter"  # another command's output is not analyze's to replace
    extract_adapter(*pair, 2, adapter, progress=False)
    with pytest.raises(ConfigError, match="holds adapter_.*, which `spectra analyze` does not write"):
        result.write_report(adapter, overwrite=True)
    assert (adapter / "adapter_model.safetensors").is_file()


def test_demo_retrains_a_stale_cached_adapter_beside_its_verify_cache(pair, tmp_path):
    """The demo caches demo_verify.json inside each adapter folder; retraining a stale one (another config) must not
    be refused by train's rule for holding it."""
    from spectra.demo.run import _trained
    from spectra.lora.train import TrainConfig, read_train_summary

    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    folder = tmp_path / "adapters" / "lora-r2"
    old = TrainConfig(max_steps=1, batch_size=4, max_length=16, rank=2)
    _trained(pair[0], {"train": data, "eval": None}, old, folder, progress=False)
    (folder / "demo_verify.json").write_text("{}")
    new = TrainConfig(max_steps=1, batch_size=4, max_length=16, rank=4)
    _trained(pair[0], {"train": data, "eval": None}, new, folder, progress=False)
    assert read_train_summary(folder)["config"]["rank"] == 4 and not (folder / "demo_verify.json").exists()
