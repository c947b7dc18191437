"""extract where TUNED left modules (or everything) as in BASE: no LoRA of zeros, and the same checkpoint twice refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import merged_state, perturbed
from tests.models import build_model, planted_mixtral_pair, save
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def q_only(tmp_path_factory):
    """A Llama fine-tune that moved the q projections alone."""
    root = tmp_path_factory.mktemp("q-only")
    base = build_model("llama")
    tuned = perturbed(base, names=("q_proj",))
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_unchanged_modules_are_left_out_of_the_adapter_with_a_note(q_only, tmp_path):
    """--rank N wrote zero A/B factors for every unchanged module of the default roles (k, v, o, gate, up, down)."""
    base, tuned, b, t = q_only
    result = extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    assert {m.name.rsplit(".", 1)[1] for m in result.modules} == {"q_proj"}
    assert "12 targeted module(s) unchanged (ΔW = 0) left out of the adapter" in result.notes[0]  # 2 layers × 6
    assert len(result.unchanged) == 12 and result.unchanged[0] == "model.layers.0.mlp.down_proj"  # in natural order
    assert not any(".q_proj" in n for n in result.unchanged)
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert keys and all(".q_proj.lora_" in k for k in keys)
    targets = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert "k_proj" not in json.dumps(targets) and "q_proj" in json.dumps(targets)
    state, _ = merged_state(base, tmp_path / "ad")  # PEFT's merge against a float64 numpy truncation
    for name, value in base.state_dict().items():
        if ".q_proj." in name:
            delta = (tuned.state_dict()[name] - value).double().numpy()
            U, S, Vt = np.linalg.svd(delta)
            value = value + torch.from_numpy((U[:, :2] * S[:2]) @ Vt[:2]).float()
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=2e-6, msg=name)


def test_the_same_checkpoint_twice_is_refused_by_extract_and_recommend(q_only, tmp_path, monkeypatch, capsys):
    """extract B B --rank 2 wrote an all-zero adapter silently; recommend on `analyze B B` said "No module of the
    analysis is targeted … Relax roles/include"."""
    _, _, b, t = q_only
    with pytest.raises(ConfigError, match=r"every ΔW is 0: all 14 targeted modules are unchanged .* same checkpoint"):
        extract_adapter(b, b, 2, tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()
    code, _, err = run(monkeypatch, capsys, "extract", b, b, "--rank", "2", "-q", "-o", tmp_path / "ad")
    assert code == 2 and "same checkpoint twice?" in err and not (tmp_path / "ad").exists()
    saved = extract_adapter(b, b, 2, tmp_path / "saved", modules_to_save=("lm_head",), progress=False)
    assert "the adapter carries the saved modules (lm_head)" in saved.notes[0]  # something to carry: written
    code, _, err = run(monkeypatch, capsys, "analyze", b, b, "--no-cache", "-q", "-o", tmp_path / "same")
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "same")
    assert code == 2 and "Every ΔW of the analysis is 0" in err and "same checkpoint twice?" in err, err
    assert "Relax" not in err
    code, _, err = run(monkeypatch, capsys, "analyze", b, t, "--no-cache", "-q", "-o", tmp_path / "q")
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "q", "--roles", "k")
    assert code == 2 and "The 2 targeted module(s) are unchanged (ΔW = 0)" in err and "changed but are not targeted (--roles k)" in err, err
    code, out, err = run(monkeypatch, capsys, "recommend", tmp_path / "q", "--roles", "q")
    assert code == 0 and "LoRA plan: 2 modules" in out, err  # negative control: the changed role is planned


def test_the_same_mixtral_twice_is_refused_with_its_experts_targeted(tmp_path, monkeypatch, capsys):
    """Experts were kept out of the count of unchanged modules, so a MoE pair saved twice gave an adapter of zero
    expert factors (exit 0; with --roles gate,up,down not even a note): the refusal now counts every result."""
    import copy

    model = build_model("mixtral")
    b = save(model, tmp_path / "mb", "safetensors")
    t = save(copy.deepcopy(model), tmp_path / "mt", "safetensors")
    for roles in ((), ("--roles", "gate,up,down")):
        code, _, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "-q", "-o", tmp_path / "ad", *roles)
        assert code == 2 and "every ΔW is 0" in err and "same checkpoint twice?" in err, (roles, err)
        assert not (tmp_path / "ad").exists()
    _, pb, pt = planted_mixtral_pair(tmp_path / "planted")  # negative control: experts changed, written
    code, _, err = run(monkeypatch, capsys, "extract", pb, pt, "--rank", "2", "-q", "-o", tmp_path / "moe",
                       "--roles", "gate,up,down")
    assert code == 0, err
    factors = load_file(tmp_path / "moe" / "adapter_model.safetensors")
    assert factors and all("experts" in k for k in factors) and max(float(v.abs().max()) for v in factors.values()) > 0
