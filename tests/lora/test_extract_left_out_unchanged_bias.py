"""A changed bias of a module extract left out as unchanged (its weight's ΔW = 0) is advised saved whole, by name.

Audit s19: on Qwen2, layer 0's q_proj.bias moved and its weight did not. extract --rank N selected that q_proj by
role, then left it out as unchanged, yet the note called the bias "a bias of adapted modules, which no LoRA carries"
and offered nothing. 7088d5b advised modules_to_save=q_proj with q out of the roles, which saves every layer's q_proj
whole and drops q's LoRA everywhere (on Qwen2-7B ~360M parameters to carry one 3,584-element bias), without saying
so; the precise name model.layers.0.self_attn.q_proj was refused, as extract checked the saved module against its
LoRA targets before leaving the unchanged ones out. Now an unchanged target inside a saved module is left out first,
the note advises the module's full name and says what saving it costs (its parameters, weight included), and a
refusal quotes the entry the user gave. The referee is PEFT's own load and merge in float64 (and the adapter's
tensors); the parameter counts are the model's own modules'.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

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


def _q_params(model, layer: int) -> int:
    return sum(p.numel() for p in model.model.layers[layer].self_attn.q_proj.parameters())


def test_a_bias_of_an_unchanged_module_is_advised_saved_whole(qwen2_bias, tmp_path):
    base, tuned, b, t = qwen2_bias
    result = extract_adapter(b, t, "full", tmp_path / "ad", progress=False)
    assert result.unchanged == ["model.layers.0.self_attn.q_proj"]
    assert result.left_out_vectors == [BIAS0, BIAS1]
    (vectors,) = [n for n in result.notes if "changed vector(s)" in n]
    # layer 0's q_proj holds no LoRA: saved whole by its full name (q_proj would save layer 1's, which is adapted),
    # at the cost of its parameters, weight included; the roles stay
    assert _advice(result.notes, "modules_to_save") == ("model.layers.0.self_attn.q_proj",)
    assert f"1 module(s), {_q_params(base, 0):,} parameters with their weights, to carry 1 changed vector(s)" in vectors
    assert _advice(result.notes, "roles") == ()
    # layer 1's q_proj is adapted: its bias keeps the old note, and is the only one so counted
    assert "1 is a bias of adapted modules, which no LoRA carries" in vectors
    assert _missed(base, tuned, tmp_path / "ad") == {BIAS0, BIAS1}  # PEFT's merge: what the note names


def test_following_the_advice_keeps_the_other_layers_lora(qwen2_bias, tmp_path):
    """The advised full name saves layer 0's q_proj alone (it had been refused): PEFT's merge gives back its bias,
    layer 1's q_proj keeps its LoRA, and only layer 1's bias (of an adapted module, as the note said) is missed."""
    base, tuned, b, t = qwen2_bias
    notes = extract_adapter(b, t, "full", tmp_path / "first", progress=False).notes
    saved = extract_adapter(b, t, "full", tmp_path / "saved", modules_to_save=_advice(notes, "modules_to_save"),
                            progress=False)
    assert saved.modules_to_save == ["model.layers.0.self_attn.q_proj"]
    assert saved.unchanged == ["model.layers.0.self_attn.q_proj"] and saved.left_out_vectors == [BIAS1]
    keys = set(load_file(str(tmp_path / "saved" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert not any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_") for k in keys)
    assert _missed(base, tuned, tmp_path / "saved") == {BIAS1}


def _moved0(name: str, p) -> bool:
    """Every matrix of the default roles but layer 0's q_proj weight, and layer 0's q_proj bias alone."""
    return _moved(name, p) and name != BIAS1


def test_following_the_advice_gives_the_fine_tune_back(tmp_path):
    """Only layer 0's q_proj.bias moved beside the matrices (its weight did not): following the note (the full name,
    the roles as they were) gives every tensor of TUNED back under PEFT's float64 merge, with q's LoRA on layer 1.
    Negative control: the old advice, the last name q_proj with q out of the roles, saves both layers' q_proj whole
    (twice the parameters, layer 1's weight copied, no LoRA of q left), and a note says so and what it costs."""
    base = build_model("qwen2")
    tuned = perturbed(base, select=_moved0)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    notes = extract_adapter(b, t, "full", tmp_path / "first", progress=False).notes
    assert _advice(notes, "modules_to_save") == ("model.layers.0.self_attn.q_proj",) and _advice(notes, "roles") == ()
    saved = extract_adapter(b, t, "full", tmp_path / "saved", modules_to_save=_advice(notes, "modules_to_save"),
                            progress=False)
    assert saved.complete and not saved.left_out_vectors and not saved.left_out
    assert _missed(base, tuned, tmp_path / "saved") == set()
    tensors = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in tensors
    whole = {k: v for k, v in tensors.items() if ".q_proj." in k and "lora_" not in k}
    assert sum(v.numel() for v in whole.values()) == _q_params(base, 0)
    assert not any(n.startswith("modules_to_save 'model.layers.0") for n in saved.notes)  # one module: no note

    short = extract_adapter(b, t, "full", tmp_path / "short", modules_to_save=("q_proj",),
                            roles=("k", "v", "o", "gate", "up", "down"), progress=False)
    assert short.modules_to_save == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    tensors = load_file(str(tmp_path / "short" / "adapter_model.safetensors"))
    assert not any(".q_proj.lora_" in k for k in tensors)
    cost = _q_params(base, 0) + _q_params(base, 1)
    assert sum(v.numel() for k, v in tensors.items() if ".q_proj." in k) == cost
    (note,) = [n for n in short.notes if n.startswith("modules_to_save 'q_proj' saves")]
    assert "saves 2 modules whole from TUNED" in note and f"{cost:,} parameters" in note
    assert _missed(base, tuned, tmp_path / "short") == set()  # lossless too, at twice the cost


def test_a_refusal_quotes_the_entry_given(qwen2_bias, tmp_path):
    """The last name q_proj with q's LoRA on layer 1 (changed) is still refused, naming 'q_proj' as given; a full
    name of that adapted module is refused naming the full name."""
    _, _, b, t = qwen2_bias
    with pytest.raises(ConfigError, match="PEFT does not load inside a module to save") as err:
        extract_adapter(b, t, "full", tmp_path / "both", modules_to_save=("q_proj",), progress=False)
    assert "leave 'q_proj' out of --modules-to-save, or name there only the modules" in str(err.value)
    with pytest.raises(ConfigError, match="PEFT does not load inside a module to save") as err:
        extract_adapter(b, t, "full", tmp_path / "one", modules_to_save=("layers.1.self_attn.q_proj",),
                        progress=False)
    assert "'layers.1.self_attn.q_proj' saves model.layers.1.self_attn.q_proj whole" in str(err.value)
    assert "leave 'layers.1.self_attn.q_proj' out of --modules-to-save." in str(err.value)


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
    assert "(--modules-to-save model.layers.0.self_attn.q_proj): 1 module(s)" in text, text
    assert "--roles" not in text
