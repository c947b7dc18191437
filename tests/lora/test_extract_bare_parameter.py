"""extract by roles leaves out a matrix that is a parameter of its own, no layer's weight (a ViT's (1, N, d) position
table, measured N × d since 5f8169d), which PEFT cannot adapt: before, ``--roles pos_embed,q,v`` (and BLIP-2's
``query_tokens`` under ``--roles other``) was refused as "not module(s) … that PEFT can adapt"."""

import warnings

import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.models import planted_vit_pair

TABLE = "embeddings.position_embeddings"
Q, V = "layers.0.attention.q_proj", "layers.0.attention.v_proj"  # transformers 5 ViT names


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    return planted_vit_pair(tmp_path_factory.mktemp("vit"), cls_token=False,
                            weights=("layers.0.attention.q_proj.weight", "layers.0.attention.v_proj.weight"))


def test_roles_leave_the_table_out_and_the_note_says_to_copy_it(vit_pair, tmp_path):
    base, tuned = vit_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(base, tuned, 2, tmp_path / "ad", roles=("pos_embed", "q", "v"), progress=False)
    assert {m.name for m in result.modules} == {Q, V}  # the table is no target
    assert TABLE in result.left_out  # named among what the adapter does not carry
    assert any(TABLE in n and "TUNED" in n for n in result.notes)  # with the advice to copy it from TUNED


def test_the_table_alone_is_refused_as_a_parameter_peft_cannot_adapt(vit_pair, tmp_path):
    """Roles that select nothing but the table are refused naming it and why, not as "nothing matches"."""
    base, tuned = vit_pair
    with pytest.raises(Exception, match=f"{TABLE}: a parameter of its own, .*PEFT cannot adapt.*copy it from TUNED"):
        extract_adapter(base, tuned, 2, tmp_path / "ad", roles=("pos_embed",), progress=False)
    assert not (tmp_path / "ad").exists()


def test_a_layers_weight_is_still_selected(vit_pair, tmp_path):
    """Control: q and v, weights of Linears, are still adapted at the planted rank: PEFT's A is (2, 32)."""
    base, tuned = vit_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract_adapter(base, tuned, 2, tmp_path / "ad", roles=("q", "v"), progress=False)
    assert {m.name for m in result.modules} == {Q, V}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert all(t.shape == torch.Size([2, 32]) for k, t in state.items() if "lora_A" in k)
