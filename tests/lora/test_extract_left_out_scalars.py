"""A 0-d parameter the fine-tune changed (CLIP's logit_scale, a scalar nn.Parameter of the model itself) is among
what extract says the adapter leaves out. The pairing used to drop 0-d tensors without a word, so an adapter
missing it was called complete (`--rank full`: "lossless"). The referee is PEFT's own load and merge in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.cli.test_cli import run
from tests.lora.test_extract import perturbed
from tests.lora.test_extract_left_out import _advice, _missed
from tests.models import on_grid, save


def _tiny_clip():
    import transformers as tf

    text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    return on_grid(tf.CLIPModel, tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    """A tiny CLIP and two fine-tunes of its q projections: one also moved logit_scale, the other did not."""
    root = tmp_path_factory.mktemp("clip")
    base = _tiny_clip()
    same_scale = perturbed(base, names=("q_proj",))
    moved = copy.deepcopy(same_scale)
    with torch.no_grad():
        moved.logit_scale += 0.5  # on the 2⁻¹² grid: exact in float32
    assert base.logit_scale.dim() == 0
    return (base, save(base, root / "b", "safetensors"), (moved, save(moved, root / "moved", "safetensors")),
            (same_scale, save(same_scale, root / "same", "safetensors")))


def test_a_changed_logit_scale_is_named_as_left_out(clip_pair, tmp_path):
    base, b, (moved, t), _ = clip_pair
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), progress=False)
    assert not result.complete
    assert result.left_out_vectors == ["logit_scale"] and result.left_out == [] and result.only_in_tuned == []
    (note,) = result.notes
    assert note.startswith("rank full is not lossless here: the adapter leaves out 1 changed vector(s) (norms, "
                           "biases, scalars: a LoRA holds matrices only): logit_scale.")
    # no module holds it, so no modules_to_save can carry it (the vector note's advice would have been empty)
    assert "logit_scale is a parameter of the model itself" in note and "modules_to_save=" not in note
    assert _missed(base, moved, tmp_path / "ad") == {"logit_scale"}  # what PEFT's merge misses is what is named


def test_an_unchanged_logit_scale_leaves_the_adapter_complete(clip_pair, tmp_path):
    base, b, _, (same_scale, t) = clip_pair
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), progress=False)
    assert result.complete and result.notes == [] and result.left_out_vectors == []
    assert _missed(base, same_scale, tmp_path / "ad") == set()


def test_the_cli_does_not_call_it_lossless(clip_pair, monkeypatch, capsys, tmp_path):
    _, b, (_, t), (_, same) = clip_pair
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "full", "--roles", "q", "-q",
                         "-o", tmp_path / "moved")
    assert code == 0, err
    assert "note: --rank full is not lossless here" in err and "logit_scale" in err and "lossless:" not in out
    code, out, err = run(monkeypatch, capsys, "extract", b, same, "--rank", "full", "--roles", "q", "-q",
                         "-o", tmp_path / "same")
    assert code == 0 and "note:" not in err and "lossless: every tensor TUNED changed" in out, err


def _tiny_owlvit():
    import transformers as tf

    text = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    return on_grid(tf.OwlViTForObjectDetection, tf.OwlViTConfig(text_config=text, vision_config=vision,
                                                                projection_dim=8))


def test_a_scalar_of_a_module_holding_others_is_copied_not_saved_whole(tmp_path):
    """OWL-ViT's logit_scale is a parameter of `owlvit`, the whole OwlViTModel inside OwlViTForObjectDetection: the
    note said modules_to_save=owlvit (every weight of both towers saved whole). It says to copy it from TUNED, as for
    a parameter of the model itself; a changed bias of a leaf module (box_head.dense2) is still advised as saved whole.
    Referee: PEFT's float64 merge of the advised adapter gives back all but logit_scale, and copying that from TUNED
    gives back the rest."""
    base = _tiny_owlvit()
    tuned = perturbed(base, names=("q_proj",))
    with torch.no_grad():
        tuned.owlvit.logit_scale += 0.5  # on the 2⁻¹² grid: exact in float32
        tuned.box_head.dense2.bias += 0.25
    assert base.owlvit.logit_scale.dim() == 0
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), progress=False)
    assert result.left_out_vectors == ["box_head.dense2.bias", "owlvit.logit_scale"] and not result.complete
    (note,) = result.notes
    size = sum(p.numel() for p in base.owlvit.parameters())  # torch's count of the module it would have saved
    assert ("owlvit.logit_scale is a parameter of a module holding other modules (owlvit: "
            f"{size:,} parameters, which modules_to_save would save whole): copy it from TUNED onto the loaded "
            "model") in note, note
    assert _advice([note], "modules_to_save") == ("dense2",), note  # it said dense2,owlvit
    advised = extract_adapter(b, t, "full", tmp_path / "advised", roles=("q",), modules_to_save=("dense2",),
                              progress=False)
    assert advised.left_out_vectors == ["owlvit.logit_scale"]
    assert _missed(base, tuned, tmp_path / "advised") == {"owlvit.logit_scale"}
    copied = copy.deepcopy(base)
    with torch.no_grad():
        copied.owlvit.logit_scale.copy_(tuned.owlvit.logit_scale)  # what the note says to do
    assert _missed(copied, tuned, tmp_path / "advised") == set()


def test_holding_modules_from_tensor_names():
    from spectra.lora.saved_modules import _holding_modules

    names = ["logit_scale", "owlvit.logit_scale", "owlvit.text_model.encoder.layers.0.q_proj.weight",
             "layer_norm.weight", "box_head.dense0.bias"]
    assert _holding_modules(names) == {"owlvit", "owlvit.text_model", "owlvit.text_model.encoder",
                                       "owlvit.text_model.encoder.layers", "owlvit.text_model.encoder.layers.0",
                                       "box_head"}
