"""DBRX's routed experts: ``ffn.experts.mlp.w1``, ``v1`` and ``w2`` are each ONE 2-D parameter (experts·ffn, d_model)
that DbrxExperts views (experts, ffn, d_model): expert e's gate is ``x @ w1[e].T``, its up ``x @ v1[e].T``, its down
``h @ w2[e]`` (w2[e] is the down projection stored (in, out)). spectra read each as experts·ffn vectors of role
``other`` (no spectrum, no expert index). Now: one (out, in) matrix record per expert, ``…ffn.experts.mlp.3.w1``,
roles gate / up / down. References: transformers' own DbrxForCausalLM built from a tiny config (its DbrxExpertGLU
forward fixes the orientation), float64 numpy SVD of the planted per-expert ΔW. Without config.json the experts
cannot be told apart: skipped with a note (negative control), never read as rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.models import energy_ranks64, planted_expert_pair

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

E, FFN, D = 3, 16, 32
W1, V1, W2 = (f"transformer.blocks.{i}.ffn.experts.mlp.{p}" for i, p in ((0, "w1"), (1, "v1"), (1, "w2")))
PLANTED = {(W1, 1): 3, (V1, 2): 2, (W2, 0): 2}  # (parameter, expert) -> planted rank of its (out, in) ΔW


def tiny_dbrx():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DbrxConfig(d_model=D, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64,
                           attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                           ffn_config={"ffn_hidden_size": FFN, "moe_num_experts": E, "moe_top_k": 2})
    return tf.DbrxForCausalLM(config).eval()


def _oriented(name: str) -> tuple[int, int]:
    return (D, FFN) if name.endswith("w2") else (FFN, D)  # the expert's (out, in)


def expert_view(name: str, param: torch.Tensor, e: int | None) -> torch.Tensor:
    """Expert e's (out, in) matrix as DbrxExperts reads it: rows e·ffn… of w1/v1, transposed for w2 (a view, which
    :func:`~tests.models.planted_expert_pair` adds the update to); a parameter of no expert (None) whole."""
    if e is None:
        return param
    rows = param[e * FFN:(e + 1) * FFN]
    return rows.T if name.endswith("w2") else rows


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbrx")
    base = tiny_dbrx()
    tuned, b, t, deltas = planted_expert_pair(root, base, PLANTED, where=expert_view)
    return base, tuned, b, t, deltas, root


def test_the_model_applies_each_planted_update_in_out_in_orientation(dbrx):
    """The reference's premise, checked on transformers' own DbrxExpertGLU: with the planted expert's slices, the
    change in its output is the planted (out, in) ΔW applied as x @ ΔWᵀ (gate, up) or h @ ΔWᵀ (down)."""
    base, tuned, _, _, deltas, _ = dbrx
    x = torch.randn(5, D, dtype=torch.float64)
    mlp_b, mlp_t = base.transformer.blocks[1].ffn.experts.mlp, tuned.transformer.blocks[1].ffn.experts.mlp
    act = torch.nn.functional.silu

    def expert(mlp, e):
        return [getattr(mlp, p).detach().double().view(E, FFN, D)[e] for p in ("w1", "v1", "w2")]

    for e in range(E):
        mlp_b.double(), mlp_t.double()
        got = mlp_t(x, *expert(mlp_t, e)) - mlp_b(x, *expert(mlp_b, e))
        g, u, w2 = expert(mlp_b, e)
        dv = deltas.get((V1, e), torch.zeros(FFN, D, dtype=torch.float64))
        dd = deltas.get((W2, e), torch.zeros(D, FFN, dtype=torch.float64))
        want = (act(x @ g.T) * (x @ (u + dv).T)) @ (w2 + dd.T) - (act(x @ g.T) * (x @ u.T)) @ w2
        # the down update in (out, in): its contribution is h @ ΔWᵀ with h the activated product
        assert torch.allclose(got, want, atol=1e-10), e
        if (W2, e) in deltas:
            h = act(x @ g.T) * (x @ (u + dv).T)
            assert torch.allclose((h @ dd.T), h @ (w2 + dd.T) - h @ w2, atol=1e-12)
    base.float(), tuned.float()


def test_one_record_per_expert_with_roles_and_energy_ranks_of_float64_svd(dbrx):
    """Every expert a matrix record of its own, (out, in) as the model computes it, with its role and expert index;
    its float64 ΔW is the planted update and its energy ranks equal numpy's float64 SVD; no row vectors remain."""
    from spectra.analysis import analyze
    from spectra.checkpoints.pairing import Pairing

    _, _, b, t, deltas, root = dbrx
    pairing = Pairing(b, t)
    entries = {e.name: e for e in pairing.entries}
    assert not any(".experts." in n and e.kind == "vector" for n, e in entries.items())
    roles = {"w1": ("gate", (FFN, D)), "v1": ("up", (FFN, D)), "w2": ("down", (D, FFN))}
    for layer in (0, 1):
        for proj, (role, shape) in roles.items():
            for e in range(E):
                entry = entries[f"transformer.blocks.{layer}.ffn.experts.mlp.{e}.{proj}"]
                assert (entry.kind, entry.info.role, entry.info.expert, entry.expert_index, tuple(entry.shape)) == (
                    "matrix", role, e, e, shape)
    for (name, e), delta in deltas.items():
        head, _, proj = name.rpartition(".")
        (d,) = pairing.load(entries[f"{head}.{e}.{proj}"])
        assert np.allclose(d.delta.double().numpy(), delta.numpy(), atol=2e-7), (name, e)

    run = root / "run"
    run.mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(run / "analysis.json")
    modules = {m["name"]: m for m in json.loads((run / "analysis.json").read_text())["modules"]}
    for (name, e), rank in PLANTED.items():
        head, _, proj = name.rpartition(".")
        record = modules[f"{head}.{e}.{proj}"]
        assert record["energy_rank"] == energy_ranks64(deltas[name, e].numpy()), record["name"]
        assert record["energy_rank"]["0.99"] == rank
        assert record["shape"] == list(_oriented(name)) and record["expert"] == e
        assert record["fro_norm"] == pytest.approx(float(np.linalg.norm(deltas[name, e].numpy())), rel=1e-5)
    changed = [m["name"] for m in modules.values() if ".experts." in m["name"] and m["fro_norm"] > 0]
    assert sorted(changed) == sorted(f"{n.rpartition('.')[0]}.{e}.{n.rpartition('.')[2]}" for n, e in PLANTED)


def test_without_config_the_stacked_experts_are_skipped_with_a_note(dbrx, tmp_path):
    """Negative control: with no config.json the number of experts is unknown, so the tensors are skipped with a
    note naming them, not read as experts·ffn row vectors; the attention's weights are still paired."""
    from safetensors.torch import load_file, save_file

    from spectra.checkpoints.pairing import Pairing

    _, _, b, t, _, _ = dbrx
    dirs = []
    for side, src in (("b", b), ("t", t)):
        (tmp_path / side).mkdir()
        save_file(load_file(str(src / "model.safetensors")), str(tmp_path / side / "model.safetensors"))
        dirs.append(tmp_path / side)
    pairing = Pairing(*dirs)
    assert not any(".ffn.experts.mlp." in e.name for e in pairing.entries)
    assert any(e.name.endswith("attn.out_proj") for e in pairing.entries)
    for name in (W1, V1, W2):
        assert any(note.startswith(f"{name}: skipped, DBRX's experts") for note in pairing.notes), name
