"""A PEFT adapter on GPT-BigCode read as the tuned side of a base given without config.json: the base's c_attn,
c_proj and c_fc are nn.Linear (out, in), as the pairing of two such checkpoints reads them by their shapes
(architectures.conv1d_by_shape); the adapter's side took them for GPT-2's Conv1D and refused or transposed them.
Reference: PEFT's own merge of the adapter, in float64."""

from __future__ import annotations

import pytest
import torch

from tests.models import random_adapter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def test_adapter_on_configless_bigcode_gives_peft_merge(tmp_path):
    import transformers as tf
    from safetensors.torch import save_file

    from spectra.checkpoints.pairing import Pairing, PairingOptions

    torch.manual_seed(0)
    model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_embd=48, n_layer=2, n_head=4, n_positions=32,
                                                         vocab_size=64)).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "base").mkdir()
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    peft_model = random_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4,
                                target_modules=["c_attn", "c_proj", "c_fc"])
    merged = {k: v.double() for k, v in peft_model.merge_and_unload().state_dict().items()}
    pairing = Pairing(tmp_path / "base" / "model.safetensors", tmp_path / "adapter",
                      PairingOptions(dtype="float64", vectors=False, split_fused=False))
    records = {r.name: r for r in pairing}
    assert len(records) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 layers
    for name, record in records.items():
        assert not record.conv1d, name
        expected = merged[f"{name}.weight"] - state[f"{name}.weight"].double()
        torch.testing.assert_close(record.delta, expected, rtol=0, atol=1e-6, msg=name)
