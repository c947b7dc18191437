"""MXFP4 checkpoints (gpt-oss as released: experts as uint8 ``_blocks`` + ``_scales``) read as the bfloat16
experts transformers dequantises them to. References: an encoder written here from the OCP Microscaling spec,
transformers' own ``convert_moe_packed_tensors``, and PEFT's merge for an adapter extracted against such a base."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra.checkpoints.pairing import iter_deltas
from spectra.checkpoints.source import open_checkpoint
from spectra.checkpoints.source import dequantize_mxfp4
from spectra.errors import CheckpointError

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(E, in, out) → uint8 blocks (E, out, in/32, 16), scales (E, out, in/32), and the float64 values they encode
    (E, in, out): per 32 inputs one scale 2^(⌊log2 max|x|⌋ − 2), each value the nearest FP4 code, low nibble first."""
    x = weight.double().transpose(1, 2).numpy()  # (E, out, in)
    E, rows, d_in = x.shape
    groups = x.reshape(E, rows, d_in // 32, 32)
    amax = np.abs(groups).max(-1, keepdims=True)
    exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127).astype(np.int64)
    scaled = groups / 2.0 ** exponent
    codes = np.abs(scaled[..., None] - FP4[:8]).argmin(-1) + 8 * (scaled < 0)  # nearest magnitude, sign bit
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # (E, out, G, 16)
    decoded = (FP4[codes] * 2.0 ** exponent).reshape(E, rows, d_in).transpose(0, 2, 1)
    return (torch.from_numpy(np.ascontiguousarray(packed)),
            torch.from_numpy(np.ascontiguousarray(exponent[..., 0] + 127).astype(np.uint8)), decoded)


def test_dequantised_experts_equal_the_spec_and_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 64, 40, generator=g) * torch.logspace(-3, 0, 40)  # (E, in, out), groups of varied size
    blocks, scales, decoded = quantize_mxfp4(weight)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 64, 40) and got.dtype == torch.bfloat16
    np.testing.assert_array_equal(got.double().numpy(), decoded)  # exact: FP4 × 2^k fits bfloat16
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert np.abs(decoded - weight.double().numpy()).max() > 1e-3  # negative control: MXFP4 did round


def _mxfp4_gpt_oss(root):
    """A tiny gpt-oss saved as released (experts MXFP4, the rest bf16), and its model holding the dequantised
    experts: what a fine-tune starts from."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(tf.GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=3, num_experts_per_tok=2, vocab_size=64, layer_types=["full_attention"])).eval()
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales, decoded = quantize_mxfp4(p.detach())
                state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
                p.copy_(torch.from_numpy(decoded).float())
            else:
                state[name] = p.detach().to(torch.bfloat16).contiguous()
                p.copy_(state[name].float())
    (root / "base").mkdir(parents=True)
    save_file(state, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (root / "base" / "config.json").write_text(json.dumps(config))
    return model, root / "base"


def test_an_mxfp4_base_pairs_with_its_bf16_fine_tune(tmp_path):
    base_model, base = _mxfp4_gpt_oss(tmp_path)
    source = open_checkpoint(base)
    assert not any(n.endswith(("_blocks", "_scales")) for n in source.names())
    info = source.info("model.layers.0.mlp.experts.gate_up_proj")
    assert info.shape == (3, 64, 64) and info.dtype == torch.bfloat16  # (E, in = hidden, out = 2·intermediate)
    tuned = copy.deepcopy(base_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name and p.dim() == 3:
                p += 0.05 * torch.randn(p.shape[0], p.shape[1], 2, generator=g) @ torch.randn(p.shape[0], 2, p.shape[2],
                                                                                         generator=g)
    tuned.to(torch.bfloat16).save_pretrained(tmp_path / "tuned")
    deltas = {d.name: d for d in iter_deltas(base, tmp_path / "tuned")}
    for name, p in tuned.named_parameters():
        if ".experts." in name and p.dim() == 3:
            head, _, proj = name.rpartition(".")
            stored = p.detach().bfloat16().float() - base_model.get_parameter(name).detach()  # (E, in, out)
            for e in range(3):
                torch.testing.assert_close(deltas[f"{head}.{e}.{proj}"].delta, stored[e].T, rtol=0, atol=0)
    q = deltas["model.layers.0.self_attn.q_proj"].delta
    assert torch.count_nonzero(q) == 0  # untouched bf16 weights pair as equal


def test_an_adapter_extracted_against_an_mxfp4_base_merges_to_the_fine_tune(tmp_path):
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter

    base_model, base = _mxfp4_gpt_oss(tmp_path)
    tuned = copy.deepcopy(base_model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name and p.dim() == 3:
                p += 0.05 * torch.randn(p.shape[0], p.shape[1], 2) @ torch.randn(p.shape[0], 2, p.shape[2])
    tuned.save_pretrained(tmp_path / "tuned")  # float32: the update is exactly rank 2 per expert
    extract_adapter(base, tmp_path / "tuned", 2, tmp_path / "ad", roles=("gate_up", "down"), progress=False)
    merged = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "ad")).merge_and_unload()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
        assert float((tuned(ids).logits - base_model(ids).logits).abs().max()) > 1e-3


def test_mxfp4_blocks_without_their_scales_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"model.layers.0.mlp.experts.down_proj_blocks": torch.zeros(2, 8, 1, 16, dtype=torch.uint8)},
              str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                                            "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(CheckpointError, match=r"down_proj_blocks is not MXFP4.*found torch.uint8 \(2, 8, 1, 16\) and "
                                              "nothing"):
        open_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "other"}))  # not declared MXFP4: as stored
    assert open_checkpoint(tmp_path / "m").names() == ["model.layers.0.mlp.experts.down_proj_blocks"]
