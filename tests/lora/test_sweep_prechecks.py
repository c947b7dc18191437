"""A rank sweep checks every (method, rank) before the first run trains; TrainConfig refuses a bad eval_every and
notes a batch larger than the data.

`spectra verify --sweep 4,8,512` on a model narrower than 512 had trained the adapters of ranks 4 and 8 and then
stopped at 512, where train refuses a rank above min(d_in, d_out) of a targeted module; a sweep of lora and qlora on
a base QLoRA cannot quantise (Falcon) trained every lora run first. The sweep now asks train's own early refusals
(``refuse_before_loading``, on the class config.json names built on the meta device) of every run first, and trains
nothing when one is refused. The reference widths come from transformers' config (num_key_value_heads · head_dim),
not from spectra's reading of the model.

TrainConfig took ``eval_every`` 0 (no periodic evaluation, silently), negative, True or 2.5; a ``batch_size`` of
10**12 trained one step on every example with nothing said.
"""

from __future__ import annotations

import json

import pytest
import torch

import spectra.lora.train as train_module
from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, refuse_before_loading, train_adapter
from spectra.lora.verify import rank_sweep
from tests.models import build_model, save, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

FAST = dict(batch_size=4, max_length=16, max_steps=1, eval_fraction=0.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama (hidden 32, 4 heads, 2 KV heads): k_proj and v_proj are (2·8)×32, the narrowest targets."""
    return save(build_model("llama"), tmp_path_factory.mktemp("llama") / "base", "safetensors")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from tests.lora.conftest import random_text

    return random_text(tmp_path_factory.mktemp("data") / "train.txt", chars=16 * 8 * 6, seed=2)


def _kv_width() -> int:
    config = tiny_config("llama")
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)  # 16
    assert kv < config.hidden_size  # narrower than every other target (q, o, gate, up, down)
    return kv


@pytest.fixture
def trained(monkeypatch):
    """The (method, rank) of every train_adapter call the sweep makes; each still trains (the real function)."""
    calls = []
    real = train_module.train_adapter

    def recording(base, data, config, folder, **kwargs):
        calls.append((config.method, config.rank))
        return real(base, data, config, folder, **kwargs)

    monkeypatch.setattr(train_module, "train_adapter", recording)
    return calls


def test_sweep_refuses_a_rank_above_a_target_before_any_run_trains(llama, text, tmp_path, trained):
    """ranks 4, 8 and kv + 1: nothing trains, adapters_dir stays empty, and the message names the rank, k_proj (the
    first target narrower than it), the largest rank every target takes and the runs that pass."""
    kv = _kv_width()
    ads = tmp_path / "ads"
    with pytest.raises(ConfigError) as exc:
        rank_sweep(llama, llama, text, ranks=[4, 8, kv + 1], adapters_dir=ads, train_config=TrainConfig(**FAST),
                   progress=False)
    said = str(exc.value)
    assert trained == []  # had trained lora r4 and lora r8 before the refusal
    assert not ads.exists() or not any(ads.iterdir())
    assert said.startswith(f"the sweep trains nothing: train would refuse 1 of its 3 runs (lora r{kv + 1}) before "
                           f"they train. lora r{kv + 1}: rank (--sweep) {kv + 1} exceeds min(d_in, d_out) = {kv} of "
                           f"model.layers.0.self_attn.k_proj ({kv}×32) and 3 more target(s); the largest rank every "
                           f"targeted module takes is {kv}: lower it"), said
    assert said.endswith("The runs lora r4, lora r8 pass them: sweep those (--sweep 4,8), or change what the others "
                         "are refused for."), said


def test_sweep_names_every_refused_run_of_every_method(llama, text, tmp_path, trained):
    """lora and dora at 4 and 2·kv: both methods' wide runs refused, the rank-4 runs named as passing."""
    kv = _kv_width()
    with pytest.raises(ConfigError) as exc:
        rank_sweep(llama, llama, text, ranks=[4, 2 * kv], methods=("lora", "dora"), adapters_dir=tmp_path / "ads",
                   train_config=TrainConfig(**FAST), progress=False)
    said = str(exc.value)
    assert trained == []
    assert f"refuse 2 of its 4 runs (lora r{2 * kv}, dora r{2 * kv})" in said, said
    assert "The runs lora r4, dora r4 pass them: sweep those (--sweep 4)," in said, said


def test_sweep_checks_what_train_targets(llama, text, tmp_path, monkeypatch):
    """Negative controls: rank kv (the largest) passes the check, and so does kv + 1 where k and v are not among the
    roles (q, o and the MLP are all 32 wide): the check asks the targets train would adapt."""
    calls = []

    def stub(base, data, config, folder, **kwargs):
        calls.append((config.method, config.rank, config.roles))
        raise RuntimeError("stop after the checks")

    monkeypatch.setattr(train_module, "train_adapter", stub)
    kv = _kv_width()
    with pytest.raises(RuntimeError, match="stop after the checks"):
        rank_sweep(llama, llama, text, ranks=[2, kv], adapters_dir=tmp_path / "a", train_config=TrainConfig(**FAST))
    assert calls == [("lora", 2, None)]
    roles = ("q", "o", "gate", "up", "down")
    with pytest.raises(RuntimeError, match="stop after the checks"):
        rank_sweep(llama, llama, text, ranks=[kv + 1], adapters_dir=tmp_path / "b",
                   train_config=TrainConfig(roles=roles, **FAST))
    assert calls[-1] == ("lora", kv + 1, roles)


def test_sweep_refuses_qlora_runs_on_a_base_qlora_cannot_quantise_before_the_lora_runs(tmp_path, trained):
    """lora and qlora on a tiny Falcon (FalconLinear, which transformers' 4-bit load leaves in 16 bits): the qlora
    runs are refused before the lora ones train (they had trained first)."""
    from tests.lora.test_train_qlora_falcon import QLORA, _data, _falcon

    falcon, data = _falcon(tmp_path), _data(tmp_path)
    config = TrainConfig(**{k: v for k, v in QLORA.items() if k != "rank"}, eval_fraction=0.0)
    with pytest.raises(ConfigError) as exc:
        rank_sweep(falcon, falcon, data, ranks=[2], methods=("lora", "qlora"), adapters_dir=tmp_path / "ads",
                   train_config=config, progress=False)
    said = str(exc.value)
    assert trained == []
    assert "refuse 1 of its 2 runs (qlora r2)" in said and "FalconLinear" in said, said
    assert "nothing would be quantised" in said and "sweep those (--sweep 2 --method lora)" in said, said


def test_sweep_refuses_qlora_runs_on_layers_narrower_than_the_4bit_blocks_before_the_lora_runs(llama, text, tmp_path,
                                                                                                trained):
    """The tiny Llama is 32 wide (hidden_size, from its config): bitsandbytes' 4-bit layers need 64 input features,
    which train refused only once the qlora run had loaded, after the lora runs had trained."""
    hidden = tiny_config("llama").hidden_size
    assert hidden < 64
    with pytest.raises(ConfigError) as exc:
        rank_sweep(llama, llama, text, ranks=[2, 4], methods=("lora", "qlora"), adapters_dir=tmp_path / "ads",
                   train_config=TrainConfig(**FAST), progress=False)
    said = str(exc.value)
    assert trained == []
    assert f"refuse 2 of its 4 runs (qlora r2, qlora r4) before they train. qlora r2: {llama}: " in said, said
    assert f"model.layers.0.self_attn.q_proj has {hidden} input features; 4-bit (QLoRA/QDoRA) layers need at least " \
           "64" in said, said
    assert said.endswith("sweep those (--sweep 2,4 --method lora), or change what the others are refused for."), said


def test_qlora_width_check_passes_a_base_64_wide(tmp_path):
    """Negative control: the 64-wide Llama of the Falcon tests (whose QLoRA run trains there) is not refused."""
    from tests.lora.test_train_qlora_falcon import _llama

    refuse_before_loading(_llama(tmp_path), TrainConfig(method="qlora", rank=2))


def test_train_refuses_a_rank_above_a_target_before_reading_the_data(llama, text, tmp_path, monkeypatch):
    """train asks the same checks of the class config.json names: the data is not read, the weights not loaded (a
    QLoRA run on 32-wide layers, a rank above k_proj's width)."""
    def never(*args, **kwargs):
        raise AssertionError("read past the refusal")

    monkeypatch.setattr(train_module, "prepare_data", never)
    monkeypatch.setattr(train_module, "load_model", never)
    with pytest.raises(ConfigError, match=r"q_proj has 32 input features; 4-bit \(QLoRA/QDoRA\) layers need at least"):
        train_adapter(llama, text, TrainConfig(method="qlora", rank=2, **FAST), tmp_path / "ad", progress=False)
    kv = _kv_width()
    with pytest.raises(ConfigError, match=rf"^rank \(--rank\) {kv + 1} exceeds min\(d_in, d_out\) = {kv} of "
                                          r"model\.layers\.0\.self_attn\.k_proj"):
        train_adapter(llama, text, TrainConfig(rank=kv + 1, **FAST), tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()


def test_early_rank_check_leaves_out_a_classifier_head_as_a_seq_cls_run_does(tmp_path):
    """BartForSequenceClassification's classification_head.out_proj (num_labels × d_model) is of role o, but a
    seq_cls run trains it in full (no LoRA) and another task's class has no such head: rank 4 above its
    num_labels = 3 is not refused. The control: the same rule on every role-o target refuses it, naming it."""
    import transformers as tf

    from spectra.checkpoints.targets import meta_model

    config = tiny_config("bart")
    config.num_labels = 3
    torch.manual_seed(0)
    model = tf.BartForSequenceClassification(config)
    model.config.architectures = ["BartForSequenceClassification"]
    folder = save(model, tmp_path / "bart", "safetensors")
    refuse_before_loading(folder, TrainConfig(rank=4))  # not refused
    meta = meta_model(json.loads((folder / "config.json").read_text()))
    targets, _ = train_module.peft_targets(meta, TrainConfig(rank=4))
    assert "classification_head.out_proj" in targets
    with pytest.raises(ConfigError, match=r"= 3 of classification_head\.out_proj \(3×32\)"):
        train_module._refuse_rank_beyond_targets(4, meta, {"target_modules": targets})
    with pytest.raises(ConfigError, match=r"rank \(--rank\) 33 exceeds min\(d_in, d_out\) = 32 of model\.encoder"):
        refuse_before_loading(folder, TrainConfig(rank=33))  # the blocks' own limit is still checked


# ---------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize("kwargs, said", [
    (dict(eval_every=0), "eval_every must be a positive integer, got 0."),
    (dict(eval_every=-5), "eval_every must be a positive integer, got -5."),
    (dict(eval_every=True), "eval_every must be a positive integer, got True."),
    (dict(eval_every=2.5), "eval_every must be a positive integer, got 2.5."),
    (dict(eval_every="10"), "eval_every must be a positive integer, got '10'."),
    (dict(max_steps=0), "max_steps must be a positive integer, got 0."),
    (dict(max_steps=2.5), "max_steps must be a positive integer, got 2.5."),
    (dict(max_steps="3"), "max_steps must be a positive integer, got '3'."),  # was a TypeError of "<"
    (dict(batch_size=True), "batch_size must be a positive integer, got True."),  # was a batch of 1
    (dict(epochs=False), "epochs must be a positive integer, got False."),
    (dict(rank=True), "rank must be a positive integer, got True."),
])
def test_train_config_refuses_a_count_that_is_not_a_positive_integer_by_name(kwargs, said):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    assert str(exc.value) == said


def test_train_config_takes_positive_integer_counts():
    """Negative control: 1 and None (the defaults' meaning) are taken as given."""
    config = TrainConfig(eval_every=1, max_steps=1, batch_size=1, epochs=1, rank=1)
    assert (config.eval_every, config.max_steps, config.batch_size) == (1, 1, 1)
    assert TrainConfig().eval_every is None and TrainConfig().max_steps is None


def test_train_config_takes_numpy_integers_as_ints():
    """numpy's integers (a count read from an array, np.int64(5)) are integers: taken, stored as plain ints (they
    were refused as 'got np.int64(5)'); numpy's bool is no count (negative control)."""
    import numpy as np

    config = TrainConfig(eval_every=np.int64(5), max_steps=np.int32(3), batch_size=np.int64(4), rank=np.int16(2))
    assert (config.eval_every, config.max_steps, config.batch_size, config.rank) == (5, 3, 4, 2)
    assert all(type(v) is int for v in (config.eval_every, config.max_steps, config.batch_size, config.rank))
    with pytest.raises(ConfigError, match="eval_every must be a positive integer"):
        TrainConfig(eval_every=np.bool_(True))


def test_checks_before_loading_build_the_meta_model_once(llama, monkeypatch):
    """refuse_before_loading's checks that leave the model as it is share one build from config.json (a DoRA run
    asks two of them; each had built its own, ~0.25 s on a 70B config)."""
    import spectra.checkpoints.targets as targets

    builds = []
    real = targets.meta_model
    monkeypatch.setattr(targets, "meta_model", lambda *a, **k: builds.append(1) or real(*a, **k))
    refuse_before_loading(llama, TrainConfig(method="dora", rank=4))
    assert len(builds) == 1


def test_eval_every_evaluates_at_those_steps(llama, text, tmp_path):
    """eval_every 2 over 4 steps evaluates at steps 2 and 4 (and not again at the epoch's end, step 4)."""
    result = train_adapter(llama, text, TrainConfig(rank=2, batch_size=4, max_length=16, max_steps=4,
                                                    eval_fraction=0.2, eval_every=2), tmp_path / "ad", progress=False)
    assert [e["step"] for e in result.evals] == [2, 4]


def test_a_batch_larger_than_the_data_takes_all_of_it_with_a_note(llama, text, tmp_path):
    """batch_size 10**12 trains exactly as batch_size n (the number of training examples, from prepare_data, the
    reference): one step per epoch, the same loss and the same adapter bytes; a note says so. The control
    (batch_size n) gets no note."""
    from spectra.lora.data import prepare_data

    _, train, _, _, _ = prepare_data(llama, text, task="auto", max_length=16, eval_data=None, eval_fraction=0.0,
                                     seed=0, notes=[])
    n = len(train)
    runs = {}
    for size in (10**12, n):
        runs[size] = train_adapter(llama, text, TrainConfig(rank=2, batch_size=size, max_length=16, epochs=2,
                                                            eval_fraction=0.0), tmp_path / str(size), progress=False)
    huge, exact = runs[10**12], runs[n]
    assert huge.steps == exact.steps == 2 and huge.losses == exact.losses
    assert ((tmp_path / str(10**12) / "adapter_model.safetensors").read_bytes()
            == (tmp_path / str(n) / "adapter_model.safetensors").read_bytes())
    note = (f"batch_size {10**12} is more than the {n} training examples: each step takes all {n} (one step per "
            f"epoch), as a batch_size of {n} would")
    assert note in huge.notes and not any("batch_size" in m for m in exact.notes)
    assert note in json.loads((tmp_path / str(10**12) / "spectra_train.json").read_text())["notes"]
