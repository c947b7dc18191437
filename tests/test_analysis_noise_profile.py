"""analyze's auto choice of floor weighs the hypotheses by each side's rounding profile (noise.settle_floor's
`profile`) under a large update (‖ΔW‖/‖W‖ ≥ noise.LARGE_UPDATE), where σ̂² lies near the threshold (noise.NEAR).

Pairs as tests/linalg/test_noise_large_update.py builds them (32×32, ‖δ‖ ≈ ‖W‖, rank 2): seeds 3, 10 and 29 of the
master-rounded ones read "exact" without the profile. Through `spectra.analysis.analyze` they now read "counted" at
the true σ (float64 std of ΔW_stored − δ) to 10 %; the same seeds fine-tuned from the stored base stay "exact". A
pair with a small update never reads the profile, nor a fine-tune of the stored base with one (whose σ̂² sits inside
NEAR: reading it there had cost a 2048² module 3.5 s)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from spectra.analysis import AnalysisConfig, analyze
from spectra.linalg import noise
from tests.linalg.test_noise_large_update import _pair

NAME = "model.layers.0.self_attn.q_proj"


def _row(tmp_path, base, tuned):
    for side, weight in (("b", base), ("t", tuned)):
        (tmp_path / side).mkdir(parents=True)
        save_file({NAME + ".weight": weight.contiguous()}, tmp_path / side / "model.safetensors")
    (row,) = analyze(tmp_path / "b", tmp_path / "t", AnalysisConfig(), cache_dir=False, progress=False).modules
    return row["noise"]


@pytest.mark.parametrize("seed", [3, 10, 29])
@pytest.mark.parametrize(("scenario", "choice"), [("B", "counted"), ("A", "exact")], ids=["masters", "stored-base"])
def test_analyze_counts_the_base_of_master_rounded_pairs_only_under_a_large_update(tmp_path, seed, scenario, choice):
    base, tuned, _, true = _pair(seed, (32, 32), scenario)
    floor = _row(tmp_path, base, tuned)
    assert floor["base_rounding"] == choice
    assert floor["sigma"] == pytest.approx(true, rel=0.1)


def test_the_profile_is_read_only_under_a_large_update(tmp_path, monkeypatch):
    """64×64, an update ~1 % of W, both sides rounded from fp32 masters (σ̂² ~2× the exact hypothesis) and fine-tuned
    from the stored base (σ̂² ~0.7× the threshold, inside NEAR): the row/column profile (every element of both sides)
    and the top directions are never computed; seed 3's large update reads them once."""
    calls = []
    profile, leverages = noise.rounding_profile, noise.top_leverages
    monkeypatch.setattr(noise, "rounding_profile", lambda *a, **k: calls.append(1) or profile(*a, **k))
    monkeypatch.setattr(noise, "top_leverages", lambda *a, **k: calls.append(2) or leverages(*a, **k))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * 0.02
    update = (torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)) * 2e-4
    assert _row(tmp_path / "master", w.bfloat16(), (w + update).bfloat16())["base_rounding"] == "counted"
    stored = w.bfloat16()
    assert _row(tmp_path / "stored", stored, (stored.float() + update).bfloat16())["base_rounding"] == "exact"
    assert calls == []
    base, tuned, _, _ = _pair(3, (32, 32), "B")
    assert _row(tmp_path / "near", base, tuned)["base_rounding"] == "counted" and calls == [1, 2]


def test_the_library_floor_reads_the_profile_under_the_same_rule(monkeypatch):
    """metrics.rounding_noise_floor (auto) and analyze share noise.large_update_profile: the 1 %-of-W update from the
    stored base (inside NEAR) reads no profile in the library either, and both pick "exact"; seed 3's large update
    reads it (review: the library had read it for every pair, so the two could decide apart)."""
    from spectra.linalg import metrics

    calls = []
    profile = noise.rounding_profile
    monkeypatch.setattr(noise, "rounding_profile", lambda *a, **k: calls.append(1) or profile(*a, **k))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * 0.02
    update = (torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)) * 2e-4
    stored = w.bfloat16()
    tuned = (stored.float() + update).bfloat16()

    def floor(base, tuned):
        values = torch.linalg.svdvals((tuned.double() - base.double()))
        return metrics.rounding_noise_floor(base, tuned, s=values, base_rounding="auto").base_rounding

    assert floor(stored, tuned) == "exact" and calls == []
    base, tuned, _, _ = _pair(3, (32, 32), "B")
    assert floor(base, tuned) == "counted" and calls == [1]
