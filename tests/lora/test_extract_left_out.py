"""extract names what TUNED changed that the adapter does not carry: `--rank full` was documented as lossless, yet a
changed embedding, head (outside the default roles) or norm was dropped without a word. The referee is PEFT's own
load and merge in float64: the tensors it fails to give back are exactly the ones the notes name, and following the
notes' advice gives every tensor (and the logits) back."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.lora.test_extract import perturbed
from tests.models import build_model, save, tiny_config
from tests.cli.test_cli import run

ALL = lambda name, p: True  # noqa: E731 - every parameter, vectors (norms, biases) too


def _missed(base, tuned, adapter_dir) -> set[str]:
    """The tensors of `tuned` that PEFT's float64 merge of the adapter onto `base` does not give back."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied layers
        merged = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(adapter_dir)).merge_and_unload()
    state = merged.state_dict()
    return {n for n, v in tuned.state_dict().items()
            if not torch.allclose(state[n], v.double(), rtol=1e-9, atol=1e-6)}


def _as_tensors(result) -> set[str]:
    return {f"{n}.weight" for n in result.left_out} | set(result.left_out_vectors) | set(result.only_in_tuned)


def _advice(notes: list[str], option: str) -> tuple[str, ...]:
    """The values a note advises for `option` (``modules_to_save=a,b``), all notes together."""
    return tuple(v for note in notes for m in re.findall(rf"\b{option}=([^\s);]+)", note) for v in m.split(","))


def _logits_gap(base, tuned, adapter_dir) -> float:
    from peft import PeftModel

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base).double(), str(adapter_dir)).merge_and_unload()
        return float((model(ids).logits - copy.deepcopy(tuned).double()(ids).logits).abs().max())


@pytest.fixture(scope="module")
def llama_all(tmp_path_factory):
    """A Llama fine-tune that moved every parameter: the default roles' matrices, embed_tokens, lm_head, the norms."""
    root = tmp_path_factory.mktemp("llama-all")
    base = build_model("llama")
    tuned = perturbed(base, select=ALL)
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


@pytest.mark.parametrize("rank", ["full", 2])
def test_the_notes_name_exactly_what_peft_merge_does_not_give_back(llama_all, tmp_path, rank):
    base, tuned, b, t = llama_all
    result = extract_adapter(b, t, rank, tmp_path / "ad", progress=False)
    assert result.left_out == ["lm_head", "model.embed_tokens"]
    assert result.left_out_vectors == [f"model.layers.{i}.{n}.weight" for i in (0, 1)
                                       for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]
    assert not result.complete and not result.only_in_tuned
    matrices, vectors = result.notes
    assert matrices.startswith("rank full is not lossless here: " if rank == "full" else "the adapter leaves out")
    assert "2 changed matrices outside the roles (q, k, v, o, gate, up, down): lm_head (head), model.embed_tokens " \
           "(embed)" in matrices and "roles=q,k,v,o,gate,up,down,embed,head" in matrices
    assert "5 changed vector(s)" in vectors
    assert "modules_to_save=input_layernorm,post_attention_layernorm,norm" in vectors
    if rank == "full":  # at full rank the adapter holds the rest exactly: what PEFT misses is what the notes name
        assert _missed(base, tuned, tmp_path / "ad") == _as_tensors(result)


def test_following_the_advice_gives_the_fine_tune_back(llama_all, tmp_path):
    base, tuned, b, t = llama_all
    notes = extract_adapter(b, t, "full", tmp_path / "first", progress=False).notes
    saved = extract_adapter(b, t, "full", tmp_path / "saved", modules_to_save=_advice(notes, "modules_to_save"),
                            progress=False)
    assert saved.notes == [] and saved.complete and not saved.left_out and not saved.left_out_vectors
    assert _missed(base, tuned, tmp_path / "saved") == set()
    assert _logits_gap(base, tuned, tmp_path / "saved") < 1e-5
    # the other advice for the matrices: their roles (LoRAs at full rank), the norms saved whole
    (roles,) = {_advice(notes, "roles")}
    both = extract_adapter(b, t, "full", tmp_path / "roles", roles=roles,
                           modules_to_save=("input_layernorm", "post_attention_layernorm", "norm"), progress=False)
    assert both.notes == [] and both.complete and _missed(base, tuned, tmp_path / "roles") == set()
    assert _logits_gap(base, tuned, tmp_path / "first") > 1e-2  # negative control: as first extracted, it is not


def test_nothing_is_said_where_nothing_is_left_out(tmp_path):
    """Only the default roles' matrices moved: no note, complete. A base stored in bfloat16 and a float32 fine-tune
    holding the same values elsewhere count as unchanged there; one ulp moved in a norm does not."""
    base = build_model("llama").to(torch.bfloat16)
    tuned = perturbed(base.float(), names=("self_attn", "mlp"))
    with torch.no_grad():  # the default roles' matrices on the bf16 grid too, so PEFT's merge in bf16 is what it is
        for p in tuned.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 3, tmp_path / "ad", progress=False)
    assert result.notes == [] and result.complete and not result.left_out and not result.left_out_vectors
    with torch.no_grad():
        w = tuned.model.norm.weight
        w[5] = torch.nextafter(w[5].to(torch.bfloat16), torch.tensor(9.0, dtype=torch.bfloat16)).float()
    t2 = save(tuned, tmp_path / "t2", "safetensors")
    moved = extract_adapter(b, t2, 3, tmp_path / "ad2", progress=False)
    assert moved.left_out_vectors == ["model.norm.weight"] and not moved.complete


def test_gpt2_names_its_embeddings_and_the_biases_no_lora_carries(tmp_path):
    """GPT-2's wte (tied to lm_head) and wpe are outside the default roles; the biases of c_attn, c_proj and c_fc
    belong to adapted modules, which a LoRA cannot carry; ln_1, ln_2, ln_f are saved whole on advice."""
    base = build_model("gpt2")
    tuned = perturbed(base, select=ALL)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", progress=False)
    assert result.left_out == ["transformer.wpe", "transformer.wte"]  # the tied head once, as its embedding
    biases = [f"transformer.h.{i}.{m}.bias" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]
    assert set(biases) < set(result.left_out_vectors) and len(result.left_out_vectors) == 18
    assert "8 are biases of adapted modules, which no LoRA carries" in result.notes[1]
    assert "modules_to_save=ln_1,ln_2,ln_f" in result.notes[1] and "modules_to_save=wpe,wte" in result.notes[0]
    missed = _missed(base, tuned, tmp_path / "ad")
    assert missed == _as_tensors(result) | {"lm_head.weight"}  # lm_head is wte (tied)
    advised = extract_adapter(b, t, "full", tmp_path / "ad2", modules_to_save=_advice(result.notes, "modules_to_save"),
                              progress=False)
    assert advised.left_out_vectors == biases and advised.left_out == []
    assert _missed(base, tuned, tmp_path / "ad2") == set(biases)  # what the remaining note says it cannot carry


def test_a_plan_and_experts_stored_stacked(tmp_path):
    """gpt-oss stores each layer's experts as one 3-D tensor: left out whole by --roles, it is named once; a plan
    holding expert 0 alone leaves the others out, each named (and compared) on its own."""
    from spectra.analysis import analyze
    from spectra.ranks import RankPolicy, recommend_ranks
    from tests.lora.test_extract_in_out_experts import _planted, _tiny

    base = _tiny("gpt_oss")
    tuned = _planted(base, 3, seed=1, attention=True)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q", "k", "v", "o"), progress=False)
    assert result.left_out == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                               for p in ("down_proj", "gate_up_proj")]
    assert "roles=q,k,v,o,down,gate_up" in result.notes[0]
    assert "modules_to_save" not in result.notes[0]  # an expert tensor is no module to save
    plan = recommend_ranks(analyze(b, t, progress=False), RankPolicy(rank=2, noise=False, include=r"re:experts\.0\."))
    planned = extract_adapter(b, t, plan, tmp_path / "plan", progress=False)
    experts = [n for n in planned.left_out if ".experts." in n]
    assert experts == [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in (1, 2)
                       for p in ("down_proj", "gate_up_proj")]
    assert "outside the plan" in planned.notes[0]
    # the exact options: the plan's roles (the experts') and the attention's, and why it left the other experts out
    assert ("plan them (spectra recommend --roles q,k,v,o,down,gate_up, the plan's other options as they were, for "
            "the 8 of roles it was not made for; the plan left the other 8 out for its own reasons, e.g. "
            "model.layers.0.mlp.experts.1.down_proj: name does not match include=") in planned.notes[0]


def test_the_cli_says_lossless_only_when_nothing_is_left_out(llama_all, monkeypatch, capsys, tmp_path):
    _, _, b, t = llama_all
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "full", "-q", "-o", tmp_path / "ad")
    assert code == 0, err
    assert "note: --rank full is not lossless here: the adapter leaves out 2 changed matrices" in err
    assert "--roles q,k,v,o,gate,up,down,embed,head" in err and "--modules-to-save lm_head,embed_tokens" in err
    assert "lossless:" not in out
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "full", "-q", "-o", tmp_path / "all",
                         "--modules-to-save", "lm_head,embed_tokens,input_layernorm,post_attention_layernorm,norm")
    assert code == 0 and "note:" not in err, err
    assert "lossless: every tensor TUNED changed is in the adapter" in out
    code, out, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "-q", "-o", tmp_path / "r2",
                         "--modules-to-save", "lm_head,embed_tokens,input_layernorm,post_attention_layernorm,norm")
    assert code == 0 and "note:" not in err and "lossless:" not in out, err  # complete, but truncated: not lossless


def test_a_head_only_in_tuned_and_an_adapter_as_tuned(tmp_path):
    """A classifier added by the fine-tune of a bare BertModel has no base tensor: named as only in TUNED, carried by
    --modules-to-save classifier. An adapter TUNED's LoRA on embed_tokens, re-extracted with the default roles, is a
    changed matrix left out (its ΔW is PEFT's merged update, not a stored pair)."""
    from tests.models import random_adapter

    bare = build_model("bert", head=False)
    classifier = build_model("bert", head=True)
    classifier.bert.load_state_dict(bare.state_dict())
    tuned = perturbed(classifier, names=("attention.self",))
    b, t = save(bare, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q", "k", "v"), progress=False)
    assert result.only_in_tuned == ["classifier.bias", "classifier.weight"] and not result.complete
    assert result.left_out == [] and "modules_to_save=classifier" in result.notes[-1]
    saved = extract_adapter(b, t, 2, tmp_path / "saved", roles=("q", "k", "v"), modules_to_save=("classifier",),
                            progress=False)
    assert saved.notes == [] and saved.complete  # negative control

    # a layer BASE lacks (TUNED has one more): its modules are not advised as modules_to_save, whose short names
    # (q_proj, …) matched every layer's and which extract then refused (BASE's model has no layer 2)
    import transformers as tf

    config = tiny_config("llama")
    deeper = tf.LlamaForCausalLM(tf.LlamaConfig(**(config.to_dict() | {"num_hidden_layers": 3})))
    shallow = tf.LlamaForCausalLM(config)
    deeper.load_state_dict(shallow.state_dict(), strict=False)  # BASE's layers, and one more
    deeper = perturbed(deeper, names=("self_attn",))
    b, t = save(shallow, tmp_path / "b2", "safetensors"), save(deeper, tmp_path / "t3", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad3", progress=False)
    (note,) = [n for n in result.notes if "only in TUNED" in n]
    assert "modules_to_save" not in note and "of layers or experts BASE does not have (model.layers.2." in note
    # biases of modules BASE has (TUNED's attention_bias=True): said as a config difference, not as layers BASE
    # lacks ("8 module(s) are of layers or experts BASE does not have (model.layers.0.self_attn.k_proj, …")
    biased = tf.LlamaForCausalLM(tf.LlamaConfig(**(config.to_dict() | {"attention_bias": True})))
    biased.load_state_dict(shallow.state_dict(), strict=False)
    t = save(perturbed(biased, names=("mlp",)), tmp_path / "tb", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "adb", progress=False)
    (note,) = [n for n in result.notes if "only in TUNED" in n]
    assert len(result.only_in_tuned) == 8 and all(n.endswith("_proj.bias") for n in result.only_in_tuned)
    assert "They are tensors of modules BASE has, built there without them" in note
    assert "BASE does not have" not in note and "modules_to_save" not in note

    llama = build_model("llama")
    random_adapter(llama, tmp_path / "lora", r=2, target_modules=["q_proj", "embed_tokens"],
                   save_embedding_layers=False)
    b = save(llama, tmp_path / "lb", "safetensors")
    result = extract_adapter(b, tmp_path / "lora", 2, tmp_path / "re", progress=False)
    assert result.left_out == ["model.embed_tokens"] and result.left_out_vectors == [] and not result.complete
    both = extract_adapter(b, tmp_path / "lora", 2, tmp_path / "re2", roles=("q", "embed"), progress=False)
    assert both.notes == [] and both.complete
