"""Tiny real transformers architectures built from config, and planted ΔW.

Every parameter is rounded to a grid of 2⁻¹² and every planted update is an integer
low-rank product times 2⁻⁸, so ``base + planted`` is exact in float32 and the ΔW that
spectra reads back must equal the planted update *exactly*.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

GRID = 2.0**-12


def tiny_config(family: str):
    """A transformers config of about 10-50k parameters for one family."""
    import transformers as tf

    common = dict(vocab_size=64)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                             max_position_embeddings=32, num_labels=3, **common)
    if family == "phi3":
        return tf.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                             eos_token_id=0, **common)
    if family == "gemma":  # multi-query attention: one KV head
        return tf.GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=8, **common)
    if family == "mixtral":
        return tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, **common)
    if family == "phimoe":  # Phi-3.5-MoE's layout: LayerNorms with biases, biased attention and head, w1/w2/w3 experts
        return tf.PhimoeConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
                               attention_bias=True, lm_head_bias=True, **common)
    if family == "gemma3":  # text-only Gemma 3: q/k norms, four norms per block, a sliding and a full layer, tied
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"], **common)
    if family == "gemma3_multimodal":  # Gemma3ForConditionalGeneration: the text model above, a SigLIP tower, a projector
        text = tiny_config("gemma3").to_dict() | {"vocab_size": 300}  # image, begin- and end-of-image tokens
        return tf.Gemma3Config(text_config=text, vision_config=dict(hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
                               mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299)
    if family in ("t5", "t5_gated"):  # encoder–decoder; t5_gated: v1.1 / Flan-T5's gated MLP (wi_0, wi_1, wo)
        return tf.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                           relative_attention_num_buckets=8, decoder_start_token_id=0,
                           feed_forward_proj="gated-gelu" if family == "t5_gated" else "relu", **common)
    if family == "bart":  # encoder–decoder with fc1/fc2 MLPs and the decoder's encoder_attn
        return tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                             max_position_embeddings=32, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=32, **common)
    raise ValueError(family)


_MODEL_CLASSES = {
    "llama": ("LlamaModel", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Model", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
    "bert": ("BertModel", "BertForSequenceClassification"),
    "phi3": ("Phi3Model", "Phi3ForCausalLM"),
    "mixtral": ("MixtralModel", "MixtralForCausalLM"),
    "gemma": ("GemmaModel", "GemmaForCausalLM"),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXForCausalLM"),
    "phimoe": ("PhimoeModel", "PhimoeForCausalLM"),
    "gemma3": ("Gemma3TextModel", "Gemma3ForCausalLM"),
    "gemma3_multimodal": ("Gemma3Model", "Gemma3ForConditionalGeneration"),
    "t5": ("T5Model", "T5ForConditionalGeneration"),
    "t5_gated": ("T5Model", "T5ForConditionalGeneration"),
    "bart": ("BartModel", "BartForConditionalGeneration"),
}


def on_grid(cls, config, *, seed: int = 0):
    """``cls(config)`` in eval mode, initialised after ``torch.manual_seed(seed)``, every parameter rounded to the
    2⁻¹² grid."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p / GRID) * GRID)
    return model


def build_model(family: str, *, head: bool = True, seed: int = 0):
    """A model of ``family`` with weights on the 2⁻¹² grid (base class if ``head=False``)."""
    import transformers as tf

    return on_grid(getattr(tf, _MODEL_CLASSES[family][1 if head else 0]), tiny_config(family), seed=seed)


def low_rank(out_features: int, in_features: int, rank: int, *, seed: int) -> torch.Tensor:
    """An exact integer rank-``rank`` matrix times 2⁻⁸, float64, shape (out, in)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-2, 3, (out_features, rank), generator=g).double()
    v = torch.randint(-2, 3, (rank, in_features), generator=g).double()
    return (u @ v) * 2.0**-8


@dataclass
class PlantedPair:
    base: Path
    tuned: Path
    planted: dict[str, torch.Tensor] = field(default_factory=dict)  # expected DeltaW name -> (out, in) float64


def add_to_parameter(model, param_name: str, delta_out_in: torch.Tensor, *, conv1d: bool = False,
                     rows: slice | None = None, expert: int | None = None) -> None:
    """Add a planted (out, in) update to a parameter in place (Conv1D stores (in, out))."""
    param = dict(model.named_parameters())[param_name]
    with torch.no_grad():
        target = param[expert] if expert is not None else param
        update = delta_out_in.to(target.dtype)
        if conv1d:
            target[:, rows or slice(None)] += update.T
        else:
            target[rows or slice(None)] += update


def planted_gpt2() -> tuple:
    """A tiny GPT-2 and a copy with a rank-3 update planted in layer 0's fused ``c_attn`` (a Conv1D, stored (in, out)):
    the pair the CLI tests analyse, recommend from and extract."""
    base = build_model("gpt2")
    tuned = copy.deepcopy(base)
    add_to_parameter(tuned, "transformer.h.0.attn.c_attn.weight", low_rank(96, 32, 3, seed=0), conv1d=True)
    return base, tuned


def resized_bert_mlm(root: Path, *, tie: bool = True, bias: bool = True) -> PlantedPair:
    """A tiny BertForMaskedLM (vocabulary 100) and a fine-tune resized to 108 tokens, saved as safetensors: rank-1
    updates of the shared rows of the word embeddings and (untied) of the decoder, and (`bias`) of the shared
    entries of ``cls.predictions.bias``, the vocabulary's bias (``decoder.bias`` is tied to it). ``planted``: the
    updates by record name, float64."""
    import transformers as tf

    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32, tie_word_embeddings=tie)
    base = on_grid(tf.BertForMaskedLM, config)
    tuned = copy.deepcopy(base)
    tuned.resize_token_embeddings(108)
    planted = {"bert.embeddings.word_embeddings": low_rank(100, 32, 1, seed=5)}
    if bias:
        planted["cls.predictions.bias"] = low_rank(100, 1, 1, seed=6)[:, 0]
    if not tie:
        planted["cls.predictions.decoder"] = low_rank(100, 32, 1, seed=7)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, update in planted.items():
            params[name if name.endswith(".bias") else f"{name}.weight"][:100] += update.float()
    return PlantedPair(save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors"), planted)


def save(model, path: Path, fmt: str) -> Path:
    """Save the way users' checkpoints look: safetensors, sharded safetensors, or .bin."""
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(path)
    elif fmt == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
    elif fmt == "bin":  # save_pretrained ignores safe_serialization=False in transformers 5
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return path


def nonfinite_pair(folder: Path, module: str, value: float, *, at=(0, 0), dtype=torch.float32) -> tuple[Path, Path]:
    """A saved llama pair whose tuned `module` (e.g. ``layers.1.mlp.up_proj``) has one NaN/Inf weight at `at`."""
    import copy

    base = build_model("llama").to(dtype)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_submodule("model." + module).weight[at] = value
    return save(base, folder / "b", "safetensors"), save(tuned, folder / "t", "safetensors")


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# planted ranks of the tiny Mixtral's expert projections, per (layer, expert): w1 (gate), w3 (up), w2 (down)
EXPERT_RANKS = {(0, 0): (2, 1, 2), (0, 1): (2, 1, 2), (0, 2): (2, 1, 2),  # one rank per fused parameter
                 (1, 0): (1, 1, 1), (1, 1): (3, 2, 1), (1, 2): (1, 0, 1)}  # experts differ; one w3 unchanged


def planted_mixtral_pair(root):
    """A tiny transformers-5 Mixtral and a fine-tune with exact planted ranks (checkpoints store experts.N.w1…)."""
    import copy
    import itertools

    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    seeds = itertools.count(1)
    for layer in (0, 1):
        for proj, rank in (("q_proj", 2), ("v_proj", 1)):  # k_proj, o_proj unchanged: left out
            out_f, in_f = tuned.get_parameter(f"model.layers.{layer}.self_attn.{proj}.weight").shape
            add_to_parameter(tuned, f"model.layers.{layer}.self_attn.{proj}.weight",
                             low_rank(out_f, in_f, rank, seed=next(seeds)))
        for expert in range(3):
            gate, up, down = EXPERT_RANKS[layer, expert]
            experts = f"model.layers.{layer}.mlp.experts"
            for rows, rank in ((slice(0, 48), gate), (slice(48, 96), up)):  # gate_up_proj (experts, [gate; up], in)
                if rank:
                    add_to_parameter(tuned, f"{experts}.gate_up_proj", low_rank(48, 32, rank, seed=next(seeds)),
                                     rows=rows, expert=expert)
            add_to_parameter(tuned, f"{experts}.down_proj", low_rank(32, 48, down, seed=next(seeds)),
                             expert=expert)
    return base, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def random_adapter(model, path: Path, *, seed: int = 123, scale: float = 0.1, save_embedding_layers="auto",
                   **lora_kwargs):
    """A train-free PEFT adapter on a copy of ``model``, saved with PEFT itself; returns the PEFT model.

    Every ``lora_*`` and ``modules_to_save`` tensor is drawn at random (PEFT zero-inits B, which would
    make ΔW = 0); DoRA magnitudes are moved around their initial norms.
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * scale + (1.0 if "magnitude" in name else 0.0) * p)
    peft_model.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    return peft_model



def graded_update(shape, rank, *, seed):
    """(out, in) float64 update of `rank` distinct singular values 0.08, 0.04, 0.02, …: a rank-r truncation is
    unique (a flat spectrum's is not, and PEFT's merge would match some truncation, not numpy's)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=g, dtype=torch.float64))
    return u @ torch.diag(0.08 * 0.5 ** torch.arange(rank, dtype=torch.float64)) @ v.T


def energy_ranks64(delta) -> dict:
    """The energy ranks at τ = 0.5/0.9/0.95/0.99 of a float64 numpy (out, in) ΔW, from numpy's full SVD: the
    reference analyze's ``energy_rank`` is held to."""
    import numpy as np

    s2 = np.linalg.svd(delta, compute_uv=False) ** 2
    cum = np.cumsum(s2)
    return {tau: int(np.searchsorted(cum, float(tau) * cum[-1] * (1 - 1e-9))) + 1
            for tau in ("0.5", "0.9", "0.95", "0.99")}

def planted_expert_pair(root: Path, base, planted: dict, *, where=None, update=None, seeds: dict | None = None):
    """(tuned, base folder, tuned folder, deltas): a copy of ``base`` with one planted (out, in) update per
    (parameter, expert), both saved as safetensors (``root/b``, ``root/t``).

    Parameters
    ----------
    planted : {(parameter name, expert): rank}
        The update of each is ``update(shape, rank, seed=…)`` (default :func:`graded_update`), float64, drawn with
        seed ``seeds[key]`` (default: its place in ``planted`` plus one), shaped as its view.
    where : callable, optional
        ``where(name, parameter, expert)``: the view of the parameter that is the expert's (out, in) matrix, which
        the update is added to. Default ``parameter[expert]`` (experts stored (E, out, in)); DBRX's stacked rows,
        a transposed down projection or half of a [gate; up] are views the caller gives.

    Returns
    -------
    tuned, base folder, tuned folder, deltas ({key: the float64 update added})
    """
    update = update or graded_update
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    deltas = {}
    with torch.no_grad():
        for i, (key, rank) in enumerate(planted.items()):
            name, expert = key
            view = where(name, params[name], expert) if where else params[name][expert]
            deltas[key] = update(tuple(view.shape), rank, seed=seeds[key] if seeds else i + 1)
            view += deltas[key].to(view.dtype)
    return tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors"), deltas


def flat_update(shape, rank, *, seed, scale=0.05):
    """(out, in) update with `rank` equal singular values `scale`: every energy rank equals `rank`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=g, dtype=torch.float64))
    return scale * u @ v.T


def planted_models(family: str, planted: dict[str, int], *, seed: int = 0):
    """(base, tuned) models of `family`, tuned = base + a :func:`flat_update` of the planted rank in each named
    parameter (the i-th planted one drawn with seed ``seed + i``): every energy rank of its ΔW is that rank."""
    base = build_model(family)
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, rank) in enumerate(planted.items()):
            params[name] += flat_update(tuple(params[name].shape), rank, seed=seed + i).float()
    return base, tuned


def tiny_moe(family: str):
    """Two-layer MoE causal LMs whose MLPs PEFT's config conversion rewrites: Qwen3-MoE with layer 0 dense
    (``mlp_only_layers``), DeepSeek-V3 with layer 0 dense (``first_k_dense_replace``) and a shared expert beside the
    routed ones in layer 1, and Mixtral (``"mixtral"``), both layers routed; 3 experts, width 32. ``"glm4v_moe"``:
    GLM-4.5V, whose vision tower's MLP is gate_proj/up_proj/down_proj too, beside a language model like DeepSeek's
    (4 experts)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "glm4v_moe":
        text = dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                    first_k_dense_replace=1, n_shared_experts=1, vocab_size=64, head_dim=8)
        vision = dict(depth=1, hidden_size=32, intermediate_size=16, num_heads=4, out_hidden_size=32)
        return tf.Glm4vMoeForConditionalGeneration(tf.Glm4vMoeConfig(text_config=text, vision_config=vision)).eval()
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
                                   num_experts=3, num_experts_per_tok=2, mlp_only_layers=[0], **common)
        return tf.Qwen3MoeForCausalLM(config).eval()
    if family == "deepseek_v3":
        config = tf.DeepseekV3Config(intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=4,
                                     n_routed_experts=3, num_experts_per_tok=2, n_shared_experts=1,
                                     first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16,
                                     kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **common)
        return tf.DeepseekV3ForCausalLM(config).eval()
    config = tf.MixtralConfig(intermediate_size=24, num_local_experts=3, num_experts_per_tok=2, num_key_value_heads=2,
                              head_dim=8, **common)
    return tf.MixtralForCausalLM(config).eval()


def moved(model, *, seed: int, scale: float = 1e-2):
    """A copy of `model` with every parameter moved by Gaussian noise of std `scale` (a full-rank fine-tune)."""
    import copy

    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p += scale * torch.randn(p.shape, generator=g)
    return tuned


def tiny_clip():
    """transformers' CLIPModel from a tiny config (text and vision towers of width 32, one layer each, 16 patches of
    a 32-pixel image, projection 16), seeded 0."""
    import transformers as tf

    config = tf.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    return tf.CLIPModel(config)


def planted_vit_pair(root: Path, *, cls_token: bool, weights: tuple[str, ...]) -> tuple[Path, Path]:
    """A tiny ViTModel (hidden 32, one layer, 16 patches + the class token: a 17 × 32 position table) saved under
    ``root/base``, and its fine-tune under ``root/tuned``: a rank-3 change planted in ``embeddings.position_embeddings``
    (stored (1, 17, 32)), then, with ``cls_token``, a change of the class token (1, 1, 32), then a rank-2 change of
    each of ``weights`` (32 × 32, by the model's parameter names), all in that order from one generator (seed 1)."""
    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                          image_size=32, patch_size=8)
    torch.manual_seed(0)
    base = tf.ViTModel(config)
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base.embeddings.position_embeddings += (torch.randn(1, 17, 3, generator=gen)
                                                @ torch.randn(1, 3, 32, generator=gen))
        if cls_token:
            base.embeddings.cls_token += torch.randn(1, 1, 32, generator=gen)
        for name in weights:
            base.get_parameter(name).add_(torch.randn(32, 2, generator=gen) @ torch.randn(2, 32, generator=gen))
    base.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def peft_wrapped(peft_model) -> dict:
    """What PEFT put a LoRA on, by the base model's names → its LoRA layer: a module (``lora.Linear``, under the
    module's name) or a parameter (``ParamWrapper``, under ``module.parameter``; PEFT nests the wrappers of one
    module's parameters, ``….experts.base_layer``, which are named without ``.base_layer``)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{name}.{module.parameter_name}" if isinstance(module, ParamWrapper) else name] = module
    return out


def load_4bit(model, folder: Path, *, double_quant: bool = True):
    """``model`` saved to ``folder`` and loaded back in 4 bits by bitsandbytes (NF4, bf16 compute, double quantisation
    unless ``double_quant`` is False), and the bytes of its quantisation constants: each Linear4bit's absmax and
    code, and with double quantisation the absmax's own absmax, code and offset. Returns (loaded model, bytes)."""
    import bitsandbytes as bnb
    import transformers as tf

    model.save_pretrained(folder)
    quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = type(model).from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16)
    constants = 0
    for module in loaded.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            parts = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                                  if state.nested else [])
            constants += sum(t.numel() * t.element_size() for t in parts)
    return loaded, constants


def default_configs():
    """(model type, class name, default config) of every transformers class a slow scan builds: the causal LM, else
    the image-text-to-text model, else the base model of each model type (a config that cannot be made is skipped)."""
    import transformers as tf
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    mappings = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES)
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        cls = next((m[model_type] for m in mappings if model_type in m), None)
        cls = cls[0] if isinstance(cls, (list, tuple)) else cls
        if cls is None or not hasattr(tf, cls):
            continue
        try:
            config = tf.AutoConfig.for_model(model_type)
        except Exception:
            continue
        yield model_type, cls, config


@contextmanager
def quiet_transformers():
    """Python warnings ignored and transformers' logging at error level, restored on the way out: for the slow scans
    that build every transformers class (:func:`meta_models`)."""
    import warnings

    import transformers as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()
        try:
            yield
        finally:
            tf.utils.logging.set_verbosity(verbosity)


def role_rules_without(new_rules) -> tuple:
    """spectra's role rules (``architectures._ROLE_REGEXES``) less those whose pattern ``(^|\\.)NAME$`` names a key
    of ``new_rules``, each of which must be there: the rules as they stood before a change added ``new_rules``."""
    from spectra.checkpoints import architectures

    kept = tuple(r for r in architectures._ROLE_REGEXES
                 if r[0].pattern.removeprefix("(^|\\.)").removesuffix("$") not in new_rules)
    assert len(architectures._ROLE_REGEXES) - len(kept) == len(new_rules)
    return kept


def meta_models():
    """(model type, model) of every transformers class buildable from its default config on the meta device, at most
    two layers deep (the slow scans of roles and tables); a class that needs more than its default config (a backbone,
    a library that is not installed) is skipped."""
    import transformers as tf

    for model_type, cls, config in default_configs():
        try:
            for c in (config, getattr(config, "text_config", None)):
                for key in ("num_hidden_layers", "num_layers", "n_layer", "decoder_layers", "encoder_layers"):
                    if isinstance(getattr(c, key, None), int) and getattr(c, key) > 2:
                        setattr(c, key, 2)
            with torch.device("meta"):
                model = getattr(tf, cls)._from_config(config)
        except Exception:
            continue
        yield model_type, model
