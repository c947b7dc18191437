"""Extraction onto experts the model holds (E, in, out) (x @ W[e]): gpt-oss, which marks them ``is_transposed``
for PEFT, and Llama 4, which does not. PEFT's own load and merge is the referee; the reference update is the
best rank-r approximation of each stored expert's ΔW, by a float64 numpy SVD."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from spectra.lora.extract import extract_adapter
from tests.models import save

RANK, PLANTED = 4, 6


def _tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=3, vocab_size=64)
    if family == "llama4":
        return tf.Llama4ForCausalLM(tf.Llama4TextConfig(intermediate_size_mlp=40, moe_layers=[0, 1],
                                                        num_experts_per_tok=1, **common)).eval()
    return tf.GptOssForCausalLM(tf.GptOssConfig(num_experts_per_tok=2, layer_types=["full_attention"] * 2,
                                                **common)).eval()


def _expert_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in f".{n}" and p.dim() == 3}


def _planted(model, rank: int, *, seed: int, attention: bool = False):
    """A copy of `model` with a rank-`rank` update of every expert (in its (E, in, out) layout) and, with
    `attention`, a rank-2 update of every attention projection."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 3 and ".experts." in f".{name}":
                p += 0.05 * torch.randn(p.shape[0], p.shape[1], rank, generator=g) @ torch.randn(
                    p.shape[0], rank, p.shape[2], generator=g)
            elif attention and p.dim() == 2 and "self_attn" in name:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    return tuned


def _best(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_experts_held_in_by_out_merge_to_each_experts_best_rank_r_update(family, tmp_path):
    from peft import PeftModel

    base = _tiny(family)
    tuned = _planted(base, PLANTED, seed=1)  # (E, in, out): a rank-6 update of every expert
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")

    result = extract_adapter(b, t, RANK, tmp_path / "ad", roles=("gate_up", "down"), progress=False)

    parameters = _expert_parameters(base)
    assert sorted(result.config["target_parameters"]) == sorted(parameters)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
        for name, p in parameters.items():
            stored = (_expert_parameters(tuned)[name] - p).double().numpy()  # (E, in, out) as the model holds it
            got = (_expert_parameters(merged)[name] - p).double().numpy()
            for e in range(stored.shape[0]):
                want = _best(stored[e], RANK)
                np.testing.assert_allclose(got[e], want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=f"{name}[{e}]")
                assert np.linalg.norm(stored[e] - want) > 0.05 * np.linalg.norm(stored[e])  # rank 4 < 6: truncated
                assert np.abs(got[e] - want.T).max() > 1e-3 if want.shape[0] == want.shape[1] else True
        reference = copy.deepcopy(base)
        for name, p in _expert_parameters(reference).items():
            stored = (_expert_parameters(tuned)[name] - p).double().numpy()
            p += torch.from_numpy(np.stack([_best(d, RANK) for d in stored])).float()
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unmerged, reference(ids).logits, rtol=1e-4, atol=1e-5)  # PEFT's forward, unmerged
        assert float((reference(ids).logits - base(ids).logits).abs().max()) > 1e-3  # negative control: it moved


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_default_roles_extract_attention_and_experts_together(family, tmp_path):
    """The default targets (q, k, v, o, gate, up, down) take the fused experts whole beside the attention."""
    from peft import PeftModel

    base = _tiny(family)
    tuned = _planted(base, 2, seed=3, attention=True)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", progress=False)  # every planted update is rank 2: exact
    assert result.config["target_parameters"] and result.config["target_modules"]
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).merge_and_unload()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
        assert float((tuned(ids).logits - base(ids).logits).abs().max()) > 1e-3


# PEFT warns of the rank_pattern keys of parameters it adapts, which it applies (the ranks are checked below)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_a_recommended_plan_is_written_read_back_and_extracted(family, rslora, tmp_path):
    """recommend → save_plan → load_plan → extract → PEFT's merge, where the checkpoint stores each projection's
    experts as one 3-D tensor: the plan names them per expert (…experts.0.gate_up_proj), which save_plan could not
    resolve ("has no weight for"). Planted ranks 4 (gate_up) and 2 (down) in exact binary fractions: the plan
    finds them, and its adapter and its peft_config hold them; the merge is the fine-tune."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from spectra.analysis import AnalysisConfig, analyze
    from spectra.ranks import RankPolicy, load_plan, recommend_ranks, save_plan

    base = _tiny(family)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in _expert_parameters(tuned).items():
            k = 4 if "gate_up" in name else 2
            p += 2 ** -6 * (torch.randint(-3, 4, (p.shape[0], p.shape[1], k), generator=g).float()
                            @ torch.randint(-3, 4, (p.shape[0], k, p.shape[2]), generator=g).float())
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    roles = ("gate_up", "down")
    analysis = analyze(b, t, AnalysisConfig(roles=roles, dtype="float64"), cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.999999, roles=roles, rslora=rslora))
    assert {(m.name.rpartition(".")[2], m.rank) for m in plan.modules} == {("gate_up_proj", 4), ("down_proj", 2)}

    path = save_plan(plan, tmp_path / "plan.json")
    config = json.loads(path.read_text())["peft_config"]
    assert sorted(config["target_parameters"]) == sorted(_expert_parameters(base))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        **{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}))
    ranks = {f"{n.removeprefix('base_model.model.').replace('.base_layer', '')}.{m.parameter_name}": m.r["default"]
             for n, m in peft_model.named_modules() if hasattr(m, "parameter_name")}
    assert ranks == {n: 4 if "gate_up" in n else 2 for n in _expert_parameters(base)}

    result = extract_adapter(b, t, load_plan(path), tmp_path / "ad", progress=False)
    assert result.config["use_rslora"] is rslora
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).merge_and_unload()
    with torch.no_grad():
        for name, p in _expert_parameters(base).items():
            want = (_expert_parameters(tuned)[name] - p).double()
            got = (_expert_parameters(merged)[name] - p).double()
            assert float((got - want).norm() / want.norm()) < 1e-5, name
