"""spectra.groups: how modules are grouped and named across stacks, below every stage that labels them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spectra.checkpoints.architectures import STACKS
from spectra.groups import curve_name, group_label, group_of, stack_index, stacks_in


def test_stacks_sort_language_model_first_then_as_architectures_lists_them_then_unknown_by_name():
    rows = [{"stack": "zeta"}, {"stack": STACKS[1]}, {}, {"stack": "alpha"}, {"stack": STACKS[0]}, {"stack": None}]
    assert stacks_in(rows) == [None, STACKS[0], STACKS[1], "alpha", "zeta"]  # one each: {} and None are both None
    assert [stack_index(s) for s in (None, *STACKS)] == [(i, "") for i in range(len(STACKS) + 1)]
    assert stack_index("alpha") == (len(STACKS) + 1, "alpha") < stack_index("zeta")


def test_a_role_reads_with_its_stack_only_beside_another_stack():
    lm_q, vision_q = {"name": "layers.0.q_proj", "role": "q"}, {"name": "v.0.q_proj", "role": "q", "stack": "vision"}
    assert group_of(lm_q) == (None, "q") and group_of(vision_q) == ("vision", "q")
    both = stacks_in([lm_q, vision_q])
    assert [group_label(group_of(r), both) for r in (lm_q, vision_q)] == ["q", "vision q"]
    # negative control: a stack shown alone is not named, whichever it is
    assert group_label(group_of(vision_q), stacks_in([vision_q])) == "q"
    assert group_label(group_of(lm_q), stacks_in([lm_q])) == "q"


def test_a_sweep_curve_reads_in_a_sentence_as_the_sweep_notes_write_it():
    """One spelling for the sweep's unreached note and the sweep report's summary, which had each their own."""
    assert curve_name("model") == "the whole-model curve"
    assert [curve_name(g) for g in ("q", "vision q")] == ["the 'q' curve", "the 'vision q' curve"]


def test_the_functional_ranks_label_curves_without_loading_the_reports_or_torch():
    """ranks.functional names a sweep's role curves as the reports name groups; it imported them from
    report.tables, a later stage. Through spectra.groups it loads no report module, and spectra.groups no torch."""
    code = ("import sys, spectra.groups; assert 'torch' not in sys.modules, 'torch'; import spectra.ranks.functional; "
            "loaded = [m for m in sys.modules if m.startswith('spectra.report')]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def _omni(family: str):
    """A whole Qwen-Omni model (thinker, talker, vocoder) on the meta device, from transformers' default config: its
    module names and config.json, no weights."""
    import torch
    import transformers as tf

    if family == "qwen2_5_omni":
        config, cls = tf.Qwen2_5OmniConfig(), tf.Qwen2_5OmniForConditionalGeneration
    else:  # transformers' default talker config lacks two attributes its classes read
        config, cls = tf.Qwen3OmniMoeConfig(), tf.Qwen3OmniMoeForConditionalGeneration
        config.talker_config.text_config.shared_expert_intermediate_size = 64
        config.talker_config.spatial_merge_size = 2
    with torch.device("meta"):
        return cls(config), config.to_dict()


# Each layer list of an Omni model and the stack its layers belong to (None: the thinker's language model)
THINKER = {"thinker.model.language_model.layers": None, "thinker.model.visual.blocks": "vision",
           "thinker.model.audio_tower.layers": "audio"}
OMNI_LAYERS = {"qwen2_5_omni": THINKER | {"talker.model.layers": "talker"},
               "qwen3_omni_moe": THINKER | {"talker.model.layers": "talker",
                                            "talker.code_predictor.model.layers": "code_predictor",
                                            "code2wav.pre_transformer.layers": "vocoder"}}


@pytest.mark.parametrize("family", sorted(OMNI_LAYERS))
def test_an_omni_models_talker_and_vocoder_are_stacks_of_their_own(family):
    """Qwen2.5-Omni's and Qwen3-Omni's talker (talker.model.layers.N) and Qwen3-Omni's code predictor and code2wav
    (their own layers.N) got stack None, the thinker's language model's: their q of layer 0 shared the thinker's
    layer × role cell. Every weight in one of the model's layer lists (read off its submodules) now gets that list's
    stack and its index there, and no (stack, layer, role) cell holds layers of two lists; every other weight under
    talker. and the vocoder (token2wav., code2wav.) gets its stack too."""
    from spectra.checkpoints.architectures import module_info

    model, config = _omni(family)
    lists = OMNI_LAYERS[family]
    cells, seen = {}, set()
    for name, _ in model.named_parameters():
        module = name.removesuffix(".weight")
        info = module_info(module, config)
        for prefix, stack in lists.items():
            layers = model.get_submodule(prefix)
            index = next((i for i in range(len(layers)) if module.startswith(f"{prefix}.{i}.")), None)
            if index is not None:
                assert (info.stack, info.layer) == (stack, index), (name, info)
                cells.setdefault((info.stack, info.layer, info.role), set()).add(prefix)
                seen.add(prefix)
        top = module.split(".")[0]
        if top in ("talker", "token2wav", "code2wav"):
            expected = "vocoder" if top != "talker" else ("code_predictor" if ".code_predictor." in name else "talker")
            assert info.stack == expected, name
        else:
            assert info.stack in (None, "vision", "audio", "projector"), name  # the thinker's, as before
    assert seen == set(lists)
    assert all(len(prefixes) == 1 for prefixes in cells.values()), {c: p for c, p in cells.items() if len(p) > 1}
    # the hub's checkpoints name the thinker's thinker.model.layers.N, thinker.visual.…, the talker's as the model
    hub = {"thinker.model.layers.0.self_attn.q_proj": None, "thinker.visual.blocks.0.attn.qkv": "vision",
           "thinker.audio_tower.layers.0.self_attn.q_proj": "audio", "talker.model.layers.0.self_attn.q_proj": "talker"}
    assert {n: module_info(n, config).stack for n in hub} == hub
    # negative control: without the stack, layer × role cells hold the thinker's and the talker's layers together
    assert any(len(prefixes) > 1 for prefixes in _without_stack(cells).values())


def _without_stack(cells: dict) -> dict:
    merged: dict = {}
    for (_, layer, role), prefixes in cells.items():
        merged.setdefault((layer, role), set()).update(prefixes)
    return merged


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "mllama", "sam", "blip-2", "whisper", "vit", "swin",
                                        "clip", "t5"])
def test_rows_without_a_stack_get_each_rows_own_stack_with_names_told_apart_by_their_numbers_only(model_type):
    """rows_with_stacks decides a stack once per shape of name (numbers read as 0), so that a 47k-row analysis is
    not 47k regex scans: on every weight of each model (transformers' default config, built on the meta device)
    that is what module_stack gives each row by itself, with the whole config.json as a new run reads it (an
    encoder–decoder's, Whisper's and T5's, holding is_encoder_decoder: their encoders are the encoder stack)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModel

    from spectra.checkpoints.architectures import module_stack
    from spectra.groups import rows_with_stacks

    config = CONFIG_MAPPING[model_type]()
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    names = [n.removesuffix(".weight") for n, p in model.named_parameters() if p.dim() >= 2]
    rows = rows_with_stacks([{"name": n} for n in names], model_type)
    expected = [module_stack(n, config.to_dict()) for n in names]
    assert [r.get("stack") for r in rows] == expected
    if model_type in ("llava", "qwen2_vl", "mllama", "sam", "blip-2", "clip", "whisper", "t5"):  # stacks told apart
        assert len(set(expected)) >= 2
