"""Truncation sweeps over Qwen3-VL-MoE's stored 3-D experts, in both of their stored layouts.

transformers 5 saves the experts as the model holds them, (E, out, in); the hub's checkpoints store them (E, in,
out), which transformers transposes on loading (``Transpose(1, 2, check_dims=True)``: only where the stored shape is
not the parameter's, so a square expert loads as stored). The reference is transformers itself: the base and the
fine-tune loaded by ``from_pretrained`` from the same folders the sweep reads. At full rank with the fine-tune's
non-targets the swept model must hold the loaded fine-tune's every tensor, at rank 0 with the base's the loaded
base's, and at rank r each expert W_base[e] + numpy's float64 rank-r truncation of W_tuned[e] − W_base[e], both as the
model holds them (out, in).

What was wrong: the sweep placed expert e of a stored 3-D tensor at ``parameter[e]`` as stored, so the hub's (in,
out) experts had no place (a note; they followed the non-targets), and the non-targets copied the stored (E, in, out)
tensor into the (E, out, in) parameter whole, which fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spectra.sweep_weights import ModelWeights
from tests.checkpoints.test_mixed_layouts import _model
from tests.checkpoints.test_qwen_vl import _layouts
from tests.models import GRID

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
EXPERTS = "model.language_model.layers.{}.mlp.experts.{}"
KEYS = [EXPERTS.format(layer, p) for layer in (0, 1) for p in ("gate_up_proj", "down_proj")]


def _fine_tune(base):
    """Every expert (and q_proj) moved by a full-rank update on the 2⁻¹² grid."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name or name.endswith("self_attn.q_proj.weight"):
                p += torch.randint(-8, 9, p.shape, generator=g).to(p.dtype) * GRID * 4
    return tuned


@pytest.fixture(scope="module", params=[12, 16], ids=["non-square", "square gate_up"])
def moe_layouts(request, tmp_path_factory):
    """{layout: (base dir, tuned dir)} of one fine-tune saved by transformers 5 and as the hub stores it, of a tiny
    Qwen3-VL-MoE (width 32, 3 experts of width 12 or 16: 16 makes gate_up_proj[e] square, (32, 32))."""
    base = _model(0, moe_intermediate_size=request.param)
    return _layouts(tmp_path_factory.mktemp(f"sweep-moe-{request.param}"), base, _fine_tune(base))


def _loaded(folder) -> dict[str, torch.Tensor]:
    """The state transformers loads from `folder`: the reference."""
    import transformers as tf

    return tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()


def _truncated(W: torch.Tensor, Wt: torch.Tensor, rank: int) -> np.ndarray:
    """W + numpy's float64 rank-`rank` truncation of Wt − W, for (out, in) matrices."""
    U, S, Vh = np.linalg.svd(Wt.double().numpy() - W.double().numpy())
    return W.double().numpy() + (U[:, :rank] * S[:rank]) @ Vh[:rank]


def _weights(b, t, **options) -> ModelWeights:
    """The sweep's weights of a model loaded from the fine-tune, with every target's SVD factors."""
    import transformers as tf

    weights = ModelWeights(tf.Qwen3VLMoeForConditionalGeneration.from_pretrained(t, dtype=torch.float32), b, t,
                           **options)
    for target in weights.targets:  # what truncation_sweep computes once per module
        target.factors = torch.linalg.svd(weights.delta(target).double(), full_matrices=False)
    return weights


@pytest.mark.parametrize("layout", ["transformers 5", "hub"])
def test_every_expert_is_truncated_in_the_layout_the_model_holds(moe_layouts, layout):
    """Each expert of gate_up_proj and down_proj is a target; full rank is the loaded fine-tune, rank 0 the loaded base
    (every tensor, bit for bit), rank 1 and 2 the base's expert plus the truncation of its (out, in) ΔW."""
    b, t = moe_layouts[layout]
    base, tuned = _loaded(b), _loaded(t)
    weights = _weights(b, t, roles=("gate_up", "down"))
    assert not any("no place" in n for n in weights.notes), weights.notes
    experts = {EXPERTS.format(layer, f"{e}.{p}") for layer in (0, 1) for e in range(3)
               for p in ("gate_up_proj", "down_proj")}
    assert {t.name for t in weights.targets if ".experts." in t.name} == experts
    for key in KEYS:  # negative control: the fine-tune moves every expert
        assert all(not torch.equal(base[key][e], tuned[key][e]) for e in range(3))
    full, zero = tuple(t.full_rank for t in weights.targets), (0,) * len(weights.targets)
    for ranks, side in ((zero, "base"), (full, "tuned"), (full, "base"), (zero, "tuned")):
        weights.apply(ranks, non_target=side)
        for key, value in weights.state.items():  # the experts at their rank's end, every other tensor the side's
            expected = (tuned if (ranks == full if ".experts." in key else side == "tuned") else base)[key]
            assert torch.equal(value, expected), (layout, ranks[0], side, key)
    for rank in (1, 2):
        weights.apply((rank,) * len(full), non_target="tuned")
        for key in KEYS:
            for e in range(3):
                written = weights.state[key][e].double().numpy()
                np.testing.assert_allclose(written, _truncated(base[key][e], tuned[key][e], rank), rtol=0,
                                           atol=1e-6, err_msg=f"{layout} {key}[{e}] r={rank}")
                assert not np.allclose(written, tuned[key][e].double().numpy(), rtol=0, atol=1e-6)  # not the ends


@pytest.mark.parametrize("layout", ["transformers 5", "hub"])
def test_untargeted_and_partly_targeted_experts_follow_the_non_targets_as_loaded(moe_layouts, layout):
    """Experts left to the non-targets (roles q only; a plan naming one expert) are the loaded base's or fine-tune's
    whole parameter on each side; the one planned expert is its own truncation after the non-targets switch."""
    from tests.test_sweep import a_plan

    b, t = moe_layouts[layout]
    base, tuned = _loaded(b), _loaded(t)
    weights = _weights(b, t, roles=("q",))
    for side, reference in (("base", base), ("tuned", tuned), ("base", base)):
        weights.apply(tuple(t.full_rank for t in weights.targets), non_target=side)
        for key in KEYS:
            assert torch.equal(weights.state[key], reference[key]), (layout, side, key)
    expert = EXPERTS.format(1, "2.down_proj")
    (entry,) = [t for t in _weights(b, t, roles=("down",)).targets if t.name == expert]
    weights = _weights(b, t, plan=a_plan({expert: (1, entry.shape)}))
    assert [t.name for t in weights.targets] == [expert]
    key = EXPERTS.format(1, "down_proj")
    for side, reference in (("base", base), ("tuned", tuned)):
        weights.apply((1,), non_target=side)
        np.testing.assert_allclose(weights.state[key][2].double().numpy(),
                                   _truncated(base[key][2], tuned[key][2], 1), rtol=0, atol=1e-6)
        assert torch.equal(weights.state[key][:2], reference[key][:2]), (layout, side)


@pytest.mark.parametrize("mix", [("hub", "transformers 5"), ("transformers 5", "hub")], ids=["hub base", "t5 base"])
def test_a_base_and_fine_tune_stored_in_different_layouts_are_truncated_as_loaded(moe_layouts, mix):
    """A hub base fine-tuned and saved by transformers 5 stores its experts the other way round: the sweep found their
    places by the fine-tune's layout and oriented them by the base's, so it left every expert untruncated ('no place')
    and took them from the fine-tune where the non-targets should be the base's ('absent from the base')."""
    b, t = moe_layouts[mix[0]][0], moe_layouts[mix[1]][1]
    base, tuned = _loaded(b), _loaded(t)
    w = _weights(b, t, roles=("gate_up", "down"))
    assert not any("no place" in n or "absent" in n for n in w.notes), w.notes
    assert len([x for x in w.targets if ".experts." in x.name]) == 12
    full, zero = tuple(x.full_rank for x in w.targets), (0,) * len(w.targets)
    for ranks, side in ((zero, "base"), (full, "tuned"), (full, "base"), (zero, "tuned")):
        w.apply(ranks, non_target=side)
        for key, value in w.state.items():
            expected = (tuned if (ranks == full if ".experts." in key else side == "tuned") else base)[key]
            assert torch.equal(value, expected), (ranks[0], side, key)
    for rank in (1, 2):
        w.apply((rank,) * len(full), non_target="tuned")
        for key in KEYS:
            for e in range(3):
                np.testing.assert_allclose(w.state[key][e].double().numpy(),
                                           _truncated(base[key][e], tuned[key][e], rank), rtol=0, atol=1e-6)
    w = _weights(b, t, roles=("q",))  # experts untargeted: they follow the non-targets, base's as loaded
    assert not any("absent" in n for n in w.notes), w.notes
    for side, ref in (("base", base), ("tuned", tuned), ("base", base)):
        w.apply(tuple(x.full_rank for x in w.targets), non_target=side)
        for key in KEYS:
            assert torch.equal(w.state[key], ref[key]), (side, key)
