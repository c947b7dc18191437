"""Truncation sweeps: exact end points, rank r against an independent numpy truncation, the CLI."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
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
from spectra.sweep_weights import ModelWeights
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


def extracted_adapter_eval(base, tuned, data, plan, folder):
    """(eval, tokens) of the adapter `spectra extract --plan` writes, loaded through PEFT on the base: what the
    sweep's plan point must equal."""
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter

    extract_adapter(base, tuned, plan, folder, progress=False)
    _, tokens, *_ = prepare_data(base, data, task="causal_lm", max_length=16)
    return evaluate(PeftModel.from_pretrained(load_model(base, task="causal_lm"), folder), tokens), tokens


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


def test_a_plan_made_from_another_base_is_refused_before_any_evaluation(llama):
    """extract and train refuse a plan whose analysis recorded another base's fingerprint; the sweep used it."""
    import dataclasses

    from spectra.checkpoints.source import open_checkpoint

    base, tuned, data = llama
    plan = a_plan({"model.layers.0.self_attn.q_proj": (2, (32, 32))})
    foreign = dataclasses.replace(plan, base={"path": "elsewhere", "fingerprint": "0123456789abcdef"})
    with pytest.raises(ConfigError, match="the plan was made from an analysis of another base"):
        truncation_sweep(base, tuned, data, ranks=[1], plan=foreign, config=FAST, progress=False)
    own = dataclasses.replace(plan, base={"path": "x", "fingerprint": open_checkpoint(base).fingerprint()["fingerprint"]})
    assert truncation_sweep(base, tuned, data, ranks=[1], plan=own, config=FAST, progress=False).points


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
    base, tuned, data = sharp_llama
    planned = {"model.layers.0.self_attn.q_proj": (3, (32, 32)), "model.layers.1.mlp.down_proj": (5, (32, 48)),
               "model.layers.0.self_attn.v_proj": (16, (16, 32))}  # v at its full rank: read from the fine-tune
    plan = a_plan(planned)
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, non_target="tuned", config=FAST,
                              progress=False)
    (point,) = [p for p in result.points if p["group"] == "plan"]
    assert point["non_target"] == "base" and point["rank"] is None

    expected, tokens = extracted_adapter_eval(base, tuned, data, plan, tmp_path / "adapter")
    # float32 forwards of W_base + ΔW_r against W_base·x + s·B(A·x): they agree to ~1e-7 relative
    assert point["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert point["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    # negative controls: the old point (the fine-tune with the planned modules truncated), and the base itself
    old = evaluate(truncated_by_hand(tuned, base, tuned, {n: r for n, (r, _) in planned.items()}), tokens)
    assert abs(old["loss"] - expected["loss"]) > 1.0
    assert abs(result.reference["base"]["loss"] - expected["loss"]) > 1e-3
    labels = result.figure().axes[0].get_legend_handles_labels()[1]  # drawn though no base curve was swept
    assert "plan (median rank; the rest from base)" in labels


def test_the_plan_point_of_a_classifier_takes_the_head_the_plans_adapter_saves(bert, tmp_path):
    """A sequence classifier's plan saves its head whole (modules_to_save, as PEFT trains it in full), and `spectra
    extract --plan` writes the fine-tune's head into the adapter: the plan point is that adapter on the base, the
    fine-tune's head included, not the base's (the base here has a head of the same shape)."""
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter
    from spectra.ranks.plan import SavedModule

    base, tuned, data = bert
    query = "bert.encoder.layer.0.attention.self.query"
    head = load_model(tuned, task="seq_cls").classifier
    saved = SavedModule("classifier", sum(p.numel() for p in head.parameters()), "SEQ_CLS")
    plan = replace(a_plan({query: (2, (32, 32))}), modules_to_save=(saved,))
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, non_target="base", config=FAST,
                              progress=False)
    (point,) = [p for p in result.points if p["group"] == "plan"]
    assert point["non_target"] == "base" and point["saved_from_tuned"] == ["classifier.bias", "classifier.weight"]
    labels = result.figure().axes[0].get_legend_handles_labels()[1]
    assert "plan (median rank; the rest from base, its saved head from tuned)" in labels

    extract_adapter(base, tuned, plan, tmp_path / "adapter", progress=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    _, tokens, *_ = prepare_data(base, data, task="seq_cls", max_length=16)
    expected = evaluate(PeftModel.from_pretrained(load_model(base, task="seq_cls"), tmp_path / "adapter"), tokens)
    assert point["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert point["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    # negative control: the same plan without the saved head keeps the base's head, a different function
    bare = truncation_sweep(base, tuned, data, ranks=[1], plan=a_plan({query: (2, (32, 32))}), non_target="base",
                            config=FAST, progress=False)
    (without,) = [p for p in bare.points if p["group"] == "plan"]
    assert without["loss"] != pytest.approx(expected["loss"], rel=1e-4)  # 4.8e-4 apart: 40× the match's tolerance
    assert "saved_from_tuned" not in without

    # switching between the plan point and the base's non-targets moves the head, and only the head
    model = load_model(tuned, task="seq_cls")
    weights = ModelWeights(model, base, tuned, plan=plan)
    base_head, tuned_head = (load_model(s, task="seq_cls").classifier.weight.detach().clone() for s in (base, tuned))
    embeddings = model.bert.embeddings.word_embeddings.weight
    ranks = tuple(0 for _ in weights.targets)  # the targets at the base's (no factors computed here)
    weights.apply(ranks, non_target="base")
    assert torch.equal(model.classifier.weight, base_head)
    kept = embeddings.detach().clone()
    weights.apply(ranks, non_target="plan")
    assert torch.equal(model.classifier.weight, tuned_head) and torch.equal(embeddings, kept)
    weights.apply(ranks, non_target="base")
    assert torch.equal(model.classifier.weight, base_head)


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


def evaluated_states(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The model's weights at each evaluation of a sweep, in order (the fine-tune, the base, then the points)."""
    states, real = [], sweep_module.example_stats

    def kept(model, *args, **kwargs):
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "example_stats", kept)
    return states


def truncated(W: np.ndarray, Wt: np.ndarray, rank: int) -> np.ndarray:
    """W + numpy's rank-`rank` Eckart–Young truncation of Wt − W."""
    U, S, Vh = np.linalg.svd(Wt - W)
    return W + (U[:, :rank] * S[:rank]) @ Vh[:rank]


@pytest.fixture(scope="module")
def planted_mixtral(tmp_path_factory):
    """The tiny Mixtral fine-tune with planted per-expert ranks 0…3 (checkpoints store experts.E.w1/w2/w3)."""
    from tests.models import planted_mixtral_pair

    folder = tmp_path_factory.mktemp("mixtral")
    _, base, tuned = planted_mixtral_pair(folder)
    return base, tuned, random_text(folder / "eval.txt", chars=16 * 10, seed=5)


# Mixtral's per-expert checkpoint matrices and where transformers 5 fuses them: (parameter, rows of parameter[e])
MIXTRAL_SLICES = {"w1": ("gate_up_proj", slice(0, 48)), "w3": ("gate_up_proj", slice(48, 96)),
                  "w2": ("down_proj", slice(None))}


def mixtral_slices(base, tuned):
    """(stored name, its slice of the fused parameter in a state dict, planted rank, W_base, W_tuned (out, in))."""
    from safetensors.torch import load_file

    from tests.models import EXPERT_RANKS

    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for (layer, expert), planted in EXPERT_RANKS.items():
        for proj, rank in zip(("w1", "w3", "w2"), planted):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}"
            parameter, rows = MIXTRAL_SLICES[proj]
            yield (name, lambda state, p=f"model.layers.{layer}.mlp.experts.{parameter}", e=expert, r=rows:
                   state[p][e][r], rank, b[name + ".weight"], t[name + ".weight"])


def test_experts_fused_on_loading_are_truncated_in_their_slices(planted_mixtral, monkeypatch):
    """transformers 5 fuses Mixtral's experts.E.w1/w3/w2 into gate_up_proj[E] (w1's rows, then w3's) and
    down_proj[E]: each expert's slice is W_base + its own rank-r truncation. They used to match no parameter and
    follow the non-targets (the fine-tune's at every rank), with a note."""
    base, tuned, data = planted_mixtral
    loaded = models_loaded(monkeypatch)
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1, 2], config=FAST, progress=False)
    assert loaded == [tuned.resolve()]  # every slice read from the checkpoints: the base model is not loaded
    assert len(states) == 4  # the fine-tune, the base, r=1, r=2
    fine_tune, base_state, rank1, rank2 = states
    modules = {m["name"] for m in result.data["modules"]}
    assert len(modules) == 2 * 4 + 2 * 3 * 3  # q, k, v, o and every expert's w1, w3, w2, per layer
    assert not any("no place" in n or "fused" in n for n in result.data["notes"])
    for name, place, planted, W, Wt in mixtral_slices(base, tuned):
        assert name in modules
        for state, rank in ((rank1, 1), (rank2, 2)):
            written = place(state).double().numpy()
            np.testing.assert_allclose(written, truncated(W.double().numpy(), Wt.double().numpy(), rank), rtol=0,
                                       atol=1e-6, err_msg=f"{name} r={rank}")
            # negative control: below its planted rank a slice is not the fine-tune's (here it was, at every rank)
            assert np.allclose(written, Wt.double().numpy(), rtol=0, atol=1e-6) == (planted <= rank), (name, rank)
        assert torch.equal(place(base_state), W) and torch.equal(place(fine_tune), Wt)  # the end points, exactly
        if planted == 0:  # untouched by the fine-tune: the base's at every rank
            assert torch.equal(place(rank1), W) and torch.equal(place(rank2), W)
    assert result.reference["base"]["loss"] == pytest.approx(reference_eval(base, data, "causal_lm")["loss"],
                                                             rel=1e-5)


def test_untargeted_experts_come_from_either_checkpoint_by_name(planted_mixtral, monkeypatch):
    """Experts left out of the targets (roles q only) follow the non-targets slice by slice: in base mode each is the
    base's checkpoint tensor, read by name; the base model is no longer loaded whole to read them."""
    base, tuned, data = planted_mixtral
    loaded = models_loaded(monkeypatch)
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], non_target="both", config=replace(FAST, roles=("q",)),
                              progress=False)
    assert loaded == [tuned.resolve()]
    assert [m["name"] for m in result.data["modules"]] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    fine_tune, base_state, tuned_r1, base_r1 = states  # modes tuned, base, tuned, base
    for name, place, planted, W, Wt in mixtral_slices(base, tuned):
        for state, expected in ((fine_tune, Wt), (base_state, W), (tuned_r1, Wt), (base_r1, W)):
            assert torch.equal(place(state), expected), name
    monkeypatch.undo()
    assert result.reference["base"]["loss"] == pytest.approx(reference_eval(base, data, "causal_lm")["loss"],
                                                             rel=1e-5)


def test_experts_without_calibration_moments_are_named(planted_mixtral, monkeypatch):
    """Calibration hooks Linear layers, and fused experts are none: with --calibration they are truncated by
    Eckart–Young (as extract --calibration does) while the sweep says data-optimal; the notes name them."""
    base, tuned, data = planted_mixtral
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], calibration=data, config=FAST, progress=False)
    assert result.data["truncation"] == "data-optimal"
    (note,) = [n for n in result.data["notes"] if "calibration" in n]
    assert note.startswith("18 targeted module(s) have no calibration moments") and "self_attn" not in note
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in note
    for name, place, planted, W, Wt in mixtral_slices(base, tuned):  # what the note says
        np.testing.assert_allclose(place(states[2]).double().numpy(),
                                   truncated(W.double().numpy(), Wt.double().numpy(), 1), rtol=0, atol=1e-6)


def test_a_fusion_spectra_does_not_invert_comes_from_the_base_model_and_is_named(tmp_path, monkeypatch):
    """Where transformers' conversion of a parameter's tensors is one spectra cannot invert (here: made so), the
    parameter is set whole as transformers loads the base model (loaded once), and the modules in it, not
    truncated, are named."""
    import spectra.sweep_weights as sweep_weights
    from spectra.checkpoints.placement import PlacementError

    def refused(checkpoint, parameter, *args, **kwargs):
        raise PlacementError(parameter, "not inverted")

    monkeypatch.setattr(sweep_weights, "split_sources", refused)
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
    (note,) = [n for n in result.data["notes"] if "no place" in n]
    assert note.startswith("18 module(s) have no place in the loaded MixtralForCausalLM")
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in note and "not truncated" in note
    assert len(result.data["modules"]) == 2 * 4


def test_a_plan_on_some_experts_truncates_their_slices_alone(planted_mixtral, monkeypatch):
    """A plan naming one expert's w1 truncates rows [0, 48) of gate_up_proj[1] at its rank; the rest of the
    parameter follows the non-targets (the plan point: the base's). The module was dropped from the targets with
    a note."""
    base, tuned, data = planted_mixtral
    expert = "model.layers.0.block_sparse_moe.experts.1.w1"  # planted rank 2
    plan = a_plan({"model.layers.0.self_attn.q_proj": (2, (32, 32)), expert: (1, (48, 32))})
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, config=FAST, progress=False)
    assert [m["name"] for m in result.data["modules"]] == ["model.layers.0.self_attn.q_proj", expert]
    assert not any(expert in n for n in result.data["notes"])
    fine_tune, base_state, rank1, plan_point = states
    for name, place, planted, W, Wt in mixtral_slices(base, tuned):
        if name == expert:
            for state in (rank1, plan_point):  # the plan's rank 1, below the planted 2: not the fine-tune's
                written = place(state).double().numpy()
                np.testing.assert_allclose(written, truncated(W.double().numpy(), Wt.double().numpy(), 1), rtol=0,
                                           atol=1e-6)
                assert not np.allclose(written, Wt.double().numpy(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(place(rank1), Wt) and torch.equal(place(plan_point), W), name


def test_experts_stored_stacked_are_truncated_in_their_layout(tmp_path, monkeypatch):
    """gpt-oss stores its experts as the model holds them, (E, in, out): expert e's ΔW is truncated and written into
    parameter[e] in that layout (gate_up_proj[e] is square: only the layout tells). A plan naming one expert leaves
    the others to the non-targets, which rewrite the whole parameter when they switch sides: the expert is written
    again after them. Expert slices of stored 3-D tensors used to be left out with a note."""
    from safetensors.torch import load_file

    from tests.checkpoints.test_adapter_pairing import tiny_gpt_oss

    base_model = tiny_gpt_oss()
    base, tuned = save(base_model, tmp_path / "b", "safetensors"), save(perturbed(base_model, 7), tmp_path / "t",
                                                                        "safetensors")
    data = random_text(tmp_path / "x.txt", chars=16 * 10, seed=5)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    weights = ModelWeights(load_model(tuned, task="causal_lm"), base, tuned)  # every block linear: each expert
    assert {f"model.layers.0.mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_up_proj", "down_proj")} <= \
        {t.name for t in weights.targets}
    assert key not in weights.non_target and not any("3-D" in n for n in weights.notes)

    expert = "model.layers.0.mlp.experts.1.gate_up_proj"
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=a_plan({expert: (2, (32, 32))}), non_target="both",
                              config=FAST, progress=False)
    assert [m["name"] for m in result.data["modules"]] == [expert] and not any("3-D" in n for n in result.data["notes"])
    W, Wt = load_file(base / "model.safetensors")[key], load_file(tuned / "model.safetensors")[key]  # (E, in, out)
    assert len(states) == 5  # the fine-tune, the base, r=1 on each side, the plan
    for state, rank, others in ((states[2], 1, Wt), (states[3], 1, W), (states[4], 2, W)):
        np.testing.assert_allclose(state[key][1].double().numpy(),
                                   truncated(W[1].double().numpy(), Wt[1].double().numpy(), rank), rtol=0, atol=1e-6)
        assert torch.equal(state[key][0], others[0]) and torch.equal(state[key][2], others[2])
    assert torch.equal(states[0][key], Wt) and torch.equal(states[1][key], W)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT maps experts itself
@pytest.mark.parametrize("rslora", [False, True])
def test_a_plan_point_with_experts_at_their_own_ranks_is_the_adapter_extract_writes(planted_mixtral, tmp_path, rslora):
    """PEFT adapts a fused expert parameter at one rank for all its experts, and converts per-expert names at the
    adapter's one global r. A plan giving experts their own ranks (within a parameter: w1 of experts 0, 1, 2 at 1, 2, 1;
    across parameters: w1 = w3 = 2 and w2 = 1 in every layer, what per-role functional ranks give) was refused by
    `spectra extract`, and the sweep noted its plan point as no adapter extract writes. Extract now writes them onto
    the fused parameters itself (the largest rank, the others padded with zeros): PEFT's merge gives each expert its
    own float64 truncation, with rsLoRA too, and the sweep has nothing to note."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from spectra.lora.extract import extract_adapter

    base, tuned, data = planted_mixtral
    expert = "model.layers.{}.block_sparse_moe.experts.{}.{}".format
    within = a_plan({expert(0, 0, "w1"): (1, (48, 32)), expert(0, 1, "w1"): (2, (48, 32)),
                     expert(0, 2, "w1"): (1, (48, 32))})
    across = a_plan({expert(layer, e, p): (r, shape) for layer in (0, 1) for e in range(3)
                     for p, r, shape in (("w1", 2, (48, 32)), ("w3", 2, (48, 32)), ("w2", 1, (32, 48)))})
    model = load_model(tuned, task="causal_lm")
    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for plan, folder in ((within, "within"), (across, "across")):
        assert not any("rank" in n and "extract" in n for n in ModelWeights(model, base, tuned, plan=plan).notes)
        extract_adapter(base, tuned, plan, tmp_path / folder, rslora=rslora, progress=False)
        merged = PeftModel.from_pretrained(load_model(base, task="causal_lm"), str(tmp_path / folder))
        state = merged.merge_and_unload().state_dict()
        truncated = 0  # negative control: some planned rank is below the planted one, so not the fine-tune there
        for module in plan.modules:
            layer, e, proj = int(module.name.split(".")[2]), int(module.name.split(".")[-2]), module.name.split(".")[-1]
            parameter, rows = MIXTRAL_SLICES[proj]
            W0, W1 = b[module.name + ".weight"].double().numpy(), t[module.name + ".weight"].double().numpy()
            U, S, Vt = np.linalg.svd(W1 - W0)
            want = W0 + (U[:, :module.rank] * S[:module.rank]) @ Vt[:module.rank]
            got = state[f"model.layers.{layer}.mlp.experts.{parameter}"][e][rows].double().numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{folder} {module.name}")
            truncated += not np.allclose(got, W1, atol=1e-4)
        assert truncated > 0, folder


def test_experts_stored_stacked_are_read_once_per_parameter_when_the_ranks_change(tmp_path, monkeypatch):
    """gpt-oss's experts are slices of one stored (E, in, out) tensor per projection: new ranks read that tensor
    whole once per expert (E reads per side and parameter). Now each side of it is read once per change of ranks,
    and every expert is still W_base + its own truncation (the fine-tune's at full rank)."""
    from collections import Counter

    from safetensors.torch import load_file

    from spectra.checkpoints.source import CheckpointSource
    from tests.checkpoints.test_adapter_pairing import tiny_gpt_oss

    base_model = tiny_gpt_oss()
    base, tuned = save(base_model, tmp_path / "b", "safetensors"), save(perturbed(base_model, 7), tmp_path / "t",
                                                                        "safetensors")
    weights = ModelWeights(load_model(tuned, task="causal_lm"), base, tuned)
    stacked = [f"model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")]
    assert sum(t.tuned_tensor in stacked for t in weights.targets) == 2 * 3  # 3 experts per parameter
    for t in weights.targets:  # what truncation_sweep computes once per module
        t.factors = torch.linalg.svd(weights.delta(t).double(), full_matrices=False)
    reads, read = Counter(), CheckpointSource.read

    def counted(self, name):
        reads["base" if self is weights.pairing.base else "tuned", name] += 1
        return read(self, name)

    monkeypatch.setattr(CheckpointSource, "read", counted)
    W, Wt = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for ranks, side in (((1,) * len(weights.targets), "base"), ((2,) * len(weights.targets), "base"),
                        (tuple(t.full_rank for t in weights.targets), "tuned")):
        reads.clear()
        weights.apply(ranks, non_target="tuned")
        assert {k: n for k, n in reads.items() if k[1] in stacked} == {(side, key): 1 for key in stacked}
        for key in stacked:
            for e in range(3):
                expected = Wt[key][e].double().numpy() if side == "tuned" else truncated(W[key][e].double().numpy(),
                                                                        Wt[key][e].double().numpy(), ranks[0])
                np.testing.assert_allclose(weights.state[key][e].double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT maps experts itself
def test_the_plan_point_on_fused_experts_is_the_extracted_adapter(planted_mixtral, tmp_path, monkeypatch):
    """The plan point of a plan over Mixtral's experts is what `spectra extract --plan` gives, loaded by PEFT onto
    the fused parameters (target_parameters): each expert slice the base's + its rank-2 truncation."""
    base, tuned, data = planted_mixtral
    planned = {"model.layers.0.self_attn.q_proj": (2, (32, 32))}
    planned |= {name: (2, tuple(W.shape)) for name, _, _, W, _ in mixtral_slices(base, tuned)}  # one rank: PEFT's
    plan = a_plan(planned)
    states = evaluated_states(monkeypatch)
    result = truncation_sweep(base, tuned, data, ranks=[1], plan=plan, config=FAST, progress=False)
    (point,) = [p for p in result.points if p["group"] == "plan"]
    plan_point = states[-1]
    for name, place, planted, W, Wt in mixtral_slices(base, tuned):
        np.testing.assert_allclose(place(plan_point).double().numpy(),
                                   truncated(W.double().numpy(), Wt.double().numpy(), 2), rtol=0, atol=1e-6)
    monkeypatch.undo()
    expected, tokens = extracted_adapter_eval(base, tuned, data, plan, tmp_path / "adapter")
    assert point["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert point["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    # negative controls: the base, and the plan without its experts (what the plan point measured before)
    without = evaluate(truncated_by_hand(base, base, tuned, {"model.layers.0.self_attn.q_proj": 2}), tokens)
    assert abs(result.reference["base"]["loss"] - expected["loss"]) > 1e-4
    assert abs(without["loss"] - expected["loss"]) > 1e-4


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


@pytest.fixture(scope="module")
def bert_analysis(bert, tmp_path_factory):
    base, tuned, _ = bert
    analysis = tmp_path_factory.mktemp("bert_analysis") / "analysis"
    assert CliRunner().invoke(app, ["analyze", str(base), str(tuned), "-o", str(analysis), "--no-cache",
                                    "-q"]).exit_code == 0
    return analysis


def test_cli_sweep_writes_report_and_functional_plan(bert, bert_analysis, tmp_path):
    base, tuned, data = bert
    runner = CliRunner()
    analysis = bert_analysis
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
    assert unswept == ["bert.pooler.dense"]
    # BERT's position and token-type tables are role pos_embed: the plan leaves them out as embeddings, unswept or not
    tables = {m["name"]: m["reason"] for m in plan["left_out"] if m["name"].startswith("bert.embeddings.")}
    assert sorted(tables) == ["bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
                              "bert.embeddings.word_embeddings"]
    assert all("embeddings/heads are targeted only when named in roles" in r for r in tables.values()), tables
    assert "loss vs rank" in result.output
    # 64 is above every module's full rank (32): the fine-tune itself, the only point within ε=0, said as such
    assert ("functional rank (model, ε=0): 64, full rank: no swept rank below full rank met ε (gap +0, interval "
            "[0, 0])") in result.output
    assert swept["functional"]["groups"]["model"]["at_full_rank"] is True
    assert "epsilon" not in swept["config"] and swept["config"]["calibration_epsilon"] == 1e-6  # not the ε of -e
    import math

    full = [p for p in swept["points"] if p["rank"] == 64]  # the fine-tune itself: a loss gap of −1·0.0 was stored
    assert full and all(math.copysign(1.0, x) == 1.0 for p in full for x in [p["gap"], *p["gap_interval"]]), full
    assert "64, full rank: no swept rank below full rank met ε" in (out / "report.md").read_text()
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
    with pytest.raises(ConfigError, match="different pairs: the swept tuned .* content differs"):
        recommend_ranks(analysis, functional, sweep=other)
    adapter = dict(analysed, tuned=dict(analysed["tuned"], format="peft-adapter"))  # tuned side not comparable
    assert recommend_ranks(adapter, functional, sweep=other).modules  # the base matches: accepted
    other_base = dict(moved, fingerprints=dict(swept["fingerprints"], base=swept["fingerprints"]["tuned"]))
    with pytest.raises(ConfigError, match="different pairs: the swept base .* content differs"):
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


def test_cli_sweep_writes_its_report_when_no_plan_is_needed_at_epsilon(bert, bert_analysis, tmp_path):
    """Rank 0 within ε everywhere: the plan failed after every evaluation ("lower functional", a library field) and
    nothing was written. The report is written, and the note says why plan.json is not, naming --epsilon."""
    base, tuned, data = bert
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--ranks", "0,1",
                                      "--metric", "loss", "--epsilon", "1e6", "--analysis", str(bert_analysis),
                                      "--bootstrap", "0", "--max-length", "16", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "sweep.json").is_file() and (out / "report.md").is_file() and not (out / "plan.json").exists()
    swept = json.loads((out / "sweep.json").read_text())
    assert swept["functional"]["groups"]["model"]["rank"] == 0  # the measured answer: no adapter needed
    assert "note: plan.json not written: The sweep is within ε=1e6 of the full fine-tune at rank 0" in result.output
    assert "(lower --epsilon)" in result.output and "functional" not in result.output
    assert "plan.json)" not in result.output
    # negative control: ε that rank 0 misses still writes the plan
    again = CliRunner().invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--ranks", "0,64",
                                     "--metric", "loss", "--epsilon", "0", "--analysis", str(bert_analysis),
                                     "--bootstrap", "0", "--max-length", "16", "-q", "-o", str(tmp_path / "s2")])
    assert again.exit_code == 0 and (tmp_path / "s2" / "plan.json").is_file(), again.output


def test_cli_sweep_refuses_an_analysis_of_another_pair_before_evaluating(bert, bert_analysis, tmp_path,
                                                                         monkeypatch):
    """--analysis of another pair was refused only after the whole sweep, with the advice to re-run the sweep."""
    base, tuned, data = bert
    analysed = json.loads((bert_analysis / "analysis.json").read_text())
    other = tmp_path / "other_analysis"
    other.mkdir()
    analysed["tuned"]["fingerprint"] = "0" * 16  # an analysis of another fine-tune of the same base
    (other / "analysis.json").write_text(json.dumps(analysed))

    def evaluated(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(sweep_module, "truncation_sweep", evaluated)
    result = CliRunner().invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--ranks", "1",
                                      "--epsilon", "0.01", "--analysis", str(other), "-o", str(tmp_path / "out")])
    message = str(result.exception)
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError), message
    assert message.startswith(f"the analysis and the sweep are of different pairs: the swept tuned {tuned} ")
    assert "Re-run `spectra sweep`" not in message and not (tmp_path / "out").exists()


def test_cli_sweep_terminal_table_has_the_plan_point_and_formatted_numbers(llama, tmp_path, monkeypatch):
    """The plan point was in report.md only; the functional interval printed as raw floats; a zero gap as "-0"."""
    from spectra.ranks import save_plan

    base, tuned, data = llama
    plan = save_plan(a_plan({"model.layers.0.self_attn.q_proj": (2, (32, 32)),
                             "model.layers.1.self_attn.v_proj": (2, (16, 32))}), tmp_path / "plan.json")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--plan", str(plan),
                                      "--ranks", "1,100", "--epsilon", "10", "--metric", "loss", "--bootstrap", "200",
                                      "--max-length", "16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    swept = SweepResult.load(tmp_path / "out")
    (planned,) = [p for p in swept.points if p["group"] == "plan"]
    rows = {cells[0]: cells[1:] for line in result.output.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 4}
    assert rows["plan"] == [f"{planned['metric']:.4g}", f"[{planned['interval'][0]:.4g}, {planned['interval'][1]:.4g}]",
                            f"{planned['gap']:+.4g}"]
    assert rows["100"][2] == "+0" and "plan: the base with the plan's adapter" in result.output
    one = swept.curve()[0]  # ε=10 is lenient: rank 1 is chosen, its gap interval printed as the table's cells
    lo, hi = one["gap_interval"]
    interval = f"[{lo + 0.0:.4g}, {hi + 0.0:.4g}]"
    assert (f"functional rank (model, ε=10): 1 (gap {one['gap']:+.4g}, interval {interval}, resolved)"
            in result.output.splitlines())
    assert not re.search(r"(?<![\w.])-0(?![.\d])", result.output)
    assert "report.md has" not in result.output  # one curve: nothing more to point at
    by_role = CliRunner().invoke(app, ["sweep", str(base), str(tuned), "--data", str(data), "--ranks", "1",
                                       "--by-role", "--roles", "q,v", "--bootstrap", "0", "--max-length", "16",
                                       "-o", str(tmp_path / "roles")])
    assert by_role.exit_code == 0, by_role.output
    assert ("the table is the whole model's curve with non-targets from tuned; report.md has 2 more: q (tuned), "
            "v (tuned)") in by_role.output


def test_an_adapter_as_the_fine_tune_is_refused_with_what_to_do(bert, tmp_path):
    """`sweep BASE ADAPTER` answered with the training message ("train on the model it adapts")."""
    from peft import LoraConfig, get_peft_model

    base, _, data = bert
    get_peft_model(build_model("bert"), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "ad")
    with pytest.raises(ConfigError, match="is a PEFT adapter, not a model.*merge_and_unload"):
        truncation_sweep(base, tmp_path / "ad", data, ranks=[1], config=FAST, progress=False)


def test_nothing_to_truncate_names_the_modules_that_have_no_place(llama):
    """A model that holds none of the pair's matrices: the error names them and the model class (it had said
    "no weight matrix of roles  pairs" with an empty role list under a plan)."""
    base, tuned, _ = llama
    stranger = build_model("gpt2")  # no parameter of a Llama name
    planned = {"model.layers.0.self_attn.q_proj": (2, (32, 32))}
    for plan in (None, a_plan(planned)):
        with pytest.raises(ConfigError) as err:
            ModelWeights(stranger, base, tuned, plan=plan)
        message = str(err.value)
        assert "place in the loaded GPT2LMHeadModel" in message and "roles  " not in message
        assert ("the weight matrix that pairs" in message and "has no place" in message if plan
                else "none of the 14 weight matrices that pair" in message and "model.layers.0.self_attn." in message)


def test_default_length_fits_a_short_position_table(bert, llama, tmp_path):
    """The bert pair has 32 positions: texts longer than that at the default max_length crashed its forward pass,
    in the eval and in the calibration. Both are cut at 32, said once; an explicit longer length is refused."""
    base, tuned, _ = bert
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"a review of item {i}, " + "and more words " * 3,
                                        "label": ("pos", "neg", "neu")[i % 3]}) + "\n" for i in range(12)))
    text = tmp_path / "calibration.txt"
    text.write_text("words to cut into blocks " * 20)
    config = SweepConfig(bootstrap=0)
    result = truncation_sweep(base, tuned, data, ranks=[1], calibration=text, config=config, progress=False)
    (note,) = [n for n in result.data["notes"] if "max_length" in n]  # the data's and the calibration's, once
    assert "cut at 32 tokens, not the default 128" in note and "max_position_embeddings = 32" in note
    assert result.data["calibration"]["max_length"] == 32 and result.data["examples"] == 12
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 64 is more than the model can take: its "
                                          r"table of learned positions covers 32 tokens"):
        truncation_sweep(base, tuned, data, ranks=[1], config=SweepConfig(bootstrap=0, max_length=64), progress=False)
    # negative control: Llama's 2048 positions leave the default alone, without a note
    base, tuned, text = llama
    result = truncation_sweep(base, tuned, text, ranks=[1], calibration=text, config=config, progress=False)
    assert result.data["calibration"]["max_length"] == 128
    assert not [n for n in result.data["notes"] if "max_length" in n]


@pytest.mark.parametrize("ranks", [[2.7, 1], [True], ["3", 1]])
def test_ranks_that_are_not_whole_numbers_are_refused(ranks):
    """int(2.7) had swept rank 2 and recorded it as asked; True had been rank 1."""
    from spectra.sweep import _check

    with pytest.raises(ConfigError, match="expected integers"):
        _check(ranks, "tuned", "model")
    import numpy as np

    assert _check([np.int64(4), 1, 4], "tuned", "model") == [1, 4]  # numpy integers are whole numbers
