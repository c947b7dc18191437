"""The `--device` paths (linear algebra, pairing, whole analysis) against float64/CPU references.

Every test runs on the CPU here and on CUDA wherever torch sees a device (skipped
otherwise), so the CUDA variants are checked by the same assertions the CPU ones pass:
`python -m pytest tests/test_devices.py` on a GPU machine is the device check.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.errors import NonFiniteWeightError
from spectra.linalg import metrics, sketch
from spectra.linalg.svd import adaptive_svd, full_svd, randomized_svd
from tests.models import build_model, nonfinite_pair, save

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="torch sees no CUDA device"))]


def planted(m: int = 300, n: int = 500, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Rank-12 signal with decaying σ (10 … 1) plus 1e-3 Gaussian noise, float32."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, rank, dtype=torch.float64)
    return ((u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("device", DEVICES)
def test_spectra_on_a_device_match_float64(device):
    A = planted()
    ref = np.linalg.svd(A.double().numpy(), compute_uv=False)
    M = A.to(device)

    full = full_svd(M)
    assert full.values.device.type == device
    np.testing.assert_allclose(full.values.cpu().double().numpy()[:12], ref[:12], rtol=1e-5)

    top = randomized_svd(M, 12, tol=1e-4, random_state=0)
    assert top.U.device.type == device and top.Vh.device.type == device
    np.testing.assert_allclose(top.values.cpu().double().numpy(), ref[:12], rtol=1e-4)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(top.U.cpu().double().T @ top.U.cpu().double(), eye, atol=1e-5, rtol=0)

    energy = float((A.double() ** 2).sum())
    expected_rank = int(np.searchsorted(np.cumsum(ref**2), 0.9 * energy * (1 - 1e-12))) + 1
    assert adaptive_svd(M, energy=0.9, random_state=0).k == expected_rank
    fast = sketch.energy_sketch(M, energy=0.9, total_energy=sketch.squared_norm(M))
    assert metrics.energy_rank(fast, 0.9, total_energy=energy) == expected_rank

    assert sketch.squared_norm(M) == pytest.approx(energy, rel=1e-6)
    w = M.bfloat16()
    w_ref = np.linalg.svd(w.cpu().double().numpy(), compute_uv=False)[:4]
    np.testing.assert_allclose(sketch.top_values(w, 4).cpu().double().numpy(), w_ref, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_analysis_on_a_device_matches_the_cpu(tmp_path, device):
    base = build_model("llama").to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, p in enumerate(tuned.model.layers[0].parameters()):
            if p.dim() == 2:
                p += (0.05 * planted(*p.shape, rank=min(3, *p.shape), seed=i)).to(p.dtype)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    on_cpu = analyze(b, t, AnalysisConfig(), cache_dir=False, progress=False)
    on_device = analyze(b, t, AnalysisConfig(device=device), cache_dir=False, progress=False)
    assert [r["name"] for r in on_device.matrices()] == [r["name"] for r in on_cpu.matrices()]
    for mine, ref in zip(on_device.matrices(), on_cpu.matrices()):
        assert mine["energy_rank"] == ref["energy_rank"], mine["name"]
        assert mine["fro_norm"] == pytest.approx(ref["fro_norm"], rel=1e-6), mine["name"]
        assert mine["noise"]["mp_edge"] == pytest.approx(ref["noise"]["mp_edge"], rel=1e-6), mine["name"]
        np.testing.assert_allclose(mine["singular_values"][:3], ref["singular_values"][:3], rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_weight_is_named_on_a_device(tmp_path, device):
    b, t = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"), dtype=torch.bfloat16)
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.1.mlp.up_proj.weight .* 1 NaN/Inf"):
        analyze(b, t, AnalysisConfig(device=device), cache_dir=False, progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_and_subspace_on_a_device(device):
    """C is collected on the CPU; the activation-weighted spectrum of a ΔW on the device still works.
    The LoRA φ matrix likewise (its index grids follow the inputs' device)."""
    from spectra.calibration import activation_row
    from spectra.linalg.subspace import similarity_matrix

    g = torch.Generator().manual_seed(3)
    delta, X = planted(40, 30), torch.randn(30, 200, generator=g, dtype=torch.float64)
    C = X @ X.T / 200  # (in, in), CPU
    ref = activation_row(delta, C, tokens=200, epsilon=1e-6, thresholds=(0.9,))
    got = activation_row(delta.to(device), C, tokens=200, epsilon=1e-6, thresholds=(0.9,))
    assert got["energy_rank"] == ref["energy_rank"]
    np.testing.assert_allclose(got["singular_values"], ref["singular_values"], rtol=1e-6)
    U = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))[0]
    phi = similarity_matrix(U.to(device), U.to(device))
    torch.testing.assert_close(phi.diagonal().cpu(), torch.ones(6, dtype=torch.float64))


def test_unsupported_devices_are_refused():
    from spectra.errors import ConfigError

    with pytest.raises(ConfigError, match="not cpu, cuda or cuda:N"):
        AnalysisConfig(device="mps")
    with pytest.raises(ConfigError, match="cuda"):
        AnalysisConfig(device=f"cuda:{torch.cuda.device_count()}")  # one past the last (or none at all)


def test_read_ahead_counts_weights_copied_to_a_device(tmp_path):
    """On a GPU the weights (as stored) are copied onto it, so an entry in flight holds them too."""
    from types import SimpleNamespace

    from spectra.analysis import _entry_bytes
    from spectra.checkpoints.pairing import Pairing

    base = save(build_model("llama").to(torch.bfloat16), tmp_path / "b", "safetensors")
    pairing = Pairing(base, base)
    entry = next(e for e in pairing.entries if e.kind == "matrix")
    n = entry.shape[0] * entry.shape[1]
    assert _entry_bytes(entry, pairing.options) == 4 * n
    from dataclasses import replace

    sketched = replace(pairing.options, low_copy_above=min(entry.shape) - 1)  # ΔW and its bf16 copy
    assert _entry_bytes(entry, sketched) == (4 + 2) * n
    on_gpu = SimpleNamespace(torch_dtype=torch.float32, device="cuda")  # PairingOptions would refuse cuda here
    assert _entry_bytes(entry, on_gpu) == (4 + 2 + 2) * n


@pytest.mark.parametrize("device", DEVICES)
def test_extract_on_a_device_matches_the_cpu(tmp_path, device):
    """`spectra extract --device`: the same adapter (up to the SVD's rounding), written from the CPU."""
    from safetensors.torch import load_file

    from spectra.lora.extract import extract_adapter

    base = build_model("llama")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, p in enumerate(tuned.model.layers[0].parameters()):
            if p.dim() == 2:
                p += 0.05 * planted(*p.shape, rank=min(3, *p.shape), seed=i)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    on_cpu = extract_adapter(b, t, 3, tmp_path / "cpu", roles=("q", "down"), progress=False)
    on_device = extract_adapter(b, t, 3, tmp_path / "dev", roles=("q", "down"), progress=False, device=device)
    assert [m.error for m in on_device.modules] == pytest.approx([m.error for m in on_cpu.modules], rel=1e-4, abs=1e-6)
    ref, got = load_file(tmp_path / "cpu" / "adapter_model.safetensors"), load_file(tmp_path / "dev" / "adapter_model.safetensors")
    assert got.keys() == ref.keys()
    for name in ref:  # singular vectors are defined up to sign: compare the merged update B·A
        if name.endswith("lora_B.weight"):
            a_name = name.replace("lora_B", "lora_A")
            torch.testing.assert_close(got[name] @ got[a_name], ref[name] @ ref[a_name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- the model-running paths


@pytest.fixture(scope="module")
def trained_trio(tmp_path_factory):
    """A tiny llama base, a stand-in full fine-tune of it, eval text, and a LoRA adapter trained on the CPU."""
    from spectra.lora.train import TrainConfig, train_adapter
    from tests.lora.conftest import random_text
    from tests.lora.test_verify import perturbed

    folder = tmp_path_factory.mktemp("devices")
    model = build_model("llama")
    base = save(model, folder / "base", "safetensors")
    tuned = save(perturbed(model, 3), folder / "tuned", "safetensors")
    text = random_text(folder / "text.txt", chars=16 * 8 * 3, seed=2)
    config = TrainConfig(rank=2, max_length=16, batch_size=8, max_steps=3, eval_fraction=0.0)
    adapter = train_adapter(base, text, config, folder / "adapter", progress=False)
    return base, tuned, text, config, adapter


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_training_on_a_device_matches_the_cpu(tmp_path, device, trained_trio):
    """`spectra train --device`: the same losses and adapter as on the CPU (bit for bit there; CUDA sums differ)."""
    import dataclasses

    from safetensors.torch import load_file

    from spectra.lora.train import read_train_summary, train_adapter

    base, _, text, config, on_cpu = trained_trio
    got = train_adapter(base, text, dataclasses.replace(config, device=device), tmp_path / "ad", progress=False)
    assert got.losses == pytest.approx(on_cpu.losses, rel=1e-4)
    assert read_train_summary(got.out_dir)["config"]["device"] == device
    ref, new = (load_file(r.out_dir / "adapter_model.safetensors") for r in (on_cpu, got))
    assert new.keys() == ref.keys() and all(t.device.type == "cpu" for t in new.values())
    for name in ref:
        if name.endswith("lora_B.weight"):  # the update B·A each module learnt
            a_name = name.replace("lora_B", "lora_A")
            want = ref[name] @ ref[a_name]
            torch.testing.assert_close(new[name] @ new[a_name], want, rtol=0, atol=1e-3 * float(want.abs().max()))
    if device == "cpu":
        assert (got.out_dir / "adapter_model.safetensors").read_bytes() == \
            (on_cpu.out_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_verify_on_a_device_matches_the_cpu(device, trained_trio):
    """`spectra verify --device`: per-module measures (float64 SVDs) and the four evaluations as on the CPU."""
    from spectra.lora.verify import VerifyConfig, verify_adapter

    base, tuned, text, _, adapter = trained_trio
    ref = verify_adapter(base, tuned, adapter.out_dir, eval_data=text, progress=False)
    got = verify_adapter(base, tuned, adapter.out_dir, eval_data=text, progress=False,
                         config=VerifyConfig(device=device))
    assert [r["name"] for r in got.modules] == [r["name"] for r in ref.modules]
    for mine, theirs in zip(got.modules, ref.modules):
        for key in ("captured_energy", "optimal_energy", "phi", "relative_error", "amplification_full"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (mine["name"], key)
        assert (mine["intruders_adapter"], mine["intruders_full"]) == (theirs["intruders_adapter"],
                                                                       theirs["intruders_full"])
    for model in ("base", "tuned", "adapter", "svd"):
        assert got.evals[model]["loss"] == pytest.approx(ref.evals[model]["loss"], rel=1e-5), model
    assert all(v.device.type == "cpu" for v in got.right_vectors.values())


@pytest.mark.parametrize("device", DEVICES)
def test_truncation_sweep_on_a_device_matches_the_cpu(device, trained_trio):
    """`spectra sweep --device`: the model is evaluated on the device, the curve is the CPU's."""
    from spectra.sweep import SweepConfig, truncation_sweep

    base, tuned, text, _, _ = trained_trio
    config = SweepConfig(max_length=16, bootstrap=0)
    ref = truncation_sweep(base, tuned, text, ranks=(1, 4), config=config, progress=False)
    got = truncation_sweep(base, tuned, text, ranks=(1, 4), progress=False,
                           config=SweepConfig(max_length=16, bootstrap=0, device=device))
    assert [p["label"] for p in got.data["points"]] == [p["label"] for p in ref.data["points"]]
    for mine, theirs in zip(got.data["points"], ref.data["points"]):
        assert mine["metric"] == pytest.approx(theirs["metric"], rel=1e-5), mine["label"]


def test_model_paths_refuse_unsupported_devices():
    from spectra.errors import ConfigError
    from spectra.lora.train import TrainConfig, load_model
    from spectra.lora.verify import VerifyConfig
    from spectra.sweep import SweepConfig

    for make in (TrainConfig, VerifyConfig, SweepConfig):
        with pytest.raises(ConfigError, match="not cpu, cuda or cuda:N"):
            make(device="mps")
        with pytest.raises(ConfigError, match="cuda"):
            make(device=f"cuda:{torch.cuda.device_count()}")  # one past the last (or none at all)
    with pytest.raises(ConfigError, match="not cpu, cuda or cuda:N"):
        load_model("unused", task="causal_lm", device="tpu")  # checked before anything is read


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_collected_on_a_device_matches_the_cpu(device, trained_trio):
    """The forward passes and float64 moments run on the device; the Calibration comes back on the CPU."""
    from spectra.calibration import CalibrationConfig, collect_calibration

    base, _, text, _, _ = trained_trio
    ref = collect_calibration(base, text, config=CalibrationConfig(max_length=16))
    got = collect_calibration(base, text, config=CalibrationConfig(max_length=16, device=device))
    assert got.groups == ref.groups and got.moments.tokens == ref.moments.tokens
    for key, total in ref.moments.sums.items():
        assert got.moments.sums[key].device.type == "cpu"
        torch.testing.assert_close(got.moments.sums[key], total, rtol=1e-6, atol=1e-9 * float(total.abs().max()))
