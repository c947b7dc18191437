"""GraniteMoE's experts as transformers 5 saves them (``block_sparse_moe.input_linear.weight`` (experts, 2·I, H),
``output_linear.weight`` (experts, H, I)): one (out, in) record per expert, named as transformers loads them
(``block_sparse_moe.experts.3.gate_up_proj``, ``down_proj``), ``gate_up_proj`` split into its [gate; up] halves (its
forward: ``F.linear(x, W[e]).chunk(2)``, gate first). spectra read each weight as ONE flattened (experts, out·in)
matrix of role ``other`` (a convolution kernel's path). References: float64 SVDs of the model's own expert slices
(transformers' GraniteMoeForCausalLM, built from config), PEFT's get_peft_model (trainable count) and PeftModel's
merge of the extracted adapter. A 3-D ``.weight`` under an MoE block spectra cannot split is skipped with a note;
a convolution's 3-D kernel is still read as (out, in·k) (control).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.cli.test_cli import run
from tests.models import energy_ranks64, planted_expert_pair

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

GATE_UP = "model.layers.1.block_sparse_moe.experts.gate_up_proj"  # the model's parameter (E, 2·I, H)
DOWN = "model.layers.0.block_sparse_moe.experts.down_proj"  # (E, H, I)
PLANTED = {(GATE_UP, 1): 3, (DOWN, 2): 2}  # (parameter, expert) -> planted rank


def tiny_granitemoe():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GraniteMoeConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=64,
                                 max_position_embeddings=64, tie_word_embeddings=False)
    return tf.GraniteMoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    from spectra.analysis import analyze

    root = tmp_path_factory.mktemp("granitemoe")
    base = tiny_granitemoe()
    tuned, b, t, _ = planted_expert_pair(root, base, PLANTED)
    (root / "run").mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(root / "run" / "analysis.json")
    return base, tuned, b, t, root / "run"


def _delta64(base, tuned, name, e) -> np.ndarray:
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    return t[name][e].detach().double().numpy() - b[name][e].detach().double().numpy()


def test_checkpoint_stores_the_layout_this_test_reads(granite):
    """transformers 5.24 saves GraniteMoE's experts under the hub names, (E, out, in)."""
    from safetensors import safe_open

    _, _, b, _, _ = granite
    with safe_open(str(b / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "block_sparse_moe" in k}
    assert shapes["model.layers.1.block_sparse_moe.input_linear.weight"] == (3, 32, 32)
    assert shapes["model.layers.0.block_sparse_moe.output_linear.weight"] == (3, 32, 16)


def test_one_record_per_expert_with_roles_and_energy_ranks_of_float64_svd(granite):
    """Every expert a record of its own, (out, in), role gate_up (with [gate] and [up] halves) or down; the planted
    experts' energy ranks equal a float64 SVD's of the model's own slice (the gate_up one whole and per half), the
    others are unchanged; no flattened (experts, out·in) record is left."""
    base, tuned, _, _, run_dir = granite
    modules = {m["name"]: m for m in json.loads((run_dir / "analysis.json").read_text())["modules"]}
    assert not any(m["name"].endswith(("input_linear", "output_linear")) for m in modules.values())
    for layer in (0, 1):
        for e in range(3):
            head = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            assert (modules[f"{head}.gate_up_proj"]["role"], modules[f"{head}.gate_up_proj"]["shape"]) == ("gate_up",
                                                                                                        [32, 32])
            assert modules[f"{head}.gate_up_proj[gate]"]["role"] == "gate"
            assert modules[f"{head}.gate_up_proj[up]"]["role"] == "up"
            assert (modules[f"{head}.down_proj"]["role"], modules[f"{head}.down_proj"]["shape"]) == ("down", [32, 16])
            assert modules[f"{head}.down_proj"]["expert"] == e
    for (name, e), rank in PLANTED.items():
        delta = _delta64(base, tuned, name, e)
        record = name.replace(".experts.", f".experts.{e}.")
        assert modules[record]["energy_rank"] == energy_ranks64(delta), record
        assert modules[record]["energy_rank"]["0.99"] == rank
        assert modules[record]["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        if name == GATE_UP:  # the forward's chunk(2): gate the first half of the rows
            for half, rows in (("gate", slice(0, 16)), ("up", slice(16, 32))):
                assert modules[f"{record}[{half}]"]["energy_rank"] == energy_ranks64(delta[rows])
    unchanged = [m for m in modules.values() if ".experts." in m["name"] and m["fro_norm"] == 0]
    assert len(unchanged) == 2 * 3 * 4 - 4  # all records less the planted ones (gate_up whole, gate, up; down)


def test_plan_trains_what_it_states_and_extract_merges_to_the_truncation(granite, tmp_path, monkeypatch, capsys):
    """recommend's plan: PEFT's get_peft_model on its peft_config trains totals.params, through target_parameters
    naming the model's two expert parameters. extract --plan and --rank 2: PeftModel's merge equals, per expert,
    base + the float64 rank-r truncation of ΔW (the plan's rank, 2), every other weight the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    import transformers as tf

    base, tuned, b, t, run_dir = granite
    plan_path = tmp_path / "plan.json"
    code, stdout, err = run(monkeypatch, capsys, "recommend", run_dir, "--energy", "0.9", "-o", plan_path)
    assert code == 0, stdout + err
    plan = json.loads(plan_path.read_text())
    assert sorted(plan["peft_config"]["target_parameters"]) == sorted([GATE_UP, DOWN])
    config = {k: v for k, v in plan["peft_config"].items() if k != "peft_type"}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    assert plan["totals"]["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    fused = {f["name"]: f["rank"] for f in plan["fused"]}
    assert fused == {GATE_UP: 2, DOWN: 2}  # the largest τ = 0.9 rank of its experts (float64: 2 and 2)
    assert fused[GATE_UP] == energy_ranks64(_delta64(base, tuned, GATE_UP, 1))["0.9"]

    start = {n: p.detach().double() for n, p in base.named_parameters()}
    for option, ranks in ((("--plan", plan_path), fused), (("--rank", "2"), {GATE_UP: 2, DOWN: 2})):
        out = tmp_path / f"adapter{option[0]}"
        code, stdout, err = run(monkeypatch, capsys, "extract", b, t, *option, "-o", out)
        assert code == 0, stdout + err
        loaded = tf.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float64)
        merged = {n: p.detach() for n, p in PeftModel.from_pretrained(loaded, out).merge_and_unload()
                  .named_parameters()}
        for name, rank in ranks.items():
            for e in range(3):
                u, s, vt = np.linalg.svd(_delta64(base, tuned, name, e), full_matrices=False)
                goal = start[name][e].numpy() + (u[:, :rank] * s[:rank]) @ vt[:rank]
                np.testing.assert_allclose(merged[name][e].numpy(), goal, rtol=0, atol=2e-7, err_msg=f"{name}[{e}]")
        for name, weight in merged.items():
            if name not in ranks and "q_proj" not in name:
                torch.testing.assert_close(weight, start[name], rtol=0, atol=0, msg=name)


def test_unknown_3d_moe_weight_is_skipped_with_a_note_and_a_conv_kernel_is_still_read(tmp_path):
    """A 3-D .weight under an MoE block of a layout spectra does not know (model type none of GraniteMoE's) is
    skipped with a note naming it, not read as one (experts, out·in) matrix; a 3-D convolution kernel is read as
    (out, in·k) as before (control)."""
    from safetensors.torch import save_file

    from spectra.checkpoints.pairing import Pairing, PairingOptions

    torch.manual_seed(0)
    names = {"model.layers.0.moe.experts_weight.weight": (4, 8, 6), "model.layers.0.conv.weight": (8, 6, 3)}
    for side, shift in (("b", 0.0), ("t", 1.0)):
        (tmp_path / side).mkdir()
        tensors = {n: torch.randn(s) + shift for n, s in names.items()}
        save_file(tensors, str(tmp_path / side / "model.safetensors"))
        (tmp_path / side / "config.json").write_text(json.dumps({"model_type": "somemoe"}))
    pairing = Pairing(tmp_path / "b", tmp_path / "t", PairingOptions(vectors=False))
    assert [e.name for e in pairing.entries] == ["model.layers.0.conv"]
    assert pairing.entries[0].shape == (8, 18)
    assert any("model.layers.0.moe.experts_weight.weight: skipped, a 3-D weight (4, 8, 6)" in n
               for n in pairing.notes), pairing.notes


@pytest.mark.parametrize("family", ["granitemoeshared", "granitemoehybrid"])
def test_shared_and_hybrid_experts_per_expert_and_shared_mlp_gate_up(tmp_path, family):
    """GraniteMoeShared and GraniteMoeHybrid store their routed experts as GraniteMoE does: one record per expert
    (no flattened record, no skip note). Their shared expert's shared_mlp.input_linear (2·shared_intermediate,
    hidden), role other before, is gate_up with [gate] the first half: the module's own forward equals
    act(x·W[gate]ᵀ) ⊙ (x·W[up]ᵀ) through output_linear (role down)."""
    import transformers as tf

    from spectra.checkpoints.pairing import Pairing, PairingOptions

    extra = dict(shared_intermediate_size=24)
    if family == "granitemoehybrid":
        extra |= dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1)
    config_cls, model_cls = {"granitemoeshared": (tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM),
                             "granitemoehybrid": (tf.GraniteMoeHybridConfig, tf.GraniteMoeHybridForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=64,
                                 max_position_embeddings=64, **extra)).eval()
    model.save_pretrained(tmp_path)
    pairing = Pairing(tmp_path, tmp_path, PairingOptions(vectors=False, load=False))
    entries = {e.name: e for e in pairing.entries}
    assert not pairing.notes
    for layer in (0, 1):
        for e in range(3):
            head = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            assert entries[f"{head}.gate_up_proj"].shape == (32, 32)
            assert [p.role for p in entries[f"{head}.gate_up_proj"].projections] == ["gate", "up"]
            assert (entries[f"{head}.down_proj"].info.role, entries[f"{head}.down_proj"].shape) == ("down", (32, 16))
        shared = entries[f"model.layers.{layer}.shared_mlp.input_linear"]
        assert (shared.info.role, shared.shape) == ("gate_up", (48, 32))
        assert entries[f"model.layers.{layer}.shared_mlp.output_linear"].info.role == "down"
    mlp = model.model.layers[0].shared_mlp
    gate, up = (next(p for p in shared.projections if p.role == r).rows for r in ("gate", "up"))
    x = torch.randn(5, 32)
    weight = mlp.input_linear.weight
    expected = mlp.output_linear(mlp.activation(x @ weight[gate].T) * (x @ weight[up].T))
    torch.testing.assert_close(mlp(x), expected)
