"""8-bit AdamW's states by tensor: bitsandbytes keeps a tensor of fewer than 4,096 elements (its ``min_8bit_size``
default) in two fp32 moments, 8 bytes an element, and only larger ones in 8 bits with an fp32 absmax per 256; the
memory model charged every tensor the 8-bit rate, 2·(1 + 4/256) bytes an element. The reference is bitsandbytes'
own AdamW8bit after one step on the CPU: every tensor of its state, a tensor shared by all parameters (the two
256-entry quantisation maps) once.
"""

from __future__ import annotations

import pytest
import torch

from spectra.memory import estimate_memory

bnb = pytest.importorskip("bitsandbytes")


def _llama():
    """(config.json dict, LlamaForCausalLM): hidden 64, so rank-32 LoRA factors of the attention are 2,048 elements
    (fp32 states) and those of the MLP (intermediate 160) 5,120 (8-bit)."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                            architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return config.to_dict(), tf.LlamaForCausalLM(config)


def _roberta():
    import transformers as tf

    config = tf.RobertaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=40, num_labels=3,
                              architectures=["RobertaForSequenceClassification"])
    torch.manual_seed(0)
    return config.to_dict(), tf.RobertaForSequenceClassification(config)


def _adam8_state_bytes(parameters) -> tuple[int, int, int]:
    """(bytes of AdamW8bit's state after a step, shared tensors once; tensors kept in fp32; in 8 bits)."""
    parameters = list(parameters)
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizer = bnb.optim.AdamW8bit(parameters)
    optimizer.step()
    seen, total = set(), 0
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.ndim > 0 and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    kept32 = sum(1 for s in optimizer.state.values() if s["state1"].dtype == torch.float32)
    return total, kept32, len(optimizer.state) - kept32


def _old_rate(n: int) -> int:
    return -(-n * 2 * 260 // 256)  # ⌈2·(1 + 4/256)·n⌉, the rate every tensor had been charged


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_states_are_bitsandbytes(method):
    from spectra.lora.train import TrainConfig, wrap_model

    config, model = _llama()
    peft_model = wrap_model(model, TrainConfig(method=method, rank=32), task="causal_lm")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    state, kept32, blockwise = _adam8_state_bytes(trainable)
    assert kept32 and blockwise  # both kinds are present
    est = estimate_memory(config, method=method, rank_plan_or_rank=32, seq_len=16, optimizer="adamw_8bit")
    assert est.trainable_params == sum(p.numel() for p in trainable)
    assert est.optimizer_states == state
    assert state != _old_rate(est.trainable_params)  # negative control: the flat 8-bit rate is not bitsandbytes'


def test_full_fine_tuning_states_are_bitsandbytes():
    """Every norm weight (64 elements) keeps fp32 moments; the embeddings and linears 8-bit ones."""
    config, model = _llama()
    state, kept32, blockwise = _adam8_state_bytes(model.to(torch.bfloat16).parameters())
    assert kept32 and blockwise
    est = estimate_memory(config, method="full", rank_plan_or_rank=None, seq_len=16, precision="bf16",
                          optimizer="adamw_8bit")
    assert est.optimizer_states == state
    mixed = estimate_memory(config, method="full", rank_plan_or_rank=None, seq_len=16, precision="mixed",
                            optimizer="adamw_8bit")
    assert mixed.optimizer_states == state + 4 * est.trainable_params  # the fp32 master copy beside them


def test_a_classifier_head_copy_is_stepped_by_its_tensors():
    """The head spectra train saves (RoBERTa's classifier: dense 64×64, 8-bit; its bias and out_proj, fp32) beside
    the LoRA, in bf16 as memory counts it."""
    from spectra.lora.train import TrainConfig, wrap_model

    config, model = _roberta()
    peft_model = wrap_model(model.to(torch.bfloat16), TrainConfig(rank=8), task="seq_cls")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    state, _, _ = _adam8_state_bytes(trainable)
    est = estimate_memory(config, rank_plan_or_rank=8, seq_len=16, precision="bf16", optimizer="adamw_8bit")
    assert est.trainable_params == sum(p.numel() for p in trainable)
    assert est.optimizer_states == state
