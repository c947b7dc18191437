"""A classifier's plan counts the head PEFT trains in full: its total is what ``get_peft_model`` trains.

For ``SEQ_CLS`` (and ``TOKEN_CLS``, ``QUESTION_ANS``) PEFT adds the head (``classifier``/``score``, ``qa_outputs``) to
``modules_to_save`` by itself and trains a copy of it whole. The reference is PEFT: ``get_peft_model`` on tiny
transformers models built from config, with the plan's own ``peft_config``, counting every parameter that requires
grad. The negative control is a causal LM, whose plan holds no such module and whose file is as before.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from spectra.errors import ConfigError
from spectra.ranks import RankPolicy, load_plan, recommend_ranks, save_plan
from tests.models import build_model, flat_update, on_grid, save, tiny_config


def _roberta_config():
    import transformers as tf

    return tf.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, num_labels=3)


def _model(family: str):
    import transformers as tf

    if family == "roberta":
        return on_grid(tf.RobertaForSequenceClassification, _roberta_config())
    return build_model(family)  # bert: BertForSequenceClassification; llama: LlamaForCausalLM


_PLANTED = {  # parameter (without the model's prefix) -> planted rank
    "roberta": {"encoder.layer.0.attention.self.query.weight": 3, "encoder.layer.1.attention.self.value.weight": 2,
                "encoder.layer.1.output.dense.weight": 4},
    "bert": {"encoder.layer.0.attention.self.query.weight": 3, "encoder.layer.1.attention.self.value.weight": 2,
             "encoder.layer.1.output.dense.weight": 4},
    "llama": {"layers.0.self_attn.q_proj.weight": 3, "layers.1.self_attn.v_proj.weight": 2,
              "layers.1.mlp.down_proj.weight": 4},
}


def planted_pair(family: str, root, *, head: bool = True):
    """(base folder, tuned folder) of a tiny `family` model whose tuned copy has the planted ranks of ``_PLANTED``
    (and, with `head`, its classifier moved too: a fine-tuned classifier's always does)."""
    base = _model(family)
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (suffix, rank) in enumerate(_PLANTED[family].items()):
            name = next(n for n in params if n.endswith(suffix))
            params[name] += flat_update(tuple(params[name].shape), rank, seed=i).float()
        for name, p in params.items() if head else ():
            if name.startswith("classifier.") and p.ndim == 2:
                p += flat_update(tuple(p.shape), 2, seed=50).float()
    return save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")


def relabelled_pair(family: str, root, *, tuned_labels: int, base_labels: int = 2):
    """(base folder, tuned folder) of a tiny `family` sequence classifier (BERT's ``classifier``, Llama's ``score``)
    of `base_labels` classes fine-tuned into `tuned_labels`: TUNED's body is the base's with the planted ranks of
    ``_PLANTED``, its head a new one of its own classes (where the counts differ, the pairing sets both aside)."""
    import transformers as tf

    cls = tf.BertForSequenceClassification if family == "bert" else tf.LlamaForSequenceClassification
    base_config, tuned_config = tiny_config(family), tiny_config(family)
    base_config.num_labels, tuned_config.num_labels = base_labels, tuned_labels
    base, tuned = on_grid(cls, base_config), on_grid(cls, tuned_config, seed=1)
    tuned.load_state_dict({n: t for n, t in base.state_dict().items() if not n.startswith(("classifier.", "score."))},
                          strict=False)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (suffix, rank) in enumerate(_PLANTED[family].items()):
            name = next(n for n in params if n.endswith(suffix))
            params[name] += flat_update(tuple(params[name].shape), rank, seed=i).float()
    return save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")


@pytest.fixture(scope="module", params=["roberta", "bert", "llama"])
def pair(request, tmp_path_factory):
    """(family, base folder, analysis) of a tiny model whose tuned copy has planted ranks, and its head moved too."""
    from spectra.analysis import analyze

    family = request.param
    base_dir, tuned_dir = planted_pair(family, tmp_path_factory.mktemp(f"heads_{family}"))
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    return family, base_dir, result


def _peft_trainable(family: str, config: dict) -> int:
    """What get_peft_model trains with ``config`` (the plan's peft_config) on a fresh model of ``family``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(family), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _head_params(family: str) -> int:
    model = _model(family)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))


@pytest.mark.parametrize("budget", [None, "tight"])
def test_plan_total_is_what_peft_trains(pair, tmp_path, budget):
    family, _, result = pair
    head = _head_params(family)
    lora_only = recommend_ranks(result, RankPolicy(energy=0.99))
    budget_params = None
    if budget == "tight":  # binding: the head plus about half of what the unconstrained LoRA ranks cost
        budget_params = head + (lora_only.total_params - lora_only.saved_params) // 2
    plan = recommend_ranks(result, RankPolicy(energy=0.99 if budget is None else None, budget_params=budget_params))
    saved = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())
    trained = _peft_trainable(family, saved["peft_config"])
    assert saved["totals"]["params"] == plan.total_params == trained  # PEFT 2.4× the plan for RoBERTa before
    assert saved["peft_config_notes"] == []
    if family == "llama":  # negative control: no head trained in full, no new key in the file
        assert plan.modules_to_save == () and "modules_to_save" not in saved and saved["peft_config"]["task_type"] \
            == "CAUSAL_LM"
        assert trained == sum(m.params for m in plan.modules)
    else:
        assert saved["peft_config"]["task_type"] == "SEQ_CLS"
        assert saved["modules_to_save"] == [{"name": "classifier", "params": head, "task_type": "SEQ_CLS"}]
        assert plan.saved_params == head and trained == sum(m.params for m in plan.modules) + head
        assert load_plan(tmp_path / "plan.json").modules_to_save == plan.modules_to_save  # read back
        head_rows = [m for m in plan.left_out if m.name.startswith("classifier")]  # left out by role, trained whole
        assert head_rows and all(m.reason.startswith("role 'head'") and m.reason.endswith(
            "; in classifier, which PEFT trains in full for task_type SEQ_CLS (modules_to_save)") for m in head_rows)
    if budget_params is not None:
        assert plan.budget_gap is not None and trained <= budget_params
        assert any(m.reason == "budget" for m in plan.modules)  # the budget bound


def test_budget_below_the_head_is_refused_naming_both(pair):
    family, _, result = pair
    if family == "llama":
        pytest.skip("no head trained in full")
    head = _head_params(family)
    with pytest.raises(ConfigError, match=rf"RankPolicy\.budget, {head - 1:,} parameters.*classifier.*SEQ_CLS "
                                          rf"\({head:,} parameters"):
        recommend_ranks(result, RankPolicy(energy=None, budget_params=head - 1))
    with pytest.raises(ConfigError, match=f"below the cheapest plan .*{head:,} the head PEFT trains in full"):
        recommend_ranks(result, RankPolicy(energy=None, budget_params=head + 1))  # covers the head, not rank 1
    # a byte budget: the head's parameters at 8 bytes, the LoRA's at 16, each counted as such, and the cheapest plan
    # in bytes too (it said "(174 parameters at 16 bytes each)" of 2,000 bytes: 2,784 bytes at 16 each)
    lora = 13
    budget_bytes = 8 * head + 16 * lora + 7  # 7 bytes short of one more LoRA parameter
    with pytest.raises(ConfigError) as refused:
        recommend_ranks(result, RankPolicy(energy=None, budget_bytes=budget_bytes))
    message = str(refused.value)
    assert (f"Budget of {budget_bytes:,} bytes ({head:,} saved parameters at 8 bytes each and {lora} LoRA "
            f"parameters at 16 bytes each)") in message, message
    cheapest = int(re.search(r"cheapest plan \(([\d,]+) parameters, ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert f"{cheapest:,} parameters, {8 * head + 16 * (cheapest - head):,} bytes" in message


def test_a_targeted_module_in_the_head_is_left_out(pair, tmp_path):
    """roles=…,head on a classifier: PEFT puts no LoRA inside the head it trains whole; the plan says so."""
    family, _, result = pair
    if family == "llama":
        pytest.skip("no head trained in full")
    plan = recommend_ranks(result, RankPolicy(energy=0.99, roles=("q", "v", "down", "head")))
    names = [m.name for m in plan.modules]
    head = lambda name: name == "classifier" or name.startswith("classifier.")  # noqa: E731 - BERT's, RoBERTa's
    assert not any(head(n) for n in names)
    reasons = {m.name: m.reason for m in plan.left_out if head(m.name)}
    assert reasons and all("PEFT trains in full for task_type SEQ_CLS" in r for r in reasons.values())
    saved = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())
    assert saved["totals"]["params"] == _peft_trainable(family, saved["peft_config"])


_CLASSES = [  # class, its config, a module for LoRA; the heads PEFT saves are read off PEFT's own wrapping
    ("RobertaForSequenceClassification", "roberta", "query"),
    ("BertForSequenceClassification", "bert", "query"),
    ("BertForTokenClassification", "bert", "query"),
    ("BertForQuestionAnswering", "bert", "query"),
    ("DistilBertForSequenceClassification", "distilbert", "q_lin"),  # pre_classifier ends with "classifier" too
    ("LlamaForSequenceClassification", "llama", "q_proj"),  # score
    ("LlamaForCausalLM", "llama", "q_proj"),
    ("BertModel", "bert", "query"),
]


@pytest.mark.parametrize(("cls", "family", "target"), _CLASSES)
def test_task_modules_are_those_peft_wraps(cls, family, target):
    """task_modules on the class built on the meta device == the ModulesToSaveWrapper's PEFT puts on a real one, and
    their parameters == what PEFT trains beyond LoRA."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    from spectra.checkpoints.targets import meta_model, peft_task_type
    from spectra.ranks.plan import task_modules

    config = (tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                  max_position_embeddings=40) if family == "distilbert" else
              _roberta_config() if family == "roberta" else build_model(family).config)
    config.architectures = [cls]
    config.pad_token_id = 0
    data = config.to_dict()
    task = peft_task_type(data)
    found = task_modules(meta_model(data), task)
    model = getattr(tf, cls)(config)
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=[target], task_type=task))
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
               if isinstance(m, ModulesToSaveWrapper)}
    assert sorted(m.name for m in found) == sorted(wrapped)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trained - lora == sum(m.params for m in found)
    if cls in ("LlamaForCausalLM", "BertModel"):
        assert found == ()


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("tuned_labels", [3, 2])  # 2: the negative control, the base config's own count
def test_a_head_fine_tuned_into_other_classes_is_counted_with_tuneds(family, tuned_labels, tmp_path):
    """A classifier of 2 classes fine-tuned into 3: the head PEFT trains and saves is TUNED's, (3, hidden), on the
    model built with ``num_labels=3``. The plan, its file and its total count that head, not the base config's 2
    classes (66 parameters of BERT's classifier before, 99 now). The reference is PEFT on that model, loaded as a
    user loads it (``from_pretrained(BASE, num_labels=3, ignore_mismatched_sizes=True)``)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from spectra.analysis import analyze
    from spectra.ranks.plan import SavedModule

    base_dir, tuned_dir = relabelled_pair(family, tmp_path, tuned_labels=tuned_labels)
    result = analyze(str(base_dir), str(tuned_dir), cache_dir=False, progress=False)
    name = "classifier" if family == "bert" else "score"
    assert (f"{name}.weight" in result.pairing["only_in_tuned"]) == (tuned_labels != 2)  # the head set aside
    head = 32 * tuned_labels + (tuned_labels if family == "bert" else 0)  # hidden × labels (+ labels: BERT's bias)

    plan = recommend_ranks(result, RankPolicy(energy=0.99))
    assert plan.modules_to_save == (SavedModule(name, head, "SEQ_CLS"),)
    assert plan.num_labels == (3 if tuned_labels == 3 else None)
    assert plan.total_params == sum(m.params for m in plan.modules) + head
    saved = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())
    assert saved["peft_config_notes"] == []  # the file's check counts the head as the plan does
    assert saved["modules_to_save"] == [{"name": name, "params": head, "task_type": "SEQ_CLS"}]
    assert saved.get("num_labels") == plan.num_labels  # no key where the counts agree: other plans' files unchanged
    read = load_plan(tmp_path / "plan.json")
    assert (read.modules_to_save, read.num_labels) == (plan.modules_to_save, plan.num_labels)

    cls = tf.BertForSequenceClassification if family == "bert" else tf.LlamaForSequenceClassification
    model = cls.from_pretrained(base_dir, num_labels=tuned_labels, ignore_mismatched_sizes=True)
    peft_model = get_peft_model(model, LoraConfig(**{k: v for k, v in saved["peft_config"].items()
                                                     if k != "peft_type"}))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == plan.total_params


def test_tuned_labels_reads_tuneds_classes_only_where_they_differ():
    """TUNED's count as :func:`~spectra.checkpoints.targets.configured_labels` reads it (``id2label`` before
    ``num_labels``), for a class of the base's task type alone."""
    from spectra.ranks.plan import tuned_labels

    base = {"architectures": ["BertForSequenceClassification"], "num_labels": 2}
    labels = {str(i): f"c{i}" for i in range(66)}
    assert tuned_labels(base, base | {"id2label": labels, "num_labels": 2}) == 66  # id2label decides
    assert tuned_labels(base | {"id2label": labels}, base | {"num_labels": 99}) == 99
    assert tuned_labels(base, base | {"num_labels": 2}) is None  # the same count
    assert tuned_labels(base, None) is None  # TUNED's config unknown (a hub id, an adapter folder)
    assert tuned_labels(base, {"architectures": ["BertModel"], "num_labels": 3}) is None  # no head in TUNED
    causal = {"architectures": ["LlamaForCausalLM"]}
    assert tuned_labels(causal, causal | {"num_labels": 3}) is None  # no head PEFT trains in full
