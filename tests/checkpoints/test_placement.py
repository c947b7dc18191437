"""Where checkpoint tensors lie in the parameters transformers 5 fuses them into, read without an adapter."""

from __future__ import annotations

import shutil

import pytest
import torch

from spectra.checkpoints.placement import PlacementError, parameter_sources, split_sources, weight_places
from spectra.checkpoints.source import open_checkpoint
from tests.models import build_model, save

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


def test_mixtral_experts_are_placed_in_rows_of_the_fused_parameter(tmp_path):
    """Mixtral's experts.E.w1 and w3 (48, 32) are rows [0, 48) and [48, 96) of gate_up_proj[E], as loading fuses them:
    each slice holds that checkpoint tensor in the loaded model."""
    model = build_model("mixtral")
    checkpoint = open_checkpoint(save(model, tmp_path / "m", "safetensors"))
    params = dict(model.named_parameters())
    sources = parameter_sources(model, checkpoint.names(), [GATE_UP])[GATE_UP]
    slices = split_sources(checkpoint, GATE_UP, tuple(params[GATE_UP].shape), sources, checkpoint.config)
    assert [(s.module.rpartition("experts.")[2], s.place.expert, s.place.rows) for s in slices] == \
        [(f"{e}.w1", e, (0, 48)) for e in range(3)] + [(f"{e}.w3", e, (48, 96)) for e in range(3)]
    places, unplaced = weight_places({s.module: (torch.empty(s.shape), s.conv1d, s.place) for s in slices}, params)
    assert unplaced == []
    for s in slices:
        assert torch.equal(places[s.module], checkpoint.read(s.tensor))


def test_a_placement_that_cannot_be_read_is_refused_in_the_callers_words(tmp_path):
    """A checkpoint that lacks one expert's w3 has no exact place for the others: a PlacementError naming the
    checkpoint by the caller's label (no adapter involved); a tensor stored as the model holds it, of another shape,
    is a mismatch (another model's checkpoint), not a conversion spectra does not invert."""
    from safetensors.torch import load_file, save_file

    model = build_model("mixtral")
    whole = save(model, tmp_path / "m", "safetensors")
    state = load_file(whole / "model.safetensors")
    del state["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    (tmp_path / "cut").mkdir()
    shutil.copy(whole / "config.json", tmp_path / "cut" / "config.json")
    save_file(state, tmp_path / "cut" / "model.safetensors", metadata={"format": "pt"})
    checkpoint = open_checkpoint(tmp_path / "cut")
    shape = tuple(model.get_parameter(GATE_UP).shape)
    sources = parameter_sources(model, checkpoint.names(), [GATE_UP])[GATE_UP]
    with pytest.raises(PlacementError, match=r"gate_up_proj: its fine-tune tensors .*experts 0…2") as refused:
        split_sources(checkpoint, GATE_UP, shape, sources, checkpoint.config, label="fine-tune")
    assert not refused.value.mismatch and "adapter" not in str(refused.value)

    from spectra.checkpoints.targets import meta_model
    from tests.checkpoints.test_adapter_pairing import tiny_gpt_oss

    gpt_oss = open_checkpoint(save(tiny_gpt_oss(), tmp_path / "gpt_oss", "safetensors"))  # experts stored (E, in, out)
    key = "model.layers.0.mlp.experts.down_proj"
    (source,) = parameter_sources(meta_model(gpt_oss.config), gpt_oss.names(), [key])[key]
    with pytest.raises(PlacementError, match=r"the base's model.layers.0.mlp.experts.down_proj is \(3, 16, 32\)") \
            as mismatch:
        split_sources(gpt_oss, key, (3, 32, 16), [source], gpt_oss.config, label="base")
    assert mismatch.value.mismatch


def test_experts_that_loading_transposes_are_placed_in_either_stored_layout(tmp_path):
    """Qwen3-VL-MoE loads its experts through Transpose(1, 2, check_dims=True): transformers 5 saves them (E, out, in)
    as the model holds them, its hub checkpoints (E, in, out). Each expert is placed in its parameter; in the hub's
    layout it is stored (in, out) (conv1d) and its place is the parameter's transposed view, which holds the stored
    expert bit for bit and writes through into the model. A tensor of neither shape is another model's (mismatch).
    It was refused as a conversion spectra does not invert."""
    from spectra.checkpoints.targets import meta_model
    from tests.checkpoints.test_qwen_vl import _transposed_experts, tiny
    from tests.models import save

    model = tiny("qwen3_vl_moe")
    params = dict(model.named_parameters())
    saved = save(model, tmp_path / "t5", "safetensors")
    key = "model.language_model.layers.1.mlp.experts.down_proj"  # (3, 32, 12): (E, hidden, moe_ffn)
    for folder, conv1d in ((saved, False), (_transposed_experts(saved, tmp_path / "hub"), True)):
        checkpoint = open_checkpoint(folder)
        sources = parameter_sources(meta_model(checkpoint.config), checkpoint.names(), [key])[key]
        slices = split_sources(checkpoint, key, (3, 32, 12), sources, checkpoint.config, label="base")
        assert [(s.module, s.shape, s.conv1d, s.place.expert, s.place.stored_transposed, s.stored_expert)
                for s in slices] == [(key.replace("experts.", f"experts.{e}."), (32, 12), conv1d, e, conv1d, e)
                                     for e in range(3)]
        places, unplaced = weight_places({s.module: (torch.empty(s.shape), s.conv1d, s.place) for s in slices},
                                         params)
        assert unplaced == []
        for s in slices:
            assert torch.equal(places[s.module], checkpoint.read(s.tensor)[s.stored_expert])
            assert places[s.module].data_ptr() == params[key][s.stored_expert].data_ptr()  # a view of the model's
        with pytest.raises(PlacementError, match=r"is \((3, 32, 12|3, 12, 32)\), neither") as other:
            split_sources(checkpoint, key, (3, 32, 16), sources, checkpoint.config, label="base")
        assert other.value.mismatch


def test_checkpoint_names_are_placed_as_the_loader_renames_them():
    """Qwen2-VL's hub checkpoints name the language model ``model.layers.N…``, which transformers 5 loads as
    ``model.language_model.layers.N…``: with ``rename=loading_rename(model)`` each hub name is placed in the parameter
    it loads into (the very tensor), without it in none (negative control). Names the rename sends into one parameter
    together (Mixtral's per-expert w1 and w3, fused into gate_up_proj) keep their own and have no whole place."""
    from spectra.checkpoints.targets import loading_rename
    from tests.checkpoints.test_qwen_vl import tiny

    model = tiny("qwen2_vl")
    params = dict(model.named_parameters())
    loaded = [n.removesuffix(".weight") for n in params
              if n.startswith("model.language_model.layers.0.") and n.endswith("_proj.weight")]
    hub = {n.replace("model.language_model.", "model."): (params[n + ".weight"], False, None) for n in loaded}
    assert len(hub) == 7  # q, k, v, o, gate, up, down
    places, unplaced = weight_places(hub, params, rename=loading_rename(model))
    assert unplaced == [] and set(places) == set(hub)
    for name in hub:
        assert places[name] is params[name.replace("model.", "model.language_model.", 1) + ".weight"]
    places, unplaced = weight_places(hub, params)
    assert places == {} and sorted(unplaced) == sorted(hub)

    mixtral = build_model("mixtral")
    experts = {f"model.layers.0.block_sparse_moe.experts.0.{w}": (torch.empty(48, 32), False, None) for w in ("w1", "w3")}
    places, unplaced = weight_places(experts, dict(mixtral.named_parameters()), rename=loading_rename(mixtral))
    assert places == {} and sorted(unplaced) == sorted(experts)
