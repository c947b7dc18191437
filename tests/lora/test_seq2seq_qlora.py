"""QLoRA on an encoder–decoder (T5, BART) on CPU: bitsandbytes' NF4 base under a trained LoRA adapter.

The reference: the base's float weights with each 4-bit layer replaced by its dequantised NF4 weight (what
bitsandbytes computes with), the adapter merged by PEFT, every example run alone in float64 with the decoder's inputs
built by hand (tests.lora.test_seq2seq.reference_loss). bitsandbytes' 4-bit layers need 64 input features, so the
models are 64 wide.
"""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.lora.data import prepare_data
from spectra.lora.train import TrainConfig, load_model, quiet_peft, train_adapter
from tests.lora.test_seq2seq import LOSS_REL, pairs_jsonl, reference_loss
from tests.models import build_model, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def wide(family: str):
    """A T5 or BART of one layer per stack, 64 wide (bitsandbytes' blocks), weights on the 2⁻¹² grid."""
    import transformers as tf

    if family == "t5":
        config = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                             relative_attention_num_buckets=8, decoder_start_token_id=0, vocab_size=64,
                             dropout_rate=0.0)
        return on_grid(tf.T5ForConditionalGeneration, config)
    config = tf.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                           max_position_embeddings=32, vocab_size=64, dropout=0.0, attention_dropout=0.0,
                           init_std=0.2)  # BART's 0.02 gives near-uniform logits, which 4-bit rounding hardly moves
    return on_grid(tf.BartForConditionalGeneration, config)


def dequantised_merge(base, adapter, *, quantize: bool = True):
    """The base with every 4-bit layer's weight replaced by its dequantised NF4 weight, the adapter merged by PEFT."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(base)
    quantized = load_model(base, task="seq2seq_lm", quantize=True)
    layers = [(n, m) for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) > 8  # every attention and MLP linear of both stacks
    with torch.no_grad():
        for name, layer in layers if quantize else ():
            model.get_submodule(name).weight.copy_(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_qlora_trains_an_encoder_decoder_and_its_eval_is_the_dequantised_merge(family, tmp_path):
    """The eval loss spectra reports after QLoRA training (4-bit base + adapter, padded float32 batches) and the one
    verify reports for the adapter are the float64 loss of the dequantised base with the adapter merged. Negative
    control: with the base's own float weights the loss is another (the 4-bit rounding is in the path)."""
    from spectra.lora.verify import verify_adapter
    from tests.lora.test_verify import perturbed

    base_model = wide(family)
    base = save(base_model, tmp_path / "base", "safetensors")
    tuned = save(perturbed(base_model, 4), tmp_path / "tuned", "safetensors")
    data, held = pairs_jsonl(tmp_path / "train.jsonl"), pairs_jsonl(tmp_path / "eval.jsonl", n=8, start=100)
    config = TrainConfig(method="qlora", rank=2, roles=("q", "v", "xq", "xv"), batch_size=8, max_steps=3, lr=1e-2,
                         seed=1)
    result = train_adapter(base, data, config, tmp_path / "ad", eval_data=held, progress=False)
    assert result.steps == 3 and result.final_eval["tokens"] > 0
    _, tokens, _, _, _ = prepare_data(base, held)
    total, count = reference_loss(dequantised_merge(base, tmp_path / "ad"), tokens)
    assert result.final_eval["tokens"] == count
    assert result.final_eval["loss"] == pytest.approx(total / count, rel=LOSS_REL), family
    unquantised, _ = reference_loss(dequantised_merge(base, tmp_path / "ad", quantize=False), tokens)
    assert result.final_eval["loss"] != pytest.approx(unquantised / count, rel=1e-3)  # negative control
    report = verify_adapter(base, tuned, tmp_path / "ad", eval_data=held, progress=False)
    assert report.sources["adapter"]["quantized"] and report.summary["quant_error"] > 0
    assert report.evals["adapter"]["loss"] == pytest.approx(total / count, rel=LOSS_REL), family


def test_qlora_refuses_an_encoder_decoder_narrower_than_the_4bit_blocks(tmp_path):
    """The 32-wide T5 of tests.models: its first 4-bit layer is named, before anything is written."""
    base = save(build_model("t5"), tmp_path / "base", "safetensors")
    data = pairs_jsonl(tmp_path / "train.jsonl", n=4)
    with pytest.raises(ConfigError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.q has 32 input features; "
                                          r"4-bit \(QLoRA/QDoRA\) layers need at least 64"):
        train_adapter(base, data, TrainConfig(method="qlora", rank=2, max_steps=1), tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()


def test_a_4bit_layer_stays_float32_after_an_eval_forward(tmp_path):
    """compute_dtype float32 is a float32 matmul with the dequantised weight, also after the layer has run in eval
    mode without gradients (where bitsandbytes on an AVX512-BF16 CPU would repack it and compute in bfloat16 from
    then on, in training too). On a CPU without AVX512-BF16 this holds either way."""
    import bitsandbytes.functional as bnbf

    quantized = load_model(save(wide("t5"), tmp_path / "base", "safetensors"), task="seq2seq_lm", quantize=True)
    layer = quantized.encoder.block[0].layer[0].SelfAttention.q
    W = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in) float32
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    quantized.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, W))
    quantized.train()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, W))
