"""Role ``projector`` is for the projector stack's Linears (and Conv1D) alone: its bare parameters (Gemma 3's
``mm_input_projection_weight``, Idefics2's perceiver ``latents``, Aria's learned ``query`` and its MultiheadAttention's
packed ``in_proj_weight``) keep ``other`` and its position tables (Florence2's ``row_embeddings``/``column_embeddings``)
get ``pos_embed`` (rev1 F4). As ``projector`` they were a block role PEFT cannot adapt, so ``extract --stacks
projector`` on Gemma 3 was refused with advice to leave out the very role it asked for. The references: the models
built from config on the meta device (module types scanned, not listed) and a planted ΔW's analysis and extract."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from spectra.checkpoints.architectures import module_info

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
# multimodal model types whose projector stack holds something other than Linears, two whose holds Linears only, and
# GOT-OCR2's, whose convolutions PEFT's LoRA wraps (lora.Conv2d; analysis reads a kernel as (out, in·k…))
FAMILIES = ("gemma3", "idefics2", "aria", "florence2", "llava", "qwen2_vl", "got_ocr2")


def _meta_model(model_type: str):
    import transformers as tf
    from transformers.models.auto import modeling_auto

    cls = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return getattr(tf, cls)._from_config(tf.AutoConfig.for_model(model_type))


def _projector_tensors(model) -> dict[str, str]:
    """Every module holding a 2-D weight and every bare parameter of the projector stack → its kind (``Linear`` for
    nn.Linear and its subclasses, else the module's class, or ``parameter``)."""
    config = model.config.to_dict()
    out = {n: "Linear" if isinstance(m, torch.nn.Linear) else type(m).__name__ for n, m in model.named_modules()
           if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2}
    out |= {n: "parameter" for n, p in model.named_parameters()
            if not n.endswith((".weight", ".bias")) and p.dim() >= 2}
    return {n: kind for n, kind in out.items() if module_info(n, config).stack == "projector"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_role_projector_is_the_projector_stacks_linears_alone(model_type):
    model = _meta_model(model_type)
    config = model.config.to_dict()
    tensors = _projector_tensors(model)
    assert tensors, model_type
    for name, kind in tensors.items():
        role = module_info(name, config).role
        if kind in ("Linear", "Conv1D") or kind.startswith("Conv"):  # a module PEFT's LoRA wraps
            assert role != "other" or "norm" in name, (model_type, name, kind, role)
        else:  # a bare parameter, an Embedding, MultiheadAttention's packed projection
            assert role in ("other", "pos_embed"), (model_type, name, kind, role)
    expected = {"gemma3": {"model.multi_modal_projector.mm_input_projection_weight": "other"},
                "idefics2": {"model.connector.perceiver_resampler.latents": "other"},
                "aria": {"model.multi_modal_projector.query": "other",
                         "model.multi_modal_projector.cross_attn.multihead_attn.in_proj_weight": "other"},
                "florence2": {"model.multi_modal_projector.image_position_embed.row_embeddings": "pos_embed",
                              "model.multi_modal_projector.image_position_embed.column_embeddings": "pos_embed"},
                "llava": {"model.multi_modal_projector.linear_1": "projector",
                          "model.multi_modal_projector.linear_2": "projector"},
                "qwen2_vl": {"model.visual.merger.mlp.0": "projector", "model.visual.merger.mlp.2": "projector"},
                "got_ocr2": {"model.multi_modal_projector.conv_upsampler1": "projector",
                             "model.multi_modal_projector.multimodal_projector": "projector"}}
    assert {n: module_info(n, config).role for n in expected[model_type]} == expected[model_type]


def test_extract_stacks_projector_on_gemma3_gives_the_right_refusal(tmp_path):
    """A ΔW planted in Gemma 3's bare projector matrix: analysis finds it (role other, stack projector, rank 2);
    extract --stacks projector has nothing of the projector's block roles to extract, and --roles other names the
    matrix as a parameter PEFT cannot adapt (advice that now names the right role)."""
    from spectra.analysis import AnalysisConfig, analyze
    from spectra.errors import ConfigError
    from spectra.lora.extract import extract_adapter
    from tests.models import build_model, low_rank, save

    base = build_model("gemma3_multimodal")
    name = "model.multi_modal_projector.mm_input_projection_weight"
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_parameter(name).add_(low_rank(*base.get_parameter(name).shape, 2, seed=1).float())
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    rows = [r for r in analyze(b, t, AnalysisConfig(stacks=("projector",)), cache_dir=False,
                               progress=False).to_dict()["modules"] if r["kind"] == "matrix"]
    assert [(r["name"], r["role"], r["stack"], r["energy_rank"]["0.99"]) for r in rows] == [
        ("multi_modal_projector.mm_input_projection_weight", "other", "projector", 2)]
    with pytest.raises(ConfigError, match="nothing to extract"):
        extract_adapter(b, t, 2, tmp_path / "a1", stacks=("projector",), progress=False)
    with pytest.raises(ConfigError, match="mm_input_projection_weight") as refused:
        extract_adapter(b, t, 2, tmp_path / "a2", roles=("other",), stacks=("projector",), progress=False)
    assert "Leave their role out (--roles)" in str(refused.value)  # the role asked for, other, is the one at fault
