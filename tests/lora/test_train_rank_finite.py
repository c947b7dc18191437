"""A rank above what a targeted module allows, and a float option that is not finite, are refused by train and extract,
naming the field and its value, before anything is written.

`spectra train --rank 10**30` was torch's traceback (empty(): "Overflow when unpacking long long"), and a rank above a
module's min(d_in, d_out) trained, where extract, memory and recommend refuse it. `lr`, `alpha` (and extract's alpha)
were checked "> 0", which +inf passes; weight_decay, grad_clip and lora_dropout were not checked at all."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.train import TrainConfig, train_adapter
from tests.models import planted_gpt2, save, tiny_config

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kwargs, said", [
    (dict(lr=INF), "lr must be finite, got inf."),
    (dict(alpha=INF), "alpha (--alpha) must be finite, got inf."),
    (dict(lr=-INF), "lr must be positive, got -inf."),  # as before: -inf and NaN fail "> 0"
    (dict(lr=NAN), "lr must be positive, got nan."),
    (dict(weight_decay=NAN), "weight_decay must be a finite number ≥ 0, got nan."),
    (dict(weight_decay=INF), "weight_decay must be a finite number ≥ 0, got inf."),
    (dict(weight_decay=-0.1), "weight_decay must be a finite number ≥ 0, got -0.1."),
    (dict(grad_clip=NAN), "grad_clip must be a finite number ≥ 0 (0: no clipping), got nan."),
    (dict(grad_clip=INF), "grad_clip must be a finite number ≥ 0 (0: no clipping), got inf."),
    (dict(grad_clip=-1.0), "grad_clip must be a finite number ≥ 0 (0: no clipping), got -1.0."),
    (dict(lora_dropout=1.0), "lora_dropout must lie in [0, 1), got 1.0."),
    (dict(lora_dropout=NAN), "lora_dropout must lie in [0, 1), got nan."),
    (dict(lora_dropout=-INF), "lora_dropout must lie in [0, 1), got -inf."),
    (dict(warmup_ratio=INF), "warmup_ratio must lie in [0, 1), got inf."),
    (dict(rank=2**63), "rank (--rank) 9223372036854775808 is more than any weight has rows or columns (torch's sizes "
                       "stop at 2**63 - 1); give at most min(d_in, d_out) of the modules it adapts."),
])
def test_train_config_refuses_non_finite_floats_and_an_int64_overflowing_rank_by_name(kwargs, said):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    assert str(exc.value) == said


def test_train_config_takes_finite_values_at_the_edges():
    """Negative control: the finite values next to the refused ones are taken as given."""
    config = TrainConfig(lr=1e30, alpha=1e30, weight_decay=0.0, grad_clip=0.0, lora_dropout=0.999, warmup_ratio=0.0,
                         rank=2**63 - 1)
    assert (config.lr, config.alpha, config.rank) == (1e30, 1e30, 2**63 - 1)
    TrainConfig(weight_decay=0.01, grad_clip=1e9, lora_dropout=0.1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama (hidden 32, 4 heads, 2 KV heads): k_proj and v_proj are (2·8)×32, the narrowest targets."""
    from tests.models import build_model

    return save(build_model("llama"), tmp_path_factory.mktemp("llama") / "base", "safetensors")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from tests.lora.conftest import random_text

    return random_text(tmp_path_factory.mktemp("data") / "train.txt", chars=16 * 8 * 6, seed=2)


FAST = dict(batch_size=4, max_length=16, max_steps=1, eval_fraction=0.0)


def test_train_refuses_a_rank_above_the_narrowest_target_naming_it_and_the_largest_rank(llama, text, tmp_path):
    """The narrowest target and the largest rank every target takes are transformers' own k_proj width, from the
    config (num_key_value_heads · head_dim), not spectra's reading of the weights."""
    config = tiny_config("llama")
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)  # 16
    assert kv < config.hidden_size  # the reference is narrower than every other target (q, o, gate, up, down)
    out = tmp_path / "ad"
    with pytest.raises(ConfigError) as exc:
        train_adapter(llama, text, TrainConfig(rank=kv + 1, **FAST), out, progress=False)
    said = str(exc.value)
    assert said.startswith(f"rank (--rank) {kv + 1} exceeds min(d_in, d_out) = {kv} of model.layers.0.self_attn."
                           f"k_proj ({kv}×{config.hidden_size}) and 3 more target(s); the largest rank every targeted "
                           f"module takes is {kv}: lower it"), said
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"rank \(--rank\) 1000000000000000000000000000000 is more than"):
        train_adapter(llama, text, TrainConfig(rank=10**30, **FAST), out, progress=False)  # was torch's traceback
    assert not out.exists()


def test_train_takes_the_largest_rank_and_a_wider_one_where_the_narrow_modules_are_not_targeted(llama, text, tmp_path):
    """Negative controls: rank = the narrowest width trains, and PEFT's own A of k_proj is (rank, in); without k and v
    among the roles, a rank above their width trains on q, o and the MLP (all 32 wide)."""
    from peft import PeftModel

    config = tiny_config("llama")
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    train_adapter(llama, text, TrainConfig(rank=kv, **FAST), tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == kv
    model = PeftModel.from_pretrained(tf.LlamaForCausalLM.from_pretrained(llama), tmp_path / "a")
    assert tuple(model.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"].weight.shape) == (
        kv, config.hidden_size)
    train_adapter(llama, text, TrainConfig(rank=kv + 1, roles=("q", "o", "gate", "up", "down"), **FAST),
                  tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == kv + 1


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, tuned = planted_gpt2()
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


@pytest.mark.parametrize("alpha", [INF, 1e400])
def test_extract_refuses_an_infinite_alpha_and_writes_nothing(gpt2_pair, tmp_path, alpha):
    out = tmp_path / "ad"
    with pytest.raises(ConfigError) as exc:
        extract_adapter(*gpt2_pair, 2, out, alpha=alpha, progress=False)
    assert str(exc.value) == "alpha must be finite, got inf (the update is scaled by alpha/r)."
    assert not out.exists()


def test_extract_takes_a_large_finite_alpha(gpt2_pair, tmp_path):
    """Negative control: a finite α is written as given, PEFT's lora_alpha."""
    extract_adapter(*gpt2_pair, 2, tmp_path / "ad", alpha=1e6, progress=False)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_alpha"] == 1e6
