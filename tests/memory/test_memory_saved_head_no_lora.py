"""No LoRA inside a module PEFT trains and saves in full, in ``spectra train`` and ``spectra memory`` alike.

BART's ``classification_head`` holds ``out_proj``, of role o, so the default roles made it a LoRA target while train
also saves the whole head (modules_to_save). PEFT wraps no LoRA inside a module it saves: the target trained nothing
and sat in the adapter's config all the same. Train now drops it with a note naming it, as ``spectra extract`` puts
no LoRA inside a module it saves whole, and memory drops a plan's module inside the saved head with the same note.
References: PEFT's own model (its LoRA layers, its trainable parameters), a training step on tiny BART and RoBERTa
classifiers built from config, and PEFT reloading the saved adapter.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from spectra.lora.train import TrainConfig, lora_config, wrap_model
from spectra.memory import estimate_memory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _bart():
    import transformers as tf

    from tests.models import tiny_config

    config = tiny_config("bart")
    config.num_labels = 3
    torch.manual_seed(0)
    return tf.BartForSequenceClassification(config)


def test_train_drops_the_lora_inside_barts_saved_head_and_trains(tmp_path):
    from peft import PeftModel

    notes = []
    config = lora_config(_bart(), TrainConfig(rank=2), task="seq_cls", notes=notes)
    assert "classification_head.out_proj" not in config.target_modules  # it had been a target (role o)
    assert any("model.encoder.layers.0.self_attn.out_proj" == t for t in config.target_modules)  # the blocks' o
    assert config.modules_to_save == ["classification_head"]
    assert any(n.startswith("no LoRA on classification_head.out_proj: it lies in classification_head") for n in notes)

    model = wrap_model(_bart(), TrainConfig(rank=2), task="seq_cls")
    lora = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    assert lora and not any("classification_head" in name for name in lora)  # PEFT's model: none in the head
    assert any("encoder.layers.0.self_attn.out_proj" in name for name in lora)  # negative control: blocks adapted
    head = {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and "classification_head" in n}
    assert head  # the head trains whole

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 10, 2]])  # each ends with BART's </s> (id 2), which it pools at
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, head[n]) for n, p in model.named_parameters() if n in head)  # the head moved

    model.save_pretrained(tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert not any(t.startswith("classification_head") for t in saved["target_modules"])
    reloaded = PeftModel.from_pretrained(_bart(), str(tmp_path / "ad"))
    assert not any("classification_head" in n and "lora_" in n for n, _ in reloaded.named_parameters())


def test_memory_drops_a_planned_module_inside_the_head_as_train_does(tmp_path):
    """A plan holding ``classifier.dense`` (inside the RoBERTa head PEFT saves): memory counts what PEFT and train
    train, the LoRA of the blocks and the head's copy, and notes the module it drops."""
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze
    from spectra.ranks import ModuleRank, RankPolicy, recommend_ranks, save_plan
    from tests.ranks.test_plan_task_heads import _model, planted_pair

    base_dir, tuned_dir = planted_pair("roberta", tmp_path, head=False)
    plan = recommend_ranks(analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False),
                           RankPolicy(energy=0.99))
    extra = ModuleRank(name="classifier.dense", role="head", layer=None, shape=(32, 32), rank=2, alpha=4.0,
                       energy=1.0, energy_upper=1.0, params=2 * 64, reason="energy")
    inside = dataclasses.replace(plan, modules=(*plan.modules, extra))
    path = save_plan(inside, tmp_path / "plan.json")
    config = json.loads((base_dir / "config.json").read_text())

    peft_config = json.loads(path.read_text())["peft_config"]
    assert "classifier.dense" in peft_config["target_modules"]
    peft_model = get_peft_model(_model("roberta"), LoraConfig(**{k: v for k, v in peft_config.items()
                                                                if k != "peft_type"}))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    notes = []
    train_model = wrap_model(_model("roberta"), TrainConfig(plan=str(path)), task="seq_cls", notes=notes)
    assert sum(p.numel() for p in train_model.parameters() if p.requires_grad) == trained

    est = estimate_memory(config, rank_plan_or_rank=inside, seq_len=16)
    assert est.trainable_params == trained == plan.total_params  # not the 128 of a LoRA PEFT never wraps
    assert est.adapter == estimate_memory(config, rank_plan_or_rank=plan, seq_len=16).adapter
    memory_note = next(n for n in est.notes if n.startswith("no LoRA on classifier.dense"))
    assert any(n.startswith("no LoRA on classifier.dense: it lies in classifier") for n in notes)
    assert "classifier" in memory_note
