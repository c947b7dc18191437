"""The benchmarks refuse arguments they cannot run with, naming the argument, before any work: a zero or negative
top-k, shape, repeat count, step count or peer timeout ran into scikit-learn's words, a traceback or a report of
peers stopped at once. Each message opens with the argument's name, which the command line turns into its option."""

from __future__ import annotations

import pytest

from spectra.bench.e2e import run_e2e_bench
from spectra.bench.make_pair import PairConfig
from spectra.bench.svd import run_svd_bench
from spectra.bench.train import run_train_bench
from spectra.errors import ConfigError


@pytest.mark.parametrize("kwargs, said", [
    ({"repeats": 0}, "repeats must be ≥ 1, got 0."),
    ({"ks": (8, 0)}, "ks must be positive integers, got (8, 0)."),
    ({"shapes": ((0, 5),)}, "shapes must be (out, in) pairs of positive integers, got ((0, 5),)."),
    ({"shapes": ((32, 48, 2),)}, "shapes must be (out, in) pairs"),
    ({"kinds": ("planted", "bogus")}, "kinds: unknown spectrum kind(s) bogus; choose from planted, power_law, bf16."),
])
def test_svd_bench_refuses_what_it_cannot_run(tmp_path, kwargs, said):
    args = {"shapes": ((32, 48),), "ks": (4,), "kinds": ("planted",)} | kwargs
    with pytest.raises(ConfigError) as err:
        run_svd_bench(tmp_path / "out", **args)
    assert said in str(err.value)
    assert not (tmp_path / "out").exists()


def test_train_and_e2e_benches_refuse_no_steps_and_no_time(tmp_path):
    with pytest.raises(ConfigError, match=r"^steps must be ≥ 1, got 0\.$"):
        run_train_bench(tmp_path / "train", steps=0, quick=True)
    for timeout in (0, -1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"^peer_timeout must be > 0 seconds"):
            run_e2e_bench(tmp_path / "e2e", work=tmp_path / "work", quick=True, peer_timeout=timeout)
    assert not (tmp_path / "train").exists() and not (tmp_path / "work").exists()


def test_make_pair_refuses_an_infinite_rank_scale():
    """--rank-scale inf was an OverflowError once the first tensor's planted rank was rounded."""
    for value in (float("inf"), 0.0, float("nan")):
        with pytest.raises(ConfigError, match=r"^rank_scale must be a finite number > 0"):
            PairConfig(shape="llama-tiny", rank_scale=value)
    assert PairConfig(shape="llama-tiny", rank_scale=1e300).rank_scale == 1e300  # negative control: finite is taken
