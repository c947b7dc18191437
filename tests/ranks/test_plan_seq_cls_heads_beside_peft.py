"""A classifier head PEFT's SEQ_CLS names miss (BART's classification_head, DeBERTa-v2's pooler) is counted by the
plan and saved by its peft_config, as spectra train saves it: plan total == get_peft_model's trainable count."""

from __future__ import annotations

import pytest

from spectra.ranks.plan import ModuleRank, RankPlan, task_modules
from tests.lora.test_train_head_modules import _classifier, _wrapped

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.mark.parametrize(("family", "target", "head"), [
    ("bart", "model.encoder.layers.0.self_attn.q_proj", {"classification_head"}),
    ("deberta-v2", "deberta.encoder.layer.0.attention.output.dense", {"pooler", "classifier"}),
    ("roberta", "roberta.encoder.layer.0.attention.self.query", {"classifier"}),  # control: PEFT's own name
])
def test_plan_counts_and_saves_the_head_train_saves(family, target, head):
    from peft import LoraConfig, get_peft_model

    from spectra.checkpoints.targets import meta_model

    model = _classifier(family)
    meta = meta_model(model.config.to_dict() | {"architectures": [type(model).__name__]})
    saved = task_modules(meta, "SEQ_CLS")
    assert {m.name for m in saved} == head
    assert sum(m.params for m in saved) == sum(p.numel() for n, p in model.named_parameters()
                                               if n.split(".")[0] in head)
    plan = RankPlan(modules=(ModuleRank(target, "q", 0, (32, 32), 2, 4.0, 1.0, 1.0, 128, "energy"),),
                    modules_to_save=saved)
    config = plan.to_peft_config(model=model, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    assert _wrapped(peft_model) == head
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == plan.total_params
