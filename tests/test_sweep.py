"""Truncation sweeps: exact end points, rank r against an independent numpy truncation, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import spectra.sweep as sweep_module
from spectra.cli import app
from spectra.errors import ConfigError
from spectra.lora.data import prepare_data
from spectra.lora.train import evaluate, load_model
from spectra.sweep import SweepConfig, SweepResult, truncation_sweep
from tests.lora.conftest import classification_jsonl, random_text
from tests.models import build_model, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = SweepConfig(bootstrap=200, max_length=16)


def perturbed(model, seed: int, scale: float = 0.3):
    """A stand-in full fine-tune: every tensor (targets, norms, biases, head) moved at random."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p += scale * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g)
    return tuned


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    base = build_model("bert")  # with its classifier, so "base" is a whole model to compare with
    save(base, folder / "base", "safetensors")
    save(perturbed(base, 3), folder / "tuned", "safetensors")
    return folder / "base", folder / "tuned", classification_jsonl(folder / "eval.jsonl", n=24)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    base = build_model("llama")
    save(base, folder / "base", "safetensors")
    save(perturbed(base, 4), folder / "tuned", "safetensors")
    return folder / "base", folder / "tuned", random_text(folder / "eval.txt", chars=16 * 10, seed=5)


def reference_eval(spec, data, task):
    _, tokens, *_ = prepare_data(spec, data, task=task, max_length=16)
    return evaluate(load_model(spec, task=task), tokens, batch_size=32)


def test_end_points_are_the_tuned_and_base_models(bert, monkeypatch):
    base, tuned, data = bert
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return factors(*args, **kwargs)

    factors = sweep_module.truncation_factors
    monkeypatch.setattr(sweep_module, "truncation_factors", counting)
    result = truncation_sweep(base, tuned, data, ranks=[0, 1, 64], non_target="both", config=FAST, progress=False)
    points = {(p["non_target"], p["rank"]): p for p in result.points}
    assert len(calls) == 12 and set(calls) == {32}  # one SVD per module (2 layers × q,k,v,o,up,down), to max rank
    assert result.data["metric"]["name"] == "accuracy" and result.data["examples"] == 24

    tuned_ref, base_ref = reference_eval(tuned, data, "seq_cls"), reference_eval(base, data, "seq_cls")
    full, zero = points[("tuned", 64)], points[("base", 0)]
    assert full["metric"] == result.reference["tuned"]["metric"] == tuned_ref["accuracy"]
    assert full["loss"] == result.reference["tuned"]["loss"] == pytest.approx(tuned_ref["loss"], rel=1e-6)
    assert zero["loss"] == result.reference["base"]["loss"] == pytest.approx(base_ref["loss"], rel=1e-6)
    assert zero["accuracy"] == base_ref["accuracy"]
    assert full["gap"] == 0.0 and full["gap_interval"] == [0.0, 0.0]
    # the non-targeted tensors matter, and both choices are reported
    assert points[("tuned", 0)]["loss"] != pytest.approx(base_ref["loss"], rel=1e-4)
    assert points[("base", 64)]["loss"] != pytest.approx(tuned_ref["loss"], rel=1e-4)
    for p in result.points:
        assert p["interval"][0] <= p["metric"] <= p["interval"][1]


def test_rank_r_is_the_eckart_young_truncation(llama, tmp_path):
    """A rank-2 point equals the model rebuilt by hand from numpy's SVD of every targeted ΔW."""
    base, tuned, data = llama
    result = truncation_sweep(base, tuned, data, ranks=[2], groups="both", config=FAST, progress=False,
                              metric=lambda logits, batch: logits[:, -1].max(-1).values)
    (point,) = [p for p in result.points if p["group"] == "model"]
    model = load_model(tuned, task="causal_lm")
    base_state = load_model(base, task="causal_lm").state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                W0 = base_state[name].double().numpy()
                U, s, Vt = np.linalg.svd(param.detach().double().numpy() - W0)
                param.copy_(torch.from_numpy(W0 + (U[:, :2] * s[:2]) @ Vt[:2]))
    _, tokens, *_ = prepare_data(base, data, task="causal_lm", max_length=16)
    expected = evaluate(model, tokens)
    assert point["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert point["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert result.data["metric"]["name"] == "<lambda>" and result.data["unit"] == "tokens"
    roles = {p["group"] for p in result.points} - {"model"}
    assert roles == {"q", "k", "v", "o", "gate", "up", "down"}
    assert SweepResult(json.loads(json.dumps(result.to_dict()))).curve(group="v")[0]["rank"] == 2
    path = result.write_report(tmp_path / "report", marks={"energy 0.9": 4})
    assert {p.name for p in (path / "figures").iterdir()} == {"curve.png", "curve.svg", "roles.png", "roles.svg"}
    assert SweepResult.load(path).data["marks"] == {"energy 0.9": 4}
    assert "perplexity" not in (path / "report.md").read_text() and "<lambda>" in (path / "report.md").read_text()


def test_a_plan_is_staged_with_the_report_and_renamed_with_it(llama, tmp_path, monkeypatch):
    """plan.json is in the staging directory before its one rename; a failing plan leaves no output at all."""
    import spectra.files
    import spectra.ranks
    from spectra.ranks import RankPlan, load_plan

    base, tuned, data = llama
    result = truncation_sweep(base, tuned, data, ranks=[1], config=FAST, progress=False)
    staged = []
    real_move = spectra.files.move_into_place

    def spy(staging, out):
        staged.append(sorted(p.name for p in staging.iterdir()))
        real_move(staging, out)

    monkeypatch.setattr(spectra.files, "move_into_place", spy)
    path = result.write_report(tmp_path / "out", plan=RankPlan(modules=()))
    assert staged == [["figures", "plan.json", "report.html", "report.md", "sweep.json"]]
    assert sorted(p.name for p in path.iterdir()) == staged[0] and load_plan(path / "plan.json").modules == ()

    def broken(plan, target):
        Path(target).write_text("{")  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(spectra.ranks, "save_plan", broken)
    with pytest.raises(OSError, match="No space"):
        result.write_report(tmp_path / "failed", plan=RankPlan(modules=()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no output folder, no staging leftovers
    with pytest.raises(OSError, match="No space"):
        result.write_report(path, plan=RankPlan(modules=()), overwrite=True)
    assert (path / "plan.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # kept as it was


def a_plan(planned: dict[str, tuple[int, tuple[int, int]]]):
    """A RankPlan of module name -> (rank, (out, in)), alpha 2r."""
    from spectra.ranks import RankPlan
    from spectra.ranks.plan import ModuleRank

    return RankPlan(modules=tuple(ModuleRank(name, None, None, shape, rank, 2.0 * rank, 0.0, 0.0, 0, "test")
                                  for name, (rank, shape) in planned.items()))


def truncated_by_hand(spec, base, tuned, ranks: dict[str, int]):
    """The model saved at ``spec`` with each named module set to W_base + numpy's rank-r truncation of ΔW."""
    model = load_model(spec, task="causal_lm")
    base_state, tuned_state = (load_model(s, task="causal_lm").state_dict() for s in (base, tuned))
    with torch.no_grad():
        for name, rank in ranks.items():
            W0 = base_state[name + ".weight"].double().numpy()
            U, s, Vt = np.linalg.svd(tuned_state[name + ".weight"].double().numpy() - W0)
            model.get_parameter(name + ".weight").copy_(torch.from_numpy(W0 + (U[:, :rank] * s[:rank]) @ Vt[:rank]))
    return model


def test_plan_point_uses_the_planned_ranks_even_above_the_swept_ones(llama):
    """A plan asking more rank than any swept point gets its own rank, not the largest swept one."""
    base, tuned, data = llama
    planned = {"model.layers.0.self_attn.q_proj": (6, (32, 32)), "model.layers.1.mlp.down_proj": (5, (32, 48))}
    _, tokens, *_ = prepare_data(base, data, task="causal_lm", max_length=16)
    expected = evaluate(truncated_by_hand(base, base, tuned, {n: r for n, (r, _) in planned.items()}), tokens)
    for swept in ([2], [0]):
        result = truncation_sweep(base, tuned, data, ranks=swept, plan=a_plan(planned), config=FAST, progress=False)
        (point,) = [p for p in result.points if p["group"] == "plan"]
        assert point["loss"] == pytest.approx(expected["loss"], rel=1e-5), swept


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """A llama pair whose loss tells its tensors apart: a 16× head (logits well away from uniform), every tensor
    moved by its own norm."""
    folder = tmp_path_factory.mktemp("sharp_llama")
    base = build_model("llama")
    with torch.no_grad():
        base.lm_head.weight.mul_(16)  # a power of two: the weights stay on the tests' exact grid
    save(base, folder / "base", "safetensors")
    save(perturbed(base, 4, scale=1.0), folder / "tuned", "safetensors")
    return folder / "base", folder / "tuned", random_text(folder / "eval.txt", chars=16 * 10, seed=5)


def test_the_plan_point_is_the_base_with_the_plans_extracted_adapter(sharp_llama, tmp_path):
    """The plan point is what `spectra extract --plan` gives: loaded through PEFT on the base, the same loss.

    It used to keep every tensor outside the plan (norms, head, the modules the plan leaves out) at the
    fine-tune's under the default non_target="tuned": a loss no adapter of the plan has (9.83 here, the
    adapter's 5.65).
    """
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter

    base, tuned, data = sharp_llama
    planned = {"model.layers.0.self_attn.q_proj": (3, (32, 32)), "model.layers.1.mlp.down_proj": (5, (32, 48)),
               "model.layers.0.self_attn.v_proj": (16, (16, 32))}  # v at its full rank: read from the fine-tune
    plan = a_plan(planned)
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, non_target="tuned", config=FAST,
                              progress=False)
    (point,) = [p for p in result.points if p["group"] == "plan"]
    assert point["non_target"] == "base" and point["rank"] is None

    extract_adapter(base, tuned, plan, tmp_path / "adapter", progress=False)
    adapted = PeftModel.from_pretrained(load_model(base, task="causal_lm"), tmp_path / "adapter")
    _, tokens, *_ = prepare_data(base, data, task="causal_lm", max_length=16)
    expected = evaluate(adapted, tokens)
    # float32 forwards of W_base + ΔW_r against W_base·x + s·B(A·x): they agree to ~1e-7 relative
    assert point["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert point["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    # negative controls: the old point (the fine-tune with the planned modules truncated), and the base itself
    old = evaluate(truncated_by_hand(tuned, base, tuned, {n: r for n, (r, _) in planned.items()}), tokens)
    assert abs(old["loss"] - expected["loss"]) > 1.0
    assert abs(result.reference["base"]["loss"] - expected["loss"]) > 1e-3
    labels = result.figure().axes[0].get_legend_handles_labels()[1]  # drawn though no base curve was swept
    assert "plan (median rank; the rest from base)" in labels


def models_loaded(monkeypatch) -> list[Path]:
    """The folders transformers' from_pretrained loads a model from, from now on."""
    import transformers

    loaded, real = [], transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(Path(path).resolve())
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    return loaded


def test_a_head_the_checkpoint_names_differently_comes_from_the_base(tmp_path, monkeypatch):
    """gpt_neox saves its head as embed_out, the model calls it lm_head: base mode must still use the base's,
    read as transformers renames it, from the checkpoint: the base model is not loaded (it was, whole, in
    float32 on the CPU, to read one tensor)."""
    base_model = build_model("gpt_neox")
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():  # only the head moves: every targeted ΔW is zero
        tuned_model.get_output_embeddings().weight.add_(0.5 * torch.randn_like(tuned_model.get_output_embeddings().weight))
    base, tuned = save(base_model, tmp_path / "b", "safetensors"), save(tuned_model, tmp_path / "t", "safetensors")
    data = random_text(tmp_path / "x.txt", chars=16 * 10, seed=5)
    loaded = models_loaded(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], non_target="both", config=FAST, progress=False)
    assert loaded == [tuned.resolve()]  # the fine-tune, evaluated; not the base
    assert result.reference["base"]["loss"] == pytest.approx(reference_eval(base, data, "causal_lm")["loss"], rel=1e-5)
    assert result.reference["tuned"]["loss"] == pytest.approx(reference_eval(tuned, data, "causal_lm")["loss"],
                                                              rel=1e-5)
    assert abs(result.reference["base"]["loss"] - result.reference["tuned"]["loss"]) > 0.1  # the heads differ
    by_mode = {p["non_target"]: p["loss"] for p in result.points if p["group"] == "model"}
    assert by_mode == pytest.approx({"base": result.reference["base"]["loss"],  # and switching back restores it
                                     "tuned": result.reference["tuned"]["loss"]}, rel=1e-9)
    assert not any(n.startswith("lm_head.weight") for n in result.data["notes"])  # nothing to say about it


def test_tensors_fused_on_loading_come_from_the_base_model(tmp_path, monkeypatch):
    """Mixtral's per-expert weights are fused into one tensor on loading: in base mode they are the base's, as
    transformers loads the base model (then loaded, once)."""
    base_model = build_model("mixtral")
    base, tuned = save(base_model, tmp_path / "b", "safetensors"), save(perturbed(base_model, 6), tmp_path / "t",
                                                                        "safetensors")
    data = random_text(tmp_path / "x.txt", chars=16 * 10, seed=5)
    loaded = models_loaded(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], non_target="both", config=FAST, progress=False)
    assert loaded == [tuned.resolve(), base.resolve()]
    monkeypatch.undo()
    assert result.reference["base"]["loss"] == pytest.approx(reference_eval(base, data, "causal_lm")["loss"], rel=1e-5)
    assert result.reference["tuned"]["loss"] == pytest.approx(reference_eval(tuned, data, "causal_lm")["loss"],
                                                              rel=1e-5)
    assert abs(result.reference["base"]["loss"] - result.reference["tuned"]["loss"]) > 1e-3
    assert any(n.startswith("model.layers.0.mlp.experts.gate_up_proj: fused") for n in result.data["notes"])


def test_planned_modules_the_loaded_model_fuses_are_named_in_the_notes(tmp_path):
    """Mixtral's per-expert checkpoint matrices are fused into one parameter on loading, so the sweep cannot
    truncate them: a plan naming one used to drop it from the targets without a word."""
    base_model = build_model("mixtral")
    base, tuned = save(base_model, tmp_path / "b", "safetensors"), save(perturbed(base_model, 6), tmp_path / "t",
                                                                        "safetensors")
    data = random_text(tmp_path / "x.txt", chars=16 * 10, seed=5)
    expert = "model.layers.0.block_sparse_moe.experts.1.w1"
    plan = a_plan({"model.layers.0.self_attn.q_proj": (2, (32, 32)), expert: (3, (48, 32))})
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, config=FAST, progress=False)
    assert [m["name"] for m in result.data["modules"]] == ["model.layers.0.self_attn.q_proj"]
    (note,) = [n for n in result.data["notes"] if expert in n]
    assert "not truncated" in note and "the plan point: the base's" in note


def test_a_fine_tune_without_the_datas_head_is_refused(llama, tmp_path):
    """A causal-LM fine-tune swept on labelled data: its classifier head would start at random (unseeded: two
    runs gave tuned accuracy 0.81 and 0.38) and the notes said it came from the fine-tune."""
    base, tuned, _ = llama
    data = classification_jsonl(tmp_path / "labels.jsonl", n=12)
    with pytest.raises(ConfigError, match="has no score.weight.*start at random"):
        truncation_sweep(base, tuned, data, ranks=[1], config=FAST, progress=False)


def test_a_teacher_whose_head_the_labels_do_not_fit_is_refused(tmp_path):
    """A bare base, labels 0/1 (a new 2-class head) and a 3-class teacher: the teacher's trained head was
    replaced by a random 2-class one and the adapter distilled from it."""
    import transformers as tf

    from spectra.lora.train import TrainConfig, train_adapter

    bare = build_model("bert", head=False)
    bare.config.num_labels = 2  # the new head: max(configured 2, largest label + 1) = 2 classes
    base = save(bare, tmp_path / "base", "safetensors")
    config = copy.deepcopy(build_model("bert").config)
    config.num_labels = 3
    save(tf.BertForSequenceClassification(config), tmp_path / "teacher", "safetensors")
    data = tmp_path / "two.jsonl"  # integer labels 0 and 1: ids of the teacher's three classes
    data.write_text("".join(json.dumps({"text": f"{('good', 'bad')[i % 2]} item {i}", "label": i % 2}) + "\n"
                            for i in range(12)))
    with pytest.raises(ConfigError, match=r"classifier.weight \(stored \(3, 32\), needed \(2, 32\)\)"):
        train_adapter(base, data, TrainConfig(rank=2, teacher=str(tmp_path / "teacher"), max_steps=1), tmp_path / "ad",
                      progress=False)
    assert not (tmp_path / "ad").exists()


def test_bad_options(bert):
    base, tuned, data = bert
    with pytest.raises(ConfigError, match="non_target"):
        truncation_sweep(base, tuned, data, ranks=[1], non_target="adapter", progress=False)
    with pytest.raises(ConfigError, match="ranks"):
        truncation_sweep(base, tuned, data, ranks=[-1], progress=False)
    with pytest.raises(ConfigError, match="confidence"):
        SweepConfig(confidence=1.5)


def test_cli_sweep_writes_report_and_functional_plan(bert, tmp_path):
    base, tuned, data = bert
    runner = CliRunner()
    analysis = tmp_path / "analysis"
    assert runner.invoke(app, ["analyze", str(base), str(tuned), "-o", str(analysis), "--no-cache", "-q"]).exit_code == 0
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--ranks", "1,64",
                                 "--metric", "loss", "--epsilon", "0", "--analysis", str(analysis),
                                 "--bootstrap", "100", "--max-length", "16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"sweep.json", "report.md", "report.html", "figures", "plan.json"}
    assert (out / "figures" / "curve.png").is_file()
    plan, swept = json.loads((out / "plan.json").read_text()), json.loads((out / "sweep.json").read_text())
    chosen = plan["functional"]["groups"]["model"]["rank"]
    assert plan["policy"]["functional"] == 0.0 and swept["marks"] == {"functional ε=0": chosen}
    assert len(plan["modules"]) == 12 and {m["rank"] for m in plan["modules"]} == {min(chosen, 32)}
    unswept = [m["name"] for m in plan["left_out"] if m["reason"].startswith("not truncated by the sweep")]
    assert sorted(unswept) == ["bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
                               "bert.pooler.dense"]
    assert "functional rank (model, ε=0)" in result.output and "loss vs rank" in result.output
    # the same plan from `spectra recommend`, from the analysis and the sweep on disk
    again_plan = runner.invoke(app, ["recommend", str(analysis), "--functional", "0", "--sweep", str(out), "--json"])
    assert again_plan.exit_code == 0, again_plan.output
    recommended = json.loads(again_plan.output)
    assert [(m["name"], m["rank"]) for m in recommended["modules"]] == [(m["name"], m["rank"]) for m in plan["modules"]]
    half = runner.invoke(app, ["recommend", str(analysis), "--functional", "0"])  # ε without the sweep it reads
    assert half.exit_code != 0 and "--sweep" in str(half.exception or half.output)
    # a sweep of another pair is refused: by the fingerprints it recorded (wherever the files are now),
    # by content where an older sweep's paths exist here, by module names otherwise
    from spectra.ranks import RankPolicy, recommend_ranks

    analysed = json.loads((analysis / "analysis.json").read_text())
    assert swept["fingerprints"] == {side: analysed[side]["fingerprint"] for side in ("base", "tuned")}
    functional = RankPolicy(energy=None, functional=0.0)
    moved = dict(swept, base="/moved/away", tuned="hub-user/model")  # recorded fingerprints decide, not paths
    assert recommend_ranks(analysis, functional, sweep=moved).modules
    other = dict(moved, fingerprints=dict(swept["fingerprints"], tuned=swept["fingerprints"]["base"]))
    with pytest.raises(ConfigError, match="tuned .* content differs"):
        recommend_ranks(analysis, functional, sweep=other)
    adapter = dict(analysed, tuned=dict(analysed["tuned"], format="peft-adapter"))  # tuned side not comparable
    assert recommend_ranks(adapter, functional, sweep=other).modules  # the base matches: accepted
    other_base = dict(moved, fingerprints=dict(swept["fingerprints"], base=swept["fingerprints"]["tuned"]))
    with pytest.raises(ConfigError, match="base .* content differs"):
        recommend_ranks(adapter, functional, sweep=other_base)
    older = {k: v for k, v in swept.items() if k != "fingerprints"}  # a sweep.json from before fingerprints
    with pytest.raises(ConfigError, match="tuned .* content differs"):
        recommend_ranks(analysis, functional, sweep=dict(older, tuned=str(base)))  # same names, other content
    renamed = dict(older, base="/moved/away", tuned="/moved/away",
                   modules=[dict(m, name="other." + m["name"]) for m in swept["modules"]])
    with pytest.raises(ConfigError, match="was it run on another model"):
        recommend_ranks(analysis, functional, sweep=renamed)
    again = runner.invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "-o", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception or again.output)


def test_an_adapter_as_the_fine_tune_is_refused_with_what_to_do(bert, tmp_path):
    """`sweep BASE ADAPTER` answered with the training message ("train on the model it adapts")."""
    from peft import LoraConfig, get_peft_model

    base, _, data = bert
    get_peft_model(build_model("bert"), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "ad")
    with pytest.raises(ConfigError, match="is a PEFT adapter, not a model.*merge_and_unload"):
        truncation_sweep(base, tmp_path / "ad", data, ranks=[1], config=FAST, progress=False)
