"""The noise floor of a whole analysis: which roundings are under ΔW, per module, in analysis.json and the cache key.

(A) a bf16 release fine-tuned from its stored values and saved in bf16: only the fine-tune's rounding is in ΔW.
(B) two bf16 checkpoints rounded from finer (float32) weights: both are. The reference is the float64 std of
ΔW_stored − δ for the planted δ.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spectra.analysis import AnalysisConfig, AnalysisResult, analyze, cache_key
from spectra.errors import ConfigError
from tests.models import flat_update, save

Q = "model.layers.0.self_attn.q_proj"
RANK = 4


def _llama_pair(tmp_path, scenario: str):
    """A one-layer Llama (hidden 128) from config, stored in bf16; q_proj moved by a rank-4 δ, ‖δ‖ = 1 % ‖W‖."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32)
    master = tf.LlamaForCausalLM(cfg)  # float32: the finer weights both B checkpoints are rounded from
    w = master.model.layers[0].self_attn.q_proj.weight.detach().double()
    update = flat_update((128, 128), RANK, seed=0, scale=1.0)
    delta = update * 0.01 * float(w.norm()) / float(update.norm())
    base = master.to(torch.bfloat16)  # (both) the released base
    start = base.model.layers[0].self_attn.q_proj.weight.detach().double() if scenario == "A" else w
    tuned = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.copy_((start + delta).to(torch.bfloat16))
    b, t = save(base, tmp_path / f"{scenario}b", "safetensors"), save(tuned, tmp_path / f"{scenario}t", "safetensors")
    stored = (tuned.model.layers[0].self_attn.q_proj.weight.detach().double()
              - base.model.layers[0].self_attn.q_proj.weight.detach().double())
    return b, t, float((stored - delta).std())


@pytest.mark.parametrize("scenario, expected", [("A", "exact"), ("B", "counted")])
def test_each_module_records_which_roundings_its_floor_holds(tmp_path, scenario, expected):
    b, t, true = _llama_pair(tmp_path, scenario)
    result = analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False)
    row = result.module(Q)["noise"]
    assert result.config["base_rounding"] == "auto"
    assert row["base_rounding"] == expected
    assert row["sigma"] == pytest.approx(true, rel=0.05)
    assert row["sigma_residual"] == pytest.approx(true, rel=0.05)
    assert row["rank_above"] == RANK
    assert row["fro"] == pytest.approx(row["sigma"] * 128, rel=1e-12)
    counted = analyze(b, t, AnalysisConfig(roles=("q",), base_rounding="counted"), cache_dir=False,
                      progress=False).module(Q)["noise"]
    exact = analyze(b, t, AnalysisConfig(roles=("q",), base_rounding="exact"), cache_dir=False,
                    progress=False).module(Q)["noise"]
    assert (counted["base_rounding"], exact["base_rounding"]) == ("counted", "exact")
    assert counted["sigma_residual"] is None and exact["sigma_residual"] is None
    assert counted["sigma"] / exact["sigma"] == pytest.approx(math.sqrt(2), rel=0.05)  # bf16 on both sides
    if scenario == "A":
        assert counted["sigma"] / true == pytest.approx(math.sqrt(2), rel=0.05)  # the floor as it was: √2 high


@pytest.mark.parametrize("scenario, expected", [("A", "exact"), ("B", "counted")])
def test_the_sketch_decides_as_the_full_spectrum_does(tmp_path, scenario, expected):
    """Above full_below only the top values are computed; ‖ΔW‖_F is exact, so the residual and the choice are the
    full spectrum's."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 1100, generator=g, dtype=torch.float64) * 0.02
    update = flat_update((400, 1100), RANK, seed=1, scale=1.0)
    delta = update * 0.01 * float(w.norm()) / float(update.norm())
    base = w.to(torch.bfloat16)
    tuned = ((base.double() if scenario == "A" else w) + delta).to(torch.bfloat16)
    for side, weight in (("b", base), ("t", tuned)):
        (tmp_path / side).mkdir()
        save_file({Q + ".weight": weight.contiguous()}, tmp_path / side / "model.safetensors")
    (sketched,) = analyze(tmp_path / "b", tmp_path / "t", AnalysisConfig(full_below=0), cache_dir=False,
                          progress=False).modules
    (full,) = analyze(tmp_path / "b", tmp_path / "t", AnalysisConfig(method="full"), cache_dir=False,
                      progress=False).modules
    assert not sketched["complete"] and full["complete"]
    true = float((tuned.double() - base.double() - delta).std())
    for row in (sketched, full):
        assert row["noise"]["base_rounding"] == expected
        assert row["noise"]["sigma"] == pytest.approx(true, rel=0.05)
        above = sum(v > row["noise"]["mp_edge"] for v in row["singular_values"])
        assert above == min(RANK, len(row["singular_values"]))
    assert full["noise"]["rank_above"] == RANK  # the sketch's is null when it holds no value below the floor
    assert sketched["noise"]["sigma"] == pytest.approx(full["noise"]["sigma"], rel=1e-3)  # sampled vs every row
    assert sketched["noise"]["sigma_residual"] == pytest.approx(full["noise"]["sigma_residual"], rel=1e-3)


def test_the_option_is_validated_recorded_and_keys_the_cache(tmp_path):
    with pytest.raises(ConfigError, match="base_rounding"):
        AnalysisConfig(base_rounding="yes")
    fp = {"fingerprint": "x"}
    keys = {cache_key(fp, fp, AnalysisConfig(base_rounding=c)) for c in ("auto", "counted", "exact")}
    assert len(keys) == 3
    b, t, _ = _llama_pair(tmp_path, "A")
    result = analyze(b, t, AnalysisConfig(roles=("q",), base_rounding="exact"), cache_dir=False, progress=False)
    out = result.write_report(tmp_path / "report")
    data = json.loads((out / "analysis.json").read_text())
    assert data["config"]["base_rounding"] == "exact"
    assert data["modules"][0]["noise"]["base_rounding"] == "exact"
    assert "- Noise floor (--base-rounding exact): the fine-tune's rounding alone in 1 module\n" in (
        out / "report.md").read_text()
    # auto: what the residual fits, not a claim on how the fine-tune was made (sub-ulp updates fit it otherwise made)
    auto = analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False)
    text = (auto.write_report(tmp_path / "auto") / "report.md").read_text()
    assert "- Noise floor (--base-rounding auto): ΔW's residual fits the fine-tune's rounding alone in 1 module\n" in text
    assert "started from" not in text


def test_an_analysis_written_before_the_option_still_loads_and_renders(tmp_path):
    """Schema v1 stays: files without config.base_rounding or noise.base_rounding/sigma_residual load and render."""
    b, t, _ = _llama_pair(tmp_path, "A")
    out = analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False).write_report(tmp_path / "new")
    data = json.loads((out / "analysis.json").read_text())
    del data["config"]["base_rounding"]
    for row in data["modules"]:
        if "noise" in row:
            del row["noise"]["base_rounding"], row["noise"]["sigma_residual"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "analysis.json").write_text(json.dumps(data))
    old = AnalysisResult.load(tmp_path / "old")
    assert "base_rounding" not in old.module(Q)["noise"]
    assert "Noise floor" not in (old.write_report(tmp_path / "old_report") / "report.md").read_text()


def test_quantised_pairs_keep_their_grid_rule_and_a_forced_exact_drops_the_base_grid(tmp_path):
    """Two FP8 releases (both sides re-quantised, 16 × 16 blocks): "auto" keeps the pairing's rule, both grids
    counted, the floor as it was ("counted" gives the same). Forced "exact" keeps the fine-tune's grid alone: its
    variance (spacing × scale)² / 12 per element from the stored codes (numpy, enumerating e4m3's grid), and the
    Bandeira–van Handel edge max_i √Σ_j v_ij + max_j √Σ_i v_ij of those variances."""
    import numpy as np
    from safetensors.torch import load_file

    from tests.checkpoints.test_quantized import _requantised_pair, _spacing_fp8

    b, t, name = _requantised_pair(tmp_path, "fp8")
    rows = {c: next(r for r in analyze(b, t, AnalysisConfig(dtype="float64", base_rounding=c), cache_dir=False,
                                       progress=False).modules if r["name"] == name)["noise"]
            for c in ("auto", "counted", "exact")}
    assert rows["auto"]["base_rounding"] == "counted" and rows["auto"]["sigma_residual"] is None
    assert {k: rows["auto"][k] for k in ("sigma", "mp_edge")} == {k: rows["counted"][k] for k in ("sigma", "mp_edge")}
    stored = load_file(str(t / "model.safetensors"))
    codes = stored[f"{name}.weight"].float().numpy()
    scales = stored[f"{name}.weight_scale_inv"].double().numpy()
    variance = (_spacing_fp8(codes) * np.kron(scales, np.ones((16, 16)))) ** 2 / 12
    assert rows["exact"]["base_rounding"] == "exact"
    assert rows["exact"]["sigma"] == pytest.approx(float(np.sqrt(variance.mean())), rel=1e-9)
    edge = np.sqrt(variance.sum(1)).max() + np.sqrt(variance.sum(0)).max()
    assert rows["exact"]["mp_edge"] == pytest.approx(float(edge), rel=1e-9)
    assert rows["exact"]["sigma"] < rows["counted"]["sigma"]


def test_the_cli_passes_the_option_through_and_refuses_a_wrong_one(tmp_path, monkeypatch, capsys):
    from tests.cli.test_cli import run

    b, t, _ = _llama_pair(tmp_path, "B")
    code, _, _ = run(monkeypatch, capsys, "analyze", b, t, "-o", tmp_path / "r", "--roles", "q", "--no-cache", "-q",
                     "--base-rounding", "exact")
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert code == 0 and data["config"]["base_rounding"] == "exact"
    assert data["modules"][0]["noise"]["base_rounding"] == "exact"  # B holds both, but the user's word is taken
    code, out, err = run(monkeypatch, capsys, "analyze", b, t, "-o", tmp_path / "r2", "--no-cache", "-q",
                         "--base-rounding", "sometimes")
    assert code != 0 and "--base-rounding: 'sometimes' is not one of auto, counted, exact" in err
