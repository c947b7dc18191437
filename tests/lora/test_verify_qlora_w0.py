"""QLoRA verify's W₀ is what bitsandbytes' 4-bit load holds: NF4 for the Linears it converts, the stored weight
for an embedding table (GPT-2's wpe, BERT's position and token-type tables), which it leaves as it is."""

from __future__ import annotations

import pytest
import torch

from spectra.lora.train import load_model, quiet_peft
from spectra.lora.verify import VerifyConfig, bnb_4bit_modules, nf4_round_trip, verify_adapter
from tests.models import random_adapter, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _loaded_weight(module) -> torch.Tensor:
    """(out, in) as the 4-bit model computes with it: a Linear4bit's dequantised NF4, else the weight held."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight.detach()


def _tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":  # 64 wide: bitsandbytes' 4-bit layers need ≥ 64 input features
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32)), \
            "causal_lm"
    return tf.BertForSequenceClassification(tf.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, vocab_size=64,
        max_position_embeddings=32, num_labels=2)), "seq_cls"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_w0_is_the_4bit_models_weight_bit_for_bit(tmp_path, kind):
    """Every weight matrix's W₀ rule against the model spectra's QLoRA load actually builds."""
    import json

    model, task = _tiny(kind)
    base = save(model, tmp_path / "base", "safetensors")
    config = json.loads((base / "config.json").read_text())
    stored = {n: m.weight.detach().T if type(m).__name__ == "Conv1D" else m.weight.detach()
              for n, m in model.named_modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    rounded = bnb_4bit_modules(stored, config, task)
    loaded = dict(load_model(base, task=task, quantize=True, num_labels=2 if task == "seq_cls" else None)
                  .named_modules())
    for name, W in stored.items():
        W0 = nf4_round_trip(W) if rounded[name] else W
        assert torch.equal(W0, _loaded_weight(loaded[name])), name
    tables = {"gpt2": ["transformer.wpe", "transformer.wte"],
              "bert": ["bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
                       "bert.embeddings.word_embeddings"]}[kind]
    linear = {"gpt2": "transformer.h.0.attn.c_attn", "bert": "bert.encoder.layer.0.attention.self.query"}[kind]
    assert not any(rounded[t] for t in tables) and rounded[linear]
    # negative control: a Linear's 4-bit weight is not its stored one
    assert not torch.equal(stored[linear], _loaded_weight(loaded[linear]))


def test_qlora_verify_keeps_a_position_tables_base_weight(tmp_path):
    """A QLoRA adapter on GPT-2's wpe and c_attn: wpe's W₀ is W_base (no NF4 error; its error is PEFT's merged
    weight against the tuned one), c_attn's the NF4 round trip. Before: wpe's W₀ was rounded to NF4 too."""
    model, _ = _tiny("gpt2")
    base = save(model, tmp_path / "base", "safetensors")
    tuned_model = model.__class__(model.config)
    tuned_model.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (tuned_model.transformer.wpe.weight, tuned_model.transformer.h[0].attn.c_attn.weight):
            p += 0.3 * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g)
    tuned = save(tuned_model, tmp_path / "tuned", "safetensors")
    with quiet_peft():
        peft_model = random_adapter(model, tmp_path / "adapter", seed=5, r=2, lora_alpha=4,
                                    target_modules=["wpe", "c_attn"], fan_in_fan_out=True)
    merged = peft_model.merge_and_unload().transformer.wpe.weight.detach().double()
    report = verify_adapter(base, tuned, tmp_path / "adapter", config=VerifyConfig(quantized=True),
                            progress=False)
    rows = {r["name"]: r for r in report.modules}
    assert rows["transformer.wpe"]["role"] == "pos_embed" and report.sources["adapter"]["quantized"]
    assert "quant_error" not in rows["transformer.wpe"]  # W₀ is W_base
    Wb, Wt = model.transformer.wpe.weight.detach().double(), tuned_model.transformer.wpe.weight.detach().double()
    assert rows["transformer.wpe"]["relative_error"] == pytest.approx(
        float((merged - Wt).norm() / (Wt - Wb).norm()), rel=1e-5)
    W = model.transformer.h[0].attn.c_attn.weight.detach().T  # negative control: a Conv1D's W₀ is rounded
    expected = float((nf4_round_trip(W) - W).norm() / W.norm())
    assert rows["transformer.h.0.attn.c_attn"]["quant_error"] == pytest.approx(expected, rel=1e-5)
    assert report.summary["quant_error"] == pytest.approx(expected, rel=1e-5)  # the mean over NF4 modules


def test_a_qlora_adapter_is_called_worse_than_none_against_w0_not_against_no_error(tmp_path):
    """QLoRA's relative error holds W₀'s NF4 error, often larger than the fine-tune's update: an adapter equal to the
    fine-tune's update (TUNED = the adapter) had relative error 4.9 and was 'farther than no update' in every module.
    No update under QLoRA leaves W₀, so the comparison is ‖W₀ + ΔW_ad − W_tuned‖ against ‖W₀ − W_tuned‖."""
    import shutil

    from safetensors.torch import load_file, save_file

    from spectra.report.verify import headline, summary_rows

    model, _ = _tiny("gpt2")
    base = save(model, tmp_path / "base", "safetensors")
    with quiet_peft():
        merged = random_adapter(model, tmp_path / "adapter", seed=5, scale=0.02, r=2, lora_alpha=4,
                                target_modules=["c_attn"], fan_in_fan_out=True).merge_and_unload()
    negated = tmp_path / "negated"
    shutil.copytree(tmp_path / "adapter", negated)
    weights = load_file(negated / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, negated / "adapter_model.safetensors")
    config = VerifyConfig(quantized=True)
    same = verify_adapter(base, tmp_path / "adapter", tmp_path / "adapter", config=config, progress=False)
    row = next(r for r in same.modules if r["name"] == "transformer.h.0.attn.c_attn")
    W = model.transformer.h[0].attn.c_attn.weight.detach().T.double()  # (out, in)
    Wt = merged.transformer.h[0].attn.c_attn.weight.detach().T.double()
    W0 = nf4_round_trip(W.float()).double()
    assert row["relative_error"] == pytest.approx(float((W0 - W).norm() / (Wt - W).norm()), rel=1e-5)  # the NF4 error
    assert row["relative_error"] > 1  # the 4-bit error outweighs the update: the old rule called it worse than none
    assert row["relative_error_none"] == pytest.approx(float((W0 - Wt).norm() / (Wt - W).norm()), rel=1e-5)
    assert same.summary["worse_than_none"] == 0 and "farther" not in headline(same.summary)
    assert "W₀ + ΔW_adapter − W_tuned" in summary_rows(same.summary)[4][0]
    report = (same.write_report(tmp_path / "report") / "report.md").read_text()  # the per-module table says it too
    assert "rel. error (none)" in report and "rel. error: ‖W₀ + ΔW_adapter − W_tuned‖_F" in report
    assert "rel. error: ‖ΔW_adapter − ΔW_full‖_F" not in report
    flipped = verify_adapter(base, tmp_path / "adapter", negated, config=config, progress=False).summary
    assert flipped["worse_than_none"] == flipped["modules"]  # negative control: the opposite update
    assert "‖W₀ + ΔW_adapter − W_tuned‖ > ‖W₀ − W_tuned‖" in headline(flipped)
    plain = verify_adapter(base, tmp_path / "adapter", tmp_path / "adapter", progress=False)  # LoRA: no W₀ of its own
    assert all("relative_error_none" not in r for r in plain.modules)
    assert "‖ΔW_adapter − ΔW_full‖/‖ΔW_full‖" in summary_rows(plain.summary)[4][0]
    report = (plain.write_report(tmp_path / "plain") / "report.md").read_text()
    assert "rel. error (none)" not in report and "rel. error: ‖ΔW_adapter − ΔW_full‖_F" in report
