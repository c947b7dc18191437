"""A PEFT adapter as the tuned side: ΔW must equal PEFT's own merge minus the base."""

from __future__ import annotations

import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.errors import AdapterError
from tests.models import build_model, random_adapter, save


def make_adapter(model, path, save_embedding_layers="auto", **lora_kwargs):
    """Train-free adapter (:func:`tests.models.random_adapter`) and PEFT's merged state dict."""
    merged = random_adapter(model, path, save_embedding_layers=save_embedding_layers, **lora_kwargs).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def check_against_merge(base_model, base_dir, adapter_dir, merged_state, *, conv1d=()):
    base_state = base_model.state_dict()
    yielded = {d.name: d for d in Pairing(base_dir, adapter_dir, PairingOptions(vectors=False))}
    assert yielded, "the adapter yielded no ΔW"
    for name, d in yielded.items():
        if "[" in name:
            continue
        key = d.base_tensor
        expected = merged_state[key].float() - base_state[key].float()
        if name in conv1d:
            expected = expected.T
        torch.testing.assert_close(d.delta, expected, rtol=1e-5, atol=1e-6, msg=name)
    return yielded


def test_lora_adapter_equals_peft_merge(tmp_path):
    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged)
    assert {d.role for d in yielded.values()} == {"q", "v", "down"}
    assert len(yielded) == 6
    assert all(torch.linalg.matrix_rank(d.delta.double(), rtol=1e-4) == 4 for d in yielded.values())


def test_rslora_with_rank_and_alpha_patterns(tmp_path):
    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
                          target_modules=["q_proj", "o_proj"],
                          rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"o_proj": 3})
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged)
    assert torch.linalg.matrix_rank(yielded["model.layers.1.self_attn.q_proj"].delta.double(), rtol=1e-4) == 2


def test_dora_adapter_equals_peft_merge(tmp_path):
    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, use_dora=True, target_modules=["k_proj", "up_proj"])
    check_against_merge(base, base_dir, tmp_path / "ad", merged)


def test_modules_to_save_head(tmp_path):
    base = build_model("llama")  # untied head
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"],
                          modules_to_save=["lm_head"])
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged)
    assert yielded["lm_head"].role == "head" and torch.count_nonzero(yielded["lm_head"].delta) > 0


def test_conv1d_adapter(tmp_path):
    base = build_model("gpt2")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True)
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged,
                                  conv1d={"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                                          "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"})
    assert yielded["transformer.h.0.attn.c_attn"].shape == (96, 32)
    assert "transformer.h.0.attn.c_attn[v]" in yielded  # the split parts come from the merged fused ΔW


def test_embedding_lora(tmp_path):
    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["embed_tokens"],
                          save_embedding_layers=True)
    yielded = check_against_merge(base, base_dir, tmp_path / "ad", merged)
    assert yielded["model.embed_tokens"].role == "embed"


def test_adapter_on_wrong_base_is_refused(tmp_path):
    base = build_model("llama")
    make_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"])
    other = save(build_model("gpt2"), tmp_path / "gpt2", "safetensors")
    with pytest.raises(AdapterError, match="absent from the base"):
        Pairing(other, tmp_path / "ad")
    # same module names, different widths
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(AdapterError, match="different base model"):
        Pairing(save(wide, tmp_path / "wide", "safetensors"), tmp_path / "ad")
    # an adapter on PEFT target_parameters (fused MoE experts) is refused as such, not as another model's
    import json

    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    config["target_parameters"] = ["model.layers.0.mlp.experts.gate_up_proj"]
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="target_parameters.*merge_and_unload"):
        Pairing(save(base, tmp_path / "base", "safetensors"), tmp_path / "ad")


def test_new_head_in_modules_to_save_is_noted_not_fatal(tmp_path):
    """A classification adapter on a bare encoder saves a head the base has no counterpart for."""
    from peft import LoraConfig, get_peft_model

    bare = build_model("bert", head=False)
    base_dir = save(bare, tmp_path / "base", "safetensors")
    classifier = build_model("bert", head=True)
    classifier.bert.load_state_dict(bare.state_dict())
    get_peft_model(classifier, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
                   ).save_pretrained(tmp_path / "ad")
    pairing = Pairing(base_dir, tmp_path / "ad")
    assert [e.name for e in pairing.entries] == ["encoder.layer.0.attention.self.query",
                                                 "encoder.layer.1.attention.self.query"]
    assert any("classifier" in n and "absent from the base" in n for n in pairing.notes)


@pytest.mark.parametrize(("targets", "tying"), [(["embed_tokens", "q_proj"], True), (["lm_head", "q_proj"], True),
                                               (["lm_head", "q_proj"], False)])
def test_a_tied_heads_lora_is_read_against_the_tied_embedding(tmp_path, targets, tying):
    """Qwen2 ties lm_head to embed_tokens and stores the embedding only. PEFT's ensure_weight_tying gives the
    head a LoRA tied to the embedding's (the same ΔW, reported once); a head-only LoRA is read against the
    embedding's weight. Both were refused: 'targets module(s) absent from the base: lm_head'. (With
    ensure_weight_tying, PEFT puts the tied pair on both modules whichever one is targeted.)"""
    import warnings

    base = build_model("qwen2")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base_dir = save(base, tmp_path / "base", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's notes on tied layers
        peft_model = random_adapter(base, tmp_path / "ad", seed=0, r=4, lora_alpha=8, target_modules=targets,
                                    ensure_weight_tying=tying)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "get_delta_weight")}
    pairing = Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False))
    yielded = {d.name: d for d in pairing}
    adapted = "model.embed_tokens" if tying else "lm_head"
    assert set(yielded) == {adapted, "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    for name, d in yielded.items():
        torch.testing.assert_close(d.delta, layers[name].get_delta_weight("default").float(), rtol=1e-5, atol=1e-6)
    assert yielded[adapted].base_tensor == "model.embed_tokens.weight"
    assert any("tied" in note for note in pairing.notes)
