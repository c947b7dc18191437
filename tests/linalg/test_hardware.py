"""The sketch dtype follows what the device measures, not a fixed bf16."""

import math

import pytest
import torch

import spectra.linalg.hardware as hardware
from spectra.analysis import AnalysisConfig
from spectra.errors import ConfigError


def test_the_probe_measures_a_finite_ratio_once_per_device():
    ratio = hardware.bfloat16_speedup("cpu")
    assert 0 < ratio < math.inf
    hits = hardware.bfloat16_speedup.cache_info().hits
    assert hardware.bfloat16_speedup("cpu") == ratio and hardware.bfloat16_speedup.cache_info().hits == hits + 1


@pytest.mark.skipif(not hasattr(torch.cpu, "_is_avx512_supported") or torch.cpu._is_avx512_supported(),
                    reason="an AVX-512 CPU may run bf16 GEMMs at or above float32's rate")
def test_a_cpu_without_avx512_runs_bf16_slower_and_sketches_in_float32():
    """AVX2 only: torch's bf16 GEMM is a reference kernel (0.3–2 GFLOP/s against float32's ~80), so the
    probe must find it slower and the analysis must not take it (a 1.1B analysis took 212 s in bf16, 23 s
    in float32 on such a host)."""
    assert hardware.bfloat16_speedup("cpu") < 1.0
    assert hardware.fast_sketch_dtype("cpu") == "float32"
    assert AnalysisConfig().sketch_dtype == "float32"


def test_auto_takes_bf16_only_where_it_is_clearly_faster(monkeypatch):
    for ratio, expected in ((4.6, "bfloat16"), (1.25, "bfloat16"), (1.2, "float32"), (0.02, "float32")):
        monkeypatch.setattr(hardware, "bfloat16_speedup", lambda device, repeats=2, r=ratio: r)
        assert hardware.fast_sketch_dtype("cpu") == expected
        config = AnalysisConfig()
        assert config.sketch_dtype == expected  # resolved once, so reports and cache keys carry the dtype used
        assert (config.pairing_options().low_copy_above is not None) == (expected == "bfloat16")  # bf16 ΔW copy
        assert AnalysisConfig(sketch_dtype="float32").sketch_dtype == "float32"  # a choice made is kept
        assert AnalysisConfig(sketch_dtype="bfloat16").sketch_dtype == "bfloat16"


def test_an_unknown_sketch_dtype_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="sketch_dtype: 'int8' is not one of auto, bfloat16, float16, float32"):
        AnalysisConfig(sketch_dtype="int8")


def test_auto_is_measured_only_where_something_sketches(monkeypatch):
    """method full/randomized/adaptive never sketch: no probe (~0.2 s a process on an AVX2 host), and the report
    keeps "auto" rather than a dtype that was not used; base_top_k's top values of W_base do take it."""
    calls = []
    monkeypatch.setattr(hardware, "bfloat16_speedup", lambda device, repeats=2: calls.append(device) or 4.0)
    for method in ("full", "randomized", "adaptive"):
        assert AnalysisConfig(method=method).sketch_dtype == "auto"
    assert calls == []
    assert AnalysisConfig(method="full", base_top_k=4).sketch_dtype == "bfloat16"
    assert AnalysisConfig(method="sketch").sketch_dtype == "bfloat16" and len(calls) == 2
