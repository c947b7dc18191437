"""recommend's default plan leaves the embedding tables looked up by position or segment out (role pos_embed, with the
embeddings' reason "embeddings/heads are targeted only when named in roles"), and ``--roles pos_embed`` plans them.

What was wrong (audit F2): GPT-2's wpe, BERT's position_embeddings and token_type_embeddings, BART's and OPT's
embed_positions and T5's relative_attention_bias had role other, so the default plan held them (PEFT wrapped wpe as an
Embedding LoRA) and, under --budget 2000 on GPT-2, wpe took rank 4 (256 of 1,952 parameters). The referee of what a
plan adapts is PEFT's own get_peft_model on the plan's peft_config; the tables are the model's nn.Embedding modules.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from spectra.analysis import analyze
from spectra.checkpoints import architectures
from spectra.ranks import RankPolicy, recommend_ranks
from tests.checkpoints.test_position_embedding_roles import FAMILIES, TABLES, _rules_before, tiny_model
from tests.models import moved, peft_wrapped, save


def _fine_tune(family: str, root):
    """(family, base model, analysis of base × a fine-tune that moved every parameter, the pair's folders)."""
    base = tiny_model(family)
    b, t = save(base, root / "b", "safetensors"), save(moved(base, seed=1), root / "t", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return family, base, analyze(b, t, cache_dir=False, progress=False), (b, t)


@pytest.fixture(scope="module", params=FAMILIES)
def fine_tune(request, tmp_path_factory):
    return _fine_tune(request.param, tmp_path_factory.mktemp(request.param))


def _peft_targets(model, plan) -> set[str]:
    """The modules PEFT puts a LoRA on for the plan's peft_config, each at the plan's rank."""
    from peft import LoraConfig, get_peft_model

    config = plan.to_peft_config(model=model, task_type=None)
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft_wrapped(get_peft_model(copy.deepcopy(model), LoraConfig(**fields)))
    ranks = {m.name: m.rank for m in plan.modules}
    assert {name: layer.r["default"] for name, layer in wrapped.items()} == ranks
    return set(wrapped)


def _linears(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def _embeddings(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}


def test_the_default_plan_leaves_every_table_out(fine_tune):
    family, model, result, _ = fine_tune
    plan = recommend_ranks(result, RankPolicy())
    planned, left = {m.name for m in plan.modules}, {m.name: m.reason for m in plan.left_out}
    assert TABLES[family] <= set(left) and not planned & _embeddings(model)
    for name in TABLES[family]:
        assert left[name] == "role 'pos_embed' (embeddings/heads are targeted only when named in roles)"
    # the plan: every Linear (GPT-2's Conv1D) but the head, as PEFT's all-linear would pick them
    assert planned == _linears(model) - {"lm_head", "classifier"}
    assert _peft_targets(model, plan) == planned  # PEFT adapts the plan: no Embedding LoRA


def test_roles_pos_embed_plans_the_tables(fine_tune):
    family, model, result, _ = fine_tune
    plan = recommend_ranks(result, RankPolicy(roles=("pos_embed",)))
    assert {m.name for m in plan.modules} == TABLES[family] and all(m.role == "pos_embed" for m in plan.modules)
    assert _peft_targets(model, plan) == TABLES[family]  # PEFT wraps each as an Embedding LoRA at its planned rank
    assert all(isinstance(dict(model.named_modules())[n], torch.nn.Embedding) for n in TABLES[family])


def test_roles_embed_plans_the_token_embedding_alone(fine_tune):
    """Negative control: --roles embed plans what it planned before, the vocabulary's table (T5's and BART's
    shared, stored once), no position table."""
    family, model, result, _ = fine_tune
    plan = recommend_ranks(result, RankPolicy(roles=("embed",)))
    vocabulary = {n for n, m in model.named_modules() if m is model.get_input_embeddings()}
    assert {m.name for m in plan.modules} == vocabulary


def test_a_gpt2_budget_goes_to_its_blocks_not_to_wpe(tmp_path, monkeypatch):
    """The audit's case: --budget 2000 on GPT-2. wpe is left out and the budget holds; negative control: the rules as
    they were give wpe role other, and the budget plan holds it again (as the audit saw)."""
    _, _, result, pair = _fine_tune("gpt2", tmp_path)
    plan = recommend_ranks(result, RankPolicy(budget_params=2000))
    assert "transformer.wpe" not in {m.name for m in plan.modules} and plan.total_params <= 2000
    monkeypatch.setattr(architectures, "_ROLE_REGEXES", _rules_before())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = analyze(*pair, cache_dir=False, progress=False)
    old = recommend_ranks(before, RankPolicy(budget_params=2000))
    assert "transformer.wpe" in {m.name for m in old.modules}
