"""extract on JetMoE's experts (``JetMoeParallelExperts``: 3-D weights (experts, out, in), one record per expert in
the pairing): placement reads such a weight as E (out, in) slices named as the pairing names them
(``….input_linear.3``), so extract writes a LoRA on the weight through PEFT's ``target_parameters``. It refused them
("a 3-D tensor spectra's pairing does not split per expert"). The reference is PEFT itself: the adapter loaded onto
the tiny base with ``PeftModel.from_pretrained`` and merged gives the fine-tune's weights, and the adapter read as the
tuned side (the pairing's ``target_parameters`` path, which refused it alike) gives each expert PEFT's merged update.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.checkpoints.pairing import Pairing, PairingOptions
from tests.checkpoints.test_architectures_gemma4_jetmoe import tiny_jetmoe
from tests.cli.test_cli import run
from tests.models import flat_update, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def test_extract_writes_jetmoe_experts_that_peft_merges_back(tmp_path, monkeypatch, capsys):
    """Rank-2 updates of layer 1's MLP expert 2 down, layer 0's attention expert 1 query, layer 1's MLP expert 0
    gate rows and layer 0's kv_proj: `extract --rank 2 --roles q,gate,down` writes target_parameters for those expert
    weights, and PEFT's merge of the adapter onto the base equals the fine-tune there (float64, to float32
    rounding), every other expert weight the base's. Negative control: --roles k,v adapts kv_proj alone, the experts
    merge back to the base's."""
    import transformers as tf
    from peft import PeftModel

    base = tiny_jetmoe()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].mlp.output_linear.weight[2] += flat_update((32, 48), 2, seed=1).float()
        tuned.model.layers[0].self_attention.experts.input_linear.weight[1] += flat_update((8, 32), 2, seed=2).float()
        tuned.model.layers[1].mlp.input_linear.weight[0, :48] += flat_update((48, 32), 2, seed=3).float()
        tuned.model.layers[0].self_attention.kv_proj.weight += flat_update((16, 32), 2, seed=4).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    reference = dict(tf.AutoModelForCausalLM.from_pretrained(t, dtype=torch.float64).named_parameters())
    for roles, experts in (("q,gate,down", True), ("k,v", False)):
        out = tmp_path / f"a-{roles}"
        code, _, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "2", "--roles", roles, "-o", out)
        assert code == 0, err
        model = tf.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float64)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged = dict(PeftModel.from_pretrained(model, out).merge_and_unload().named_parameters())
        moved = {n for n in merged if not torch.equal(start[n], reference[n])}
        assert len(moved) == 4
        for name, weight in merged.items():
            adapted = experts if weight.dim() == 3 else (not experts and name in moved)
            goal = reference[name] if adapted else start[name]
            torch.testing.assert_close(weight, goal, rtol=0, atol=1e-6, msg=f"{roles}: {name}")
        if experts:  # the adapter as the tuned side: one record per expert, its ΔW PEFT's merge of that expert
            pairing = Pairing(b, out, PairingOptions(dtype="float64", vectors=False))
            records = {r.name: r for r in pairing}
            assert len(records) == 2 * 3 * (2 + 3)  # 2 layers × 3 experts × (q, down; input_linear, its [gate], [up])
            for name, record in records.items():
                module, _, expert = name.partition("[")[0].rpartition(".")
                rows = {"[gate]": slice(0, 48), "[up]": slice(48, 96)}.get(name[name.find("["):], slice(None))
                delta = merged[f"{module}.weight"][int(expert)][rows] - start[f"{module}.weight"][int(expert)][rows]
                torch.testing.assert_close(record.delta, delta.detach(), rtol=0, atol=1e-9, msg=name)
