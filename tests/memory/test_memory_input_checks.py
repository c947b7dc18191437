"""estimate_memory's input checks (an audit's findings): a plan of another model, rank < 1, roles train refuses,
sequences longer than the model's positions, QLoRA on layers narrower than bitsandbytes' blocks, batch < 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from spectra.errors import ConfigError
from spectra.memory import estimate_memory
from spectra.ranks import ModuleRank, RankPlan
from tests.memory.test_memory import LLAMA2_7B

TINY_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)


def _llama_dir(tmp_path, name="base", **overrides):
    """A tiny Llama saved as a checkpoint (config.json and weights), and the model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(TINY_LLAMA | overrides)))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def _plan(model, base, ranks=(2, 3)) -> RankPlan:
    """A plan of layer 0's q_proj and down_proj of ``model`` at ``ranks``, recording ``base`` as its analysed base."""
    modules = []
    for (name, role), rank in zip((("model.layers.0.self_attn.q_proj", "q"), ("model.layers.0.mlp.down_proj", "down")),
                                  ranks):
        out, d_in = model.get_submodule(name).weight.shape
        modules.append(ModuleRank(name=name, role=role, layer=0, shape=(out, d_in), rank=rank, alpha=2.0 * rank,
                                  energy=1.0, energy_upper=1.0, params=rank * (out + d_in), reason="test"))
    return RankPlan(tuple(modules), base=None if base is None else {"path": str(base), "fingerprint": "0" * 16})


def _peft_trainable(model, plan: RankPlan) -> int:
    """PEFT's own count of the plan's trainable parameters on ``model`` (the independent reference)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=1, target_modules=[m.name for m in plan.modules],
                        rank_pattern={m.name: m.rank for m in plan.modules})
    peft_model = get_peft_model(model, config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# -------------------------------------------------------------------------------- M1: a plan of another model


def test_a_plan_of_another_model_is_refused_as_train_refuses_it(tmp_path):
    base, model = _llama_dir(tmp_path)
    plan = _plan(model, base)
    # its own base: what PEFT trains (negative control)
    assert estimate_memory(base, rank_plan_or_rank=plan).trainable_params == _peft_trainable(model, plan) == (
        2 * (32 + 32) + 3 * (48 + 32))
    # Llama-2-7B: the audit's 2,016 trainable parameters for 7B; now refused naming the plan's base and both models
    with pytest.raises(ConfigError, match=r"another model \(.*base: llama, 2 layers, hidden size 32\), not of this "
                                          r"config \(llama, 32 layers, hidden size 4096\)"):
        estimate_memory(LLAMA2_7B, rank_plan_or_rank=plan)
    # same widths, more layers: the plan's base config differs, so refused too
    deeper = TINY_LLAMA | {"model_type": "llama", "num_hidden_layers": 4}
    with pytest.raises(ConfigError, match="4 layers"):
        estimate_memory(deeper, rank_plan_or_rank=plan)
    # same depth and width, another MLP: the message names the linears that differ
    with pytest.raises(ConfigError, match=r"hidden size 32, linears .*gate 48×32.*\), not of this config \(.*gate "
                                          r"64×32"):
        estimate_memory(TINY_LLAMA | {"model_type": "llama", "intermediate_size": 64}, rank_plan_or_rank=plan)
    # a same-shaped model (a fine-tune's config, another copy) passes: its estimate is the same
    same = TINY_LLAMA | {"model_type": "llama"}
    assert estimate_memory(same, rank_plan_or_rank=plan) == estimate_memory(base, rank_plan_or_rank=plan)


def test_a_plan_without_its_base_is_checked_module_by_module(tmp_path):
    """A plan whose base has moved (or made from rows) is checked against the config's modules."""
    _, model = _llama_dir(tmp_path)
    plan = _plan(model, None)
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj is 32×32, and this llama config's q "
                                          r"projection is 4096×4096"):
        estimate_memory(LLAMA2_7B, rank_plan_or_rank=plan)
    moved = _plan(model, tmp_path / "gone")  # the recorded base is no longer there
    with pytest.raises(ConfigError, match="is 32×32"):
        estimate_memory(LLAMA2_7B, rank_plan_or_rank=moved)
    one_layer = TINY_LLAMA | {"model_type": "llama", "num_hidden_layers": 1}
    beyond = RankPlan((plan.modules[0], dataclasses.replace(plan.modules[1], layer=1,
                                                            name="model.layers.1.mlp.down_proj")))
    with pytest.raises(ConfigError, match="model.layers.1.mlp.down_proj is in layer 1, and this llama config has 1 "
                                          "layers"):
        estimate_memory(one_layer, rank_plan_or_rank=beyond)
    assert estimate_memory(TINY_LLAMA | {"model_type": "llama"}, rank_plan_or_rank=plan).trainable_params == (
        _peft_trainable(model, plan))


# -------------------------------------------------------------------------------- M2, L12: rank, batch, seq_len < 1


@pytest.mark.parametrize("rank", [0, -4, True, 2.5, None])
def test_a_rank_below_one_is_refused_naming_the_option(rank):
    with pytest.raises(ConfigError, match=r"rank_plan_or_rank \(--rank\) must be a positive integer"):
        estimate_memory(LLAMA2_7B, rank_plan_or_rank=rank)
    assert estimate_memory(LLAMA2_7B, method="full", rank_plan_or_rank=None).trainable_params > 0  # full takes none


@pytest.mark.parametrize("option, flag", [("batch", "--batch"), ("seq_len", "--seq-len")])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_batch_and_seq_len_below_one_are_refused_naming_the_option(option, flag, value):
    with pytest.raises(ConfigError, match=rf"{option} \({flag}\) must be a positive integer, got {value!r}"):
        estimate_memory(LLAMA2_7B, **{option: value})
    assert estimate_memory(LLAMA2_7B, **{option: 1}).training_total > 0


# -------------------------------------------------------------------------------- M3: roles, as train checks them


@pytest.mark.parametrize("roles", [("q", "vv"), ("embed", "q"), ("q", "Q")])
def test_roles_train_refuses_are_refused_with_trains_message(roles):
    from spectra.lora.train import TrainConfig

    with pytest.raises(ConfigError) as train_error:
        TrainConfig(roles=roles)
    with pytest.raises(ConfigError) as memory_error:
        estimate_memory(LLAMA2_7B, roles=roles)
    assert str(memory_error.value) == str(train_error.value)
    good = estimate_memory(LLAMA2_7B, rank_plan_or_rank=8, roles=("q", "v"))  # negative control: the paper's q,v
    assert good.trainable_params == 32 * 2 * 8 * (4096 + 4096)


def test_roles_the_estimate_would_ignore_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="full fine-tuning trains every weight"):
        estimate_memory(LLAMA2_7B, method="full", roles=("q",))
    base, model = _llama_dir(tmp_path)
    with pytest.raises(ConfigError, match="a rank plan adapts the modules it names"):
        estimate_memory(base, rank_plan_or_rank=_plan(model, base), roles=("q",))


# -------------------------------------------------------------------------------- M4: the model's positions


def test_the_default_sequence_is_cut_to_a_learned_position_table_and_longer_ones_are_refused():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # the reference: GPT-2 runs 32 tokens and cannot run 33
        model(torch.zeros(1, 32, dtype=torch.long))
        with pytest.raises(IndexError):
            model(torch.zeros(1, 33, dtype=torch.long))
    est = estimate_memory(config)
    assert est.seq_len == 32 and dataclasses.replace(est, notes=()) == estimate_memory(config, seq_len=32)
    assert any("32 tokens per sequence, not the default 2048" in n and "n_positions = 32" in n for n in est.notes)
    assert not estimate_memory(config, seq_len=32).notes
    with pytest.raises(ConfigError, match=r"seq_len \(--seq-len\) 33 is more than the model can take: .* covers 32 "
                                          r"tokens \(n_positions = 32"):
        estimate_memory(config, seq_len=33)
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=64)
    assert estimate_memory(bert).seq_len == 512  # max_position_embeddings
    with pytest.raises(ConfigError, match="covers 512 tokens"):
        estimate_memory(bert, seq_len=1024)


def test_rotary_positions_keep_a_longer_sequence_with_a_note():
    est = estimate_memory(LLAMA2_7B, seq_len=8192)  # max_position_embeddings 4096, rotary: it runs, untrained
    assert est.seq_len == 8192 and any("beyond the 4096 positions" in n and "rotary" in n for n in est.notes)
    default = estimate_memory(LLAMA2_7B)
    assert default.seq_len == 2048 and not default.notes  # 2048 fits: no note
    limitless = {k: v for k, v in LLAMA2_7B.items() if k != "max_position_embeddings"}
    assert estimate_memory(limitless, seq_len=100_000).seq_len == 100_000


# -------------------------------------------------------------------------------- L10: QLoRA's 64-wide blocks


def test_qlora_on_layers_narrower_than_64_inputs_says_train_refuses_it():
    from spectra.lora.train import _check_4bit_widths

    narrow = TINY_LLAMA | {"model_type": "llama"}
    est = estimate_memory(narrow, method="qlora", rank_plan_or_rank=2)
    assert any("`spectra train` refuses this model" in n and "32 input features" in n for n in est.notes)
    wide = narrow | {"hidden_size": 64, "intermediate_size": 128}
    assert not any("refuses" in n for n in estimate_memory(wide, method="qlora", rank_plan_or_rank=2).notes)
    assert not any("refuses" in n for n in estimate_memory(narrow, method="lora", rank_plan_or_rank=2).notes)
    # the same rule as train's on a loaded 4-bit model: it refuses the narrow model, not the wide one
    bnb = pytest.importorskip("bitsandbytes")
    for config, refused in ((narrow, True), (wide, False)):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        layer = model.model.layers[0].self_attn.o_proj
        model.model.layers[0].self_attn.o_proj = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False)
        if refused:
            with pytest.raises(ConfigError, match="32 input features"):
                _check_4bit_widths(model, "tiny")
        else:
            _check_4bit_widths(model, "tiny")
