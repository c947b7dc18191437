"""A PEFT LoRA/DoRA adapter as the tuned side: ΔW exactly as PEFT merges it.

For a Linear (or Conv1D) module with ``A = lora_A.weight`` (r, in) and
``B = lora_B.weight`` (out, r), in the ``(out, in)`` orientation:

- LoRA (Hu et al. 2021, arXiv:2106.09685): ``W' = W₀ + s·B@A``, ``s = α/r``;
- rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): ``s = α/√r``;
- DoRA (Liu et al. 2024, arXiv:2402.09353): ``W' = m ⊙ (W₀ + s·B@A) / ‖W₀ + s·B@A‖_row``
  with the norm per output row (PEFT's layout), ``m = lora_magnitude_vector`` (out,).

Embedding modules carry ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B``
(dim, r): ``ΔW = s·(B@A)ᵀ`` on the ``(vocab, dim)`` weight. Whole tensors saved for
``modules_to_save`` replace the base tensor. ``α`` comes from ``alpha_pattern`` when a
key matches the module name as a suffix (PEFT's rule), else ``lora_alpha``; ``r`` is
read from A's shape, which is what PEFT builds the layer with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from spectra.checkpoints.architectures import is_conv1d
from spectra.checkpoints.names import match_names
from spectra.errors import AdapterError

PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_layer",
}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Value for ``module`` from a PEFT ``rank_pattern``/``alpha_pattern``.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first key ``k`` such that
    ``re.match(rf"(.*\\.)?({k})$", module)`` matches: keys match whole dot-suffixes.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class AdapterDelta:
    """How to rebuild one module's tuned weight from an adapter (metadata only)."""

    module: str  # module name in the base checkpoint, without .weight
    base_tensor: str  # base checkpoint tensor name
    shape: tuple[int, int]  # (out, in) orientation
    dtype: torch.dtype  # storage dtype of the adapter tensors
    conv1d: bool
    keys: dict[str, str]  # part ("A", "B", "magnitude", "emb_A", "emb_B", "base_layer", "full") -> adapter key
    scaling: float
    embedding: bool

    def merged(self, base: torch.Tensor, weights, dtype: torch.dtype) -> torch.Tensor:
        """W_tuned in ``(out, in)`` orientation, given the upcast base weight ``base`` (out, in)."""

        def read(part: str) -> torch.Tensor:
            return weights.read(self.keys[part]).to(device=base.device, dtype=dtype)

        if "full" in self.keys:  # modules_to_save: the adapter stores the whole tuned tensor
            full = read("full")
            return full.T if self.conv1d else full
        w0 = base
        if "base_layer" in self.keys:
            stored = read("base_layer")
            w0 = stored.T if self.conv1d else stored
        if self.embedding:
            update = self.scaling * (read("emb_B") @ read("emb_A")).T  # (dim, r)@(r, vocab) -> ᵀ (vocab, dim)
        else:
            update = self.scaling * (read("B") @ read("A"))  # (out, r) @ (r, in) -> (out, in)
        if "magnitude" not in self.keys:
            return w0 + update
        magnitude = read("magnitude")
        if self.embedding:  # PEFT's DoRA embedding normalises the (dim, vocab) view per row
            combined = (w0 + update).T
            return (magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True)).T
        combined = w0 + update
        return magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True)


def plan_adapter(adapter, base, config: dict[str, Any] | None) -> tuple[list[AdapterDelta], list[str]]:
    """Group an adapter's tensors by module and check each against the base.

    Parameters
    ----------
    adapter : AdapterSource
    base : CheckpointSource
    config : dict or None
        The base model's ``config.json`` (for Conv1D detection).

    Returns
    -------
    deltas : list of AdapterDelta
    notes : list of str

    Raises
    ------
    AdapterError
        Unknown adapter keys, missing A/B halves, modules absent from the base, or shapes
        that do not fit the base (an adapter trained on another model).
    """
    cfg = adapter.config
    if cfg.get("target_parameters"):
        raise AdapterError(f"adapter {adapter.spec} adapts parameters through PEFT's target_parameters "
                           f"({', '.join(list(cfg['target_parameters'])[:2])}: fused MoE experts, as `spectra train "
                           "--plan` writes them for transformers-5 Mixtral), which spectra cannot read as TUNED yet. "
                           "Merge it (PeftModel.from_pretrained(...).merge_and_unload().save_pretrained(DIR)) and "
                           "pass DIR instead.")
    notes: list[str] = []
    modules: dict[str, dict[str, str]] = {}
    for key in adapter.weights.names():
        name = key.removeprefix(PEFT_PREFIX)
        if name == key:
            notes.append(f"adapter key {key} lacks the '{PEFT_PREFIX}' prefix PEFT writes; read it as is")
        for suffix, part in _LORA_SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = key
                break
        else:
            if not name.endswith(".weight"):
                if name.endswith(".bias"):
                    notes.append(f"adapter tensor {key}: trained bias, reported as not analysed")
                    continue
                raise AdapterError(f"adapter {adapter.spec}: tensor {key} is not a LoRA/DoRA tensor spectra "
                                   "understands (lora_A/lora_B/lora_embedding_A/B/lora_magnitude_vector or a "
                                   "modules_to_save weight).")
            modules.setdefault(name.removesuffix(".weight"), {})["full"] = key

    base_weights = [n for n in base.names() if n.endswith(".weight")]
    match = match_names([m + ".weight" for m in modules], base_weights)
    missing = [m.removesuffix(".weight") for m in match.only_in_base + list(match.ambiguous)]
    tied_to = _tied_heads(adapter, modules, missing, match, base_weights, config, notes)
    missing = [m for m in missing if m in modules and m not in tied_to]
    for module in [m for m in missing if set(modules[m]) == {"full"}]:
        # a modules_to_save head the base lacks (a classifier on a bare encoder): new, not an update
        notes.append(f"adapter module {module}: saved whole (modules_to_save) and absent from the base; "
                     "a new module has no ΔW, not analysed")
        del modules[module]
        missing.remove(module)
    if missing:
        raise AdapterError(f"adapter {adapter.spec} targets module(s) absent from the base {base.spec}: "
                           f"{', '.join(missing[:5])}. Was it trained on another model? Pass the adapter's own base.")
    alpha_default = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    deltas = []
    for adapter_module, parts in modules.items():
        base_tensor = tied_to.get(adapter_module) or match.pairs[adapter_module + ".weight"]
        module = adapter_module if adapter_module in tied_to else base_tensor.removesuffix(".weight")
        info = base.info(base_tensor)
        if len(info.shape) != 2:
            raise AdapterError(f"adapter module {adapter_module}: base tensor {base_tensor} is {len(info.shape)}-D; "
                               "spectra reads adapters on Linear, Conv1D and Embedding modules only.")
        conv1d = is_conv1d(module, config) or bool(cfg.get("fan_in_fan_out") and is_conv1d(module, None))
        shape = (info.shape[1], info.shape[0]) if conv1d else tuple(info.shape)
        embedding = "emb_A" in parts
        scaling, dtype = 1.0, info.dtype
        if "full" not in parts:
            a_key, b_key = ("emb_A", "emb_B") if embedding else ("A", "B")
            if a_key not in parts or b_key not in parts:
                raise AdapterError(f"adapter {adapter.spec}: module {adapter_module} has only "
                                   f"{', '.join(sorted(parts))}; a LoRA module needs both A and B.")
            a_info, b_info = adapter.weights.info(parts[a_key]), adapter.weights.info(parts[b_key])
            rank = a_info.shape[0]
            # A (r, in), B (out, r); an embedding's A is (r, vocab) and B (dim, r), i.e. transposed roles
            want_a, want_b = ((rank, shape[0]), (shape[1], rank)) if embedding else ((rank, shape[1]), (shape[0], rank))
            if tuple(a_info.shape) != want_a or tuple(b_info.shape) != want_b:
                raise AdapterError(
                    f"adapter {adapter.spec}: module {adapter_module} has A {tuple(a_info.shape)} and B "
                    f"{tuple(b_info.shape)}, which do not fit the base weight {base_tensor} of (out, in) shape "
                    f"{shape}. The adapter was trained on a different base model; pass its own base.")
            alpha = pattern_value(alpha_pattern, adapter_module, alpha_default)
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            dtype = a_info.dtype
        else:
            full_shape = tuple(adapter.weights.info(parts["full"]).shape)
            if full_shape != tuple(info.shape):
                raise AdapterError(f"adapter {adapter.spec}: saved module {adapter_module} has shape {full_shape} "
                                   f"but the base's {base_tensor} is {tuple(info.shape)}.")
        deltas.append(AdapterDelta(module=module, base_tensor=base_tensor, shape=shape, dtype=dtype, conv1d=conv1d,
                                   keys=parts, scaling=scaling, embedding=embedding))
    return deltas, notes


def _tied_heads(adapter, modules: dict, missing: list[str], match, base_weights: list[str], config, notes) -> dict:
    """Output heads with a LoRA whose base weight is the tied input embedding (no tensor of their own).

    A tied base stores the embedding only (``tie_word_embeddings``, transformers' default).
    PEFT's ``ensure_weight_tying`` gives the head a LoRA tied to the embedding's (A_h = B_eᵀ,
    B_h = A_eᵀ: the same ΔW), which is dropped here and analysed once, under the embedding;
    a head's own LoRA (no embedding LoRA, or an untied one) is read against the embedding's
    weight. Returns {head module: the embedding's base tensor} for the latter; removes the
    former from `modules`.
    """
    from spectra.checkpoints.architectures import module_info

    if (config or {}).get("tie_word_embeddings", True) is False:
        return {}
    embeds = [n for n in base_weights if module_info(n.removesuffix(".weight")).role == "embed"]
    heads = [m for m in missing if module_info(m).role == "head" and {"A", "B"} <= set(modules[m])]
    if len(embeds) != 1 or not heads:
        return {}
    (embed_tensor,) = embeds
    embed_module = next((m for m, t in match.pairs.items() if t == embed_tensor), None)
    out = {}
    for head in heads:
        parts = modules[head]
        embed_parts = modules.get(embed_module.removesuffix(".weight")) if embed_module else None
        if embed_parts and {"emb_A", "emb_B"} <= set(embed_parts):
            read = adapter.weights.read
            if (torch.equal(read(parts["A"]), read(embed_parts["emb_B"]).T)
                    and torch.equal(read(parts["B"]), read(embed_parts["emb_A"]).T)):
                notes.append(f"adapter module {head}: its LoRA is tied to {embed_module.removesuffix('.weight')}'s "
                             "(PEFT's ensure_weight_tying), the same ΔW; reported once, under the embedding")
                del modules[head]
                continue
        notes.append(f"adapter module {head}: tied to {embed_tensor} in the base (it has no weight of its own); "
                     "its ΔW is read against that weight")
        out[head] = embed_tensor
    return out

