"""spectra: how much rank did a fine-tune really use, and which LoRA rank would capture it.

The public API is imported lazily so that ``import spectra`` (and ``spectra --help``)
stays fast; torch is loaded on first use of a function that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "open_checkpoint": "spectra.checkpoints.source",
    "iter_deltas": "spectra.checkpoints.pairing",
    "DeltaW": "spectra.checkpoints.pairing",
    "PairingOptions": "spectra.checkpoints.pairing",
    "analyze": "spectra.analysis",
    "AnalysisConfig": "spectra.analysis",
    "AnalysisResult": "spectra.analysis",
    "recommend_ranks": "spectra.ranks",
    "RankPolicy": "spectra.ranks",
    "RankPlan": "spectra.ranks",
    "extract_adapter": "spectra.lora.extract",
    "estimate_memory": "spectra.memory",
    "train_adapter": "spectra.lora.train",
    "TrainConfig": "spectra.lora.train",
    "verify_adapter": "spectra.lora.verify",
    "VerifyConfig": "spectra.lora.verify",
    "rank_sweep": "spectra.lora.verify",
    "run_demo": "spectra.demo.run",
    "DemoConfig": "spectra.demo.run",
    "write_demo_dataset": "spectra.demo.data",
    "truncation_sweep": "spectra.sweep",
    "SweepConfig": "spectra.sweep",
    "functional_ranks": "spectra.ranks",
}

__all__ = sorted(_API) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from spectra.analysis import AnalysisConfig, AnalysisResult, analyze
    from spectra.checkpoints.pairing import DeltaW, PairingOptions, iter_deltas
    from spectra.checkpoints.source import open_checkpoint
    from spectra.demo.data import write_demo_dataset
    from spectra.demo.run import DemoConfig, run_demo
    from spectra.lora.extract import extract_adapter
    from spectra.lora.train import TrainConfig, train_adapter
    from spectra.lora.verify import VerifyConfig, rank_sweep, verify_adapter
    from spectra.memory import estimate_memory
    from spectra.ranks import RankPlan, RankPolicy, functional_ranks, recommend_ranks
    from spectra.sweep import SweepConfig, truncation_sweep


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")
