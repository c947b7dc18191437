"""The memory model of fine-tuning: full, LoRA, QLoRA and DoRA, component by component.

``estimate_memory(config, method=..., rank_plan_or_rank=..., ...)`` reads only a model's
``config.json`` (no weights), so it answers for a 70B model as fast as for a tiny one. Every
figure is in bytes; every formula and assumption is stated where it is computed.

The package, in the order a config flows through it: ``config`` reads config.json (and the family's defaults),
``shape`` turns it into a :class:`ModelShape` (each block's linear layers, norms, attention and MoE layout, or a
refusal that says why), ``adapters`` lists the modules an adapter adapts as PEFT does, ``activations`` counts what
autograd keeps per token and block, and ``estimate`` adds up the bytes by component (:func:`estimate_memory`).

What is *not* counted: the CUDA context and kernels (≈ 0.3–1 GiB), allocator fragmentation and
caching, framework buffers (rotary tables, attention masks), dropout masks (LLM fine-tuning
usually runs with dropout 0), communication buffers of distributed training, and data-loader
memory. Read the totals as the floor a device must hold.

The activations are checked tensor by tensor against what autograd saves on tiny transformers 5
models on the CPU (tests/memory/test_memory.py). Where a CUDA kernel could differ, the model follows
the kernel a bf16 run gets (FlashAttention): sdpa's output takes Q's memory layout, so Phi-3's
o_proj reads a copy (CUDA's memory-efficient kernel, which fp32 runs get, returns the layout
o_proj wants: q·p per token less under full fine-tuning), and an MoE's experts run on
grouped_mm (transformers' fallback where it is missing, on GPUs before Ampere, old torch or
torch.compile outside bf16, keeps every expert's input, frozen or not). A bf16 LayerNorm keeps
fp32 statistics, as on CUDA (the CPU keeps them in bf16: PhiMoE's LayerNorms are checked at fp32).

References
----------
.. [1] Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
       Models", arXiv:1910.02054 (mixed-precision Adam: 2 + 2 + 12 bytes per parameter).
.. [2] Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
       arXiv:2205.05198 (activations per layer: s·b·h·(34 + 5·a·s/h) bytes for GPT).
.. [3] Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314
       (NF4, block 64; double quantisation: 8-bit constants in blocks of 256).
.. [4] Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
.. [5] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from spectra.memory.adapters import DEFAULT_ROLES
from spectra.memory.config import load_config
from spectra.memory.estimate import (ATTENTIONS, METHODS, OPTIMIZERS, PRECISIONS, MemoryEstimate, estimate_memory,
                                     format_bytes)
from spectra.memory.shape import ModelShape, model_shape

__all__ = ["ATTENTIONS", "DEFAULT_ROLES", "METHODS", "OPTIMIZERS", "PRECISIONS", "MemoryEstimate", "ModelShape",
           "estimate_memory", "format_bytes", "load_config", "model_shape"]
