"""The demo pipeline end to end at test size: same code path as `spectra demo`, a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch

import spectra.lora.train as train_mod
from spectra.demo.run import DemoConfig, run_demo


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=300, max_position_embeddings=64)  # 300 ids: the byte tokenizer is lossless
    tf.BertModel(cfg).save_pretrained(root / "base")
    config = DemoConfig.tiny(str(root / "base"))
    result = run_demo(config, out_dir=root / "report", cache_dir=root / "cache", progress=False)
    return root, config, result


def test_report_sections_and_files(tiny_demo):
    root, _, result = tiny_demo
    md = (root / "report" / "report.md").read_text()
    for heading in ("1. How low-rank", "2. What rank spectra recommends", "3. How much of the full fine-tune",
                    "4. Test accuracy", "5. Rank sweep"):
        assert heading in md
    html = (root / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((root / "report" / "figures").glob("*.png"))) >= 3
    assert json.loads((root / "report" / "demo.json").read_text())["recommended_rank"] == result.summary["recommended_rank"]


def test_numbers_are_consistent(tiny_demo):
    _, config, result = tiny_demo
    s = result.summary
    for method, a in s["adapters"].items():
        assert a["captured_energy"] <= a["optimal_energy"] + 1e-6, method  # Eckart–Young is a hard bound
    for row in s["sweep"]:
        assert row["captured_energy"] <= row["optimal_energy"] + 1e-6
    optimal = [row["optimal_energy"] for row in s["sweep"]]
    assert optimal == sorted(optimal)  # more rank never holds less energy
    assert s["uniform_plan"]["energy"] >= config.energy - 1e-9 or s["uniform_plan"]["rank"] == max(
        r["full_rank"] for r in s["roles"])
    assert set(s["evals"]) >= {"base", "full fine-tune", f"lora (trained, rank {s['recommended_rank']})"}
    assert all(0 <= (v or {}).get("accuracy", 0) <= 1 for v in s["evals"].values())


def test_rerun_reuses_the_cache(tiny_demo, monkeypatch):
    root, config, first = tiny_demo

    def no_training(*args, **kwargs):
        raise AssertionError("the second run trained again instead of reusing the cache")

    monkeypatch.setattr(train_mod, "train_adapter", no_training)
    again = run_demo(config, out_dir=root / "report2", cache_dir=root / "cache", progress=False)
    assert again.summary["evals"] == first.summary["evals"]
    assert again.summary["adapters"] == first.summary["adapters"]


def test_cache_key_follows_config_base_and_spectra_source(monkeypatch):
    import spectra.demo.run as demo_run

    config = DemoConfig.tiny("base")
    key = config.key("fp")
    assert key == config.key("fp") and key != config.key("other") and key != DemoConfig.tiny("b2").key("fp")
    monkeypatch.setattr(demo_run, "_source_digest", lambda: "changed")  # e.g. a fixed trainer: runs again
    assert config.key("fp") != key


def test_summary_roles_are_one_per_stack_and_role(monkeypatch):
    """The demo's per-role numbers were keyed by role: a vision tower's q and the language model's q came out as two
    entries both called "q". They take the analysis report's labels now ("q", "vision q"), and a fused tensor is
    counted once through tables.fused_wholes, as in the report."""
    import copy
    import types

    import numpy as np

    from spectra.analysis import AnalysisResult
    from spectra.demo.run import _summary
    from spectra.report.tables import summary_rows
    from tests.report.conftest import build_analysis, matrix_row, planted_spectrum

    data = copy.deepcopy(build_analysis(layers=(0, 1)))
    s = planted_spectrum(7, (16, 16), scale=2.0, rng=np.random.default_rng(7))
    data["modules"].append(matrix_row("vision_tower.encoder.layers.0.self_attn.q_proj", "q", 0, (16, 16), s,
                                      stack="vision"))
    analysis = AnalysisResult(**{k: data[k] for k in ("config", "base", "tuned", "modules")})

    def no_memory(*args, **kwargs):
        raise ValueError("no model here")  # the summary's memory lines are not this test's

    monkeypatch.setattr("spectra.memory.estimate_memory", no_memory)
    plan = types.SimpleNamespace(total_params=1, total_energy=0.5, modules=[])
    summary = _summary(analysis, plan, plan, {}, {"runs": []}, DemoConfig(), "no-model-here", 4)
    labels = [r["role"] for r in summary["roles"]]
    assert labels == [e["label"] for e in summary_rows(data)] and len(set(labels)) == len(labels)
    assert labels.count("q") == 1 and "vision q" in labels
    counted = [r for r in analysis.matrices() if r["role"] != "qkv"]  # c_attn by its [q] split only
    assert summary["modules"]["energy_rank_0.9"] == float(np.median([r["energy_rank"]["0.9"] for r in counted]))


def test_functional_summary_without_a_qualifying_rank(monkeypatch):
    """No swept rank within ε (or a curve the data never reached): functional_ranks gives rank None and no
    resolved/gap_interval keys, which the demo read with [] (a KeyError after the sweep had run)."""
    import types

    import spectra.ranks as ranks
    import spectra.sweep as sweep
    from spectra.demo.run import _functional

    fake = types.SimpleNamespace(curve=lambda: [{"rank": 1, "accuracy": 0.5, "interval": None}], to_dict=lambda: {})
    monkeypatch.setattr(sweep, "truncation_sweep", lambda *a, **k: fake)
    monkeypatch.setattr(ranks, "functional_ranks", lambda *a, **k: {
        "examples": 8, "groups": {"model": {"rank": None, "swept": [1], "full_rank": 16, "at_full_rank": None}}})
    out = _functional("base", "tuned", {"test": "data"}, DemoConfig(), progress=False)["summary"]
    assert out["rank"] is None and out["resolved"] is None and out["gap_interval"] is None
