"""spectra train saves a sequence classifier's head, exactly: the modules its class holds beside the base model.

``head_modules`` had passed leaf names (RoBERTa's ``['dense', 'out_proj']``) as ``modules_to_save``; PEFT matches those
as the end of a module's name, so every encoder ``….output.dense`` and ``intermediate.dense`` was trained in full too
(12,774 trainable parameters on the tiny RoBERTa below, whose head is 1,155), and BART's ``classification_head``
(``dense`` of role other, ``out_proj`` of role o) was neither trained nor saved. The reference is PEFT itself:
``get_peft_model`` with train's own ``LoraConfig`` on tiny transformers classifiers built from config, its
``ModulesToSaveWrapper``'s and its count of parameters that require grad, against head names written out here and
the head's parameters counted on the bare model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spectra.lora.train import TrainConfig, head_modules, lora_config
from tests.lora.conftest import classification_jsonl
from tests.models import flat_update, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=40, num_labels=3)


def _classifier(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**_SMALL))
    if family == "electra":
        return tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=32, **_SMALL))
    if family == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**_SMALL))
    if family == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**_SMALL))
    if family == "distilbert":
        return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40, num_labels=3))
    if family == "bart":
        return tf.BartForSequenceClassification(tf.BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
            num_labels=3))
    if family == "gpt2":
        return tf.GPT2ForSequenceClassification(tf.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=40, num_labels=3, pad_token_id=0,
            bos_token_id=1, eos_token_id=1))
    raise ValueError(family)


# the head each class holds beside its base model, written out; every encoder/decoder layer stays LoRA-only
_HEADS = {"roberta": {"classifier"}, "electra": {"classifier"}, "deberta-v2": {"pooler", "classifier"},
          "bert": {"classifier"}, "distilbert": {"pre_classifier", "classifier"}, "bart": {"classification_head"},
          "gpt2": {"score"}}


def _wrapped(peft_model) -> set[str]:
    from peft.utils.other import ModulesToSaveWrapper

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(m, ModulesToSaveWrapper)}


@pytest.mark.parametrize("roles", [("q", "v"), None])
@pytest.mark.parametrize("family", list(_HEADS))
def test_train_saves_exactly_the_head(family, roles):
    from peft import get_peft_model

    model = _classifier(family)
    head = _HEADS[family]
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in head)
    config = lora_config(model, TrainConfig(rank=2, roles=roles), task="seq_cls")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    assert _wrapped(peft_model) == head  # RoBERTa's had been 11 modules: the head's 2 parts, 3 of each layer's dense
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trained = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == lora + head_params  # RoBERTa (q, v at rank 8): 12,774 before, head 1,155
    assert all("lora_" in n or ".modules_to_save." in n for n in trained)
    assert lora > 0
    if roles is None:  # every block role: a head Linear of an attention-like name (BART's out_proj) gets no LoRA
        from tests.models import peft_wrapped

        adapted = peft_wrapped(peft_model)
        assert not any(n.split(".")[0] in head for n in adapted)


def test_the_head_is_found_on_the_meta_device_and_on_no_causal_lm():
    import transformers as tf

    from spectra.checkpoints.targets import meta_model

    roberta = _classifier("roberta")
    assert head_modules(meta_model(roberta.config.to_dict() | {"architectures": ["RobertaForSequenceClassification"]})) \
        == head_modules(roberta) == ["classifier"]
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=48))
    assert head_modules(llama) == ["lm_head"]  # beside its base, but train passes none for causal_lm:
    assert lora_config(llama, TrainConfig(rank=2, roles=("q",)), task="causal_lm").modules_to_save is None


def test_a_head_name_the_base_model_ends_with_too_is_left_out_with_a_note():
    """PEFT would train the base's module of that name in full as well: left out, and said."""
    model = _classifier("deberta-v2")
    model.deberta.encoder.pooler = torch.nn.Linear(2, 2)  # now deberta.encoder.pooler ends with "pooler" too
    notes = []
    assert head_modules(model, notes) == ["classifier"]
    assert len(notes) == 1 and "pooler" in notes[0] and "deberta.encoder.pooler" in notes[0]
    assert head_modules(_classifier("deberta-v2"), notes) == ["pooler", "classifier"] and len(notes) == 1
    model.deberta.encoder.classifier = torch.nn.Linear(2, 2)  # PEFT adds "classifier" itself: kept, no note
    assert head_modules(model, notes) == ["classifier"] and len(notes) == 2


def _planted_roberta(root):
    """A tiny RoBERTa classifier (base) and a tuned copy with planted ranks in q, v and an FFN output dense."""
    import transformers as tf

    base = on_grid(tf.RobertaForSequenceClassification, tf.RobertaConfig(**_SMALL))
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    planted = {"roberta.encoder.layer.0.attention.self.query.weight": 3,
               "roberta.encoder.layer.1.attention.self.value.weight": 2,
               "roberta.encoder.layer.1.output.dense.weight": 4, "classifier.dense.weight": 2}
    with torch.no_grad():
        for i, (name, rank) in enumerate(planted.items()):
            params[name] += flat_update(tuple(params[name].shape), rank, seed=i).float()
    return save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")


def test_train_on_a_roberta_plan_trains_the_plans_total(tmp_path, monkeypatch):
    """spectra train --plan on a RoBERTa classifier trains exactly the plan's totals.params (its LoRA and its head)."""
    import spectra.lora.train as train_module
    from spectra.analysis import analyze
    from typer.testing import CliRunner

    from spectra.cli import app
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan

    base, tuned = _planted_roberta(tmp_path)
    result = analyze(str(base), str(tuned), cache_dir=False, progress=False)
    plan = recommend_ranks(result, RankPolicy(energy=0.99, roles=("q", "v", "down")))
    saved = json.loads(save_plan(plan, tmp_path / "plan.json").read_text())
    assert [m["name"] for m in saved["modules_to_save"]] == ["classifier"]
    assert "output.dense" in " ".join(m["name"] for m in saved["modules"])  # an encoder dense LoRA, not trained whole
    wrapped = []
    real = train_module.wrap_model
    monkeypatch.setattr(train_module, "wrap_model", lambda *a, **k: wrapped.append(real(*a, **k)) or wrapped[-1])
    data = classification_jsonl(tmp_path / "train.jsonl", n=12)
    run = CliRunner().invoke(app, ["train", str(base), "--data", str(data), "--plan", str(tmp_path / "plan.json"),
                                   "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0", "--quiet",
                                   "-o", str(tmp_path / "ad")])
    assert run.exit_code == 0, run.output
    (peft_model,) = wrapped
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trained == saved["totals"]["params"] == plan.total_params  # 12,774-style over-count before: every dense
    assert _wrapped(peft_model) == {"classifier"}
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["classifier", "score"]  # ours, then PEFT's own list, once each


def test_barts_head_is_saved_and_peft_reloads_it(tmp_path):
    """BART's classification_head had been left at random and not saved: a reload got another random head. (spectra
    train on BART with the built-in byte tokenizer stops at BART's own check that every example holds an <eos>, so the
    adapter is made here by train's wrap_model and PEFT's save_pretrained, as train_adapter saves it.)"""
    from peft import PeftModel
    from safetensors.torch import load_file

    from spectra.lora.train import wrap_model

    model = wrap_model(_classifier("bart"), TrainConfig(rank=2, roles=("q", "v")), task="seq_cls")
    with torch.no_grad():  # as a step would move it
        for name, p in model.named_parameters():
            if p.requires_grad and "classification_head" in name:
                p += 0.5
    model.save_pretrained(tmp_path / "ad")
    weights = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    head = {k: v for k, v in weights.items() if "classification_head" in k}
    assert {k.split("classification_head.")[1] for k in head} == {"dense.weight", "dense.bias", "out_proj.weight",
                                                                  "out_proj.bias"}
    assert not any("encoder" in k or "decoder" in k for k in weights if "lora_" not in k)  # nothing else whole
    reloaded = dict(PeftModel.from_pretrained(_classifier("bart"), str(tmp_path / "ad")).named_parameters())
    for key, value in head.items():
        name = key.replace("classification_head.", "classification_head.modules_to_save.default.")
        assert torch.equal(reloaded[name], value)
    fresh = dict(_classifier("bart").named_parameters())
    assert not torch.equal(fresh["classification_head.out_proj.weight"],
                           reloaded["base_model.model.classification_head.modules_to_save.default.out_proj.weight"])
