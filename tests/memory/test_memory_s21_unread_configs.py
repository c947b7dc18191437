"""Architectures whose config.json the memory model cannot read are refused as not modelled, not as a config.json
that "lacks" a key: DistilBERT (``dim``, not hidden_size) was told its config.json "lacks 'hidden_size'", as were
~270 other families' default configs (vision towers, audio encoders, Funnel, FNet, …), and families whose sizes are
lists or mappings (Gemma 3n's intermediate_size per layer, LXMERT's layer counts, ESM's vocabulary None, CLAP
audio's heads per stage) crashed with a TypeError. A config.json of a family that has the key still says what it lacks."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.memory import model_shape


def _default(mtype: str) -> dict:
    import transformers

    return transformers.AutoConfig.for_model(mtype).to_dict()


@pytest.mark.parametrize("mtype", ["distilbert", "funnel", "clip_vision_model", "gemma3n_text", "lxmert", "esm",
                                   "clap_audio_model"])
def test_an_architecture_named_otherwise_is_refused_as_not_modelled(mtype):
    with pytest.raises(ConfigError, match=f"model_type {mtype}: an architecture spectra's memory model does not "
                                          "describe") as err:
        model_shape(_default(mtype))
    assert "lacks" not in str(err.value)


def test_a_config_json_of_a_read_family_still_says_what_it_lacks():
    """Negative control: Llama's config has num_hidden_layers, so a config.json without it lacks it; a model_type
    transformers does not know (or none) is read by its keys, and lacks them."""
    cfg = _default("llama")
    del cfg["num_hidden_layers"]
    with pytest.raises(ConfigError, match="config.json of model_type llama lacks 'num_hidden_layers'"):
        model_shape(cfg)
    for mtype in ("not_a_family", ""):
        with pytest.raises(ConfigError, match="lacks 'num_hidden_layers'"):
            model_shape({"model_type": mtype, "hidden_size": 8})
    cfg = _default("llama") | {"intermediate_size": [64, 64]}  # a read family's size of another kind: a wrong config
    with pytest.raises(ConfigError, match="config.json of model_type llama holds sizes of other kinds"):
        model_shape(cfg)


@pytest.mark.slow
def test_no_default_config_of_any_model_type_lacks_a_key_or_crashes():
    """Every model type's default config (transformers' own) is read or refused as not modelled: never "lacks" a
    key its own family does not name, never a TypeError."""
    import logging

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    logging.disable(logging.WARNING)
    try:
        wrong = {}
        for mtype in sorted(CONFIG_MAPPING_NAMES):
            try:
                cfg = _default(mtype)
            except Exception:  # a config its own defaults do not build
                continue
            try:
                model_shape(cfg)
            except ConfigError as err:
                if "lacks" in str(err) and "text_config" not in str(err):
                    wrong[mtype] = str(err)
            except TypeError as err:
                wrong[mtype] = f"TypeError: {err}"
    finally:
        logging.disable(logging.NOTSET)
    assert not wrong, wrong
