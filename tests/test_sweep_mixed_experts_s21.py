"""Truncation sweeps over an MoE base and fine-tune saved in the two layouts transformers 5 loads into one model.

``save_pretrained`` writes Mixtral's and Qwen3-MoE's experts per expert (``block_sparse_moe.experts.3.w1.weight``,
``mlp.experts.3.gate_proj.weight`` …), ``save_file(model.state_dict())`` the loaded model's fused
``mlp.experts.gate_up_proj`` (E, 2·ffn, hidden) and ``down_proj``. The pairing reads each expert from its place in the
fused side (``PairEntry.tuned_slice``); the sweep found no place for those entries in the model loaded from the
fine-tune ("no place": they were not truncated) and took the fused parameters from the fine-tune where the base's
were asked for ("absent from the base").

The reference is transformers itself: the base and the fine-tune loaded by ``from_pretrained`` from the folders the
sweep reads. At full rank with the fine-tune's non-targets the swept model holds the loaded fine-tune's every tensor,
at rank 0 with the base's the loaded base's, and at rank r each expert's matrix is W_base + numpy's float64 rank-r
truncation of W_tuned − W_base, as the model holds them (out, in).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra.sweep_weights import ModelWeights
from tests.checkpoints.test_mixed_expert_layouts_s21 import FAMILIES, _save_fused, _tuned
from tests.models import tiny_moe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
MIXED = [("per_expert", "fused"), ("fused", "per_expert")]  # (base's layout, fine-tune's)


@pytest.fixture(scope="module", params=FAMILIES)
def folders(request, tmp_path_factory):
    """family, {(side, layout): folder}, the model class."""
    family = request.param
    root = tmp_path_factory.mktemp(f"sweep-{family}")
    base = tiny_moe(family)
    out = {}
    for side, model in (("base", base), ("tuned", _tuned(base))):
        model.save_pretrained(root / f"{side}_per_expert")
        out[side, "per_expert"] = root / f"{side}_per_expert"
        out[side, "fused"] = _save_fused(model, root / f"{side}_fused")
    return family, out, type(base)


def _truncated(W: torch.Tensor, Wt: torch.Tensor, rank: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(Wt.double().numpy() - W.double().numpy())
    return W.double().numpy() + (U[:, :rank] * S[:rank]) @ Vh[:rank]


@pytest.mark.parametrize("mix", MIXED, ids=["per-expert base", "fused base"])
def test_experts_stored_in_the_other_layout_are_truncated_as_loaded(folders, mix):
    family, out, cls = folders
    b, t = out["base", mix[0]], out["tuned", mix[1]]
    base = cls.from_pretrained(b, dtype=torch.float32).state_dict()
    tuned = cls.from_pretrained(t, dtype=torch.float32).state_dict()
    weights = ModelWeights(cls.from_pretrained(t, dtype=torch.float32), b, t, roles=("gate", "up", "down", "gate_up"))
    for target in weights.targets:
        target.factors = torch.linalg.svd(weights.delta(target).double(), full_matrices=False)
    assert not any("no place" in n or "absent" in n for n in weights.notes), weights.notes
    layers = (0, 1) if family == "mixtral" else (1,)
    per_expert = 3 if mix[0] == "per_expert" else 2  # gate, up, down records; or gate_up, down
    assert len([x for x in weights.targets if ".experts." in x.name]) == 3 * per_expert * len(layers)
    keys = [f"model.layers.{layer}.mlp.experts.{p}" for layer in layers for p in ("gate_up_proj", "down_proj")]
    for key in keys[-2:]:  # negative control: the fine-tune moves layer 1's experts 1 and 2
        assert not torch.equal(base[key], tuned[key])
    full, zero = tuple(x.full_rank for x in weights.targets), (0,) * len(weights.targets)
    for ranks, side in ((zero, "base"), (full, "tuned"), (full, "base"), (zero, "tuned")):
        weights.apply(ranks, non_target=side)
        for key, value in weights.state.items():  # the experts at their rank's end, every other tensor the side's
            expected = (tuned if (ranks == full if ".experts." in key else side == "tuned") else base)[key]
            assert torch.equal(value, expected), (mix, ranks[0], side, key)
    weights.apply((1,) * len(full), non_target="tuned")
    for key in keys:
        ffn = base[key].shape[1] // 2
        for e in range(3):
            halves = ((slice(0, ffn), slice(ffn, 2 * ffn)) if key.endswith("gate_up_proj") and mix[0] == "per_expert"
                      else (slice(None),))  # each record's own truncation: per projection, or gate_up whole
            for rows in halves:
                written = weights.state[key][e][rows].double().numpy()
                np.testing.assert_allclose(written, _truncated(base[key][e][rows], tuned[key][e][rows], 1), rtol=0,
                                           atol=1e-6, err_msg=f"{mix} {key}[{e}]")
