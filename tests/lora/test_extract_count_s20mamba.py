"""extract's table heading says what it counts, so the number can be checked against PEFT: on Qwen2-MoE (experts held
in fused parameters) it said "27 modules" counting each expert's matrix, where PEFT creates 7 LoRA modules. Now:
"N matrices in P PEFT LoRA modules (E expert slices in k of them)", P being what PeftModel.from_pretrained creates."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from spectra.cli.plans import _counted
from spectra.lora.extract import extract_adapter
from tests.models import moved, peft_wrapped

pytestmark = pytest.mark.filterwarnings("ignore")


def _qwen2_moe():
    import transformers as tf

    torch.manual_seed(0)
    return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, shared_expert_intermediate_size=16,
        vocab_size=64)).eval()


def _extract_and_load(build, root, **options):
    model = build()
    model.save_pretrained(root / "base")
    moved(model, seed=1).save_pretrained(root / "tuned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(root / "base", root / "tuned", 2, root / "ad", progress=False, **options)
    from peft import PeftModel

    return result, peft_wrapped(PeftModel.from_pretrained(type(model).from_pretrained(root / "base"),
                                                          str(root / "ad")))


def test_the_heading_counts_pefts_modules_beside_the_expert_slices(tmp_path):
    result, wrapped = _extract_and_load(_qwen2_moe, tmp_path)
    experts = [m.name for m in result.modules if re.search(r"\.experts\.\d+\.", m.name)]
    assert result.peft_modules == len(wrapped)  # PEFT's own count of the LoRA modules it created
    assert len(experts) == 2 * 3 * 3 and len(result.modules) > len(wrapped)  # 2 layers × 3 experts × gate, up, down
    fused = {name for name in wrapped if ".experts." in name}  # gate_up_proj and down_proj of each layer
    assert _counted(result) == (f"{len(result.modules)} matrices in {len(wrapped)} PEFT LoRA modules "
                                f"({len(experts)} expert slices in {len(fused)} of them)")


def test_a_dense_model_counts_modules_as_before(tmp_path):
    """Control: one row per PEFT module (Llama-like attention and MLP), the heading as it was."""
    import transformers as tf

    def llama():
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64))

    result, wrapped = _extract_and_load(llama, tmp_path)
    assert result.peft_modules == len(wrapped) == len(result.modules) == 7
    assert _counted(result) == "7 modules"
