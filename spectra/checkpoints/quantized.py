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

import functools
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
    grid: str  # the storage format, as the noise floor names it: "mxfp4", "float8_e4m3fn"
    spacing: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # each element's grid spacing (its ulp), decoded
    block: tuple[int, int] | None = None  # FP8: the configured weight_block_size (rows, cols) of one scale

    def stored_rows(self, shapes: list[tuple[int, ...]], start: int,
                    stop: int) -> list[tuple[int, int] | None] | None:
        """The rows of each stored part (``shapes``: theirs, in ``parts`` order) that hold rows [start, stop) of the
        listed tensor's first dimension, None for a part read whole (it holds nothing per row: one scale for all);
        None in all where the rows cut through a scale's block, so that only the tensor decoded whole holds them.

        Experts (E, …) on the first dimension: a part with one slice per expert (MXFP4's blocks and scales, FP8's
        per-expert scale grids) has the same rows. A 2-D block-scaled FP8 weight (DBRX's experts stacked on its
        rows): its codes have the same rows, its scales the rows of the blocks those rows fall in, the rows
        starting and ending on a block's edge (or the weight's end: a partial edge block).
        """
        if len(self.shape) != 2:
            return [(start, stop) if len(s) >= len(self.shape) and s[0] == self.shape[0] else None for s in shapes]
        codes, scales = shapes
        if math.prod(scales) == 1:
            return [(start, stop), None]
        b = fp8_block(tuple(codes), tuple(scales), self.block)
        if len(scales) != 2 or b is None or start % b[0] or (stop % b[0] and stop != codes[0]):
            return None
        return [(start, stop), (start // b[0], math.ceil(stop / b[0]))]


def code_spacing(codes: torch.Tensor, significand_bits: int, min_exponent: int) -> torch.Tensor:
    """The spacing of a float format's grid at each (unscaled) code value: 2^(max(⌊log₂|c|⌋, e_min) − (p − 1)),
    float32. A zero code gets the subnormal spacing: a value rounded to zero is not exact, unlike a stored 0."""
    _, exponent = torch.frexp(codes.float().abs())  # |c| = m·2^e, m in [0.5, 1): ⌊log₂|c|⌋ = e − 1
    exponent = torch.where(codes == 0, min_exponent, torch.clamp(exponent - 1, min=min_exponent))
    return torch.exp2((exponent - (significand_bits - 1)).float())


# byte -> (its low nibble's FP4 value, its high nibble's)
_FP4_BYTE_PAIRS = torch.tensor(FP4_VALUES, dtype=torch.float32)[torch.arange(256).reshape(256, 1)
                                                                 >> torch.tensor([0, 4]) & 0x0F]


def mxfp4_codes(blocks: torch.Tensor) -> torch.Tensor:
    """The unscaled FP4 values of uint8 blocks (E, out, G, 16): (E, out, G, 32) float32, low nibble first."""
    experts, rows, groups, width = blocks.shape
    return _FP4_BYTE_PAIRS[blocks.int()].reshape(experts, rows, groups, 2 * width)


def _mxfp4_scaled(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(E, out, G, 32) values times their group's 2^(s − 127), as (E, in, out) bfloat16 (exact)."""
    experts, rows, groups, width = values.shape
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None].float())  # exact in float32
    return values.reshape(experts, rows, groups * width).to(torch.bfloat16).transpose(1, 2)


def mxfp4_spacing(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each MXFP4 element's grid spacing, (E, in, out): E2M1's (p = 2, e_min = 0: 0.5 below 2, 1 to 4, 2 above)
    times its group's scale."""
    return _mxfp4_scaled(code_spacing(mxfp4_codes(blocks), 2, 0), scales)


def fp8_spacing(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Each FP8 element's grid spacing (its code's ulp: e4m3 p = 4, e_min = −6; e5m2 p = 3, e_min = −14) times its
    block's scale, float32."""
    bits = {"torch.float8_e5m2": (3, -14)}.get(str(weight.dtype), (4, -6))
    return dequantize_fp8(code_spacing(weight, *bits), scale_inv, block)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 experts as the model holds them: (E, in, out) bfloat16 from uint8 blocks (E, out, G, 16) and scales
    (E, out, G).

    Every product is exact in bfloat16 down to its smallest subnormal, 2^-133 (gpt-oss's scales
    sit far above that).
    """
    return _mxfp4_scaled(mxfp4_codes(blocks), scales)


def fp8_scales(scale_inv: torch.Tensor) -> torch.Tensor:
    """FP8 scales as float32 values: uint8 bytes are E8M0 exponents, 2^(b − 127) (MXFP8, as transformers decodes
    them); float8_e8m0fnu and float scales are their values."""
    if scale_inv.dtype == torch.uint8:
        return (scale_inv.float() - 127.0).exp2()  # exact: integer powers of two, 2^-127 a float32 subnormal
    return scale_inv.float()


def fp8_block(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
              block: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (rows, cols) block each scale covers, or None where the scales do not tile the weight.

    The configured ``weight_block_size`` where the scales are its ⌈out/b₀⌉ × ⌈in/b₁⌉ grid (DeepSeek-V3's,
    whose edge blocks are partial); otherwise the grid read off the scales' last two dimensions where it
    divides the weight exactly (one scale per tensor, per half of a fused gate_up, per row), as transformers
    reads it. Leading dimensions must be the weight's (one scale grid per expert) or absent.
    """
    rows, cols = weight_shape[-2:]
    if len(scale_shape) < 2:
        return (rows, cols) if math.prod(scale_shape) == 1 else None
    lead = tuple(scale_shape[:-2])
    if lead and lead != tuple(weight_shape[:-2]) and math.prod(lead) != 1:
        return None
    grid = tuple(scale_shape[-2:])
    if block is not None and grid == (math.ceil(rows / block[0]), math.ceil(cols / block[1])):
        return int(block[0]), int(block[1])
    if rows % grid[0] == 0 and cols % grid[1] == 0:
        return rows // grid[0], cols // grid[1]
    return None


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Block-scaled FP8 as float32: ``weight`` (…, out, in) float8 times its block's scale (:func:`fp8_block`
    says which; ``block`` is the configured ``weight_block_size``)."""
    values = weight.float()
    scale = fp8_scales(scale_inv)
    b = fp8_block(tuple(weight.shape), tuple(scale.shape), block)
    if b is None:
        raise ValueError(f"FP8 scales {tuple(scale.shape)} do not tile a weight {tuple(weight.shape)} "
                         f"(weight_block_size {block})")
    rows, cols = values.shape[-2:]
    if scale.dim() < 2:
        return values.mul_(scale.reshape(()))
    if rows % b[0] == 0 and cols % b[1] == 0:  # in place, through a view: no weight-sized copy of the scales
        grid = values.unflatten(-1, (cols // b[1], b[1])).unflatten(-3, (rows // b[0], b[0]))  # (…, R, b₀, C, b₁)
        grid.mul_(scale[..., :, None, :, None])
        return values
    expanded = scale.repeat_interleave(b[0], dim=-2)[..., :rows, :]  # partial edge blocks (DeepSeek-V3's 576 rows)
    return values.mul_(expanded.repeat_interleave(b[1], dim=-1)[..., :cols])


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
                                      f"{b.shape} and {'nothing' if s is None else f'{s.dtype} {s.shape}'}. The "
                                      "checkpoint is incomplete or in another layout: download it again, or give a "
                                      "dequantised one (load it with Mxfp4Config(dequantize=True) and save_pretrained "
                                      "it).")
            continue
        experts, rows, groups, width = b.shape
        found[name] = QuantizedTensor((experts, groups * 2 * width, rows), torch.bfloat16, (blocks, scales),
                                      dequantize_mxfp4, "mxfp4", mxfp4_spacing)
    block = quantization.get("weight_block_size") if method == "fp8" else None
    for scales in [n for n in infos if n.endswith(FP8_SCALE)] if method == "fp8" else []:
        name = scales.removesuffix(FP8_SCALE)
        w, s = infos.get(name), infos[scales]
        fp8 = w is not None and str(w.dtype).startswith("torch.float8") and len(w.shape) >= 2
        if not fp8 or fp8_block(tuple(w.shape), tuple(s.shape), block) is None:
            raise CheckpointError(f"{spec}: {scales} does not scale an FP8 weight as quant_method fp8 stores it "
                                  f"(float8 {name} with one scale per {block or 'tensor'} block, or a grid of scales "
                                  f"that tiles it); found {'no weight' if w is None else f'{w.dtype} {w.shape}'} and "
                                  f"scales {tuple(s.shape)}. The checkpoint is incomplete or in another layout "
                                  "(check weight_block_size in its config.json): download it again, or give a "
                                  "dequantised one (load it with its quantisation's dequantize option and "
                                  "save_pretrained it).")
        configured = None if block is None else (int(block[0]), int(block[1]))
        found[name] = QuantizedTensor(tuple(w.shape), torch.float32, (name, scales),
                                      functools.partial(dequantize_fp8, block=configured),
                                      str(w.dtype).removeprefix("torch."), functools.partial(fp8_spacing, block=configured),
                                      configured)
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
