"""check_peft_config names why a target_modules entry matches no module PEFT wraps where the entry does name one:
modules_to_save or exclude_modules keeps PEFT from wrapping it (tests/checkpoints/test_peft_match.py checks that
against PEFT's get_peft_model). It had said "matches 0 modules" as of a name that is absent."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.ranks.plan import check_peft_config

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]


@pytest.mark.parametrize("field", ["modules_to_save", "exclude_modules"])
def test_an_entry_peft_leaves_unwrapped_is_named_with_the_field_at_fault(field):
    config = {"target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"], "r": 2, field: ["lm_head"]}
    with pytest.raises(ConfigError, match=rf"target_modules entry 'lm_head' matches 0 modules PEFT wraps: it names "
                                          rf"lm_head, which {field} keeps PEFT from wrapping"):
        check_peft_config(config, NAMES)


def test_an_entry_naming_nothing_says_only_that():
    """Negative control: an entry naming no module at all gets no such reason."""
    with pytest.raises(ConfigError, match=r"target_modules entry 'no_such' matches 0 modules(?! PEFT wraps)"):
        check_peft_config({"target_modules": ["lm_head", "no_such"], "r": 2}, NAMES)
