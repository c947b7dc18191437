"""A truncation sweep of a vision-language model that transformers 5 loads only as image-text-to-text (Qwen2-VL,
Qwen3-VL-MoE), on text.

The fine-tune plants a rank-4 update in the language model's layer-0 q and a rank-2 one in the vision tower's
layer-0 ``attn.qkv``; both are written with ``save_pretrained``, Qwen2-VL's with the hub's names (``model.layers.N…``,
``visual.…``), which the loaded class names ``model.language_model.layers.N…`` and ``model.visual.…``. The sweep
writes each truncated ΔW into the loaded model by name: its points must be the float64 reference, the plain causal
LM (Qwen2, Qwen3-MoE) holding the base's language model with q set to W_base + the rank-r SVD truncation of ΔW, run
on each example alone. The tower's curve is never reached by text, and the sweep must say so rather than read a rank
off it.
"""

from __future__ import annotations

import pytest

from spectra.lora.data import prepare_data
from spectra.sweep import SweepConfig, truncation_sweep
from tests.lora.conftest import random_text
from tests.lora.test_vlm import (
    FAMILIES,
    LOSS_REL,
    NOTE,
    TEXT_Q,
    VISION_QKV,
    _loaded,
    _svd_reference,
    planted_fine_tune,
    reference_loss,
    text_lm,
    tiny_vlm,
)
from tests.models import save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RANKS = [0, 1, 2, 4]


def stored(family: str, name: str) -> str:
    """A module's name in the checkpoint: Qwen2-VL's save_pretrained writes the hub's names."""
    if family != "qwen2_vl":
        return name
    return name.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)


@pytest.fixture(scope="module", params=FAMILIES)
def swept(request, tmp_path_factory):
    """(family, base, tuned, eval data, the sweep by role with both non-target sources)."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"sweep-{family}")
    model = tiny_vlm(family)
    base, tuned = save(model, folder / "base", "safetensors"), save(planted_fine_tune(model), folder / "tuned",
                                                                     "safetensors")
    held = random_text(folder / "eval.txt", chars=16 * 6, seed=5)
    result = truncation_sweep(base, tuned, held, ranks=RANKS, groups="role", non_target="both",
                              config=SweepConfig(bootstrap=0, max_length=16), progress=False)
    return family, base, tuned, held, result


def test_end_points_are_the_base_and_the_fine_tune(swept):
    family, base, tuned, held, result = swept
    _, data, _, _, _ = prepare_data(base, held, max_length=16)
    for name, spec in (("base", base), ("tuned", tuned)):
        total, count = reference_loss(text_lm(_loaded(spec)), data)
        assert result.reference[name]["loss"] == pytest.approx(total / count, rel=LOSS_REL), (family, name)
    assert result.data["units"] == count and result.data["task"] == "causal_lm"
    assert any(NOTE in n for n in result.data["notes"])
    assert not any("match no parameter" in n or "no place" in n for n in result.data["notes"])


def test_the_language_q_curve_writes_each_truncation_into_the_loaded_model(swept):
    """Rank r of the q curve (non-targets the base's) is base + the rank-r truncation of q's ΔW, by the checkpoint's
    name written into the loaded model's parameter; rank 0 is the base, rank 4 (q's ΔW whole) the fine-tune's
    language model, and the ranks between differ from both (the negative control: a write that missed its parameter
    would leave every point at the base)."""
    family, base, tuned, held, result = swept
    _, data, _, _, _ = prepare_data(base, held, max_length=16)
    curve = {p["rank"]: p["loss"] for p in result.curve(group="q", non_target="base")}
    assert sorted(curve) == RANKS
    for rank in RANKS:
        total, count = reference_loss(text_lm(_svd_reference(base, tuned, [TEXT_Q], rank)), data)
        assert curve[rank] == pytest.approx(total / count, rel=LOSS_REL), (family, rank)
    assert curve[0] == pytest.approx(result.reference["base"]["loss"], rel=LOSS_REL)
    assert curve[4] == pytest.approx(result.reference["tuned"]["loss"], rel=LOSS_REL)
    assert len({round(v, 6) for v in curve.values()}) == len(RANKS)


def test_the_towers_curve_is_reported_unreached_and_its_modules_keep_their_stack(swept):
    family, _, _, _, result = swept
    modules = {m["name"]: m for m in result.data["modules"]}
    assert modules[stored(family, VISION_QKV)]["stack"] == "vision"
    assert "stack" not in modules[stored(family, TEXT_Q)]
    unreached = result.data["unreached"]
    assert [(u["group"], sorted(u["non_target"]), u["modules"]) for u in unreached] == [
        ("vision qkv", ["base", "tuned"], [stored(family, VISION_QKV)])]  # both sources; the q curve is reached
    flat = result.curve(group="vision qkv", non_target="tuned")  # the fine-tune's metric at every rank, to the bit
    assert {p["metric"] for p in flat} == {result.reference["tuned"]["metric"]}
