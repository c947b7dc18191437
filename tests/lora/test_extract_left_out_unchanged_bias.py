"""A changed bias of a module extract left out as unchanged (its weight's ΔW = 0) is advised saved whole.

Audit s19: on Qwen2, layer 0's q_proj.bias moved and its weight did not. extract --rank N selected that q_proj by
role, then left it out as unchanged, yet the note called the bias "a bias of adapted modules, which no LoRA carries"
and offered nothing. The note now advises modules_to_save=q_proj, with q out of the roles (extract refuses a module
both adapted and saved whole); a bias of a module the adapter does adapt keeps the old note. The referee is PEFT's
own load and merge in float64: following the advice gives every tensor back.
"""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.lora.test_extract_left_out import _advice, _missed
from tests.models import build_model, save

BIAS0, BIAS1 = "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"


def _block_matrix(name: str, p) -> bool:
    return p.ndim == 2 and (".self_attn." in name or ".mlp." in name)


def _moved(name: str, p) -> bool:
    """Every matrix of the default roles but layer 0's q_proj weight, and one q_proj bias per layer (k's and v's,
    the embedding and the norms stay)."""
    if p.ndim == 2:
        return _block_matrix(name, p) and name != "model.layers.0.self_attn.q_proj.weight"
    return name in (BIAS0, BIAS1)


@pytest.fixture(scope="module")
def qwen2_bias(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-bias")
    base = build_model("qwen2")
    tuned = perturbed(base, select=_moved)
    assert torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_a_bias_of_an_unchanged_module_is_advised_saved_whole(qwen2_bias, tmp_path):
    base, tuned, b, t = qwen2_bias
    result = extract_adapter(b, t, "full", tmp_path / "ad", progress=False)
    assert result.unchanged == ["model.layers.0.self_attn.q_proj"]
    assert result.left_out_vectors == [BIAS0, BIAS1]
    (vectors,) = [n for n in result.notes if "changed vector(s)" in n]
    # layer 0's q_proj holds no LoRA: its bias is saved whole (which saves every q_proj, so q leaves the roles)
    assert "save their modules whole (modules_to_save=q_proj)" in vectors
    assert _advice(result.notes, "roles") == ("k", "v", "o", "gate", "up", "down")
    # layer 1's q_proj is adapted: its bias keeps the old note, and is the only one so counted
    assert "1 is a bias of adapted modules, which no LoRA carries" in vectors
    assert _missed(base, tuned, tmp_path / "ad") == {BIAS0, BIAS1}  # PEFT's merge: what the note names


def test_following_the_advice_gives_the_fine_tune_back(qwen2_bias, tmp_path):
    base, tuned, b, t = qwen2_bias
    notes = extract_adapter(b, t, "full", tmp_path / "first", progress=False).notes
    saved = extract_adapter(b, t, "full", tmp_path / "saved", modules_to_save=_advice(notes, "modules_to_save"),
                            roles=_advice(notes, "roles"), progress=False)
    assert saved.complete and not saved.left_out_vectors and not saved.left_out
    assert _missed(base, tuned, tmp_path / "saved") == set()
    # negative control: modules_to_save alone keeps q in the roles, and extract refuses a module adapted and saved
    with pytest.raises(ConfigError, match="PEFT does not load inside a module to save"):
        extract_adapter(b, t, "full", tmp_path / "both", modules_to_save=_advice(notes, "modules_to_save"),
                        progress=False)


def test_a_bias_of_an_adapted_module_keeps_the_old_note(tmp_path):
    """Only layer 1's q_proj.bias moved beside the matrices: its module is adapted, so no modules_to_save is
    advised for it (saving it whole would drop its LoRA)."""
    base = build_model("qwen2")
    tuned = perturbed(base, select=lambda name, p: _block_matrix(name, p) or name == BIAS1)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    assert result.unchanged == [] and result.left_out_vectors == [BIAS1]
    (vectors,) = [n for n in result.notes if "changed vector(s)" in n]
    assert "1 is a bias of adapted modules, which no LoRA carries" in vectors
    assert "modules_to_save" not in vectors and "roles=" not in vectors


def test_the_cli_note_names_the_options(qwen2_bias, tmp_path, monkeypatch, capsys):
    from tests.cli.test_cli import run

    _, _, b, t = qwen2_bias
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "-q", "-o", tmp_path / "ad")
    assert code == 0, err
    text = " ".join((out + err).split())
    assert "(--modules-to-save q_proj) and take q out of the roles (--roles k,v,o,gate,up,down)" in text, text
