"""Quantised checkpoints read as the weights they encode.

MXFP4 (gpt-oss as released: experts as uint8 ``_blocks`` + ``_scales``) as the bfloat16 experts transformers
dequantises them to; block-scaled FP8 (``weight_scale_inv``) in float32; other quantisations refused. References:
encoders written here from the formats' specs, transformers' own dequantisers, a float64 numpy block loop, and
PEFT's merge for an adapter extracted against an MXFP4 base."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra.checkpoints.pairing import iter_deltas
from spectra.checkpoints.source import open_checkpoint
from spectra.checkpoints.quantized import dequantize_fp8, dequantize_mxfp4
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
    return model, _save_mxfp4(model, root)


def _rank2_expert_update(model, generator=None):
    """A copy of `model` whose every stored-as-3-D expert moved by a rank-2 update (in its (E, in, out) layout)."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name and p.dim() == 3:
                p += 0.05 * torch.randn(p.shape[0], p.shape[1], 2, generator=generator) @ torch.randn(
                    p.shape[0], 2, p.shape[2], generator=generator)
    return tuned


def _save_mxfp4(model, root):
    """`model` saved with its experts in MXFP4 and the rest in bf16, as gpt-oss is released; its parameters are
    set to the values saved (dequantised). Returns the folder."""
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
    return root / "base"


def test_an_mxfp4_base_pairs_with_its_bf16_fine_tune(tmp_path):
    base_model, base = _mxfp4_gpt_oss(tmp_path)
    source = open_checkpoint(base)
    assert not any(n.endswith(("_blocks", "_scales")) for n in source.names())
    info = source.info("model.layers.0.mlp.experts.gate_up_proj")
    assert info.shape == (3, 64, 64) and info.dtype == torch.bfloat16  # (E, in = hidden, out = 2·intermediate)
    tuned = _rank2_expert_update(base_model, torch.Generator().manual_seed(1))
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
    tuned = _rank2_expert_update(base_model)
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


def _blockwise_reference(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    out = codes.astype(np.float64).copy()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scales[i, j]
    return out


def test_block_scaled_fp8_equals_a_float64_block_loop_and_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(0)
    codes = (torch.randn(200, 300, generator=g) * 100).to(torch.float8_e4m3fn)  # blocks do not divide the shape
    scales = torch.rand(2, 3, generator=g) * 1e-3
    got = dequantize_fp8(codes, scales, (128, 128))
    assert got.dtype == torch.float32 and got.shape == (200, 300)
    want = _blockwise_reference(codes.double().numpy(), scales.double().numpy(), (128, 128))
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2 ** -23, atol=0)  # one float32 rounding
    torch.testing.assert_close(got, _dequantize_fp8_weight(codes, scales, [128, 128], torch.float32), rtol=0, atol=0)
    assert not np.allclose(got.double().numpy(), codes.double().numpy() * float(scales[0, 0]))  # blocks differ
    one = torch.tensor(0.25)
    torch.testing.assert_close(dequantize_fp8(codes, one, None), codes.float() * 0.25, rtol=0, atol=0)


def _fp8_llama(root, block=(16, 16)):
    """A tiny Llama whose decoder linears are saved as block-scaled FP8 (``quant_method: fp8``), and its model
    holding the dequantised weights."""
    from tests.models import build_model

    model = build_model("llama")
    return model, _save_fp8(model, root, block)


def _save_fp8(model, root, block=(16, 16)):
    """`model` saved with its decoder linears in block-scaled FP8 (one float32 scale per block, e4m3's largest value
    448 at the block's largest magnitude); its parameters are set to the values saved. Returns the folder."""
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                rows, cols = p.shape
                blocks = p.reshape(rows // block[0], block[0], cols // block[1], block[1])
                scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # (rows/b0, cols/b1)
                codes = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
                state[name], state[f"{name}_scale_inv"] = codes, scale.float().contiguous()
                p.copy_(dequantize_fp8(codes, scale, block))
            else:
                state[name] = p.detach().clone().contiguous()
    (root / "base").mkdir(parents=True)
    save_file(state, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                               "weight_block_size": list(block)}}
    (root / "base" / "config.json").write_text(json.dumps(config))
    return root / "base"


def test_an_fp8_base_pairs_with_its_fine_tune_in_float32(tmp_path):
    base_model, base = _fp8_llama(tmp_path)
    source = open_checkpoint(base)
    assert not any(n.endswith("_scale_inv") for n in source.names())
    assert source.info("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    tuned = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight += 0.01 * torch.randn(32, 2) @ torch.randn(2, 32)
    tuned.save_pretrained(tmp_path / "tuned")
    deltas = {d.name: d for d in iter_deltas(base, tmp_path / "tuned")}
    want = (tuned.model.layers[0].self_attn.q_proj.weight - base_model.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(deltas["model.layers.0.self_attn.q_proj"].delta, want.detach(), rtol=0, atol=0)
    assert torch.count_nonzero(deltas["model.layers.0.self_attn.k_proj"].delta) == 0  # dequantised exactly alike
    assert torch.linalg.matrix_rank(deltas["model.layers.0.self_attn.q_proj"].delta.double(), rtol=1e-5) == 2


def test_malformed_fp8_scales_are_named(tmp_path):
    _, base = _fp8_llama(tmp_path)
    state = load_file(str(base / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)  # tiles neither 16 × 16 nor exactly
    save_file(state, str(base / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj.weight_scale_inv does not scale an FP8 weight.*one scale per "
                                              r"\[16, 16\] block.*\(32, 48\) and scales \(3, 3\)"):
        open_checkpoint(base)


@pytest.mark.parametrize("case", ["bitsandbytes", "compressed-tensors", "undeclared fp8"])
def test_other_quantisations_are_refused_not_read_as_weights(case, tmp_path):
    (tmp_path / "m").mkdir()
    config = {"model_type": "llama"}
    if case == "bitsandbytes":
        state = {"model.layers.0.mlp.down_proj.weight": torch.zeros(512, 1, dtype=torch.uint8),
                 "model.layers.0.mlp.down_proj.weight.absmax": torch.ones(16)}
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    else:
        state = {"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 64).to(torch.float8_e4m3fn),
                 "model.layers.0.mlp.down_proj.weight_scale": torch.ones(32, 1)}
        if case == "compressed-tensors":
            config["quantization_config"] = {"quant_method": "compressed-tensors"}
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    method = {"undeclared fp8": "scaled float8"}.get(case, case)
    with pytest.raises(CheckpointError, match=rf"is quantised \({method}: model.layers.0.mlp.down_proj.weight is "
                                              r"stored as torch.(uint8|float8_e4m3fn) codes.*give a dequantised"):
        open_checkpoint(tmp_path / "m")


def test_integer_buffers_of_an_unquantised_checkpoint_are_kept(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"embeddings.position_ids": torch.arange(8)[None], "encoder.layer.0.dense.weight": torch.ones(4, 4)},
              str(tmp_path / "m" / "model.safetensors"))
    assert sorted(open_checkpoint(tmp_path / "m").names()) == ["embeddings.position_ids", "encoder.layer.0.dense.weight"]


def test_the_sweep_truncates_experts_against_the_dequantised_mxfp4_base(tmp_path):
    """The sweep loads the (bf16) fine-tune and reads the base through the checkpoint: rank 0 with the base's
    non-targets is the dequantised base, every tensor; rank 1 each expert's float64 rank-1 truncation."""
    import transformers as tf

    from spectra.sweep_weights import ModelWeights

    base_model, base = _mxfp4_gpt_oss(tmp_path)
    tuned = _rank2_expert_update(base_model)
    tuned.save_pretrained(tmp_path / "tuned")
    weights = ModelWeights(tf.GptOssForCausalLM.from_pretrained(tmp_path / "tuned", dtype=torch.float32), base,
                           tmp_path / "tuned", roles=("gate_up", "down"))
    for target in weights.targets:
        target.factors = torch.linalg.svd(weights.delta(target).double(), full_matrices=False)
    weights.apply((0,) * len(weights.targets), non_target="base")
    expected = base_model.state_dict()
    for key, value in weights.state.items():
        assert torch.equal(value, expected[key]), key
    weights.apply((1,) * len(weights.targets), non_target="tuned")
    for name, p in _expert_parameters(base_model).items():
        delta = (_expert_parameters(tuned)[name] - p).detach().double().numpy()  # (E, in, out)
        for e in range(3):
            want = p[e].detach().double().numpy() + _best(delta[e], 1)
            np.testing.assert_allclose(weights.state[name][e].double().numpy(), want, rtol=0, atol=1e-6)
            assert not np.allclose(weights.state[name][e].double().numpy(), p[e].detach().double().numpy() +
                                   delta[e], atol=1e-4)  # not the fine-tune: truncated


def _expert_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in f".{n}" and p.dim() == 3}


def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("case", ["uint8 E8M0 bytes", "float8_e8m0fnu", "per tensor (1, 1)", "per expert (E, 1, 1)",
                                  "per half (E, 2, 1)"])
def test_fp8_scale_formats_decode_as_transformers_does(case, tmp_path):
    """Scales as E8M0 exponent bytes (2^(b − 127)), as float8_e8m0fnu, and grids that tile the weight exactly (one per
    tensor, per expert, per half of a fused gate_up) all equal transformers' Fp8Dequantize."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    block = [1, 32] if case.startswith(("uint8", "float8")) else None
    shape = (4, 64) if block else (3, 8, 64)
    weight = (torch.randn(shape, generator=g) * 4).to(torch.float8_e4m3fn)
    scales = {"uint8 E8M0 bytes": torch.randint(100, 130, (4, 2), generator=g).to(torch.uint8),
              "float8_e8m0fnu": torch.tensor([[0.25, 8.0]] * 4).to(torch.float8_e8m0fnu),
              "per tensor (1, 1)": torch.rand(1, 1, generator=g),
              "per expert (E, 1, 1)": torch.rand(3, 1, 1, generator=g),
              "per half (E, 2, 1)": torch.rand(3, 2, 1, generator=g)}[case]
    (tmp_path / "m").mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj": weight, "model.layers.0.mlp.experts.gate_up_proj_scale_inv":
               scales.contiguous()}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mixtral", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": block}}))
    source = open_checkpoint(tmp_path / "m")
    want = Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=torch.float32)
    got = source.read("model.layers.0.mlp.experts.gate_up_proj")
    assert torch.equal(got, want), case
    if len(shape) == 3:
        assert torch.equal(source.read_expert("model.layers.0.mlp.experts.gate_up_proj", 2), want[2])
    assert not torch.equal(got, weight.float())  # negative controls: the codes alone, or one raw scale for all
    assert scales.numel() == 1 or not torch.equal(got, weight.float() * scales.float().flatten()[0])


def test_partial_edge_blocks_and_a_grid_that_does_not_tile_are_told_apart(tmp_path):
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(200, 300, generator=g) * 4).to(torch.float8_e4m3fn)
    good, bad = torch.rand(2, 3, generator=g), torch.rand(3, 3, generator=g)
    np.testing.assert_allclose(dequantize_fp8(weight, good, (128, 128)).double().numpy(),
                               _blockwise_reference(weight.double().numpy(), good.double().numpy(), (128, 128)),
                               rtol=2 ** -23)
    with pytest.raises(ValueError, match=r"scales \(3, 3\) do not tile a weight \(200, 300\)"):
        dequantize_fp8(weight, bad, (128, 128))


def test_experts_transformers_holds_in_by_out_are_known_as_such():
    """Every model whose experts class transformers marks is_transposed (x @ W[e], (E, in, out)) is in
    IN_OUT_EXPERT_MODEL_TYPES, so its stored experts are transposed and split as the model reads them."""
    import pathlib
    import re

    import transformers

    from spectra.checkpoints.architectures import IN_OUT_EXPERT_MODEL_TYPES

    marked = {path.parent.name for path in pathlib.Path(transformers.__file__).parent.glob("models/*/modeling_*.py")
              if re.search(r"use_experts_implementation\([^)]*is_transposed=True", path.read_text())}
    assert {"gpt_oss", "openai_privacy_filter", "aria"} <= marked  # the scan sees them
    assert marked <= IN_OUT_EXPERT_MODEL_TYPES


def test_privacy_filter_experts_split_gate_and_up_along_the_outputs(tmp_path):
    """A rank-1 update planted in the gate half of one expert: [gate] holds it all, [up] nothing (read as (out, in)
    the halves had been split along the hidden axis, both ~1.5)."""
    import transformers as tf

    from spectra.analysis import AnalysisConfig, analyze
    from tests.models import save

    torch.manual_seed(0)
    base = tf.OpenAIPrivacyFilterForTokenClassification(tf.OpenAIPrivacyFilterConfig(
        hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=3, num_experts_per_tok=2, vocab_size=64, num_labels=3, pad_token_id=0)).eval()
    tuned = copy.deepcopy(base)
    name = next(n for n, _ in tuned.named_parameters() if n.endswith("experts.gate_up_proj"))
    update = 0.1 * torch.randn(32, 1) @ torch.randn(1, 24)  # (in = hidden, out = gate half)
    with torch.no_grad():
        tuned.get_parameter(name)[0, :, :24] += update
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    rows = {r["name"]: r for r in analyze(b, t, AnalysisConfig(dtype="float64"), cache_dir=False,
                                          progress=False).modules}
    head = name.removesuffix(".gate_up_proj")
    gate, up = rows[f"{head}.0.gate_up_proj[gate]"], rows[f"{head}.0.gate_up_proj[up]"]
    assert gate["shape"] == [24, 32] and up["fro_norm"] == 0.0
    assert gate["fro_norm"] == pytest.approx(float(update.double().norm()), rel=1e-6)


def _requantised_pair(root, fmt: str):
    """A base and a fine-tune (a rank-2 update of q_proj) both stored quantised: two FP8 releases (16 × 16 blocks,
    as DeepSeek-V3 and R1) or two MXFP4 gpt-oss checkpoints, each rounded anew."""
    if fmt == "fp8":
        base, b = _fp8_llama(root / "b")
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            tuned.model.layers[0].self_attn.q_proj.weight += 0.05 * torch.randn(32, 2) @ torch.randn(2, 32)
        return b, _save_fp8(tuned, root / "t"), "model.layers.0.self_attn.q_proj"
    base, b = _mxfp4_gpt_oss(root / "b")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        p = tuned.model.layers[0].mlp.experts.down_proj  # (E, in = intermediate, out = hidden)
        p[0] += 0.05 * torch.randn(32, 2) @ torch.randn(2, 64)
    return b, _save_mxfp4(tuned, root / "t"), "model.layers.0.mlp.experts.0.down_proj"


def _spacing_fp8(codes: np.ndarray) -> np.ndarray:
    """e4m3's grid spacing at each code, by enumeration: the gap to the next representable magnitude."""
    grid = np.unique(np.abs(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()))
    grid = grid[np.isfinite(grid)]
    gaps = np.diff(grid)
    index = np.searchsorted(grid, np.abs(codes), side="right") - 1
    return gaps[np.minimum(index, len(gaps) - 1)]


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_two_quantised_checkpoints_have_their_grids_rounding_as_noise_floor(fmt, tmp_path):
    """Both sides re-quantised: ΔW carries their rounding, full rank and far from white (each block's scale sets its
    spacing). The floor's variance is each side's (spacing × scale)² / 12 per element (a numpy reference enumerating
    the code grid), its edge max_i √Σ_j v_ij + max_j √Σ_i v_ij (Bandeira–van Handel), and for FP8 the planted rank 2
    is what stands above it. Read with the dequantised dtype's ulp (float32, bfloat16), the floor sat far below and
    the rounding counted as signal; with the mean variance's Marchenko–Pastur edge, FP8's noise still rose above it.
    MXFP4 re-quantised by the spec's shared exponent also clips (values up to 8 against FP4's 6): that error is not
    rounding, and no floor covers it, so only its floor's numbers are checked."""
    from spectra.analysis import AnalysisConfig, analyze
    from spectra.linalg.sketch import sampled_noise_floor

    b, t, name = _requantised_pair(tmp_path, fmt)
    result = analyze(b, t, AnalysisConfig(dtype="float64"), cache_dir=False, progress=False)
    row = next(r for r in result.modules if r["name"] == name)
    assert row["base_dtype"] == row["tuned_dtype"] == ("float8_e4m3fn" if fmt == "fp8" else "mxfp4")
    variance = 0.0
    for side in (b, t):
        stored = load_file(str(side / "model.safetensors"))  # the codes and scales as written, not through spectra
        if fmt == "fp8":
            codes = stored[f"{name}.weight"].float().numpy()
            scales = stored[f"{name}.weight_scale_inv"].double().numpy()
            spacing = _spacing_fp8(codes) * np.kron(scales, np.ones((16, 16)))
        else:  # expert 0 of down_proj, (out, G, 32) as stored: the module's (out, in)
            blocks = stored["model.layers.0.mlp.experts.down_proj_blocks"][0].numpy()
            scales = stored["model.layers.0.mlp.experts.down_proj_scales"][0].numpy().astype(np.int64)
            values = np.abs(FP4[np.stack((blocks & 15, blocks >> 4), -1).reshape(blocks.shape[0], -1)])  # (out, in)
            spacing = np.where(values < 2, 0.5, np.where(values < 4, 1.0, 2.0)) * 2.0 ** (np.repeat(scales, 32, -1) - 127)
        variance = variance + spacing ** 2 / 12
    edge = np.sqrt(variance.sum(1)).max() + np.sqrt(variance.sum(0)).max()
    assert row["noise"]["sigma"] == pytest.approx(float(np.sqrt(variance.mean())), rel=1e-9)
    assert row["noise"]["mp_edge"] == pytest.approx(float(edge), rel=1e-9)
    pair = next(d for d in iter_deltas(b, t, with_weights=True) if d.name == name)
    values = torch.linalg.svdvals(pair.delta.double())
    listed = torch.bfloat16 if fmt == "mxfp4" else torch.float32
    as_listed = sampled_noise_floor(pair.base, pair.tuned, base_dtype=listed, tuned_dtype=listed, s=values)
    assert as_listed.rank > 10  # negative control: the dequantised dtype's floor takes the rounding for signal
    if fmt == "fp8":
        assert row["noise"]["rank_above"] == 2
        white = float(np.sqrt(variance.mean())) * (32 ** 0.5 + 32 ** 0.5)  # the mean variance's MP edge
        assert int((values > white).sum()) > 2  # negative control: heteroscedastic noise rises above it


def test_a_fine_tune_stored_finer_than_its_quantised_base_has_the_dtype_floor(tmp_path):
    """gpt-oss as released (MXFP4) fine-tuned and saved in bf16: the fine-tune started from the dequantised experts,
    which bf16 holds exactly, so neither the base's FP4 grid nor its bf16 rounding put noise in ΔW. The floor is the
    fine-tune's bf16 rounding alone (base_rounding "exact", which ΔW's residual gives), not FP4's, which would sit
    ~100× higher and bury the update."""
    from spectra.analysis import AnalysisConfig, analyze
    from spectra.linalg.metrics import rounding_noise_floor
    from spectra.linalg.sketch import sampled_noise_floor

    base_model, base = _mxfp4_gpt_oss(tmp_path)
    tuned = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned.model.layers[0].mlp.experts.down_proj[0] += 0.05 * torch.randn(32, 2) @ torch.randn(2, 64)
    tuned.to(torch.bfloat16).save_pretrained(tmp_path / "tuned")
    name = "model.layers.0.mlp.experts.0.down_proj"
    row = next(r for r in analyze(base, tmp_path / "tuned", AnalysisConfig(dtype="float64"), cache_dir=False,
                                  progress=False).modules if r["name"] == name)
    assert (row["base_dtype"], row["tuned_dtype"]) == ("mxfp4", "bfloat16")
    pair = next(d for d in iter_deltas(base, tmp_path / "tuned", with_weights=True) if d.name == name)
    as_bf16 = sampled_noise_floor(pair.base, pair.tuned, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16)
    tuned_only = rounding_noise_floor(pair.base, pair.tuned, base_dtype=torch.bfloat16, tuned_dtype=torch.bfloat16,
                                      base_rounding="exact")  # the float64 per-element reference
    assert row["noise"]["base_rounding"] == "exact"
    assert row["noise"]["sigma"] == pytest.approx(tuned_only.sigma, rel=1e-9)
    assert row["noise"]["sigma"] < as_bf16.sigma
    assert row["noise"]["rank_above"] >= 2
    spacing = open_checkpoint(base).quantized_spacing("model.layers.0.mlp.experts.down_proj", 0)
    assert float(spacing.double().square().mean().sqrt()) > 30 * as_bf16.sigma  # what counting FP4 would have added
