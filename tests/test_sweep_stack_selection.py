"""--stacks in the truncation sweep: SweepConfig.stacks selects with the roles, by the model's own stacks (T5's encoder
known by its config), as analyze, recommend, extract and train do."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.sweep import SweepConfig
from spectra.sweep_weights import _sweep_pairing, _target_entries
from tests.models import build_model, save


def _linears(model, prefix: str, suffix: str) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and n.endswith(suffix)]


def test_sweep_config_reads_and_refuses_stacks():
    assert SweepConfig(stacks=["Encoder"]).stacks == ("encoder",)
    assert SweepConfig(stacks="decoder,encoder").stacks == ("language", "encoder")
    assert SweepConfig().stacks is None
    with pytest.raises(ConfigError, match=r"stacks \(--stacks\): unknown stack\(s\) visoin"):
        SweepConfig(stacks="visoin")


def _truncated(b, roles, stacks=None) -> set[str]:
    pairing = _sweep_pairing(b, b, plan=None, roles=roles, stacks=stacks)
    return {e.name for e in _target_entries(pairing, None, roles, b, b)[0]}


def test_sweep_pairing_truncates_the_chosen_stack(tmp_path):
    model = build_model("t5")
    b = save(model, tmp_path / "b", "safetensors")
    names = _truncated(b, ("q",), ("encoder",))
    assert names == set(_linears(model, "encoder.", "SelfAttention.q"))
    decoder = _truncated(b, ("q",), ("language",))
    assert decoder == set(_linears(model, "decoder.", ".q")) and len(decoder) == 4  # self- and cross-attention q
    everything = _truncated(b, ("q",))
    assert everything == names | decoder  # negative control: without stacks, both


def test_a_plan_with_stacks_is_refused(tmp_path):
    from spectra.sweep import truncation_sweep

    model = build_model("llama")
    b = save(model, tmp_path / "b", "safetensors")
    (tmp_path / "d.txt").write_text("hello world\n" * 4)
    with pytest.raises(ConfigError, match=r"a plan names the modules to truncate, so stacks \(--stacks\)"):
        truncation_sweep(b, b, tmp_path / "d.txt", ranks=[1], plan=tmp_path / "plan.json",
                         config=SweepConfig(stacks=("language",)), progress=False)
