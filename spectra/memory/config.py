"""Reading a ``config.json`` (a dict, a transformers config or model, a path, a hub id) and the family's defaults
that transformers fills in where it is silent."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from spectra.errors import CheckpointError, ConfigError


def _config_object(mtype: str, cfg: Mapping | None = None):
    """transformers' config of ``mtype`` built from ``cfg`` (what the family fills in where config.json is silent;
    without ``cfg``, the family's defaults: Gemma ties its embeddings, Llama does not), None where this transformers
    cannot build it. Read a key the config lacks as ``getattr(_config_object(mtype), key, fallback)``."""
    try:
        import transformers

        if cfg is not None:
            return transformers.AutoConfig.for_model(mtype, **{k: v for k, v in cfg.items() if k != "model_type"})
        with _quiet_logger("transformers.configuration_utils"):
            return transformers.AutoConfig.for_model(mtype)
    except Exception:  # no transformers, an unknown model_type, a config its strict validation refuses
        return None


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Drop the warnings of logger `name` while the family's defaults alone are built: what transformers says of
    them is not about the user's checkpoint (StarCoder2's default bos/eos 50256 lie outside its default vocabulary
    of 49,152, so every StarCoder2 recommend/memory printed "bos_token_id must be … between 0 and 49151")."""
    import logging

    logger = logging.getLogger(name)
    drop = logging.Filter("-")  # passes no record (records are named transformers.…)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_config(config_or_model: Any) -> dict:
    """A ``config.json`` dict from a dict, a transformers config or model, a path, or a hub id.

    A hub id downloads ``config.json`` only (``huggingface_hub.hf_hub_download``); offline, the
    error says so and asks for a local file.
    """
    if isinstance(config_or_model, Mapping):
        return dict(config_or_model)
    if hasattr(config_or_model, "config") and hasattr(config_or_model.config, "to_dict"):
        config_or_model = config_or_model.config
    if hasattr(config_or_model, "to_dict"):
        return config_or_model.to_dict()
    if not isinstance(config_or_model, (str, os.PathLike)):
        raise ConfigError(f"Cannot read a model config from {type(config_or_model).__name__}: pass a dict, "
                          "a path to config.json (or its folder) or a hub id.")
    path = Path(config_or_model)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        text = str(config_or_model)
        if path.suffix == ".json" or text.startswith((".", "/", "~")) or text.count("/") > 1:
            raise CheckpointError(f"No config.json at {path}.")
        path = _download_config(text)
    if Path(path).suffix in _WEIGHT_SUFFIXES:
        beside = Path(path).parent / "config.json"
        raise CheckpointError(f"{path} is a weights file; spectra reads the model's config: pass "
                              + (f"{beside} or its folder." if beside.exists() else "its config.json or its folder."))
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:  # binary: a weights file of another name
        raise CheckpointError(f"{path} is not a text file (a weights file?); pass config.json, its folder or a hub "
                              "id.") from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); pass config.json, its folder or a hub id.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a JSON object (a model config), not {type(data).__name__}.")
    return data


# files that hold weights, not a config: named for what they are rather than read as JSON
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack"})


def _download_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(f"Could not get config.json of hub model {repo_id!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). If offline, pass a local "
                              "config.json or its folder instead.") from None
