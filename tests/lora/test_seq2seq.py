"""Task seq2seq_lm: encoder–decoders (T5, BART) trained, verified, swept and calibrated on source/target records.

The references are independent of spectra's batching: each example alone (no padding), the decoder's inputs built
by hand (the target shifted right after ``decoder_start_token_id``), the model run in float64. spectra's numbers come
from padded float32 batches, so they agree to float32 rounding: 1e-5 relative is stated for losses.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from spectra.cli import app
from spectra.errors import ConfigError
from spectra.lora.data import collate, prepare_data, read_records, tokenize_file
from spectra.lora.train import TrainConfig, evaluate, load_model, quiet_peft, train_adapter
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAMILIES = ("t5", "bart")
LOSS_REL = 1e-5  # float32 batches vs the float64 reference, per-token cross-entropy ~4


def pairs_jsonl(path, *, n: int = 24, start: int = 0):
    """Source/target pairs of different lengths (so batches pad both sides)."""
    with open(path, "w") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"source": f"copy {i}" + " please" * (i % 3), "target": f"{i} " * (1 + i % 4)}) + "\n")
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, base, tuned, train data, eval data): tuned is spectra's own full fine-tune of the base."""
    folder = tmp_path_factory.mktemp(request.param)
    base = save(build_model(request.param), folder / "base", "safetensors")
    data, held = pairs_jsonl(folder / "train.jsonl"), pairs_jsonl(folder / "eval.jsonl", n=10, start=100)
    config = TrainConfig(method="full", batch_size=8, epochs=2, lr=3e-3, eval_fraction=0.0)
    train_adapter(base, data, config, folder / "tuned", progress=False)
    return request.param, base, folder / "tuned", data, held


def reference_loss(model, data, index=None) -> tuple[float, int]:
    """Σ −log p(target token) over the examples `index` of `data`, each run alone in float64, and the token count.

    The decoder reads [decoder_start_token_id, y₀, …, y_{T−2}] and predicts y₀ … y_{T−1}: built here, not by the model.
    """
    model = model.double().eval()
    start = model.config.decoder_start_token_id
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)) if index is None else index:
            source, target = torch.tensor([data.ids[i]]), torch.tensor([data.targets[i]])  # (1, S), (1, T)
            decoder = torch.cat([torch.tensor([[start]]), target[:, :-1]], dim=1)  # (1, T)
            logits = model(input_ids=source, decoder_input_ids=decoder).logits  # (1, T, V) float64
            total -= float(torch.log_softmax(logits, -1)[0].gather(1, target.T).sum())
            count += target.shape[1]
    return total, count


def without_dropout(folder, to):
    """A copy of a checkpoint directory whose config.json sets every dropout rate to 0 (it had some above 0)."""
    copy = shutil.copytree(folder, to)
    config = json.loads((copy / "config.json").read_text())
    dropouts = [k for k in config if "dropout" in k and isinstance(config[k], float)]
    assert dropouts and any(config[k] > 0 for k in dropouts)
    (copy / "config.json").write_text(json.dumps(config | dict.fromkeys(dropouts, 0.0)))
    return copy


# ---------------------------------------------------------------------------- data


def test_records_name_the_file_line_and_missing_field(tmp_path):
    good = pairs_jsonl(tmp_path / "p.jsonl", n=3)
    assert read_records(good, task="seq2seq_lm") == read_records(good, task="auto")  # auto: the first record decides
    assert read_records(good, task="auto")[1] == {"source": "copy 1 please", "target": "1 1 "}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n\n{"source": "c"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 3: no \"target\" field; sequence-to-sequence records"):
        read_records(bad, task="auto")
    bad.write_text('{"source": "a", "target": 7}\n')
    with pytest.raises(ConfigError, match=r"line 1: \"target\" is 7, not a string"):
        read_records(bad, task="seq2seq_lm")
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r"text.jsonl, line 1: no \"source\" field"):
        read_records(text, task="seq2seq_lm")
    with pytest.raises(ConfigError, match=r'"text" field\. A record of "source" and "target" is sequence-to-sequence'):
        read_records(good, task="causal_lm")
    plain = tmp_path / "plain.txt"
    plain.write_text("some text")
    with pytest.raises(ConfigError, match="learns to write a target from a source, not plain text"):
        read_records(plain, task="seq2seq_lm")


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_tables_read_as_the_same_pairs_as_json_lines(tmp_path, suffix, delimiter):
    records = read_records(pairs_jsonl(tmp_path / "p.jsonl", n=5), task="seq2seq_lm")
    table = tmp_path / f"p{suffix}"
    table.write_text(f"id{delimiter}source{delimiter}target\n" + "".join(
        f"{i}{delimiter}{r['source']}{delimiter}{r['target']}\n" for i, r in enumerate(records)))
    assert read_records(table, task="auto") == records
    table.write_text(f"source{delimiter}target\na{delimiter}b\nc\n")  # a short row: no target cell
    with pytest.raises(ConfigError, match=rf"p\{suffix}, line 3: no \"target\" column"):
        read_records(table, task="seq2seq_lm")
    table.write_text(f"source{delimiter}label\na{delimiter}b\n")
    with pytest.raises(ConfigError, match="needs the columns source and target"):
        read_records(table, task="seq2seq_lm")
    table.write_text(f"source{delimiter}target\na{delimiter}b{delimiter}c\n")  # a row wider than the header
    advice = "a TSV text cannot hold a tab" if delimiter == "\t" else r"quote a text that holds the delimiter \(','\)"
    with pytest.raises(ConfigError, match=rf"p\{suffix}, line 2: 3 fields under a header of 2; {advice}"):
        read_records(table, task="auto")


def test_auto_is_seq2seq_for_an_encoder_decoder_and_pairs_are_refused_elsewhere(llama_base, tmp_path):
    t5 = save(build_model("t5"), tmp_path / "t5", "safetensors")
    data = pairs_jsonl(tmp_path / "p.jsonl", n=6)
    task, train, held, names, _ = prepare_data(t5, data, eval_fraction=0.5)
    assert task == "seq2seq_lm" and names is None and len(train) == len(held) == 3
    assert train.targets is not None and all(len(t) >= 1 for t in train.targets + held.targets)
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "hello there"}\n' * 4)
    for given, records in (("auto", data), ("seq2seq_lm", data), ("seq2seq_lm", text)):
        with pytest.raises(ConfigError) as err:  # the model is what is wrong, whatever the records
            prepare_data(llama_base, records, task=given)
        assert "no encoder-decoder (model_type 'llama'" in str(err.value)
        assert (f"data file {data} holds source/target records" in str(err.value)) == (given == "auto")
    with pytest.raises(ConfigError, match=r'line 1: no "source" field; sequence-to-sequence records \(task '
                                          r"seq2seq_lm, what an encoder-decoder"):
        prepare_data(t5, text)
    assert prepare_data(llama_base, text)[0] == "causal_lm"  # negative control: text for a decoder-only model


def test_collate_pads_targets_with_ignore_index(tmp_path):
    t5 = save(build_model("t5"), tmp_path / "t5", "safetensors")
    _, data, _, _, _ = prepare_data(t5, pairs_jsonl(tmp_path / "p.jsonl", n=4))
    batch = collate(data, [0, 3])
    assert batch["input_ids"].shape == (2, max(len(data.ids[0]), len(data.ids[3])))
    assert batch["labels"].shape == (2, max(len(data.targets[0]), len(data.targets[3])))
    for row, i in enumerate((0, 3)):
        n = len(data.targets[i])
        assert batch["labels"][row, :n].tolist() == data.targets[i] and (batch["labels"][row, n:] == -100).all()
        assert batch["decoder_attention_mask"][row].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][row].sum() == len(data.ids[i])


# ---------------------------------------------------------------------------- numbers


def test_eval_loss_is_the_float64_per_token_loss_of_each_example_alone(pair):
    """spectra's eval loss (padded float32 batches, decoder inputs built by the model) is Σ −log p / tokens of the
    examples run one by one in float64 with decoder inputs built by hand, for base and full fine-tune alike."""
    family, base, tuned, _, held = pair
    _, data, _, _, _ = prepare_data(base, held)
    for spec in (base, tuned):
        spectra = evaluate(load_model(spec, task="seq2seq_lm"), data, batch_size=4)
        total, count = reference_loss(load_model(spec, task="seq2seq_lm"), data)
        assert spectra["tokens"] == count == sum(len(t) for t in data.targets)
        assert spectra["loss"] == pytest.approx(total / count, rel=LOSS_REL), (family, spec)


def test_first_training_loss_is_the_hand_loss_of_the_first_batch(pair, tmp_path):
    """The step-1 loss spectra logs (before any update; LoRA's B starts at zero) is the token mean over the first
    shuffled batch, as the float64 reference gives it. Training runs the model's dropout (T5's and BART's configs
    have 0.1), so the base is copied with every dropout rate set to 0."""
    from spectra.lora.data import batch_indices

    family, source, _, data_file, _ = pair
    base = without_dropout(source, tmp_path / "base")
    config = TrainConfig(rank=2, batch_size=8, max_steps=1, eval_fraction=0.0, seed=3)
    result = train_adapter(base, data_file, config, tmp_path / "ad", progress=False)
    _, data, _, _, _ = prepare_data(base, data_file)
    first = batch_indices(data, 8, generator=torch.Generator().manual_seed(3))[0]
    total, count = reference_loss(load_model(base, task="seq2seq_lm"), data, first)
    assert result.losses[0] == pytest.approx(total / count, rel=LOSS_REL), family
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_distillation_loss_is_the_token_mean_kl_to_the_teacher(pair, tmp_path):
    """With the full fine-tune as teacher, step 1's loss is the mean over the first batch's target tokens of
    KL(teacher ‖ base) (the adapter starts at zero), each example run alone in float64."""
    from spectra.lora.data import batch_indices

    family, source, tuned, data_file, _ = pair
    base = without_dropout(source, tmp_path / "base")
    config = TrainConfig(rank=2, batch_size=8, max_steps=1, eval_fraction=0.0, seed=5, teacher=str(tuned))
    result = train_adapter(base, data_file, config, tmp_path / "ad", progress=False)
    _, data, _, _, _ = prepare_data(base, data_file)
    student, teacher = (load_model(m, task="seq2seq_lm").double().eval() for m in (base, tuned))
    start = student.config.decoder_start_token_id
    total, count = 0.0, 0
    with torch.no_grad():
        for i in batch_indices(data, 8, generator=torch.Generator().manual_seed(5))[0]:
            inputs = dict(input_ids=torch.tensor([data.ids[i]]),
                          decoder_input_ids=torch.tensor([[start] + data.targets[i][:-1]]))
            log_p, log_q = (torch.log_softmax(m(**inputs).logits[0], -1) for m in (student, teacher))  # (T, V)
            total += float((log_q.exp() * (log_q - log_p)).sum())
            count += len(data.targets[i])
    assert total > 0 and result.losses[0] == pytest.approx(total / count, rel=1e-4), family  # KL ~1e-1: 1e-4


def test_padding_changes_no_loss(pair):
    """Negative control: the pad ids under the encoder's mask can be anything; a real source token cannot."""
    from spectra.sweep_metrics import token_stats

    _, base, _, _, held = pair
    _, data, _, _, _ = prepare_data(base, held)
    model = load_model(base, task="seq2seq_lm").eval()
    batch = collate(data, list(range(len(data))))
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()  # both sides padded
    with torch.no_grad():
        from spectra.lora.data import model_inputs

        loss = token_stats(model(**model_inputs(batch, model)).logits, batch)[0]
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        assert torch.equal(token_stats(model(**model_inputs(other, model)).logits, other)[0], loss)
        real = dict(batch, input_ids=batch["input_ids"].clone())
        real["input_ids"][0, 0] = 7 if real["input_ids"][0, 0] != 7 else 8
        changed = token_stats(model(**model_inputs(real, model)).logits, real)[0]
    assert changed[0] != loss[0] and torch.equal(changed[1:], loss[1:])  # only the example whose source changed


def test_adapter_loads_in_peft_and_its_merge_gives_the_reported_eval_loss(pair, tmp_path):
    """The adapter spectra trained loads in PEFT as a seq2seq model; merged, its float64 loss on the eval data is the
    eval loss spectra reported after training and the one verify reports for it."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from spectra.lora.verify import verify_adapter

    family, base, tuned, data_file, held = pair
    config = TrainConfig(rank=2, roles=("q", "v", "xq", "xv"), batch_size=8, epochs=2, lr=1e-2, seed=1)
    result = train_adapter(base, data_file, config, tmp_path / "ad", eval_data=held, progress=False)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(tmp_path / "ad"))
    merged = peft_model.merge_and_unload()
    _, data, _, _, _ = prepare_data(base, held)
    total, count = reference_loss(merged, data)
    assert result.final_eval["tokens"] == count and result.final_eval["loss"] == pytest.approx(total / count,
                                                                                               rel=LOSS_REL)
    assert result.final_eval["loss"] != pytest.approx(reference_loss(load_model(base, task="seq2seq_lm"), data)[0]
                                                      / count, rel=1e-3)  # negative control: the adapter trained
    verified = verify_adapter(base, tuned, tmp_path / "ad", eval_data=held, progress=False)
    assert verified.evals["adapter"]["loss"] == pytest.approx(total / count, rel=LOSS_REL)
    bare = shutil.copytree(tmp_path / "ad", tmp_path / "bare")
    (bare / "spectra_train.json").unlink()  # no task recorded: verify takes it from PEFT's task_type, SEQ_2_SEQ_LM
    assert verify_adapter(base, tuned, bare, eval_data=held, progress=False).evals["adapter"]["loss"] == pytest.approx(
        total / count, rel=LOSS_REL)
    tuned_total, _ = reference_loss(load_model(tuned, task="seq2seq_lm"), data)
    assert verified.evals["tuned"]["loss"] == pytest.approx(tuned_total / count, rel=LOSS_REL)
    roles = {(r["role"], r["name"].split(".")[0 if family == "t5" else 1]) for r in verified.modules}
    assert roles == {(role, stack) for role in ("q", "v") for stack in ("encoder", "decoder")} | {
        ("xq", "decoder"), ("xv", "decoder")}
    assert all(0.0 <= r["captured_energy"] <= r["optimal_energy"] + 1e-9 for r in verified.modules)


def test_sweep_end_points_are_the_base_and_the_fine_tune(pair):
    """Rank 0 with the base's non-targets is the base; full rank with the fine-tune's is the fine-tune; perplexity is
    exp of the hand token loss (5e-5: exp carries the loss's relative error times the loss, ~4)."""
    from spectra.sweep import SweepConfig, truncation_sweep

    family, base, tuned, _, held = pair
    result = truncation_sweep(base, tuned, held, ranks=[0, 64], non_target="both", config=SweepConfig(bootstrap=0),
                              calibration=held, progress=False)  # data-optimal truncations: same end points
    assert result.data["calibration"]["task"] == "seq2seq_lm"
    _, data, _, _, _ = prepare_data(base, held)
    refs = {}
    for name, spec in (("base", base), ("tuned", tuned)):
        total, count = reference_loss(load_model(spec, task="seq2seq_lm"), data)
        refs[name] = math.exp(total / count)
        assert result.reference[name]["metric"] == pytest.approx(refs[name], rel=LOSS_REL * 5), (family, name)
    assert result.data["task"] == "seq2seq_lm" and result.data["unit"] == "tokens"
    # every ΔW removed, norms and embeddings the base's: the base; every ΔW whole (64 > any side), the rest tuned
    assert result.curve(non_target="base")[0]["metric"] == pytest.approx(refs["base"], rel=LOSS_REL * 5)
    assert result.curve(non_target="tuned")[-1]["metric"] == pytest.approx(refs["tuned"], rel=LOSS_REL * 5)
    assert refs["tuned"] < refs["base"]  # negative control: the two ends differ


def test_calibration_moments_count_each_stream_without_padding(pair):
    """An encoder module, a cross-attention key (encoder output) and a decoder MLP: C = Σ x xᵀ / N over the examples
    run alone in float64 (hooked inputs), N the source's or the target's tokens, as spectra's padded batches give."""
    from spectra.calibration import CalibrationConfig, collect_calibration

    family, base, _, _, held = pair
    calibration = collect_calibration(base, held, config=CalibrationConfig(batch_size=4))
    assert calibration.source["task"] == "seq2seq_lm"
    names = {"t5": ("encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.1.layer.1.EncDecAttention.k",
                    "decoder.block.1.layer.2.DenseReluDense.wi"),
             "bart": ("model.encoder.layers.0.fc1", "model.decoder.layers.1.encoder_attn.k_proj",
                      "model.decoder.layers.1.fc1")}[family]
    _, data, _, _, _ = prepare_data(base, held)
    model = load_model(base, task="seq2seq_lm").double().eval()
    inputs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0][0]))
             for n in names]
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        for source, target in zip(data.ids, data.targets):
            model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([[start] + target[:-1]]))
    for h in hooks:
        h.remove()
    sources, targets = sum(map(len, data.ids)), sum(map(len, data.targets))
    assert sources != targets  # the counts tell the streams apart
    for name, tokens in zip(names, (sources, sources, targets)):
        X = torch.cat(inputs[name])  # (N, in) float64
        assert calibration.tokens(name + ".weight") == X.shape[0] == tokens, name
        reference = X.T @ X / X.shape[0]
        assert torch.allclose(calibration.covariance(name + ".weight"), reference, rtol=1e-5,
                              atol=1e-6 * float(reference.abs().max())), name


def test_cli_trains_verifies_and_sweeps_an_encoder_decoder(pair, tmp_path):
    _, base, tuned, data, held = pair
    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"], terminal_width=400).output
    assert "seq2seq_lm" in help_text and '"source"' in help_text
    out = runner.invoke(app, ["train", str(base), "--data", str(data), "--rank", "2", "--max-steps", "2", "-q",
                              "-o", str(tmp_path / "ad")])
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "ad" / "spectra_train.json").read_text())
    assert summary["task"] == "seq2seq_lm" and "eval loss" in out.output
    out = runner.invoke(app, ["verify", str(base), str(tuned), "--adapter", str(tmp_path / "ad"), "--eval-data",
                              str(held), "-q", "-o", str(tmp_path / "v")])
    assert out.exit_code == 0, out.output
    evals = json.loads((tmp_path / "v" / "verify.json").read_text())["evals"]
    assert set(evals) == {"base", "tuned", "adapter", "svd"} and all(e["tokens"] > 0 for e in evals.values())
    out = runner.invoke(app, ["sweep", str(base), str(tuned), "--data", str(held), "--ranks", "1,2", "--bootstrap",
                              "0", "-q", "-o", str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["metric"]["name"] == "perplexity"
    out = runner.invoke(app, ["verify", str(base), str(tuned), "--sweep", "1,2", "--data", str(data), "--max-steps",
                              "2", "--eval-data", str(held), "-q", "-o", str(tmp_path / "rs")])
    assert out.exit_code == 0, out.output
    runs = json.loads((tmp_path / "rs" / "sweep.json").read_text())["runs"]
    assert [r["rank"] for r in runs] == [1, 2] and all(r["eval"]["tokens"] > 0 for r in runs)


def test_eval_file_of_pairs_tokenises_as_training_does(pair):
    _, base, _, _, held = pair
    _, data, _, _, tokenizer = prepare_data(base, held)
    again = tokenize_file(held, tokenizer, task="seq2seq_lm", max_length=data.max_length)
    assert again.ids == data.ids and again.targets == data.targets
