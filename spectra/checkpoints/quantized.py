"""Quantised checkpoints read as the full-precision tensors they stand for.

Two formats are dequantised exactly, each stored tensor pair listed under the name of the
weight it encodes:

- **MXFP4** (gpt-oss as released, ``quant_method: mxfp4``): uint8 ``NAME_blocks`` (E, out,
  G, 16), two FP4 (E2M1) codes per byte, low nibble first, and uint8 ``NAME_scales`` (E,
  out, G), one E8M0 power of two 2^(s − 127) per 32 inputs (OCP Microscaling Formats v1.0).
  Read as ``NAME``, the (E, in, out) bfloat16 experts transformers dequantises them to,
  which holds every value exactly.
- **Block-scaled FP8** (DeepSeek-V3's and Qwen's ``-FP8`` releases, ``quant_method: fp8``):
  float8 ``NAME.weight`` and float32 ``NAME.weight_scale_inv``, one scale per
  ``weight_block_size`` block (or one for the tensor). Read as ``NAME.weight`` in float32,
  code × scale (exact to float32 rounding of the product).

Any other declared quantisation whose integer or float8 tensors are present (bitsandbytes,
GPTQ, AWQ, compressed-tensors, FBGEMM FP8, …) is refused by :func:`quantized_tensors`:
their raw codes would otherwise be read as weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from spectra.errors import CheckpointError

MXFP4_BLOCKS, MXFP4_SCALES, FP8_SCALE = "_blocks", "_scales", "_scale_inv"
# the 16 FP4 (E2M1) values of a 4-bit code, in code order (OCP Microscaling Formats v1.0, §5.3.3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_CODES = {torch.uint8, torch.int8, torch.int16, torch.int32} | {
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, n)}


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight stored as codes and scales: its listed shape and dtype, the stored tensors, and how to decode."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[str, str]  # (codes, scales) as stored
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 experts as the model holds them: (E, in, out) bfloat16 from uint8 blocks (E, out, G, 16) and scales
    (E, out, G).

    Every product is exact in bfloat16 down to its smallest subnormal, 2^-133 (gpt-oss's scales
    sit far above that).
    """
    experts, rows, groups, width = blocks.shape
    pairs = torch.tensor(FP4_VALUES, dtype=torch.float32)[torch.arange(256).reshape(256, 1) >> torch.tensor([0, 4])
                                                           & 0x0F]  # byte -> (its low nibble's, its high nibble's)
    values = pairs[blocks.int()].reshape(experts, rows, groups, 2 * width)  # (E, out, G, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())  # exact in float32
    return values.reshape(experts, rows, groups * 2 * width).to(torch.bfloat16).transpose(1, 2)  # (E, in, out)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """Block-scaled FP8 as float32: ``weight`` (…, out, in) float8 times its block's ``scale_inv``
    (…, ⌈out/b₀⌉, ⌈in/b₁⌉), or the one scale of the tensor where ``block`` is None."""
    values = weight.float()
    if block is None:
        return values * scale_inv.float()
    rows, cols = values.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return values * scale.repeat_interleave(block[1], dim=-1)[..., :cols]


def quantized_tensors(infos: Mapping[str, Any], config: Mapping | None, spec: str) -> dict[str, QuantizedTensor]:
    """The quantised weights among a checkpoint's tensors (``infos``: name → TensorInfo), keyed by the name each is
    listed under; their stored parts are to be unlisted.

    Raises
    ------
    CheckpointError
        A declared format's tensors are malformed, or the checkpoint is quantised in a format
        spectra does not dequantise.
    """
    quantization = (config or {}).get("quantization_config") or {}
    method = quantization.get("quant_method")
    found: dict[str, QuantizedTensor] = {}
    for blocks in [n for n in infos if n.endswith(MXFP4_BLOCKS)]:
        name = blocks.removesuffix(MXFP4_BLOCKS)
        scales = name + MXFP4_SCALES
        b, s = infos[blocks], infos.get(scales)
        if s is None or b.dtype != torch.uint8 or s.dtype != torch.uint8 or len(b.shape) != 4 \
                or b.shape[:-1] != s.shape or name in infos:
            if method == "mxfp4":
                raise CheckpointError(f"{spec}: {blocks} is not MXFP4 as gpt-oss stores it (uint8 blocks (E, out, "
                                      f"groups, 16) beside uint8 {scales} (E, out, groups)); found {b.dtype} "
                                      f"{b.shape} and {'nothing' if s is None else f'{s.dtype} {s.shape}'}.")
            continue
        experts, rows, groups, width = b.shape
        found[name] = QuantizedTensor((experts, groups * 2 * width, rows), torch.bfloat16, (blocks, scales),
                                      dequantize_mxfp4)
    block = quantization.get("weight_block_size") if method == "fp8" else None
    for scales in [n for n in infos if n.endswith(FP8_SCALE)] if method == "fp8" else []:
        name = scales.removesuffix(FP8_SCALE)
        w, s = infos.get(name), infos[scales]
        if w is None or not str(w.dtype).startswith("torch.float8") or len(w.shape) < 2:
            want = None
        elif block is None:
            want = {(), (1,)}
        else:
            want = {tuple(w.shape[:-2]) + tuple(math.ceil(d / b) for d, b in zip(w.shape[-2:], block))}
        if want is None or tuple(s.shape) not in want:
            raise CheckpointError(f"{spec}: {scales} does not scale an FP8 weight as quant_method fp8 stores it "
                                  f"(float8 {name} with {'one scale' if block is None else f'one scale per {block} block'}"
                                  f"); found {'no weight' if w is None else f'{w.dtype} {w.shape}'} and scales "
                                  f"{tuple(s.shape)}.")
        blocks_of = None if block is None else (int(block[0]), int(block[1]))
        found[name] = QuantizedTensor(tuple(w.shape), torch.float32, (name, scales),
                                      lambda weight, scale, b=blocks_of: dequantize_fp8(weight, scale, b))
    parts = {p for q in found.values() for p in q.parts}
    codes = [n for n, i in infos.items() if n not in parts and i.dtype in _CODES and len(i.shape) >= 2]
    scaled = [n for n in codes if str(infos[n].dtype).startswith("torch.float8")
              and any(f"{n}{suffix}" in infos for suffix in ("_scale", "_scale_inv"))]
    if (method not in (None, "mxfp4", "fp8") and codes) or scaled:
        example = (scaled or codes)[0]
        raise CheckpointError(f"{spec} is quantised ({method or 'scaled float8'}: {example} is stored as "
                              f"{infos[example].dtype} codes with scales beside it), and spectra dequantises only "
                              "MXFP4 and block-scaled FP8 (quant_method mxfp4, fp8). Its codes are not the weights: "
                              "give a dequantised checkpoint (load it with its quantisation's dequantize option, or "
                              "the bf16 release, and save_pretrained it).")
    return found
