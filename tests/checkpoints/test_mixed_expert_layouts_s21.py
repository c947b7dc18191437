"""A per-expert base against a fused-layout fine-tune of the same MoE model, and the reverse.

transformers 5.24's ``save_pretrained`` writes each expert's matrices on their own (Mixtral's
``block_sparse_moe.experts.3.w1.weight``, ``w3``, ``w2``; Qwen3-MoE's ``mlp.experts.3.gate_proj.weight``, ``up_proj``,
``down_proj``), while ``save_file(model.state_dict())`` writes the loaded model's fused parameters
(``mlp.experts.gate_up_proj`` (E, 2·ffn, hidden), ``mlp.experts.down_proj`` (E, hidden, ffn); Mixtral's router as
``mlp.gate.weight``). spectra paired only the attention of such a pair: every expert tensor and Mixtral's router were
"only in BASE / only in TUNED", exit 0, and the headline covered attention alone.

References: analyze's rows of the same pair saved in one layout (names, roles, layers, experts, energy ranks, every
number), and per expert a float64 numpy SVD of tuned − base read from the per-expert checkpoints' own tensors, each
saved by transformers (its conversion decides which rows of ``gate_up_proj`` are the gate). Negative controls: a
model of another hidden size is still refused, and one of another expert width too (by the expert parameter's name);
without a config.json (no model class to place the experts with) the run says loudly that the experts were not
analysed, in analyze's summary and analysis.json's pairing notes.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.errors import PairingError
from tests.cli.test_cli import run
from tests.models import energy_ranks64, graded_update, tiny_moe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

FAMILIES = ("mixtral", "qwen3_moe")
# the stored per-expert names (save_pretrained) of (gate, up, down), under the MoE block of layer L
PER_EXPERT = {"mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                          "block_sparse_moe.experts.{e}.w2"),
              "qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")}
ROUTER = {"mixtral": "block_sparse_moe.gate", "qwen3_moe": "mlp.gate"}  # as save_pretrained stores it


def _save_fused(model, folder):
    """The loaded model's state dict as stored by non-HF tooling: one (E, ·, ·) tensor per expert projection."""
    from safetensors.torch import save_file

    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _tuned(base):
    """base + a graded update in every expert of layer 1 (gate rank 2, up rank 3, down rank 1, expert 0 left
    unchanged), in layer 0's attention, and in layer 1's router."""
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    seed = 1
    with torch.no_grad():
        gate_up = params["model.layers.1.mlp.experts.gate_up_proj"]  # (E, 2·ffn, hidden), gate rows first
        down = params["model.layers.1.mlp.experts.down_proj"]  # (E, hidden, ffn)
        ffn = gate_up.shape[1] // 2
        for e in range(1, gate_up.shape[0]):
            for view, rank in ((gate_up[e, :ffn], 2), (gate_up[e, ffn:], 3), (down[e], 1)):
                view += graded_update(tuple(view.shape), rank, seed=seed).float()
                seed += 1
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate.weight"):
            params[name] += graded_update(tuple(params[name].shape), 2, seed=seed).float()
            seed += 1
    return tuned


@pytest.fixture(scope="module", params=FAMILIES)
def layouts(request, tmp_path_factory):
    """family, {(side, layout): folder}: base and tuned saved per expert (save_pretrained) and fused."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = tiny_moe(family)
    tuned = _tuned(base)
    folders = {}
    for side, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(root / f"{side}_per_expert")
        folders[side, "per_expert"] = root / f"{side}_per_expert"
        folders[side, "fused"] = _save_fused(model, root / f"{side}_fused")
    return family, folders


def _stored(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _read64(folder, name) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name).double().numpy()


def _rows(base, tuned) -> dict[str, dict]:
    from spectra.analysis import analyze

    result = analyze(base, tuned, cache_dir=False, progress=False).to_dict()
    rows = {m["name"]: {k: v for k, v in m.items() if k != "seconds"} for m in result["modules"]}
    return rows, result["pairing"]


def test_the_two_layouts_are_what_transformers_and_state_dict_write(layouts):
    family, folders = layouts
    per_expert, fused = _stored(folders["base", "per_expert"]), _stored(folders["tuned", "fused"])
    gate = PER_EXPERT[family][0].format(e=2)
    assert f"model.layers.1.{gate}.weight" in per_expert
    assert not any(k.endswith("experts.gate_up_proj") for k in per_expert)
    assert fused["model.layers.1.mlp.experts.gate_up_proj"][0] == 3
    assert not any(".experts.2." in k for k in fused)


@pytest.mark.parametrize("direction", [("per_expert", "fused"), ("fused", "per_expert")])
def test_a_mixed_pair_gives_the_rows_of_a_pair_saved_in_the_base_layout(layouts, direction):
    """Every row equals the row of the same pair saved in the base's layout (names, roles, layers, experts, energy
    ranks, singular values, norms); nothing is left "only in" either side; the pairing says what it did."""
    family, folders = layouts
    b_layout, t_layout = direction
    mixed, pairing = _rows(folders["base", b_layout], folders["tuned", t_layout])
    reference, ref_pairing = _rows(folders["base", b_layout], folders["tuned", b_layout])
    assert not pairing["only_in_base"] and not pairing["only_in_tuned"]
    assert sorted(mixed) == sorted(reference)
    for name, row in reference.items():
        assert mixed[name] == row, name
    assert any("stored per expert in the" in n and "fused in the" in n for n in pairing["notes"])
    assert not ref_pairing["only_in_base"] and not ref_pairing["only_in_tuned"]
    experts = [r for r in mixed.values() if r["expert"] is not None]
    # 3 experts × 1 MoE layer (Qwen3-MoE's layer 0 is dense) or 2 (Mixtral); per-expert: gate, up, down;
    # fused: gate_up whole, [gate], [up], down
    layers = 2 if family == "mixtral" else 1
    assert len(experts) == 3 * layers * (3 if b_layout == "per_expert" else 4)


@pytest.mark.parametrize("direction", [("per_expert", "fused"), ("fused", "per_expert")])
def test_each_expert_matches_a_float64_svd_of_its_stored_matrices(layouts, direction):
    """Each expert's gate, up and down record (per-expert base: ``…experts.3.w1``; fused base:
    ``…experts.3.gate_up_proj[gate]``) has the role, layer, expert, energy ranks and singular values of a float64
    numpy SVD of tuned − base of the per-expert checkpoints' own tensors; the router's likewise."""
    family, folders = layouts
    b_layout, t_layout = direction
    rows, _ = _rows(folders["base", b_layout], folders["tuned", t_layout])
    pb, pt = folders["base", "per_expert"], folders["tuned", "per_expert"]
    for e in range(3):
        for role, stored in zip(("gate", "up", "down"), PER_EXPERT[family]):
            tensor = f"model.layers.1.{stored.format(e=e)}.weight"
            delta = _read64(pt, tensor) - _read64(pb, tensor)
            if b_layout == "per_expert":
                name = tensor.removesuffix(".weight")
            else:
                proj = "down_proj" if role == "down" else f"gate_up_proj[{role}]"
                name = f"model.layers.1.mlp.experts.{e}.{proj}"
            row = rows[name]
            assert (row["role"], row["layer"], row["expert"], row["shape"]) == (role, 1, e, list(delta.shape)), name
            assert row["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5, abs=1e-12), name
            if e == 0:
                assert row["fro_norm"] == 0, name
                continue
            assert row["energy_rank"] == energy_ranks64(delta), name
            assert row["energy_rank"]["0.99"] == {"gate": 2, "up": 3, "down": 1}[role], name
            s = np.linalg.svd(delta, compute_uv=False)
            k = len(row["singular_values"])
            np.testing.assert_allclose(row["singular_values"], s[:k], rtol=1e-4, atol=1e-7, err_msg=name)
    router = f"model.layers.1.{ROUTER[family]}" if b_layout == "per_expert" else "model.layers.1.mlp.gate"
    delta = (_read64(pt, f"model.layers.1.{ROUTER[family]}.weight")
             - _read64(pb, f"model.layers.1.{ROUTER[family]}.weight"))
    assert rows[router]["energy_rank"] == energy_ranks64(delta)
    assert rows[router]["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)


def test_extract_on_a_mixed_pair_writes_the_base_layout_pairs_adapter(layouts, tmp_path, monkeypatch, capsys):
    """extract plans the experts as for the base's layout: the adapter of a per-expert base and a fused fine-tune is
    the adapter of the per-expert pair, key for key, value for value, config for config."""
    from safetensors.torch import load_file

    _, folders = layouts
    out = {}
    for t_layout in ("fused", "per_expert"):
        out[t_layout] = tmp_path / t_layout
        code, stdout, err = run(monkeypatch, capsys, "extract", folders["base", "per_expert"],
                                folders["tuned", t_layout], "--rank", "2", "-o", out[t_layout])
        assert code == 0, stdout + err
    mixed, reference = (load_file(str(out[k] / "adapter_model.safetensors")) for k in ("fused", "per_expert"))
    assert sorted(mixed) == sorted(reference)
    assert any(".experts." in k for k in mixed)
    for key, value in reference.items():
        assert torch.equal(mixed[key], value), key
    configs = [json.loads((out[k] / "adapter_config.json").read_text()) for k in ("fused", "per_expert")]
    assert configs[0] == configs[1]


def test_another_size_is_still_refused(tmp_path):
    """Negative controls: a fused fine-tune of another hidden size is refused (by attention's shapes, as before), one
    of another expert width by the expert parameter it does not fit."""
    import transformers as tf

    base = tiny_moe("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    for name, change in (("hidden", dict(hidden_size=48)), ("width", dict(moe_intermediate_size=24))):
        config = copy.deepcopy(base.config)
        for key, value in change.items():
            setattr(config, key, value)
        torch.manual_seed(1)
        other = _save_fused(tf.Qwen3MoeForCausalLM(config).eval(), tmp_path / name)
        for pair in ((tmp_path / "base", other), (other, tmp_path / "base")):  # both directions
            with pytest.raises(PairingError) as err:
                Pairing(*pair, PairingOptions(load=False))
            assert "different architectures or sizes" in str(err.value)
            if name == "width":
                assert "model.layers.1.mlp.experts.gate_up_proj" in str(err.value)


def test_experts_that_cannot_be_placed_are_named_loudly(layouts, tmp_path, monkeypatch, capsys):
    """Without a config.json no model class says where the experts lie: the mixed pair's expert tensors stay
    unpaired, and analyze says so first among its notes (summary and analysis.json), with the counts and layouts."""
    family, folders = layouts
    copies = {}
    for side, layout in (("base", "per_expert"), ("tuned", "fused")):
        copies[side] = tmp_path / side
        copies[side].mkdir()
        shutil.copy(folders[side, layout] / "model.safetensors", copies[side])
    pairing = Pairing(copies["base"], copies["tuned"], PairingOptions(load=False))
    note = pairing.notes[0]
    assert "were NOT analysed" in note and "only in BASE" in note and "only in TUNED" in note, note
    assert "only in BASE, stored per expert (e.g. model.layers." in note, note
    assert "only in TUNED, stored fused, one (experts, ·, ·) tensor per projection (e.g. model.layers." in note
    assert "no config.json names a model class" in note
    assert any(".experts." in n for n in pairing.only_in_tuned)
    code, stdout, err = run(monkeypatch, capsys, "analyze", copies["base"], copies["tuned"], "-o", tmp_path / "run",
                            "--no-cache")
    assert code == 0, stdout + err
    assert "were NOT analysed" in " ".join((stdout + err).split())
    analysis = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert any("were NOT analysed" in n for n in analysis["pairing"]["notes"])
