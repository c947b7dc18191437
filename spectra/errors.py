"""Typed errors that spectra raises for bad input, and its one warning.

Every error names the file, tensor or option at fault and says what to do. The CLI
prints them as one paragraph (no traceback unless ``--debug``).
"""

from __future__ import annotations


class SpectraError(Exception):
    """Base class of every error spectra raises on purpose."""


class CheckpointError(SpectraError):
    """A checkpoint cannot be opened or read (missing, corrupt, unsafe, offline hub id)."""


class PairingError(SpectraError):
    """Base and tuned checkpoints do not pair (no common tensors, shape mismatch, ambiguity)."""


class NonFiniteWeightError(PairingError):
    """A weight holds NaN or Inf."""


class AdapterError(SpectraError):
    """A PEFT adapter is malformed or does not fit its base."""


class ConfigError(SpectraError, ValueError):
    """An option has an invalid value."""


class PeftConfigWarning(UserWarning):
    """A PEFT config can express a plan only approximately (e.g. one rank for a fused expert parameter)."""
