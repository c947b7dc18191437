"""extract's left-out notes where TUNED is a PEFT adapter, names the projector, or stores its values in a lower
precision than the base (review rev2: F1, F2, F3, F6). An adapter TUNED's trained biases (bias="lora_only"/"all")
and a head it saved whole that the base lacks were dropped by the adapter's planning before the notes could see them,
so extract said `complete` (and "lossless" at rank full) while PEFT's merge of its output missed them. The referee
is PEFT's own float64 merge of TUNED against that of the re-extracted adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as tf

from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.lora.test_extract_left_out import _advice
from tests.models import build_model, random_adapter, save, tiny_config


def _merged(model, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's float64 merge of `adapter_dir` onto a copy of `model` (a PeftModel: merged as it is)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, PeftModel):
            return copy.deepcopy(model).double().merge_and_unload().state_dict()
        merged = PeftModel.from_pretrained(copy.deepcopy(model).double(), str(adapter_dir)).merge_and_unload()
        return merged.state_dict()


def _biased_adapter(tmp_path, bias: str, moved: tuple[str, ...]):
    """A Qwen2 (q/k/v carry biases) base, and a LoRA on q and v trained with PEFT's `bias`, whose biases of the
    modules named in `moved` moved by 0.5: (base model, base dir, PEFT model, adapter dir)."""
    base = build_model("qwen2")
    b = save(base, tmp_path / "b", "safetensors")
    peft_model = random_adapter(base, tmp_path / "lora", r=2, target_modules=["q_proj", "v_proj"], bias=bias)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("bias") and any(f"{m}." in name for m in moved):
                p.add_(0.5)
    peft_model.save_pretrained(tmp_path / "lora")
    return base, b, peft_model, tmp_path / "lora"


def test_an_adapter_tuned_s_trained_biases_are_named_and_not_complete(tmp_path):
    base, b, peft_model, lora = _biased_adapter(tmp_path, "lora_only", moved=("q_proj",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(b, lora, "full", tmp_path / "re", progress=False)
    tuned, got = _merged(peft_model, None), _merged(base, tmp_path / "re")
    missed = {n for n, v in tuned.items() if not torch.allclose(got[n], v, rtol=1e-9, atol=1e-6)}
    assert missed == {f"model.layers.{i}.self_attn.q_proj.bias" for i in (0, 1)}  # the reference: v's did not move
    assert set(result.left_out_vectors) == missed and not result.complete
    assert result.notes[0].startswith("rank full is not lossless here") and "2 are biases of adapted" in result.notes[0]


def test_a_bias_outside_the_lora_is_advised_from_a_merged_checkpoint(tmp_path):
    """bias="all": k_proj (no LoRA) has its bias trained too; modules_to_save is advised, from TUNED merged, since
    extract saves modules whole from a checkpoint only."""
    _, b, _, lora = _biased_adapter(tmp_path, "all", moved=("k_proj",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(b, lora, 2, tmp_path / "re", roles=("q", "v"), progress=False)
    assert result.left_out_vectors == [f"model.layers.{i}.self_attn.k_proj.bias" for i in (0, 1)]
    assert _advice(result.notes, "modules_to_save") == ("k_proj",) and "merged into a checkpoint" in result.notes[-1]
    assert not result.complete


def test_unmoved_biases_an_adapter_saves_are_no_change(tmp_path):
    """Negative control: PEFT saves every bias of its LoRA layers under bias="lora_only"; untrained, they equal the
    base's, and a rank-full extract is complete, its merge PEFT's merge of TUNED."""
    base, b, peft_model, lora = _biased_adapter(tmp_path, "lora_only", moved=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(b, lora, "full", tmp_path / "re", progress=False)
    assert result.complete and result.notes == [] and result.left_out_vectors == []
    tuned, got = _merged(peft_model, None), _merged(base, tmp_path / "re")
    assert all(torch.allclose(got[n], v, rtol=1e-9, atol=1e-6) for n, v in tuned.items())


def _seq_cls_adapter(tmp_path):
    lm = build_model("llama")
    b = save(lm, tmp_path / "b", "safetensors")
    cfg = tiny_config("llama")
    cfg.num_labels, cfg.pad_token_id = 3, 0
    cls = tf.LlamaForSequenceClassification(cfg)
    cls.model.load_state_dict(lm.model.state_dict())
    # a fine-tune's size of update (the default 0.1 moves q and v by 3× their norm: 'no fine-tune of BASE')
    peft_model = random_adapter(cls, tmp_path / "lora", scale=0.02, r=2, target_modules=["q_proj", "v_proj"],
                                modules_to_save=["score"], task_type="SEQ_CLS")
    return b, peft_model, tmp_path / "lora"


def test_a_head_an_adapter_saved_whole_that_the_base_lacks_is_only_in_tuned(tmp_path):
    """A SEQ_CLS adapter on a causal-LM base saves `score` whole: named, not complete, and the advice (merge TUNED,
    save score whole) gives a complete adapter whose PEFT merge is PEFT's merge of TUNED."""
    b, peft_model, lora = _seq_cls_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(b, lora, "full", tmp_path / "re", progress=False)
        assert result.only_in_tuned == ["score.weight"] and not result.complete
        assert _advice(result.notes, "modules_to_save") == ("score",) and "merged into a checkpoint" in result.notes[0]
        merged = copy.deepcopy(peft_model).merge_and_unload()
        t = save(merged, tmp_path / "merged", "safetensors")
        carried = extract_adapter(b, t, "full", tmp_path / "re2", roles=("q", "v"), modules_to_save=("score",),
                                  progress=False)
    assert carried.complete and carried.notes == []
    cls = tf.LlamaForSequenceClassification(merged.config)
    cls.model.load_state_dict(build_model("llama").model.state_dict())  # the base's weights, score at random
    got, want = _merged(cls, tmp_path / "re2"), merged.double().state_dict()
    assert all(torch.allclose(got[n], v, rtol=1e-9, atol=1e-6) for n, v in want.items())


def test_a_causal_lm_adapter_has_nothing_only_in_tuned(tmp_path):
    """Negative control: the same LoRA without a head saved whole."""
    base = build_model("llama")
    b = save(base, tmp_path / "b", "safetensors")
    random_adapter(base, tmp_path / "lora", r=2, target_modules=["q_proj", "v_proj"])
    result = extract_adapter(b, tmp_path / "lora", "full", tmp_path / "re", progress=False)
    assert result.only_in_tuned == [] and result.complete and result.notes == []


def test_the_roles_advice_keeps_the_projector_that_stacks_add(tmp_path):
    """--stacks language,projector with the default roles adapts the projector's Linears; the advice for a changed
    embedding names projector among the roles, so following it (roles named: no stack roles) keeps them."""
    from tests.checkpoints.test_architectures_projector import _planted_pair

    base, tuned, b, _, _ = _planted_pair("llava", tmp_path)
    embed = next(n for n, _ in tuned.named_parameters() if n.endswith("embed_tokens.weight"))
    with torch.no_grad():
        tuned.get_parameter(embed).add_(2 ** -8)
    t = save(tuned, tmp_path / "t2", "safetensors")
    stacks = ("language", "projector")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = extract_adapter(b, t, 1, tmp_path / "a1", stacks=stacks, progress=False)
        roles = _advice(first.notes, "roles")
        assert "projector" in roles and "embed" in roles and "projector" in first.notes[-1].split(":")[0]
        second = extract_adapter(b, t, 1, tmp_path / "a2", roles=roles, stacks=stacks, progress=False)
        named_only = extract_adapter(b, t, 1, tmp_path / "a3", roles=tuple(r for r in roles if r != "projector"),
                                     stacks=stacks, progress=False)
    projector = {m.name for m in first.modules if "projector" in m.name}
    assert len(projector) == 2 and projector <= {m.name for m in second.modules}
    assert second.left_out == [] and second.complete
    assert len(named_only.left_out) == 2  # negative control: the advice as it was loses both projector Linears


def test_a_lower_precision_fine_tune_s_rounding_is_not_a_change(tmp_path):
    """An fp32 base and a bf16-stored fine-tune of q_proj: every other tensor differs by the cast alone. They are
    a note of their own, not changes left out; a norm the fine-tune moved is still one (negative control)."""
    base = build_model("llama")
    tuned = perturbed(base, names=("q_proj",)).to(torch.bfloat16)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    rounded = [n for n, p in base.state_dict().items() if not torch.equal(p, p.to(torch.bfloat16).float())]
    result = extract_adapter(b, t, "full", tmp_path / "re", roles=("q",), progress=False)
    assert result.complete and result.left_out == [] and result.left_out_vectors == []
    assert len(result.notes) == 1 and f"{len([n for n in rounded if 'q_proj' not in n])} tensor(s)" in result.notes[0]
    assert "bfloat16" in result.notes[0]
    assert sorted(result.storage_rounded) == sorted(n for n in rounded if "q_proj" not in n)
    from typer.testing import CliRunner

    from spectra.cli import app

    said = CliRunner().invoke(app, ["extract", str(b), str(t), "--rank", "full", "--roles", "q", "-o",
                                    str(tmp_path / "cli")])
    assert said.exit_code == 0, said.output
    assert "lossless: every tensor TUNED changed is in the adapter" in said.output
    assert "to within TUNED's storage rounding of the tensors a note names" in said.output
    got = _merged(base, tmp_path / "re")  # within the bf16 rounding of TUNED everywhere
    assert all(torch.allclose(got[n], v.double(), rtol=2 ** -8, atol=0) for n, v in tuned.state_dict().items())

    moved = copy.deepcopy(tuned)
    with torch.no_grad():
        moved.model.norm.weight.add_(0.25)
    t2 = save(moved, tmp_path / "t2", "safetensors")
    control = extract_adapter(b, t2, "full", tmp_path / "re2", roles=("q",), progress=False)
    assert control.left_out_vectors == ["model.norm.weight"] and not control.complete

    # targeted modules the fine-tune left alone (o, gate here, whose values bf16 rounds): a LoRA of their rounding
    # would be noise. Left out and counted in the rounding note; the merge is still TUNED to within its rounding.
    # All of them: refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = extract_adapter(b, t, 2, tmp_path / "wide", roles=("q", "o", "gate"), progress=False)
    assert all(m.name.endswith("q_proj") for m in wide.modules) and wide.complete
    cast = [n for n in rounded if n.endswith(("o_proj.weight", "gate_proj.weight"))]
    assert cast and set(cast) <= set(wide.storage_rounded)
    (note,) = [n for n in wide.notes if "lower-precision storage" in n]
    assert f"({len(cast)} of them targeted, left out" in note
    with pytest.raises(ConfigError, match=r"every targeted module \(\d+\) holds in TUNED exactly BASE's values"):
        extract_adapter(b, t, 2, tmp_path / "none", roles=("o", "gate"), progress=False)
    assert not (tmp_path / "none").exists()


def test_targets_all_unchanged_or_rounded_are_refused_as_such(tmp_path):
    """TUNED the fp32 base saved in bf16 (no fine-tune at all): of Llama's targets some hold values bf16 holds exactly
    (ΔW = 0), the rest those rounded. The rounded ones were left out and the rest refused as 'every ΔW is 0: all 7
    targeted modules are unchanged … (the same checkpoint twice?)', of 14 targets, rounding unsaid."""
    model = build_model("llama")
    b = save(model, tmp_path / "b", "safetensors")
    t = save(build_model("llama").to(torch.bfloat16), tmp_path / "t", "safetensors")
    state = model.state_dict()
    exact = [n for n, p in state.items() if "proj" in n and torch.equal(p, p.to(torch.bfloat16).float())]
    rounded = [n for n, p in state.items() if "proj" in n and n not in exact]
    assert exact and rounded  # the mix this case needs
    with pytest.raises(ConfigError) as refused:
        extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    message = str(refused.value)
    assert (f"every targeted module ({len(exact) + len(rounded)}) holds in TUNED exactly BASE's values "
            f"({len(exact)}) or them rounded to TUNED's storage dtype ({len(rounded)})") in message, message
    assert "same checkpoint twice" not in message and not (tmp_path / "ad").exists()
