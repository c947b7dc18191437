"""The trainer: determinism, logs, full fine-tunes that pair with the base, classification, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from spectra.checkpoints.pairing import iter_deltas
from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, quiet_peft, train_adapter
from tests.lora.conftest import classification_jsonl
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = dict(max_length=16, batch_size=8, max_steps=4, eval_fraction=0.0)


def test_same_seed_same_adapter_bytes(llama_base, text_data, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = train_adapter(llama_base, text_data, TrainConfig(rank=2, seed=seed, **FAST), tmp_path / name,
                            progress=False).out_dir
        runs[name] = (out / "adapter_model.safetensors").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]  # negative control: the seed matters


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_is_applied_and_changes_no_number(method, llama_base, text_data, tmp_path, monkeypatch):
    """TrainConfig.gradient_checkpointing took effect for QLoRA only (through PEFT's kbit preparation): LoRA, DoRA
    and full fine-tunes ignored it. Checkpointed, the blocks recompute their forward: the same losses."""
    import spectra.lora.train as train

    wrap, calls = train.wrap_model, []

    def counting(*args, **kwargs):  # count the blocks' passes through their checkpoint function
        model = wrap(*args, **kwargs)
        for name, block in model.named_modules():
            if name.endswith(("layers.0", "layers.1")) and getattr(block, "gradient_checkpointing", False):
                func = block._gradient_checkpointing_func
                block._gradient_checkpointing_func = lambda *a, _f=func, **k: calls.append(1) or _f(*a, **k)
        return model

    monkeypatch.setattr(train, "wrap_model", counting)
    extra = {} if method == "full" else {"rank": 2}
    losses, passes = {}, {}
    for on in (False, True):
        calls.clear()
        config = TrainConfig(method=method, gradient_checkpointing=on, **extra, **FAST)
        result = train_adapter(llama_base, text_data, config, tmp_path / f"{method}{on}", progress=False)
        losses[on], passes[on] = result.losses, len(calls)
    assert passes[False] == 0 and passes[True] == 2 * result.steps  # each block, each step, exactly when asked
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_log_summary_and_eval(llama_base, text_data, tmp_path):
    config = TrainConfig(rank=2, max_length=16, batch_size=8, epochs=2, eval_fraction=0.25, method="dora")
    result = train_adapter(llama_base, text_data, config, tmp_path / "ad", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "ad" / "training_log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and "eval" not in x]
    assert len(steps) == result.steps == len(result.losses) > 0
    assert [x["loss"] for x in steps] == result.losses
    assert len(result.evals) == 2 and {"loss", "accuracy", "tokens"} <= set(result.evals[-1])
    summary = json.loads((tmp_path / "ad" / "spectra_train.json").read_text())
    assert summary["method"] == "dora" and summary["config"]["rank"] == 2
    default = train_adapter(llama_base, text_data, TrainConfig(**FAST), tmp_path / "default", progress=False)
    assert json.loads((default.out_dir / "spectra_train.json").read_text())["config"]["rank"] == 8  # not null
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] and adapter_config["r"] == 2
    assert not list(tmp_path.glob(".ad.tmp-*"))


def test_full_fine_tune_pairs_with_base(llama_base, text_data, tmp_path):
    result = train_adapter(llama_base, text_data, TrainConfig(method="full", lr=1e-3, **FAST), tmp_path / "full",
                           progress=False)
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "model.safetensors").is_file()
    deltas = {d.name: d for d in iter_deltas(llama_base, result.out_dir, vectors=False, split_fused=False)}
    assert "model.layers.0.self_attn.q_proj" in deltas
    assert all(float(d.delta.abs().max()) > 0 for d in deltas.values())


def test_classification_head_in_modules_to_save(tmp_path):
    base = save(build_model("bert", head=False), tmp_path / "bert", "safetensors")  # a bare encoder: new head
    data = classification_jsonl(tmp_path / "train.jsonl")
    config = TrainConfig(rank=2, epochs=2, batch_size=8, lr=5e-3, eval_fraction=0.25)
    result = train_adapter(base, data, config, tmp_path / "ad", progress=False)
    assert result.task == "seq_cls" and result.label_names == ["neg", "neu", "pos"]
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "classifier" in adapter_config["modules_to_save"]
    assert adapter_config["modules_to_save"].count("classifier") == 1  # ours and PEFT's own list name it both
    assert result.evals[-1]["examples"] == 12


def test_plan_and_rslora_options(llama_base, text_data, tmp_path):
    result = train_adapter(llama_base, text_data, TrainConfig(rank=2, roles=("q", "v"), rslora=True, **FAST),
                           tmp_path / "ad", progress=False)
    adapter_config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert adapter_config["use_rslora"]
    assert adapter_config["lora_alpha"] == pytest.approx(2 * 2 ** 0.5)  # α/√r = 2, the default scale
    plain = train_adapter(llama_base, text_data, TrainConfig(rank=2, roles=("q",), **FAST), tmp_path / "plain",
                          progress=False)
    assert json.loads((plain.out_dir / "adapter_config.json").read_text())["lora_alpha"] == 4.0  # α/r = 2
    assert sorted(adapter_config["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv")


def test_roles_take_the_fused_modules_that_hold_them():
    """GPT-2's c_attn holds q, k and v, Phi-3's gate_up_proj gate and up: --roles q,v failed on GPT-2."""
    from spectra.lora.train import target_modules
    from tests.models import build_model

    assert target_modules(build_model("gpt2"), ("q", "v")) == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    phi3 = build_model("phi3")
    assert target_modules(phi3, ("up",)) == [f"model.layers.{i}.mlp.gate_up_proj" for i in (0, 1)]
    assert target_modules(phi3, ("o",)) == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]


def test_roles_take_gpt2_cross_attentions_fused_key_value():
    """GPT-2's crossattention.c_attn (role other, rows xk and xv) was left out of `--roles k`/`v` and of the
    default targets, which extract and recommend adapt; --roles q takes q_attn and not it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from spectra.lora.train import target_modules

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, add_cross_attention=True))
    cross = "transformer.h.0.crossattention"
    assert target_modules(model, ("k",)) == ["transformer.h.0.attn.c_attn", f"{cross}.c_attn"]
    assert target_modules(model, ("xv",)) == [f"{cross}.c_attn"]
    assert target_modules(model, ("xq",)) == [f"{cross}.q_attn"]  # negative control: q's rows are not c_attn's
    assert f"{cross}.c_attn" in target_modules(model)


def test_rslora_on_a_plan_keeps_its_update_scale(tmp_path):
    """A plan made without rsLoRA (α = 2r) trained with --rslora: α is re-derived (2√r), so PEFT
    scales every module by 2; switching use_rslora on the plan's α gave 2√r (2.8, 3.5, 4)."""
    from peft import get_peft_model

    from spectra.lora.train import lora_config
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan
    from tests.models import build_model
    from tests.ranks.rows import analysis, make_row

    rows = [make_row(f"model.layers.{i}.self_attn.{p}_proj", [1.0] * (2 + i + j) + [0.0] * 8, shape=(32, 32),
                     role=p, layer=i) for i in (0, 1) for j, p in enumerate("qv")]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99))
    assert len({m.rank for m in plan.modules}) == 3 and not plan.policy.rslora
    path = save_plan(plan, tmp_path / "plan.json")
    model = build_model("llama")
    peft_model = get_peft_model(model, lora_config(model, TrainConfig(plan=str(path), rslora=True), task="causal_lm"))
    scalings = {name: (layer.r["default"], layer.scaling["default"]) for name, layer in peft_model.named_modules()
                if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling}
    assert len(scalings) == 4 and all(s == pytest.approx(2.0) for _, s in scalings.values()), scalings


@pytest.mark.parametrize("field, value", [("method", "ia3"), ("rank", 0), ("roles", ("embed",)),
                                          ("compute_dtype", "int8"), ("eval_fraction", 1.5), ("alpha", 0.0),
                                          ("alpha", -8.0)])
def test_bad_config(field, value):
    with pytest.raises(ConfigError):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("fields, message", [
    (dict(method="full", rank=4),
     "method full (--full) trains every weight, so --rank would be ignored (rank); drop it"),
    (dict(method="full", alpha=3.0, rslora=True), "so --alpha, --rslora would be ignored (alpha, rslora); drop them"),
    (dict(method="full", plan="plan.json", roles=("q",)), "so --plan, --roles would be ignored (plan, roles)"),
    (dict(method="full", target_modules=("model.layers.0.self_attn.q_proj",), lora_dropout=0.1),
     "so target_modules, lora_dropout would be ignored; drop"),
    (dict(plan="plan.json", rank=4, roles=("q",)), "plan (--plan) sets every module's rank, α and target, so "
                                                   "--rank, --roles would be ignored (rank, roles)"),
    (dict(plan="plan.json", alpha=2.0, target_modules=("x",)),
     "so --alpha, target_modules would be ignored (alpha, target_modules)"),
    (dict(roles=("q",), target_modules=("x",)), "target_modules names the modules to adapt, so roles would be ignored"),
    (dict(method="dora", compute_dtype="bfloat16"),
     "compute_dtype (--compute-dtype) bfloat16 is the compute dtype of the 4-bit layers of qlora and qdora; method dora "
     "trains in float32"),
    (dict(method="full", compute_dtype="float16"), "method full trains in float32, so it would be ignored"),
])
def test_options_the_method_or_the_plan_would_ignore_are_refused(fields, message):
    """train --full --rank 4 trained a full fine-tune and dropped the rank (and --alpha, --rslora, ...) in silence."""
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**fields)


def test_options_that_apply_are_kept():
    """Negative controls of the refusals above: every option here changes what is trained."""
    assert TrainConfig(method="full").rank is None and TrainConfig().lora_rank == 8 == TrainConfig(rank=8).lora_rank
    assert TrainConfig(rank=4, alpha=3.0, rslora=True, roles=("q",), lora_dropout=0.1).lora_rank == 4
    TrainConfig(plan="plan.json", rslora=True, method="dora", lora_dropout=0.1)  # α re-derived; DoRA on the plan
    TrainConfig(method="qdora", compute_dtype="bfloat16", target_modules=("model.layers.0.self_attn.q_proj",))


def test_cli_refuses_what_train_would_ignore(llama_base, text_data, tmp_path):
    from typer.testing import CliRunner

    from spectra.cli import app

    common = ["--data", str(text_data), "-o", str(tmp_path / "out"), "-q"]
    for options, named in ((["--full", "--rank", "4"], "--full) trains every weight, so --rank"),
                           (["--full", "--method", "dora"], "--full trains every weight, so --method dora would be "
                                                            "ignored"),
                           (["--full", "--method", "lora"], "--method lora would be ignored"),
                           (["--eval-data", str(text_data), "--eval-fraction", "0.2"],
                            "--eval-data is the held-out data, so --eval-fraction would be ignored"),
                           (["--compute-dtype", "bfloat16"], "compute_dtype (--compute-dtype) bfloat16")):
        refused = CliRunner().invoke(app, ["train", str(llama_base), *options, *common])
        assert refused.exit_code != 0 and named in str(refused.exception), (options, refused.exception)
    assert not (tmp_path / "out").exists()


def test_a_plan_made_from_another_base_is_refused(llama_base, text_data, tmp_path):
    """A 2-layer Llama's plan on a 6-layer one trained layers 0-1 only, in silence (extract refused it already)."""
    import dataclasses
    import shutil

    from spectra.checkpoints.source import open_checkpoint
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan
    from tests.ranks.rows import analysis, make_row

    def analysed(spec):  # analysis.json's "base", as `spectra analyze` records it
        return {"path": str(spec), "fingerprint": open_checkpoint(spec).fingerprint()["fingerprint"]}

    rows = [make_row(f"model.layers.{i}.self_attn.q_proj", [1.0, 0.5], layer=i) for i in (0, 1)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99))
    other = save(build_model("llama", seed=1), tmp_path / "other", "safetensors")
    foreign = save_plan(dataclasses.replace(plan, base=analysed(other)), tmp_path / "foreign.json")
    found = open_checkpoint(llama_base).fingerprint()["fingerprint"]
    with pytest.raises(ConfigError, match=rf"the plan was made from an analysis of another base \(fingerprint "
                                          rf"{analysed(other)['fingerprint']}, this base {found}: {llama_base}\)"):
        train_adapter(llama_base, text_data, TrainConfig(plan=str(foreign), **FAST), tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()
    # negative controls: the same files elsewhere (a local copy of a hub snapshot alike) are the same base
    copy = shutil.copytree(llama_base, tmp_path / "copy")
    own = save_plan(dataclasses.replace(plan, base=analysed(llama_base)), tmp_path / "own.json")
    result = train_adapter(copy, text_data, TrainConfig(plan=str(own), **FAST), tmp_path / "ad", progress=False)
    assert sorted(json.loads((result.out_dir / "adapter_config.json").read_text())["target_modules"]) == [
        f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    dataclasses.replace(plan, base=None).check_base(open_checkpoint(other))  # an older plan: nothing to compare


def test_bad_data_and_existing_output(llama_base, text_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ConfigError, match="line 2"):
        train_adapter(llama_base, bad, TrainConfig(**FAST), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train_adapter(llama_base, tmp_path / "missing.txt", TrainConfig(**FAST), tmp_path / "out", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        train_adapter(llama_base, bad, TrainConfig(**FAST), tmp_path / "exists", progress=False)
    with pytest.raises(ConfigError, match="target_modules"):
        train_adapter(llama_base, text_data, TrainConfig(target_modules=("nope",), **FAST),
                      tmp_path / "out2", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_group_by_length_is_seeded_and_changes_the_batches(llama_base, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (1 + i % 9) + str(i)}) + "\n" for i in range(40)))
    runs = {}
    for name, grouped in (("a", True), ("b", True), ("plain", False)):
        config = TrainConfig(rank=2, max_length=32, batch_size=4, max_steps=6, eval_fraction=0.0,
                             group_by_length=grouped)
        out = train_adapter(llama_base, data, config, tmp_path / name, progress=False).out_dir
        runs[name] = (out / "adapter_model.safetensors").read_bytes()
        assert json.loads((out / "spectra_train.json").read_text())["config"]["group_by_length"] is grouped
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["plain"]  # other batches, another adapter


def test_a_classifier_pools_where_its_batches_pad(tmp_path):
    """A checkpoint whose config.pad_token_id (7) is not the tokenizer's: eval must equal the unpadded examples."""
    import transformers as tf
    from peft import PeftModel

    from spectra.lora.data import prepare_data
    from tests.models import tiny_config

    config = tiny_config("llama")
    config.pad_token_id = 7
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    rows = lambda n, w: "".join(json.dumps({"text": ("good" if i % 2 else "bad") + w * (i % 7),  # noqa: E731
                                            "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(n))
    (tmp_path / "train.jsonl").write_text(rows(24, " x"))
    (tmp_path / "eval.jsonl").write_text(rows(10, " y"))
    result = train_adapter(tmp_path / "base", tmp_path / "train.jsonl", TrainConfig(rank=2, batch_size=8, lr=5e-3),
                           tmp_path / "ad", eval_data=tmp_path / "eval.jsonl", progress=False)
    _, _, held, _, _ = prepare_data(tmp_path / "base", tmp_path / "train.jsonl", eval_data=tmp_path / "eval.jsonl")
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=2)
    model = PeftModel.from_pretrained(model, str(tmp_path / "ad")).eval()
    with torch.no_grad():  # one example at a time: nothing to pool past
        losses = [float(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([x])).logits, torch.tensor([y])))
                  for x, y in zip(held.ids, held.labels)]
    assert result.final_eval["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_labels_log_rate_and_short_examples(llama_base, tmp_path):
    from spectra.lora.data import prepare_data

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"item {i}", "label": str(i % 3)}) + "\n" for i in range(12)))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps({"text": f"item {i}", "label": str(1 + i % 2)}) + "\n" for i in range(4)))
    _, _, tokens, names, _ = prepare_data(llama_base, train, eval_data=held)
    assert names == ["0", "1", "2"] and tokens.labels == [1, 2, 1, 2]  # "1" stays class 1, not the eval file's 0
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"item {i}", "label": "pos"}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError, match="at least two classes"):
        prepare_data(llama_base, one)
    short = tmp_path / "short.jsonl"  # one-character texts have no next token to predict
    short.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "a longer text", "another text")))
    config = TrainConfig(rank=2, batch_size=2, max_length=16, eval_fraction=0.0, warmup_ratio=0.5, lr=1e-3)
    result = train_adapter(llama_base, short, config, tmp_path / "ad", progress=False)
    assert result.steps == 1 and all(loss == loss for loss in result.losses)  # no NaN step
    logged = [json.loads(x) for x in (tmp_path / "ad" / "training_log.jsonl").read_text().splitlines()]
    assert logged[0]["lr"] == pytest.approx(1e-3 / 2)  # the rate step 1 used: warm-up ceil(0.5 · 1) = 1 step


@pytest.mark.parametrize("ratio", [0.06, 0.1, 0.5])
def test_warmup_steps_round_up_as_transformers_does(ratio, tmp_path):
    from transformers import TrainingArguments

    from spectra.lora.train import warmup_steps

    # transformers 5 takes the ratio as a float warmup_steps < 1 (4.x had warmup_ratio)
    fields = TrainingArguments.__dataclass_fields__
    key = "warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **{key: ratio})
    totals = (1, 2, 4, 5, 16, 17, 90, 100, 120, 1000)
    assert [warmup_steps(ratio, n) for n in totals] == [args.get_warmup_steps(n) for n in totals]
    assert warmup_steps(ratio, 4) >= 1  # negative control below: truncation gave short runs none
    assert int(0.06 * 4) == 0 and warmup_steps(0.0, 4) == 0


def test_a_short_run_warms_up(llama_base, text_data, tmp_path):
    """4 steps at warmup_ratio 0.1: ceil(0.4) = 1 warm-up step (int() gave 0: full rate at step 1)."""
    config = TrainConfig(rank=2, lr=1e-3, warmup_ratio=0.1, **FAST)
    train_adapter(llama_base, text_data, config, tmp_path / "ad", progress=False)
    rates = [json.loads(x)["lr"] for x in (tmp_path / "ad" / "training_log.jsonl").read_text().splitlines()]
    # step s (from 0) uses (s+1)/(w+1) while s < w, then decays linearly to 0 over the remaining total − w steps
    assert rates == pytest.approx([1e-3 / 2, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_integer_labels_keep_a_pretrained_three_class_head(tmp_path, monkeypatch):
    """A classifier checkpoint with 3 classes, data using only labels 0 and 1: the head is the checkpoint's."""
    from safetensors.torch import load_file

    import spectra.lora.train as train_module

    loaded = []  # the classifier of each model the trainer loads, as loaded

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append({k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("classifier.")})
        return model

    real = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", spy)
    base = save(build_model("bert", head=True), tmp_path / "cls3", "safetensors")  # BertForSequenceClassification
    head = {k: v for k, v in load_file(base / "model.safetensors").items() if k.startswith("classifier.")}
    assert head["classifier.weight"].shape == (3, 32)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(8)))
    config = TrainConfig(rank=2, max_length=16, batch_size=4, max_steps=1, eval_fraction=0.0)
    result = train_adapter(base, data, config, tmp_path / "ad", progress=False)
    assert result.label_names == ["0", "1", "2"]
    assert len(loaded) == 1 and set(loaded[0]) == set(head)
    for key, value in head.items():  # the checkpoint's own head, not a new one of 2 classes
        assert torch.equal(loaded[0][key], value)
    trained = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    saved = [k for k in trained if "classifier" in k and k.endswith("weight")]
    assert saved and trained[saved[0]].shape == (3, 32)  # the trained copy of the 3-class head
    # negative control: a label the head has no output for is refused, not a silently replaced head
    beyond = tmp_path / "beyond.jsonl"
    beyond.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 4}) + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match=r"beyond\.jsonl: label 3 is outside the model's 3 classes"):
        train_adapter(base, beyond, config, tmp_path / "ad2", progress=False)
    assert not (tmp_path / "ad2").exists()
    # a base model without a head gets a new one, sized max(configured num_labels, max label + 1)
    bare = save(build_model("bert", head=False), tmp_path / "bare", "safetensors")  # config: 3 labels
    assert train_adapter(bare, beyond, config, tmp_path / "ad3", progress=False).label_names == ["0", "1", "2", "3"]


def test_plan_with_fused_experts_trains_them_through_target_parameters(text_data, tmp_path):
    """transformers-5 Mixtral: the plan's experts.N.w1/w3/w2 live in fused parameters, adapted at the plan's rank.
    PEFT 0.21 checks rank_pattern keys against targeted modules only and warns of those of target_parameters,
    which it applies all the same (the ranks below): train, and quiet_peft about a load, silence that warning alone
    (pytest turns any other into an error)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from spectra.analysis import analyze
    from spectra.errors import PeftConfigWarning
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan
    from tests.models import planted_mixtral_pair

    base, b, t = planted_mixtral_pair(tmp_path)
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.99))
    with pytest.warns(PeftConfigWarning):  # layer 1's experts differ in rank: the fused parameter takes the largest
        path = save_plan(plan, tmp_path / "plan.json")
    planned = json.loads(path.read_text())["peft_config"]
    with pytest.warns(PeftConfigWarning):
        result = train_adapter(b, text_data, TrainConfig(plan=str(path), lr=1e-2, **FAST), tmp_path / "ad",
                               progress=False)
    saved = json.loads((result.out_dir / "adapter_config.json").read_text())
    fused = [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert sorted(saved["target_parameters"]) == fused == sorted(planned["target_parameters"])
    assert (saved["r"], saved["lora_alpha"]) == (planned["r"], planned["lora_alpha"])
    assert saved["rank_pattern"] == planned["rank_pattern"] and saved["alpha_pattern"] == planned["alpha_pattern"]
    weights = load_file(result.out_dir / "adapter_model.safetensors")
    expert_b = [k for k in weights if "experts" in k and "lora_B" in k]
    assert len(expert_b) == 4 and all(float(weights[k].abs().max()) > 0 for k in expert_b)  # trained from B = 0
    # layer 1's gate_up_proj at the planned 5 (gate 3 + up 2 of expert 1): lora_A is (r · experts, in)
    a = [k for k in weights if "layers.1.mlp.experts" in k and "lora_A" in k and weights[k].shape[1] == 32]
    assert [tuple(weights[k].shape) for k in a] == [(5 * 3, 32)]
    with quiet_peft(base, result.out_dir):
        reloaded = PeftModel.from_pretrained(base, result.out_dir)  # PEFT reads it back onto a fresh model
    assert sorted(reloaded.peft_config["default"].target_parameters) == fused

    with pytest.warns(PeftConfigWarning), pytest.raises(ConfigError, match="target_parameters"):  # plain LoRA only
        train_adapter(b, text_data, TrainConfig(plan=str(path), method="dora", **FAST), tmp_path / "dora",
                      progress=False)
    assert not (tmp_path / "dora").exists()
    # dropout on the plan's fused experts: refused from config.json alone, before the data and weights are read
    # (it had passed there and been refused only after loading); the same plan without dropout passes
    from spectra.lora.train import refuse_before_loading

    with pytest.raises(ConfigError, match="target_parameters, which takes no lora_dropout"):
        refuse_before_loading(b, TrainConfig(plan=str(path), lora_dropout=0.1))
    refuse_before_loading(b, TrainConfig(plan=str(path)))


@pytest.fixture(scope="module")
def llama_classifier(tmp_path_factory):
    """A causal-LM base with no pad_token_id trained for classification; the trained model as it was in memory."""
    import transformers as tf

    import spectra.lora.train as train_module
    from tests.models import tiny_config

    root = tmp_path_factory.mktemp("llama_cls")
    config = tiny_config("llama")
    assert config.pad_token_id is None
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(root / "base")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": ("good" if i % 2 else "bad") + " x" * (i % 5),
                                                          "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(24)))
    wrapped = []
    real = train_module.wrap_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "wrap_model", lambda *a, **k: wrapped.append(real(*a, **k)) or wrapped[-1])
        config = TrainConfig(rank=2, batch_size=8, lr=5e-3, eval_fraction=0.0)
        train_adapter(root / "base", root / "train.jsonl", config, root / "ad", progress=False)
    return root / "base", root / "ad", wrapped[0].eval()


def _reload(base, adapter, *, pad_token_id):
    """The adapter onto its base with PEFT, the way the README says to."""
    import transformers as tf
    from peft import PeftModel

    summary = json.loads((adapter / "spectra_train.json").read_text())
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(summary["label_names"]))
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def test_classifier_head_is_saved_once_and_peft_loads_it(llama_classifier):
    """PEFT's classifier appends "classifier", "score" to the modules_to_save spectra passes: score was listed twice."""
    from safetensors.torch import load_file

    base, adapter, _ = llama_classifier
    saved = json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    assert saved.count("score") == 1 and len(saved) == len(set(saved)), saved
    reloaded = _reload(base, adapter, pad_token_id=0)
    weights = load_file(adapter / "adapter_model.safetensors")
    (key,) = [k for k in weights if "score" in k]
    head = dict(reloaded.named_parameters())[key.replace("score.weight", "score.modules_to_save.default.weight")]
    assert torch.equal(head, weights[key])  # the trained head, not the base's random one


def test_reloaded_classifier_pads_batches_as_training_did(llama_classifier):
    """A base with no pad_token_id: training pads with the tokenizer's id; the adapter now records it."""
    base, adapter, trained = llama_classifier
    pad = json.loads((adapter / "spectra_train.json").read_text())["pad_token_id"]
    assert pad == trained.config.pad_token_id == 0  # the byte tokenizer's padding id
    seqs = [[5, 9, 12, 7, 3], [8, 4]]
    batch = torch.tensor([seqs[0], seqs[1] + [pad] * 3])  # (2, 5), right-padded
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    with torch.no_grad():
        in_memory = trained(input_ids=batch, attention_mask=mask).logits  # (2, C)
        reloaded = _reload(base, adapter, pad_token_id=pad)
        torch.testing.assert_close(reloaded(input_ids=batch, attention_mask=mask).logits, in_memory)
        # independent reference: each sequence alone, nothing to pool past
        alone = torch.cat([reloaded(input_ids=torch.tensor([s])).logits for s in seqs])
        torch.testing.assert_close(in_memory, alone, rtol=1e-5, atol=1e-6)
        # negative controls: without the recorded id a batch is refused, with another one it pools at padding
        with pytest.raises(ValueError, match="no padding token"):
            _reload(base, adapter, pad_token_id=None)(input_ids=batch, attention_mask=mask)
        wrong = _reload(base, adapter, pad_token_id=1)(input_ids=batch, attention_mask=mask).logits
        assert not torch.allclose(wrong[1], in_memory[1], atol=1e-4)


def test_a_dora_plan_trains_dora_from_the_command_line_and_warns_otherwise(llama_base, text_data, tmp_path):
    """A plan made with `recommend --dora` trained plain LoRA under `train --plan` (the default method), in silence."""
    from typer.testing import CliRunner

    from spectra.cli import app
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan
    from tests.ranks.rows import analysis, make_row

    import dataclasses

    from spectra.checkpoints.source import open_checkpoint

    rows = [make_row(f"model.layers.{i}.self_attn.q_proj", [1.0, 0.5], layer=i) for i in (0, 1)]
    plan = recommend_ranks(analysis(*rows), RankPolicy(energy=0.99, use_dora=True))
    base = {"path": str(llama_base), "fingerprint": open_checkpoint(llama_base).fingerprint()["fingerprint"]}
    dora = save_plan(dataclasses.replace(plan, base=base), tmp_path / "d.json")
    args = ["train", str(llama_base), "--data", str(text_data), "--plan", str(dora), "--max-steps", "1",
            "--batch-size", "8", "--max-length", "16", "--eval-fraction", "0", "-q"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["use_dora"] is True
    with pytest.warns(UserWarning, match="made for DoRA .* training method lora as asked"):
        train_adapter(llama_base, text_data, TrainConfig(plan=str(dora), **FAST), tmp_path / "api", progress=False)
    assert json.loads((tmp_path / "api" / "adapter_config.json").read_text())["use_dora"] is False


def test_the_summary_step_time_leaves_the_warm_up_step_out():
    """spectra_train.json's step_median_s took the sorted median of every step, the first (warm-up) included: a
    two-step run read its slow first step. It is verify --sweep's steady_step_time now, shared."""
    from spectra.lora.train import steady_step_time

    assert steady_step_time([2.0, 0.023]) == 0.023 and steady_step_time([2.0, 0.02, 0.03, 0.025]) == 0.025
    assert steady_step_time([1.5]) == 1.5 and steady_step_time([]) is None


def test_default_length_trains_a_bert_with_a_short_position_table(llama_base, tmp_path, monkeypatch):
    """BERT with max_position_embeddings=32 at the default max_length: a crash in the model (45 tokens into a
    32-row table); now examples are cut at 32 and the run says so. An explicit longer length is refused."""
    import spectra.lora.train as train_module

    tokenized = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        tokenized.append(out[1:3])  # (train, held out)
        return out

    real = train_module.prepare_data
    monkeypatch.setattr(train_module, "prepare_data", spy)
    base = save(build_model("bert"), tmp_path / "bert", "safetensors")
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"a review of item {i}, " + "and more words " * 3,
                                        "label": ("pos", "neg", "neu")[i % 3]}) + "\n" for i in range(24)))
    config = TrainConfig(rank=4, max_steps=1, batch_size=8)
    result = train_adapter(base, data, config, tmp_path / "out", progress=False)
    train, held = tokenized[0]
    assert max(len(ids) for ids in train.ids + held.ids) == 32  # the texts are longer: cut to the table
    (note,) = result.notes
    assert "cut at 32 tokens, not the default 128" in note and "max_position_embeddings = 32" in note
    summary = json.loads((tmp_path / "out" / "spectra_train.json").read_text())
    assert summary["notes"] == [note] and summary["config"]["max_length"] == 32  # the length used, to repeat the run
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 128 is more than the model can take: its "
                                          r"table of learned positions covers 32 tokens \(max_position_embeddings"):
        train_adapter(base, data, TrainConfig(rank=4, max_steps=1, batch_size=8, max_length=128), tmp_path / "long",
                      progress=False)
    assert not (tmp_path / "long").exists()
    # negative control: Llama's 2048 positions leave the default at 128, with no note
    tokenized.clear()
    text = tmp_path / "long.txt"
    text.write_text("words to cut into blocks " * 60)
    llama = train_adapter(llama_base, text, config, tmp_path / "llama", progress=False)
    assert max(len(ids) for ids in tokenized[0][0].ids) == 128 and llama.notes == []
    assert json.loads((tmp_path / "llama" / "spectra_train.json").read_text())["config"]["max_length"] == 128
