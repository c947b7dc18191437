"""Activation-weighted spectra on a planted update whose extra directions the inputs never visit.

Layer 0's input RMSNorm weight is zero on the last 16 of 32 hidden dimensions, so every
input of layer 0's q/k/v lies in the first 16 coordinates. The planted ΔW of v_proj is a
rank-2 part on those coordinates plus a larger rank-6 part on the other 16: high rank in
Frobenius terms, functional rank 2 on any data.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.calibration import (CalibrationConfig, SecondMoments, collect_calibration, data_optimal_truncation,
                                 whitened_spectrum, whitening)
from spectra.errors import ConfigError
from spectra.linalg import metrics
from spectra.linalg.svd import full_svd
from tests.models import build_model, low_rank, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
V = "model.layers.0.self_attn.v_proj"
SEEN, K_F, K_N = 16, 2, 6  # input dims the data visits; planted functional rank; rank hidden in the null space


def random_lines(path, *, n: int, seed: int):
    """jsonl of random lowercase texts of varying length (so batches pad)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            length = int(torch.randint(4, 14, (1,), generator=g))
            fh.write(json.dumps({"text": bytes(torch.randint(97, 123, (length,), generator=g).tolist()).decode()})
                     + "\n")
    return path


def planted_delta() -> torch.Tensor:
    delta = torch.zeros(16, 32, dtype=torch.float64)  # v_proj: (2 heads × 8, hidden 32)
    delta[:, :SEEN] = low_rank(16, SEEN, K_F, seed=1)
    delta[:, SEEN:] = 4 * low_rank(16, 32 - SEEN, K_N, seed=2)  # larger, and invisible to the data
    return delta


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    base = build_model("llama")
    with torch.no_grad():
        base.model.layers[0].input_layernorm.weight[SEEN:] = 0.0  # layer 0's q/k/v inputs live in 16 dims
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        dict(tuned.named_parameters())[V + ".weight"] += planted_delta().float()
    data = random_lines(folder / "calib.jsonl", n=24, seed=3)
    return save(base, folder / "base", "safetensors"), save(tuned, folder / "tuned", "safetensors"), data, base, tuned


@pytest.fixture(scope="module")
def calibration(pair):
    base, _, data, _, _ = pair
    return collect_calibration(base, data, config=CalibrationConfig(batch_size=8))


def logits(model, data_path) -> torch.Tensor:
    from spectra.lora.data import batches, load_tokenizer, tokenize_file

    tokens = tokenize_file(data_path, load_tokenizer("/nonexistent", vocab_size=64, task="causal_lm"),
                           task="causal_lm", max_length=32)
    (batch,) = list(batches(tokens, len(tokens)))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return out[batch["attention_mask"].bool()]  # (tokens, V)


def with_update(model, delta: torch.Tensor):
    out = copy.deepcopy(model)
    with torch.no_grad():
        dict(out.named_parameters())[V + ".weight"] += delta.float()
    return out


# ---------------------------------------------------------------------------- moments


def test_second_moments_in_chunks_equal_one_batch():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(503, 24, generator=g)  # (tokens, in) float32, as activations come
    whole, chunks = SecondMoments(), SecondMoments()
    whole.add("m", X)
    for part in torch.split(X, [1, 100, 2, 300, 100]):
        chunks.add("m", part.reshape(-1, 1, 24))  # any leading shape
    reference = X.double().T @ X.double() / 503  # (in, in) float64
    assert whole.tokens["m"] == chunks.tokens["m"] == 503
    assert chunks.covariance("m").dtype == torch.float64
    torch.testing.assert_close(chunks.covariance("m"), whole.covariance("m"), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(whole.covariance("m"), reference, rtol=1e-13, atol=1e-15)


def test_model_moments_do_not_depend_on_batching_or_padding(pair, calibration):
    base, _, data, _, _ = pair
    one_by_one = collect_calibration(base, data, config=CalibrationConfig(batch_size=1, max_examples=6))  # no padding
    padded = collect_calibration(base, data, config=CalibrationConfig(batch_size=6, max_examples=6))
    name = "model.layers.1.mlp.down_proj.weight"
    assert one_by_one.tokens(name) == padded.tokens(name) == sum(
        len(json.loads(line)["text"]) for line in data.read_text().splitlines()[:6])
    torch.testing.assert_close(one_by_one.covariance(name), padded.covariance(name), rtol=1e-5, atol=1e-8)
    # q, k and v are fed one tensor: one accumulation, the same C
    assert calibration.groups[V + ".weight"] == calibration.groups["model.layers.0.self_attn.q_proj.weight"]


# ---------------------------------------------------------------------------- the planted update


def test_activation_energy_rank_is_the_functional_rank(pair, calibration):
    C = calibration.covariance(V + ".weight")
    _, _, input_rank = whitening(C, epsilon=1e-6)
    assert input_rank == SEEN
    delta = planted_delta()
    plain = metrics.energy_ranks(full_svd(delta), (0.5, 0.9, 0.99))
    spec, _ = whitened_spectrum(delta, C, epsilon=1e-6)
    weighted = metrics.energy_ranks(spec, (0.5, 0.9, 0.99))
    assert weighted[0.99] == K_F
    assert plain[0.9] >= K_F + 3 and plain[0.99] >= K_F + K_N - 1  # the plain picture asks for far more rank


def test_data_optimal_truncation_reproduces_the_tuned_outputs(pair, calibration):
    _, _, data, base_model, tuned_model = pair
    delta, C = planted_delta(), calibration.covariance(V + ".weight")
    target = logits(tuned_model, data)
    optimal = logits(with_update(base_model, data_optimal_truncation(delta, C, K_F)), data)
    F = full_svd(delta, compute_vectors=True, dtype=torch.float64)
    plain = logits(with_update(base_model, (F.U[:, :K_F] * F.values[:K_F]) @ F.Vh[:K_F]), data)
    scale = float((target - logits(base_model, data)).abs().max())  # what the update changes
    assert scale > 1e-2
    assert float((optimal - target).abs().max()) < 1e-4 * scale
    assert float((plain - target).abs().max()) > 0.2 * scale  # negative control: Eckart–Young keeps the wrong part


def test_analyze_reports_the_activation_spectrum(pair, tmp_path):
    base, tuned, data, _, _ = pair
    config = AnalysisConfig(roles=("v",), calibration=data)
    result = analyze(base, tuned, config, cache_dir=tmp_path, progress=False)
    row = result.module(V)
    assert row["activation"]["energy_rank"]["0.99"] == K_F and row["energy_rank"]["0.9"] > K_F
    assert row["activation"]["input_rank"] == SEEN and row["activation"]["epsilon"] == 1e-6
    assert row["activation"]["tokens"] > 100
    assert result.module("model.layers.1.self_attn.v_proj")["activation"]["rms_output_change"] == 0.0
    again = analyze(base, tuned, config, cache_dir=tmp_path, progress=False)  # cached rows keep the sub-dict
    assert again.timings["modules_cached"] == 2 and again.module(V)["activation"] == row["activation"]
    report = (result.write_report(tmp_path / "report") / "report.md").read_text()
    assert "activation-weighted energy-90% rank" in report and "output change ΔW·x is" in report
    with pytest.raises(ConfigError, match="does not exist"):
        AnalysisConfig(calibration=tmp_path / "missing.jsonl")


def test_extract_with_calibration_is_exact_on_the_data(pair, calibration, tmp_path):
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter
    from spectra.lora.train import quiet_peft

    base, tuned, data, base_model, tuned_model = pair
    plain = extract_adapter(base, tuned, K_F, tmp_path / "plain", roles=("v",), progress=False)
    fitted = extract_adapter(base, tuned, K_F, tmp_path / "data", roles=("v",), calibration=calibration,
                             progress=False)
    (row,) = [m for m in fitted.modules if m.name == V]
    assert row.method.startswith("data-optimal") and row.error == pytest.approx(row.tail, abs=1e-6)
    target = logits(tuned_model, data)
    outputs = {}
    for name in ("plain", "data"):
        with quiet_peft():
            merged = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / name)).merge_and_unload()
        outputs[name] = float((logits(merged, data) - target).abs().max())
    assert outputs["data"] < 1e-3 * outputs["plain"] and plain.modules[0].error > 0
    assert np.isfinite(outputs["data"])


def test_extract_cli_takes_calibration_data(pair, tmp_path):
    """`spectra extract --calibration FILE` writes the adapter `extract_adapter(..., calibration=FILE)` writes."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from spectra.cli import app
    from spectra.lora.extract import extract_adapter

    base, tuned, data, _, _ = pair
    extract_adapter(base, tuned, K_F, tmp_path / "api", roles=("v",), calibration=data, progress=False)
    result = CliRunner().invoke(app, ["extract", str(base), str(tuned), "--rank", str(K_F), "--roles", "v",
                                      "--calibration", str(data), "-o", str(tmp_path / "cli"), "-q"])
    assert result.exit_code == 0, result.output
    api, cli = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("api", "cli"))
    plain = extract_adapter(base, tuned, K_F, tmp_path / "plain", roles=("v",), progress=False)
    assert api.keys() == cli.keys() and all(torch.equal(api[k], cli[k]) for k in api)
    assert plain.modules[0].method != "data-optimal" and not all(  # negative control: the plain SVD's differ
        torch.equal(api[k], v) for k, v in load_file(tmp_path / "plain" / "adapter_model.safetensors").items())


def test_default_length_fits_a_short_position_table(pair, tmp_path):
    """GPT-2 with n_positions=32: calibration texts longer than that at the default max_length crashed its
    forward pass. They are cut at 32 tokens, and the calibration says so; a longer explicit length is refused."""
    gpt2 = save(build_model("gpt2"), tmp_path / "gpt2", "safetensors")
    text = tmp_path / "calibration.txt"
    text.write_text("words to cut into blocks " * 20)
    calibration = collect_calibration(gpt2, text)
    (note,) = calibration.notes
    assert note.startswith("calibration max_length: examples are cut at 32 tokens, not the default 128")
    assert "n_positions = 32" in note
    assert calibration.source["max_length"] == 32 and calibration.describe()["notes"] == [note]
    assert calibration.tokens("transformer.h.0.attn.c_attn.weight") == 500  # every token, in blocks of ≤ 32
    with pytest.raises(ConfigError, match=r"calibration max_length 64 is more than the model can take: its table "
                                          r"of learned positions covers 32 tokens \(n_positions = 32"):
        collect_calibration(gpt2, text, config=CalibrationConfig(max_length=64))
    # negative control: Llama's 2048 positions leave the default at 128, without a note
    llama = collect_calibration(pair[0], text)
    assert llama.source["max_length"] == 128 and llama.notes == []


def test_an_encoder_decoders_fused_cross_key_value_reads_the_sources_mask():
    """A BERT-encoder + GPT-2-decoder model's crossattention.c_attn (role other, rows xk and xv) reads the encoder's
    output, so its calibration inputs are masked by the source's padding; it got the target's (skipped by a shape check
    when the lengths differ, applied wrongly when they are equal). Its q_attn and the self-attention read the target."""
    from spectra.calibration import _mask_key
    from spectra.checkpoints.architectures import module_info

    def key(name):
        return _mask_key(name, module_info(name, {"is_encoder_decoder": True}))

    assert key("decoder.transformer.h.0.crossattention.c_attn") == "attention_mask"
    assert key("encoder.encoder.layer.0.attention.self.query") == "attention_mask"
    assert key("decoder.transformer.h.0.crossattention.q_attn") == "decoder_attention_mask"  # negative controls
    assert key("decoder.transformer.h.0.attn.c_attn") == "decoder_attention_mask"
