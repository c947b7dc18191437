"""A realistic base × tuned checkpoint pair of a real architecture's shapes, for benchmarks.

``make_pair`` writes two Hugging Face model directories (``base/`` and ``tuned/``) with
the exact tensor names, shapes, bf16 dtype, sharding (``model-0000k-of-0000n.safetensors``
plus ``model.safetensors.index.json``) and ``config.json`` of a Llama-family config,
tensor by tensor: the safetensors header is planned from the shapes first, then each
tensor's bytes are appended, so memory holds a few tensors whatever the model's size.

Every weight matrix W (out, in) is Gaussian at the model's initializer scale plus a few
outlying directions (trained weights have a handful of large singular values). Its
update is

    ΔW = U diag(s) Vᵀ + T,    sᵢ ∝ exp(−i / r),  i = 1..6r,   ‖T‖²_F = tail·‖ΔW‖²_F

a decaying signal of effective rank r (per role, varied per layer) plus a broad
Gaussian tail, scaled to ‖ΔW‖_F = relative_size·‖W‖_F. With relative sizes near 1e-2
the update is a few bf16 ulps per element, so storing the pair in bf16 puts a visible
noise floor under ΔW and makes about a fifth of its elements exact zeros, as in real
bf16 fine-tunes. The tuned checkpoint is round(W_base + ΔW) with W_base the stored
base, as a fine-tune of a bf16 release saved in bf16 is: ΔW holds the fine-tune's
rounding alone (≈2.7 % of ‖ΔW‖², ``rounding_fro``), none of the base's, which is what
``spectra analyze --base-rounding exact`` takes (its ``noise.fro`` is then
``rounding_fro`` to ~2 %). The white tail (3 % of ‖ΔW‖² by default, ``tail_fro``) sits at
the rounding's own level per element, and no spectrum tells white noise from rounding:
the default ``auto`` sees rounding + tail (≈5.7 %), more than the fine-tune's rounding
can explain, and counts the base's too (a floor of ≈5.4 %, standing for both); with
``tail=0`` it finds the low-rank modules' floor is the fine-tune's alone.
``ground_truth.json`` lists, per module, the planted signal, the tail share and norm,
what bf16 rounding added, and the energy-90% rank of the float32 update computed from its
planted parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from spectra.errors import ConfigError
from spectra.files import refuse_replacing_others, staged_directory

__all__ = ["PairConfig", "SHAPES", "make_pair", "tensor_plan"]

# Llama-family shapes (transformers' LlamaConfig fields).
SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False),
    "llama-tiny": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}

# Effective rank of the planted signal per role (attention queries/keys move least, MLPs most,
# as measured on real full fine-tunes; cf. LoRA, arXiv:2106.09685, §7).
_ROLE_RANK = {"q": 8, "k": 4, "v": 16, "o": 16, "gate": 24, "up": 24, "down": 32, "embed": 8, "head": 16}
_ROLE_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down", "embed_tokens": "embed", "lm_head": "head"}


@dataclass(frozen=True)
class PairConfig:
    """How the pair is drawn. Written into ``ground_truth.json`` so a pair can be re-made."""

    shape: str = "tinyllama-1.1b"  # the benchmark model of issue 8 (4.4 GB as a bf16 pair)
    seed: int = 0  # every tensor draws from its own generator seeded by (seed, name): reproducible per tensor
    relative_size: float = 1e-2  # ‖ΔW‖/‖W‖ of a typical full fine-tune: a few bf16 ulps, so rounding holds ~2.7 % of ‖ΔW‖²
    tail: float = 0.03  # share of ‖ΔW‖² in the broad Gaussian tail; the rest is the decaying signal
    rank_scale: float = 1.0  # multiplies every role's effective rank (larger = higher-rank updates)
    shard_bytes: int = 2 << 30  # largest shard file, as transformers' max_shard_size
    init_std: float = 0.02  # LlamaConfig.initializer_range

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"shape: {self.shape!r} is not one of {', '.join(SHAPES)}.")
        if not 0 < self.relative_size < 1:
            raise ConfigError(f"relative_size: {self.relative_size} must be in (0, 1).")
        if not 0 <= self.tail < 1:
            raise ConfigError(f"tail: {self.tail} must be in [0, 1).")
        for name in ("rank_scale", "init_std"):  # each named with its value (the CLI's --rank-scale)
            if not 0 < getattr(self, name) < math.inf:  # inf: no planted rank to round (a traceback)
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)}.")
        if self.shard_bytes < 1 << 16:
            raise ConfigError(f"shard_bytes must be ≥ 64 KiB (65536), got {self.shard_bytes}.")


def tensor_plan(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in transformers' save order."""
    c = SHAPES[shape]
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = h // heads
    plan = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (h,)),
                 (p + "mlp.down_proj.weight", (h, inter)), (p + "mlp.gate_proj.weight", (inter, h)),
                 (p + "mlp.up_proj.weight", (inter, h)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "self_attn.k_proj.weight", (kv * head_dim, h)), (p + "self_attn.o_proj.weight", (h, h)),
                 (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.v_proj.weight", (kv * head_dim, h))]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    return plan


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    # the seed's number, not its text: the CLI's --seed 007 is 7 (its value prints as typed, cli.options.TypedInt)
    digest = hashlib.sha256(f"{int(seed)}:{name}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))  # (n, k), orthonormal columns
    return q


def _base_matrix(name: str, shape: tuple[int, int], config: PairConfig) -> torch.Tensor:
    """Gaussian at the init scale plus 8 outlying directions at 2–4× the bulk edge."""
    gen = _generator(config.seed, name, "base")
    m, n = shape
    w = torch.randn(m, n, generator=gen) * config.init_std  # (out, in)
    edge = config.init_std * (math.sqrt(m) + math.sqrt(n))  # Marchenko–Pastur edge of the bulk
    k = 8
    u, v = _orthonormal(m, k, gen), _orthonormal(n, k, gen)
    s = edge * torch.linspace(4.0, 2.0, k)
    w.addmm_(u * s, v.T)  # (m, k) @ (k, n)
    return w


def _update(name: str, role: str, layer: int, shape: tuple[int, int], w_fro: float,
            config: PairConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """ΔW (out, in) in float32 and its planted description."""
    gen = _generator(config.seed, name, "delta")
    m, n = shape
    jitter = 0.75 + 0.5 * float(torch.rand(1, generator=gen))  # per-layer variation of the rank, ±25 %
    r = max(1.0, _ROLE_RANK[role] * config.rank_scale * jitter)
    k = min(int(math.ceil(6 * r)), min(m, n))
    s = torch.exp(-torch.arange(k, dtype=torch.float64) / r)  # (k,) decaying signal
    target = config.relative_size * w_fro  # ‖ΔW‖_F
    signal_fro = target * math.sqrt(1 - config.tail)
    s = s * (signal_fro / float(s.norm()))
    u, v = _orthonormal(m, k, gen), _orthonormal(n, k, gen)
    tail_sigma = target * math.sqrt(config.tail / (m * n))  # per element std of the tail
    delta = torch.randn(m, n, generator=gen) * tail_sigma
    tail_fro = float(delta.norm())  # the tail as drawn (ground truth only: nothing else reads it)
    delta.addmm_(u * s.float(), v.T)  # (m, k) @ (k, n)
    # energy rank of the float32 update from its planted parts: the tail adds ~tail·‖ΔW‖² spread
    # evenly over min(m, n) directions (each far below the signal's top values)
    tail_energy = config.tail * target**2
    total = signal_fro**2 + tail_energy
    cum = torch.cumsum(s**2, 0) + tail_energy * torch.arange(1, k + 1) / min(m, n)
    hit = torch.nonzero(cum >= 0.9 * total)
    truth = {"role": role, "layer": layer, "shape": [m, n], "effective_rank": r, "signal_values": s.tolist(),
             "tail_share": config.tail, "tail_sigma": tail_sigma, "tail_fro": tail_fro, "delta_fro": math.sqrt(total),
             "relative_size": config.relative_size,
             "planted_energy_rank_0.9": int(hit[0]) + 1 if hit.numel() else None}
    return delta, truth


def _vector(name: str, shape: tuple[int], config: PairConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm gains: ≈1 with a spread; the update is a small relative drift."""
    gen = _generator(config.seed, name, "vector")
    base = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return base, base + config.relative_size * torch.randn(shape, generator=gen)


def _tensors(config: PairConfig, truth: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base bf16, tuned bf16) in save order, one at a time."""
    for name, shape in tensor_plan(config.shape):
        if len(shape) == 1:
            b, t = _vector(name, shape, config)
            yield name, b.to(torch.bfloat16), t.to(torch.bfloat16)
            continue
        module = name.removesuffix(".weight")
        role = _ROLE_OF[module.rpartition(".")[2]]
        layer = int(module.split(".")[2]) if ".layers." in module else None
        w = _base_matrix(name, shape, config)
        delta, info = _update(name, role, layer, shape, float(w.norm()), config)
        b = w.to(torch.bfloat16)
        t = (b.float() + delta).to(torch.bfloat16)  # the tuned checkpoint is rounded to bf16 too
        stored = t.float() - b.float()
        info["stored_delta_fro"] = float(stored.norm())
        info["rounding_fro"] = float((stored - delta).norm())  # what bf16 rounding added to ΔW: the tuned side's alone
        info["zero_fraction"] = float((stored == 0).float().mean())
        truth[module] = info
        del w, delta, stored
        yield name, b, t


# ---------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes safetensors files whose headers are planned from shapes, then tensor bytes in order."""

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...]]], shard_bytes: int):
        self.out = out
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in plan:
            nbytes = 2 * math.prod(shape)
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.file_of = {name: self.files[i] for i, shard in enumerate(shards) for name, _ in shard}
        self.shards = dict(zip(self.files, shards))
        self.handle = None
        self.current: str | None = None
        self.total = sum(2 * math.prod(s) for _, s in plan)

    def _open(self, file: str) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in self.shards[file]:
            nbytes = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.handle = open(self.out / file, "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.current = file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file = self.file_of[name]
        if file != self.current:
            self._open(file)
        self.handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.file_of.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _config_json(shape: str) -> dict[str, Any]:
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]  # as every saved checkpoint's config says (tools key on it)
    return config.to_dict()


def make_pair(out: str | os.PathLike, config: PairConfig | None = None, *, overwrite: bool = False,
              progress: bool = False) -> Path:
    """Write ``out/base``, ``out/tuned`` and ``out/ground_truth.json``.

    Parameters
    ----------
    out : path
        Directory to create.
    config : PairConfig, optional
    overwrite : bool, default False
        Replace an existing non-empty ``out`` (the new pair is written beside it and swapped in at the end).
    progress : bool, default False
        Show a tqdm bar over tensors.

    Returns
    -------
    Path
        ``out``.
    """
    import tqdm

    config = config or PairConfig()
    out = Path(out)
    # an empty folder is taken without overwrite, as before; otherwise only one that make-pair wrote is replaced
    overwrite = overwrite or (out.is_dir() and not any(out.iterdir()))
    refuse_replacing_others(out, command="bench make-pair", overwrite=overwrite, option="out")
    plan = tensor_plan(config.shape)
    truth: dict[str, Any] = {}
    # an interrupted run leaves no half-written pair behind
    with staged_directory(out, command="bench make-pair", overwrite=overwrite, option="out") as staging:
        writers = {}
        for side in ("base", "tuned"):
            (staging / side).mkdir()
            (staging / side / "config.json").write_text(json.dumps(_config_json(config.shape), indent=2))
            writers[side] = _ShardWriter(staging / side, plan, config.shard_bytes)
        try:
            for name, b, t in tqdm.tqdm(_tensors(config, truth), total=len(plan), disable=not progress, unit="tensor"):
                writers["base"].write(name, b)
                writers["tuned"].write(name, t)
        finally:
            for w in writers.values():
                w.close()
        (staging / "ground_truth.json").write_text(json.dumps({"config": asdict(config), "modules": truth}, indent=1))
    return out
