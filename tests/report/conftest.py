"""A synthetic analysis dict with planted spectra, shaped like ``analysis.json``.

Each module's ΔW spectrum is planted: ``rank`` geometrically decaying singular values
above a flat bf16-like noise tail, so its energy ranks are known and can be
recomputed with numpy as an independent reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

# role -> (planted rank, shape (out, in))
PLANTED = {"q": (2, (32, 32)), "k": (1, (16, 32)), "v": (4, (16, 32)), "o": (3, (32, 32)),
           "up": (6, (64, 32)), "down": (5, (32, 64))}
LAYERS = (0, 1, 2)
NOISE_SIGMA = 1e-4


def mp_edge(shape) -> float:
    """Marchenko–Pastur edge of i.i.d. noise with std NOISE_SIGMA in an (out, in) matrix."""
    return NOISE_SIGMA * (np.sqrt(shape[0]) + np.sqrt(shape[1]))


def planted_spectrum(rank: int, shape, *, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``rank`` values decaying slowly from ``scale``, then a tail below the noise floor."""
    n = min(shape)
    head = scale * 0.85 ** np.arange(rank)
    tail = np.sort(rng.uniform(0.3, 0.9, n - rank))[::-1] * mp_edge(shape)
    return np.concatenate([head, tail])


def energy_rank(s: np.ndarray, fro: float, level: float) -> int:
    if fro == 0:
        return 0
    energy = np.cumsum(s**2) / fro**2
    return int(np.searchsorted(energy, level - 1e-12) + 1)


def matrix_row(name, role, layer, shape, s, *, base_fro=10.0, truncate=None, **extra) -> dict:
    """An analysis row for spectrum ``s`` with every metric computed from it."""
    fro = float(np.sqrt(np.sum(s**2)))
    p = s / s.sum() if fro > 0 else s  # Roy–Vetterli: p_i = σ_i / Σσ
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    edge = mp_edge(shape)
    kept = s if truncate is None else s[:truncate]
    row = {
        "name": name, "role": role, "layer": layer, "expert": None, "kind": "matrix",
        "fused_name": None, "conv1d": False, "shape": list(shape),
        "base_dtype": "bfloat16", "tuned_dtype": "bfloat16",
        "fro_norm": fro, "base_fro_norm": base_fro, "relative_size": fro / base_fro,
        "energy_rank": {k: energy_rank(s, fro, float(k)) for k in ("0.5", "0.9", "0.95", "0.99")},
        "effective_rank": float(np.exp(entropy)) if fro > 0 else 0.0,
        "stable_rank": float(fro**2 / s[0] ** 2) if fro > 0 else 0.0,
        "participation_ratio": float(np.sum(s**2) ** 2 / np.sum(s**4)) if fro > 0 else 0.0,
        "nuclear_fro_ratio": float(s.sum() / fro) if fro > 0 else 0.0,
        "gd_rank": int(np.sum(s > 2.858 * np.median(s))),
        "noise": {"sigma": NOISE_SIGMA, "fro": NOISE_SIGMA * np.sqrt(shape[0] * shape[1]),
                  "mp_edge": float(edge), "rank_above": int(np.sum(s > edge))},
        "decay": {"exponent": 1.2, "r2": 0.95},
        "singular_values": [float(v) for v in kept],
        "method": "full" if truncate is None else "randomized",
        "tolerance": None if truncate is None else 1e-3,
        "seconds": 0.01,
    }
    row.update(extra)
    return row


def vector_row(name, layer, n, *, rng) -> dict:
    fro = float(rng.uniform(0.01, 0.1))
    return {"name": name, "role": "other", "layer": layer, "kind": "vector", "shape": [n],
            "fro_norm": fro, "base_fro_norm": 5.0, "relative_size": fro / 5.0}


def build_analysis(*, layers=LAYERS, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    modules = []
    s_embed = planted_spectrum(8, (100, 32), scale=3.0, rng=rng)
    modules.append(matrix_row("model.embed_tokens", "embed", None, (100, 32), s_embed, truncate=16))
    for layer in layers:
        for role, (rank, shape) in PLANTED.items():
            prefix = "mlp" if role in ("up", "down") else "self_attn"
            # later layers get one more planted direction, so lines and cells differ by layer
            s = planted_spectrum(rank + layer, shape, scale=1.0 + 0.5 * layer, rng=rng)
            modules.append(matrix_row(f"model.layers.{layer}.{prefix}.{role}_proj", role, layer, shape, s,
                                      base_fro=8.0 + layer))
        modules.append(vector_row(f"model.layers.{layer}.input_layernorm", layer, 32, rng=rng))
    # a GPT-2-style fused c_attn: the whole (role qkv) and its q split
    fused = "transformer.h.0.attn.c_attn"
    s_fused = planted_spectrum(6, (96, 32), scale=2.0, rng=rng)
    modules.append(matrix_row(fused, "qkv", layers[0], (96, 32), s_fused, conv1d=True))
    s_split = planted_spectrum(2, (32, 32), scale=1.5, rng=rng)
    modules.append(matrix_row(f"{fused}[q]", "q", layers[0], (32, 32), s_split, fused_name=fused, conv1d=True))
    return {
        "schema_version": 1,
        "config": {"method": "auto", "energy_levels": [0.5, 0.9, 0.95, 0.99], "seed": 0},
        "base": {"path": "/models/base", "fingerprint": "abc123", "format": "safetensors", "size_bytes": 123456789},
        "tuned": {"path": "/models/tuned", "fingerprint": "def456", "format": "safetensors",
                  "size_bytes": 123456789},
        "versions": {"spectra": "0.1.0", "torch": "2.4.0"},
        "timings": {"total_s": 12.5},
        "modules": modules,
    }


@pytest.fixture(scope="session")
def make_analysis():
    """The builder itself, for fixtures of wider scope than a test."""
    return build_analysis


@pytest.fixture
def analysis() -> dict:
    """The planted analysis: 3 layers × q,k,v,o,up,down, an embedding, a fused c_attn and its q split."""
    return build_analysis()


@pytest.fixture
def edge_analysis() -> dict:
    """One layer; a zero ΔW; a module without noise estimate; a truncated embedding with null layer."""
    out = copy.deepcopy(build_analysis(layers=(0,)))
    rows = out["modules"]
    zero = next(r for r in rows if r["name"].endswith("layers.0.self_attn.k_proj"))
    zero.update(matrix_row(zero["name"], "k", 0, tuple(zero["shape"]), np.zeros(16)))
    no_noise = next(r for r in rows if r["name"].endswith("layers.0.self_attn.v_proj"))
    no_noise["noise"] = None
    del next(r for r in rows if r["name"].endswith("layers.0.mlp.up_proj"))["noise"]
    return out


@pytest.fixture
def unchange():
    """Make a matrix row's ΔW exactly zero (base and tuned hold the same tensor), every metric as analyze writes
    it for such a module: zero norm, ranks 0, effective rank 0.0, a spectrum of zeros."""
    def apply(row: dict) -> dict:
        row.update(matrix_row(row["name"], row["role"], row["layer"], tuple(row["shape"]),
                              np.zeros(len(row["singular_values"])), base_fro=row["base_fro_norm"],
                              fused_name=row.get("fused_name"), conv1d=row.get("conv1d", False)))
        return row

    return apply


def assert_whole_steps(ticks) -> None:
    """``ticks`` are whole numbers one round step apart: 1, 2 or 5 times a power of ten (0, 50, 100, …; not
    0, 25, 50, …), as an axis that counts (directions, modules, layers) should read."""
    ticks = np.asarray(ticks, dtype=np.float64)
    assert np.all(ticks == np.round(ticks)), ticks
    steps = np.unique(np.diff(ticks))
    assert steps.size == 1, ticks
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert round(mantissa, 9) in (1.0, 2.0, 5.0), ticks
