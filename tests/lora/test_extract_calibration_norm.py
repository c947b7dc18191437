"""extract --calibration reports its error in analyze's norm: ‖M X‖_F / √N, without the calibration's ridge.

The planted ΔW of layer 0's v_proj is rank 4 on the first 16 input dimensions and a larger rank 6 on the other 16;
the calibration inputs X span the first 16 only, so the data sees a rank-4 update and the rest of ΔW not at all.
The truncation may take ε's ridge (C_ε = C + ε·(tr C / in)·I keeps C_ε^{-1/2} defined); the reported norms may
not: measured with C_ε, the part of ΔW the inputs never see added ε·(tr C / in)·‖·‖_F² to the error, so extract's
error at the data's rank was ~1e-3 where analyze's spectrum (and the outputs) say ~0.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spectra.calibration import Calibration, CalibrationConfig, SecondMoments, activation_row
from spectra.lora.extract import extract_adapter
from tests.models import build_model, low_rank, save

V = "model.layers.0.self_attn.v_proj"
SEEN, SEEN_RANK, TOKENS = 16, 4, 200  # input dims the data visits, ΔW's rank on them, calibration tokens


def planted_delta() -> torch.Tensor:
    """(16, 32) float64 on the 2⁻⁸ grid: rank 4 with unequal values on the seen inputs, 4× larger rank 6 beyond."""
    delta = torch.zeros(16, 32, dtype=torch.float64)  # v_proj: (2 kv heads × 8, hidden 32)
    delta[:, :SEEN] = (4 * low_rank(16, SEEN, 1, seed=1) + 2 * low_rank(16, SEEN, 1, seed=2)
                       + low_rank(16, SEEN, 2, seed=3))
    delta[:, SEEN:] = 4 * low_rank(16, 32 - SEEN, 6, seed=4)  # invisible to the data
    return delta


def inputs() -> torch.Tensor:
    """X (tokens, in) float32, as activations come: anisotropic on the first 16 dims (so whitening matters), 0 after."""
    g = torch.Generator().manual_seed(5)
    X = torch.zeros(TOKENS, 32)
    X[:, :SEEN] = torch.randn(TOKENS, SEEN, generator=g) * torch.linspace(0.25, 2.0, SEEN)
    return X


def calibration_of(X: torch.Tensor, epsilon: float) -> Calibration:
    moments = SecondMoments()
    moments.add("v", X)
    return Calibration(moments, {f"{V}.weight": "v"}, CalibrationConfig(epsilon=epsilon))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration_norm")
    base = build_model("llama")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        dict(tuned.named_parameters())[f"{V}.weight"] += planted_delta().float()
    return save(base, folder / "base", "safetensors"), save(tuned, folder / "tuned", "safetensors")


def extracted(pair, rank, out, calibration, **options):
    """(extract's row for V, s·B@A of V read from the written adapter as float64 numpy (out, in))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer 1's v_proj is unchanged: a note
        result = extract_adapter(*pair, rank, out, roles=("v",), calibration=calibration, progress=False, **options)
    (row,) = [m for m in result.modules if m.name == V]
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("use_rslora")
    tensors = load_file(out / "adapter_model.safetensors")
    A = tensors[f"base_model.model.{V}.lora_A.weight"].double().numpy()  # (r, in)
    B = tensors[f"base_model.model.{V}.lora_B.weight"].double().numpy()  # (out, r)
    return row, config["lora_alpha"] / config["r"] * B @ A


def on_data(M: np.ndarray, X: np.ndarray) -> float:
    """‖M Xᵀ‖_F / √N: the RMS over the N tokens of X (N, in) of the output change M x, as analyze defines it."""
    return float(np.linalg.norm(M @ X.T)) / math.sqrt(X.shape[0])


def ridged(M: np.ndarray, X: np.ndarray, epsilon: float) -> float:
    """‖M C_ε^{1/2}‖_F with C_ε = XᵀX/N + ε·(tr C / in)·I: the norm extract had reported in."""
    C = X.T @ X / X.shape[0]
    lam, Q = np.linalg.eigh(C + epsilon * np.trace(C) / C.shape[0] * np.eye(C.shape[0]))
    return float(np.linalg.norm(M @ (Q * np.sqrt(lam)) @ Q.T))


@pytest.mark.parametrize("epsilon", [1e-6, 1e-2])
@pytest.mark.parametrize("rank", [2, SEEN_RANK, "full"])
def test_extract_error_is_the_output_change_on_the_data(pair, tmp_path, rank, epsilon):
    """fro_norm and error equal float64 numpy's ‖ΔW X‖/√N and ‖(ΔW − s·B A) X‖/√N (the adapter as written), at any
    ε; fro_norm is analyze's rms_output_change and tail the tail of analyze's activation spectrum beyond the rank:
    error ≥ tail, equal to ~1e-6 of fro at ε = 1e-6; at full rank the error is float32's rounding of the factors."""
    X = inputs()
    row, update = extracted(pair, rank, tmp_path / "ad", calibration_of(X, epsilon))
    delta, Xn = planted_delta().numpy(), X.double().numpy()
    fro = on_data(delta, Xn)
    assert row.method.startswith("data-optimal")
    assert row.fro_norm == pytest.approx(fro, rel=1e-12)
    assert row.error == pytest.approx(on_data(delta - update, Xn), rel=1e-9, abs=1e-12 * fro)

    analyzed = activation_row(planted_delta(), calibration_of(X, epsilon).covariance(f"{V}.weight"), tokens=TOKENS,
                              epsilon=epsilon, thresholds=(0.9,))  # the sub-dict analyze writes for V
    values = np.array(analyzed["singular_values"])
    assert row.fro_norm == pytest.approx(analyzed["rms_output_change"], rel=1e-12)
    assert row.tail == pytest.approx(math.sqrt(float((values[row.rank:] ** 2).sum())), rel=1e-9, abs=1e-12 * fro)
    assert row.error >= row.tail * (1 - 1e-9)  # no rank-r update does better on X than the tail
    if rank == "full":
        assert row.tail == 0.0 and row.error < 1e-6 * fro
    elif epsilon == 1e-6:
        assert row.error == pytest.approx(row.tail, abs=1e-5 * fro)
    if rank == 2:  # the data's spectrum has more than 2 directions: a real error, well above rounding
        assert row.error > 0.1 * fro


def test_the_block_krylov_path_reports_the_same_norms():
    """Above full_below the truncation and the tail's top-r values come from the block Krylov SVD (on a 160×240 ΔW,
    X spanning 120 of its 240 inputs; a small one falls back to the full SVD): the same norms as the full SVD's, the
    error float64 numpy's ‖(ΔW − s·B A) X‖/√N, the tail analyze's."""
    from spectra.lora.extract import _factorize_on_data

    g = torch.Generator().manual_seed(6)
    delta = torch.zeros(160, 240, dtype=torch.float64)
    delta[:, :120] = sum(2.0 ** -i * low_rank(160, 120, 1, seed=10 + i) for i in range(8))  # rank 8, decaying
    delta[:, 120:] = 4 * low_rank(160, 120, 10, seed=20)  # unseen
    X = torch.zeros(1000, 240)
    X[:, :120] = torch.randn(1000, 120, generator=g) * torch.linspace(0.25, 2.0, 120)
    C = calibration_of(X, 1e-6).moments.covariance("v")
    scaling = 2.0
    _, _, exact = _factorize_on_data(delta.float(), 3, scaling, C, epsilon=1e-6, full_below=160, seed=0)
    A, B, krylov = _factorize_on_data(delta.float(), 3, scaling, C, epsilon=1e-6, full_below=4, seed=0)
    assert "krylov" in krylov[3] and "krylov" not in exact[3]
    Xn = X.double().numpy()
    fro, error, tail, _ = krylov
    assert fro == pytest.approx(on_data(delta.numpy(), Xn), rel=1e-12)
    assert error == pytest.approx(on_data(delta.numpy() - scaling * B.double().numpy() @ A.double().numpy(), Xn),
                                  rel=1e-9)
    values = np.array(activation_row(delta, C, tokens=1000, epsilon=1e-6, thresholds=(0.9,))["singular_values"])
    assert tail == pytest.approx(math.sqrt(float((values[3:] ** 2).sum())), rel=1e-6)
    assert (fro, error, tail) == pytest.approx(exact[:3], rel=1e-6) and error > 0.1 * tail > 0


def test_negative_control_the_ridged_norm_differs(pair, tmp_path):
    """At the data's rank, extract's ΔW_r reproduces the outputs on X (error ~1e-6 of fro, the ridge's cost on the
    truncation), while the ridged norm of the same residual is ~1e-3 of fro: the part of ΔW X never sees, weighed
    by ε·(tr C / in). That number is what extract had reported, and it is not analyze's."""
    X = inputs()
    row, update = extracted(pair, SEEN_RANK, tmp_path / "ad", calibration_of(X, 1e-6))
    delta, Xn = planted_delta().numpy(), X.double().numpy()
    fro = on_data(delta, Xn)
    unseen = ridged(delta - update, Xn, 1e-6)
    assert unseen > 1e-4 * fro  # the ridge's share of the unseen part of ΔW
    assert row.error < 1e-5 * fro and abs(row.error - unseen) > 0.9 * unseen
    assert on_data(delta - update, Xn) == pytest.approx(row.error, rel=1e-9)


def test_extract_matches_analyze_on_calibration_text(tmp_path):
    """End to end, both collecting the base's inputs from one text file: a base whose layer-0 RMSNorm zeroes the
    last 16 hidden dims feeds v_proj inputs spanning the first 16. extract's fro_norm is analyze's
    rms_output_change, its tail at rank 2 the tail of analyze's singular values, and at full rank its error is 0
    (float32 rounding); before, the ridge's share of the unseen rank-6 part was in each."""
    from spectra.analysis import AnalysisConfig, analyze

    base = build_model("llama")
    with torch.no_grad():
        base.model.layers[0].input_layernorm.weight[SEEN:] = 0.0
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        dict(tuned.named_parameters())[f"{V}.weight"] += planted_delta().float()
    pair = save(base, tmp_path / "base", "safetensors"), save(tuned, tmp_path / "tuned", "safetensors")
    g = torch.Generator().manual_seed(3)
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": bytes(torch.randint(97, 123, (int(n),), generator=g).tolist())
                                        .decode()}) + "\n" for n in torch.randint(4, 14, (24,), generator=g)))

    result = analyze(*pair, AnalysisConfig(roles=("v",), calibration=data), cache_dir=tmp_path / "cache",
                     progress=False)
    activation = result.module(V)["activation"]
    assert activation["input_rank"] == SEEN
    values = np.array(activation["singular_values"])
    for rank in (2, "full"):
        row, _ = extracted(pair, rank, tmp_path / f"ad-{rank}", data)
        assert row.fro_norm == pytest.approx(activation["rms_output_change"], rel=1e-9)
        assert row.tail == pytest.approx(math.sqrt(float((values[row.rank:] ** 2).sum())), rel=1e-9,
                                         abs=1e-12 * row.fro_norm)
        if rank == "full":
            assert row.error < 1e-6 * row.fro_norm
        else:
            assert row.error == pytest.approx(row.tail, rel=1e-4) and row.error > 0.1 * row.fro_norm
