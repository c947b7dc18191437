"""W₀ of a QLoRA/QDoRA adapter: which modules the 4-bit load stores in NF4, and their NF4 round trip.

A QLoRA adapter (Dettmers et al. 2023, arXiv:2305.14314) is trained on dequant(quant(W_base)),
not on W_base, wherever transformers' bitsandbytes load replaces the module by a 4-bit Linear;
elsewhere (an embedding table, a router, fused experts, a kept head) on W_base as stored.
`spectra verify` takes the adapter's update against that W₀ (:mod:`spectra.lora.verify_measures`),
so the quantisation error is not read as part of the update. :func:`bnb_4bit_modules` decides
where, asking transformers itself; :func:`nf4_round_trip` gives the weight, bit for bit.
"""

from __future__ import annotations

import torch


def nf4_round_trip(W: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) with bitsandbytes NF4, blocks of 64, double quantisation — the W₀ QLoRA trains on.

    ``W`` is (out, in), Conv1D weights included: transformers turns a Conv1D into a 4-bit
    Linear and quantises its transpose, so the blocks of 64 run along the input side for
    every layer. Bit-exact with what ``from_pretrained(quantization_config=nf4_config())``
    stores for a float32 checkpoint when both run on the same kind of device (Dettmers et
    al. 2023, arXiv:2305.14314); bitsandbytes' CPU and CUDA kernels sum the second-level
    offset in different orders, so across the two W₀ differs in the last digit (~1e-7).
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(W.float().contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).to(W.dtype)


def bnb_4bit_modules(names, config: dict | None, task: str = "causal_lm") -> dict[str, bool]:
    """Checkpoint module name → whether QLoRA's load stores its weight in NF4 (its W₀ is then the round trip).

    transformers' bitsandbytes path (``from_pretrained(quantization_config=nf4_config())``, what
    :func:`spectra.lora.train.load_model` does for ``task``) replaces exactly the ``nn.Linear`` and
    ``Conv1D`` modules outside its keep list (the output embedding, tied weights, the last
    parameter's module, the class's ``_keep_in_fp32_modules`` such as T5's ``wo``) or the modules PEFT trains a
    copy of in full for ``task`` (a classifier's head, :func:`spectra.lora.train.qlora_kept_modules`); an
    ``nn.Embedding`` (the token embedding, GPT-2's ``wpe``, T5's ``relative_attention_bias``), a
    Linear subclass (an MoE router) and a bare parameter (fused experts) keep their weights as
    stored. Asked of transformers itself: its ``replace_with_bnb_linear`` is run on the task's model
    class built from ``config`` on the meta device (:func:`spectra.checkpoints.targets.bnb_4bit_linears`, the rule
    ``spectra memory`` counts a multimodal model's towers by). Where that model cannot be built, or a name
    does not resolve in it, the rule falls back to the module's role: every role but the
    embedding tables and the head.
    """
    from spectra.checkpoints.architectures import module_info
    from spectra.checkpoints.targets import bnb_4bit_linears, meta_model, model_targets
    from spectra.lora.train import qlora_kept_modules

    names = list(names)
    fallback = {n: module_info(n, config).role not in ("embed", "pos_embed", "head") for n in names}
    model = meta_model(config, _loaded_class(config, task)) if config else None
    if model is None:
        return fallback
    targets = model_targets(names, model)  # resolved before the swap: the names stay, the Linears' classes go
    converted = bnb_4bit_linears(model, keep=qlora_kept_modules(model, task))  # a classifier's head stays whole
    if converted is None:  # a transformers without this path: the role rule
        return fallback
    out = {}
    for name, target in targets.items():
        if target is None:
            out[name] = fallback[name]
        else:  # a parameter target's owner (a router's weight) is converted only if it is a plain Linear
            out[name] = (target.name.rpartition(".")[0] if target.parameter else target.name) in converted
    return out


def _loaded_class(config: dict, task: str) -> str | None:
    """The transformers class :func:`spectra.lora.train.load_model` loads ``config`` as for ``task`` (its Auto
    class's choice), else the class the config names."""
    from transformers.models.auto import modeling_auto as auto

    from spectra.checkpoints.targets import architecture
    from spectra.lora.train import loads_as_image_text_to_text

    if task == "seq_cls":
        mapping = auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    elif task == "seq2seq_lm":
        mapping = auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    elif loads_as_image_text_to_text(config):
        mapping = auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    else:
        mapping = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cls = mapping.get(config.get("model_type"))
    return cls if isinstance(cls, str) else architecture(config)
