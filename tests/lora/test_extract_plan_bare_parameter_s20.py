"""extract with a plan that names a parameter of its own, no layer's weight (a plan written before recommend left a
ViT's position table out), is refused naming the plan's name, the tensor and its shape in recommend's words
(``checkpoints.names.bare_parameters_why``), before any work. Before, it said "…: not module(s) of ViTModel that PEFT
can adapt (transformers names, fuses or wraps these weights otherwise …)", which is not why.
Negative control: the plan without the table extracts, and PEFT's merge gives the query back."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from spectra.analysis import analyze
from spectra.checkpoints.names import bare_parameters_why
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.ranks import RankPolicy, recommend_ranks
from spectra.ranks.plan import ModuleRank
from tests.models import planted_vit_pair

TABLE = "embeddings.position_embeddings"


def test_a_plan_naming_the_table_is_refused_in_recommends_words(tmp_path):
    import transformers as tf
    from peft import PeftModel

    base, tuned = planted_vit_pair(tmp_path / "vit", cls_token=False, weights=("layers.0.attention.q_proj.weight",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(base, tuned, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, roles=("q",)))
    table = ModuleRank(name=TABLE, role="pos_embed", layer=None, shape=(17, 32), rank=3, alpha=6.0, energy=1.0,
                       energy_upper=1.0, params=3 * 49, reason="energy")
    old = dataclasses.replace(plan, modules=(*plan.modules, table))
    with pytest.raises(ConfigError) as refused:
        extract_adapter(base, tuned, old, tmp_path / "ad", progress=False)
    assert str(refused.value).startswith(f"The plan names {TABLE} (a 1×17×32 tensor) of the base {base}: it is "
                                         f"{bare_parameters_why(1)}. ")
    assert "copy it from TUNED" in str(refused.value) and not (tmp_path / "ad").exists()
    extract_adapter(base, tuned, plan, tmp_path / "ad", progress=False)  # the control
    merged = PeftModel.from_pretrained(tf.ViTModel.from_pretrained(base), tmp_path / "ad").merge_and_unload()
    want = tf.ViTModel.from_pretrained(tuned).state_dict()
    name = next(n for n in merged.state_dict() if n.endswith("q_proj.weight"))
    assert torch.allclose(merged.state_dict()[name], want[name], atol=1e-5)
    assert not torch.allclose(tf.ViTModel.from_pretrained(base).state_dict()[name], want[name], atol=1e-5)
