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


def test_a_lora_adapters_update_is_its_factors_product_without_the_bases_rounding(tmp_path):
    """ΔW of a plain LoRA is s·B A from the factors. It was (W + s·B A) − W in float32, which carries the rounding
    of the sum, ~6e-8·|W|: full-rank noise that a small update's singular vectors past r were made of."""
    from safetensors.torch import load_file

    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    merged = make_adapter(base, tmp_path / "ad", scale=1e-4, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    weights = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    state = base.state_dict()
    for d in Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False)):
        A, B = (weights[f"base_model.model.{d.name}.lora_{x}.weight"] for x in "AB")
        reference = 2.0 * B.double() @ A.double()  # s = α/r = 2, in float64
        assert torch.equal(d.delta, (B @ A).mul_(2.0)), d.name  # the product PEFT's merge adds, as it forms it
        assert float((d.delta.double() - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
        subtracted = merged[d.base_tensor].float() - state[d.base_tensor].float()  # negative control: the old ΔW
        assert float((subtracted.double() - reference).abs().max()) > 1e-4 * float(reference.abs().max()), d.name


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
    # target_parameters the base's model has none of (fused MoE experts on a Llama): another model's adapter
    import json

    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    config["target_parameters"] = ["model.layers.0.mlp.experts.gate_up_proj"]
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="target_parameters.*match no parameter of LlamaForCausalLM"):
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


def check_renamed_against_merge(base_model, base_dir, adapter_dir, peft_model, root) -> dict:
    """ΔW of an adapter whose modules the base stores under other names: equal to PEFT's merge, saved and paired
    with the base (PEFT's state dict uses the model's names, the pairing the checkpoint's). Returns the ΔW by name."""
    merged_dir = save(peft_model.merge_and_unload(), root / "merged", "safetensors")
    yielded = {d.name: d.delta for d in Pairing(base_dir, adapter_dir, PairingOptions(vectors=False))}
    merged = {d.name: d.delta for d in Pairing(base_dir, merged_dir, PairingOptions(vectors=False)) if d.delta.any()}
    assert merged and set(yielded) == set(merged)
    for name, delta in merged.items():
        torch.testing.assert_close(yielded[name], delta, rtol=1e-5, atol=1e-6, msg=name)
    return yielded


def test_a_head_transformers_renames_is_read_against_its_stored_tensor(tmp_path):
    """GPT-NeoX stores its head as embed_out; transformers 5 loads it into lm_head, the name PEFT saves the LoRA
    under. Matched by dot-suffix only it was refused: 'targets module(s) absent from the base: lm_head'."""
    base = build_model("gpt_neox")
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["lm_head", "dense"],
                                save_embedding_layers=False)  # PEFT counts lm_head an embedding: the LoRA alone
    yielded = check_renamed_against_merge(base, base_dir, tmp_path / "ad", peft_model, tmp_path)
    assert set(yielded) == {"embed_out", "gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"}
    assert torch.linalg.matrix_rank(yielded["embed_out"].double(), rtol=1e-4) == 2


def test_a_module_absent_under_any_name_is_still_refused(tmp_path):
    """Negative control for the renamed names: a module neither the base nor its loading renames hold."""
    from safetensors.torch import load_file, save_file

    base = build_model("gpt_neox")
    base_dir = save(base, tmp_path / "base", "safetensors")
    random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["lm_head"], save_embedding_layers=False)
    file = tmp_path / "ad" / "adapter_model.safetensors"
    save_file({k.replace("lm_head", "lm_tail"): v for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="targets module.s. absent from the base .*: lm_tail. Was it trained"):
        Pairing(base_dir, tmp_path / "ad")


def test_two_adapter_modules_claiming_one_base_tensor_are_refused_by_name(tmp_path):
    """Keys model.layers.0.mlp.up_proj saved as layers.0.mlp.up_proj and 0.mlp.up_proj both end the base's one tensor:
    planning stopped on a bare KeyError (and, read through the loading renames, would pair the tensor twice); it names
    the two modules (negative control: one of them alone pairs)."""
    from safetensors.torch import load_file, save_file

    base = build_model("llama")
    base_dir = save(base, tmp_path / "base", "safetensors")
    random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["layers.0.mlp.up_proj"])
    file = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = {k.replace("model.layers.0", "layers.0"): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    assert [e.name for e in Pairing(base_dir, tmp_path / "ad").entries] == ["model.layers.0.mlp.up_proj"]
    save_file(tensors | {k.replace("layers.0", "0"): v.clone() for k, v in tensors.items()}, file,
              metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"modules (0|layers\.0)\.mlp\.up_proj, (layers\.)?0\.mlp\.up_proj all match "
                       "one tensor"):
        Pairing(base_dir, tmp_path / "ad")


# -- LoRA on parameters (PEFT's target_parameters): transformers-5 fused MoE experts ----------------------------------

MIXTRAL_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def parameter_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own update of each targeted parameter (``ParamWrapper.get_delta_weight``), by the model's name:
    (E, d₁, d₂) for experts, as the parameter stores them."""
    out = {}
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            holder = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{holder}.{module.parameter_name}"] = module.get_delta_weight("default").detach().float()
    return out


@pytest.mark.parametrize("targets", [MIXTRAL_EXPERTS, MIXTRAL_EXPERTS[::-1], ["mlp.experts.down_proj"],
                                     ["mlp.gate.weight", "mlp.experts.gate_up_proj"]])
def test_target_parameters_adapter_equals_peft_merge(tmp_path, targets):
    """Mixtral's checkpoint stores experts.N.w1/w3/w2 (out, in); transformers 5 fuses them into gate_up_proj
    (E, [w1; w3], hidden) and down_proj (E, hidden, ffn), which PEFT adapts through target_parameters with A
    (r·E, in) and B (out, r·E). Each expert's ΔW comes out under the checkpoint's name, equal to PEFT's own
    update and to its merge, saved (the rows an analysis of the merged model has). These were refused."""
    base = build_model("mixtral")
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=["q_proj"],
                                target_parameters=targets)
    reference = parameter_deltas(peft_model)
    merged_dir = save(peft_model.merge_and_unload(), tmp_path / "merged", "safetensors")
    yielded = {d.name: d for d in Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False))}
    merged = {d.name: d.delta for d in Pairing(base_dir, merged_dir, PairingOptions(vectors=False)) if d.delta.any()}
    assert set(yielded) == set(merged)
    for name, delta in merged.items():
        torch.testing.assert_close(yielded[name].delta, delta, rtol=1e-5, atol=1e-6, msg=name)
    for layer in (0, 1):
        moe = f"model.layers.{layer}.block_sparse_moe"
        expected = {}
        for e in range(3):
            if "mlp.experts.gate_up_proj" in targets:  # rows [gate; up] of W[e] (2·48, 32)
                gate_up = reference[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
                expected |= {f"{moe}.experts.{e}.w1": gate_up[:48], f"{moe}.experts.{e}.w3": gate_up[48:]}
            if "mlp.experts.down_proj" in targets:
                expected[f"{moe}.experts.{e}.w2"] = reference[f"model.layers.{layer}.mlp.experts.down_proj"][e]
        if "mlp.gate.weight" in targets:  # the router: a 2-D parameter, E = 1
            expected[f"{moe}.gate"] = reference[f"model.layers.{layer}.mlp.gate.weight"]
        for name, delta in expected.items():
            d = yielded[name]
            assert (d.role, d.layer, d.expert) == ({"w1": "gate", "w3": "up", "w2": "down"}.get(name[-2:], "other"),
                                                   layer, None if name.endswith("gate") else int(name.split(".")[-2]))
            torch.testing.assert_close(d.delta, delta, rtol=1e-5, atol=1e-6, msg=name)
    assert {d.role for d in yielded.values()} >= {"q"}


def test_target_parameters_negative_controls(tmp_path):
    """The fold matters: B's columns are expert-minor (B[:, e::E]), not expert-major like A's rows, and a
    wrong nesting (which wrapper adapts which parameter) cannot pass the shape check."""
    from safetensors.torch import load_file

    base = build_model("mixtral")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=[],
                                target_parameters=MIXTRAL_EXPERTS)
    reference = parameter_deltas(peft_model)["model.layers.0.mlp.experts.down_proj"]  # (3, 32, 48)
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    a = saved["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]  # (r·E, 48): down_proj, the outer wrapper
    b = saved["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]  # (32, r·E)
    for e in range(3):
        a_e = a[2 * e:2 * e + 2]
        torch.testing.assert_close(3.0 * b[:, e::3] @ a_e, reference[e], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(3.0 * b[:, 2 * e:2 * e + 2] @ a_e, reference[e], atol=1e-3)  # naïve unfold
    assert a.shape == (6, 48) and saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
                                        ].shape == (6, 32)  # gate_up_proj, the inner one: shapes tell them apart


def test_target_parameters_analysis_matches_the_merged_model(tmp_path):
    """analyze(base, adapter) gives the rows analyze(base, merged) gives for every adapted module."""
    from spectra.analysis import analyze

    base = build_model("mixtral")
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=["v_proj"],
                                target_parameters=["mlp.gate.weight", *MIXTRAL_EXPERTS])
    merged_dir = save(peft_model.merge_and_unload(), tmp_path / "merged", "safetensors")
    from_adapter = {r["name"]: r for r in analyze(base_dir, tmp_path / "ad", cache_dir=False, progress=False).modules}
    from_merged = {r["name"]: r for r in analyze(base_dir, merged_dir, cache_dir=False, progress=False).modules}
    assert len(from_adapter) == 2 * (1 + 1 + 3 * 3)  # per layer: v_proj, the router, 3 experts × w1, w3, w2
    for name, row in from_adapter.items():
        other = from_merged[name]
        assert (row["role"], row["expert"], row["shape"]) == (other["role"], other["expert"], other["shape"])
        assert row["energy_rank"] == other["energy_rank"], name
        assert row["fro_norm"] == pytest.approx(other["fro_norm"], rel=1e-5), name
        assert 0 < row["energy_rank"]["0.99"] <= 2  # rank 2 per expert
    assert {r["role"] for r in from_adapter.values()} == {"v", "other", "gate", "up", "down"}


def tiny_gpt_oss():
    """A gpt-oss of one layer: experts stored (E, in, out) and marked is_transposed; gate and up interleaved.
    hidden 32 = 2·intermediate, so gate_up_proj (3, 32, 32) is square and only is_transposed tells its layout."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.GptOssForCausalLM(tf.GptOssConfig(
        hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=3, num_experts_per_tok=2, vocab_size=64, layer_types=["full_attention"])).eval()


def test_target_parameters_on_experts_stored_fused_and_transposed(tmp_path):
    """gpt-oss stores its experts as the model holds them, (E, in, out): the ΔW rows are the pairing's
    experts.{e}.gate_up_proj (with [gate]/[up] on alternate rows), transposed into (out, in)."""
    base = tiny_gpt_oss()
    base_dir = save(base, tmp_path / "base", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=[],
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                   "mlp.router.weight"])
    reference = parameter_deltas(peft_model)
    merged_dir = save(peft_model.merge_and_unload(), tmp_path / "merged", "safetensors")
    yielded = {d.name: d for d in Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False))}
    merged = {d.name: d.delta for d in Pairing(base_dir, merged_dir, PairingOptions(vectors=False)) if d.delta.any()}
    assert set(yielded) == set(merged) and "model.layers.0.mlp.experts.2.gate_up_proj[up]" in yielded
    for name, delta in merged.items():
        torch.testing.assert_close(yielded[name].delta, delta, rtol=1e-5, atol=1e-6, msg=name)
    for e in range(3):
        for proj in ("gate_up_proj", "down_proj"):
            d, stored = yielded[f"model.layers.0.mlp.experts.{e}.{proj}"], reference[f"model.layers.0.mlp.experts.{proj}"]
            torch.testing.assert_close(d.delta, stored[e].T, rtol=1e-5, atol=1e-6)  # (in, out) → (out, in)
            assert d.expert == e and d.conv1d
        square = yielded[f"model.layers.0.mlp.experts.{e}.gate_up_proj"].delta
        assert not torch.allclose(square, reference["model.layers.0.mlp.experts.gate_up_proj"][e], atol=1e-3)
    torch.testing.assert_close(yielded["model.layers.0.mlp.router"].delta, reference["model.layers.0.mlp.router.weight"])


def test_target_parameters_unreadable_or_foreign_is_refused(tmp_path):
    import json
    import shutil

    import transformers as tf

    base = build_model("mixtral")
    base_dir = save(base, tmp_path / "base", "safetensors")
    random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, target_modules=[], target_parameters=MIXTRAL_EXPERTS)
    # no model class to build: the nesting and layout of the adapted parameters are unknown
    bare = shutil.copytree(base_dir, tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="mlp.experts.gate_up_proj.*cannot read it exactly.*"
                                           "names no model class.*merge_and_unload"):
        Pairing(bare, tmp_path / "ad")
    # another Mixtral's experts (ffn 64, not 48)
    wide = tf.MixtralForCausalLM(tf.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                                  num_experts_per_tok=2, vocab_size=64))
    with pytest.raises(AdapterError, match="do not fit the parameter.*different base model"):
        Pairing(save(wide, tmp_path / "wide", "safetensors"), tmp_path / "ad")


def test_target_parameters_factors_are_read_once_per_parameter(tmp_path, monkeypatch):
    """Each expert's update is a slice of its parameter's A (r·E, in) and B (out, r·E): the pairing read both whole
    for every expert (E reads of A and B per parameter, 2E for gate_up_proj, whose w1 and w3 are separate rows).
    Now each is read once, and every ΔW is s·B[:, e::E]@A[e·r:(e+1)·r], bit for bit (it was that added to the base
    and subtracted again, with the sum's rounding)."""
    from safetensors.torch import load_file

    base = build_model("mixtral")
    base_dir = save(base, tmp_path / "base", "safetensors")
    random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=["q_proj"],
                   target_parameters=["mlp.gate.weight", *MIXTRAL_EXPERTS])
    reads = _count_reads(monkeypatch)
    yielded = {d.name: d for d in Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False))}
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert {k for k in reads if "lora_" in k} == {k for k in saved if "lora_" in k}
    assert {k: n for k, n in reads.items() if "lora_" in k and n != 1} == {}
    state = base.state_dict()
    for layer in (0, 1):
        for e in range(3):
            for proj, key, rows in (("w1", "base_layer.", slice(0, 48)), ("w3", "base_layer.", slice(48, 96)),
                                    ("w2", "", slice(None))):  # gate_up_proj: the inner wrapper
                prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{key}"
                a, b = saved[prefix + "lora_A.weight"][2 * e:2 * e + 2], saved[prefix + "lora_B.weight"][:, e::3]
                w0 = state[f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'w2' else 'gate_up_proj'}"][e]
                expected = (b[rows] @ a).mul_(3.0)
                assert torch.equal(yielded[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}"].delta, expected)
                assert not torch.equal(expected.add(w0[rows]) - w0[rows], expected)  # the old ΔW, rounded


def test_target_parameters_base_experts_stored_stacked_are_read_once(tmp_path, monkeypatch):
    """With an adapter on gpt-oss's (E, in, out) experts, each expert entry read the base's stored tensor whole and
    scanned it whole for NaN/Inf (E times its data per parameter): now its own slice, once in all per parameter."""
    from spectra.checkpoints.source import CheckpointSource

    base = tiny_gpt_oss()
    base_dir = save(base, tmp_path / "base", "safetensors")
    random_adapter(base, tmp_path / "ad", r=2, lora_alpha=6, target_modules=[],
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    handed: dict[str, int] = {}
    read, read_expert = CheckpointSource.read, CheckpointSource.read_expert

    def count(name, tensor):
        handed[name] = handed.get(name, 0) + tensor.numel()
        return tensor

    monkeypatch.setattr(CheckpointSource, "read", lambda self, name: count(name, read(self, name)))
    monkeypatch.setattr(CheckpointSource, "read_expert", lambda self, name, e: count(name, read_expert(self, name, e)))
    yielded = {d.name: d for d in Pairing(base_dir, tmp_path / "ad", PairingOptions(vectors=False))}
    assert len(yielded) == 3 * (2 + 2)  # per expert: gate_up_proj, its [gate] and [up], down_proj
    state = base.state_dict()
    stacked = [f"model.layers.0.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")]
    assert {k: handed[k] for k in stacked} == {k: state[k].numel() for k in stacked}


def _count_reads(monkeypatch) -> dict[str, int]:
    """Calls of CheckpointSource.read from now on, per tensor name."""
    from spectra.checkpoints.source import CheckpointSource

    reads: dict[str, int] = {}
    read = CheckpointSource.read

    def counted(self, name):
        reads[name] = reads.get(name, 0) + 1
        return read(self, name)

    monkeypatch.setattr(CheckpointSource, "read", counted)
    return reads


def _mixtral_adapter_on_experts(root):
    base = build_model("mixtral")  # two layers, each with one experts module (3 experts) adapted on both parameters
    base_dir = save(base, root / "base", "safetensors")
    random_adapter(base, root / "ad", r=2, lora_alpha=6, target_modules=["q_proj"],
                   target_parameters=["mlp.gate.weight", *MIXTRAL_EXPERTS])
    return base_dir, root / "ad"


def test_target_parameters_factors_are_read_once_by_threads_crossing_modules(tmp_path, monkeypatch):
    """Analysis workers split a module's experts between them and reach the next module at different times. With one
    module's factors held for all threads, a worker on layer 1 took layer 0's from one still on layer 0's last
    experts, which read them again (and again at every switch back). Each thread's last module is held now, and the
    one opened before the newest: in these interleavings every factor tensor is read once, and ΔW is unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    base_dir, adapter_dir = _mixtral_adapter_on_experts(tmp_path)
    reference = {d.name: d.delta for d in Pairing(base_dir, adapter_dir, PairingOptions(vectors=False))}
    pairing = Pairing(base_dir, adapter_dir, PairingOptions(vectors=False))
    entries = {e.name.removeprefix("model.layers.").replace(".block_sparse_moe.experts", ""): e
               for e in pairing.entries}  # "0.2.w3": layer 0, expert 2, w3
    reads = _count_reads(monkeypatch)
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as two:  # two workers, each one thread
        for worker, entry in ((one, "0.0.w1"), (two, "0.0.w2"), (one, "1.0.w1"),  # one crosses to layer 1 first
                              (two, "0.1.w1"),  # two is still on layer 0: both modules are held
                              (two, "1.0.w2"), (one, "1.1.w1"),  # both on layer 1 now
                              (two, "0.2.w3"), (one, "0.2.w2"),  # late entries of layer 0, the module before
                              (one, "1.2.w3"), (two, "1.2.w2")):
            (d,) = worker.submit(pairing.load, entries[entry]).result()
            assert torch.equal(d.delta, reference[d.name]), d.name
    factors = {k: n for k, n in reads.items() if "experts" in k and "lora_" in k}
    assert len(factors) == 8 and set(factors.values()) == {1}  # A and B of gate_up_proj, down_proj; two layers


def test_held_factor_bytes_are_what_a_reading_thread_holds(tmp_path):
    """A module's LoRA factors on fused experts are read once and held across its expert entries (_HeldFactors),
    outside any entry's bytes. held_factor_bytes gives them: for one reading thread exactly what reading a module's
    experts holds (A and B of gate_up_proj and down_proj, in the compute dtype), for several readers + 1 modules,
    and nothing for LoRAs on modules, which read their factors per entry."""
    from safetensors.torch import load_file

    from spectra.checkpoints.adapter import held_factor_bytes

    base_dir, adapter_dir = _mixtral_adapter_on_experts(tmp_path)
    pairing = Pairing(base_dir, adapter_dir, PairingOptions(vectors=False))
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    module = 4 * sum(t.numel() for k, t in saved.items() if ".layers.0.mlp.experts." in k)  # float32
    assert module == 4 * (6 * 32 + 96 * 6 + 6 * 48 + 32 * 6)  # A (r·E, in) and B (out, r·E) of both, r = 2, E = 3
    deltas, weights = [e.adapter for e in pairing.entries], pairing.tuned.weights
    assert held_factor_bytes(deltas, weights, torch.float32, readers=1) == module
    assert held_factor_bytes(deltas, weights, torch.float64, readers=3) == 2 * 4 * module
    plain = [d for d in deltas if d.parameter is None]
    assert plain and held_factor_bytes(plain, weights, torch.float32, readers=2) == 0  # q_proj
    for entry in pairing.entries:
        if ".layers.0.block_sparse_moe.experts." in entry.name:
            pairing.load(entry)
    held = next(d.held for d in deltas if d.held is not None)
    assert sum(t.numel() * t.element_size() for _, tensors in held._tensors.values()
               for t in tensors.values()) == module
