"""recommend leaves a matrix that is a parameter of its own, no layer's weight, out of the plan, saying why: a ViT's
position table ``embeddings.position_embeddings`` (stored (1, N, d), measured as an N × d pos_embed matrix).

What was wrong (audit s19): ``spectra recommend --roles pos_embed`` on a ViT pair planned the table, and
``spectra extract --plan`` then refused the plan ("… has no weight for: embeddings.position_embeddings"): PEFT puts a
LoRA on a module's weight (Linear, Embedding, Conv) or, through target_parameters, on an expert tensor, not on a bare
parameter. The referee of what the plan adapts is PEFT's own ``PeftModel.from_pretrained`` and merge on transformers'
ViTModel built from config; the table's share of ‖ΔW‖_F² is checked against a float64 numpy sum of the saved tensors.
Negative control: GPT-2's ``wpe`` (an nn.Embedding's weight, which PEFT wraps) stays planned under --roles pos_embed.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from spectra.analysis import analyze
from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, recommend_ranks, save_plan
from tests.models import planted_vit_pair

TABLE = "embeddings.position_embeddings"
Q, V = "encoder.layer.0.attention.attention.query", "encoder.layer.0.attention.attention.value"


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    """A ViT and its fine-tune: a rank-3 change planted in the position table, rank-2 changes of layer 0's query and
    value (transformers names them q_proj/v_proj in the model, the checkpoint query/value)."""
    base, tuned = planted_vit_pair(tmp_path_factory.mktemp("vit"), cls_token=False,
                                   weights=("layers.0.attention.q_proj.weight", "layers.0.attention.v_proj.weight"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(base, tuned, cache_dir=False, progress=False)
    return base, tuned, analysis


def _stored(path) -> dict[str, np.ndarray]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}


def test_the_table_is_left_out_with_its_share_and_extract_takes_the_plan(vit_pair, tmp_path):
    import transformers as tf
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter

    base, tuned, analysis = vit_pair
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, roles=("pos_embed", "q", "v")))
    assert {m.name for m in plan.modules} == {Q, V}
    assert all(m.rank == 2 for m in plan.modules)  # the planted ranks
    (table,) = [m for m in plan.left_out if m.name == TABLE]
    assert "no layer's weight" in table.reason and "copy it from TUNED" in table.reason
    # its share of the whole update's ‖ΔW‖_F²: every changed matrix of the checkpoint, in float64 from the files
    b, t = _stored(base), _stored(tuned)
    delta2 = {k: float(np.sum((t[k] - b[k]) ** 2)) for k in b if b[k].ndim >= 2 or k == TABLE}
    share = delta2[TABLE] / sum(delta2.values())
    assert 0.05 < share < 0.95
    assert f"it holds {share:.1%} of the whole update's" in table.reason
    assert table.rank == 3  # the energy target's rank, as for any module left out
    # coverage counts the table in the whole update: the planned q and v hold the rest
    assert plan.coverage == pytest.approx(1 - share, rel=1e-6)

    path = save_plan(plan, tmp_path / "plan.json")
    assert TABLE not in json.dumps(json.loads(path.read_text())["peft_config"])
    result = extract_adapter(base, tuned, path, tmp_path / "ad", progress=False)  # refused before the fix
    assert {m.name for m in result.modules} == {"layers.0.attention.q_proj", "layers.0.attention.v_proj"}  # model's
    assert any(TABLE in n and "copy it from TUNED" in n for n in result.notes)
    merged = PeftModel.from_pretrained(tf.ViTModel.from_pretrained(base), tmp_path / "ad").merge_and_unload()
    want = tf.ViTModel.from_pretrained(tuned).state_dict()
    off = {n for n, v in merged.state_dict().items() if not torch.allclose(v, want[n], atol=1e-5)}
    assert off == {TABLE}  # PEFT's merge gives the fine-tune but for the table, which the notes say to copy


def test_a_plan_of_the_table_alone_is_refused_naming_it(vit_pair):
    _, _, analysis = vit_pair
    with pytest.raises(ConfigError, match=rf"{TABLE} \(pos_embed\) is a parameter of its own.*copy it from TUNED"):
        recommend_ranks(analysis, RankPolicy(energy=0.99, roles=("pos_embed",)))


def test_an_old_plan_naming_the_table_gets_a_peft_config_error_saying_why(vit_pair, tmp_path):
    """A plan written before the fix (the table among its modules): its peft_config for the model (save_plan's, from
    the config beside the base) says what the table is and what to do, not only that the model has no weight for it."""
    import dataclasses

    from spectra.ranks.plan import ModuleRank

    _, _, analysis = vit_pair
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, roles=("q",)))
    table = ModuleRank(name=TABLE, role="pos_embed", layer=None, shape=(17, 32), rank=3, alpha=16.0, energy=1.0,
                       energy_upper=1.0, params=3 * 49, reason="energy")
    old = dataclasses.replace(plan, modules=(*plan.modules, table),
                              left_out=tuple(m for m in plan.left_out if m.name != TABLE))
    with pytest.raises(ConfigError, match=rf"The plan names {TABLE} \(a 1×17×32 tensor\) of ViTModel: it is a "
                                          r"parameter of its own, no layer's weight.*copy it"):
        save_plan(old, tmp_path / "plan.json")
    save_plan(plan, tmp_path / "plan.json")  # the control: the plan without it


def test_gpt2_wpe_an_embedding_weight_stays_planned(tmp_path):
    """Negative control: GPT-2's wpe is an nn.Embedding's weight, which PEFT wraps: --roles pos_embed plans it and
    PEFT puts a LoRA on it at the plan's rank."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=24, vocab_size=50)
    torch.manual_seed(0)
    model = tf.GPT2Model(config)
    model.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.wpe.weight.add_(torch.randn(24, 2, generator=gen) @ torch.randn(2, 32, generator=gen))
    model.save_pretrained(tmp_path / "tuned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(tmp_path / "base", tmp_path / "tuned", cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.99, roles=("pos_embed",)))
    assert [(m.name, m.rank) for m in plan.modules] == [("wpe", 2)]
    fields = {k: v for k, v in plan.to_peft_config(model=model, task_type=None).items() if k in LoraConfig.__dataclass_fields__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(tf.GPT2Model(config), LoraConfig(**fields))
    assert wrapped.base_model.model.wpe.r["default"] == 2
