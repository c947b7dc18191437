"""Qwen3-VL-MoE: a base and a fine-tune whose 3-D experts are stored in different layouts.

The hub's checkpoints store the experts (E, in, out): ``gate_up_proj`` (E, hidden, 2·moe_ffn), ``down_proj``
(E, moe_ffn, hidden). transformers 5 loads them with ``Transpose(1, 2, check_dims=True)`` into the model's
(E, out, in), and its ``save_pretrained`` writes the model's (E, out, in) back: the reverse transpose checks the
dimensions against the model's parameter, which it then already matches (the first test). So a fine-tune of a hub
model saved by transformers 5 stores the other layout than its base, and spectra refused the pair ("tensor … has
shape (3, 32, 24) in … but (3, 24, 32)").

The reference is transformers itself: ``from_pretrained`` of both folders, and per expert the difference of the
loaded parameters, exact in float32 (the weights lie on the 2⁻¹² grid of :mod:`tests.models`). Negative controls: a
fine-tune of another size is still refused by name and shapes; square experts, which transformers loads as stored
whatever their layout, pair as stored.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.errors import PairingError
from spectra.lora.extract import extract_adapter
from tests.checkpoints.test_more_architectures import pair
from tests.checkpoints.test_qwen_vl import MOE, _layouts, tiny
from tests.lora.test_extract import merged_state
from tests.models import add_to_parameter, low_rank, on_grid

LAYOUTS = ("transformers 5", "hub")
MIXED = [("hub", "transformers 5"), ("transformers 5", "hub")]  # (base's layout, tuned's)
EXPERTS = [MOE.format(layer, proj) for layer in (0, 1) for proj in ("gate_up_proj", "down_proj")]


def _stored_shapes(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if ".experts." in k}


def _loaded(folder) -> dict[str, torch.Tensor]:
    import transformers as tf

    return tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder).state_dict()


def _model(seed: int, **text):
    """tiny()'s Qwen3-VL-MoE with these language-model sizes (``hidden_size`` the merger's output too), weights on
    the 2⁻¹² grid."""
    import transformers as tf

    config = copy.deepcopy(tiny("qwen3_vl_moe").config)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    return on_grid(tf.Qwen3VLMoeForConditionalGeneration, config, seed=seed)


def _fine_tune(base, seed: int = 0):
    """The base with a rank-2 update (2⁻⁸ times integers) on every expert's gate_up_proj and down_proj."""
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    for i, key in enumerate(EXPERTS):
        _, out_features, in_features = params[key].shape
        for e in range(params[key].shape[0]):
            add_to_parameter(tuned, key, low_rank(out_features, in_features, 2, seed=seed + 10 * i + e), expert=e)
    return tuned


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-VL-MoE (experts gate_up_proj (3, 24, 32), down_proj (3, 32, 12)), a fine-tune of every expert
    and the loaded state of each folder: (base, tuned, {layout: (base dir, tuned dir)}, {dir: loaded state})."""
    base = tiny("qwen3_vl_moe")
    tuned = _fine_tune(base)
    layouts = _layouts(tmp_path_factory.mktemp("mixed"), base, tuned)
    return base, tuned, layouts, {d: _loaded(d) for dirs in layouts.values() for d in dirs}


def test_transformers_5_saves_a_hub_layout_model_with_its_own_layout(moe, tmp_path):
    """Loaded from the hub's (E, in, out), a Qwen3-VL-MoE is saved by transformers 5.24 as the model holds it,
    (E, out, in): save_pretrained does not undo the loading transpose, so a fine-tune of a hub model is stored in the
    other layout than its base. Its tensors are the transformers-5 save's bit for bit."""
    import transformers as tf
    from safetensors.torch import load_file

    _, _, layouts, _ = moe
    hub_base, t5_base = layouts["hub"][0], layouts["transformers 5"][0]
    assert _stored_shapes(hub_base)[MOE.format(0, "gate_up_proj")] == (3, 32, 24)  # the hub's (E, in, out)
    tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(hub_base).save_pretrained(tmp_path / "resaved")
    shapes = _stored_shapes(tmp_path / "resaved")
    assert shapes == _stored_shapes(t5_base) != _stored_shapes(hub_base)
    assert shapes[MOE.format(0, "gate_up_proj")] == (3, 24, 32) and shapes[MOE.format(0, "down_proj")] == (3, 32, 12)
    resaved, reference = load_file(tmp_path / "resaved" / "model.safetensors"), load_file(t5_base / "model.safetensors")
    assert resaved.keys() == reference.keys()
    assert all(torch.equal(resaved[k], reference[k]) for k in reference)


def _check_experts_against_transformers(deltas: dict, b_state: dict, t_state: dict, n_experts: int = 3) -> None:
    """Each expert's ΔW (out, in) is the loaded tuned parameter minus the loaded base one, bit for bit in float32."""
    for key in EXPERTS:
        for e in range(n_experts):
            d = deltas[_expert(key, e)]
            expected = t_state[key][e] - b_state[key][e]
            assert d.delta.dtype == torch.float32 and d.shape == tuple(expected.shape), d.name
            assert torch.equal(d.delta, expected), d.name
            assert torch.count_nonzero(expected) > 0, d.name  # every expert was fine-tuned


def _expert(key: str, e: int) -> str:
    """Expert e's name in the pairing: …experts.gate_up_proj → …experts.{e}.gate_up_proj."""
    head, _, proj = key.rpartition(".")
    return f"{head}.{e}.{proj}"


def _by_name(pairing) -> dict:
    return {d.name: d for d in pairing}


@pytest.mark.parametrize("base_layout", LAYOUTS)
@pytest.mark.parametrize("tuned_layout", LAYOUTS)
def test_each_expert_is_the_difference_transformers_loads_in_any_pair_of_layouts(moe, base_layout, tuned_layout):
    """All four pairs of layouts give each expert's ΔW as the loaded models' difference, (out, in): gate_up_proj[e]
    (24, 32), down_proj[e] (32, 12), split into gate and up rows as the model's. The mixed pairs were refused; a
    mixed pair is noted, a matched one not."""
    _, _, layouts, loaded = moe
    b, t = layouts[base_layout][0], layouts[tuned_layout][1]
    pairing = Pairing(b, t, PairingOptions(vectors=False))
    deltas = _by_name(pairing)
    _check_experts_against_transformers(deltas, loaded[b], loaded[t])
    gate_up = MOE.format(1, "gate_up_proj")
    for e in range(3):
        gate = deltas[MOE.format(1, f"{e}.gate_up_proj[gate]")]
        assert gate.role == "gate" and gate.expert == e
        assert torch.equal(gate.delta, loaded[t][gate_up][e, :12] - loaded[b][gate_up][e, :12])
    assert {d.conv1d for d in deltas.values() if ".experts." in d.name} == {base_layout == "hub"}  # the base's
    mixed = [n for n in pairing.notes if "another layout" in n]
    assert len(mixed) == (base_layout != tuned_layout)
    if mixed:
        assert "4 expert tensor(s)" in mixed[0]


@pytest.mark.parametrize("base_layout, tuned_layout", MIXED)
def test_mixed_pair_chunked_route_with_weights_and_norms(base_layout, tuned_layout, monkeypatch, tmp_path):
    """bfloat16 checkpoints through the chunked float32 subtraction (one norm block a chunk, experts of 9216 and
    4608 elements: hidden 64, moe_ffn 72): ΔW is still the loaded difference, the attached weights are the loaded
    parameters (up-cast, and as stored), and the norms taken on the way are ‖ΔW‖_F² and ‖W_base‖_F² in
    float64."""
    import spectra.checkpoints.pairing as pairing_module
    from spectra.linalg.sketch import _BLOCK

    base = _model(seed=2, hidden_size=64, moe_intermediate_size=72).to(torch.bfloat16)
    tuned = _fine_tune(base, seed=200)
    layouts = _layouts(tmp_path, base, tuned)
    b, t = layouts[base_layout][0], layouts[tuned_layout][1]
    b_state, t_state = _loaded(b), _loaded(t)
    assert b_state[EXPERTS[0]].dtype == torch.bfloat16
    monkeypatch.setattr(pairing_module, "_CHUNK", _BLOCK)
    for as_stored in (False, True):
        deltas = _by_name(Pairing(b, t, PairingOptions(vectors=False, with_weights=True,
                                                       weights_as_stored=as_stored, split_fused=False)))
        for key in EXPERTS:
            for e in range(3):
                d = deltas[_expert(key, e)]
                W_b, W_t = b_state[key][e], t_state[key][e]
                assert torch.equal(d.delta, W_t.float() - W_b.float()), d.name
                assert torch.equal(d.base, W_b if as_stored else W_b.float()), d.name
                assert torch.equal(d.tuned, W_t if as_stored else W_t.float()), d.name
                exact = (W_t.double() - W_b.double()).square().sum(), W_b.double().square().sum()
                assert d.delta_sq is not None and d.base_sq is not None, d.name  # the chunked route took them
                assert d.delta_sq == pytest.approx(float(exact[0]), rel=1e-6), d.name
                assert d.base_sq == pytest.approx(float(exact[1]), rel=1e-6), d.name


@pytest.mark.parametrize("base_layout, tuned_layout", MIXED)
def test_mixed_pair_nan_in_a_tuned_expert_is_named_and_skipped(base_layout, tuned_layout, monkeypatch, tmp_path):
    """A NaN in expert 1 of the tuned checkpoint's stored gate_up_proj, on the chunked bfloat16 route (whose norms
    stand in for the scan): refused naming that expert's stored tensor, or with on_nonfinite='skip' that expert alone
    is skipped and every other is still the loaded difference."""
    import spectra.checkpoints.pairing as pairing_module
    from safetensors.torch import load_file, save_file
    from spectra.errors import NonFiniteWeightError
    from spectra.linalg.sketch import _BLOCK

    base = _model(seed=3, hidden_size=64, moe_intermediate_size=72).to(torch.bfloat16)
    layouts = _layouts(tmp_path, base, _fine_tune(base, seed=300))
    b, t = layouts[base_layout][0], layouts[tuned_layout][1]
    b_state, t_state = _loaded(b), _loaded(t)
    key = MOE.format(0, "gate_up_proj")
    state = load_file(t / "model.safetensors")
    state[key][1, 5, 7] = float("nan")
    save_file(state, t / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(pairing_module, "_CHUNK", _BLOCK)
    with pytest.raises(NonFiniteWeightError, match=rf"tensor {key}\[1\] in {t}"):
        list(Pairing(b, t, PairingOptions(vectors=False)))
    pairing = Pairing(b, t, PairingOptions(vectors=False, on_nonfinite="skip", split_fused=False))
    deltas = _by_name(pairing)
    assert set(pairing.skipped_entries) == {_expert(key, 1)} and _expert(key, 1) not in deltas
    for k in EXPERTS:
        for e in range(3):
            if (k, e) != (key, 1):
                assert torch.equal(deltas[_expert(k, e)].delta, t_state[k][e].float() - b_state[k][e].float())


def test_another_size_is_still_refused_naming_both_tensors_and_shapes(moe, tmp_path):
    """Negative control: a fine-tune of another expert width (moe_intermediate_size 10, not 12) is neither layout
    of the base's experts, and is refused by the tensors' names and stored shapes (either base layout)."""
    import transformers as tf

    config = copy.deepcopy(tiny("qwen3_vl_moe").config)
    config.text_config.moe_intermediate_size = 10
    other = tf.Qwen3VLMoeForConditionalGeneration(config)
    _, _, layouts, _ = moe
    other_dir = pair(tmp_path, other, other)[1]
    for layout, stored in (("hub", (3, 32, 24)), ("transformers 5", (3, 24, 32))):
        with pytest.raises(PairingError) as err:
            Pairing(layouts[layout][0], other_dir)
        message = str(err.value)
        assert MOE.format(0, "gate_up_proj") in message or MOE.format(0, "down_proj") in message
        if MOE.format(0, "gate_up_proj") in message:
            assert f"{stored}" in message and "(3, 20, 32)" in message
        assert str(layouts[layout][0]) in message and str(other_dir) in message
        assert "whichever way round" in message


def test_square_experts_pair_as_stored_as_transformers_loads_them(tmp_path):
    """moe_intermediate_size 16 makes gate_up_proj square (E, 32, 32): transformers loads it as stored in either
    layout (check_dims), so a hub-layout base's gate_up_proj is loaded untransposed, and spectra pairs it as stored
    (no mixed layout for it); down_proj (E, 32, 16) / (E, 16, 32) is still brought to the model's (out, in). Every
    expert is the loaded models' difference, in all four pairs of layouts."""
    base = _model(seed=1, moe_intermediate_size=16)
    tuned = _fine_tune(base, seed=100)
    layouts = _layouts(tmp_path, base, tuned)
    loaded = {d: _loaded(d) for dirs in layouts.values() for d in dirs}
    hub_gate_up = loaded[layouts["hub"][0]][MOE.format(0, "gate_up_proj")]
    assert torch.equal(hub_gate_up, base.state_dict()[MOE.format(0, "gate_up_proj")].transpose(1, 2))  # as stored
    for base_layout in LAYOUTS:
        for tuned_layout in LAYOUTS:
            b, t = layouts[base_layout][0], layouts[tuned_layout][1]
            pairing = Pairing(b, t, PairingOptions(vectors=False))
            deltas = _by_name(pairing)
            _check_experts_against_transformers(deltas, loaded[b], loaded[t])
            mixed = [n for n in pairing.notes if "another layout" in n]
            assert len(mixed) == (base_layout != tuned_layout)
            if mixed:
                assert "2 expert tensor(s)" in mixed[0] and "down_proj" in mixed[0]  # the square ones as stored


@pytest.mark.parametrize("base_layout, tuned_layout", MIXED)
def test_extract_from_a_mixed_pair_merges_to_the_fine_tune(moe, base_layout, tuned_layout, tmp_path):
    """Extract on a mixed pair writes the experts' LoRA on the model's parameters (placed by the base's layout) from
    the model-oriented ΔW: PEFT's merge onto the base model is the fine-tune (rank 2 is exact on these rank-2
    updates; 1e-6 on 2⁻¹²-grid weights), and spectra reads the adapter back against either base folder as the
    loaded difference."""
    import json

    base, tuned, layouts, loaded = moe
    b, t = layouts[base_layout][0], layouts[tuned_layout][1]
    extract_adapter(b, t, 2, tmp_path / "ad", roles=("gate", "up", "down"), progress=False)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)
    for folder in (layouts["hub"][0], layouts["transformers 5"][0]):
        read = _by_name(Pairing(folder, tmp_path / "ad", PairingOptions(vectors=False)))
        for key in EXPERTS:
            for e in range(3):
                d = read[_expert(key, e)]
                expected = loaded[t][key][e] - loaded[folder][key][e]
                torch.testing.assert_close(d.delta, expected, rtol=0, atol=1e-6, msg=d.name)
