"""Pairing on real transformers architectures: every ΔW equals the planted update exactly.

Each test builds a tiny model from config, plants known low-rank updates in a copy,
saves both the way users' checkpoints look, and checks that the pairing yields exactly
the planted ΔW (float64, bit-exact thanks to the 2⁻¹² weight grid), in (out, in)
orientation, with the right role and layer, and zero everywhere else.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions, iter_deltas
from tests.models import add_to_parameter, build_model, low_rank, resized_bert_mlm, save

F64 = PairingOptions(dtype="float64")


def assert_exact(pairing_or_iter, planted: dict[str, torch.Tensor]) -> dict:
    """Every planted name appears with exactly its update; every other matrix ΔW is zero."""
    seen = {}
    for d in pairing_or_iter:
        seen[d.name] = d
        if d.kind != "matrix":
            assert torch.count_nonzero(d.delta) == 0, d.name
            continue
        assert d.delta.shape == d.shape, d.name
        if d.name in planted:
            assert d.delta.dtype == torch.float64
            torch.testing.assert_close(d.delta, planted[d.name], rtol=0, atol=0, msg=d.name)
        else:
            assert torch.count_nonzero(d.delta) == 0, f"{d.name} should be unchanged"
    missing = set(planted) - set(seen)
    assert not missing, f"planted modules not yielded: {missing}"
    return seen


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_llama_gqa_untied(tmp_path, fmt):
    base = build_model("llama")
    tuned = copy.deepcopy(base)
    dq = low_rank(32, 32, 3, seed=1)
    dk = low_rank(16, 32, 2, seed=2)  # GQA: k has num_key_value_heads × head_dim = 2 × 8 rows
    dhead = low_rank(64, 32, 1, seed=3)
    add_to_parameter(tuned, "model.layers.1.self_attn.q_proj.weight", dq)
    add_to_parameter(tuned, "model.layers.0.self_attn.k_proj.weight", dk)
    add_to_parameter(tuned, "lm_head.weight", dhead)
    b, t = save(base, tmp_path / "b", fmt), save(tuned, tmp_path / "t", fmt)
    seen = assert_exact(Pairing(b, t, F64), {
        "model.layers.1.self_attn.q_proj": dq, "model.layers.0.self_attn.k_proj": dk, "lm_head": dhead})
    q = seen["model.layers.1.self_attn.q_proj"]
    assert (q.role, q.layer, q.expert, q.shape) == ("q", 1, None, (32, 32))
    k = seen["model.layers.0.self_attn.k_proj"]
    assert (k.role, k.layer, k.shape) == ("k", 0, (16, 32))
    assert seen["lm_head"].role == "head" and seen["model.embed_tokens"].role == "embed"  # untied: both present
    assert seen["model.norm.weight"].kind == "vector"
    assert {d.stack for d in seen.values()} == {None}  # one stack, the language model's


def test_gemma_multi_query_tied(tmp_path):
    base = build_model("gemma")
    tuned = copy.deepcopy(base)
    dv = low_rank(8, 32, 2, seed=21)  # one KV head of head_dim 8
    dgate = low_rank(48, 32, 3, seed=22)
    add_to_parameter(tuned, "model.layers.1.self_attn.v_proj.weight", dv)
    add_to_parameter(tuned, "model.layers.0.mlp.gate_proj.weight", dgate)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    seen = assert_exact(Pairing(b, t, F64), {"model.layers.1.self_attn.v_proj": dv, "model.layers.0.mlp.gate_proj": dgate})
    assert (seen["model.layers.1.self_attn.v_proj"].role, seen["model.layers.1.self_attn.v_proj"].shape) == ("v", (8, 32))
    assert seen["model.layers.0.mlp.gate_proj"].role == "gate"
    assert not any(d.role == "head" for d in seen.values())  # Gemma ties the head to the embedding


def test_multimodal_towers_are_separate_stacks(tmp_path):
    """Gemma3ForConditionalGeneration: the vision tower's encoder.layers.0.self_attn.q_proj and the language model's
    layers.0.self_attn.q_proj are both role q, layer 0; their stack keeps them apart (the language model's is None)."""
    base = build_model("gemma3_multimodal")
    tuned = copy.deepcopy(base)
    dtext, dvision = low_rank(32, 32, 1, seed=31), low_rank(16, 16, 3, seed=32)
    add_to_parameter(tuned, "model.language_model.layers.0.self_attn.q_proj.weight", dtext)
    add_to_parameter(tuned, "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", dvision)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    text, vision = "language_model.model.layers.0.self_attn.q_proj", "vision_tower.encoder.layers.0.self_attn.q_proj"
    seen = assert_exact(Pairing(b, t, F64), {text: dtext, vision: dvision})
    assert (seen[text].role, seen[text].layer, seen[text].stack) == ("q", 0, None)
    assert (seen[vision].role, seen[vision].layer, seen[vision].stack) == ("q", 0, "vision")
    assert seen[vision + ".bias"].stack == "vision"  # its vectors too
    assert seen["multi_modal_projector.mm_input_projection_weight"].stack == "projector"
    assert {d.stack for d in seen.values() if d.name.startswith("language_model.")} == {None}
    entries = {e.name: e for e in Pairing(b, t, PairingOptions(load=False)).entries}
    assert (entries[text].info.stack, entries[vision].info.stack) == (None, "vision")


def test_encoder_decoder_stacks_come_from_the_config(tmp_path):
    """BART names its encoder's and decoder's layers alike (model.encoder.layers.0.self_attn.q_proj, model.decoder…);
    config.json's is_encoder_decoder puts the encoder in a stack of its own (OPT's model.decoder.layers stay None)."""
    import transformers as tf

    config = tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                           max_position_embeddings=32)
    b = save(tf.BartForConditionalGeneration(config), tmp_path / "b", "safetensors")
    seen = {d.name: d for d in Pairing(b, b, PairingOptions(load=False))}
    stacks = [seen[f"model.{name}.q_proj"].stack
              for name in ("encoder.layers.0.self_attn", "decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn")]
    assert stacks == ["encoder", None, None]
    assert seen["model.encoder.layers.0.self_attn.q_proj.bias"].stack == "encoder"
    assert seen["model.shared"].stack is None


def test_gpt2_conv1d_fused_split_and_prefix(tmp_path):
    base = build_model("gpt2", head=False)  # GPT2Model: keys "h.0…"
    tuned = build_model("gpt2", head=True)  # GPT2LMHeadModel: keys "transformer.h.0…", no lm_head on disk
    tuned.transformer.load_state_dict(base.state_dict())
    dq, dk, dv = (low_rank(32, 32, r, seed=s) for r, s in ((3, 1), (2, 2), (1, 3)))
    dfc = low_rank(128, 32, 2, seed=4)
    conv = dict(conv1d=True)
    add_to_parameter(tuned, "transformer.h.1.attn.c_attn.weight", dq, rows=slice(0, 32), **conv)
    add_to_parameter(tuned, "transformer.h.1.attn.c_attn.weight", dk, rows=slice(32, 64), **conv)
    add_to_parameter(tuned, "transformer.h.1.attn.c_attn.weight", dv, rows=slice(64, 96), **conv)
    add_to_parameter(tuned, "transformer.h.0.mlp.c_fc.weight", dfc, **conv)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    seen = assert_exact(Pairing(b, t, F64), {
        "h.1.attn.c_attn[q]": dq, "h.1.attn.c_attn[k]": dk, "h.1.attn.c_attn[v]": dv,
        "h.1.attn.c_attn": torch.cat([dq, dk, dv]), "h.0.mlp.c_fc": dfc})
    whole = seen["h.1.attn.c_attn"]
    assert whole.role == "qkv" and whole.conv1d and whole.shape == (96, 32)  # (out, in), transposed from disk
    assert seen["h.1.attn.c_attn[k]"].fused_name == "h.1.attn.c_attn"
    assert [seen[f"h.1.attn.c_attn[{r}]"].role for r in "qkv"] == ["q", "k", "v"]
    assert seen["h.0.mlp.c_fc"].shape == (128, 32) and seen["h.0.mlp.c_fc"].role == "up"
    assert seen["h.0.attn.c_proj"].role == "o" and seen["h.0.mlp.c_proj"].role == "down"


def test_qwen2_tied_head_and_qkv_biases(tmp_path):
    base = build_model("qwen2")
    tuned = copy.deepcopy(base)
    dv = low_rank(16, 32, 2, seed=5)
    add_to_parameter(tuned, "model.layers.0.self_attn.v_proj.weight", dv)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.bias += 2.0**-8
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "bin")
    pairing = Pairing(b, t, F64)
    seen = {d.name: d for d in pairing}
    torch.testing.assert_close(seen["model.layers.0.self_attn.v_proj"].delta, dv, rtol=0, atol=0)
    bias = seen["model.layers.0.self_attn.q_proj.bias"]
    assert bias.kind == "vector" and bias.role == "q" and torch.all(bias.delta == 2.0**-8)
    assert not any(d.role == "head" for d in seen.values())  # tied: the head appears once, as the embedding
    assert sum(d.role == "embed" for d in seen.values()) == 1


def test_tied_head_saved_twice_is_reported_once(tmp_path):
    base = build_model("qwen2")
    tuned = copy.deepcopy(base)
    b, t = tmp_path / "b.bin", tmp_path / "t.bin"
    torch.save(base.state_dict(), b)  # state_dict() lists tied parameters under both names
    torch.save(tuned.state_dict(), t)
    pairing = Pairing(b, t)
    names = [d.name for d in pairing]
    assert "model.embed_tokens" in names and "lm_head" not in names
    assert any("tied" in n for n in pairing.notes)


def test_bert_prefix_and_roles(tmp_path):
    base = build_model("bert", head=False)  # BertModel: "encoder.layer.0…"
    tuned = build_model("bert", head=True)  # BertForSequenceClassification: "bert.encoder…" + classifier
    tuned.bert.load_state_dict(base.state_dict())
    dquery = low_rank(32, 32, 3, seed=6)
    ddown = low_rank(32, 48, 2, seed=7)
    add_to_parameter(tuned, "bert.encoder.layer.1.attention.self.query.weight", dquery)
    add_to_parameter(tuned, "bert.encoder.layer.0.output.dense.weight", ddown)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "sharded")
    pairing = Pairing(b, t, F64)
    seen = assert_exact(pairing, {"encoder.layer.1.attention.self.query": dquery, "encoder.layer.0.output.dense": ddown})
    roles = {n: seen[n].role for n in ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                                        "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
                                        "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")}
    assert list(roles.values()) == ["q", "k", "v", "o", "up", "down"]
    assert seen["encoder.layer.0.output.dense"].shape == (32, 48)
    assert "classifier.weight" in pairing.only_in_tuned  # the new head has no base: reported, not fatal


def test_phi3_fused_qkv_gqa_and_gate_up(tmp_path):
    base = build_model("phi3")
    tuned = copy.deepcopy(base)
    # q: 4 heads × 8 = 32 rows; k, v: 2 KV heads × 8 = 16 rows each
    dq, dk, dv = low_rank(32, 32, 2, seed=8), low_rank(16, 32, 1, seed=9), low_rank(16, 32, 3, seed=10)
    dgate, dup = low_rank(48, 32, 2, seed=11), low_rank(48, 32, 1, seed=12)
    p = "model.layers.0.self_attn.qkv_proj.weight"
    add_to_parameter(tuned, p, dq, rows=slice(0, 32))
    add_to_parameter(tuned, p, dk, rows=slice(32, 48))
    add_to_parameter(tuned, p, dv, rows=slice(48, 64))
    g = "model.layers.1.mlp.gate_up_proj.weight"
    add_to_parameter(tuned, g, dgate, rows=slice(0, 48))
    add_to_parameter(tuned, g, dup, rows=slice(48, 96))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    seen = assert_exact(Pairing(b, t, F64), {
        "model.layers.0.self_attn.qkv_proj[q]": dq, "model.layers.0.self_attn.qkv_proj[k]": dk,
        "model.layers.0.self_attn.qkv_proj[v]": dv, "model.layers.0.self_attn.qkv_proj": torch.cat([dq, dk, dv]),
        "model.layers.1.mlp.gate_up_proj[gate]": dgate, "model.layers.1.mlp.gate_up_proj[up]": dup,
        "model.layers.1.mlp.gate_up_proj": torch.cat([dgate, dup])})
    assert seen["model.layers.1.mlp.gate_up_proj[up]"].role == "up"
    assert seen["model.layers.0.self_attn.qkv_proj[k]"].shape == (16, 32)


def test_gpt_neox_head_interleaved_qkv(tmp_path):
    base = build_model("gpt_neox")
    tuned = copy.deepcopy(base)
    dq = low_rank(32, 32, 2, seed=13)
    # rows of query_key_value are [q_h; k_h; v_h] per head h (head_dim 8): q of head h is rows 24h..24h+8
    q_rows = [24 * h + i for h in range(4) for i in range(8)]
    full = torch.zeros(96, 32, dtype=torch.float64)
    full[q_rows] = dq
    add_to_parameter(tuned, "gpt_neox.layers.0.attention.query_key_value.weight", full)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    zeros = torch.zeros(32, 32, dtype=torch.float64)
    assert_exact(Pairing(b, t, F64), {
        "gpt_neox.layers.0.attention.query_key_value[q]": dq,
        "gpt_neox.layers.0.attention.query_key_value[k]": zeros,
        "gpt_neox.layers.0.attention.query_key_value": full})


def test_mixtral_experts(tmp_path):
    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    dgate, ddown = low_rank(48, 32, 2, seed=14), low_rank(32, 48, 3, seed=15)
    # transformers 5 keeps experts as 3-D (experts, 2·inter, hidden) in memory and saves w1/w2/w3 per expert
    add_to_parameter(tuned, "model.layers.1.mlp.experts.gate_up_proj", dgate, expert=2, rows=slice(0, 48))
    add_to_parameter(tuned, "model.layers.0.mlp.experts.down_proj", ddown, expert=1)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    seen = assert_exact(Pairing(b, t, F64), {
        "model.layers.1.block_sparse_moe.experts.2.w1": dgate, "model.layers.0.block_sparse_moe.experts.1.w2": ddown})
    w1 = seen["model.layers.1.block_sparse_moe.experts.2.w1"]
    assert (w1.role, w1.layer, w1.expert) == ("gate", 1, 2)
    assert seen["model.layers.0.block_sparse_moe.experts.1.w3"].role == "up"
    assert seen["model.layers.0.block_sparse_moe.gate"].role == "other"  # the router


def test_mixtral_3d_expert_tensors(tmp_path):
    """A state dict with 3-D expert tensors (transformers-5 in-memory layout) splits per expert."""
    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    dup = low_rank(48, 32, 2, seed=16)
    add_to_parameter(tuned, "model.layers.0.mlp.experts.gate_up_proj", dup, expert=0, rows=slice(48, 96))
    torch.save(base.state_dict(), tmp_path / "b.bin")
    torch.save(tuned.state_dict(), tmp_path / "t.bin")
    assert_exact(Pairing(tmp_path / "b.bin", tmp_path / "t.bin", F64), {
        "model.layers.0.mlp.experts.0.gate_up_proj[up]": dup,
        "model.layers.0.mlp.experts.0.gate_up_proj": torch.cat([torch.zeros(48, 32, dtype=torch.float64), dup])})


def test_bf16_pair_is_float32_difference(tmp_path):
    base = build_model("llama").to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.o_proj.weight += 1e-3 * torch.randn(32, 32, dtype=torch.bfloat16)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    for d in iter_deltas(b, t):
        assert d.delta.dtype == torch.float32 and d.base_dtype == "bfloat16"
        if d.name == "model.layers.0.self_attn.o_proj":
            expected = tuned.model.layers[0].self_attn.o_proj.weight.float() - base.model.layers[0].self_attn.o_proj.weight.float()
            assert torch.equal(d.delta, expected)
            assert torch.count_nonzero(d.delta) > 0


def test_a_head_the_fine_tune_unties_is_measured_against_the_base_embedding(tmp_path):
    """Qwen2 ties lm_head to embed_tokens and stores it once; a fine-tune that unties it stores lm_head.
    The head's update was left out as "only in tuned"."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = build_model("qwen2")
    b = save(base, tmp_path / "b", "safetensors")
    shutil.copytree(b, tmp_path / "t")
    state = load_file(tmp_path / "t" / "model.safetensors")
    assert "lm_head.weight" not in state
    dhead = low_rank(*state["model.embed_tokens.weight"].shape, 2, seed=5)
    state["lm_head.weight"] = (state["model.embed_tokens.weight"].double() + dhead).float()
    save_file(state, tmp_path / "t" / "model.safetensors", metadata={"format": "pt"})
    pairing = Pairing(b, tmp_path / "t", F64)
    seen = {d.name: d for d in pairing}
    assert "lm_head" in seen and pairing.only_in_tuned == []
    torch.testing.assert_close(seen["lm_head"].delta, dhead, rtol=0, atol=1e-7)
    assert seen["lm_head"].role == "head" and torch.count_nonzero(seen["model.embed_tokens"].delta) == 0
    assert any("tied to model.embed_tokens in the base" in n for n in pairing.notes)


def test_a_head_the_fine_tune_ties_is_measured_against_the_tuned_embedding(tmp_path):
    """The reverse: Llama's base stores lm_head, a fine-tune saved with tie_word_embeddings stores only the
    embedding, which its model's head is. The head had been left "only in BASE" with no note; its ΔW is the tuned
    embedding − the base head. Control: the same pair with the tuned config untied keeps it "only in BASE"."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base = build_model("llama")
    b = save(base, tmp_path / "b", "safetensors")
    shutil.copytree(b, tmp_path / "t")
    state = load_file(tmp_path / "t" / "model.safetensors")
    state["model.embed_tokens.weight"] = (state["model.embed_tokens.weight"].double()
                                          + low_rank(*state["model.embed_tokens.weight"].shape, 2, seed=6)).float()
    head = state.pop("lm_head.weight")
    save_file(state, tmp_path / "t" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    pairing = Pairing(b, tmp_path / "t", F64)
    seen = {d.name: d for d in pairing}
    assert "lm_head" in seen and pairing.only_in_base == [] and seen["lm_head"].role == "head"
    torch.testing.assert_close(seen["lm_head"].delta, state["model.embed_tokens.weight"].double() - head.double(),
                               rtol=0, atol=0)
    assert any("tied to model.embed_tokens in the tuned checkpoint" in n for n in pairing.notes)
    (tmp_path / "t" / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    untied = Pairing(b, tmp_path / "t", F64)
    assert "lm_head" not in {d.name for d in untied} and untied.only_in_base == ["lm_head.weight"]


def test_resized_vocabulary(tmp_path):
    base = build_model("llama")
    tuned = copy.deepcopy(base)
    tuned.resize_token_embeddings(70)
    dembed = low_rank(64, 32, 1, seed=17)
    with torch.no_grad():
        tuned.model.embed_tokens.weight[:64] += dembed.float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    pairing = Pairing(b, t, F64)
    seen = {d.name: d for d in pairing}
    embed = seen["model.embed_tokens"]
    assert embed.added_rows == 6 and embed.shape == (64, 32)
    torch.testing.assert_close(embed.delta, dembed, rtol=0, atol=0)
    assert seen["lm_head"].added_rows == 6
    assert any("vocabulary resized" in n for n in pairing.notes)


@pytest.mark.parametrize("tie", [True, False])
def test_resized_vocabulary_bias_is_paired_over_its_shared_entries(tmp_path, tie):
    """A BERT masked LM with a resized vocabulary was refused on cls.predictions.bias ((100,) vs (108,)): a 1-D
    tensor of the vocabulary's size is now paired as its embedding and head are, ΔW over the 100 shared entries and
    the 8 added ones noted. The decoder (tied to the word embeddings, or stored untied) is a head resized alike."""
    from safetensors.numpy import load_file as load_numpy

    pair = resized_bert_mlm(tmp_path, tie=tie)
    b, t, planted = pair.base, pair.tuned, pair.planted
    pairing = Pairing(b, t, PairingOptions(dtype="float64", with_weights=True))
    seen = {d.name: d for d in pairing}
    stored_b, stored_t = load_numpy(b / "model.safetensors"), load_numpy(t / "model.safetensors")
    for name, update in planted.items():
        d = seen[name]
        assert d.added_rows == 8 and d.delta.shape == d.shape == update.shape, name
        torch.testing.assert_close(d.delta, update, rtol=0, atol=0, msg=name)
        want = stored_t[d.base_tensor][:100].astype("float64") - stored_b[d.base_tensor].astype("float64")
        torch.testing.assert_close(d.delta, torch.from_numpy(want), rtol=0, atol=0, msg=name)
        assert d.tuned.shape == d.base.shape == update.shape  # W_tuned over the shared rows, as a matrix's
    bias = seen["cls.predictions.bias"]
    assert bias.kind == "vector" and bias.shape == (100,)
    assert "cls.predictions.bias: vocabulary resized, 8 entries added in tuned (ΔW over the 100 shared entries)" \
        in pairing.notes
    if not tie:
        assert seen["cls.predictions.decoder"].role == "head" and seen["cls.predictions.decoder"].kind == "matrix"
        assert "cls.predictions.decoder: vocabulary resized, 8 rows added in tuned (ΔW over the 100 shared rows)" \
            in pairing.notes
    else:
        assert "cls.predictions.decoder" not in seen and "cls.predictions.decoder.weight" not in stored_t  # tied
    for name, d in seen.items():
        if name not in planted:
            assert d.added_rows == 0 and torch.count_nonzero(d.delta) == 0, name


@pytest.mark.parametrize("family, name", [("phimoe", "lm_head.bias"), ("bart", "final_logits_bias")])
def test_resized_lm_head_bias_is_paired_over_its_shared_entries(tmp_path, family, name):
    """A biased LM head's bias (PhiMoE's lm_head.bias (64,); BART's final_logits_bias, a (1, 64) buffer), resized
    to 72 with the vocabulary, is paired as BERT's cls.predictions.bias is."""
    base = build_model(family)
    tuned = copy.deepcopy(base)
    tuned.resize_token_embeddings(72)
    dbias = low_rank(64, 1, 1, seed=8)[:, 0]
    with torch.no_grad():
        (dict(tuned.named_parameters()) | dict(tuned.named_buffers()))[name].view(-1)[:64] += dbias.float()
    seen = {d.name: d for d in Pairing(save(base, tmp_path / "b", "safetensors"),
                                        save(tuned, tmp_path / "t", "safetensors"), F64)}
    bias = seen[name]
    assert bias.kind == "vector" and bias.shape == (64,) and bias.added_rows == 8
    torch.testing.assert_close(bias.delta, dbias, rtol=0, atol=0)
    assert any(d.role == "embed" and d.added_rows == 8 for d in seen.values())


@pytest.mark.parametrize("name, size", [
    ("bert.encoder.layer.0.intermediate.dense.bias", 56),  # no vocabulary's size: another model's MLP
    ("cls.predictions.bias", 104),  # the vocabulary's, resized otherwise than the embedding (108)
])
def test_a_resized_bias_not_sized_as_the_resized_vocabulary_is_refused(tmp_path, name, size):
    from safetensors.torch import load_file, save_file

    from spectra.errors import PairingError

    pair = resized_bert_mlm(tmp_path)
    b, t = pair.base, pair.tuned
    state = load_file(t / "model.safetensors")
    state[name] = torch.zeros(size)
    save_file(state, t / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PairingError, match=rf"tensor {re.escape(name)} has shape \(\d+,\) in .* but \({size},\)"):
        Pairing(b, t)


def test_selection_by_role_layer_and_name(tmp_path):
    base = build_model("gpt2")
    b = save(base, tmp_path / "b", "safetensors")
    t = save(copy.deepcopy(base), tmp_path / "t", "safetensors")
    names = [d.name for d in iter_deltas(b, t, roles=("q", "v"), load=False)]
    assert names == ["transformer.h.0.attn.c_attn[q]", "transformer.h.0.attn.c_attn[v]",
                     "transformer.h.1.attn.c_attn[q]", "transformer.h.1.attn.c_attn[v]"]
    layer1 = {d.layer for d in iter_deltas(b, t, layers=(1, 1), load=False)}
    assert layer1 == {1}
    mlp = [d.name for d in iter_deltas(b, t, include="re:mlp\\.c_fc$", load=False)]
    assert mlp == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    no_vectors = list(iter_deltas(b, t, vectors=False, exclude="*c_attn*", load=False))
    assert all(d.kind == "matrix" and "c_attn" not in d.name for d in no_vectors)
    # the bracketed names spectra prints can be pasted as patterns (a glob read [q] as a character class)
    one = [d.name for d in iter_deltas(b, t, include="transformer.h.0.attn.c_attn[q]", load=False)]
    assert one == ["transformer.h.0.attn.c_attn[q]"]
    rest = [d.name for d in iter_deltas(b, t, roles=("q", "k"), exclude="*c_attn[q]", load=False)]
    assert rest == ["transformer.h.0.attn.c_attn[k]", "transformer.h.1.attn.c_attn[k]"]
    assert [d.name for d in iter_deltas(b, t, include="*.c_[af]*", roles=("up",), vectors=False, load=False)] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]  # character classes still work


def test_float32_default_and_device(tmp_path):
    base = build_model("llama")
    b = save(base, tmp_path / "b", "safetensors")
    t = save(copy.deepcopy(base), tmp_path / "t", "safetensors")
    d = next(iter_deltas(b, t, roles=("q",), with_weights=True))
    assert d.delta.dtype == torch.float32 and d.delta.device.type == "cpu"
    torch.testing.assert_close(d.base, base.model.layers[0].self_attn.q_proj.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_difference_is_bit_identical_to_two_upcasts(storage, dtype):
    """Chunked up-cast (sizes around the chunk, odd tails) = tuned.to(dtype) − base.to(dtype), bit for bit."""
    from spectra.checkpoints import pairing

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (pairing._CHUNK // 64, 64), (300, 777), (2, 3, pairing._CHUNK // 3 + 7)]:
        base = torch.randn(shape, generator=g).to(storage)
        tuned = (base.float() + 1e-2 * torch.randn(shape, generator=g)).to(storage)
        got = pairing.exact_difference(tuned, base, dtype)
        assert got.dtype == dtype and got.shape == base.shape
        assert torch.equal(got, tuned.to(dtype) - base.to(dtype)), shape


def test_exact_difference_keeps_a_transposed_view_and_mixed_dtypes():
    from spectra.checkpoints.pairing import exact_difference

    g = torch.Generator().manual_seed(1)
    base = torch.randn(700, 300, generator=g).bfloat16()
    tuned = torch.randn(700, 300, generator=g).bfloat16()
    got = exact_difference(tuned.T, base.T, torch.float32)  # Conv1D: stored (in, out), seen (out, in)
    assert got.shape == (300, 700) and torch.equal(got, tuned.T.float() - base.T.float())
    mixed = exact_difference(tuned.float(), base, torch.float32)  # fp32 tuned against a bf16 base
    assert torch.equal(mixed, tuned.float() - base.float())


def test_a_float64_pair_is_subtracted_in_float64(tmp_path):
    """Rounding each float64 weight to float32 before subtracting put ~6e-8·|W| of full-rank noise into
    ΔW: a rank-2 update of 1e-7 came out with 64 values "above the noise floor" (float64's, ~1e-16)."""
    from safetensors.torch import save_file

    from spectra.analysis import analyze
    from spectra.checkpoints.pairing import exact_difference

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g, dtype=torch.float64)
    D = 1e-7 * torch.randn(64, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 96, generator=g, dtype=torch.float64)
    got = exact_difference(W + D, W, torch.float32)
    assert torch.equal(got, ((W + D) - W).float())  # the float64 difference, rounded once
    assert not torch.equal(got, (W + D).float() - W.float())  # negative control: the old rounding first
    for name, t in (("base", W), ("tuned", W + D)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": t.contiguous()}, tmp_path / name / "model.safetensors")
    (row,) = analyze(tmp_path / "base", tmp_path / "tuned", cache_dir=False, progress=False).matrices()
    assert row["noise"]["rank_above"] == 2 and row["energy_rank"]["0.99"] == 2


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_difference_and_norms_match_float64(storage):
    """The norms taken during the chunked subtraction: within 1e-6 of float64, equal to squared_norm's."""
    from spectra.checkpoints import pairing
    from spectra.linalg.sketch import squared_norm

    g = torch.Generator().manual_seed(2)
    rows = 3 * pairing._CHUNK // 64 + 5  # three chunks and a tail that is not a whole 2¹² block
    base = torch.randn(rows, 64, generator=g).to(storage)
    tuned = (base.float() + 1e-2 * torch.randn(rows, 64, generator=g)).to(storage)
    delta, delta_sq, base_sq = pairing.difference_and_norms(tuned, base, torch.float32)
    assert torch.equal(delta, tuned.float() - base.float())
    ref_delta = float((tuned.double() - base.double()).square().sum())
    ref_base = float(base.double().square().sum())
    assert delta_sq == pytest.approx(ref_delta, rel=1e-6) and base_sq == pytest.approx(ref_base, rel=1e-6)
    assert delta_sq == pytest.approx(squared_norm(delta), rel=1e-12)
    assert base_sq == pytest.approx(squared_norm(base), rel=1e-12)
    # Conv1D (a transposed view) takes the same route in its stored layout.
    _, t_sq, b_sq = pairing.difference_and_norms(tuned.T, base.T, torch.float32)
    assert (t_sq, b_sq) == (delta_sq, base_sq)
    # Routes that do not chunk into float32 give no norms (the caller computes them).
    assert pairing.difference_and_norms(tuned, base, torch.float64)[1:] == (None, None)
    assert pairing.difference_and_norms(tuned.float(), base.float(), torch.float32)[1:] == (None, None)
    assert pairing.difference_and_norms(tuned[:3], base[:3], torch.float32)[1:] == (None, None)


def _large_bf16_pair(folder, bad_base=None, bad_tuned=None, same_entry=False):
    """Two bf16 safetensors checkpoints with matrices above one subtraction chunk, optionally one bad entry each
    (the tuned one at the base's place with `same_entry`)."""
    from safetensors.torch import save_file

    from spectra.checkpoints import pairing

    g = torch.Generator().manual_seed(3)
    shape = (pairing._CHUNK // 256 + 9, 300)  # > one chunk
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(shape, generator=g).bfloat16() for i in range(2)}
    tuned = {k: (v.float() + 1e-2 * torch.randn(shape, generator=g)).bfloat16() for k, v in base.items()}
    name = "model.layers.1.mlp.up_proj.weight"
    if bad_base is not None:
        base[name][7, 11] = bad_base
    if bad_tuned is not None:
        tuned[name][(7, 11) if same_entry else (shape[0] - 1, 299)] = bad_tuned  # else in the last, partial chunk
    folder.mkdir()
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


@pytest.mark.parametrize("side", ["base", "tuned"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_found_by_the_subtraction_norms(tmp_path, side, bad):
    """Large bf16 pairs are checked through the norms of the chunked subtraction: same errors, same skips."""
    from dataclasses import replace

    from spectra.errors import NonFiniteWeightError

    b, t = _large_bf16_pair(tmp_path / "p", **{f"bad_{side}": bad})
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.1.mlp.up_proj.weight .* 1 NaN/Inf"):
        list(iter_deltas(b, t))
    pairing = Pairing(b, t)
    pairing.options = replace(pairing.options, on_nonfinite="skip")
    deltas = {d.name: d for d in pairing}
    assert list(deltas) == ["model.layers.0.mlp.up_proj"] and len(pairing.skipped) == 1
    clean = deltas["model.layers.0.mlp.up_proj"]
    assert clean.delta_sq == pytest.approx(float(clean.delta.double().square().sum()), rel=1e-6)


def test_clean_large_pair_carries_norms_and_overflow_is_an_error(tmp_path):
    from dataclasses import replace

    from spectra.errors import NonFiniteWeightError

    b, t = _large_bf16_pair(tmp_path / "ok")
    for d in iter_deltas(b, t, with_weights=True, weights_as_stored=True):
        assert d.delta_sq == pytest.approx(float(d.delta.double().square().sum()), rel=1e-6)
        assert d.base_sq == pytest.approx(float(d.base.double().square().sum()), rel=1e-6)
    # Finite entries whose squares overflow float32 (1e30² > 3.4e38): the norms are still exact (float64 blocks).
    b, t = _large_bf16_pair(tmp_path / "huge", bad_base=1e30, bad_tuned=-1e30)
    for d in iter_deltas(b, t, with_weights=True, weights_as_stored=True):
        assert d.delta_sq == pytest.approx(float(d.delta.double().square().sum()), rel=1e-6)
        assert d.base_sq == pytest.approx(float(d.base.double().square().sum()), rel=1e-6)
    # Finite weights whose difference overflows float32 (3e38 − (−3e38)): refused, or skipped on request.
    b, t = _large_bf16_pair(tmp_path / "overflow", bad_base=-3e38, bad_tuned=3e38, same_entry=True)
    with pytest.raises(NonFiniteWeightError, match=r"model.layers.1.mlp.up_proj overflows float32"):
        list(iter_deltas(b, t))
    pairing = Pairing(b, t)
    pairing.options = replace(pairing.options, on_nonfinite="skip")
    assert [d.name for d in pairing] == ["model.layers.0.mlp.up_proj"] and "overflows" in pairing.skipped[0]


def test_norms_ride_on_the_whole_tensor_only(tmp_path):
    """A chunked Conv1D fused c_attn: the whole gets the subtraction's norms, its q/k/v splits None."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    base = {"transformer.h.0.attn.c_attn.weight": torch.randn(256, 768, generator=g).bfloat16()}  # (in, out)
    tuned = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    deltas = {d.name: d for d in iter_deltas(tmp_path / "b.safetensors", tmp_path / "t.safetensors")}
    whole = deltas.pop("transformer.h.0.attn.c_attn")
    assert whole.conv1d and whole.delta_sq == pytest.approx(float(whole.delta.double().square().sum()), rel=1e-6)
    w = base["transformer.h.0.attn.c_attn.weight"]
    assert whole.base_sq == pytest.approx(float(w.double().square().sum()), rel=1e-6)
    assert sorted(deltas) == [f"transformer.h.0.attn.c_attn[{p}]" for p in "kqv"]
    assert all(d.delta_sq is None and d.base_sq is None for d in deltas.values())


def test_weights_as_stored_are_the_checkpoint_tensors(tmp_path):
    base = build_model("llama").to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    out_features, in_features = tuned.model.layers[1].mlp.down_proj.weight.shape
    add_to_parameter(tuned, "model.layers.1.mlp.down_proj.weight", low_rank(out_features, in_features, 2, seed=3))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    stored = {d.name: d for d in iter_deltas(b, t, roles=("down",), with_weights=True, weights_as_stored=True)}
    upcast = {d.name: d for d in iter_deltas(b, t, roles=("down",), with_weights=True)}
    d = stored["model.layers.1.mlp.down_proj"]
    assert d.base.dtype == torch.bfloat16 and d.tuned.dtype == torch.bfloat16
    torch.testing.assert_close(d.base, base.model.layers[1].mlp.down_proj.weight.detach(), rtol=0, atol=0)
    u = upcast["model.layers.1.mlp.down_proj"]
    assert u.base.dtype == torch.float32 and torch.equal(u.base, d.base.float()) and torch.equal(u.delta, d.delta)
    assert torch.equal(d.delta, d.tuned.float() - d.base.float()) and torch.count_nonzero(d.delta) > 0


@pytest.mark.parametrize("family", ["llama4", "gpt_oss"])
def test_experts_stored_in_by_out_are_transposed_and_split_as_the_model_reads_them(family, tmp_path):
    """Llama-4 and gpt-oss keep experts as (E, in, out) (x @ W[e]); gpt-oss interleaves gate/up outputs."""
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=3, vocab_size=64)
    if family == "llama4":
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(intermediate_size_mlp=64, moe_layers=[0], **common))
        gate, up = slice(0, 48), slice(48, 96)  # gate_up.chunk(2, dim=-1)
    else:
        model = tf.GptOssForCausalLM(tf.GptOssConfig(num_experts_per_tok=2, layer_types=["full_attention"], **common))
        gate, up = slice(0, 96, 2), slice(1, 96, 2)  # gate_up[..., ::2], gate_up[..., 1::2]
    tuned = copy.deepcopy(model)
    name = next(n for n, _ in tuned.named_parameters() if n.endswith("experts.gate_up_proj"))
    with torch.no_grad():
        tuned.get_parameter(name).add_(0.01 * torch.randn_like(tuned.get_parameter(name)))
    model.save_pretrained(tmp_path / "b")
    tuned.save_pretrained(tmp_path / "t")
    deltas = {d.name: d for d in iter_deltas(tmp_path / "b", tmp_path / "t")}
    stored = (tuned.get_parameter(name) - model.get_parameter(name)).detach()  # (E, in=32, out=96)
    head = name.removesuffix(".gate_up_proj")
    for e in range(3):
        whole = deltas[f"{head}.{e}.gate_up_proj"]
        assert whole.shape == (96, 32) and whole.kind == "matrix"
        torch.testing.assert_close(whole.delta, stored[e].T, rtol=0, atol=0)
        torch.testing.assert_close(deltas[f"{head}.{e}.gate_up_proj[gate]"].delta, stored[e][:, gate].T, rtol=0, atol=0)
        torch.testing.assert_close(deltas[f"{head}.{e}.gate_up_proj[up]"].delta, stored[e][:, up].T, rtol=0, atol=0)
        assert deltas[f"{head}.{e}.down_proj"].shape == (32, 48)  # (out=hidden, in=intermediate)
    if family == "gpt_oss":  # its (E, 2I) biases are per-expert vectors, not a matrix
        assert deltas[f"{head}.0.gate_up_proj_bias"].kind == "vector"


def test_leased_delta_and_its_bf16_copy_equal_the_fresh_ones(tmp_path):
    """Pairing.load(lease=…) writes ΔW into reused buffers and, above low_copy_above, bf16(ΔW) beside it:
    the same numbers as a fresh subtraction and ΔW.to(bfloat16), also for a Conv1D (transposed) matrix."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from spectra.checkpoints.buffers import BufferPool

    b, t = _large_bf16_pair(tmp_path / "p")
    g = torch.Generator().manual_seed(5)
    conv = {"transformer.h.0.mlp.c_fc.weight": torch.randn(300, 1000, generator=g).bfloat16()}  # (in, out)
    save_file(conv, str(tmp_path / "cb.safetensors"))
    save_file({k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in conv.items()},
              str(tmp_path / "ct.safetensors"))
    pool = BufferPool()
    for pair in ((b, t), (tmp_path / "cb.safetensors", tmp_path / "ct.safetensors")):
        fresh = {d.name: d for d in Pairing(*pair)}
        pairing = Pairing(*pair)
        pairing.options = replace(pairing.options, low_copy_above=299)
        for entry in pairing.entries:
            ref = next(d for d in fresh.values() if d.base_tensor == entry.base_tensor)
            with pool.lease() as lease:
                (d,) = pairing.load(entry, lease=lease)
                assert torch.equal(d.delta, ref.delta) and d.delta.shape == ref.delta.shape
                assert d.delta_sq == ref.delta_sq and d.base_sq == ref.base_sq
                assert d.delta_low.dtype == torch.bfloat16 and torch.equal(d.delta_low, ref.delta.to(torch.bfloat16))
                assert ref.delta_low is None  # not asked for
            with pool.lease() as lease:  # below the threshold: ΔW only
                pairing.options = replace(pairing.options, low_copy_above=300)
                (d,) = pairing.load(entry, lease=lease)
                assert d.delta_low is None and torch.equal(d.delta, ref.delta)
                pairing.options = replace(pairing.options, low_copy_above=299)
    assert pool.idle_bytes > 0


def _stacked_expert_pair(root, fmt: str = "safetensors"):
    """A tiny gpt-oss (experts stored (E, in, out), E = 3) and a copy whose expert tensors all moved."""
    from tests.checkpoints.test_adapter_pairing import tiny_gpt_oss

    base = tiny_gpt_oss()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name:
                p.add_(0.01 * torch.randn_like(p))
    return base, tuned, save(base, root / "b", fmt), save(tuned, root / "t", fmt)


def _count_stored_reads(monkeypatch) -> tuple[dict, dict]:
    """({(side, tensor): elements the checkpoint handed out}, {name: elements scanned for NaN/Inf}), as reads go."""
    from spectra.checkpoints.source import CheckpointSource

    handed, scanned = {}, {}
    read, read_expert, finite = CheckpointSource.read, CheckpointSource.read_expert, Pairing._finite

    def count(source, name, tensor):
        key = ("base" if source.path.name == "b" else "tuned", name)
        handed[key] = handed.get(key, 0) + tensor.numel()
        return tensor

    def scan(self, tensor, name, *args):
        scanned[name] = scanned.get(name, 0) + tensor.numel()
        return finite(self, tensor, name, *args)

    monkeypatch.setattr(CheckpointSource, "read", lambda self, name: count(self, name, read(self, name)))
    monkeypatch.setattr(CheckpointSource, "read_expert",
                        lambda self, name, e: count(self, name, read_expert(self, name, e)))
    monkeypatch.setattr(Pairing, "_finite", scan)
    return handed, scanned


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_experts_stored_stacked_are_read_once_per_parameter(fmt, tmp_path, monkeypatch):
    """A stored (E, in, out) expert tensor is E entries, one per expert. Each entry read the tensor whole and scanned
    it whole for NaN/Inf, so a parameter's data was read E times per side (128× on gpt-oss-120b's experts); now each
    entry reads its expert's slice alone: each side of a parameter is handed out and scanned once in all, and every
    ΔW is still the stored slice's difference, bit for bit."""
    base, tuned, b, t = _stacked_expert_pair(tmp_path, fmt)
    handed, scanned = _count_stored_reads(monkeypatch)
    deltas = {d.name: d for d in iter_deltas(b, t, include="experts", with_weights=True, weights_as_stored=True)}
    state_b, state_t = base.state_dict(), tuned.state_dict()
    stacked = [k for k in state_b if ".experts." in k]  # gate_up_proj (3, 32, 32), down_proj (3, 16, 32), biases
    assert len(stacked) == 4 and all(state_b[k].shape[0] == 3 for k in stacked)
    for side, state in (("base", state_b), ("tuned", state_t)):
        assert {k: handed[side, k] for k in stacked} == {k: state[k].numel() for k in stacked}  # the planning
        # reads the head and the embedding (tied?), the rest is the experts
    assert {k.rpartition("[")[0] for k in scanned} == set(stacked)  # each expert's slice, named as one
    assert {k: n for k, n in scanned.items()} == {f"{k}[{e}]": 2 * state_b[k][e].numel() for k in stacked
                                                  for e in range(3)}
    for e in range(3):
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.0.mlp.experts.{proj}"
            d = deltas[f"model.layers.0.mlp.experts.{e}.{proj}"]
            assert torch.equal(d.delta, (state_t[key][e] - state_b[key][e]).T)  # (in, out) -> (out, in)
            assert torch.equal(d.base, state_b[key][e].T)
        bias = deltas[f"model.layers.0.mlp.experts.{e}.gate_up_proj_bias"]
        assert torch.equal(bias.delta, state_t["model.layers.0.mlp.experts.gate_up_proj_bias"][e]
                           - state_b["model.layers.0.mlp.experts.gate_up_proj_bias"][e])


def test_a_nonfinite_expert_of_a_stacked_tensor_is_named_and_skipped_alone(tmp_path):
    """A NaN in expert 1 of a stored (E, in, out) tensor is that expert's: the error names the slice, and a skip
    leaves the other experts' ΔW (each was refused with the whole tensor's NaN count)."""
    from dataclasses import replace

    from spectra.errors import NonFiniteWeightError

    _, tuned, _, _ = _stacked_expert_pair(tmp_path / "clean")
    with torch.no_grad():
        tuned.get_parameter("model.layers.0.mlp.experts.down_proj")[1, 2, 3] = float("nan")
    b, t = tmp_path / "clean" / "b", save(tuned, tmp_path / "t", "safetensors")
    with pytest.raises(NonFiniteWeightError, match=r"experts\.down_proj\[1\] in .* holds 1 NaN/Inf"):
        list(iter_deltas(b, t, include="experts.1.down_proj"))
    pairing = Pairing(b, t, PairingOptions(include="down_proj", vectors=False))
    pairing.options = replace(pairing.options, on_nonfinite="skip")
    assert [d.name for d in pairing] == ["model.layers.0.mlp.experts.0.down_proj",
                                         "model.layers.0.mlp.experts.2.down_proj"]
    assert pairing.skipped == [f"tensor model.layers.0.mlp.experts.down_proj[1] in {t} holds 1 NaN/Inf value(s)"]


def _large_bf16_expert_pair(folder, *, in_out: bool, bad=None):
    """bf16 checkpoints holding one stored (E = 3, 512, 300) expert tensor, each expert's slice above one subtraction
    chunk; `bad` (side, value) plants one value in expert 1. `in_out`: a gpt-oss config, experts stored (in, out)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(6)
    name = "model.layers.0.mlp.experts.down_proj"
    base = {name: torch.randn(3, 512, 300, generator=g).bfloat16()}
    tuned = {name: (base[name].float() + 1e-2 * torch.randn(3, 512, 300, generator=g)).bfloat16()}
    if bad is not None:
        side, value = bad
        (base if side == "base" else tuned)[name][1, 500, 299] = value  # in expert 1's last, partial chunk
    for side, state in (("b", base), ("t", tuned)):
        (folder / side).mkdir(parents=True)
        save_file(state, str(folder / side / "model.safetensors"))
        (folder / side / "config.json").write_text(json.dumps({"model_type": "gpt_oss" if in_out else "mixtral"}))
    return folder / "b", folder / "t", base[name], tuned[name]


@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("side", ["base", "tuned"])
def test_a_nonfinite_expert_slice_is_found_by_the_subtraction_norms(tmp_path, monkeypatch, side, in_out):
    """Expert entries (one expert's slice of a stored 3-D tensor) were scanned for NaN/Inf before the chunked
    subtraction, which then left out the norms that would have found them (the analysis took ‖ΔW‖² and ‖W_base‖² in
    two more passes): per expert two scans and two norm passes over what one pass covers. Now the norms check them
    like a module's weight: a NaN in expert 1 is still named by its slice and skipped alone, the finite experts are
    never scanned and carry their norms; a finite pair (negative control) passes without a scan."""
    from spectra.errors import NonFiniteWeightError

    scans: list[str] = []
    finite = Pairing._finite
    monkeypatch.setattr(Pairing, "_finite", lambda self, tensor, name, *args: (scans.append(name),
                                                                               finite(self, tensor, name, *args))[1])
    b, t, _, _ = _large_bf16_expert_pair(tmp_path / "bad", in_out=in_out, bad=(side, float("nan")))
    stored = f"model.layers.0.mlp.experts.down_proj[1] in {b if side == 'base' else t}"
    with pytest.raises(NonFiniteWeightError, match=re.escape(stored) + " holds 1 NaN/Inf"):
        list(iter_deltas(b, t, include="experts.1."))
    pairing = Pairing(b, t, PairingOptions(on_nonfinite="skip", with_weights=True, weights_as_stored=True))
    scans.clear()
    deltas = {d.name: d for d in pairing}
    assert list(deltas) == [f"model.layers.0.mlp.experts.{e}.down_proj" for e in (0, 2)]
    assert pairing.skipped == [f"tensor {stored} holds 1 NaN/Inf value(s)"]
    assert set(scans) == {"model.layers.0.mlp.experts.down_proj[1]"}  # the bad expert only, to name and count it
    for d in deltas.values():
        assert d.delta_sq == pytest.approx(float(d.delta.double().square().sum()), rel=1e-6)
        assert d.base_sq == pytest.approx(float(d.base.double().square().sum()), rel=1e-6)

    b, t, base, tuned = _large_bf16_expert_pair(tmp_path / "clean", in_out=in_out)
    scans.clear()
    deltas = list(iter_deltas(b, t))
    assert scans == [] and len(deltas) == 3
    for e, d in enumerate(deltas):
        expected = tuned[e].float() - base[e].float()
        assert torch.equal(d.delta, expected.T if in_out else expected) and d.shape == ((300, 512) if in_out
                                                                                        else (512, 300))
        assert d.delta_sq == pytest.approx(float(expected.double().square().sum()), rel=1e-6)


def _scalar_pair(root, *, tuned_scale, tuned_shape=()):
    """A hand-made pair holding a 0-d parameter, CLIP's ``logit_scale`` (the model's own) and a module's 0-d
    ``blocks.0.gate.scale`` (bf16), beside a matrix: the fine-tune moved `logit_scale` to `tuned_scale`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-8, 9, (4, 6), generator=g).float() * 2.0**-6
    base = {"logit_scale": torch.tensor(2.6592), "blocks.0.gate.scale": torch.tensor(0.25, dtype=torch.bfloat16),
            "blocks.0.proj.weight": weight}
    tuned = dict(base, logit_scale=torch.full(tuned_shape, tuned_scale))
    for name, state in (("b", base), ("t", tuned)):
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
    return root / "b", root / "t"


def test_a_scalar_parameter_is_paired_as_a_vector(tmp_path):
    """A 0-d tensor (CLIP's logit_scale, a scalar nn.Parameter) was dropped by the pairing without a word, so a
    fine-tune that moved it was invisible (extract called such an adapter complete). It pairs as a vector record of
    shape (), its ΔW the float64 difference; vectors=False leaves it out like any vector."""
    b, t = _scalar_pair(tmp_path, tuned_scale=3.1592)
    records = {d.name: d for d in Pairing(b, t, F64)}
    scale, gate = records["logit_scale"], records["blocks.0.gate.scale"]
    assert scale.kind == gate.kind == "vector" and scale.shape == gate.shape == () and scale.layer is None
    assert scale.delta.shape == () and scale.delta.dtype == torch.float64
    expected = torch.tensor(3.1592).double() - torch.tensor(2.6592).double()  # float64 of the stored float32s
    assert float(scale.delta) == float(expected) != 0.0
    assert float(gate.delta) == 0.0 and gate.base_dtype == "bfloat16" and gate.layer == 0  # the module's layer
    assert set(records) == {"logit_scale", "blocks.0.gate.scale", "blocks.0.proj"}
    assert {d.name for d in Pairing(b, t, PairingOptions(vectors=False))} == {"blocks.0.proj"}  # control


def test_a_scalar_against_a_one_element_vector_is_a_shape_mismatch(tmp_path):
    from spectra.errors import PairingError

    b, t = _scalar_pair(tmp_path, tuned_scale=3.0, tuned_shape=(1,))
    with pytest.raises(PairingError, match=r"tensor logit_scale has shape \(\) in .* but \(1,\)"):
        Pairing(b, t)


def test_a_nonfinite_scalar_is_named(tmp_path):
    from spectra.errors import NonFiniteWeightError

    b, t = _scalar_pair(tmp_path, tuned_scale=float("nan"))
    with pytest.raises(NonFiniteWeightError, match="tensor logit_scale in .* holds 1 NaN/Inf"):
        list(Pairing(b, t))
    pairing = Pairing(b, t, PairingOptions(on_nonfinite="skip"))
    assert "logit_scale" not in {d.name for d in pairing} and "logit_scale" in pairing.skipped_entries


def test_a_scalar_reaches_the_analysis_and_its_report(tmp_path):
    """The analysis gives a 0-d ΔW a vector's row (sizes, no spectrum) and the report lists it with the vectors."""
    from spectra.analysis import analyze

    b, t = _scalar_pair(tmp_path, tuned_scale=3.1592)
    analysis = analyze(b, t, progress=False)
    (row,) = [m for m in analysis.modules if m["name"] == "logit_scale"]
    expected = abs(3.1592 - float(torch.tensor(2.6592)))  # float32's 3.1592 − 2.6592, in float64
    assert row["kind"] == "vector" and row["shape"] == [] and "energy_rank" not in row
    assert row["fro_norm"] == pytest.approx(expected, rel=1e-6)
    assert row["relative_size"] == pytest.approx(expected / float(torch.tensor(2.6592)), rel=1e-6)
    out = analysis.write_report(tmp_path / "report")
    assert re.search(r"^\| logit_scale \|", (out / "report.md").read_text(), re.M)
