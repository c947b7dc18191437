"""The benchmark pair generator: real names, shapes, dtype and sharding; planted spectra; reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectra.bench.make_pair import PairConfig, make_pair, tensor_plan
from spectra.checkpoints.source import open_checkpoint
from spectra.errors import ConfigError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # a small shard size forces several shards and an index, as for real 1B+ checkpoints
    return make_pair(tmp_path_factory.mktemp("pair"), PairConfig(shape="llama-tiny", shard_bytes=1 << 17))


def test_names_shapes_and_dtype_match_transformers(pair):
    import transformers as tf

    config = tf.LlamaConfig.from_pretrained(pair / "base")
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for side in ("base", "tuned"):
        src = open_checkpoint(pair / side)
        assert {n: src.info(n).shape for n in src.names()} == expected
        assert {src.info(n).dtype for n in src.names()} == {torch.bfloat16}
    index = json.loads((pair / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    loaded = tf.AutoModelForCausalLM.from_pretrained(pair / "tuned")  # transformers reads it as is
    assert loaded.dtype == torch.bfloat16


def test_update_has_planted_decay_and_rounding_floor(pair):
    truth = json.loads((pair / "ground_truth.json").read_text())["modules"]
    name = "model.layers.0.mlp.up_proj"
    base = open_checkpoint(pair / "base").read(name + ".weight").double()
    tuned = open_checkpoint(pair / "tuned").read(name + ".weight").double()
    delta = tuned - base
    t = truth[name]
    # ‖ΔW‖/‖W‖ as asked, and what bf16 rounding added is a few % of ‖ΔW‖² (small, but not nothing)
    assert float(delta.norm() / base.norm()) == pytest.approx(PairConfig().relative_size, rel=0.05)
    assert 0.005 < (t["rounding_fro"] / t["stored_delta_fro"]) ** 2 < 0.1
    s = np.linalg.svd(delta.numpy(), compute_uv=False)
    planted = np.asarray(t["signal_values"])
    np.testing.assert_allclose(s[:5], planted[:5], rtol=0.1)  # the signal's top is what was planted
    energy = np.cumsum(s**2) / np.sum(s**2)
    measured = int(np.searchsorted(energy, 0.9)) + 1
    assert abs(measured - t["planted_energy_rank_0.9"]) <= max(3, 0.2 * measured)
    assert 0.05 < t["zero_fraction"] < 0.6  # bf16: many updates round to nothing


def test_reproducible_and_seed_dependent(tmp_path):
    a = make_pair(tmp_path / "a", PairConfig(shape="llama-tiny"))
    b = make_pair(tmp_path / "b", PairConfig(shape="llama-tiny"))
    c = make_pair(tmp_path / "c", PairConfig(shape="llama-tiny", seed=1))
    name = "model.layers.1.self_attn.q_proj.weight"
    read = lambda p: open_checkpoint(p / "tuned").read(name)  # noqa: E731
    assert torch.equal(read(a), read(b)) and not torch.equal(read(a), read(c))


def test_plan_and_bad_options(tmp_path):
    plan = dict(tensor_plan("tinyllama-1.1b"))
    assert plan["model.layers.21.self_attn.k_proj.weight"] == (256, 2048)  # 4 KV heads × 64
    assert plan["model.layers.0.mlp.down_proj.weight"] == (2048, 5632) and len(plan) == 22 * 9 + 3
    with pytest.raises(ConfigError, match="shape"):
        PairConfig(shape="gpt-5")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(ConfigError, match="overwrite"):
        make_pair(tmp_path / "x", PairConfig(shape="llama-tiny"))


def test_interrupted_pair_leaves_nothing_and_overwrite_swaps_whole(tmp_path, monkeypatch):
    import spectra.bench.make_pair as mp

    old = make_pair(tmp_path / "p", PairConfig(shape="llama-tiny"))
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    real = mp._tensors

    def dies_midway(config, truth):
        for i, item in enumerate(real(config, truth)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(mp, "_tensors", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        make_pair(tmp_path / "p", PairConfig(shape="llama-tiny", seed=1), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        make_pair(tmp_path / "fresh", PairConfig(shape="llama-tiny"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no staging directory, no half-written "fresh"
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before  # the old pair untouched
    assert json.loads((old / "ground_truth.json").read_text())["config"]["seed"] == 0
    monkeypatch.setattr(mp, "_tensors", real)
    make_pair(tmp_path / "p", PairConfig(shape="llama-tiny", seed=1), overwrite=True)
    assert json.loads((old / "ground_truth.json").read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
