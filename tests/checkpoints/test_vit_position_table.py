"""A ViT's position table and class token are measured: HF ViT's ``embeddings.position_embeddings`` (1, N, d) is an
N × d table of role pos_embed, its ``cls_token`` (1, 1, d) a vector.

What was wrong (audit s19, item 6): both are parameters stored 3-D and not ``….weight``, so pairing skipped them as
"a 3-D tensor that is no layer's weight": a fine-tune's change to the position table appeared nowhere but in a note.
The reference is a float64 numpy SVD of the planted change, read from the saved checkpoints; a 3-D parameter of more
than two non-singleton dimensions stays skipped (the control), and a table resized on one side is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectra.analysis import analyze
from spectra.checkpoints.pairing import Pairing
from spectra.errors import PairingError
from tests.models import planted_vit_pair

TABLE, TOKEN = "embeddings.position_embeddings", "embeddings.cls_token"


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    """A ViT and its fine-tune: a rank-3 change planted in the position table, a change of the class token, a rank-2
    change of layer 0's query."""
    return planted_vit_pair(tmp_path_factory.mktemp("vit"), cls_token=True,
                            weights=("layers.0.attention.q_proj.weight",))


def _stored(path, name) -> np.ndarray:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return f.get_tensor(name).astype(np.float64)


def test_the_position_table_is_measured_as_a_matrix(vit_pair):
    base, tuned = vit_pair
    rows = {r["name"]: r for r in analyze(base, tuned, cache_dir=False, progress=False).to_dict()["modules"]}
    table = rows[TABLE]
    assert (table["kind"], table["role"], table["stack"], table["shape"]) == ("matrix", "pos_embed", "vision",
                                                                                [17, 32])
    delta = (_stored(tuned, TABLE) - _stored(base, TABLE)).reshape(17, 32)  # (1, 17, 32) -> (17, 32)
    sigma = np.linalg.svd(delta, compute_uv=False)
    assert np.allclose(table["singular_values"][:3], sigma[:3], rtol=1e-5)
    assert table["fro_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    assert table["energy_rank"]["0.99"] == 3  # the planted rank: the rows were not read as one (1, 544) row
    token = rows[TOKEN]
    assert (token["kind"], token["shape"]) == ("vector", [32])
    assert token["fro_norm"] == pytest.approx(np.linalg.norm(_stored(tuned, TOKEN) - _stored(base, TOKEN)), rel=1e-6)
    # negative control: the unchanged patch projection (a conv kernel, still (out, in·k·k)) has ΔW = 0
    assert rows["embeddings.patch_embeddings.projection"]["shape"] == [32, 3 * 8 * 8]
    assert rows["embeddings.patch_embeddings.projection"]["fro_norm"] == 0


def _pair(root, base: dict, tuned: dict):
    for side, tensors in (("base", base), ("tuned", tuned)):
        (root / side).mkdir()
        save_file(tensors, str(root / side / "model.safetensors"))
    return root / "base", root / "tuned"


def test_a_tensor_of_more_dimensions_stays_skipped(tmp_path):
    """The control: a (2, 3, 4) parameter is no table and no vector; a (1, 5, 4) one beside it is a 5 × 4 matrix."""
    gen = torch.Generator().manual_seed(2)
    tensors = {"probe": torch.randn(2, 3, 4, generator=gen), "pos_embed": torch.randn(1, 5, 4, generator=gen)}
    pairing = Pairing(*_pair(tmp_path, tensors, {k: v + 1 for k, v in tensors.items()}))
    assert [(e.name, e.kind, e.shape) for e in pairing.entries] == [("pos_embed", "matrix", (5, 4))]
    assert any(n.startswith("probe: skipped, a 3-D tensor") for n in pairing.notes)


def test_a_resized_table_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(3)
    with pytest.raises(PairingError, match="position_embeddings"):
        Pairing(*_pair(tmp_path, {TABLE: torch.randn(1, 17, 4, generator=gen)},
                       {TABLE: torch.randn(1, 26, 4, generator=gen)}))


def test_extract_advises_copying_the_table(vit_pair, tmp_path):
    """No LoRA adapts a parameter: extract's note says to copy the table (and the class token) from TUNED, not to add
    role pos_embed or modules_to_save=position_embeddings (which names no module). Following it gives TUNED back:
    PEFT's own merge of the adapter, plus the copied tensors, equals the fine-tune."""
    import transformers as tf
    from peft import PeftModel

    from spectra.lora.extract import extract_adapter

    base, tuned = vit_pair
    result = extract_adapter(base, tuned, "full", tmp_path / "ad", roles=("q",), progress=False)
    (matrix,) = [n for n in result.notes if "changed matrix" in n]
    assert (f"{TABLE} is a parameter of a module holding other modules (embeddings" in matrix
            and "copy it from TUNED" in matrix)
    assert "pos_embed)" in matrix and "roles=" not in matrix and "modules_to_save=" not in matrix
    copied = [TABLE, TOKEN]
    assert all(any(name in n and "copy" in n for n in result.notes) for name in copied)
    merged = PeftModel.from_pretrained(tf.ViTModel.from_pretrained(base), tmp_path / "ad").merge_and_unload()
    want = tf.ViTModel.from_pretrained(tuned).state_dict()
    off = {n for n, v in merged.state_dict().items() if not torch.allclose(v, want[n], atol=1e-5)}
    assert off == set(copied)  # the negative control: without the copy, PEFT's merge misses exactly these
    with torch.no_grad():
        for name in copied:
            merged.get_parameter(name).copy_(want[name])
    assert all(torch.allclose(v, want[n], atol=1e-5) for n, v in merged.state_dict().items())
