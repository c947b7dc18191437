"""verify's eval rows of a LoRA on a tied weight (Qwen2's embedding shared with its head) describe one model.

A LoRA on ``embed_tokens`` of a tied model changes the lookup only in PEFT's unmerged model (the head keeps reading
the base weight), and both after ``merge_and_unload()``, which adds ΔW to the shared Parameter, as the full
fine-tune moved both. The per-module measures and the truncated-SVD row are of the merged update, so the 'adapter'
row is evaluated merged too, and PEFT's unmerged model is the 'adapter_unmerged' row. References: float64
transformers models, PEFT's own merge, float64 SVDs; an untied Llama and PEFT's ``ensure_weight_tying`` as
controls, where nothing is merged or added.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.lora.extract import extract_adapter
from spectra.lora.train import quiet_peft
from spectra.lora.verify import verify_adapter
from tests.lora.conftest import random_text
from tests.models import build_model, random_adapter, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
RANK = 3


def moved_matrices(model, seed: int, scale: float = 1e-2):
    """A stand-in full fine-tune: every 2-D parameter moved by full-rank noise (a tied embedding moves its head)."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.ndim == 2:
                p += scale * torch.randn(p.shape, generator=g)
    return tuned


def float64_losses(folder, data, models: dict) -> dict:
    """Mean next-token cross-entropy of each model in float64, one example at a time (spectra's tokenization)."""
    from spectra.lora.data import prepare_tokenizer, tokenize_file

    _, max_length, tokenizer = prepare_tokenizer(folder, task="causal_lm", max_length=None, option="test", notes=[])
    examples = tokenize_file(data, tokenizer, task="causal_lm", max_length=max_length, label_names=None).ids
    out = {}
    for name, model in models.items():
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in examples:
                ids = torch.tensor(ids)[None]
                logits = model.eval()(ids).logits[0, :-1].double()
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        out[name] = total / count
    return out


def load64(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def truncated64(base, tuned, modules: list[str]):
    """The float64 base with the rank-RANK Eckart–Young part of (tuned − base) added to each module's weight."""
    model, target = load64(base), dict(load64(tuned).named_parameters())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for m in modules:
            U, S, Vh = torch.linalg.svd(target[f"{m}.weight"] - params[f"{m}.weight"], full_matrices=False)
            params[f"{m}.weight"] += (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]  # (out, r) @ (r, in)
    return model


def peft64(base, adapter, *, merged: bool):
    from peft import PeftModel

    with quiet_peft():
        model = PeftModel.from_pretrained(load64(base), str(adapter))
        return model.merge_and_unload() if merged else model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(family, base, tuned, eval data) for a tied Qwen2 and an untied Llama."""
    def make(family):
        folder = tmp_path_factory.mktemp(family)
        model = build_model(family)
        return (save(model, folder / "base", "safetensors"),
                save(moved_matrices(model, seed=1), folder / "tuned", "safetensors"),
                random_text(folder / "eval.txt", chars=16 * 24, seed=4))
    return {family: make(family) for family in ("qwen2", "llama")}


def attention_and_embedding(layers: int = 2) -> list[str]:
    return ["model.embed_tokens"] + [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkvo"]


def tied_notes(result) -> list[str]:
    return [n for n in result.notes if "LoRA on a tied weight" in n]


def test_extracted_adapter_on_a_tied_embedding_scores_its_own_truncation(pair, tmp_path):
    """The extracted adapter IS the rank-3 truncation: 'adapter' and 'svd' losses agree, and equal float64
    transformers with the truncation in the shared weight and PEFT's own merge; 'adapter_unmerged' equals PEFT's
    float64 unmerged model, where the head keeps the base embedding, and differs from both (the control that the
    merged/unmerged choice is seen at all: before the fix 'adapter' held this loss)."""
    base, tuned, data = pair["qwen2"]
    extract_adapter(base, tuned, RANK, tmp_path / "ad", roles=("q", "k", "v", "o", "embed"), progress=False)
    result = verify_adapter(base, tuned, tmp_path / "ad", eval_data=data, progress=False)
    evals = {k: v["loss"] for k, v in result.evals.items()}
    ref = float64_losses(base, data, {"svd": truncated64(base, tuned, attention_and_embedding()),
                                      "merged": peft64(base, tmp_path / "ad", merged=True),
                                      "unmerged": peft64(base, tmp_path / "ad", merged=False)})
    assert list(result.evals) == ["base", "tuned", "adapter", "adapter_unmerged", "svd"]
    assert evals["adapter"] == pytest.approx(evals["svd"], abs=2e-6)
    assert evals["adapter"] == pytest.approx(ref["merged"], abs=2e-6)
    assert evals["svd"] == pytest.approx(ref["svd"], abs=2e-6)
    assert ref["merged"] == pytest.approx(ref["svd"], abs=1e-7)  # PEFT's merge is the truncation (float32 factors)
    assert evals["adapter_unmerged"] == pytest.approx(ref["unmerged"], abs=2e-6)
    assert abs(ref["unmerged"] - ref["svd"]) > 1e-3  # the two models really differ on this pair
    (note,) = tied_notes(result)
    assert "model.embed_tokens's LoRA on the weight lm_head reads too" in note
    assert "'adapter_unmerged'" in note and "merge_and_unload()" in note


def test_lora_on_the_tied_head_moves_the_embedding_when_merged(pair, tmp_path):
    """A LoRA on lm_head of the tied model (measured on the embedding's row): merged, the lookup moves with the head
    (PEFT's merge_and_unload, float64); unmerged only the head does."""
    base, tuned, data = pair["qwen2"]
    with quiet_peft():
        random_adapter(build_model("qwen2"), tmp_path / "ad", seed=7, scale=0.2, r=RANK, lora_alpha=RANK,
                       target_modules=["lm_head"])
    result = verify_adapter(base, tuned, tmp_path / "ad", eval_data=data, progress=False)
    ref = float64_losses(base, data, {"merged": peft64(base, tmp_path / "ad", merged=True),
                                      "unmerged": peft64(base, tmp_path / "ad", merged=False)})
    assert result.evals["adapter"]["loss"] == pytest.approx(ref["merged"], abs=2e-6)
    assert result.evals["adapter_unmerged"]["loss"] == pytest.approx(ref["unmerged"], abs=2e-6)
    assert abs(ref["merged"] - ref["unmerged"]) > 1e-3
    (note,) = tied_notes(result)
    assert "lm_head's LoRA on the weight model.embed_tokens reads too" in note


def test_ensure_weight_tying_is_evaluated_unmerged(pair, tmp_path):
    """Control: with PEFT's ensure_weight_tying the head carries the embedding's LoRA (transposed), so the unmerged
    model already moves both, once; verify merges nothing (merge_and_unload would add ΔW twice) and adds no row or
    note. Reference: float64 transformers with the LoRA's ΔW added once to the shared weight."""
    base, tuned, data = pair["qwen2"]
    with quiet_peft():
        peft_model = random_adapter(build_model("qwen2"), tmp_path / "ad", seed=7, scale=0.2, r=RANK,
                                    lora_alpha=RANK, target_modules=["embed_tokens"], ensure_weight_tying=True)
    delta = peft_model.base_model.model.model.embed_tokens.get_delta_weight("default").double()  # (vocab, dim)
    once = load64(base)
    with torch.no_grad():
        once.model.embed_tokens.weight += delta
    result = verify_adapter(base, tuned, tmp_path / "ad", eval_data=data, progress=False)
    ref = float64_losses(base, data, {"once": once, "unmerged": peft64(base, tmp_path / "ad", merged=False)})
    assert ref["unmerged"] == pytest.approx(ref["once"], abs=1e-7)  # PEFT's tied LoRA, unmerged (float32 ΔW)
    assert result.evals["adapter"]["loss"] == pytest.approx(ref["once"], abs=2e-6)
    assert "adapter_unmerged" not in result.evals and not tied_notes(result)


def test_untied_embedding_lora_is_evaluated_as_before(pair, tmp_path):
    """Control: Llama's head has its own weight; the embedding's LoRA moves the lookup alone in every row, so the
    extracted adapter scores its truncation unmerged, with no extra row and no note."""
    base, tuned, data = pair["llama"]
    extract_adapter(base, tuned, RANK, tmp_path / "ad", roles=("q", "k", "v", "o", "embed"), progress=False)
    result = verify_adapter(base, tuned, tmp_path / "ad", eval_data=data, progress=False)
    ref = float64_losses(base, data, {"svd": truncated64(base, tuned, attention_and_embedding())})
    assert list(result.evals) == ["base", "tuned", "adapter", "svd"]
    assert result.evals["adapter"]["loss"] == pytest.approx(ref["svd"], abs=2e-6)
    assert result.evals["svd"]["loss"] == pytest.approx(ref["svd"], abs=2e-6)
    assert not tied_notes(result)
