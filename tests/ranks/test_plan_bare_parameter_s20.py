"""A plan that names a parameter of its own, no layer's weight (a ViT's position table, Gemma 3's
``mm_input_projection_weight``), applied to a model (``RankPlan.to_peft_config(model=…)``: ``spectra train``,
``save_plan``), is refused naming the plan's name, the model's tensor and its shape, in the words recommend's refusal
uses (``checkpoints.names.bare_parameters_why``). Before, it said "a parameter of ViTModel that is no layer's weight:
PEFT puts a LoRA … not there", a wording of its own, and named neither the tensor under a prefix nor its shape.

The referee of "PEFT cannot adapt it" is PEFT's own get_peft_model on transformers' models built from config: it
refuses the table as a target module. Negative control: the plan without it gives a config PEFT applies."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from spectra.checkpoints.names import bare_parameters_why
from spectra.errors import ConfigError
from spectra.ranks.plan import ModuleRank, RankPlan
from spectra.ranks.policy import RankPolicy

TABLE = "embeddings.position_embeddings"
Q = "encoder.layer.0.attention.attention.query"


def _vit(cls: str = "ViTModel"):
    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                          image_size=32, patch_size=8)
    torch.manual_seed(0)
    return getattr(tf, cls)(config)


def _module(name: str, shape, role: str) -> ModuleRank:
    return ModuleRank(name=name, role=role, layer=None, shape=shape, rank=2, alpha=4.0, energy=1.0, energy_upper=1.0,
                      params=2 * sum(shape), reason="energy")


def _plan(*modules) -> RankPlan:
    return RankPlan(modules=tuple(modules), policy=RankPolicy(rank=2, noise=False))


@pytest.mark.parametrize(("cls", "tensor"), [("ViTModel", TABLE),
                                             ("ViTForImageClassification", f"vit.{TABLE}")])
def test_a_plan_naming_the_vit_table_is_refused_naming_the_tensor_in_recommends_words(cls, tensor):
    from peft import LoraConfig, get_peft_model

    model = _vit(cls)
    assert tuple(model.get_parameter(tensor).shape) == (1, 17, 32)  # the table, stored (1, N, d)
    with pytest.raises(ValueError):  # the reference: PEFT has no module there to put a LoRA on
        get_peft_model(_vit(cls), LoraConfig(r=2, target_modules=[TABLE]))
    plan = _plan(_module(Q, (32, 32), "q"), _module(TABLE, (17, 32), "pos_embed"))
    with pytest.raises(ConfigError) as refused:
        plan.to_peft_config(model=model, task_type=None)
    message = str(refused.value)
    where = "(a 1×17×32 tensor)" if tensor == TABLE else f"(tensor {tensor}, 1×17×32)"
    assert message.startswith(f"The plan names {TABLE} {where} of {cls}: it is {bare_parameters_why(1)}. ")
    assert "Re-run spectra recommend, which leaves it out, or drop it from the plan; copy it from TUNED" in message
    # the negative control: the plan without it is a config PEFT applies, with its LoRA on the query
    fields = plan_without(plan, TABLE).to_peft_config(model=model, task_type=None)
    fields = {k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(_vit(cls), LoraConfig(**fields))
    assert any(n.endswith("q_proj.lora_A.default.weight") for n, _ in wrapped.named_parameters())


def plan_without(plan: RankPlan, name: str) -> RankPlan:
    return dataclasses.replace(plan, modules=tuple(m for m in plan.modules if m.name != name))


def test_gemma3s_projection_weight_is_named_with_its_prefix():
    from tests.models import build_model

    model = build_model("gemma3_multimodal")
    name = "multi_modal_projector.mm_input_projection_weight"
    plan = _plan(_module(name, (16, 32), "other"))
    with pytest.raises(ConfigError) as refused:
        plan.to_peft_config(model=model, task_type=None)
    assert str(refused.value).startswith(
        f"The plan names {name} (tensor model.{name}, 16×32) of Gemma3ForConditionalGeneration: it is "
        f"{bare_parameters_why(1)}.")
