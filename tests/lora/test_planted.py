"""A planted rank-k update: LoRA at rank ≥ k recovers its subspace, rank < k cannot.

The teacher is the base plus a rank-2 update with equal singular values on one
module; a student LoRA on that module is distilled from the teacher's outputs. Its
captured energy can never beat the Eckart–Young optimum (a hard invariant), which
for rank 1 < k is exactly 1/2.
"""

from __future__ import annotations

import pytest
import torch

from spectra.lora.train import TrainConfig, train_adapter
from spectra.lora.verify import VerifyConfig, verify_adapter
from tests.lora.conftest import random_text
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
K = 2
MODULE = "model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    base = save(build_model("llama"), folder / "base", "safetensors")
    teacher = build_model("llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        W = dict(teacher.named_parameters())[MODULE + ".weight"]  # (out, in)
        U, _ = torch.linalg.qr(torch.randn(W.shape[0], K, generator=g))
        V, _ = torch.linalg.qr(torch.randn(W.shape[1], K, generator=g))
        W += 0.6 * W.norm() / K**0.5 * U @ V.T  # σ₁ = σ₂: Eckart–Young at rank 1 is exactly 1/2
    save(teacher, folder / "teacher", "safetensors")
    data = random_text(folder / "data.txt", chars=16 * 8 * 8, seed=2)
    results = {}
    for rank in (K, 1):
        config = TrainConfig(rank=rank, target_modules=(MODULE,), teacher=str(folder / "teacher"), max_length=16,
                             batch_size=8, epochs=100, max_steps=60, lr=1e-2, eval_fraction=0.0)
        adapter = train_adapter(base, data, config, folder / f"r{rank}", progress=False).out_dir
        results[rank] = verify_adapter(base, folder / "teacher", adapter, config=VerifyConfig(figure_modules=4),
                                       progress=False)
    return results


def test_rank_k_recovers_the_planted_subspace(planted):
    (row,) = planted[K].modules
    assert row["name"] == MODULE and row["rank"] == K
    assert row["optimal_energy"] == pytest.approx(1.0, abs=1e-9)
    assert row["captured_energy"] > 0.95
    # the row space is only identifiable on the inputs the module sees (o_proj gets the GQA value
    # subspace), so the column space is what must be recovered
    assert planted[K].phi_matrices[MODULE][K - 1][K - 1] > 0.95  # φ(k, k)
    assert max(row["principal_angles_deg"]) < 15


def test_rank_below_k_cannot(planted):
    (row,) = planted[1].modules
    assert row["optimal_energy"] == pytest.approx(0.5, abs=1e-6)
    assert row["captured_energy"] <= row["optimal_energy"] + 1e-9
    assert row["captured_energy"] < 0.6


@pytest.mark.parametrize("rank", [K, 1])
def test_no_adapter_beats_eckart_young(planted, rank):
    for row in planted[rank].modules:
        for key in ("captured_energy", "captured_energy_row", "captured_energy_both"):
            assert row[key] <= row["optimal_energy"] + 1e-9
