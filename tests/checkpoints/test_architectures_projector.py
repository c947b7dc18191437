"""A multimodal projector's Linears get role ``projector``: ``--stacks projector`` adapts them with the default roles.

They were role ``other`` (no block role): ``spectra train --stacks projector`` and ``extract --stacks projector``
adapted nothing, where PEFT's ``all-linear`` adapts them. Text runs must still leave them out (text never reaches a
projector). The references: the models built from config (their Linears scanned, not listed), PEFT's own
``all-linear`` selection, a planted update's exact ΔW (float64) and PEFT's own merge of the extracted adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.analysis import AnalysisConfig, analyze
from spectra.checkpoints.architectures import module_info, module_stack, parse_stacks, role_named, role_selected
from spectra.checkpoints.roles import BLOCK_ROLES, default_roles, stack_roles
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.lora.train import target_modules
from tests.lora.test_vlm import tiny_vlm
from tests.models import add_to_parameter, low_rank, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
FAMILIES = ("llava", "qwen2_vl")


@pytest.mark.parametrize("name, role", [
    ("multi_modal_projector.linear_1", "projector"),  # LLaVA, as stored
    ("model.multi_modal_projector.linear_2", "projector"),  # as transformers 5 names it
    ("model.mm_projector.2", "projector"),  # LLaVA-1.5's original checkpoints
    ("model.connector.modality_projection.proj", "projector"),  # Idefics3, SmolVLM
    ("language_projection", "projector"),  # BLIP-2
    ("model.multi_modal_projector", "projector"),  # Mllama's projector is one Linear
    ("visual.merger.mlp.0", "projector"),  # Qwen2-VL, Qwen2.5-VL
    ("model.visual.merger.linear_fc1", "projector"),  # Qwen3-VL
    ("model.visual.deepstack_merger_list.0.linear_fc2", "projector"),
    ("multi_modal_projector.patch_merger.merging_layer", "projector"),  # Mistral 3
    # a projector's bare parameters are no Linear PEFT adapts: other (Gemma 3's (in, out) matrix, Idefics2's latents)
    ("multi_modal_projector.mm_input_projection_weight", "other"), ("model.connector.perceiver_resampler.latents", "other"),
    # a projector's norms stay other, as the language model's do
    ("visual.merger.ln_q", "other"), ("multi_modal_projector.layer_norm", "other"),
    ("multi_modal_projector.norm", "other"),
    ("multi_modal_projector.mm_soft_emb_norm", "other"), ("model.visual.deepstack_merger_list.0.norm", "other"),
    # a rule's role is kept: GLM-4V's merger MLP, Idefics2's perceiver attention
    ("model.visual.merger.gate_proj", "gate"), ("model.connector.perceiver_resampler.layers.0.self_attn.q_proj", "q"),
    # negative controls: the same words outside the projector stack are no projector
    ("model.layers.0.mlp.connector", "other"), ("model.layers.0.mlp.linear_1", "other"),
])
def test_a_projectors_modules_get_role_projector_and_its_norms_stay_other(name, role):
    assert module_info(name).role == role


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_of_the_projector_stack_is_role_projector_and_no_other_module_changed(family):
    """Scanned off the model built from config: the projector stack's Linears are role projector (LLaVA's
    linear_1 and linear_2, Qwen2-VL's merger.mlp.0 and mlp.2), its norm (Qwen2-VL's ln_q) other, and no Linear
    outside it is projector."""
    model = tiny_vlm(family)
    config = model.config.to_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    projector = [n for n in linears if module_stack(n, config) == "projector"]
    assert len(projector) == 2
    assert {module_info(n, config).role for n in projector} == {"projector"}
    assert all(module_info(n, config).role != "projector" for n in linears if n not in projector)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             and module_stack(n, config) == "projector"]
    assert len(norms) == (family == "qwen2_vl") and all(module_info(n, config).role == "other" for n in norms)


def test_projector_is_a_block_role_that_no_other_role_names():
    """--roles projector takes the projector's Linears alone; q, k, v, o, … never take them, nor does projector take
    any other role's module. The default roles hold it only where the stacks name the projector."""
    assert "projector" in BLOCK_ROLES
    assert "projector" not in default_roles(None) and "projector" not in default_roles(("language", "vision"))
    assert default_roles(("projector",)) == default_roles(None) + ("projector",) == (*default_roles(None), *stack_roles(
        ("language", "projector")))
    assert set(default_roles(None)) == set(BLOCK_ROLES) - {"projector"}
    assert role_selected("projector", ("projector",)) and role_named("projector", ("projector",))
    others = tuple(r for r in BLOCK_ROLES if r != "projector")
    assert not role_selected("projector", others)
    assert not any(role_selected(r, ("projector",)) for r in others)


def _projector(model) -> list[str]:
    """The Linears PEFT's all-linear adapts in the projector stack: an independent selection (PEFT's own)."""
    from peft import LoraConfig, get_peft_model

    config = model.config.to_dict()
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules="all-linear"))
    adapted = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    return sorted(n for n in adapted if module_stack(n, config) == "projector")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_roles_adapt_the_projector_only_where_stacks_name_it(family):
    """Text runs (stacks None, language): no projector module. --stacks projector with the default roles: exactly
    the projector Linears PEFT's all-linear adapts there, with a note that text will not train them."""
    model = tiny_vlm(family)
    projector = _projector(model)
    assert len(projector) == 2
    for stacks in (None, parse_stacks("language")):
        assert not set(target_modules(model, stacks=stacks)) & set(projector), stacks
    notes: list[str] = []
    assert sorted(target_modules(model, stacks=parse_stacks("projector"), notes=notes)) == projector
    assert any("projector stack(s) get no gradient from text-only batches" in n for n in notes)
    assert sorted(target_modules(model, ("projector",), stacks=parse_stacks("projector"))) == projector
    with_language = target_modules(model, stacks=parse_stacks("language,projector"))
    assert set(projector) < set(with_language) and set(with_language) - set(projector) == set(target_modules(model))
    with pytest.raises(ConfigError, match="no module of that stack"):  # the projector holds no q
        target_modules(model, ("q",), stacks=parse_stacks("projector"))


def _planted_pair(family: str, root):
    """(base model, tuned model, base dir, tuned dir, {parameter: planted ΔW (out, in) float64}): rank 2 in the
    projector's first Linear, rank 1 in its second and in the language model's layer-0 q_proj."""
    base = tiny_vlm(family)
    tuned = copy.deepcopy(base)
    config = base.config.to_dict()
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    first, second = sorted(n for n in linears if module_stack(n, config) == "projector")
    q = next(n for n in linears if n.endswith("layers.0.self_attn.q_proj") and module_stack(n, config) is None)
    planted = {}
    for i, (name, rank) in enumerate(((first, 2), (second, 1), (q, 1))):
        delta = low_rank(*linears[name].weight.shape, rank, seed=i)  # exact on the 2⁻¹² grid
        add_to_parameter(tuned, f"{name}.weight", delta)
        planted[f"{name}.weight"] = delta
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors"), planted


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_stacks_projector_rows_are_role_projector_at_their_planted_rank(family, tmp_path):
    _, _, b, t, planted = _planted_pair(family, tmp_path)
    result = analyze(b, t, AnalysisConfig(stacks=("projector",)), cache_dir=False, progress=False).to_dict()
    rows = [r for r in result["modules"] if r["kind"] == "matrix"]
    assert len(rows) == 2 and {(r["stack"], r["role"]) for r in rows} == {("projector", "projector")}
    assert sorted(r["energy_rank"]["0.99"] for r in rows) == [1, 2]
    everything = analyze(b, t, cache_dir=False, progress=False).to_dict()["modules"]
    q = [r for r in everything if r["kind"] == "matrix" and r["role"] == "q" and r.get("stack") is None]
    assert any(r["fro_norm"] > 0 for r in q) and not any(r.get("stack") == "projector" and r["role"] == "other"
                                                         and r["kind"] == "matrix" for r in everything)


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_of_the_projector_merges_by_peft_to_base_plus_its_delta_alone(family, tmp_path):
    """roles projector, stacks projector, rank 2 (exact on these updates): PEFT's merge of the adapter is the base
    plus the projector's ΔW (float64 reference) and nothing else; the language model's planted q is left out."""
    from peft import PeftModel

    base, _, b, t, planted = _planted_pair(family, tmp_path)
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("projector",), stacks=("projector",), progress=False)
    config = base.config.to_dict()
    assert {module_stack(m.name, config) for m in result.modules} == {"projector"} and len(result.modules) == 2
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).merge_and_unload().state_dict()
    expected = {k: v.double() for k, v in base.state_dict().items()}
    for name, delta in planted.items():
        if module_stack(name, config) == "projector":
            expected[name] = expected[name] + delta
    for key, value in merged.items():
        torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=1e-6, msg=key)
    q = next(name for name in planted if module_stack(name, config) is None)
    assert torch.equal(merged[q], base.state_dict()[q])  # negative control: planted there, not extracted
    default = extract_adapter(b, t, 2, tmp_path / "default", progress=False)  # no stack named: no projector
    assert [m.name for m in default.modules if module_stack(m.name, config) == "projector"] == []
    assert q.removesuffix(".weight") in {m.name for m in default.modules}
