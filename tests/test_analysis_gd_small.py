"""Gavish–Donoho on matrices with too few singular values for the median to be the noise's.

A 1-output classifier head (1×hidden) and a 3-label one (3×hidden) get a planted update of
full rank. Unknown-noise GD reads the noise level from the median singular value, which
here is the signal's own: it gave rank 0 on 1×n whatever the update, and 0 on a rank-2 3×n.
Below ``GD_MIN_SHORT_SIDE`` the analysis takes the known-noise form with the dtype floor;
a normal-sized planted module keeps the unknown-noise form and its rank.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.linalg import metrics
from tests.models import flat_update, on_grid, save, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
QUERY = "bert.encoder.layer.0.attention.self.query"


def lambda_star(beta: float) -> float:
    """λ*(β) of Gavish & Donoho 2014 (arXiv:1305.5870), eq. (11), written out here as the reference."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))


@pytest.mark.parametrize("labels", [1, 3])
def test_small_head_gets_the_known_noise_rank(labels, tmp_path):
    import transformers as tf

    config = tiny_config("bert")
    config.num_labels = labels
    base = on_grid(tf.BertForSequenceClassification, config)
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        params["classifier.weight"] += flat_update((labels, 32), labels, seed=1).float()  # full rank, σ = 0.05
        params[QUERY + ".weight"] += flat_update((32, 32), 3, seed=2).float()
    result = analyze(save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors"),
                     AnalysisConfig(), cache_dir=False, progress=False)
    head = result.module("classifier")
    assert head["shape"] == [labels, 32] and head["energy_rank"]["0.99"] == labels
    assert head["gd_rank"] == labels  # 0 before: the median was the signal's own
    assert head["gd"]["known_noise"] is True
    sigma = head["noise"]["sigma"]
    assert 0 < sigma < 1e-6  # float32 rounding of the pair
    assert head["gd"]["threshold"] == pytest.approx(lambda_star(labels / 32) * math.sqrt(32) * sigma, rel=1e-9)
    # control: a 32×32 module keeps the unknown-noise form and its planted rank
    query = result.module(QUERY)
    assert query["gd_rank"] == 3 and query["gd"]["known_noise"] is False


def test_unknown_noise_gavish_donoho_refuses_a_short_side_below_the_minimum():
    from spectra.errors import ConfigError
    from spectra.linalg.svd import full_svd

    for shape in ((1, 64), (64, 1)):
        spectrum = full_svd(torch.full(shape, 5.0, dtype=torch.float64))  # noise-free rank 1, σ₁ = 40
        with pytest.raises(ConfigError, match="short side of at least 10"):
            metrics.gavish_donoho(spectrum, shape)
        known = metrics.gavish_donoho(spectrum, shape, sigma=1e-7)
        assert known.rank == 1 and known.known_noise
        assert known.threshold == pytest.approx(lambda_star(1 / 64) * 8 * 1e-7, rel=1e-9)
    wide = full_svd(flat_update((3, 64), 2, seed=0))  # rank 2 of 3: the median is signal
    with pytest.raises(ConfigError, match="Pass `sigma`"):
        metrics.gavish_donoho(wide, (3, 64))
    assert metrics.gavish_donoho(wide, (3, 64), sigma=1e-9).rank == 2
    # at the minimum the unknown form still runs: a 10×64 planted rank 2 in noise
    g = torch.Generator().manual_seed(0)
    M = 0.001 * torch.randn(10, 64, generator=g, dtype=torch.float64) + flat_update((10, 64), 2, seed=3, scale=1.0)
    gd = metrics.gavish_donoho(full_svd(M), (10, 64))
    assert gd.rank == 2 and not gd.known_noise and gd.noise_sigma == pytest.approx(0.001, rel=0.2)
