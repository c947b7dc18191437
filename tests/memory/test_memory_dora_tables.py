"""LoRA and DoRA on an embedding table (a plan's embed or pos_embed module: PEFT's lora.Embedding, DoRA's
DoraEmbeddingVariant): the trainable count against PEFT's get_peft_model, the tensors kept against what autograd
saves (tests/memory/test_memory.py's saved_bytes) on tiny Llama and GPT-2 models built from config, each run through
the plan's own PEFT config."""

from __future__ import annotations

import pytest

from spectra.memory import estimate_memory
from spectra.ranks import RankPolicy, recommend_ranks
from tests.memory.test_memory import saved_bytes
from tests.ranks.rows import analysis, make_row

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]
SEQ, VOCAB, HIDDEN = 16, 64, 32
LLAMA = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64,
         "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
GPT2 = {"model_type": "gpt2", "n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 48,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "architectures": ["GPT2LMHeadModel"]}


def _row(name, shape, role, layer, **kwargs):
    return make_row(name, [1.0] * 4 + [0.0] * (min(shape) - 4), shape=shape, role=role, layer=layer, **kwargs)


LLAMA_Q = _row("model.layers.1.self_attn.q_proj", (HIDDEN, HIDDEN), "q", 1)
LLAMA_EMBED = _row("model.embed_tokens", (VOCAB, HIDDEN), "embed", None)
GPT2_QKV = _row("transformer.h.1.attn.c_attn", (3 * HIDDEN, HIDDEN), "qkv", 1, conv1d=True)
GPT2_WPE = _row("transformer.wpe", (48, HIDDEN), "pos_embed", None)


def _plan(*rows):
    return recommend_ranks(analysis(*rows), RankPolicy(energy=1.0, roles=tuple(r["role"] for r in rows)))


def _peft_model(config: dict, plan, method: str, precision: str):
    """The model of ``config`` with the plan's own PEFT config (DoRA: use_dora, as spectra train sets it)."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = getattr(tf, config["architectures"][0])(tf.AutoConfig.for_model(**config))
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    model.config._attn_implementation = "sdpa"
    fields = plan.to_peft_config(model=model, task_type=None) | {"use_dora": method == "dora"}
    return get_peft_model(model, LoraConfig(**{k: v for k, v in fields.items() if k != "peft_type"})).train()


def _saved(config: dict, plan, method: str, precision: str, batch: int) -> int:
    """Bytes autograd saves for one step, less the batch's token ids (8 bytes each), which the table's lookup keeps
    a reference to but the caller holds anyway: the memory model counts no token ids."""
    import torch

    model = _peft_model(config, plan, method, precision)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))
    looked_up = 8 * batch * SEQ if any(m.role == "embed" for m in plan.modules) else 0
    return saved_bytes(model, lambda m: m(input_ids=ids, labels=ids).loss) - looked_up


def _modelled(config: dict, plan, method: str, precision: str, batch: int):
    return estimate_memory(config, method=method, rank_plan_or_rank=plan, batch=batch, seq_len=SEQ,
                           precision=precision, gradient_checkpointing=False)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_plan_with_the_token_embedding_trains_what_peft_does(method):
    """DoRA's magnitude on an embedding is one per column of the table (its width, 32), as PEFT's
    DoraEmbeddingLayer takes the norm of each column of W + s·ΔW; the table's (vocab, width) weight had been read as
    a Linear's (out, in): a magnitude of the vocabulary's size (64), 32 parameters too many."""
    plan = _plan(LLAMA_Q, LLAMA_EMBED)
    model = _peft_model(LLAMA, plan, method, "fp32")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    magnitudes = sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    assert _modelled(LLAMA, plan, method, "fp32", 2).trainable_params == trained
    assert magnitudes == (2 * HIDDEN if method == "dora" else 0)  # q_proj's 32 outputs, the table's 32 columns


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_on_the_token_embedding_keeps_what_autograd_saves(precision):
    """A LoRA on embed_tokens: its fp32 lookup (4·r per token) and every block's tensors before the first adapted
    layer (the embedding's output now requires grad), per token and per step (batches 2 and 3), against autograd."""
    without, with_embed = _plan(LLAMA_Q), _plan(LLAMA_Q, LLAMA_EMBED)
    for batch in (2, 3):
        measured = _saved(LLAMA, with_embed, "lora", precision, batch) - _saved(LLAMA, without, "lora", precision,
                                                                                batch)
        modelled = (_modelled(LLAMA, with_embed, "lora", precision, batch).activations
                    - _modelled(LLAMA, without, "lora", precision, batch).activations)
        assert modelled == measured > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dora_on_the_token_embedding_keeps_what_autograd_saves(precision):
    """DoRA on embed_tokens less LoRA on it (the blocks' tensors cancel): per token its fp32 LoRA output and the
    base output (p + 4)·width, and per step its column norms and m / norm (4·width each), at batches 2 and 3, against
    autograd. Before: (p + 4)·vocab per token and no per-step term (a token's 256 bytes too many at fp32)."""
    plan = _plan(LLAMA_EMBED)
    for batch in (2, 3):
        measured = _saved(LLAMA, plan, "dora", precision, batch) - _saved(LLAMA, plan, "lora", precision, batch)
        modelled = (_modelled(LLAMA, plan, "dora", precision, batch).activations
                    - _modelled(LLAMA, plan, "lora", precision, batch).activations)
        assert modelled == measured > 0
    # negative control: at one token more per sequence the per-token part grows by (p + 4)·width a sequence
    p = {"fp32": 4, "bf16": 2}[precision]
    assert (_modelled(LLAMA, plan, "dora", precision, 3).activations
            - _modelled(LLAMA, plan, "dora", precision, 2).activations
            - _modelled(LLAMA, plan, "lora", precision, 3).activations
            + _modelled(LLAMA, plan, "lora", precision, 2).activations) == SEQ * (p + 4) * HIDDEN


def test_dora_on_gpt2s_position_table_keeps_its_outputs_once_per_position():
    """GPT-2's wpe is looked up by the (1, s) positions: DoRA's outputs there are (1, s, width), kept once per
    position whatever the batch, and its W + s·ΔW is (positions × width). DoRA less LoRA on wpe alone, against
    autograd at batches 2 and 3 (equal: nothing per sequence). Before: (p + 4)·positions per token of the batch."""
    plan = _plan(GPT2_WPE)
    for batch in (2, 3):
        measured = _saved(GPT2, plan, "dora", "fp32", batch) - _saved(GPT2, plan, "lora", "fp32", batch)
        modelled = (_modelled(GPT2, plan, "dora", "fp32", batch).activations
                    - _modelled(GPT2, plan, "lora", "fp32", batch).activations)
        assert modelled == measured == SEQ * 8 * HIDDEN + 8 * HIDDEN


def test_dora_on_an_embedding_keeps_no_table():
    """A DoRA table's forward (one token) forms (A·B)ᵀ, s·(A·B)ᵀ and W + s·ΔW in fp32 for its column norms, and
    frees them: the profiler's peak is the workspace, 3·4·rows·width (within 1 %), and what the forward still holds
    once it returns is a few width-sized vectors (its output, the outputs it keeps, the norms), no rows × width table.
    Before, the table went through a Linear's identity formula, 4·(d_in² + 4·d_in·d_out): 84 MB against 12.6 MB
    measured. Negative control: a DoRA Linear keeps that formula (the largest: down_proj, 512 → 256)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = LLAMA | {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512}
    plan = _plan(make_row("model.embed_tokens", [1.0] * 4 + [0.0] * 252, shape=(4096, 256), role="embed",
                          layer=None))
    table = _peft_model(config, plan, "dora", "fp32").base_model.model.model.embed_tokens
    outputs = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs.append(table(torch.zeros(1, 1, dtype=torch.long)))
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    workspace = estimate_memory(config, method="dora", rank_plan_or_rank=plan, batch=1, seq_len=1).workspace
    assert workspace == 3 * 4 * 4096 * 256
    assert peak == pytest.approx(workspace, rel=0.01)
    assert held < 8 * 4 * 256  # a few width-sized fp32 vectors, not the 4 MiB table
    linear = estimate_memory(config, method="dora", rank_plan_or_rank=4, roles=("down",)).workspace
    assert linear == 4 * (512 * 512 + 4 * 512 * 256)


def test_dora_on_gemma3s_scaled_embedding_keeps_what_autograd_saves():
    """Gemma 3's embedding scales its output by √hidden (Gemma3TextScaledWordEmbedding), and PEFT scales DoRA's LoRA
    output alike after the norms: a multiplication by a constant, which keeps nothing more. DoRA less LoRA on
    embed_tokens, bf16, against autograd at batches 2 and 3."""
    from tests.models import tiny_config

    config = tiny_config("gemma3").to_dict() | {"architectures": ["Gemma3ForCausalLM"]}
    assert (config["vocab_size"], config["hidden_size"]) == (VOCAB, HIDDEN)
    plan = _plan(LLAMA_EMBED)
    for batch in (2, 3):
        measured = _saved(config, plan, "dora", "bf16", batch) - _saved(config, plan, "lora", "bf16", batch)
        modelled = (_modelled(config, plan, "dora", "bf16", batch).activations
                    - _modelled(config, plan, "lora", "bf16", batch).activations)
        assert modelled == measured == batch * SEQ * (2 + 4) * HIDDEN + 8 * HIDDEN
