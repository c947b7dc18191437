"""JetMoE's experts: ``JetMoeParallelExperts`` weights (experts, out, in), one (out, in) matrix per expert.

JetMoE holds its MLP experts (``mlp.input_linear``: every expert's ``[gate; up]``, its forward chunking the output in
two halves, ``activation(first) · second``; ``mlp.output_linear``: down) and its attention experts
(``self_attention.experts.input_linear``: each expert's query projection; ``output_linear``: its output projection)
as 3-D ``.weight`` parameters. spectra analysed each as one flattened (experts, out·in) matrix of role ``other``, and
``--roles q,o,gate,up,down`` found nothing to adapt. The references are the tiny model's own float64 forward (what
each expert's slice of the input is multiplied by) and PEFT's ``target_parameters`` on the model itself.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.checkpoints.adapted import TargetSelection, peft_targets, role_targets
from spectra.checkpoints.architectures import module_info, parallel_experts, role_selected
from spectra.checkpoints.pairing import Pairing, PairingOptions
from tests.checkpoints.test_architectures_gemma4_jetmoe import KV_CHANNELS, KV_HEADS, tiny_jetmoe
from tests.models import flat_update, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
EXPERTS, HIDDEN, FFN = 3, 32, 48
KINDS = {"mlp.input_linear": "gate_up", "mlp.output_linear": "down", "self_attention.experts.input_linear": "q",
         "self_attention.experts.output_linear": "o"}


def _module(model, layer: int, kind: str):
    return model.model.layers[layer].get_submodule(kind)


def _pair(tmp_path, base, tuned, **options) -> dict:
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    pairing = Pairing(b, t, PairingOptions(dtype="float64", with_weights=True, vectors=False, **options))
    return {r.name: r for r in pairing}


def test_each_expert_record_is_the_matrix_its_forward_multiplies(tmp_path, monkeypatch):
    """float64 forward of the tiny JetMoE: for every ParallelExperts module and expert e, the rows of its input routed
    to e, times the record ``….e``'s tuned matrix transposed (input_linear: its [gate] and [up] records stacked),
    give exactly the rows of its output; the MLP's down input is activation(x @ gateᵀ) · (x @ upᵀ). Negative
    control: gate and up swapped, and the whole tensor flattened as before, give neither."""
    from transformers.models.jetmoe import modeling_jetmoe as jm

    base = tiny_jetmoe()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() == 3:
                p += 2.0 ** -8 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    records = _pair(tmp_path, base, tuned)
    calls = {}
    original = jm.JetMoeParallelExperts.forward

    def spy(self, inputs, expert_size):
        out = original(self, inputs, expert_size)
        calls.setdefault(id(self), []).append((inputs, list(expert_size.tolist() if torch.is_tensor(expert_size)
                                                             else expert_size), out))
        return out

    monkeypatch.setattr(jm.JetMoeParallelExperts, "forward", spy)
    model = tuned.double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    checked = 0
    for layer in (0, 1):
        for kind, role in KINDS.items():
            module = _module(model, layer, kind)
            (inputs, sizes, out), = calls[id(module)]
            starts = [sum(sizes[:e]) for e in range(EXPERTS + 1)]
            name = f"model.layers.{layer}.{kind}"
            assert module.weight.shape[0] == EXPERTS and sum(sizes) == inputs.shape[0]
            for e in range(EXPERTS):
                rows = slice(starts[e], starts[e + 1])
                x, y = inputs[rows], out[rows]
                if role == "gate_up":
                    gate, up = records[f"{name}.{e}[gate]"], records[f"{name}.{e}[up]"]
                    assert (gate.role, up.role, gate.expert, gate.layer) == ("gate", "up", e, layer)
                    assert gate.shape == up.shape == (FFN, HIDDEN)
                    weight = torch.cat([gate.tuned, up.tuned])
                    # the down experts' input: activation(first half) · second half, expert by expert
                    (down_in, _, _), = calls[id(_module(model, layer, "mlp.output_linear"))]
                    glu = torch.nn.functional.silu(x @ gate.tuned.T) * (x @ up.tuned.T)
                    torch.testing.assert_close(down_in[rows], glu, rtol=0, atol=1e-12)
                    if len(x):
                        swapped = torch.nn.functional.silu(x @ up.tuned.T) * (x @ gate.tuned.T)
                        assert not torch.allclose(down_in[rows], swapped)
                    whole = records[f"{name}.{e}"]
                    assert whole.role == "gate_up" and torch.equal(whole.tuned, weight)
                else:
                    record = records[f"{name}.{e}"]
                    assert (record.role, record.expert, record.layer) == (role, e, layer)
                    weight = record.tuned
                torch.testing.assert_close(y, x @ weight.T, rtol=0, atol=1e-12)
                torch.testing.assert_close(weight, module.weight[e], rtol=0, atol=0)
                checked += len(x)
    assert checked > 0
    assert not [n for n in records if n.endswith("input_linear") or n.endswith("output_linear")]  # no flattened whole
    q = records["model.layers.0.self_attention.experts.input_linear.1"]
    assert q.shape == (KV_HEADS * KV_CHANNELS, HIDDEN)


def test_a_change_in_one_experts_down_shows_in_that_record_alone(tmp_path):
    """A rank-2 update of layer 1's MLP expert 2's output_linear: its record's ΔW is exactly the update, every other
    record's ΔW is zero (its down of other experts, the gate/up of expert 2, the attention experts)."""
    base = tiny_jetmoe()
    tuned = copy.deepcopy(base)
    update = flat_update((HIDDEN, FFN), 2, seed=4).float()
    with torch.no_grad():
        tuned.model.layers[1].mlp.output_linear.weight[2] += update
    records = _pair(tmp_path, base, tuned)
    target = "model.layers.1.mlp.output_linear.2"
    expected = (tuned.model.layers[1].mlp.output_linear.weight[2].double()
                - base.model.layers[1].mlp.output_linear.weight[2].double())
    assert records[target].role == "down" and records[target].expert == 2
    torch.testing.assert_close(records[target].delta, expected, rtol=0, atol=0)
    assert torch.linalg.matrix_rank(records[target].delta, atol=1e-6) == 2  # float32 rounding of the update aside
    moved = [n for n, r in records.items() if r.kind == "matrix" and r.delta.abs().max() > 0]
    assert moved == [target]


def test_roles_select_the_experts_in_an_analysis_and_for_peft(tmp_path):
    """--roles: gate takes the [gate] rows of input_linear alone, q the attention experts' input_linear, o their
    output_linear, down the MLP's output_linear. role_targets hands them to PEFT as target_parameters, which wraps
    them: get_peft_model on the tiny model trains exactly those weights, and each merged expert's update is of rank
    at most r (one rank-r update per expert)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_jetmoe()
    records = _pair(tmp_path, base, copy.deepcopy(base), roles=("gate",))
    assert sorted(records) == [f"model.layers.{i}.mlp.input_linear.{e}[gate]" for i in (0, 1) for e in range(3)]
    for asked, kind in (("q", "self_attention.experts.input_linear"), ("o", "self_attention.experts.output_linear"),
                        ("down", "mlp.output_linear")):
        pairing = Pairing(tmp_path / "b", tmp_path / "t", PairingOptions(roles=(asked,), vectors=False))
        names = {e.name for e in pairing.entries}
        expected = {f"model.layers.{i}.{kind}.{e}" for i in (0, 1) for e in range(3)}
        if asked == "o":
            assert names == expected
        else:
            assert expected <= names and all(kind in n or "kv_proj" in n for n in names), (asked, names)
    config = base.config.to_dict()
    assert role_selected(module_info("model.layers.0.mlp.input_linear", config).role, ("up",))
    modules, parameters = role_targets(base, ("q", "o", "gate", "up", "down"))
    assert modules == [] and sorted(parameters) == sorted(f"model.layers.{i}.{kind}.weight" for i in (0, 1)
                                                          for kind in KINDS)
    modules, parameters = peft_targets(base, TargetSelection(roles=("gate", "o")))
    assert modules == [] and sorted(parameters) == sorted(
        f"model.layers.{i}.{kind}.weight" for i in (0, 1) for kind in ("mlp.input_linear",
                                                                       "self_attention.experts.output_linear"))
    model = base.double()
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=[], target_parameters=parameters,
                                                           init_lora_weights=False))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    adapted = [f"layers.{i}.{k}." for i in (0, 1) for k in ("mlp.input_linear", "self_attention.experts.output_linear")]
    assert trainable and all(any(a in n for a in adapted) for n in trainable), trainable
    merged = peft.merge_and_unload()
    for layer in (0, 1):
        for kind in KINDS:
            delta = _module(merged, layer, kind).weight - _module(model, layer, kind).weight
            adapted = f"model.layers.{layer}.{kind}.weight" in parameters
            for e in range(EXPERTS):
                rank = int(torch.linalg.matrix_rank(delta[e].detach()))
                assert (0 < rank <= 2) if adapted else rank == 0, (layer, kind, e, rank)


def test_parallel_experts_only_where_jetmoe_sizes_it():
    """parallel_experts: JetMoE's four modules at its config's sizes (or with no config); not at other sizes, not
    under another model type, not a 2-D weight, not another module name (Granite's shared_mlp.input_linear is a
    Linear). module_info reads a record's expert index; Mixtral's names keep theirs."""
    config = tiny_jetmoe().config.to_dict()
    sizes = {"mlp.input_linear": (3, 96, 32), "mlp.output_linear": (3, 32, 48),
             "self_attention.experts.input_linear": (3, 8, 32), "self_attention.experts.output_linear": (3, 32, 8)}
    for kind, shape in sizes.items():
        name = f"model.layers.0.{kind}"
        assert parallel_experts(name, shape, config) and parallel_experts(name, shape, None)
        assert not parallel_experts(name, (4, *shape[1:]), config)
        assert not parallel_experts(name, shape[::-1], config)
        assert not parallel_experts(name, shape, {"model_type": "granitemoe_swa"})
        assert not parallel_experts(name, shape[1:], config)
        assert module_info(f"{name}.2", config).expert == 2 and module_info(name, config).role == KINDS[kind]
    assert not parallel_experts("model.layers.0.shared_mlp.input_linear", (3, 96, 32), None)
    assert module_info("model.layers.0.mlp.experts.3.gate_up_proj").expert == 3
    assert module_info("model.layers.0.block_sparse_moe.experts.5.w1").role == "gate"
