"""An empty roles selection means every block role, to spectra train and spectra memory alike (it was every role
to train's target selection, a refusal to train's DoRA/QLoRA fitting and to memory: "no linear layer has a role in
()"). PEFT's own count of trainable parameters is the reference for the estimate."""

from __future__ import annotations

import copy

import pytest

from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, lora_config, peft_targets
from spectra.memory import estimate_memory
from tests.models import build_model, peft_wrapped, tiny_config, tiny_moe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_train_reads_empty_roles_as_none():
    assert TrainConfig(roles=()).roles is None and TrainConfig(roles=[]).roles is None
    assert TrainConfig(roles=["q", "v"]).roles == ("q", "v")  # negative control: a selection stays one
    TrainConfig(method="full", roles=())  # no role asked: nothing for full fine-tuning to ignore
    with pytest.raises(ConfigError, match=r"method full \(--full\) trains every weight, so --roles would be ignored"):
        TrainConfig(method="full", roles=("q",))
    with pytest.raises(ConfigError, match=r"roles \['q_proj'\]: LoRA targets the block linears q, k, v, o"):
        TrainConfig(roles=("q_proj",))


def test_dora_on_an_moe_with_empty_roles_is_the_default_not_a_refusal():
    """The experts' fused parameters take no DoRA: the default roles leave them out with a note; () was refused."""
    model = tiny_moe("mixtral")
    default_notes, empty_notes = [], []
    default = peft_targets(model, TrainConfig(method="dora", rank=2), notes=default_notes)
    assert peft_targets(model, TrainConfig(method="dora", rank=2, roles=()), notes=empty_notes) == default
    assert empty_notes == default_notes and any("are not adapted" in n for n in default_notes)
    with pytest.raises(ConfigError, match="takes no DoRA"):  # negative control: roles that ask for the experts
        peft_targets(model, TrainConfig(method="dora", rank=2, roles=("up",)))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_memory_estimates_empty_roles_as_every_block_linear_as_peft_counts_them(method):
    from peft import get_peft_model

    model = build_model("llama")
    config = lora_config(model, TrainConfig(method=method, rank=2, roles=()), task="causal_lm")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert len(peft_wrapped(peft_model)) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    llama = tiny_config("llama").to_dict()
    empty = estimate_memory(llama, method=method, rank_plan_or_rank=2, roles=())
    assert empty.trainable_params == trained == estimate_memory(llama, method=method, rank_plan_or_rank=2).trainable_params
    assert estimate_memory(llama, method="full", rank_plan_or_rank=None, roles=()).method == "full"
    with pytest.raises(ConfigError, match="full fine-tuning trains every weight"):  # negative control
        estimate_memory(llama, method="full", rank_plan_or_rank=None, roles=("q",))
